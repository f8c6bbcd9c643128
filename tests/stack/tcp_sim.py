"""A simulated link between TcpLayers, in virtual time, for tests and the benchmark.

`Sim` owns a clock, an event heap of segments in flight and the layers
(one per IP address). Each layer's emit() goes through `Link` faults:
seeded loss, duplication, reordering (extra delay), fixed delay + jitter and
an optional bottleneck rate with a bounded queue (tail drop), per direction.
`run(until)` advances time to the next delivery or timer, delivers, polls.

Also: `Trace` records every segment (parsed by our own wire code),
and `BulkApp` pumps a byte string through a connection and collects what the
other side sends, hashing both for the transfer tests.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random

from stack.tcp.config import TcpConfig
from stack.tcp.layer import TcpLayer
from stack.wire.tcp import TcpRepr

A_IP = bytes([10, 0, 2, 15])
B_IP = bytes([10, 0, 2, 2])


class Link:
    """Fault settings for one direction."""

    def __init__(self, delay=0.005, jitter=0.0, loss=0.0, dup=0.0, reorder=0.0,
                 reorder_delay=0.01, rate=None, queue_bytes=None):
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        self.dup = dup
        self.reorder = reorder
        self.reorder_delay = reorder_delay
        self.rate = rate                  # bytes per second, None: infinite
        self.queue_bytes = queue_bytes    # bottleneck queue bound (tail drop)
        self.busy_until = 0.0
        self.stats = {"sent": 0, "lost": 0, "dup": 0, "reordered": 0, "queue_drops": 0}


class Trace:
    def __init__(self):
        self.records: list[tuple[float, bytes, bytes, TcpRepr, int]] = []

    def add(self, t, src, dst, seg, gso):
        r = TcpRepr.from_bytes(bytes(seg))
        r.payload = bytes(r.payload)
        self.records.append((t, src, dst, r, gso))

    def segs(self, src=None):
        return [r for (_, s, _, r, _) in self.records if src is None or s == src]

    def clear(self):
        self.records.clear()


class Sim:
    def __init__(self, seed: int = 1, links: dict | None = None, config: TcpConfig | None = None,
                 configs: dict | None = None, ips=(A_IP, B_IP), tso=None, trace=False):
        self.now = 0.0
        self.rng = random.Random(seed)
        self.heap: list = []
        self.seq = itertools.count()
        self.layers: dict[bytes, TcpLayer] = {}
        self.links: dict[tuple, Link] = {}
        self.trace = Trace() if trace else None
        self.delivered = 0
        for i, ip in enumerate(ips):
            cfg = (configs or {}).get(ip, config)
            layer = TcpLayer(self._emitter(ip), rng=random.Random(seed * 1000 + i), config=cfg)
            if tso:
                layer.set_tso(tso)
            self.layers[ip] = layer
        for a in ips:
            for b in ips:
                if a != b:
                    self.links[(a, b)] = (links or {}).get((a, b)) or Link()

    def link(self, src, dst) -> Link:
        return self.links[(src, dst)]

    def set_links(self, **kw) -> None:
        for key in self.links:
            self.links[key] = Link(**kw)

    def _emitter(self, ip):
        def emit(src, dst, seg, gso):
            assert src == ip, "a layer emitted with a foreign source address"
            assert isinstance(seg, bytearray)
            assert seg[16] == 0 and seg[17] == 0, "checksum field must be left 0"
            self._send(src, dst, bytes(seg), gso)
        return emit

    def _send(self, src, dst, seg, gso):
        if self.trace is not None:
            self.trace.add(self.now, src, dst, seg, gso)
        link = self.links.get((src, dst))
        if link is None or dst not in self.layers:
            return
        rng = self.rng
        link.stats["sent"] += 1
        if link.loss and rng.random() < link.loss:
            link.stats["lost"] += 1
            return
        t = self.now
        if link.rate:
            size = len(seg) + 40
            start = max(t, link.busy_until)
            if link.queue_bytes is not None and (start - t) * link.rate > link.queue_bytes:
                link.stats["queue_drops"] += 1
                return
            link.busy_until = start + size / link.rate
            t = link.busy_until
        t += link.delay
        if link.jitter:
            t += rng.random() * link.jitter
        if link.reorder and rng.random() < link.reorder:
            link.stats["reordered"] += 1
            t += link.reorder_delay * (0.5 + rng.random())
        heapq.heappush(self.heap, (t, next(self.seq), src, dst, seg))
        if link.dup and rng.random() < link.dup:
            link.stats["dup"] += 1
            heapq.heappush(self.heap, (t + link.delay * rng.random(), next(self.seq), src, dst, seg))

    def inject(self, src, dst, seg: bytes, delay: float = 0.0) -> None:
        """Deliver a hand-made segment (bypasses faults)."""
        heapq.heappush(self.heap, (self.now + delay, next(self.seq), src, dst, bytes(seg)))

    def step_time(self) -> float:
        t = self.heap[0][0] if self.heap else math.inf
        for layer in self.layers.values():
            d = layer.next_deadline()
            if d is not None and d < t:
                t = d
        return t

    def run(self, until=None, max_time: float = 1e9, max_events: int = 10_000_000) -> bool:
        """Run until `until()` is true (True), or nothing is left to do / time is up (False)."""
        events = 0
        while True:
            if until is not None and until():
                return True
            t = self.step_time()
            if t == math.inf or t > max_time:
                if t > max_time and max_time < 1e9:
                    self.now = max(self.now, max_time)
                return until is None
            if t > self.now:
                self.now = t
            heap = self.heap
            while heap and heap[0][0] <= self.now:
                _, _, src, dst, seg = heapq.heappop(heap)
                self.delivered += 1
                self.layers[dst].receive(self.now, src, dst, memoryview(seg))
                events += 1
            for layer in self.layers.values():
                d = layer.next_deadline()
                if d is not None and d <= self.now:
                    layer.poll(self.now)
            if events > max_events:
                raise RuntimeError("simulation did not settle")

    def advance(self, dt: float) -> None:
        """Run for dt seconds of virtual time."""
        end = self.now + dt
        self.run(until=None, max_time=end)
        self.now = max(self.now, end)


class BulkApp:
    """Sends `data` then closes; collects everything received until EOF."""

    def __init__(self, conn, data: bytes = b"", chunk: int = 1 << 20, close_when_done=True):
        self.conn = conn
        self.data = memoryview(data)
        self.sent = 0
        self.chunk = chunk
        self.close_when_done = close_when_done
        self.received = bytearray()
        self.rx_hash = hashlib.sha256()
        self.rx_len = 0
        self.eof = False
        self.closed = False
        self.keep = True
        conn.on_writable = self._writable
        conn.on_readable = self._readable
        conn.on_established = self._writable
        conn.on_closed = self._closed
        self._writable(conn)

    def _writable(self, conn):
        while self.sent < len(self.data) and conn.send_space:
            n = conn.send(self.data[self.sent:self.sent + min(self.chunk, conn.send_space)])
            if n == 0:
                break
            self.sent += n
        if self.sent >= len(self.data) and self.close_when_done and not self.closed:
            if conn.state.value in ("ESTABLISHED", "CLOSE-WAIT"):
                self.closed = True
                conn.close()

    def _readable(self, conn):
        data = conn.recv()
        if data:
            self.rx_hash.update(data)
            self.rx_len += len(data)
            if self.keep:
                self.received += data
        if conn.at_eof:
            self.eof = True

    def _closed(self, conn):
        self._readable(conn)


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


class RawPeer:
    """Drives one TcpLayer with hand-made segments and collects what it emits."""

    def __init__(self, config: TcpConfig | None = None, seed: int = 7,
                 local=B_IP, remote=A_IP):
        self.out: list[tuple[TcpRepr, int]] = []
        self.local = local          # the layer's address
        self.remote = remote        # ours (the raw peer's)
        self.now = 0.0
        self.layer = TcpLayer(self._emit, rng=random.Random(seed), config=config)

    def _emit(self, src, dst, seg, gso):
        assert src == self.local and dst == self.remote
        r = TcpRepr.from_bytes(bytes(seg))
        r.payload = bytes(r.payload)
        self.out.append((r, gso))

    def send(self, sport, dport, seq, ack, flags, window=65535, payload=b"", now=None, **opts):
        if now is not None:
            self.now = now
        r = TcpRepr(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, window,
                    payload=payload, **opts)
        self.layer.receive(self.now, self.remote, self.local, memoryview(r.to_bytes()))

    def take(self) -> list[TcpRepr]:
        out = [r for r, _ in self.out]
        self.out.clear()
        return out

    def advance(self, t):
        """Move time to t, polling every deadline on the way."""
        while True:
            d = self.layer.next_deadline()
            if d is None or d > t:
                break
            self.now = max(self.now, d)
            self.layer.poll(self.now)
        self.now = t
        self.layer.poll(t)
