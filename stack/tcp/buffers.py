"""Bounded per-connection send and receive buffers.

Both are a bytearray used as a FIFO. CPython deletes from the front of a
bytearray in O(1) (it just moves its start pointer), so `del buf[:n]` after
an ACK or a read costs nothing per byte; appends are amortised O(n). The
send buffer never hands out long-lived memoryviews: a live export would make
the bytearray refuse to resize, so each segment copies its payload out while
a view is held for just that copy.

The send buffer keeps everything from SND.UNA on (unacked bytes are needed
for retransmission), so `seq` is the sequence number of its first byte.
Capacities are fixed at creation (256 KiB by default): the guest cannot make
the stack allocate more.
"""
from __future__ import annotations

__all__ = ["SendBuffer", "RecvBuffer"]


class SendBuffer:
    __slots__ = ("buf", "cap", "seq")

    def __init__(self, cap: int, seq: int = 0):
        self.buf = bytearray()
        self.cap = cap
        self.seq = seq                   # sequence number of buf[0]

    def __len__(self) -> int:
        return len(self.buf)

    @property
    def space(self) -> int:
        return self.cap - len(self.buf)

    @property
    def end(self) -> int:
        """Sequence number just past the last buffered byte."""
        return self.seq + len(self.buf)

    def write(self, data) -> int:
        n = min(len(data), self.cap - len(self.buf))
        if n <= 0:
            return 0
        if n == len(data):
            self.buf += data
        else:
            with memoryview(data) as mv:
                self.buf += mv[:n]
        return n

    def ack_to(self, seq: int) -> int:
        """Drop bytes before `seq`; returns how many were dropped."""
        n = seq - self.seq
        if n <= 0:
            return 0
        if n > len(self.buf):
            n = len(self.buf)
        del self.buf[:n]
        self.seq += n
        return n

    def append_to(self, out: bytearray, seq: int, n: int) -> None:
        """out += the n bytes starting at sequence number seq."""
        off = seq - self.seq
        with memoryview(self.buf) as mv:
            out += mv[off:off + n]


class RecvBuffer:
    __slots__ = ("buf", "cap")

    def __init__(self, cap: int):
        self.buf = bytearray()
        self.cap = cap

    def __len__(self) -> int:
        return len(self.buf)

    @property
    def free(self) -> int:
        return self.cap - len(self.buf)

    def push(self, data) -> None:
        self.buf += data

    def read(self, n: int = -1) -> bytes:
        buf = self.buf
        if n < 0 or n >= len(buf):
            out = bytes(buf)
            buf.clear()
            return out
        out = bytes(buf[:n])
        del buf[:n]
        return out
