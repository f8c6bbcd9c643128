"""Listening Unix sockets: the vhost-user socket and the control socket."""
from __future__ import annotations

import os
import socket
import stat

__all__ = ["SocketInUse", "bind_unix"]


class SocketInUse(Exception):
    pass


def bind_unix(path: str, backlog: int = 1) -> socket.socket:
    """Listen on a Unix socket path; replace a stale socket file, refuse a live one."""
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens there
        else:
            raise SocketInUse(f"{path} is in use by another running process")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s
