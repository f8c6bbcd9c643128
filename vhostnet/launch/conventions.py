"""QEMU's "Backend program conventions" for vhost-user back-ends.

QEMU's docs/interop/vhost-user.rst (section "Backend program conventions")
and docs/interop/vhost-user.json describe how management software (libvirt,
scripts, QEMU's own tooling) finds and starts a back-end without knowing
its private options:

- a *discovery file* (schema `VhostUserBackend`: description, type, binary,
  tags) in /usr/share/qemu/vhost-user/ (distro packages), /etc/qemu/vhost-user/
  (the administrator) or $XDG_CONFIG_HOME/qemu/vhost-user/ (a user), named
  with a two-digit priority prefix: ours is 50-vhostnet.json, type "net";
- the *binary* it names takes `--socket-path=PATH` (listen there),
  `--fd=FDNUM` (serve a socket the caller already opened; incompatible with
  --socket-path) and `--print-capabilities` (print the
  `VHostUserBackendCapabilities` JSON on stdout and exit 0, ignoring every
  other argument);
- it does not daemonize, exits non-zero early when it cannot start, and
  ends promptly on SIGTERM.

The binary is `vhostnet-backend` (a console script: `vhostnet serve` with
these conventions). Where it lands depends on how the package was
installed (a venv, ~/.local, /usr/local), and the discovery file must name
it by absolute path, so the file is written after installation by
`vhostnet install-discovery` (scripts/setup.sh runs it) rather than shipped
as static package data with a guessed path.

`adopt_listener()` checks an --fd before we use it: it must be an open
AF_UNIX SOCK_STREAM socket in the listening state, since QEMU (the
front-end) connects to us. Anything else is refused with a message saying
what the fd is instead. The fd handed over is the only one we ever close
that we did not open.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import sys
import sysconfig

__all__ = ["BACKEND_TYPE", "BINARY_NAME", "DISCOVERY_NAME", "capabilities", "discovery_doc",
           "discovery_dir", "find_binary", "adopt_listener", "listener_path", "FdError"]

BACKEND_TYPE = "net"                    # vhost-user.json, VHostUserBackendType
BINARY_NAME = "vhostnet-backend"        # the console script pyproject.toml installs
DISCOVERY_NAME = "50-vhostnet.json"     # vhost-user.json: "a double-digit prefix"
DISCOVERY_SUBDIR = os.path.join("qemu", "vhost-user")
DISTRO_PREFIX = "/usr"                  # -> /usr/share/qemu/vhost-user (distro packages)
SYSCONF_DIR = "/etc/qemu/vhost-user"    # the administrator's local additions


def capabilities() -> dict:
    """`--print-capabilities`: VHostUserBackendCapabilities. The "net" branch
    of that union has no members beyond "type" (vhost-user.json)."""
    return {"type": BACKEND_TYPE}


def discovery_doc(binary: str) -> dict:
    """A VhostUserBackend document naming BINARY (an absolute path)."""
    from vhostnet import __version__
    return {
        "description": "vhostnet: virtio-net over vhost-user with an embedded user-mode "
                       "TCP/IP network (Python)",
        "type": BACKEND_TYPE,
        "binary": binary,
        "tags": [f"vhostnet-{__version__}"],
    }


def discovery_dir(prefix: str | None = None, user: bool = False, sysconf: bool = False) -> str:
    """Where the discovery file goes: PREFIX/share/qemu/vhost-user (default
    prefix /usr), or /etc/qemu/vhost-user, or $XDG_CONFIG_HOME/qemu/vhost-user."""
    if user:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return os.path.join(base, DISCOVERY_SUBDIR)
    if sysconf:
        return SYSCONF_DIR
    return os.path.join(prefix or DISTRO_PREFIX, "share", DISCOVERY_SUBDIR)


def find_binary() -> str | None:
    """The installed vhostnet-backend: next to this Python's scripts, else on PATH."""
    here = os.path.join(sysconfig.get_path("scripts"), BINARY_NAME)
    if os.access(here, os.X_OK):
        return here
    beside = os.path.join(os.path.dirname(sys.executable), BINARY_NAME)
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which(BINARY_NAME)
    return os.path.abspath(found) if found else None


def check_binary(path: str) -> str:
    if not os.path.isabs(path):
        raise ValueError(f"the discovery file needs an absolute binary path, not {path!r}")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ValueError(f"{path} is not an executable file")
    return path


def write_discovery(directory: str, binary: str) -> str:
    """Write DIRECTORY/50-vhostnet.json atomically; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, DISCOVERY_NAME)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(discovery_doc(binary), f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# -- --fd ----------------------------------------------------------------------

class FdError(ValueError):
    """--fd names something we cannot serve; the message says what it is."""


_KINDS = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFIFO: "a pipe", stat.S_IFLNK: "a symlink"}
_FAMILIES = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6", socket.AF_NETLINK: "AF_NETLINK"}
_TYPES = {socket.SOCK_DGRAM: "SOCK_DGRAM", socket.SOCK_SEQPACKET: "SOCK_SEQPACKET", socket.SOCK_RAW: "SOCK_RAW"}


def adopt_listener(fd: int) -> socket.socket:
    """The listening AF_UNIX stream socket at FD, as a socket object that owns it.

    Raises FdError (and leaves FD alone) when FD is not open, not a socket,
    not AF_UNIX + SOCK_STREAM, or not listening."""
    what = f"--fd {fd}"
    if fd < 0:
        raise FdError(f"{what}: a file descriptor is a number >= 0")
    try:
        st = os.fstat(fd)
    except OSError as e:
        if e.errno == errno.EBADF:
            raise FdError(f"{what}: no such open file descriptor (pass it to the child, "
                          f"e.g. Popen(pass_fds=...) or bash's `N<>`)") from None
        raise FdError(f"{what}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a socket")
        raise FdError(f"{what} is {kind}, not a listening Unix socket")
    probe = socket.socket(fileno=os.dup(fd))     # look through a dup: FD stays untouched on error
    try:
        family, kind = probe.family, probe.type
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        probe.close()
    if family != socket.AF_UNIX:
        raise FdError(f"{what} is an {_FAMILIES.get(family, f'address family {int(family)}')} socket; "
                      f"vhost-user needs an AF_UNIX one")
    if kind != socket.SOCK_STREAM:
        raise FdError(f"{what} is a {_TYPES.get(kind, f'type {int(kind)}')} Unix socket; "
                      f"vhost-user needs SOCK_STREAM")
    if not listening:
        raise FdError(f"{what} is a Unix stream socket that is not listening: bind() and listen() "
                      f"it before passing it (QEMU connects to it; for a connected socket, "
                      f"QEMU would have to be the server)")
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)     # ours now: not for anything we start
    return sock


def listener_path(sock: socket.socket) -> str | None:
    """The filesystem path SOCK is bound to, or None (unbound or abstract)."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = name.decode(errors="surrogateescape")
    if not name or name.startswith("\0"):
        return None
    return name
