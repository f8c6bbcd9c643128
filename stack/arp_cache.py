"""Neighbour table: IPv4 -> MAC for hosts on the guest's link, with aging.

Entries are learned from the guest's own traffic (source MAC of its IPv4
frames, sender of its ARP packets) and expire `ttl` seconds after the last
frame that confirmed them. When the stack must send to an address it does
not know, the frames wait in a small per-address queue while we ARP for it
(retry every `retry` seconds, give up after `tries` requests and drop the
queue). There is deliberately no fallback to NetConfig.guest_mac: a guest
that changed its MAC must not be sent stale frames; ARP settles it.

Bounds: at most `max_entries` entries (oldest evicted), `max_pending`
addresses being resolved, `queue_len` frames queued per address.
"""
from __future__ import annotations

from collections import deque

__all__ = ["ArpCache"]


class ArpCache:
    def __init__(self, counters, *, ttl: float = 300.0, retry: float = 1.0, tries: int = 3,
                 max_entries: int = 64, max_pending: int = 16, queue_len: int = 64):
        self._c = counters
        self.ttl = ttl
        self.retry = retry
        self.tries = tries
        self.max_entries = max_entries
        self.max_pending = max_pending
        self.queue_len = queue_len
        # ip -> [mac, expires]; a list so the hot path can refresh in place.
        self.entries: dict[bytes, list] = {}
        # ip -> [next_retry, tries_left, deque of (frame)]
        self.pending: dict[bytes, list] = {}

    # -- learning ---------------------------------------------------------
    def learn(self, ip: bytes, mac: bytes, now: float) -> list:
        """Record ip -> mac. Returns frames that were waiting for it (with
        their destination MAC already filled in), to be sent now."""
        e = self.entries.get(ip)
        if e is not None:
            if e[0] != mac:
                self._c["arp_mac_changed"] += 1
                e[0] = mac
            e[1] = now + self.ttl
        else:
            if len(self.entries) >= self.max_entries:
                oldest = min(self.entries, key=lambda k: self.entries[k][1])
                del self.entries[oldest]
                self._c["arp_evicted"] += 1
            self.entries[ip] = [mac, now + self.ttl]
        p = self.pending.pop(ip, None)
        if p is None:
            return []
        out = list(p[2])
        for f in out:
            f.data[0:6] = mac
        return out

    def lookup(self, ip: bytes, now: float):
        e = self.entries.get(ip)
        if e is None:
            return None
        if e[1] <= now:
            del self.entries[ip]
            self._c["arp_expired"] += 1
            return None
        return e[0]

    # -- resolution -------------------------------------------------------
    def enqueue(self, ip: bytes, frame, now: float) -> bool:
        """Park `frame` (bytearray data; bytes 0..5 patched on resolution).
        Returns True if an ARP request should be sent now (a new resolution)."""
        p = self.pending.get(ip)
        if p is None:
            if len(self.pending) >= self.max_pending:
                self._c["drop_arp_pending_full"] += 1
                return False
            p = self.pending[ip] = [now + self.retry, self.tries - 1, deque()]
            start = True
        else:
            start = False
        q = p[2]
        if len(q) >= self.queue_len:
            q.popleft()
            self._c["drop_arp_queue_full"] += 1
        q.append(frame)
        return start

    def poll(self, now: float) -> list[bytes]:
        """Expire entries; return addresses to send another ARP request for."""
        for ip in [ip for ip, e in self.entries.items() if e[1] <= now]:
            del self.entries[ip]
            self._c["arp_expired"] += 1
        again = []
        for ip in list(self.pending):
            p = self.pending[ip]
            if p[0] > now:
                continue
            if p[1] <= 0:
                self._c["drop_arp_unresolved"] += len(p[2])
                del self.pending[ip]
                continue
            p[0] = now + self.retry
            p[1] -= 1
            again.append(ip)
        return again

    def next_deadline(self):
        d = None
        for e in self.entries.values():
            if d is None or e[1] < d:
                d = e[1]
        for p in self.pending.values():
            if d is None or p[0] < d:
                d = p[0]
        return d

    def snapshot(self) -> list[dict]:
        from .config import ip_text, mac_text
        out = [{"ip": ip_text(ip), "mac": mac_text(e[0]), "expires": e[1]}
               for ip, e in self.entries.items()]
        out += [{"ip": ip_text(ip), "mac": None, "pending": len(p[2])}
                for ip, p in self.pending.items()]
        return out
