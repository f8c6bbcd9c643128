"""Split virtqueues over mapped guest memory (virtio 1.x, section 2.7).

The driver (guest) owns the descriptor table and the avail ring; we own the
used ring. We keep `last_avail_idx` (next avail entry to take) and a shadow
of used->idx, and publish used->idx once per batch.

Ordering, since the guest reads concurrently on another CPU:
- used elements are written before used->idx is published, and used->idx is
  written with one aligned 16-bit store (item assignment on a memoryview
  cast to 'H'); struct.pack_into would zero the field first and let the
  guest see a passing value.
- a store followed by a load of guest-shared memory (publish used->idx, then
  read used_event; write avail_event, then re-read avail->idx) needs a full
  barrier on x86. An uncontended lock round trip is a locked instruction in
  CPython's thread layer, which is such a barrier; `full_barrier` wraps it.

A hostile or buggy driver cannot make us touch memory outside the regions
(every buffer goes through GuestMemory) nor loop: chains are bounded by the
queue size (or the indirect table size), nested indirect tables, descriptors
out of range and index jumps are refused, and each refusal is a finding
(findings.py): a rule id with its virtio 1.2 section, counted per queue,
with the first example kept.

The conformance checker (issue #10) adds what the device can tolerate but
a driver must not do, checked on every chain and publish when `checks` is
on (the default): a head made available again while the device holds it
(`_held`, a byte per descriptor: set at pop, cleared when the used element
is published, or given back by unpop/rollback), INDIRECT without the
feature, avail->idx going backwards, bad avail->flags. With `strict`, any
MUST finding breaks the ring (and signals the err eventfd) until the
driver restarts it.
"""
from __future__ import annotations

import os
import struct
import threading

from stack.native import SplitPins, split_put_used, split_take_readable, split_take_writable
from vhostnet.virtio.findings import Findings
from vhostnet.virtio.ring import chain_truncated, describe_common, refusal_doc, MAX_CHAIN_DESCS, Budget, Chain, ChainError, one_buffer_chain
from vhostnet.vhostuser.memory import GuestMemory, OutOfBounds

__all__ = ["SplitRing", "Chain", "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE",
           "VRING_DESC_F_INDIRECT", "MAX_QUEUE_SIZE", "MAX_CHAIN_DESCS", "full_barrier"]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768
# push_read(): from this many used elements on, one C call (split_put_used)
# is cheaper than the Python loop (scripts/bench_native.py-style timing in
# docs/benchmarks.md, "The split TX walk").
PUSH_READ_C_MIN = 8

DESC = struct.Struct("<QIHH")
_desc_unpack = DESC.unpack_from
_NEXT_OR_INDIRECT = VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT
_NEXT_INDIRECT_WRITE = _NEXT_OR_INDIRECT | VRING_DESC_F_WRITE
_DESC_FLAGS_LOW = 12    # struct virtq_desc's flags (le16) at byte 12: the three flags are in its low byte

_barrier_lock = threading.Lock()
_ONE = (1).to_bytes(8, "little")   # an eventfd increment


def full_barrier() -> None:
    _barrier_lock.acquire()
    _barrier_lock.release()


