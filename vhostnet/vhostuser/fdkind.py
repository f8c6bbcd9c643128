"""What kind of file a descriptor from the front-end is, before we rely on it.

vhost-user hands us file descriptors with SCM_RIGHTS: eventfds for kick,
call and err notifications, memfds (or files) for guest memory. A buggy or
hostile front-end can send anything instead: a pipe (always readable at
EOF, so a kick loop on it would spin), a socket, an O_PATH descriptor (no
read, no write, no fcntl O_NONBLOCK: os.set_blocking raises). Every fd is
therefore classified before it is used, and refused with a clear message if
it is not what the request needs.

Linux only: the kind comes from the /proc/self/fd link ("anon_inode:[eventfd]",
"/memfd:NAME (deleted)", "pipe:[N]", "socket:[N]") and the O_PATH status
flag; one readlink and one fcntl per fd, on the control plane only.
"""
from __future__ import annotations

import fcntl
import os
import stat

__all__ = ["fd_kind", "require_eventfd", "EVENTFD", "MEMFD", "FILE", "PIPE", "SOCKET", "PATH", "OTHER"]

EVENTFD, MEMFD, FILE, PIPE, SOCKET, PATH, OTHER = (
    "eventfd", "memfd", "file", "pipe", "socket", "O_PATH fd", "other")
_EVENTFD_LINK = "anon_inode:[eventfd]"   # fs/eventfd.c: anon_inode_getfile("[eventfd]", ...)
_MEMFD_PREFIX = "/memfd:"                # mm/memfd.c: memfd names are "memfd:" + name
O_PATH = getattr(os, "O_PATH", 0o10000000)


def fd_kind(fd: int) -> str:
    """One of the kinds above; raises OSError if FD is not open."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & O_PATH:
        return PATH
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        link = ""
    if link == _EVENTFD_LINK:
        return EVENTFD
    if link.startswith(_MEMFD_PREFIX):
        return MEMFD
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode):
        return PIPE
    if stat.S_ISSOCK(mode):
        return SOCKET
    if stat.S_ISREG(mode):
        return FILE
    return OTHER


def require_eventfd(fd: int, what: str) -> None:
    """Raise ValueError unless FD is an eventfd (vhost-user kick/call/err fds are)."""
    try:
        kind = fd_kind(fd)
    except OSError as e:
        raise ValueError(f"{what}: fd {fd} is not usable: {e.strerror or e}") from None
    if kind != EVENTFD:
        raise ValueError(f"{what}: the fd is a {kind}, not an eventfd")
