"""Reading and writing vhost-user messages on the Unix socket (trio).

Framing only: header, payload, and the fds that ride along (SCM_RIGHTS).
Every fd received is either handed to the caller or closed here, so a
malformed message cannot leak descriptors.
"""
from __future__ import annotations

import array
import os
import socket

import trio

from vhostnet.vhostuser.protocol import HEADER_SIZE, MAX_FDS, MAX_PAYLOAD, Header

__all__ = ["read_message", "FramingError"]

# Oversized payloads up to this size are read and thrown away so the stream
# stays in step; beyond it the framing is treated as lost.
DISCARD_LIMIT = 1 << 16
_ANC = socket.CMSG_SPACE(MAX_FDS * 4)


class FramingError(Exception):
    """The byte stream can no longer be trusted; the connection must end."""


def _fds_from(anc) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


async def read_message(sock: trio.socket.SocketType):
    """(request, flags, payload, fds, oversize) or None at EOF.

    `oversize` is True when the payload was longer than any request we know
    and was discarded; the caller answers with failure.
    """
    head = b""
    fds: list[int] = []
    try:
        while len(head) < HEADER_SIZE:
            data, anc, flags, _ = await sock.recvmsg(HEADER_SIZE - len(head), _ANC)
            fds.extend(_fds_from(anc))
            if flags & socket.MSG_CTRUNC:
                raise FramingError("message carried more file descriptors than allowed")
            if not data:
                close_all(fds)
                if head:
                    raise FramingError(f"connection closed inside a message header ({len(head)} bytes)")
                return None
            head += data
        h = Header.parse(head)
        if h.size > DISCARD_LIMIT:
            raise FramingError(f"payload size {h.size} in request {h.request}")
        payload = bytearray()
        while len(payload) < h.size:
            chunk = await sock.recv(h.size - len(payload))
            if not chunk:
                raise FramingError("connection closed inside a message payload")
            payload += chunk
    except BaseException:
        close_all(fds)
        raise
    return h.request, h.flags, bytes(payload), fds, h.size > MAX_PAYLOAD