class SplitRing:
    """A split virtqueue (virtio 1.2 §2.7); implements vhostnet.virtio.ring.Ring."""

    def __init__(self, index: int, name: str = "", *, on_error=None, strict: bool = False,
                 checks: bool = True):
        self.index = index
        self.name = name or f"q{index}"
        self.num = 0
        self.desc_uva = self.avail_uva = self.used_uva = self.log_gpa = 0
        self.addr_flags = 0
        self.last_avail_idx = 0
        self.used_idx = 0
        self.started = False
        self.enabled = False
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.kick_polled = False   # "no fd" kick: we must poll the ring
        self.call_none = False     # "no fd" call: the frontend polls
        self.event_idx = False
        self.broken: str | None = None
        self.mem: GuestMemory | None = None
        self._desc: memoryview | None = None
        self._avail_h: memoryview | None = None
        self._used_h: memoryview | None = None
        self._used_i: memoryview | None = None
        self._published = (0, 0)             # (old, new) used->idx of the last publish() that moved it
        self.stats = {"kicks": 0, "calls": 0, "calls_suppressed": 0, "calls_late_suppressed": 0,
                      "chains": 0, "bytes": 0, "unkicked": 0}
        self.findings = Findings(self.name)
        # Chain refusals of a tentative take (mark() .. commit()/rollback()), not yet counted.
        self._deferred: list | None = None
        # avail->idx as pop() last saw it when it found nothing more: what
        # want_kick_at_next(seen) asks to be kicked past.
        self.avail_seen = 0
        # Bumped when the ring is (re)attached or (re)started: what a device
        # remembers of the ring's contents (a frame waiting for room) is stale then.
        self.epoch = 0
        self.on_error = on_error  # callback(queue, finding, detail), for logging
        self.strict = strict      # a MUST finding breaks the ring (serve --strict)
        self.checks = checks      # the conformance checks beyond what safety needs
        self.indirect_ok = True   # VIRTIO_F_INDIRECT_DESC negotiated (the backend sets it)
        # Heads taken and not yet published as used (see the module docstring),
        # the heads pushed since the last publish, and those taken since mark().
        self._held = bytearray(0)
        self._unpublished: list[int] = []
        self._marked_heads: list[int] | None = None
        self._walk_indirect = None   # the last walk's indirect descriptor, if it had one
        # (gpa, end, view) of the guest region the last walk's buffer was in:
        # pop_fast() takes a one-descriptor chain inside it without a walk (the
        # common case: Linux's TX frame with any_layout, every RX buffer).
        # Cleared at attach/detach, so it never outlives the mapping.
        self._rcache: tuple | None = None
        # put_frame's and put_frames' views pinned for C once, not per call: (the _rcache
        # tuple, _held and _desc they were made from, the SplitPins). Made
        # again when any of the three is another object; released at
        # attach, detach and reset_held. The pins hold their own slices,
        # so a pin left behind keeps a stale mapping alive, never a freed one.
        self._pins: tuple | None = None

    # -- set-up ------------------------------------------------------------

    def attach(self, mem: GuestMemory) -> None:
        """Resolve ring addresses (QEMU user addresses) to views. Raises OutOfBounds."""
        n = self.num
        if not n or n & (n - 1) or n > MAX_QUEUE_SIZE:
            raise ValueError(f"{self.name}: queue size {n} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if self.desc_uva % 16 or self.avail_uva % 2 or self.used_uva % 4:
            raise ValueError(f"{self.name}: ring addresses are misaligned "
                             f"(desc {self.desc_uva:#x}, avail {self.avail_uva:#x}, used {self.used_uva:#x})")
        self.mem = mem
        self._rcache = None
        self._unpin()
        self.epoch += 1
        self.reset_held()
        self._desc = mem.uva_view(self.desc_uva, 16 * n)
        self._avail_h = mem.uva_view(self.avail_uva, 6 + 2 * n).cast("H")
        used = mem.uva_view(self.used_uva, 6 + 8 * n)
        self._used_h = used.cast("H")
        self._used_i = used[:4 + 8 * n].cast("I")

    def reset_held(self) -> None:
        """The ring (re)starts: the device holds no chain."""
        self._unpin()
        self._held = bytearray(self.num)
        self._unpublished.clear()

    def _unpin(self) -> None:
        pins, self._pins = self._pins, None
        if pins is not None:
            pins[3].release()

    def detach(self) -> None:
        self._unpin()
        for v in (self._desc, self._avail_h, self._used_h, self._used_i):
            if v is not None:
                v.release()
        self._desc = self._avail_h = self._used_h = self._used_i = None
        self._rcache = None
        self.mem = None

    packed = False

    # -- vhost-user ring state ------------------------------------------------

    def base(self) -> int:
        """GET_VRING_BASE's value: the next avail index the device takes."""
        return self.last_avail_idx

    def set_base(self, value: int) -> None:
        if value > 0xFFFF:
            raise ValueError(f"{self.name}: base {value} does not fit 16 bits")
        self.last_avail_idx = self.used_idx = value

    def on_start(self) -> None:
        """The ring was (re)started (SET_VRING_KICK): resume from what the guest
        sees, and a broken ring is the driver's to restart."""
        self.used_idx = self.guest_used_idx()
        self.epoch += 1
        self.reset_held()
        self.broken = None

    @property
    def ready(self) -> bool:
        """Rings mapped, started and enabled: we may process it."""
        return self.started and self.enabled and self._desc is not None and self.broken is None

    @property
    def errors(self) -> dict[str, int]:
        """Refusals by rule id (the `errors` maps of docs/json.md)."""
        return self.findings.counts()

    def count_error(self, reason: str, detail: str, **example) -> None:
        """Record a refusal: a finding (findings.py) for this queue, and a log line."""
        finding = self.findings.add(reason, detail, example)
        self._strict(finding, signal=False)   # on_error signals the err fd of a broken ring
        if self.on_error is not None:
            self.on_error(self, finding, detail)

    def _refuse(self, reason: str, detail: str, **example) -> None:
        """A chain refusal: counted now, or at commit() of a tentative take (dropped by rollback())."""
        if self._deferred is not None:
            self._deferred.append((reason, detail, example))
        else:
            self.count_error(reason, detail, **example)

    def record(self, reason: str, detail: str, **example):
        """Record a refusal the caller logs itself (the device, with its own rate limit)."""
        finding = self.findings.add(reason, detail, example)
        self._strict(finding, signal=True)
        return finding

    def _strict(self, finding, signal: bool) -> None:
        """serve --strict: a MUST finding breaks the ring until the driver restarts it."""
        if not self.strict or finding.rule.level != "MUST" or self.broken is not None:
            return
        self.broken = finding.rule.id
        if signal and self.err_fd is not None:
            try:
                os.write(self.err_fd, _ONE)
            except OSError:
                pass

    def _note(self, reason: str, detail: str, **example) -> None:
        """A tolerated finding: counted now, or at commit() of a tentative take, like a refusal."""
        self._refuse(reason, detail, **example)

    def describe_findings(self) -> list[dict]:
        return self.findings.describe()

    # -- guest-visible indices ---------------------------------------------

    def avail_idx(self) -> int:
        return self._avail_h[1]

    def pending(self) -> int:
        """Chains the driver made available that we have not taken."""
        if self._avail_h is None:
            return 0
        return (self._avail_h[1] - self.last_avail_idx) & 0xFFFF

    def guest_used_idx(self) -> int:
        return self._used_h[1] if self._used_h is not None else 0

    # -- taking chains -----------------------------------------------------

    def pop(self, budget: Budget | None = None, fast: bool = True) -> Chain | None:
        """Next well-formed chain, or None. Bad chains are returned used with length 0.

        With a BUDGET, every avail entry consumed is charged to it (refused
        ones too) and None comes back once it is spent: the caller yields.
        FAST false: the caller's own pop_fast() just found nothing to take,
        so the first entry goes straight to the walk.
        """
        avail_h = self._avail_h
        while budget is None or budget.left > 0:
            if fast:
                chain = self.pop_fast(budget)
                if chain is not None:
                    return chain
            fast = True
            if self.broken is not None:   # --strict broke it inside this batch
                return None
            avail = avail_h[1]
            last = self.last_avail_idx
            if avail == last:
                self.avail_seen = avail
                return None
            if (avail - last) & 0xFFFF > self.num:
                if self.checks and (last - avail) & 0xFFFF <= self.num:
                    self.broken = "avail_idx_backwards"
                    self.count_error("avail_idx_backwards",
                                     f"avail->idx went back from {last} to {avail}",
                                     last_avail_idx=last, expected=f"{last} or later", seen=avail)
                    return None
                self.broken = "avail_idx_jump"
                self.count_error("avail_idx_jump",
                                 f"avail->idx jumped from {last} to {avail}, more than the queue size {self.num}",
                                 last_avail_idx=last, expected=f"at most {self.num} ahead", seen=avail)
                return None
            head = avail_h[2 + (last & (self.num - 1))]
            self.last_avail_idx = (last + 1) & 0xFFFF
            if head >= self.num:
                # No valid id to return: the slot is consumed and counted.
                if budget is not None:
                    budget.left -= 1
                self._refuse("head_out_of_range",
                                 f"avail ring slot {last} names descriptor {head}, queue size is {self.num}",
                                 avail_idx=last, head=head, expected=f"< {self.num}", seen=head)
                continue
            if self.checks:
                held = self._held
                if held[head]:
                    # Taken and not yet returned: walking it again would return the
                    # id twice. The slot is consumed, the chain stays ours.
                    if budget is not None:
                        budget.left -= 1
                    self._refuse("avail_head_in_use",
                                 f"avail ring slot {last} names descriptor {head}, which the device "
                                 f"still holds", avail_idx=last, head=head,
                                 expected="a free descriptor (returned in the used ring)",
                                 seen=f"descriptor {head}, taken and not yet returned")
                    continue
                held[head] = 1
                if self._marked_heads is not None:
                    self._marked_heads.append(head)
                self._walk_indirect = None
            try:
                chain = self._walk(head)
            except ChainError as e:
                if budget is not None:
                    budget.left -= e.ndesc
                self._refuse(e.reason, f"chain at descriptor {head}: {e}",
                                 avail_idx=last, head=head, **e.example)
                self.push(head, 0)
                continue
            if budget is not None:
                budget.left -= chain.ndesc
            if self._walk_indirect is not None and not self.indirect_ok and self.checks:
                i, addr, length, flags = self._walk_indirect
                self._note("indirect_not_negotiated",
                           f"chain at descriptor {head}: descriptor {i} is INDIRECT, "
                           f"VIRTIO_F_INDIRECT_DESC was not negotiated",
                           avail_idx=last, head=head, desc=i, addr=addr, len=length, flags=flags,
                           expected="no INDIRECT flag", seen=f"flags {flags:#x}")
            self.stats["chains"] += 1
            return chain
        return None

    def pop_fast(self, budget: Budget | None = None) -> Chain | None:
        """The next chain if it is the common case, taken; otherwise None, with
        nothing taken, refused or recorded (pop() or a tentative take decide).

        The common case: avail->idx moved by at most the queue size, a head in
        range that the device does not hold, one descriptor (no NEXT or
        INDIRECT), non-empty and wholly inside the region of the last walk's
        buffer (Linux's TX frames with any_layout, every RX buffer): the
        checks _walk makes, inline, without a walk.
        """
        if self.broken is not None or (budget is not None and budget.left <= 0):
            return None
        avail_h = self._avail_h
        if avail_h is None:
            return None
        last = self.last_avail_idx
        num = self.num
        if not 0 < (avail_h[1] - last) & 0xFFFF <= num:
            return None
        head = avail_h[2 + (last & (num - 1))]
        rc = self._rcache
        if head >= num or rc is None or (self.checks and self._held[head]):
            return None
        addr, length, flags, _nxt = _desc_unpack(self._desc, head << 4)
        if flags & _NEXT_OR_INDIRECT or not length or not (rc[0] <= addr and addr + length <= rc[1]):
            return None
        self.last_avail_idx = (last + 1) & 0xFFFF
        if self.checks:
            self._held[head] = 1
            if self._marked_heads is not None:
                self._marked_heads.append(head)
            self._walk_indirect = None
        off = addr - rc[0]
        v = rc[2][off:off + length]
        if budget is not None:
            budget.left -= 1
        self.stats["chains"] += 1
        return one_buffer_chain(head, v, length, flags & VRING_DESC_F_WRITE)

    def take_writable(self, need: int, min_len: int, budget: Budget) -> tuple:
        """Consecutive RX buffers in one call, for a frame of NEED bytes (MRG_RXBUF).

        Takes, in ring order, chains that pop_fast() would take, and only
        those that are device-writable and hold at least MIN_LEN bytes,
        until they hold NEED bytes together, the BUDGET (one descriptor per
        chain) is spent, or the next chain is anything else, which stays in
        the ring untaken and unjudged for pop() to decide. So every check
        and count is pop_fast()'s: each head in range and not held, each
        buffer inside the cached guest region (the region of a walk's
        buffer), and looping or long chains are never taken here at all
        (a NEXT or INDIRECT descriptor stops the run). Call it inside
        mark(): rollback() gives the buffers back like popped ones. The
        loop itself is stack.native.split_take_writable: C, or its Python
        twin (tests/device/test_take_writable.py holds them to each other).

        Returns (region, heads, offsets, lengths, room): the cached region's
        view, and for each buffer its head, its offset in that view and its
        length; room is their sum. One view and offsets, not a view per
        buffer: a 64 KiB frame in 4 KiB buffers is 17 of them, and
        stack.native.scatter_region copies into all of them in one call.
        """
        avail_h = self._avail_h
        rc = self._rcache
        if self.broken is not None or avail_h is None or rc is None:
            return None, [], [], [], 0
        num = self.num
        last = self.last_avail_idx
        ahead = (avail_h[1] - last) & 0xFFFF
        if ahead > num:
            ahead = 0               # a jump or a step back: pop() refuses it
        r_gpa, r_end, region = rc
        checks = self.checks
        heads, offs, lens, room = split_take_writable(avail_h, self._desc, self._held, checks, num, last,
                                                      ahead, r_gpa, r_end, need, min_len, budget.left)
        if heads:
            self.last_avail_idx = (last + len(heads)) & 0xFFFF
            budget.left -= len(heads)
            self.stats["chains"] += len(heads)
            if checks:
                self._walk_indirect = None
                if self._marked_heads is not None:
                    self._marked_heads.extend(heads)
        return region, heads, offs, lens, room

    def put_frame(self, hdr, data, min_len: int, budget: Budget, count_off: int) -> int:
        """HDR + DATA into the next buffers, the common case in one call (MRG_RXBUF).

        take_writable()'s run (the same checks: stack.native.split_put_frame
        is its loop, the copy and the used elements, in C or its Python
        twin, called through SplitPins so the ring's views are pinned once,
        see _pins); if those buffers hold the frame, it is written, their used
        elements pushed (every one full but the last), and the number of
        buffers stored at COUNT_OFF of the stream (the header's
        num_buffers, §5.1.6.4). Returns that number; 0 when the run does
        not hold the frame, with nothing taken, written or recorded: the
        caller then goes through mark()/take_writable()/pop().
        """
        run = self._put_run(budget, 1)
        if run is None:
            return 0
        pins, rc, last, ahead = run
        heads = pins.put_frame(self.checks, self.num, last, ahead, self.used_idx, rc[0], min_len, budget.left,
                               hdr, data, count_off)
        if heads:
            self._put_done(last, heads, len(hdr) + len(data), budget)
        return len(heads)

    def put_frames(self, blob, lens, budget: Budget, min_run: int = 1) -> int:
        """A run of small frames, each whole into the next buffer, in one call (MRG_RXBUF).

        BLOB holds the frames back to back, frame i being LENS[i] bytes
        with its virtio-net header (num_buffers 1) in front. Frame i goes to
        the next avail entry if pop_fast() would take it (the same checks:
        the avail index moved by at most the queue size, the head in range
        and not held, one descriptor without NEXT or INDIRECT inside the
        cached region) and it is one device-writable buffer of at least
        LENS[i] bytes: what NetDevice._rx_one's fast path (pop_fast, then
        _write_one and push) does with it. The first entry that is
        anything else ends the run untaken and unjudged: the device's
        per-frame path takes that frame and the rest. Each frame is one
        descriptor of the BUDGET. The loop, the copies and the used
        elements are stack.native.split_put_frames through SplitPins (C or
        its Python twin; tests/device/test_put_frames.py holds them to each
        other and to the per-frame path). Returns the frames written, 0
        with nothing looked at when fewer than MIN_RUN entries are ahead.
        """
        run = self._put_run(budget, max(min_run, 1))
        if run is None:
            return 0
        pins, rc, last, ahead = run
        heads = pins.put_frames(self.checks, self.num, last, ahead, self.used_idx, rc[0], budget.left, blob, lens)
        n = len(heads)
        if n:
            self._put_done(last, heads, sum(lens[:n]), budget)
        return n

    def _put_run(self, budget: Budget, min_run: int):
        """What put_frame and put_frames start from: (the SplitPins, the
        cached region, last_avail_idx, entries ahead), or None when there is
        nothing to take here (broken, unmapped, no cached region, no budget,
        fewer than MIN_RUN entries ahead, or a jump or a step back of the
        avail index: pop() refuses that)."""
        avail_h = self._avail_h
        rc = self._rcache
        if self.broken is not None or avail_h is None or rc is None or budget.left <= 0:
            return None
        last = self.last_avail_idx
        ahead = (avail_h[1] - last) & 0xFFFF
        if not min_run <= ahead <= self.num:
            return None
        pins = self._pins
        if pins is None or pins[0] is not rc or pins[1] is not self._held or pins[2] is not self._desc:
            pins = self._pin(rc)
        return pins[3], rc, last, ahead

    def _put_done(self, last: int, heads: list, nbytes: int, budget: Budget) -> None:
        """The ring's positions, budget, stats and held heads after a put of HEADS (NBYTES in all)."""
        n = len(heads)
        self.last_avail_idx = (last + n) & 0xFFFF
        self.used_idx = (self.used_idx + n) & 0xFFFF
        budget.left -= n
        self.stats["chains"] += n
        self.stats["bytes"] += nbytes
        if self.checks:
            self._walk_indirect = None
            if self._marked_heads is not None:
                self._marked_heads.extend(heads)
            self._unpublished.extend(heads)

    def _pin(self, rc: tuple) -> tuple:
        """New pins for put_frame over the current views and region RC (the old ones released)."""
        self._unpin()
        self._pins = (rc, self._held, self._desc,
                      SplitPins(self._avail_h, self._desc, self._held, self._used_i, rc[2]))
        return self._pins

    def take_readable(self, budget: Budget, min_run: int = 1) -> tuple:
        """Consecutive TX chains in one call: the run pop_fast() would take.

        Takes, in ring order, chains that pop_fast() would take, and only
        those that are device-readable (a TX frame in one buffer, Linux's
        layout with any_layout), while the BUDGET (one descriptor per chain)
        lasts; the first other entry stays in the ring untaken and unjudged
        for pop() to decide. So every check and count is pop_fast()'s: the
        avail index moved by at most the queue size, each head in range and
        not held (when checks are on; a head twice in the run stops it at
        the second), one descriptor without NEXT or INDIRECT, non-empty, the
        buffer wholly inside the cached guest region. A device-writable
        chain, which pop_fast() would take, also stops the run: pop() then
        takes it, and the device refuses it as a runt either way. The loop
        is stack.native.split_take_readable: C, or its Python twin
        (tests/device/test_take_readable.py holds them to each other and to
        pop_fast()).

        Returns (region, heads, offsets, lengths): the cached region's view
        and each chain's head, its buffer's offset in that view and length.
        push_read() returns them; untake() gives back a tail not used.
        Region None: nothing looked at (fewer than MIN_RUN entries ahead, for
        which the caller's pop_fast() is cheaper than this call; no cached
        region; a broken ring; a spent budget). Region set and no heads:
        the first entry is not the common case, pop() must walk it.
        """
        avail_h = self._avail_h
        rc = self._rcache
        if self.broken is not None or avail_h is None or rc is None or budget.left <= 0:
            return None, (), (), ()
        num = self.num
        last = self.last_avail_idx
        ahead = (avail_h[1] - last) & 0xFFFF
        if ahead < min_run or ahead > num:
            return None, (), (), ()     # too few, or a jump or a step back: pop() refuses it
        # The first chain in several descriptors (a TSO frame: header, then the
        # data) ends the run before it starts: seen here from one byte, for
        # less than the C call's set-up. Only a shortcut: C checks it all again.
        head = avail_h[2 + (last & (num - 1))]
        if head >= num or self._desc[(head << 4) + _DESC_FLAGS_LOW] & _NEXT_INDIRECT_WRITE:
            return rc[2], (), (), ()
        checks = self.checks
        heads, offs, lens = split_take_readable(avail_h, self._desc, self._held, checks, num, last, ahead,
                                                rc[0], rc[1], budget.left)
        if heads:
            n = len(heads)
            self.last_avail_idx = (last + n) & 0xFFFF
            budget.left -= n
            self.stats["chains"] += n
            if checks:
                self._walk_indirect = None
                if self._marked_heads is not None:
                    self._marked_heads.extend(heads)
        return rc[2], heads, offs, lens

    def untake(self, heads: list[int], budget: Budget) -> None:
        """Give back HEADS, the last chains take_readable() returned (in its
        order), none of them pushed: as if never taken, budget included."""
        k = len(heads)
        if not k:
            return
        self.last_avail_idx = (self.last_avail_idx - k) & 0xFFFF
        self.stats["chains"] -= k
        budget.left += k
        if self.checks:
            held = self._held
            for h in heads:
                held[h] = 0
            if self._marked_heads is not None:
                del self._marked_heads[-k:]

    def push_read(self, heads: list[int]) -> None:
        """push(head, 0) for each head, in order: chains the device only read
        (TX). Visible at the next publish(). In C (split_put_used) from
        PUSH_READ_C_MIN heads on; below, the Python loop is cheaper than the
        call's set-up."""
        n = len(heads)
        if n >= PUSH_READ_C_MIN:
            self.used_idx = split_put_used(self._used_i, self.num, self.used_idx, heads, 0)
        elif n:
            self._write_used(heads, (0,) * n)
        else:
            return
        if self.checks:
            self._unpublished.extend(heads)

    def unpop(self) -> None:
        """Give back the one chain pop() just returned (nothing pushed since): no use for it yet."""
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
        self.stats["chains"] -= 1
        if self.checks:
            head = self._avail_h[2 + (self.last_avail_idx & (self.num - 1))]
            if head < self.num:
                self._held[head] = 0

    # A tentative take, for a frame that needs several chains (MRG_RXBUF):
    # everything pop() took and refused after mark() is given back by
    # rollback(), the refused chains' used elements included (they are not
    # published yet, so the driver never saw them), and their findings are
    # counted only at commit(). So nothing is returned twice or lost, and the
    # used ring stays a prefix of the avail ring at every publish(), which is
    # what QEMU's reconnect recovery (last_avail = used->idx) relies on.

    def mark(self) -> tuple:
        self._deferred = []
        self._marked_heads = []
        return (self.last_avail_idx, self.used_idx, self.stats["chains"], self.stats["bytes"],
                len(self._unpublished))

    def commit(self) -> None:
        self._marked_heads = None
        deferred, self._deferred = self._deferred, None
        for reason, detail, example in deferred or ():
            self.count_error(reason, detail, **example)

    def rollback(self, mark: tuple) -> None:
        self.last_avail_idx, self.used_idx, self.stats["chains"], self.stats["bytes"], pushed = mark
        self._deferred = None
        for head in self._marked_heads or ():
            self._held[head] = 0     # given back: the device no longer holds them
        self._marked_heads = None
        del self._unpublished[pushed:]

    def taken_since(self, mark: tuple) -> int:
        """Avail entries consumed since MARK."""
        return (self.last_avail_idx - mark[0]) & 0xFFFF

    def _walk(self, head: int) -> Chain:
        mem = self.mem
        table = self._desc
        limit = self.num
        readable = []
        writable = []
        rlen = wlen = 0
        i = head
        count = 0
        indirect = False
        # The region the last buffer was in: most buffers of a chain are in the
        # same one, so they are sliced here without asking GuestMemory.
        r_gpa = r_end = 0
        r_view = None
        while True:
            addr, length, flags, nxt = _desc_unpack(table, i << 4)
            if flags & VRING_DESC_F_INDIRECT:
                where = dict(desc=i, addr=addr, len=length, flags=flags)
                self._walk_indirect = (i, addr, length, flags)
                if indirect:
                    raise ChainError("nested_indirect", "indirect descriptor inside an indirect table",
                                     count, indirect_table=True, **where)
                if flags & VRING_DESC_F_NEXT:
                    raise ChainError("indirect_with_next", "indirect descriptor also has NEXT set",
                                     count, **where)
                if length == 0 or length % 16 or length // 16 > self.num:
                    raise ChainError("bad_indirect_len",
                                     f"indirect table length {length} (must be a non-zero multiple of 16, at most {self.num} entries)",
                                     count, expected=f"16..{16 * self.num}, a multiple of 16", seen=length, **where)
                try:
                    table = mem.gpa_view(addr, length)
                except OutOfBounds as e:
                    raise ChainError("indirect_out_of_bounds", str(e), count, **where) from None
                limit = length >> 4
                indirect = True
                i = 0
                continue
            count += 1
            if count > limit:
                raise ChainError("chain_too_long", f"chain longer than {limit} descriptors (a loop?)",
                                 count, desc=i, indirect_table=indirect, expected=f"at most {limit} descriptors",
                                 seen=f"more than {limit}")
            if count > MAX_CHAIN_DESCS:
                raise ChainError("chain_excessive", f"chain longer than the device's limit of {MAX_CHAIN_DESCS} "
                                 f"descriptors", count, desc=i, indirect_table=indirect,
                                 expected=f"at most {MAX_CHAIN_DESCS} descriptors", seen=f"more than {MAX_CHAIN_DESCS}")
            if length:
                try:
                    if r_gpa <= addr and addr + length <= r_end:
                        views = (r_view[addr - r_gpa:addr - r_gpa + length],)
                    else:
                        views = mem.gpa_views(addr, length)
                        if len(views) == 1:
                            reg = mem.region_for_gpa(addr)
                            r_gpa, r_end, r_view = reg.gpa, reg.gpa + reg.size, reg.view
                            self._rcache = (r_gpa, r_end, r_view)
                    if flags & VRING_DESC_F_WRITE:
                        writable.extend(views)
                        wlen += length
                    else:
                        if writable:
                            raise ChainError("read_after_write",
                                             "device-readable descriptor after a device-writable one",
                                             count, desc=i, indirect_table=indirect, addr=addr, len=length,
                                             flags=flags)
                        readable.extend(views)
                        rlen += length
                except OutOfBounds as e:
                    raise ChainError("desc_out_of_bounds", str(e), count, desc=i, indirect_table=indirect,
                                     addr=addr, len=length, flags=flags) from None
            if not flags & VRING_DESC_F_NEXT:
                break
            if nxt >= limit:
                raise ChainError("next_out_of_range", f"next index {nxt} is out of range 0..{limit - 1}",
                                 count, desc=i, indirect_table=indirect, expected=f"< {limit}", seen=nxt)
            i = nxt
        return Chain(head, readable, writable, rlen, wlen, count)

    def describe_chain(self, head: int, limit: int | None = None) -> list[dict]:
        """Raw descriptors of a chain for dumps; never raises on a bad chain.

        Bounded like the walk: at most MAX_CHAIN_DESCS + 1 entries (an
        indirect descriptor and its table's entries count), and an indirect
        table is entered only if the device would accept its length, so a
        planted table as large as guest memory is one entry, not millions.
        `chain_truncated(entries)` tells a dump that stopped at the bound.
        LIMIT stops earlier (e.g. 1: the head descriptor only).
        """
        out = []
        bound = MAX_CHAIN_DESCS if limit is None else min(limit - 1, MAX_CHAIN_DESCS)
        if self._desc is None or not 0 <= head < self.num:
            return out
        table = self._desc
        limit = self.num
        i = head
        indirect = False
        while True:
            if len(out) > min(limit, bound):
                out[-1]["more"] = True   # the bound, not the chain's end
                break
            addr, length, flags, nxt = _desc_unpack(table, i << 4)
            inside = self.mem.contains_gpa(addr, length) if self.mem else False
            out.append({"index": i, "indirect_table": indirect, "addr": addr, "len": length,
                        "flags": flags, "next": nxt, "in_guest_memory": inside})
            if (flags & VRING_DESC_F_INDIRECT and not indirect and length and length % 16 == 0
                    and length // 16 <= self.num and inside):
                try:
                    table = self.mem.gpa_view(addr, length)
                except OutOfBounds:
                    break
                limit = length >> 4
                indirect = True
                i = 0
                continue
            if not flags & VRING_DESC_F_NEXT or nxt >= limit:
                break
            i = nxt
        return out

    chain_truncated = staticmethod(chain_truncated)

    def chain_refusal(self, head: int) -> dict | None:
        """The finding the device would refuse the chain at HEAD with, or None (read-only)."""
        if self._desc is None or self.mem is None or not 0 <= head < self.num:
            return None
        try:
            self._walk(head)
        except ChainError as e:
            return refusal_doc(e)
        return None

    # -- returning chains --------------------------------------------------

    def push(self, head: int, length: int) -> None:
        """Write one used element; it becomes visible at the next publish()."""
        slot = self.used_idx & (self.num - 1)
        ui = self._used_i
        ui[1 + 2 * slot] = head
        ui[2 + 2 * slot] = length
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if length:      # not for TX, whose chains go back with 0: a dict update less per frame
            self.stats["bytes"] += length
        if self.checks:
            self._unpublished.append(head)

    def push_many(self, heads: list[int], lens: list[int]) -> None:
        """push(heads[i], lens[i]) for each i, in order: one frame's buffers (MRG_RXBUF)."""
        self._write_used(heads, lens)
        self.stats["bytes"] += sum(lens)
        if self.checks:
            self._unpublished.extend(heads)

    def _write_used(self, heads, lens) -> None:
        """The used elements (heads[i], lens[i]) from used_idx on, used_idx moved past them."""
        mask = self.num - 1
        ui = self._used_i
        idx = self.used_idx
        for head, length in zip(heads, lens):
            slot = idx & mask
            ui[1 + 2 * slot] = head
            ui[2 + 2 * slot] = length
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx

    def publish(self) -> bool:
        """Publish used->idx; True if the driver wants an interrupt for it."""
        old = self._used_h[1]
        new = self.used_idx
        if self.checks:
            self._release_published()
        if old == new:
            return False
        self._used_h[1] = new
        self._published = (old, new)
        full_barrier()
        if self.checks:
            flags = self._avail_h[0]
            if self.event_idx:
                if flags:
                    self._flags_finding(flags, "0")
            elif flags > VRING_AVAIL_F_NO_INTERRUPT:
                self._flags_finding(flags, "0 or 1")
        return self._wants_call(old, new)

    def _wants_call(self, old: int, new: int) -> bool:
        """Does the driver want an interrupt for used->idx moving OLD -> NEW
        (§2.7.10: used_event with EVENT_IDX, else avail->flags), read now."""
        if self.event_idx:
            used_event = self._avail_h[2 + self.num]
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self._avail_h[0] & VRING_AVAIL_F_NO_INTERRUPT

    def still_wants_call(self) -> bool:
        """publish() said the driver wants an interrupt; ask again now, as
        Linux's vhost does at signal time (vhost_notify): a driver that has
        meanwhile taken what was published (and moved used_event past it, or
        set NO_INTERRUPT) does not want one any more. The driver re-checks the
        used ring after each such write (§2.7.10), so asking late loses nothing."""
        if self._used_h is None:
            return True
        old, new = self._published
        if new != self._used_h[1]:
            return True             # published again since: that publish() decided
        full_barrier()
        return self._wants_call(old, new)

    def _release_published(self) -> None:
        held = self._held
        for head in self._unpublished:
            if head < len(held):
                held[head] = 0
        self._unpublished.clear()

    def _flags_finding(self, flags: int, expected: str) -> None:
        self.count_error("avail_flags_invalid",
                         f"avail->flags is {flags:#x} ({'with' if self.event_idx else 'without'} EVENT_IDX)",
                         expected=expected, seen=flags, event_idx=self.event_idx)

    def avail_event(self) -> int | None:
        """With EVENT_IDX: the avail index the device last asked to be kicked at."""
        if self._used_h is None or not self.event_idx:
            return None
        return self._used_h[2 + 4 * self.num]

    def must_notify(self, old: int, new: int) -> bool:
        """Whether a driver moving avail->idx from OLD to NEW had to notify (§2.7.10.1).

        Without EVENT_IDX: unless used->flags says NO_NOTIFY (never set by
        this device). With it: if the move crossed avail_event, the value the
        device wrote (vring_need_event, as Linux and QEMU compute it).
        """
        if self._used_h is None:
            return False
        if self.event_idx:
            event = self._used_h[2 + 4 * self.num]
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self._used_h[0] & VRING_USED_F_NO_NOTIFY

    def want_kick_at_next(self, seen: int | None = None) -> bool:
        """With EVENT_IDX, ask for a kick when the driver moves avail->idx past SEEN.

        SEEN is by default last_avail_idx (everything taken); after a
        rollback it is `avail_seen`, since the chains given back are there
        but not enough. Returns True if the driver moved past it meanwhile
        (re-check after the barrier), so the caller goes round again instead
        of sleeping on a lost kick.
        """
        if self._avail_h is None or self._used_h is None:
            return False
        if seen is None:
            seen = self.last_avail_idx
        if self.event_idx:
            self._used_h[2 + 4 * self.num] = seen
            full_barrier()
        return self._avail_h[1] != seen

    def has_unpublished(self) -> bool:
        """Used elements written but not yet published to the driver."""
        return self._used_h is not None and self.used_idx != self._used_h[1]

    @property
    def mapped(self) -> bool:
        return self._desc is not None

    def used_entry(self, idx: int) -> tuple[int, int] | None:
        """(id, len) of the used element at used ring index IDX, as the guest sees it."""
        if self._used_i is None or not self.num:
            return None
        slot = idx & (self.num - 1)
        return self._used_i[1 + 2 * slot], self._used_i[2 + 2 * slot]

    def posted(self) -> dict[int, list[int]]:
        """Head -> the avail ring indices naming it, from last_avail_idx to
        avail->idx: what the driver has posted that we have not taken (one pass)."""
        out: dict[int, list[int]] = {}
        idx = self.last_avail_idx
        for _ in range(min(self.pending(), self.num)):
            out.setdefault(self.avail_entry(idx), []).append(idx)
            idx = (idx + 1) & 0xFFFF
        return out

    def avail_entry(self, idx: int) -> int | None:
        """The head the driver put at avail ring index IDX."""
        if self._avail_h is None or not self.num:
            return None
        return self._avail_h[2 + (idx & (self.num - 1))]

    def describe(self) -> dict:
        d = {
            **describe_common(self),
            "avail_idx": self._avail_h[1] if self._avail_h is not None else None,
            "guest_used_idx": self._used_h[1] if self._used_h is not None else None,
            "pending": self.pending(),
            "kick_fd": self.kick_fd, "call_fd": self.call_fd,
            "kick_polled": self.kick_polled, "event_idx": self.event_idx,
            # Taken from the avail ring but not yet returned in the used ring.
            "in_flight": (self.last_avail_idx - self.used_idx) & 0xFFFF,
            # What each side asked of the other about notifications.
            "avail_flags": self._avail_h[0] if self._avail_h is not None else None,
            "used_flags": self._used_h[0] if self._used_h is not None else None,
            "used_event": (self._avail_h[2 + self.num]
                           if self._avail_h is not None and self.event_idx else None),
            "avail_event": (self._used_h[2 + 4 * self.num]
                            if self._used_h is not None and self.event_idx else None),
        }
        d.update(self.stats)
        d["errors"] = self.errors
        d["findings"] = self.findings.describe()
        return d

