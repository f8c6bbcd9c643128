"""Out-of-order reassembly above RCV.NXT, and the SACK blocks that describe it.

Data is kept as a short sorted list of disjoint, non-adjacent ranges
[start, bytearray] in unwrapped sequence space (see connection.py: sequence
numbers are plain growing ints inside the stack, so no modular compares here).

Bounds: the connection only hands in bytes inside the advertised window,
which is carved out of the receive buffer's free space, so the bytes held
here never exceed the receive buffer capacity; the number of ranges is capped
(`max_ranges`, 32 by default) so a guest that sends every other byte cannot
make the list long. A segment that would create a range beyond the cap is
dropped (the sender retransmits it later).

The common pattern after a loss, consecutive segments arriving behind a hole,
extends the last range in place, so a hole followed by a whole window costs
amortised O(bytes).
"""
from __future__ import annotations

import bisect

__all__ = ["Assembler"]


class Assembler:
    __slots__ = ("starts", "datas", "max_ranges", "nbytes", "last")

    def __init__(self, max_ranges: int = 32):
        self.starts: list[int] = []
        self.datas: list[bytearray] = []
        self.max_ranges = max_ranges
        self.nbytes = 0
        self.last = -1            # start of the range that took the most recent segment

    def __bool__(self) -> bool:
        return bool(self.starts)

    def __len__(self) -> int:
        return len(self.starts)

    def add(self, start: int, data) -> bool:
        """Store data at `start`. Returns False if dropped for the range cap."""
        end = start + len(data)
        if end <= start:
            return True
        starts, datas = self.starts, self.datas
        # First range whose end reaches start (so it overlaps or touches).
        i = bisect.bisect_right(starts, start) - 1
        if i >= 0 and starts[i] + len(datas[i]) < start:
            i += 1
        elif i < 0:
            i = 0
        # Ranges i..j-1 overlap or touch [start, end].
        j = i
        n = len(starts)
        while j < n and starts[j] <= end:
            j += 1
        if i == j:
            if n >= self.max_ranges:
                return False
            starts.insert(i, start)
            datas.insert(i, bytearray(data))
            self.nbytes += end - start
            self.last = start
            return True
        s0 = starts[i]
        if j == i + 1 and s0 <= start:
            # Common case: extends (or is inside) one range.
            d = datas[i]
            e0 = s0 + len(d)
            if end > e0:
                d += data[e0 - start:]
                self.nbytes += end - e0
            self.last = s0
            return True
        # General case: merge ranges i..j-1 with the new data.
        new_start = min(s0, start)
        last_end = starts[j - 1] + len(datas[j - 1])
        new_end = max(end, last_end)
        merged = bytearray(new_end - new_start)
        merged[start - new_start:end - new_start] = data
        old = 0
        for k in range(i, j):
            s, d = starts[k], datas[k]
            merged[s - new_start:s - new_start + len(d)] = d
            old += len(d)
        del starts[i:j]
        del datas[i:j]
        starts.insert(i, new_start)
        datas.insert(i, merged)
        self.nbytes += len(merged) - old
        self.last = new_start
        return True

    def pop(self, rcv_nxt: int):
        """If the first range reaches rcv_nxt, remove it and return the bytes from rcv_nxt on."""
        starts = self.starts
        if not starts or starts[0] > rcv_nxt:
            return None
        s = starts.pop(0)
        d = self.datas.pop(0)
        self.nbytes -= len(d)
        if s < rcv_nxt:
            return d[rcv_nxt - s:]
        return d

    def discard_below(self, seq: int) -> None:
        """Forget ranges wholly below seq (they were delivered another way)."""
        while self.starts and self.starts[0] + len(self.datas[0]) <= seq:
            self.starts.pop(0)
            self.nbytes -= len(self.datas.pop(0))

    def sack_blocks(self, limit: int) -> list[tuple[int, int]]:
        """RFC 2018 4: the block holding the most recent segment first, then the others."""
        starts, datas = self.starts, self.datas
        ranges = [(s, s + len(d)) for s, d in zip(starts, datas)]
        out = [r for r in ranges if r[0] == self.last]
        out += [r for r in ranges if r[0] != self.last]
        return out[:limit]

    def clear(self) -> None:
        self.starts.clear()
        self.datas.clear()
        self.nbytes = 0
