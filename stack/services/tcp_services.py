"""Built-in TCP services on the gateway address: echo (RFC 862, port 7),
discard (RFC 863, port 9) and chargen (RFC 864, port 19).

Each is a few callbacks on a TcpConnection, and each respects flow control
both ways:
* echo reads only as much as its send buffer can take, so a client that
  sends but never reads sees its window close instead of us buffering more;
  after the client's FIN and once everything is echoed, echo closes too.
* discard reads everything and closes after the client's FIN.
* chargen keeps the send buffer full with the RFC 864 pattern (lines of 72
  printable characters, each starting one character later, CR LF), discards
  what it receives, and closes after the client's FIN.
"""
from __future__ import annotations

__all__ = ["install", "ECHO_PORT", "DISCARD_PORT", "CHARGEN_PORT", "chargen_pattern"]

ECHO_PORT, DISCARD_PORT, CHARGEN_PORT = 7, 9, 19

_PRINTABLE = bytes(range(32, 127))            # the 95 printable ASCII characters
_LINE = 72


def _block() -> bytes:
    """One full period: 95 lines of 72 characters + CR LF."""
    ring = _PRINTABLE * 2
    return b"".join(ring[i:i + _LINE] + b"\r\n" for i in range(len(_PRINTABLE)))


CHARGEN_BLOCK = _block()                      # 95 * 74 = 7030 bytes
_CHUNK = 64 * 1024
_REPEATED = CHARGEN_BLOCK * (_CHUNK // len(CHARGEN_BLOCK) + 2)


def chargen_pattern(offset: int, n: int) -> bytes:
    """n bytes of the chargen stream starting at stream offset `offset` (for tests too)."""
    out = bytearray()
    pos = offset % len(CHARGEN_BLOCK)
    while n > 0:
        k = min(n, _CHUNK)
        out += _REPEATED[pos:pos + k]
        pos = (pos + k) % len(CHARGEN_BLOCK)
        n -= k
    return bytes(out)


def _finish_if_eof(conn) -> None:
    if conn.at_eof and conn.state.value == "CLOSE-WAIT":
        conn.close()


class _Echo:
    def __init__(self, conn):
        conn.on_readable = conn.on_writable = self.pump
        self.pump(conn)

    @staticmethod
    def pump(conn) -> None:
        while conn.readable and conn.send_space:
            conn.send(conn.recv(conn.send_space))
        if not conn.readable:
            _finish_if_eof(conn)


class _Discard:
    def __init__(self, conn):
        conn.on_readable = self.drain
        self.drain(conn)

    @staticmethod
    def drain(conn) -> None:
        # Dropped unread: recv() would copy the bytes out only to throw them away.
        conn.skip(conn.readable, lazy=False)
        _finish_if_eof(conn)


class _Chargen:
    def __init__(self, conn):
        self.offset = 0
        conn.on_writable = self.fill
        conn.on_readable = self.drain
        self.fill(conn)

    def fill(self, conn) -> None:
        while True:
            n = min(conn.send_space, _CHUNK)
            if n <= 0:
                return
            pos = self.offset % len(CHARGEN_BLOCK)
            sent = conn.send(memoryview(_REPEATED)[pos:pos + n])
            if not sent:
                return
            self.offset += sent

    def drain(self, conn) -> None:
        conn.skip(conn.readable, lazy=False)   # what chargen receives is discarded
        _finish_if_eof(conn)


def install(tcp_layer, ip: bytes) -> None:
    """Start echo, discard and chargen on `ip`."""
    tcp_layer.listen(ip, ECHO_PORT, _Echo)
    tcp_layer.listen(ip, DISCARD_PORT, _Discard)
    tcp_layer.listen(ip, CHARGEN_PORT, _Chargen)
