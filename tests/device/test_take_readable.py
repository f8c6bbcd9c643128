"""The split TX ring's batched take: SplitRing.take_readable and drain_tx's use of it.

take_readable takes, in one call, the run of chains pop_fast() would take
one by one (one device-readable descriptor, head in range and not held,
inside the cached region), and leaves the first other entry untaken and
unjudged for pop(). drain_tx builds the whole run's frames, then returns
the buffers in one call (push_read). Held to three things here, on real
memory (memfds mapped by GuestMemory, the driver writing into its own
mapping of them, as in test_take_writable.py):

- the C loop (stack.native.split_take_readable, split_put_used) and its
  Python twin in stack/native/fallback.py agree on random ring bytes;
- take_readable takes exactly what repeated pop_fast() calls take;
- a NetDevice draining with the batch (tx_batch=True, the default) ends in
  exactly the state of one draining chain by chain (tx_batch=False, the
  packed rings' loop, which is the loop drain_tx had before): the same
  used ring, positions, held heads, counters, findings, frames handed to
  the stack and replies, for named hostile rings and for random ones.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import stack.native as native
from stack.native import fallback
from vhostnet.net import device
from vhostnet.net.device import NetDevice
from vhostnet.net.header import MAX_FRAME
from vhostnet.virtio import features as F
from vhostnet.virtio.ring import Budget
from vhostnet.virtio import split
from vhostnet.virtio.split import SplitRing

from .ring_rig import AVAIL_OFF, BUF_OFF, DESC_OFF, GPA, GPA2, INDIRECT_OFF, USED_OFF, TwoRegions
from .test_datapath import ping
from .test_take_writable import SplitRig

SIZE = 1 << 20
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
HDR = 12                        # the virtio-net header with VERSION_1 (§5.1.6)
DESC = struct.Struct("<QIHH")
FRAMES = [ping(seq=i) for i in range(64)]


def need_native():
    if not native.NATIVE:
        if native.REASON.startswith(native.ENV_SWITCH):
            pytest.skip("VHOSTNET_NATIVE=0: the fallback was asked for")
        pytest.fail("the cffi extension is not built (python stack/native/build.py)")


# -- the C loop against its Python twin ------------------------------------

# Descriptors near a 128 KiB region, mostly readable ones, so that runs are long and every check is met.
_DESCS = st.lists(st.tuples(st.integers(0, 100000), st.sampled_from([100] * 12 + [4096, 12, 0, 1, 1 << 16, 0xFFFFFFFF]),
                            st.sampled_from([0] * 20 + [1, 2, 3, 4, 6]), st.integers(0, 9)),
                  min_size=8, max_size=8).map(lambda ds: b"".join(DESC.pack(*d) for d in ds))
TAKEN: list[int] = []
HELD_STOPPED: list[int] = []    # 1: a run that a held head ended


@settings(max_examples=300, deadline=None, derandomize=True)
@given(desc=_DESCS, ring=st.lists(st.sampled_from(list(range(8)) * 4 + [8, 9, 0xFFFF]), min_size=8, max_size=8).map(
           lambda hs: struct.pack("<8H", *hs)),
       held=st.lists(st.sampled_from([0] * 4 + [1]), min_size=8, max_size=8).map(bytes),
       checks=st.booleans(), last=st.integers(0, 0xFFFF), ahead=st.sampled_from([8, 8, 5, 1, 0]),
       max_take=st.sampled_from([10, 10, 3, 1, 0]),
       region=st.tuples(st.sampled_from([0, 0, 4096, 1 << 17]), st.sampled_from([1 << 18, 1 << 17, 5000, 0])))
def test_the_c_take_agrees_with_its_python_twin(desc, ring, held, checks, last, ahead, max_take, region):
    """split_take_readable in C and in Python take the same chains from the
    same bytes and mark the same heads held."""
    need_native()
    avail = memoryview(bytearray(4) + ring + bytearray(2)).cast("H")   # flags, idx, ring[8], used_event
    r_gpa, r_len = region
    results = []
    for impl in (native.split_take_readable, fallback.split_take_readable):
        h = bytearray(held)
        got = impl(avail, memoryview(desc), h, checks, 8, last, ahead, r_gpa, r_gpa + r_len, max_take)
        results.append((tuple(map(list, got)), bytes(h)))
    assert results[0] == results[1]
    (heads, offs, lens), _ = results[0]
    TAKEN.append(len(heads))
    if checks:
        assert not any(held[h] for h in heads)
        if len(heads) < min(ahead, max_take):
            stop = avail[2 + (last + len(heads)) % 8]
            if stop < 8:
                addr, length, flags, _ = DESC.unpack_from(desc, 16 * stop)
                good = not flags & 7 and length and r_gpa <= addr and addr + length <= r_gpa + r_len
                HELD_STOPPED.append(bool(good and (held[stop] or stop in heads)))
    assert len(heads) <= min(ahead, max_take)
    if checks:
        assert len(set(heads)) == len(heads)
    for h, o, k in zip(heads, offs, lens):
        addr, length, flags, _ = DESC.unpack_from(desc, 16 * h)
        assert flags & (F_NEXT | F_INDIRECT | F_WRITE) == 0 and length == k >= 1
        assert addr - r_gpa == o and o + k <= r_len


def test_the_random_rings_took_runs():
    """The property above saw real runs, not only empty ones (runs after it)."""
    if TAKEN:
        assert max(TAKEN) >= 4 and sum(1 for n in TAKEN if n) > len(TAKEN) // 10
        assert sum(HELD_STOPPED) >= 1


@pytest.mark.parametrize("checks", [True, False])
def test_a_held_head_stops_the_c_and_the_python_run_alike(checks):
    """Held heads (given, and one taken earlier in the same run) end the run
    when the checks are on, and are taken when they are off."""
    need_native()
    desc = b"".join(DESC.pack(100 * i, 100, 0, 0) for i in range(8))
    avail = memoryview(bytearray(4) + struct.pack("<8H", 0, 1, 2, 1, 4, 5, 6, 7) + bytearray(2)).cast("H")
    for held_at in (None, 2):
        got = []
        for impl in (native.split_take_readable, fallback.split_take_readable):
            h = bytearray(8)
            if held_at is not None:
                h[held_at] = 1
            got.append((impl(avail, memoryview(desc), h, checks, 8, 0, 8, 0, 1 << 17, 10), bytes(h)))
        assert got[0] == got[1]
        heads = got[0][0][0]
        if not checks:
            assert heads == [0, 1, 2, 1, 4, 5, 6, 7]
        elif held_at is None:
            assert heads == [0, 1, 2]            # 1 again: held since it was taken
        else:
            assert heads == [0, 1]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(heads=st.lists(st.integers(0, 9), max_size=10), num=st.sampled_from([8, 16]), used_idx=st.integers(0, 0xFFFF),
       length=st.sampled_from([0, 0, 1, 0xFFFFFFFF]))
def test_the_c_used_write_agrees_with_its_python_twin(heads, num, used_idx, length):
    need_native()
    out = []
    for impl in (native.split_put_used, fallback.split_put_used):
        used = bytearray(b"\xAA" * (4 + 8 * num + 2))
        ui = memoryview(used)[:4 + 8 * num].cast("I")
        try:
            r = impl(ui, num, used_idx, heads, length)
        except ValueError:
            r = "refused"
        out.append((r, bytes(used)))
    assert out[0] == out[1]
    r, used = out[0]
    if len(heads) <= num:                   # heads are < 10 <= num except with num 8
        if all(h < num for h in heads):
            assert r == (used_idx + len(heads)) & 0xFFFF
            for i, h in enumerate(heads[-num:]):
                slot = (used_idx + len(heads) - len(heads[-num:]) + i) % num
                assert struct.unpack_from("<II", used, 4 + 8 * slot) == (h, length)
        else:
            assert r == "refused" and used == b"\xAA" * len(used)     # nothing written


def test_the_c_routines_refuse_sizes_that_do_not_cover_the_queue():
    avail = memoryview(bytearray(2 * (2 + 8))).cast("H")
    desc = memoryview(bytearray(16 * 8))
    used = memoryview(bytearray(4 + 8 * 8)).cast("I")
    for impl in {native.split_take_readable, fallback.split_take_readable}:
        for args in ((avail[:9], desc, bytearray(8), True, 8),       # avail ring one entry short
                     (avail, desc[:16 * 7], bytearray(8), True, 8),  # descriptor table short
                     (avail, desc, bytearray(7), True, 8),           # held short
                     (avail, desc, bytearray(8), True, 6)):          # not a power of two
            with pytest.raises(ValueError):
                impl(*args, 0, 8, 0, 1 << 20, 8)
        with pytest.raises(ValueError):
            impl(avail, desc, bytearray(8), True, 8, 0, 9, 0, 1 << 20, 9)   # more ahead than the ring
    for impl in {native.split_put_used, fallback.split_put_used}:
        for args in ((used[:16], 8, 0, [1], 0),                      # used ring short
                     (used, 8, 0, [8], 0),                           # head out of range
                     (used, 8, 0, [-1], 0),
                     (used, 8, 0, [0] * 9, 0),                       # more than the queue
                     (used, 6, 0, [1], 0)):                          # not a power of two
            with pytest.raises(ValueError):
                impl(*args)


# -- take_readable against pop_fast ------------------------------------------

def _ring_pair(desc: bytes, ring: bytes, avail_idx: int, last: int, checks: bool):
    rigs = []
    for _ in range(2):
        r = SplitRig(8)
        q = r.ring
        q.checks = checks
        warm = r.post(length=100, flags=0, head=0, addr=GPA + BUF_OFF)      # a walk caches the region
        assert q.pop().head == warm
        q.push(warm, 0)
        q.publish()
        r.view[DESC_OFF:DESC_OFF + len(desc)] = desc
        r.view[AVAIL_OFF + 4:AVAIL_OFF + 4 + len(ring)] = ring
        struct.pack_into("<H", r.view, AVAIL_OFF + 2, avail_idx)
        q.last_avail_idx = last
        q.reset_held()
        rigs.append(r)
    return rigs


def _ring_state(r):
    q = r.ring
    return q.last_avail_idx, bytes(q._held), dict(q.stats), q.errors


@settings(max_examples=300, deadline=None, derandomize=True)
@given(desc=_DESCS.map(lambda d: bytes(
           b"".join(DESC.pack(GPA + a % SIZE, n, f, x) for a, n, f, x in DESC.iter_unpack(d)))),
       ring=st.lists(st.sampled_from(list(range(8)) * 4 + [8, 0xFFFF]), min_size=8, max_size=8).map(
           lambda hs: struct.pack("<8H", *hs)),
       last=st.sampled_from([0, 3, 0xFFFD, 0xFFFF]), ahead=st.sampled_from([8, 8, 3, 0, 9, 0x8000]),
       budget=st.sampled_from([100, 5, 1, 0]), checks=st.booleans())
def test_take_readable_takes_what_pop_fast_takes(desc, ring, last, ahead, budget, checks):
    """One call takes the chains repeated pop_fast() calls take, up to the
    first device-writable one (which pop_fast would take too, and drain_tx
    then refuses as a runt: see the device tests below), the same views."""
    a, b = _ring_pair(desc, ring, (last + ahead) & 0xFFFF, last, checks)
    try:
        ba, bb = Budget(budget), Budget(budget)
        region, heads, offs, lens = a.ring.take_readable(ba)
        chains = []
        while True:
            c = b.ring.pop_fast(bb)
            if c is None or c.writable:
                if c is not None:
                    b.ring.unpop()
                    bb.left += 1
                break
            chains.append(c)
        assert list(heads) == [c.head for c in chains]
        assert [bytes(region[o:o + k]) for o, k in zip(offs, lens)] == [bytes(c.readable[0]) for c in chains]
        assert _ring_state(a) == _ring_state(b) and ba.left == bb.left
        assert a.ring.errors == {}
        # give the tail back: as if only the first chain had been taken
        if heads:
            a.ring.untake(list(heads[1:]), ba)
            b.ring.untake([c.head for c in chains[1:]], bb)
            assert a.ring.last_avail_idx == (last + 1) & 0xFFFF and ba.left == max(budget, 0) - 1
            assert _ring_state(a) == _ring_state(b)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("n", [1, 3, split.PUSH_READ_C_MIN, 20])
def test_push_read_writes_what_push_writes(n):
    """push_read (C from PUSH_READ_C_MIN heads on, else a Python loop) == push(h, 0) each."""
    rings = []
    for _ in range(2):
        r = SplitRig(32)
        r.ring.used_idx = 0xFFFE                        # and wrap the index
        rings.append(r)
    try:
        heads = [(7 * i + 3) % 32 for i in range(n)]
        rings[0].ring.push_read(heads)
        for h in heads:
            rings[1].ring.push(h, 0)
        a, b = (r.ring for r in rings)
        assert a.used_idx == b.used_idx == (0xFFFE + n) & 0xFFFF
        assert bytes(rings[0].view[USED_OFF:USED_OFF + 4 + 8 * 32]) == bytes(rings[1].view[USED_OFF:USED_OFF + 4 + 8 * 32])
        assert a._unpublished == b._unpublished == heads and a.stats == b.stats
    finally:
        for r in rings:
            r.close()


def test_push_read_returns_the_run_in_order_and_publish_releases_it():
    r = SplitRig(8)
    try:
        q = r.ring
        h0 = r.post(length=100, flags=0)
        q.pop()
        q.push(h0, 0)
        q.publish()
        posted = [r.post(length=100, flags=0) for _ in range(5)]
        b = Budget(3)
        _, heads, _, _ = q.take_readable(b)
        assert heads == posted[:3] and b.left == 0 and q.take_readable(b)[1] == ()
        assert all(q._held[h] for h in heads)
        q.push_read(heads)
        assert r.used()[-3:] == [(h, 0) for h in heads]
        assert not any(q._held[h] for h in heads)
        _, heads, _, _ = q.take_readable(Budget(10))
        assert heads == posted[3:]
        q.untake(heads[1:], Budget(0))
        assert q.last_avail_idx == 5 and not q._held[posted[4]]
        assert q.pop().head == posted[4]
        assert q.errors == {}
    finally:
        r.close()


# -- the device: batched drain == chain-by-chain drain ------------------------

RUNS: list[int] = []      # the run length of every take_readable() call the devices made


class CountingSplitRing(SplitRing):
    """A split ring that notes the length of each run it hands out (RUNS)."""

    def take_readable(self, budget, min_run=1):
        got = super().take_readable(budget, min_run)
        RUNS.append(len(got[1]))
        return got


class TxRig(TwoRegions):
    """A NetDevice and its TX split ring in a memfd, the driver writing the ring itself.

    The RX ring is never started: the stack's replies wait in rx_pending,
    where the outcome below reads them."""

    def __init__(self, num: int, *, batch: bool, checks: bool = True, strict: bool = False, base: int = 0,
                 tap_fails_on: bytes | None = None):
        q = self.tx = CountingSplitRing(1, "tx", checks=checks, strict=strict)
        super().__init__("tx-batch", SIZE, q, num, base)
        self.start(base)
        self.rx = SplitRing(0, "rx")
        self.dev = NetDevice(tx_batch=batch)
        self.dev.set_features(1 << F.VERSION_1 | 1 << F.CSUM | 1 << F.HOST_TSO4)
        self.seen: list[bytes] = []
        self.tap_fails_on = tap_fails_on
        self.dev.taps.append(self._tap)

    def _tap(self, direction, frame) -> None:
        data = bytes(frame.data)
        self.seen.append(data)
        if self.tap_fails_on is not None and self.tap_fails_on in data:
            raise RuntimeError("a stack bug on this frame")   # drain_tx counts tx_internal_error

    # -- the driver ----------------------------------------------------------

    def buf(self, i: int) -> int:
        return GPA + BUF_OFF + 4096 * (i % 200)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.view, DESC_OFF + 16 * i, addr, length, flags, nxt)

    def frame(self, i: int, data: bytes, hdr: bytes = bytes(HDR), *, other_region=False) -> None:
        """Descriptor I: one readable buffer holding HDR + DATA."""
        blob = hdr + data
        if other_region:
            addr = GPA2 + 1024 * i
            self.view2[1024 * i:1024 * i + len(blob)] = blob
        else:
            addr = self.buf(i)
            self.view[addr - GPA:addr - GPA + len(blob)] = blob
        self.desc(i, addr, len(blob))

    # -- the device -------------------------------------------------------------

    def drain(self, budget=None, rounds: int = 12) -> list:
        """drain_tx until it has nothing more (or ROUNDS calls); what each returned."""
        out = []
        for _ in range(rounds):
            more = self.dev.drain_tx([self.rx, self.tx], 0.0, budget)
            out.append(more)
            if not more:
                break
        return out

    def outcome(self, returned) -> dict:
        q = self.tx
        n = self.num
        return {
            "returned": returned,
            "last_avail_idx": q.last_avail_idx, "used_idx": q.used_idx,
            "used_ring": bytes(self.view[USED_OFF:USED_OFF + 4 + 8 * n + 2]),
            "held": bytes(q._held), "stats": dict(q.stats), "errors": q.errors,
            "findings": q.describe_findings(), "broken": q.broken,
            "counters": dict(self.dev.counters), "seen": self.seen,
            "replies": [bytes(f.data) for f in self.dev.rx_pending],
        }



@pytest.fixture(params=[1, device.TX_RUN_MIN], ids=["run_min_1", "run_min_default"])
def tx_run_min(request, monkeypatch):
    """drain_tx takes runs from TX_RUN_MIN chains ahead: every device test
    below runs with runs from one chain on too, so that short runs go
    through the batch as well."""
    monkeypatch.setattr(device, "TX_RUN_MIN", request.param)
    return request.param


def both(build, *, budget=None, rounds: int = 12, **kw) -> dict:
    """BUILD the same ring for a batched and a chain-by-chain device, drain
    both; they must end alike. Returns the batched one's outcome."""
    outs = []
    num = kw.pop("num", 16)
    for batch in (True, False):
        r = TxRig(num, batch=batch, **kw)
        try:
            build(r)
            outs.append(r.outcome(r.drain(budget, rounds)))
        finally:
            r.close()
    batched, single = outs
    for key in single:
        assert batched[key] == single[key], key
    return batched


