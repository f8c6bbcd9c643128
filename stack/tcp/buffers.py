"""Bounded per-connection send and receive buffers.

The send buffer is a ring over a bytearray: `head` is where its first byte
(sequence number `seq`, SND.UNA: unacked bytes are kept for retransmission)
sits, `length` how many follow, wrapping at the end of the storage. A write
is one or two slice assignments (memcpy) into place, an ACK moves `head`,
and a segment copies its payload out in one or two slices. It used to be a
bytearray FIFO (`del buf[:n]` on ACK, `+=` on write), but CPython grows a
bytearray whose front was deleted by allocating anew and copying all of it:
a bulk sender's ACK-then-write cycle copied the whole 256 KiB buffer to add
64 KiB (40 us a cycle, against 3 us for the 64 KiB memcpy). The storage
grows by doubling up to the capacity as the connection needs it (a flow
that never sent much holds little) and stays for the connection's life:
letting it go whenever everything was acknowledged made a bulk sender regrow
it all the time. No memoryview of it outlives a call, so it can always be
replaced.

The receive buffer is still a bytearray FIFO: CPython deletes from the front
in O(1) (it moves its start pointer) and appends amortised O(n).

Capacities are fixed at creation (256 KiB by default): the guest cannot make
the stack allocate more.
"""
from __future__ import annotations

__all__ = ["SendBuffer", "RecvBuffer"]

# The send ring's first allocation; it doubles from here up to the capacity.
SEND_STORE_MIN = 16 * 1024


class SendBuffer:
    __slots__ = ("store", "head", "length", "cap", "seq")

    def __init__(self, cap: int, seq: int = 0):
        self.store = bytearray()
        self.head = 0                    # index in store of the byte at seq
        self.length = 0                  # bytes buffered (unacked + unsent)
        self.cap = cap
        self.seq = seq                   # sequence number of the first buffered byte

    def __len__(self) -> int:
        return self.length

    @property
    def space(self) -> int:
        return self.cap - self.length

    @property
    def end(self) -> int:
        """Sequence number just past the last buffered byte."""
        return self.seq + self.length

    def write(self, data) -> int:
        n = min(len(data), self.cap - self.length)
        if n <= 0:
            return 0
        total = self.length + n
        if total > len(self.store):
            self._grow(total)
        store = self.store
        size = len(store)
        tail = self.head + self.length
        if tail >= size:
            tail -= size
        first = size - tail
        # Into a memoryview of the store, not the bytearray itself: CPython's
        # bytearray slice assignment from anything but a bytearray first
        # copies the source into a temporary bytearray (two 64 KiB copies
        # and an allocation, against one memcpy here).
        # (A source of another format goes the bytearray way: a memoryview
        # assignment wants the same item format on both sides.)
        with memoryview(data) as mv, memoryview(store) as sv:
            if mv.format != "B":
                sv = store
            if n <= first:
                sv[tail:tail + n] = mv[:n] if n < len(mv) else mv
            else:
                sv[tail:] = mv[:first]
                sv[:n - first] = mv[first:n]
        self.length = total
        return n

    def _grow(self, need: int) -> None:
        """Storage for NEED bytes: doubled (at least SEND_STORE_MIN, at most cap), the ring unwrapped."""
        size = len(self.store)
        new_size = max(SEND_STORE_MIN, 2 * size)
        while new_size < need:
            new_size *= 2
        new = bytearray(max(min(new_size, self.cap), need))     # need <= cap: write() saw to it
        if self.length:
            self.append_to_view(new, self.seq, self.length)
        self.store = new
        self.head = 0

    def ack_to(self, seq: int) -> int:
        """Drop bytes before `seq`; returns how many were dropped."""
        n = seq - self.seq
        if n <= 0:
            return 0
        if n > self.length:
            n = self.length
        self.length -= n
        self.seq += n
        if not self.length:
            self.head = 0                # all acknowledged: the storage stays (regrowing it cost more)
        else:
            h = self.head + n
            size = len(self.store)
            self.head = h - size if h >= size else h
        return n

    def _start(self, seq: int) -> int:
        """Where sequence number SEQ is in the store."""
        start = self.head + (seq - self.seq)
        size = len(self.store)
        return start - size if start >= size else start

    def append_to(self, out: bytearray, seq: int, n: int) -> None:
        """out += the n bytes starting at sequence number seq."""
        start = self._start(seq)
        size = len(self.store)
        with memoryview(self.store) as mv:
            if start + n <= size:
                out += mv[start:start + n]
            else:
                out += mv[start:]
                out += mv[:n - (size - start)]

    def append_to_view(self, out, seq: int, n: int) -> None:
        """out[:n] = the n bytes starting at sequence number seq (OUT: a writable buffer)."""
        start = self._start(seq)
        size = len(self.store)
        with memoryview(self.store) as mv:
            if start + n <= size:
                out[:n] = mv[start:start + n]
            else:
                k = size - start
                out[:k] = mv[start:]
                out[k:n] = mv[:n - k]


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
