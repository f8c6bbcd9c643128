"""FaultInjector: a link layer that makes the guest's link bad on purpose.

Modelled on smoltcp's `phy::FaultInjector` and Linux's netem: a layer
between the device and the stack (vhostnet/link/__init__.py) that loses,
duplicates, reorders, corrupts, delays and rate-limits frames, each
direction on its own, from a seeded RNG so that a run repeats. Nothing in
the device or the stack knows it is there.

Per frame, in one direction ("tx" guest -> stack, "rx" stack -> guest):

1. loss: dropped with probability `loss`;
2. dup: with probability `dup` a copy follows the frame;
3. corrupt: with probability `corrupt`, one bit is flipped (see below);
4. limit: a frame that would push the direction's queue past `limit`
   frames or `limit-bytes` bytes is dropped (`overflow`), so memory stays
   bounded whatever the guest or the stack sends;
5. rate: frames leave one after the other at `rate` bits/s (a FIFO
   bottleneck: a frame waits for the ones before it);
6. delay and jitter: `delay` plus a uniform draw in +-`jitter` (never
   below zero). A frame never leaves before the frame queued before it, so
   jitter varies the delay without reordering;
7. reorder: with probability `reorder` a frame is held back and sent just
   after the next frame of the same direction (`reordered`), or on its own
   after REORDER_HOLD if none comes (`reorder_timeouts`).

Loss, duplication and reordering act on frames as the device and the stack
exchange them: with TSO a 64 KiB segment is one frame, as netem sees it on
a host with TSO. `vhostnet serve --disable-feature offloads` gives
per-packet behaviour.

Corruption and offloads. A flipped bit must leave a checksum wrong, or the
receiver cannot tell and the fault means nothing. So the corrupted copy is
first made as a wire would carry it: a partial checksum (NEEDS_CSUM, or a
frame for a guest with GUEST_CSUM) is completed, DATA_VALID is dropped, and
a TSO frame is cut into MTU-sized segments with full checksums
(stack/segment.py; netem segments GSO packets to corrupt them, too), one of
which is corrupted. Then one bit flips at a random position of the IPv4
datagram (header or payload: the IP header checksum or the L4 checksum
catches it). Non-IPv4 frames (ARP) carry no checksum and are passed
unchanged (`corrupt_skipped`). The original bytes are never written: a TX
frame is guest memory.

Time. The layer runs on the same `now` as the stack: frames wait in a
queue per direction, `next_deadline()` says when the first one is due, and
the device's `poll(now)` (driven by the backend's timer) releases them. No
thread and no sleep. Frames for the guest are stamped with the latest
`now` the layer was given (the stack makes them inside a call that gave
one).

Guest memory. A TX frame is a view of a guest buffer, returned to the
guest when `receive()` returns. A frame that leaves at once is handed on
as it is; one that stays queued (delayed, duplicated, held) is copied
before `receive()` returns.

Settings are shared: `FaultSettings` (one per backend, changed by
`vhostnet fault set`) holds an immutable FaultSpec; each connection's
injector notices a new one on its next call and reseeds from its seed.
Frames already queued keep their release times.
"""
from __future__ import annotations

import collections
import logging
import random

from stack import Frame
from stack.checksum import finalize_l4_checksum
from stack.deadline import earliest
from stack.segment import SegmentError, segment_tcp

from vhostnet.link.spec import DirFaults, FaultSpec

__all__ = ["FaultInjector", "FaultSettings", "COUNTERS", "REORDER_HOLD"]

log = logging.getLogger("vhostnet.link.faults")

#: Seconds a frame held back for reordering waits for another to pass it.
REORDER_HOLD = 0.010
ETH_HLEN = 14                     # IEEE 802.3 header: two MACs and the EtherType
ETHERTYPE_IPV4 = b"\x08\x00"      # RFC 894
IPV4_MIN_HLEN = 20                # RFC 791 §3.1
IPV4_TOTAL_LENGTH = ETH_HLEN + 2  # RFC 791 §3.1: offset of Total Length in the frame

#: Counters per direction, in the order `fault show` prints them.
COUNTERS = ("frames", "bytes", "delivered", "lost", "duplicated", "corrupted", "reordered",
            "reorder_timeouts", "delayed", "rate_delayed", "overflow", "corrupt_segmented",
            "corrupt_skipped")