def good(r, *heads):
    for h in heads:
        r.frame(h, FRAMES[h])
    r.offer(*heads)


@pytest.mark.parametrize("bad", ["looping", "chain", "indirect", "nested_indirect", "out_of_region",
                                 "other_region", "huge_len", "crosses_end", "empty", "writable", "runt",
                                 "head_out_of_range", "held_head", "bad_gso", "num_buffers"])
@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.usefixtures("tx_run_min")
def test_a_chain_the_batch_leaves_goes_through_pop_as_before(bad, checks):
    """Good frames, one BAD chain, good frames: batched and chain by chain alike,
    and the good frames all reach the stack in ring order."""
    def build(r):
        good(r, 0, 1, 2)                    # the first walk caches the region, then a run
        b = 5
        if bad == "looping":
            r.frame(b, FRAMES[b])
            r.desc(b, r.buf(b), HDR + len(FRAMES[b]), F_NEXT, b)
        elif bad == "chain":                # header, then the frame: two descriptors (a TSO frame's layout)
            r.desc(b, r.buf(b), HDR, F_NEXT, 12)
            r.view[r.buf(b) - GPA:r.buf(b) - GPA + HDR] = bytes(HDR)
            r.view[r.buf(12) - GPA:r.buf(12) - GPA + len(FRAMES[b])] = FRAMES[b]
            r.desc(12, r.buf(12), len(FRAMES[b]))
        elif bad in ("indirect", "nested_indirect"):
            r.frame(13, FRAMES[b])          # descriptor 13's bytes, copied into the table below
            table = INDIRECT_OFF
            entry = r.view[DESC_OFF + 16 * 13:DESC_OFF + 16 * 14]
            r.view[table:table + 16] = entry
            if bad == "nested_indirect":
                DESC.pack_into(r.view, table, GPA + table, 16, F_INDIRECT, 0)
            r.desc(b, GPA + table, 16, F_INDIRECT)
        elif bad == "out_of_region":
            r.desc(b, 0x10 << 30, 100)
        elif bad == "other_region":
            r.frame(b, FRAMES[b], other_region=True)
        elif bad == "huge_len":
            r.desc(b, r.buf(b), 0xFFFFFFFF)
        elif bad == "crosses_end":
            r.desc(b, GPA + SIZE - 16, 100)
        elif bad == "empty":
            r.desc(b, r.buf(b), 0)
        elif bad == "writable":
            r.frame(b, FRAMES[b])
            r.desc(b, r.buf(b), HDR + len(FRAMES[b]), F_WRITE)
        elif bad == "runt":
            r.frame(b, FRAMES[b][:10])
        elif bad == "head_out_of_range":
            b = 40
        elif bad == "held_head":
            b = 2                           # offered twice in the run: the device holds it
        elif bad == "bad_gso":
            r.frame(b, FRAMES[b], hdr=bytes([0, 3]) + bytes(HDR - 2))   # gso_type UDP: not allowed
        elif bad == "num_buffers":
            r.frame(b, FRAMES[b], hdr=bytes(10) + b"\x01\x00")
        r.offer(b)
        good(r, 6, 7, 8, 9)
    out = both(build, checks=checks)
    if bad not in ("held_head",) or not checks:
        assert out["seen"][:3] == [FRAMES[0], FRAMES[1], FRAMES[2]]
        assert out["seen"][-4:] == [FRAMES[i] for i in (6, 7, 8, 9)]
    assert out["stats"]["chains"] >= 7
    expected = {"looping": "chain_too_long", "nested_indirect": "nested_indirect",
                "out_of_region": "desc_out_of_bounds", "huge_len": "desc_out_of_bounds",
                "crosses_end": "desc_out_of_bounds", "runt": "tx_runt", "writable": "tx_runt",
                "empty": "tx_runt", "head_out_of_range": "head_out_of_range", "bad_gso": "tx_bad_gso",
                "num_buffers": "tx_num_buffers"}
    if bad == "held_head" and checks:
        expected["held_head"] = "avail_head_in_use"
    if bad == "num_buffers" and not checks:
        del expected["num_buffers"]          # a conformance check: off with the checks
    if bad in expected:
        assert out["errors"].get(expected[bad], 0) == 1, out["errors"]
    else:
        assert out["errors"] == {}


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 7])
@pytest.mark.usefixtures("tx_run_min")
def test_budget_spent_inside_a_run(budget):
    """The budget ends a drain inside the run; the next drains go on alike."""
    def build(r):
        good(r, *range(12))
    out = both(build, budget=budget)
    assert out["seen"] == FRAMES[:12] and out["returned"][0] is True


