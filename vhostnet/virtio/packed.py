"""Packed virtqueues over mapped guest memory (virtio 1.2 §2.8).

One ring of 16-byte descriptors is shared both ways. The driver makes a
descriptor available by writing it with VIRTQ_DESC_F_AVAIL equal to its
wrap counter and VIRTQ_DESC_F_USED the inverse (§2.8.1); the device reads
descriptors in ring order from `last_avail_idx` and, when it is done with a
chain, writes one *used* descriptor (buffer id, bytes written, AVAIL = USED
= its own wrap counter) at `used_idx`, then skips as many slots as the
chain had descriptors (§2.8.6). Both counters start at 1 and flip each time
their index passes the end of the ring.

Ordering, since the guest reads concurrently:
- a used descriptor's id and len are written at push(), its flags only at
  publish(), each with one aligned 16-bit store (item assignment on a
  memoryview cast to 'H'), and in reverse order of the batch: the first
  buffer of a multi-buffer request (MRG_RXBUF) becomes visible last
  (§2.8.9), so the driver never sees a partial request;
- put_frames() (the RX run of small frames, in C) writes its used
  descriptors itself, visible when it returns: ids and lens, a barrier,
  the flags, the run's first one last (stack/native/native.c
  vn_packed_put_frames); publish() then only decides the interrupt;
- a full barrier separates the flag stores from the read of the driver's
  event suppression structure, and the write of ours from the re-check of
  the next descriptor (see split.py's `full_barrier`).

Notifications (§2.8.10, §2.8.14): the driver's event suppression structure
(at the ring's "driver area", vhost-user's avail address) says when it
wants an interrupt: ENABLE, DISABLE, or with EVENT_IDX a descriptor
position and wrap counter. Ours (the "device area", vhost-user's used
address) says when we want a kick.

Hostile drivers: every walk is bounded by the queue size (or the indirect
table's length), every buffer goes through GuestMemory, and each refusal is
a finding (findings.py) with its §2.8 section. A chain whose later
descriptors are not available (the driver broke §2.8.17), or whose end
cannot be found, leaves no safe position to go on from: the ring is broken
until the driver restarts it, as with a split ring's avail index jump.

vhost-user's GET/SET_VRING_BASE carry both positions and both counters in
one 32-bit value (QEMU docs/interop/vhost-user.rst, "Ring states"): avail
index in bits 0-14, avail wrap counter in bit 15, used index in bits 16-30,
used wrap counter in bit 31.
"""
from __future__ import annotations

import collections
import struct

from stack.native import PackedPins, packed_avail_run
from vhostnet.virtio.findings import Findings
from vhostnet.virtio.ring import MAX_CHAIN_DESCS, describe_common, chain_truncated, refusal_doc, Chain, ChainError, one_buffer_chain
from vhostnet.virtio.split import MAX_QUEUE_SIZE, full_barrier
from vhostnet.vhostuser.memory import GuestMemory, OutOfBounds

__all__ = ["PackedRing", "VIRTQ_DESC_F_AVAIL", "VIRTQ_DESC_F_USED", "RING_EVENT_FLAGS_ENABLE",
           "RING_EVENT_FLAGS_DISABLE", "RING_EVENT_FLAGS_DESC", "encode_base", "decode_base"]

VIRTQ_DESC_F_NEXT = 1            # §2.8.6
VIRTQ_DESC_F_WRITE = 2           # §2.8.3
VIRTQ_DESC_F_INDIRECT = 4        # §2.8.7
VIRTQ_DESC_F_AVAIL = 1 << 7      # §2.8.1
VIRTQ_DESC_F_USED = 1 << 15      # §2.8.1
RING_EVENT_FLAGS_ENABLE = 0x0    # §2.8.10
RING_EVENT_FLAGS_DISABLE = 0x1   # §2.8.10
RING_EVENT_FLAGS_DESC = 0x2      # §2.8.10, only with VIRTIO_F_EVENT_IDX
RING_EVENT_FLAGS_MASK = 0x3      # §2.8.14: desc_event_flags is 2 bits
EVENT_WRAP_BIT = 15              # §2.8.14: desc_event_wrap is the top bit of desc
EVENT_OFF_MASK = (1 << EVENT_WRAP_BIT) - 1
DESC_SIZE = 16                   # §2.8.13: struct pvirtq_desc
EVENT_SIZE = 4                   # §2.8.14: struct pvirtq_event_suppress
# vhost-user.rst "Ring states" for packed rings.
BASE_AVAIL_WRAP_BIT = 15
BASE_USED_SHIFT = 16
BASE_USED_WRAP_BIT = 31
BASE_INDEX_MASK = 0x7FFF

DESC = struct.Struct("<QIHH")    # addr, len, id, flags
_desc_unpack = DESC.unpack_from
_NEXT_OR_INDIRECT = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT
_NEXT_INDIRECT_WRITE = _NEXT_OR_INDIRECT | VIRTQ_DESC_F_WRITE
_AVAIL_USED = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
_FLAGS_H = 7                     # flags as the 8th 16-bit word of a descriptor
_ID_H = 6
_LEN_I = 2                       # len as the 3rd 32-bit word


def encode_base(avail: int, avail_wrap: bool, used: int, used_wrap: bool) -> int:
    return (avail | avail_wrap << BASE_AVAIL_WRAP_BIT | used << BASE_USED_SHIFT
            | used_wrap << BASE_USED_WRAP_BIT)