class FaultSettings:
    """The faults in force: one per backend, shared by the control socket and every injector."""

    def __init__(self, spec: FaultSpec | None = None):
        self.spec = spec if spec is not None else FaultSpec()
        self.changes = 0
        if self.spec.active:
            log.info("link faults: %s", self.spec)

    def set(self, spec: FaultSpec) -> None:
        self.spec = spec
        self.changes += 1
        log.info("link faults: %s", spec)

    def clear(self) -> None:
        self.set(FaultSpec())


def _copy(frame: Frame) -> Frame:
    return Frame(bytes(frame.data), frame.csum_start, frame.csum_offset, frame.gso_size,
                 frame.csum_valid)


class _Direction:
    """One direction's faults, RNG, queue and counters."""

    def __init__(self, name: str):
        self.name = name
        self.faults = DirFaults()
        self.rng = random.Random(0)
        # [release time, frame], release times never decreasing.
        self.queue: collections.deque[list] = collections.deque()
        self.queued_bytes = 0
        self.held: Frame | None = None    # held back for reordering
        self.held_until = 0.0
        self.link_free = 0.0              # rate limit: when the link is free again
        self.last_release = float("-inf")
        # Entries queued during the current call that still view the caller's buffer.
        self.fresh: list[list] = []
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.passthrough = True

    def configure(self, faults: DirFaults, seed: int) -> None:
        self.faults = faults
        self.rng = random.Random(f"{seed}/{self.name}")
        self._update()

    def _update(self) -> None:
        self.passthrough = not self.faults.active and not self.queue and self.held is None

    # -- deciding ---------------------------------------------------------

    def offer(self, frame: Frame, now: float, owned: bool) -> None:
        """Decide FRAME's fate and queue what survives (release with due())."""
        f = self.faults
        c = self.counters
        rnd = self.rng.random
        c["frames"] += 1
        c["bytes"] += len(frame.data)
        if f.loss and rnd() < f.loss:
            c["lost"] += 1
            return
        dup = f.dup and rnd() < f.dup
        self._maybe_corrupt(frame, now, owned)
        if dup:
            c["duplicated"] += 1
            self._maybe_corrupt(_copy(frame), now, True)
        self.passthrough = False

    def _maybe_corrupt(self, frame: Frame, now: float, owned: bool) -> None:
        f = self.faults
        if f.corrupt and self.rng.random() < f.corrupt:
            frames = self._corrupt(frame)
            if frames is not None:
                for fr in frames:
                    self._schedule(fr, now, True)
                return
        self._schedule(frame, now, owned)

    def _corrupt(self, frame: Frame) -> list[Frame] | None:
        """Wire-ready private copies of FRAME, one of them with a bit flipped; None: not corruptible."""
        c = self.counters
        data = frame.data
        if len(data) < ETH_HLEN + IPV4_MIN_HLEN or data[12:14] != ETHERTYPE_IPV4:
            c["corrupt_skipped"] += 1
            return None
        rng = self.rng
        if frame.gso_size:
            try:
                out = [Frame(s) for s in segment_tcp(data, frame.gso_size, partial=False)]
            except SegmentError:
                c["corrupt_skipped"] += 1
                return None
            c["corrupt_segmented"] += 1
            victim = out[rng.randrange(len(out))]
        else:
            victim = Frame(bytearray(data), frame.csum_start, frame.csum_offset)
            try:
                finalize_l4_checksum(victim)
            except ValueError:
                c["corrupt_skipped"] += 1
                return None
            out = [victim]
        d = victim.data
        end = min(len(d), ETH_HLEN + ((d[IPV4_TOTAL_LENGTH] << 8) | d[IPV4_TOTAL_LENGTH + 1]))
        if end <= ETH_HLEN + IPV4_MIN_HLEN:
            end = len(d)
        d[rng.randrange(ETH_HLEN, end)] ^= 1 << rng.randrange(8)
        c["corrupted"] += 1
        return out

    def _schedule(self, frame: Frame, now: float, owned: bool) -> None:
        f = self.faults
        c = self.counters
        n = len(frame.data)
        if len(self.queue) + (self.held is not None) >= f.limit or self.queued_bytes + n > f.limit_bytes:
            c["overflow"] += 1
            return
        t = now
        if f.rate:
            start = self.link_free
            if start > now:
                c["rate_delayed"] += 1
            else:
                start = now
            t = self.link_free = start + n * 8 / f.rate
        if f.delay or f.jitter:
            extra = f.delay + (self.rng.uniform(-f.jitter, f.jitter) if f.jitter else 0.0)
            if extra > 0:
                t += extra
        if t < self.last_release:
            t = self.last_release
        if t > now:
            c["delayed"] += 1
        self.queued_bytes += n
        if f.reorder and self.held is None and self.rng.random() < f.reorder:
            self.held = frame if owned else _copy(frame)
            self.held_until = t + REORDER_HOLD
            return
        entry = [t, frame]
        self.queue.append(entry)
        self.last_release = t
        if not owned:
            self.fresh.append(entry)
        if self.held is not None:       # the held frame leaves right after this one
            self.queue.append([t, self.held])
            self.held = None
            c["reordered"] += 1

    # -- releasing --------------------------------------------------------

    def due(self, now: float) -> list[Frame]:
        """Frames whose time has come, in order."""
        if self.held is not None and self.held_until <= now:
            t = max(self.held_until, self.last_release)
            self.queue.append([t, self.held])
            self.last_release = t
            self.held = None
            self.counters["reorder_timeouts"] += 1
        q = self.queue
        out = []
        while q and q[0][0] <= now:
            entry = q.popleft()
            fr = entry[1]
            entry[1] = None
            self.queued_bytes -= len(fr.data)
            out.append(fr)
        self.counters["delivered"] += len(out)
        if not q and self.held is None:
            self._update()
        return out

    def own_fresh(self) -> None:
        """Copy what is still queued of the frames queued in this call: the caller's buffer goes back."""
        for entry in self.fresh:
            if entry[1] is not None:
                entry[1] = _copy(entry[1])
        self.fresh.clear()

    def next_deadline(self) -> float | None:
        d = self.queue[0][0] if self.queue else None
        if self.held is not None and (d is None or self.held_until < d):
            d = self.held_until
        return d

    def snapshot(self) -> dict:
        return {**self.counters, "queued": len(self.queue) + (self.held is not None),
                "queued_bytes": self.queued_bytes}