@pytest.mark.parametrize("base", [0xFFFA, 0xFFFF, 0xFFF0])
@pytest.mark.usefixtures("tx_run_min")
def test_indices_wrap_at_65535(base):
    def build(r):
        good(r, *range(14))
    out = both(build, base=base)
    assert out["seen"] == FRAMES[:14] and out["last_avail_idx"] == (base + 14) & 0xFFFF


@pytest.mark.usefixtures("tx_run_min")
def test_an_avail_index_jump_past_the_queue_size_breaks_the_ring_alike():
    def build(r):
        good(r, 0, 1, 2)
        r.jump(40)
    out = both(build, num=16)
    assert out["broken"] == "avail_idx_jump" and out["seen"] == []


@pytest.mark.usefixtures("tx_run_min")
def test_a_jump_after_a_run_is_taken_up_to_it():
    def build(r):
        good(r, 0, 1, 2)
        r.drain()                           # both taken; then the driver jumps
        r.seen.clear()
        good(r, 3, 4)
        r.jump(30)
    out = both(build)
    assert out["broken"] == "avail_idx_jump"


@pytest.mark.parametrize("bad", ["num_buffers", "runt", "bad_gso"])
@pytest.mark.usefixtures("tx_run_min")
def test_strict_a_violation_inside_a_run_breaks_the_ring_and_the_rest_stays_untaken(bad):
    """serve --strict: the frame's MUST violation breaks the ring in the
    middle of a run; the chains after it go back to the ring, as the
    chain-by-chain drain never took them."""
    hdrs = {"num_buffers": bytes(10) + b"\x01\x00", "bad_gso": bytes([0, 3]) + bytes(HDR - 2)}

    def build(r):
        good(r, 0, 1, 2)
        r.frame(3, FRAMES[3] if bad != "runt" else FRAMES[3][:10], hdr=hdrs.get(bad, bytes(HDR)))
        r.offer(3)
        good(r, 4, 5, 6)
    out = both(build, strict=True)
    assert out["broken"] is not None and out["last_avail_idx"] == 4
    assert out["seen"] == FRAMES[:3] and out["held"] == bytes(16)


