"""IPv4 fragment reassembly (RFC 791 / RFC 815) with bounded memory.

One entry per (src, dst, proto, id). Each keeps a byte buffer grown to the
highest offset seen and a sorted list of merged [start, end) intervals held.

Limits and policy:
- a datagram may not exceed 65,535 bytes with its header ("ping of death"
  fragments are dropped and counted);
- at most `max_frags` fragments per datagram and `max_datagrams` datagrams
  in flight; total buffered bytes at most `max_total` -- past either limit
  the oldest datagram is evicted (it would most likely time out anyway);
- overlaps (RFC 5722 spirit): an overlap that repeats the same bytes is a
  harmless duplicate; an overlap with different bytes, a second "last"
  fragment with another end, or data past the end poisons the datagram: it
  is dropped, and later fragments of it are dropped until its timeout;
- `timeout` seconds (30 by default) after the first fragment, an incomplete
  datagram is discarded; `poll` returns the quote material of those whose
  first fragment arrived so the interface can send Time Exceeded (code 1).
"""
from __future__ import annotations

from collections import OrderedDict

from .wire.ipv4 import HEADER
from .checksum import checksum

__all__ = ["Reassembler"]

MAX_DATAGRAM = 65535


class _Entry:
    __slots__ = ("deadline", "buf", "spans", "end", "first", "nfrags", "poisoned")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.buf = bytearray()
        self.spans: list[list[int]] = []
        self.end = -1            # payload length, once the last fragment is in
        self.first = None        # header + first 8 payload bytes of fragment 0
        self.nfrags = 0
        self.poisoned = False


class Reassembler:
    def __init__(self, counters, *, timeout: float = 30.0, max_total: int = 1 << 20,
                 max_datagrams: int = 64, max_frags: int = 256):
        self._c = counters
        self.timeout = timeout
        self.max_total = max_total
        self.max_datagrams = max_datagrams
        self.max_frags = max_frags
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self.total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _drop_entry(self, key) -> None:
        e = self._entries.pop(key)
        self.total -= len(e.buf)

    def _poison(self, key, e: _Entry, reason: str) -> None:
        self._c["drop_reasm_" + reason] += 1
        self.total -= len(e.buf)
        e.buf = bytearray()
        e.spans = []
        e.poisoned = True

    def add(self, now: float, header, payload) -> bytes | None:
        """Add one fragment. `header` is its IP header (ihl bytes, validated),
        `payload` its data. Returns the whole datagram (header + payload, with
        a fresh header) when complete, else None."""
        _v, _tos, _tot, ident, ff, _ttl, proto, _cs, src, dst = HEADER.unpack_from(header, 0)
        ihl = len(header)
        off = (ff & 0x1FFF) << 3
        more = bool(ff & 0x2000)
        n = len(payload)
        c = self._c
        c["reasm_fragments"] += 1
        if more and (n == 0 or n & 7):
            c["drop_reasm_bad_length"] += 1
            return None
        if ihl + off + n > MAX_DATAGRAM:
            c["drop_reasm_too_big"] += 1
            return None
        key = (src, dst, proto, ident)
        e = self._entries.get(key)
        if e is not None and e.deadline <= now:
            self._drop_entry(key)
            c["reasm_timeout"] += 1
            e = None
        if e is None:
            while len(self._entries) >= self.max_datagrams:
                self._evict_oldest()
            e = self._entries[key] = _Entry(now + self.timeout)
        if e.poisoned:
            c["drop_reasm_poisoned"] += 1
            return None
        end = off + n
        # Consistency of the datagram's end.
        if not more:
            if (e.end >= 0 and e.end != end) or (e.spans and e.spans[-1][1] > end):
                self._poison(key, e, "overlap_conflict")
                return None
        elif e.end >= 0 and end > e.end:
            self._poison(key, e, "overlap_conflict")
            return None
        buf = e.buf
        # Overlaps must repeat the same bytes.
        covered = 0
        for s, t in e.spans:
            if s >= end:
                break
            if t <= off:
                continue
            a = max(s, off)
            b = min(t, end)
            if buf[a:b] != payload[a - off:b - off]:
                self._poison(key, e, "overlap_conflict")
                return None
            covered += b - a
        if not more:
            e.end = end
        if off == 0 and e.first is None:
            e.first = bytes(header) + bytes(payload[:8])
        if n == 0:
            return self._complete(key, e)
        if covered == n:
            c["reasm_duplicate"] += 1
            return None
        e.nfrags += 1
        if e.nfrags > self.max_frags:
            self._poison(key, e, "too_many_frags")
            return None
        if end > len(buf):
            grow = end - len(buf)
            while self.total + grow > self.max_total and len(self._entries) > 1:
                if not self._evict_oldest(keep=key):
                    break
            buf.extend(bytes(grow))
            self.total += grow
        buf[off:end] = payload
        self._merge(e.spans, off, end)
        return self._complete(key, e)

    @staticmethod
    def _merge(spans: list, a: int, b: int) -> None:
        out = []
        placed = False
        for s, t in spans:
            if t < a:
                out.append([s, t])
            elif s > b:
                if not placed:
                    out.append([a, b])
                    placed = True
                out.append([s, t])
            else:
                a = min(a, s)
                b = max(b, t)
        if not placed:
            out.append([a, b])
        spans[:] = out

    def _complete(self, key, e: _Entry):
        if e.end < 0 or e.first is None or len(e.spans) != 1 or e.spans[0] != [0, e.end]:
            return None
        self._drop_entry(key)
        self._c["reasm_ok"] += 1
        first = e.first
        ihl = (first[0] & 15) * 4
        h = bytearray(first[:ihl])
        tot = ihl + e.end
        h[2] = tot >> 8
        h[3] = tot & 0xFF
        h[6] = 0
        h[7] = 0
        h[10] = 0
        h[11] = 0
        cs = checksum(h)
        h[10] = cs >> 8
        h[11] = cs & 0xFF
        return bytes(h) + bytes(e.buf[:e.end])

    def _evict_oldest(self, keep=None) -> bool:
        for k in self._entries:
            if k != keep:
                self._drop_entry(k)
                self._c["reasm_evicted"] += 1
                return True
        return False

    def poll(self, now: float) -> list[bytes]:
        """Discard timed-out datagrams; return the `first` quote of each
        that had its first fragment (for ICMP Time Exceeded)."""
        quotes = []
        for k in [k for k, e in self._entries.items() if e.deadline <= now]:
            e = self._entries[k]
            self._drop_entry(k)
            if not e.poisoned:
                self._c["reasm_timeout"] += 1
                if e.first is not None:
                    quotes.append(e.first)
        return quotes

    def next_deadline(self):
        if not self._entries:
            return None
        return min(e.deadline for e in self._entries.values())

    def snapshot(self) -> list[dict]:
        return [{"key": [k[0].hex(), k[1].hex(), k[2], k[3]], "bytes": len(e.buf),
                 "frags": e.nfrags, "poisoned": e.poisoned, "deadline": e.deadline}
                for k, e in self._entries.items()]