def decode_base(value: int) -> tuple[int, bool, int, bool]:
    return (value & BASE_INDEX_MASK, bool(value >> BASE_AVAIL_WRAP_BIT & 1),
            value >> BASE_USED_SHIFT & BASE_INDEX_MASK, bool(value >> BASE_USED_WRAP_BIT & 1))


def _is_avail(flags: int, wrap: bool) -> bool:
    """§2.8.1: AVAIL matches the wrap counter, USED does not."""
    return bool(flags & VIRTQ_DESC_F_AVAIL) == wrap and bool(flags & VIRTQ_DESC_F_USED) != wrap


class PackedRing:
    """A packed virtqueue (virtio 1.2 §2.8); implements vhostnet.virtio.ring.Ring."""

    packed = True

    def __init__(self, index: int, name: str = "", *, on_error=None, strict: bool = False,
                 checks: bool = True):
        self.index = index
        # As on the split ring: the device's own checks run when CHECKS, and
        # STRICT breaks the ring at a MUST finding (serve --strict).
        self.checks = checks
        self.strict = strict
        self.indirect_ok = True
        self.name = name or f"q{index}"
        self.num = 0
        self.desc_uva = self.avail_uva = self.used_uva = self.log_gpa = 0
        self.addr_flags = 0
        self.last_avail_idx = 0
        self.avail_wrap = True
        self.used_idx = 0
        self.used_wrap = True
        self.started = False
        self.enabled = False
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.kick_polled = False
        self.call_none = False
        self.event_idx = False
        self.broken: str | None = None
        self.mem: GuestMemory | None = None
        self._desc: memoryview | None = None
        self._desc_h: memoryview | None = None
        self._desc_i: memoryview | None = None
        self._driver_h: memoryview | None = None   # driver event suppression (read-only to us)
        self._device_h: memoryview | None = None   # device event suppression (ours)
        # Chains taken and not yet returned, in order: (buffer id, ring slots).
        self._inflight: collections.deque[tuple[int, int]] = collections.deque()
        self._held = 0   # ring slots those chains take
        # How many of those chains carry each buffer id (the id_in_flight
        # finding asks this per chain: a dict look-up, not a scan of the deque).
        self._id_count: dict[int, int] = {}
        # (gpa, end, view) of the guest region the last buffer was in:
        # pop_fast() takes a one-descriptor chain inside it without a walk. Cleared at
        # attach/detach, so it never outlives the mapping.
        self._rcache: tuple | None = None
        # Used descriptors not yet written: (slot, id, len, flags). Their id
        # and len go out at publish() too: the slot is the chain's first
        # descriptor, which a rollback() may hand back to the driver unread.
        self._unpublished: list[tuple[int, int, int, int]] = []
        # put_frames() wrote used descriptors (visible at once) since the
        # last publish(): publish() still has an interrupt to decide.
        self._put_visible = False
        # A byte per buffer id for the C run (the ids it has taken, so that
        # one twice stops it), zero between put_frames() calls; made at attach.
        self._seen = bytearray(0)
        # put_frames' views pinned for C once, not per call: (the _rcache
        # tuple and _desc they were made from, the PackedPins). Made again
        # when either is another object; released at attach and detach.
        self._pins: tuple | None = None
        self._deferred: list | None = None     # findings of a tentative take (mark/commit)
        # Where pop() last found nothing available: what a kick is asked past.
        self.avail_seen: tuple[int, bool] = (0, True)
        self.epoch = 0   # bumped by attach() and on_start(), as on the split ring
        # Where the last publish() started: the range an EVENT_IDX check covers.
        self._published_from = (0, True)
        self.stats = {"kicks": 0, "calls": 0, "calls_suppressed": 0, "calls_late_suppressed": 0, "chains": 0, "bytes": 0,
                      "unkicked": 0}   # the safety poll does not run on packed rings: stays 0
        self.findings = Findings(self.name)
        self.on_error = on_error

    # -- set-up ------------------------------------------------------------

    def attach(self, mem: GuestMemory) -> None:
        """Resolve ring addresses (QEMU user addresses) to views. Raises OutOfBounds."""
        n = self.num
        if not 0 < n <= MAX_QUEUE_SIZE:
            # §2.8: any size up to 32768; no power of two needed.
            raise ValueError(f"{self.name}: queue size {n} is not in 1..{MAX_QUEUE_SIZE}")
        if self.desc_uva % DESC_SIZE or self.avail_uva % EVENT_SIZE or self.used_uva % EVENT_SIZE:
            # §2.8.10.1: descriptor ring 16-aligned, event structures 4-aligned.
            raise ValueError(f"{self.name}: ring addresses are misaligned "
                             f"(desc {self.desc_uva:#x}, driver area {self.avail_uva:#x}, "
                             f"device area {self.used_uva:#x})")
        if self.last_avail_idx >= n or self.used_idx >= n:
            # SET_VRING_BASE named positions for a larger ring, then SET_VRING_NUM
            # shrank it: every descriptor read would be past the ring's end.
            raise ValueError(f"{self.name}: ring positions {self.last_avail_idx}/{self.used_idx} "
                             f"(SET_VRING_BASE) are outside a ring of {n}")
        self.mem = mem
        self._rcache = None
        self._unpin()
        self.epoch += 1
        self._seen = bytearray(n)
        self._desc = mem.uva_view(self.desc_uva, DESC_SIZE * n)
        self._desc_h = self._desc.cast("H")
        self._desc_i = self._desc.cast("I")
        self._driver_h = mem.uva_view(self.avail_uva, EVENT_SIZE).cast("H")
        self._device_h = mem.uva_view(self.used_uva, EVENT_SIZE).cast("H")

    def _unpin(self) -> None:
        pins, self._pins = self._pins, None
        if pins is not None:
            pins[2].release()

    def detach(self) -> None:
        self._unpin()
        for v in (self._desc_h, self._desc_i, self._desc, self._driver_h, self._device_h):
            if v is not None:
                v.release()
        self._desc = self._desc_h = self._desc_i = self._driver_h = self._device_h = None
        self._rcache = None
        self.mem = None

    @property
    def mapped(self) -> bool:
        return self._desc is not None

    @property
    def ready(self) -> bool:
        return self.started and self.enabled and self._desc is not None and self.broken is None

    # -- vhost-user ring state ------------------------------------------------

    def base(self) -> int:
        """GET_VRING_BASE's value (vhost-user.rst "Ring states", packed)."""
        return encode_base(self.last_avail_idx, self.avail_wrap, self.used_idx, self.used_wrap)

    def set_base(self, value: int) -> None:
        avail, aw, used, uw = decode_base(value)
        if value >> BASE_USED_SHIFT == 0:
            # Only the avail half given: DPDK's virtio-user sends just bit 15
            # for a fresh ring, and DPDK's own backend always takes the used
            # state equal to the avail state. Nothing in flight: the same here.
            used, uw = avail, aw
        if self.num and (avail >= self.num or used >= self.num):
            raise ValueError(f"{self.name}: base {value:#x} names positions {avail}/{used} "
                             f"outside a ring of {self.num}")
        self.last_avail_idx, self.avail_wrap, self.used_idx, self.used_wrap = avail, aw, used, uw
        self._inflight.clear()
        self._id_count.clear()
        self._held = 0
        self._unpublished.clear()
        self._put_visible = False
        self._published_from = (used, uw)

    def reset_held(self) -> None:
        """The split ring's head-reuse tracking has no packed counterpart: ids are only echoed."""

    def on_start(self) -> None:
        """The ring was (re)started: a broken ring is the driver's to restart."""
        self.epoch += 1
        self.broken = None
        self._inflight.clear()
        self._id_count.clear()
        self._held = 0
        self._unpublished.clear()
        self._put_visible = False
        self._published_from = (self.used_idx, self.used_wrap)

    # -- findings ------------------------------------------------------------

    @property
    def errors(self) -> dict[str, int]:
        return self.findings.counts()

    def count_error(self, reason: str, detail: str, **example) -> None:
        finding = self.findings.add(reason, detail, example)
        if self.on_error is not None:
            self.on_error(self, finding, detail)

    def record(self, reason: str, detail: str, **example):
        return self.findings.add(reason, detail, example)

    def describe_findings(self) -> list[dict]:
        return self.findings.describe()

    def _refuse(self, reason: str, detail: str, **example) -> None:
        """A chain refusal: counted now, or at commit() of a tentative take (dropped by rollback())."""
        if self._deferred is not None:
            self._deferred.append((reason, detail, example))
        else:
            self.count_error(reason, detail, **example)

    def _break(self, reason: str, detail: str, **example) -> None:
        self.broken = reason
        self.count_error(reason, detail, **example)

    # -- positions -----------------------------------------------------------

    def _advance(self, pos: int, wrap: bool, n: int) -> tuple[int, bool]:
        pos += n
        while pos >= self.num:
            pos -= self.num
            wrap = not wrap
        return pos, wrap

    def _back(self, pos: int, wrap: bool, n: int) -> tuple[int, bool]:
        pos -= n
        while pos < 0:
            pos += self.num
            wrap = not wrap
        return pos, wrap

    def _flags(self, slot: int) -> int:
        return self._desc_h[slot * 8 + _FLAGS_H]

    # -- taking chains -------------------------------------------------------

    def next_available(self) -> bool:
        return self._desc_h is not None and _is_avail(self._flags(self.last_avail_idx), self.avail_wrap)

    def pending(self, limit: int | None = None) -> int:
        """Available descriptors from last_avail_idx on, at most LIMIT (and
        the queue size): a bounded scan of their flags, in C
        (stack.native.packed_avail_run). For tools, and for the device's
        RX run, which asks for at most the frames it has."""
        if self._desc is None:
            return 0
        limit = self.num if limit is None else min(limit, self.num)
        pins = self._pins
        if pins is not None and pins[1] is self._desc:
            return pins[2].avail_run(self.num, self.last_avail_idx, self.avail_wrap, limit)
        return packed_avail_run(self._desc, self.num, self.last_avail_idx, self.avail_wrap, limit)

    def pop(self, budget=None, fast: bool = True) -> Chain | None:
        """Next well-formed chain, or None. Refused chains are returned used with length 0.
        (FAST: the split ring's hint; this walk has no separate fast path to skip.)

        Chain.head is the buffer id: what push() returns to the driver.
        """
        while budget is None or budget.left > 0:
            desc_h = self._desc_h
            if self.broken is not None or desc_h is None:
                return None
            # _is_avail inline: AVAIL equal to the wrap counter, USED not.
            expect = VIRTQ_DESC_F_AVAIL if self.avail_wrap else VIRTQ_DESC_F_USED
            if desc_h[self.last_avail_idx * 8 + _FLAGS_H] & _AVAIL_USED != expect:
                self.avail_seen = (self.last_avail_idx, self.avail_wrap)
                return None
            if self._held >= self.num:
                # Every slot is ours: only a driver rewriting descriptors the
                # device still holds can make one look available.
                self._break("packed_ring_overrun",
                            f"all {self.num} ring slots are held by the device, yet position "
                            f"{self.last_avail_idx} looks available: the driver rewrote a descriptor "
                            "before the device used it", position=self.last_avail_idx)
                return None
            start = self.last_avail_idx
            chain = self.pop_fast(budget)
            if chain is not None:
                return chain
            try:
                chain, ndesc = self._walk(start, self.avail_wrap)
            except ChainError as e:
                if "slots" not in e.example:
                    # Raised by the slot walk itself (not available, too long, excessive):
                    # no end to skip to, so stop here (see the module docstring).
                    if budget is not None:
                        budget.left -= e.ndesc
                    self._break(e.reason, f"chain at ring position {start}: {e}", position=start, **e.example)
                    return None
                ndesc = e.example.pop("slots", e.ndesc)
                buf_id = e.example.pop("buffer_id", 0)
                if budget is not None:
                    budget.left -= e.ndesc
                self._refuse(e.reason, f"chain at ring position {start}: {e}", position=start, **e.example)
                self._take(buf_id, ndesc)
                self.push(buf_id, 0)
                continue
            if budget is not None:
                budget.left -= chain.ndesc
            self._take(chain.head, ndesc)
            self.stats["chains"] += 1
            return chain
        return None

    def pop_fast(self, budget=None) -> Chain | None:
        """The next chain if it is the common case, taken; otherwise None, with
        nothing taken, refused or recorded (pop() or a tentative take decide).

        The common case: available, a slot free, one descriptor (no NEXT or
        INDIRECT), non-empty, inside the region of the last buffer, a buffer
        id in range and not in flight: what _walk would take without a
        finding, taken inline (flags read once, AVAIL/USED checked on them).
        """
        desc_h = self._desc_h
        if (self.broken is not None or desc_h is None or self._held >= self.num
                or (budget is not None and budget.left <= 0)):
            return None
        start = self.last_avail_idx
        expect = VIRTQ_DESC_F_AVAIL if self.avail_wrap else VIRTQ_DESC_F_USED
        addr, length, buf_id, flags = _desc_unpack(self._desc, start * DESC_SIZE)
        rc = self._rcache
        if (flags & _NEXT_OR_INDIRECT or flags & _AVAIL_USED != expect or not length or rc is None
                or not (rc[0] <= addr and addr + length <= rc[1])
                or buf_id >= self.num or buf_id in self._id_count):
            return None
        off = addr - rc[0]
        v = rc[2][off:off + length]
        if budget is not None:
            budget.left -= 1
        # _take(buf_id, 1), inline
        pos = start + 1
        if pos >= self.num:
            self.last_avail_idx, self.avail_wrap = pos - self.num, not self.avail_wrap
        else:
            self.last_avail_idx = pos
        self._inflight.append((buf_id, 1))
        self._held += 1
        self._id_count[buf_id] = 1     # not in flight before: checked above
        self.stats["chains"] += 1
        return one_buffer_chain(buf_id, v, length, flags & VIRTQ_DESC_F_WRITE)

    def take_writable(self, need: int, min_len: int, budget) -> tuple:
        """Consecutive RX buffers in one call, for a frame of NEED bytes (MRG_RXBUF).

        As on the split ring (split.py take_writable): chains pop_fast()
        would take, only device-writable ones of at least MIN_LEN bytes,
        until NEED bytes, the BUDGET (one per chain) or the first other
        chain, which stays where it is for pop() to judge. Returns
        (region, buffer ids, offsets in the region, lengths, room).
        """
        ids: list[int] = []
        offs: list[int] = []
        lens: list[int] = []
        desc_h = self._desc_h
        rc = self._rcache
        if self.broken is not None or desc_h is None or rc is None:
            return None, ids, offs, lens, 0
        num = self.num
        r_gpa, r_end, region = rc
        table = self._desc
        id_count = self._id_count
        inflight = self._inflight
        pos = self.last_avail_idx
        wrap = self.avail_wrap
        expect = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
        free = num - self._held        # slots the driver can have made available
        left = budget.left
        room = 0
        while room < need and free > 0 and left > 0:
            addr, length, buf_id, flags = _desc_unpack(table, pos * DESC_SIZE)
            if (flags & _NEXT_INDIRECT_WRITE != VIRTQ_DESC_F_WRITE or flags & _AVAIL_USED != expect
                    or length < min_len or not length or not (r_gpa <= addr and addr + length <= r_end)
                    or buf_id >= num or buf_id in id_count):
                break
            id_count[buf_id] = 1       # _take(buf_id, 1), inline; an id twice stops the run
            inflight.append((buf_id, 1))
            ids.append(buf_id)
            offs.append(addr - r_gpa)
            lens.append(length)
            room += length
            pos += 1
            if pos == num:
                pos = 0
                wrap = not wrap
                expect = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
            free -= 1
            left -= 1
        if ids:
            self.last_avail_idx, self.avail_wrap = pos, wrap
            self._held += len(ids)
            budget.left = left
            self.stats["chains"] += len(ids)
        return region, ids, offs, lens, room

    def put_frame(self, hdr, data, min_len: int, budget, count_off: int) -> int:
        """Split rings write a frame's run in one call (split.py put_frame);
        packed rings take the general way: 0, nothing taken, so the device
        goes through mark()/take_writable()/pop()."""
        return 0

    def put_frames(self, blob, lens, budget, min_run: int = 1) -> int:
        """A run of small frames, each whole into the next buffer, in one call (MRG_RXBUF).

        The contract of SplitRing.put_frames: BLOB holds the frames back to
        back, frame i being LENS[i] bytes with its virtio-net header
        (num_buffers 1) in front. Frame i goes to the next descriptor if
        pop_fast() would take it (available, a slot free, one descriptor
        without NEXT or INDIRECT, non-empty, inside the cached region, its
        buffer id below the queue size and not in flight) and it is one
        device-writable buffer of at least LENS[i] bytes: what
        NetDevice._rx_one's fast path (pop_fast, _write_one, push) does with
        it. The first descriptor that is anything else (an id twice in the
        run too) ends the run untaken and unjudged: the device's per-frame
        path takes that frame and the rest. Each frame is one descriptor of
        the BUDGET. The loop, the copies and the used descriptors are
        stack.native.packed_put_frames through PackedPins (C or its Python
        twin; tests/device/test_packed_put_frames.py holds them to each
        other and to the per-frame path).

        Unlike push(), the used descriptors are visible when this returns
        (the C writes them, the run's first flags last; publish() decides
        the interrupt). So a run only starts where its used descriptors go
        exactly where it reads, over descriptors it has just read: nothing
        in flight, the used position at the avail position (on RX, always:
        every chain _fill takes is pushed before it returns). With chains
        in flight they would land on those chains' slots, which the
        per-frame path reads again if a driver breaking §2.8.16 rewrote
        them; and no run inside a tentative take (mark()), whose rollback()
        could not take them back. Returns the frames written, 0 with
        nothing looked at when it does not start or fewer than MIN_RUN
        descriptors are available.
        """
        rc = self._rcache
        desc = self._desc
        if (self.broken is not None or desc is None or rc is None or budget.left <= 0
                or self._deferred is not None or self._held or self.used_idx != self.last_avail_idx
                or self.used_wrap != self.avail_wrap):
            return 0
        num = self.num
        pins = self._pins
        if pins is None or pins[0] is not rc or pins[1] is not desc:
            self._unpin()
            pins = self._pins = (rc, desc, PackedPins(desc, self._seen, rc[2]))
        pins = pins[2]
        pos, wrap = self.last_avail_idx, self.avail_wrap
        if min_run > 1 and pins.avail_run(num, pos, wrap, min_run) < min_run:
            return 0
        # Nothing in flight: every slot free, no id held (the id bytes all zero).
        ids = pins.put_frames(num, pos, wrap, pos, wrap, num, rc[0], budget.left, blob, lens)
        n = len(ids)
        if n:
            pos += n
            if pos >= num:
                self.last_avail_idx, self.avail_wrap = pos - num, not wrap
            else:
                self.last_avail_idx = pos
            self.used_idx, self.used_wrap = self.last_avail_idx, self.avail_wrap
            self._put_visible = True
            budget.left -= n
            self.stats["chains"] += n
            self.stats["bytes"] += sum(lens[:n])
        return n

    def _take(self, buf_id: int, ndesc: int) -> None:
        self.last_avail_idx, self.avail_wrap = self._advance(self.last_avail_idx, self.avail_wrap, ndesc)
        self._inflight.append((buf_id, ndesc))
        self._held += ndesc
        c = self._id_count
        c[buf_id] = c.get(buf_id, 0) + 1

    def _untake_id(self, buf_id: int) -> None:
        c = self._id_count
        n = c.get(buf_id, 0) - 1
        if n > 0:
            c[buf_id] = n
        else:
            c.pop(buf_id, None)

    def unpop(self) -> None:
        """Give back the one chain pop() just returned (nothing pushed since): no use for it yet."""
        buf_id, ndesc = self._inflight.pop()
        self._held -= ndesc
        self._untake_id(buf_id)
        self.last_avail_idx, self.avail_wrap = self._back(self.last_avail_idx, self.avail_wrap, ndesc)
        self.stats["chains"] -= 1

    # A tentative take (MRG_RXBUF, see split.py): rollback() gives back
    # everything popped and refused since mark(), their unwritten used
    # descriptors included; findings count only at commit().

    def mark(self) -> tuple:
        self._deferred = []
        return (self.last_avail_idx, self.avail_wrap, self.used_idx, self.used_wrap,
                collections.deque(self._inflight), self._held, len(self._unpublished),
                self.stats["chains"], self.stats["bytes"])

    def commit(self) -> None:
        deferred, self._deferred = self._deferred, None
        for reason, detail, example in deferred or ():
            self.count_error(reason, detail, **example)

    def rollback(self, mark: tuple) -> None:
        (self.last_avail_idx, self.avail_wrap, self.used_idx, self.used_wrap, self._inflight,
         self._held, n_unpublished, self.stats["chains"], self.stats["bytes"]) = mark
        self._id_count = dict(collections.Counter(i for i, _ in self._inflight))
        del self._unpublished[n_unpublished:]
        self._deferred = None

    def taken_since(self, mark: tuple) -> int:
        """Ring slots consumed since MARK."""
        lap = 2 * self.num
        return (self._linear(self.last_avail_idx, self.avail_wrap) - self._linear(mark[0], mark[1])) % lap

    def _walk(self, start: int, wrap: bool, record: bool = True) -> tuple[Chain, int]:
        """The chain at ring position START: (chain, ring slots it takes)."""
        readable: list = []
        writable: list = []
        rlen = wlen = 0
        pos, w = start, wrap
        slots = 0
        count = 0
        buf_id = 0
        error: ChainError | None = None
        while True:
            if slots >= self.num:
                raise ChainError("packed_chain_too_long", f"chain longer than the queue size {self.num} (no end)",
                                 count, expected=f"at most {self.num} descriptors", seen=f"more than {self.num}")
            if slots >= MAX_CHAIN_DESCS:
                # Its end, if any, is further than one step may walk (a 32768-entry
                # ring of NEXT descriptors took seconds): no position to go on from.
                raise ChainError("packed_chain_excessive",
                                 f"chain longer than the device's limit of {MAX_CHAIN_DESCS} descriptors",
                                 count, expected=f"at most {MAX_CHAIN_DESCS} descriptors",
                                 seen=f"more than {MAX_CHAIN_DESCS}")
            addr, length, buf_id, flags = _desc_unpack(self._desc, pos * DESC_SIZE)
            if not _is_avail(flags, w):
                raise ChainError("packed_desc_not_avail",
                                 f"descriptor {slots} of the chain, at position {pos}, is not available "
                                 f"(flags {flags:#06x}, wrap counter {int(w)}): the head was made available first",
                                 count, desc=pos, flags=flags)
            slots += 1
            pos, w = self._advance(pos, w, 1)
            if error is None:
                try:
                    if flags & VIRTQ_DESC_F_INDIRECT:
                        if flags & VIRTQ_DESC_F_NEXT or slots > 1:
                            raise ChainError("packed_indirect_in_chain",
                                             "indirect descriptor inside a chain linked by NEXT", count,
                                             desc=pos, flags=flags)
                        count, rlen, wlen = self._indirect(addr, length, readable, writable, count)
                    else:
                        count += 1
                        if length:
                            rlen, wlen = self._buffer(addr, length, flags, readable, writable, rlen, wlen)
                except ChainError as e:
                    # Keep walking to the chain's end, so that the slots it
                    # took can be returned and the ring stays in step.
                    error = e
            if not flags & VIRTQ_DESC_F_NEXT:
                break
        if error is not None:
            error.example.update(slots=slots, buffer_id=buf_id)
            error.ndesc = max(error.ndesc, slots)
            raise error
        # Buffer ids are only echoed back, so odd ones are recorded, not refused.
        if not record:
            pass
        elif buf_id >= self.num:
            self._refuse("packed_id_out_of_range",
                             f"chain at ring position {start}: buffer id {buf_id} is not below the queue size {self.num}",
                             position=start, buffer_id=buf_id, expected=f"< {self.num}", seen=buf_id)
        elif buf_id in self._id_count:
            self._refuse("packed_id_in_flight",
                             f"chain at ring position {start}: buffer id {buf_id} made available again "
                             "while the device still holds it", position=start, buffer_id=buf_id)
        return Chain(buf_id, readable, writable, rlen, wlen, max(count, slots)), slots

    def _buffer(self, addr, length, flags, readable, writable, rlen, wlen):
        try:
            views = self.mem.gpa_views(addr, length)
            if flags & VIRTQ_DESC_F_WRITE:
                writable.extend(views)
                wlen += length
            else:
                if writable:
                    raise ChainError("packed_read_after_write", "device-readable descriptor after a device-writable one")
                readable.extend(views)
                rlen += length
            if len(views) == 1 and (self._rcache is None or not self._rcache[0] <= addr < self._rcache[1]):
                reg = self.mem.region_for_gpa(addr)
                self._rcache = (reg.gpa, reg.gpa + reg.size, reg.view)
        except OutOfBounds as e:
            raise ChainError("packed_desc_out_of_bounds", str(e), addr=addr, len=length) from None
        return rlen, wlen

    def _indirect(self, addr, length, readable, writable, count):
        """§2.8.7: a table of descriptors used in order; only WRITE is valid in it."""
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > self.num:
            raise ChainError("packed_bad_indirect_len",
                             f"indirect table length {length} (must be a non-zero multiple of 16, "
                             f"at most {self.num} entries)", count, seen=length)
        try:
            table = self.mem.gpa_view(addr, length)
        except OutOfBounds as e:
            raise ChainError("packed_indirect_out_of_bounds", str(e), count, addr=addr, len=length) from None
        rlen = sum(len(v) for v in readable)
        wlen = sum(len(v) for v in writable)
        for i in range(length // DESC_SIZE):
            a, n, _id, f = _desc_unpack(table, i * DESC_SIZE)
            count += 1
            if count > MAX_CHAIN_DESCS:
                raise ChainError("packed_chain_excessive", f"indirect table longer than the device's limit of "
                                 f"{MAX_CHAIN_DESCS} descriptors", count, indirect_index=i,
                                 expected=f"at most {MAX_CHAIN_DESCS} descriptors", seen=length // DESC_SIZE)
            if f & VIRTQ_DESC_F_INDIRECT:
                raise ChainError("packed_nested_indirect", "indirect descriptor inside an indirect table", count,
                                 indirect_index=i)
            if n:
                rlen, wlen = self._buffer(a, n, f, readable, writable, rlen, wlen)
        return count, rlen, wlen

    # -- returning chains ----------------------------------------------------

    def push(self, head: int, length: int) -> None:
        """One used descriptor; written at publish()."""
        ndesc = 1
        inflight = self._inflight
        if inflight and inflight[0][0] == head:
            # In order (every chain of a TX drain, most RX): the oldest in flight.
            ndesc = inflight.popleft()[1]
            found = True
        else:
            found = False
            for k, (buf_id, n) in enumerate(inflight):
                if buf_id == head:
                    ndesc = n
                    del inflight[k]
                    found = True
                    break
        if found:
            self._held -= ndesc
            # _untake_id(head), inline (once per frame)
            c = self._id_count
            left = c.get(head, 0) - 1
            if left > 0:
                c[head] = left
            else:
                c.pop(head, None)
        flags = (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) if self.used_wrap else 0
        if length:
            flags |= VIRTQ_DESC_F_WRITE   # §2.8.3: the device wrote into the buffer
        self._unpublished.append((self.used_idx, head, length, flags))
        pos = self.used_idx + ndesc
        if pos < self.num:
            self.used_idx = pos
        else:
            self.used_idx, self.used_wrap = self._advance(self.used_idx, self.used_wrap, ndesc)
        if length:      # not for TX, whose chains go back with 0: a dict update less per frame
            self.stats["bytes"] += length

    def push_many(self, heads: list[int], lens: list[int]) -> None:
        """push(heads[i], lens[i]) for each i, in order: one frame's buffers (MRG_RXBUF)."""
        for head, length in zip(heads, lens):
            self.push(head, length)

    def has_unpublished(self) -> bool:
        return bool(self._unpublished) or self._put_visible

    def publish(self) -> bool:
        """Flag the batch's used descriptors, first one last; True if the driver wants an interrupt."""
        if not self._unpublished and not self._put_visible:
            return False
        self._put_visible = False
        h, i = self._desc_h, self._desc_i
        for slot, buf_id, length, _flags in self._unpublished:
            i[slot * 4 + _LEN_I] = length
            h[slot * 8 + _ID_H] = buf_id
        for slot, _id, _len, flags in reversed(self._unpublished):
            h[slot * 8 + _FLAGS_H] = flags
        self._unpublished.clear()
        old = self._published_from
        self._published_from = (self.used_idx, self.used_wrap)
        full_barrier()
        ev_desc, ev_flags = self._driver_h[0], self._driver_h[1] & RING_EVENT_FLAGS_MASK
        if ev_flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if ev_flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            return self._passed(old, (self.used_idx, self.used_wrap),
                                (ev_desc & EVENT_OFF_MASK, bool(ev_desc >> EVENT_WRAP_BIT)))
        return True

    def still_wants_call(self) -> bool:
        """publish()'s answer stands (split rings ask again: SplitRing.still_wants_call)."""
        return True

    def _linear(self, pos: int, wrap: bool) -> int:
        """A position on a circle of two laps, so that wrap counters compare."""
        return pos if wrap else pos + self.num

    def _passed(self, old, new, event) -> bool:
        """Did the used index move over EVENT going from OLD to NEW (§2.8.10)?"""
        lap = 2 * self.num
        o = self._linear(*old)
        moved = (self._linear(*new) - o) % lap
        return (self._linear(*event) - o) % lap < moved

    def want_kick_at_next(self, seen: tuple[int, bool] | None = None) -> bool:
        """Ask for a kick when the descriptor at SEEN (position, wrap) becomes
        available: by default the next one after everything taken, after a
        rollback `avail_seen`. True if it already is (re-check after the
        barrier), so the caller goes round again instead of sleeping."""
        if self._device_h is None or self._desc_h is None:
            return False
        pos, wrap = (self.last_avail_idx, self.avail_wrap) if seen is None else seen
        if self.event_idx:
            self._device_h[0] = pos | wrap << EVENT_WRAP_BIT
            self._device_h[1] = RING_EVENT_FLAGS_DESC
        else:
            self._device_h[1] = RING_EVENT_FLAGS_ENABLE
        full_barrier()
        return _is_avail(self._flags(pos), wrap)

    # -- read-only inspection -------------------------------------------------

    def position(self) -> tuple[int, bool]:
        """(last_avail_idx, avail wrap counter): the next descriptor the device takes."""
        return self.last_avail_idx, self.avail_wrap

    def linear(self, pos: int, wrap: bool) -> int:
        """POS as a point on a circle of two laps (2 * num), so that positions with wrap counters compare."""
        return self._linear(pos, wrap)

    def available_at(self, pos: int, wrap: bool) -> bool:
        """§2.8.1: the descriptor at POS was made available for wrap counter WRAP
        (AVAIL == WRAP, USED != WRAP). Read-only: no event suppression written."""
        if self._desc_h is None or not 0 <= pos < self.num:
            return False
        return _is_avail(self._flags(pos), wrap)

    def advance(self, pos: int, wrap: bool, n: int) -> tuple[int, bool]:
        """POS moved N slots on, the wrap counter flipped at each pass of the end."""
        return self._advance(pos, wrap, n)

    def device_event(self) -> tuple[int, int, bool] | None:
        """Our event suppression structure (§2.8.14): (flags, desc offset, desc wrap), or None."""
        if self._device_h is None:
            return None
        off = self._device_h[0]
        return self._device_h[1] & RING_EVENT_FLAGS_MASK, off & EVENT_OFF_MASK, bool(off >> EVENT_WRAP_BIT)

    def guest_used_idx(self) -> int:
        """The used position the driver can see (the start of anything unpublished)."""
        return self._unpublished[0][0] if self._unpublished else self.used_idx

    def last_used_position(self) -> int | None:
        """The ring position of the newest used descriptor the driver can see."""
        if not self.num:
            return None
        return (self.guest_used_idx() - 1) % self.num

    def used_entry(self, idx: int) -> tuple[int, int] | None:
        """(id, len) of the descriptor at ring position IDX, if it is marked used now."""
        if self._desc is None or not 0 <= idx < self.num:
            return None
        _addr, length, buf_id, flags = _desc_unpack(self._desc, idx * DESC_SIZE)
        if bool(flags & VIRTQ_DESC_F_AVAIL) != bool(flags & VIRTQ_DESC_F_USED):
            return None
        return buf_id, length

    def posted(self) -> dict[int, list[int]]:
        """Buffer id -> the ring positions its chains start at, over the
        descriptors available from last_avail_idx on: one pass over at most
        the queue size. (Asking avail_entry at every available position walked
        each chain again from there: quadratic, seconds on a 32768-entry ring
        of NEXT descriptors; found by scripts/fuzz_device.py, seed 5000.)"""
        out: dict[int, list[int]] = {}
        if self._desc is None or not self.num:
            return out
        n = self.num
        pos = start = self.last_avail_idx % n
        for _ in range(min(self.pending(), n)):
            _a, _l, buf_id, flags = _desc_unpack(self._desc, pos * DESC_SIZE)
            pos = (pos + 1) % n
            if not flags & VIRTQ_DESC_F_NEXT:
                out.setdefault(buf_id, []).append(start)
                start = pos
        return out

    def avail_entry(self, idx: int) -> int | None:
        """The buffer id of the chain starting at ring position IDX (bounded walk)."""
        if self._desc is None or not 0 <= idx < self.num:
            return None
        pos = idx
        for _ in range(min(self.num, MAX_CHAIN_DESCS)):     # the device's own limit on a chain
            _a, _l, buf_id, flags = _desc_unpack(self._desc, pos * DESC_SIZE)
            if not flags & VIRTQ_DESC_F_NEXT:
                return buf_id
            pos = (pos + 1) % self.num
        return None

    def describe_chain(self, head: int, limit: int | None = None) -> list[dict]:
        """Raw descriptors from ring position HEAD to the chain's end; bounded
        by the queue size (or LIMIT), never raises."""
        out: list[dict] = []
        if self._desc is None or not 0 <= head < self.num:
            return out
        bound = self.num if limit is None else min(limit, self.num)
        pos = head
        while True:
            if len(out) >= bound:
                if out:
                    out[-1]["more"] = True
                break
            addr, length, buf_id, flags = _desc_unpack(self._desc, pos * DESC_SIZE)
            inside = self.mem.contains_gpa(addr, length) if self.mem else False
            out.append({"index": pos, "indirect_table": False, "addr": addr, "len": length,
                        "flags": flags, "next": (pos + 1) % self.num, "id": buf_id,
                        "in_guest_memory": inside})
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            pos = (pos + 1) % self.num
        return out

    chain_truncated = staticmethod(chain_truncated)

    def chain_refusal(self, head: int) -> dict | None:
        """The finding the device would refuse the chain at ring position HEAD with (read-only)."""
        if self._desc is None or self.mem is None or not 0 <= head < self.num:
            return None
        wrap = self.avail_wrap if head >= self.last_avail_idx else not self.avail_wrap
        try:
            self._walk(head, wrap, record=False)
        except ChainError as e:
            return refusal_doc(e)
        return None

    def describe(self) -> dict:
        drv = (self._driver_h[0], self._driver_h[1]) if self._driver_h is not None else None
        dev = (self._device_h[0], self._device_h[1]) if self._device_h is not None else None

        def event(ev):
            if ev is None:
                return None
            return {"flags": ev[1] & RING_EVENT_FLAGS_MASK, "off": ev[0] & EVENT_OFF_MASK,
                    "wrap": ev[0] >> EVENT_WRAP_BIT}

        d = {
            **describe_common(self), "format": "packed",
            "avail_wrap_counter": int(self.avail_wrap), "used_wrap_counter": int(self.used_wrap),
            # A packed ring has no avail->idx / used->idx: the positions above are the state.
            "avail_idx": None, "guest_used_idx": self.guest_used_idx() if self._desc is not None else None,
            "pending": self.pending(),
            "kick_fd": self.kick_fd, "call_fd": self.call_fd,
            "kick_polled": self.kick_polled, "event_idx": self.event_idx,
            "in_flight": len(self._inflight),
            "avail_flags": None, "used_flags": None, "used_event": None, "avail_event": None,
            "driver_event": event(drv), "device_event": event(dev),
        }
        d.update(self.stats)
        d["errors"] = self.errors
        d["findings"] = self.findings.describe()
        return d