@pytest.mark.usefixtures("tx_run_min")
def test_a_stack_error_inside_a_run_is_counted_and_the_run_goes_on():
    boom = FRAMES[4][:-8] + b"boomboom"

    def build(r):
        good(r, *range(8))
        r.frame(4, boom)
    out = both(build, tap_fails_on=b"boomboom")
    assert out["counters"]["tx_internal_error"] == 1 and out["seen"] == FRAMES[:4] + [boom] + FRAMES[5:8]
    assert out["used_ring"][2:4] == struct.pack("<H", 8)


@pytest.mark.usefixtures("tx_run_min")
def test_multi_descriptor_chains_between_runs():
    """TSO layout: every other chain is header + frame in two descriptors."""
    def build(r):
        for i in range(10):
            if i % 3 == 1:
                r.desc(i, r.buf(i), HDR, F_NEXT, 20 + i)
                r.view[r.buf(i) - GPA:r.buf(i) - GPA + HDR] = bytes(HDR)
                r.view[r.buf(20 + i) - GPA:r.buf(20 + i) - GPA + len(FRAMES[i])] = FRAMES[i]
                r.desc(20 + i, r.buf(20 + i), len(FRAMES[i]))
            else:
                r.frame(i, FRAMES[i])
            r.offer(i)
    out = both(build, num=32)
    assert out["seen"] == FRAMES[:10] and out["errors"] == {}


