"""Sender-side SACK scoreboard (RFC 2018, used the RFC 6675 way).

Holds what the peer reported as received above SND.UNA, as a short sorted
list of disjoint [start, end) ranges in unwrapped sequence space. The
connection uses it for three things:

* `sacked` bytes leave the "pipe" estimate (RFC 6675 SetPipe),
* a SACKed range beyond the duplicate threshold starts fast recovery,
* `next_hole` tells what to retransmit: unSACKed bytes below the highest
  SACKed byte are presumed lost (a simplification of RFC 6675 IsLost that
  also retransmits a hole merely reordered, never one not yet reported).

Bounded: at most `max_blocks` ranges; a report that would exceed the bound is
ignored for its extra ranges, which only makes recovery less precise. Blocks
outside (SND.UNA, SND.NXT] and D-SACKs are ignored. The peer may renege
(RFC 2018 8); the connection clears the board on repeated timeouts.
"""
from __future__ import annotations

__all__ = ["Scoreboard"]


class Scoreboard:
    __slots__ = ("blocks", "sacked", "max_blocks")

    def __init__(self, max_blocks: int = 64):
        self.blocks: list[list[int]] = []
        self.sacked = 0
        self.max_blocks = max_blocks

    def __bool__(self) -> bool:
        return bool(self.blocks)

    @property
    def highest(self) -> int:
        return self.blocks[-1][1] if self.blocks else 0

    def update(self, una: int, nxt: int, reported) -> int:
        """Merge reported (start, end) pairs (already unwrapped). Returns newly SACKed bytes."""
        before = self.sacked
        blocks = self.blocks
        for s, e in reported:
            if s < una:
                s = una
            if e > nxt:
                e = nxt
            if e <= s:
                continue
            # find insertion point and merge overlapping/touching blocks
            i = 0
            n = len(blocks)
            while i < n and blocks[i][1] < s:
                i += 1
            j = i
            while j < n and blocks[j][0] <= e:
                j += 1
            if i == j:
                if n >= self.max_blocks:
                    continue
                blocks.insert(i, [s, e])
            else:
                ns = min(s, blocks[i][0])
                ne = max(e, blocks[j - 1][1])
                blocks[i:j] = [[ns, ne]]
        self.sacked = sum(e - s for s, e in blocks)
        return self.sacked - before

    def advance(self, una: int) -> None:
        """SND.UNA moved: forget what it covers."""
        blocks = self.blocks
        if not blocks or blocks[0][0] >= una:
            return
        while blocks and blocks[0][1] <= una:
            del blocks[0]
        if blocks and blocks[0][0] < una:
            blocks[0][0] = una
        self.sacked = sum(e - s for s, e in blocks)

    def next_hole(self, start: int, limit: int):
        """First unSACKed [s, e) with start <= s < limit, or None."""
        s = start
        for bs, be in self.blocks:
            if be <= s:
                continue
            if bs > s:
                return (s, min(bs, limit)) if s < limit else None
            s = be
        return (s, limit) if s < limit else None

    def unsacked_between(self, a: int, b: int) -> int:
        if b <= a:
            return 0
        n = b - a
        for bs, be in self.blocks:
            lo = max(bs, a)
            hi = min(be, b)
            if hi > lo:
                n -= hi - lo
        return n

    def clear(self) -> None:
        self.blocks.clear()
        self.sacked = 0