class FaultInjector:
    """The fault layer around INNER (the next link layer, or the stack)."""

    def __init__(self, inner, settings: FaultSettings):
        self.inner = inner
        self.settings = settings
        self.tx = _Direction("tx")
        self.rx = _Direction("rx")
        self._spec: FaultSpec | None = None
        self._now = 0.0
        self._sync()

    def _sync(self) -> None:
        spec = self._spec = self.settings.spec
        self.tx.configure(spec.tx, spec.seed)
        self.rx.configure(spec.rx, spec.seed)

    # -- the Link interface -------------------------------------------------

    def receive(self, frame: Frame, now: float) -> None:
        if now > self._now:
            self._now = now
        if self.settings.spec is not self._spec:
            self._sync()
        d = self.tx
        if d.passthrough:
            self.inner.receive(frame, now)
            return
        d.offer(frame, now, owned=False)
        for f in d.due(now):
            self.inner.receive(f, now)
        d.own_fresh()

    def receiver(self, now: float):
        """The stack side's receiver while the TX direction passes frames
        through untouched (no faults, nothing queued or held), else receive."""
        if now > self._now:
            self._now = now
        if self.settings.spec is not self._spec:
            self._sync()
        if self.tx.passthrough:
            return self.inner.receiver(now)
        return self.receive

    def take_frames(self) -> list[Frame]:
        if self.settings.spec is not self._spec:
            self._sync()
        out = self.inner.take_frames()
        d = self.rx
        if d.passthrough:
            return out
        now = self._now
        for f in out:
            d.offer(f, now, owned=True)
        return d.due(now)

    def poll(self, now: float) -> None:
        if now > self._now:
            self._now = now
        if self.settings.spec is not self._spec:
            self._sync()
        self.inner.poll(now)
        if not self.tx.passthrough:
            for f in self.tx.due(now):
                self.inner.receive(f, now)

    def next_deadline(self) -> float | None:
        tx, rx = self.tx, self.rx
        if tx.passthrough and rx.passthrough:
            # Nothing queued or held either way (passthrough), so no deadline
            # of ours: asked after every step of the event loop (the server's
            # timer re-arm), this is the usual case and one call, not four.
            return self.inner.next_deadline()
        return earliest(self.inner.next_deadline(), tx.next_deadline(), rx.next_deadline())

    # -- looking inside -------------------------------------------------------

    def snapshot(self) -> dict:
        """What `stats` and `fault show` report for this connection."""
        if self.settings.spec is not self._spec:
            self._sync()    # what the next frame would do: report the spec in force
        return {"spec": str(self._spec), "tx": self.tx.snapshot(), "rx": self.rx.snapshot()}