# A random TX ring: each descriptor one of these kinds, a random avail ring over them.
KINDS = ["good"] * 8 + ["chain", "looping", "indirect", "out_of_region", "other_region", "huge_len", "empty",
                        "writable", "runt", "num_buffers", "bad_gso", "boom", "csum", "bad_csum", "data_valid",
                        "oversize", "largest", "smallest", "just_short"]
CSUM_HDR = struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 2) + bytes(2)        # NEEDS_CSUM at the ICMP checksum
BAD_CSUM_HDR = struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 2000) + bytes(2)  # ... outside the frame
DATA_VALID_HDR = struct.pack("<BBHHHH", 2, 0, 0, 0, 0, 0) + bytes(2)


def _random_ring(r, kinds, heads, jump):
    for i, kind in enumerate(kinds):
        f = FRAMES[i]
        if kind == "good":
            r.frame(i, f)
        elif kind == "boom":
            r.frame(i, f[:-8] + b"boomboom")
        elif kind == "chain":
            r.desc(i, r.buf(i), HDR, F_NEXT, (i + 1) % r.num)
            r.view[r.buf(i) - GPA:r.buf(i) - GPA + HDR] = bytes(HDR)
        elif kind == "looping":
            r.frame(i, f)
            r.desc(i, r.buf(i), HDR + len(f), F_NEXT, i)
        elif kind == "indirect":
            table = INDIRECT_OFF + 256 * i
            r.view[r.buf(i) - GPA:r.buf(i) - GPA + HDR + len(f)] = bytes(HDR) + f
            DESC.pack_into(r.view, table, r.buf(i), HDR + len(f), 0, 0)
            r.desc(i, GPA + table, 16, F_INDIRECT)
        elif kind == "out_of_region":
            r.desc(i, 0x10 << 30, 100)
        elif kind == "other_region":
            r.frame(i, f, other_region=True)
        elif kind == "huge_len":
            r.desc(i, r.buf(i), 0xFFFFFFFF)
        elif kind == "empty":
            r.desc(i, r.buf(i), 0)
        elif kind == "writable":
            r.frame(i, f)
            r.desc(i, r.buf(i), HDR + len(f), F_WRITE)
        elif kind == "runt":
            r.frame(i, f[:10])
        elif kind == "num_buffers":
            r.frame(i, f, hdr=bytes(10) + b"\x02\x00")
        elif kind == "bad_gso":
            r.frame(i, f, hdr=bytes([0, 3]) + bytes(HDR - 2))
        elif kind == "csum":
            r.frame(i, f, hdr=CSUM_HDR)
        elif kind == "bad_csum":
            r.frame(i, f, hdr=BAD_CSUM_HDR)
        elif kind == "data_valid":
            r.frame(i, f, hdr=DATA_VALID_HDR)
        elif kind in ("oversize", "largest"):     # one byte over the largest frame, and the largest
            n = HDR + MAX_FRAME + (kind == "oversize")
            r.desc(i, GPA + 0x20000, n)
        elif kind in ("smallest", "just_short"):  # an Ethernet header exactly, and a byte less
            r.frame(i, f[:14 - (kind == "just_short")])
    r.offer(*heads)
    if jump:
        r.jump(jump)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=16, max_size=16),
       heads=st.lists(st.sampled_from(list(range(16)) * 3 + [16, 0xFFFF]), min_size=1, max_size=16),
       base=st.sampled_from([0, 0xFFF8, 0xFFFF, 1000]), budget=st.sampled_from([None, None, 1, 3, 8]),
       checks=st.booleans(), strict=st.sampled_from([False, False, True]),
       jump=st.sampled_from([0] * 8 + [17, 3, 0xFFFF]))
@pytest.mark.usefixtures("tx_run_min")
def test_random_rings_end_alike(kinds, heads, base, budget, checks, strict, jump):
    both(lambda r: _random_ring(r, kinds, heads, jump), budget=budget, checks=checks, strict=strict, base=base,
         tap_fails_on=b"boomboom")


def test_the_random_rings_were_drained_in_runs():
    """The property above went through the batch, not only through pop() (runs after it)."""
    if RUNS:
        assert max(RUNS) >= 5 and sum(1 for n in RUNS if n > 1) > 50
