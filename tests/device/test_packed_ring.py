"""The packed ring (vhostnet/virtio/packed.py) against a driver written from §2.8.

Real memory: a memfd mapped by GuestMemory, the driver writing into its own
mapping of the same memfd, as a guest would.
"""
from __future__ import annotations

import mmap
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from vhostnet.testing.frontend import UVA_BASE
from vhostnet.testing.packed_driver import PackedDriver
from vhostnet.virtio.packed import (RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_ENABLE, VIRTQ_DESC_F_AVAIL,
                                    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED, PackedRing, decode_base,
                                    encode_base)
from vhostnet.virtio.ring import Budget
from vhostnet.vhostuser.memory import GuestMemory

GPA = 0x10000
SIZE = 1 << 20
DESC_OFF, DRIVER_OFF, DEVICE_OFF, BUF_OFF = 0x0, 0x8000, 0x8010, 0x10000
F_WRITE, F_INDIRECT = 2, 4


def _sealed_memfd(size: int) -> int:
    fd = os.memfd_create("packed-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    import fcntl
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class Rig:
    def __init__(self, num: int, event_idx: bool = False):
        self.fd = _sealed_memfd(SIZE)
        self.mem = GuestMemory()
        self.mem.add(self.fd, GPA, SIZE, UVA_BASE, 0)
        self.mm = mmap.mmap(self.fd, SIZE)
        self.view = memoryview(self.mm)
        self.ring = PackedRing(1, "tx")
        self.ring.num = num
        self.ring.desc_uva = UVA_BASE + DESC_OFF
        self.ring.avail_uva = UVA_BASE + DRIVER_OFF
        self.ring.used_uva = UVA_BASE + DEVICE_OFF
        self.ring.event_idx = event_idx
        self.ring.attach(self.mem)
        self.ring.started = self.ring.enabled = True
        self.ring.on_start()
        self.drv = PackedDriver(self.view, num, DESC_OFF, DRIVER_OFF, DEVICE_OFF)

    def buf(self, i: int, data: bytes = b"") -> tuple[int, int]:
        off = BUF_OFF + i * 2048
        self.view[off:off + len(data)] = data
        return GPA + off, off

    def close(self):
        self.ring.detach()
        self.view.release()
        self.mm.close()
        self.mem.close()
        os.close(self.fd)


@pytest.fixture
def rig():
    rigs = []

    def make(num=8, event_idx=False):
        r = Rig(num, event_idx)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


def test_chains_in_order_across_many_wraps(rig):
    r = rig(num=8)
    seen = []
    k = 0
    for lap in range(40):
        nbufs = 1 + lap % 3
        bufs = []
        for j in range(nbufs):
            gpa, _ = r.buf(j, bytes([lap, j]) * 8)
            bufs.append((gpa, 16, 0))
        buf_id = r.drv.add(bufs)
        chain = r.ring.pop()
        assert chain is not None and chain.head == buf_id
        assert chain.read_len == 16 * nbufs
        assert b"".join(bytes(v) for v in chain.readable) == b"".join(bytes([lap, j]) * 8 for j in range(nbufs))
        assert r.ring.pop() is None
        r.ring.push(chain.head, 0)
        assert r.ring.has_unpublished()
        r.ring.publish()
        used = r.drv.used()
        assert used == [(buf_id, 0)]
        seen.append(buf_id)
        k += nbufs
    # 79 descriptors through a ring of 8: both wrap counters flipped many times.
    assert k == 79 and r.ring.stats["chains"] == 40


def test_used_flags_appear_only_at_publish_and_first_last(rig):
    r = rig(num=8)
    ids = [r.drv.add([(r.buf(i)[0], 64, F_WRITE)]) for i in range(3)]
    chains = [r.ring.pop() for _ in range(3)]
    for c in chains:
        r.ring.push(c.head, 40)
    assert r.drv.used() == []          # nothing visible before publish()
    r.ring.publish()
    assert r.drv.used() == [(i, 40) for i in ids]
    # Used descriptors say the device wrote (§2.8.3).
    assert all(r.drv.read_desc(s)[3] & F_WRITE for s in range(3))


def test_unpop_gives_back_position_and_wrap(rig):
    r = rig(num=4)
    for _ in range(3):       # move the ring near its end
        r.drv.add([(r.buf(0)[0], 64, F_WRITE)])
        c = r.ring.pop()
        r.ring.push(c.head, 1)
        r.ring.publish()
        r.drv.used()
    a = r.drv.add([(r.buf(0)[0], 64, F_WRITE)])
    b = r.drv.add([(r.buf(1)[0], 64, F_WRITE), (r.buf(2)[0], 64, F_WRITE)])
    before = (r.ring.last_avail_idx, r.ring.avail_wrap)
    c1, c2 = r.ring.pop(), r.ring.pop()
    assert (c1.head, c2.head) == (a, b)
    assert r.ring.avail_wrap != before[1]   # the second chain crossed the end
    r.ring.unpop()
    r.ring.unpop()
    assert (r.ring.last_avail_idx, r.ring.avail_wrap) == before
    assert [r.ring.pop().head, r.ring.pop().head] == [a, b]


def test_driver_event_suppression(rig):
    r = rig(num=8, event_idx=True)

    def one():
        r.drv.add([(r.buf(0)[0], 64, 0)])
        c = r.ring.pop()
        r.ring.push(c.head, 0)
        return r.ring.publish()
    r.drv.disable_interrupts()
    assert one() is False
    r.drv.enable_interrupts()
    assert one() is True
    # EVENT_IDX: an interrupt only when the used index passes the event.
    r.drv.used()
    r.drv.set_driver_event(RING_EVENT_FLAGS_DESC, (r.drv.next_used + 2) % 8, r.drv.used_wrap)
    assert one() is False and one() is False
    assert one() is True
    # The event on the next lap, across the wrap.
    r.drv.used()
    r.drv.set_driver_event(RING_EVENT_FLAGS_DESC, 1, not r.drv.used_wrap if r.drv.next_used > 1 else r.drv.used_wrap)
    results = [one() for _ in range(8)]
    assert results.count(True) == 1


def test_want_kick_at_next_writes_the_device_event(rig):
    r = rig(num=8, event_idx=True)
    assert r.ring.want_kick_at_next() is False
    assert r.drv.device_event() == (RING_EVENT_FLAGS_DESC, 0, True)
    r.drv.add([(r.buf(0)[0], 64, 0)])
    assert r.ring.want_kick_at_next() is True   # a chain raced in: go round again
    r2 = rig(num=8, event_idx=False)
    r2.ring.want_kick_at_next()
    assert r2.drv.device_event()[0] == RING_EVENT_FLAGS_ENABLE


def _indirect_table(r, entries):
    gpa, off = r.buf(100)
    for i, (addr, length, flags) in enumerate(entries):
        struct.pack_into("<QIHH", r.view, off + 16 * i, addr, length, 0, flags)
    return gpa, 16 * len(entries)


def test_indirect_table(rig):
    r = rig(num=8)
    bufs = [(r.buf(i, bytes([i]) * 10)[0], 10, 0) for i in range(3)]
    gpa, length = _indirect_table(r, bufs + [(r.buf(4)[0], 100, F_WRITE)])
    buf_id = r.drv.add([(gpa, length, F_INDIRECT)])
    c = r.ring.pop()
    assert c.head == buf_id and c.read_len == 30 and c.write_len == 100
    assert b"".join(bytes(v) for v in c.readable) == b"\0" * 10 + b"\1" * 10 + b"\2" * 10


@pytest.mark.parametrize("case,reason", [
    ("indirect_with_next", "packed_indirect_in_chain"),
    ("nested", "packed_nested_indirect"),
    ("bad_len", "packed_bad_indirect_len"),
    ("out_of_bounds", "packed_desc_out_of_bounds"),
    ("read_after_write", "packed_read_after_write"),
])
def test_refused_chains_are_returned_and_the_ring_goes_on(rig, case, reason):
    r = rig(num=8)
    if case == "indirect_with_next":
        gpa, length = _indirect_table(r, [(r.buf(0)[0], 10, 0)])
        bad = [(gpa, length, F_INDIRECT), (r.buf(1)[0], 10, 0)]
    elif case == "nested":
        inner, ilen = _indirect_table(r, [(r.buf(0)[0], 10, 0)])
        gpa, off = r.buf(101)
        struct.pack_into("<QIHH", r.view, off, inner, ilen, 0, F_INDIRECT)
        bad = [(gpa, 16, F_INDIRECT)]
    elif case == "bad_len":
        gpa, _ = r.buf(100)
        bad = [(gpa, 24, F_INDIRECT)]
    elif case == "out_of_bounds":
        bad = [(GPA + SIZE - 8, 64, 0)]
    else:
        bad = [(r.buf(0)[0], 10, F_WRITE), (r.buf(1)[0], 10, 0)]
    bad_id = r.drv.add(bad)
    good_id = r.drv.add([(r.buf(2)[0], 10, 0)])
    c = r.ring.pop()
    assert c is not None and c.head == good_id
    assert r.ring.errors == {reason: 1}
    finding = r.ring.describe_findings()[0]
    assert finding["section"].startswith("2.8.")
    r.ring.push(c.head, 0)
    r.ring.publish()
    assert r.drv.used() == [(bad_id, 0), (good_id, 0)]
    assert r.ring.broken is None


def test_head_made_available_before_the_rest_breaks_the_ring(rig):
    r = rig(num=8)
    # Head available, second descriptor still zero: the driver broke §2.8.17.
    r.drv.write_desc(0, r.buf(0)[0], 10, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_NEXT)
    assert r.ring.pop() is None
    assert r.ring.broken == "packed_desc_not_avail"
    assert r.ring.describe_findings()[0]["level"] == "MUST"
    assert r.ring.pop() is None and r.ring.last_avail_idx == 0
    r.ring.on_start()             # the driver's way out: restart the ring
    assert r.ring.broken is None


def test_a_chain_that_never_ends_is_bounded(rig):
    r = rig(num=16)
    for s in range(16):
        r.drv.write_desc(s, r.buf(0)[0], 10, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_NEXT)
    assert r.ring.pop() is None
    assert r.ring.broken == "packed_chain_too_long"


def test_wrap_counter_games_are_not_available(rig):
    r = rig(num=8)
    # Looks used (AVAIL == USED), or available for the other lap: not ours to take.
    r.drv.write_desc(0, r.buf(0)[0], 10, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
    assert r.ring.pop() is None
    r.drv.write_desc(0, r.buf(0)[0], 10, 0, VIRTQ_DESC_F_USED)
    assert r.ring.pop() is None
    assert r.ring.errors == {} and r.ring.broken is None


def test_odd_buffer_ids_are_recorded_not_refused(rig):
    r = rig(num=8)
    r.drv.add([(r.buf(0)[0], 10, 0)], buf_id=4000)
    r.drv.add([(r.buf(1)[0], 10, 0)], buf_id=4000)
    a, b = r.ring.pop(), r.ring.pop()
    assert a.head == b.head == 4000
    assert r.ring.errors == {"packed_id_out_of_range": 2}
    r2 = rig(num=8)
    r2.drv.add([(r2.buf(0)[0], 10, 0)], buf_id=3)
    r2.drv.add([(r2.buf(1)[0], 10, 0)], buf_id=3)
    r2.ring.pop(), r2.ring.pop()
    assert r2.ring.errors == {"packed_id_in_flight": 1}


def test_rewriting_a_held_descriptor_is_an_overrun(rig):
    r = rig(num=4)
    for i in range(4):
        r.drv.add([(r.buf(i)[0], 10, 0)])
    assert [r.ring.pop() is not None for _ in range(4)] == [True] * 4
    # The driver rewrites slot 0, still held by the device, as available for the next lap.
    r.drv.write_desc(0, r.buf(0)[0], 10, 9, r.drv.avail_flags(not True))
    assert r.ring.pop() is None
    assert r.ring.broken == "packed_ring_overrun"


def test_budget_counts_descriptors(rig):
    r = rig(num=32)
    for i in range(6):
        r.drv.add([(r.buf(0)[0], 10, 0)] * 4)
    budget = Budget(10)
    got = []
    while (c := r.ring.pop(budget)) is not None:
        got.append(c)
    assert len(got) == 3 and budget.left <= 0


def test_vring_base_round_trip(rig):
    assert decode_base(encode_base(5, False, 7, True)) == (5, False, 7, True)
    r = rig(num=8)
    # As after a first lap: slots 0-5 used with wrap counter 1.
    for s in range(6):
        r.drv.write_desc(s, 0, 0, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
    r.ring.set_base(encode_base(6, True, 6, True))
    r.drv.next_avail = r.drv.next_used = 6
    for _ in range(4):
        i = r.drv.add([(r.buf(0)[0], 10, 0)])
        c = r.ring.pop()
        assert c.head == i
        r.ring.push(c.head, 0)
        r.ring.publish()
        assert r.drv.used() == [(i, 0)]
    assert decode_base(r.ring.base()) == (2, False, 2, False)
    with pytest.raises(ValueError):
        r.ring.set_base(encode_base(9, True, 0, True))
    # Only the avail half (DPDK's virtio-user for a fresh ring): used follows it.
    r.ring.set_base(1 << 15)
    assert decode_base(r.ring.base()) == (0, True, 0, True)


def test_inspection_is_read_only_and_bounded(rig):
    r = rig(num=8)
    i = r.drv.add([(r.buf(0)[0], 10, 0), (r.buf(1)[0], 20, F_WRITE)])
    d = r.ring.describe()
    assert d["format"] == "packed" and d["pending"] == 2
    assert d["avail_wrap_counter"] == 1 and d["used_wrap_counter"] == 1
    assert [x["len"] for x in r.ring.describe_chain(0)] == [10, 20]
    assert r.ring.avail_entry(0) == i
    assert r.ring.last_avail_idx == 0 and r.ring.pop().head == i


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16 * 16, max_size=16 * 16), st.integers(0, 15), st.booleans())
def test_random_descriptor_bytes_never_raise_or_hang(raw, start, wrap):
    r = Rig(16)
    try:
        r.view[DESC_OFF:DESC_OFF + len(raw)] = raw
        r.ring.set_base(encode_base(start, wrap, start, wrap))
        budget = Budget(64)
        chains = 0
        while r.ring.pop(budget) is not None:
            chains += 1
            assert chains <= 64
        # Everything taken can be returned, and the positions stay in the ring.
        for buf_id, _ in list(r.ring._inflight):
            r.ring.push(buf_id, 0)
        r.ring.publish()
        assert 0 <= r.ring.last_avail_idx < 16 and 0 <= r.ring.used_idx < 16
        r.ring.describe()
        r.ring.describe_chain(start)
    finally:
        r.close()


def test_fast_path_chains_have_every_field(rig):
    """pop_fast builds its Chain without Chain.__init__: every slot must be
    set, to what the walk gives for the same buffer."""
    from vhostnet.virtio.ring import Chain

    def fields(c):
        return {k: (tuple(bytes(v) for v in getattr(c, k)) if k in ("readable", "writable") else getattr(c, k))
                for k in Chain.__slots__}
    r = rig(num=8)
    got = []
    for i, flags in enumerate((F_WRITE, 0, F_WRITE, 0)):   # two walks, then the fast path
        r.drv.add([(r.buf(i)[0], 10, flags)], buf_id=1)
        if i < 2:
            r.ring._rcache = None       # no region cached: pop() walks
        c = r.ring.pop() if i < 2 else r.ring.pop_fast(Budget(8))
        assert type(c) is Chain
        got.append(fields(c))
        r.ring.push(c.head, 0)
        r.ring.publish()
    assert got[2] == got[0] and got[3] == got[1]
    assert got[0]["write_len"] == 10 and got[1]["read_len"] == 10


def test_pop_fast_takes_only_what_needs_no_finding(rig):
    """pop_fast (the device's RX fast path) takes a plain one-descriptor chain
    and leaves anything a finding would be recorded for to pop(), untouched:
    so a chain given back with unpop() and taken again is counted once."""
    r = rig(num=8)
    r.drv.add([(r.buf(0)[0], 10, F_WRITE)], buf_id=1)
    r.ring.pop()                        # a walk: caches the region
    r.drv.add([(r.buf(1)[0], 10, F_WRITE)], buf_id=1)      # id 1 still in flight
    assert r.ring.pop_fast(Budget(8)) is None
    assert r.ring.errors == {} and r.ring.last_avail_idx == 1
    c = r.ring.pop()
    assert c.head == 1 and r.ring.errors == {"packed_id_in_flight": 1}
    r.drv.add([(r.buf(2)[0], 10, F_WRITE)], buf_id=2)
    c = r.ring.pop_fast(Budget(8))
    assert c.head == 2 and c.write_len == 10 and r.ring.last_avail_idx == 3
    r.ring.unpop()
    assert r.ring.pop().head == 2 and r.ring.errors == {"packed_id_in_flight": 1}
    r.drv.add([(r.buf(3)[0], 10, F_WRITE), (r.buf(4)[0], 10, F_WRITE)], buf_id=3)   # two descriptors
    assert r.ring.pop_fast(Budget(8)) is None and r.ring.last_avail_idx == 3
    assert r.ring.pop().write_len == 20


def test_a_chain_past_the_device_limit_is_not_walked_to_its_end(rig):
    """Found by scripts/fuzz_device.py (seed 3001, step 10482): on a 32768-entry
    ring a chain of NEXT descriptors was walked to the queue size in one step
    (GET_FEATURES waited 1.7 s). The walk stops at MAX_CHAIN_DESCS; with no end
    to skip to, the ring breaks (QEMU's own limit is the same 1024)."""
    from vhostnet.virtio.ring import MAX_CHAIN_DESCS
    n = 2048                                        # what the rig's descriptor area holds
    r = rig(num=n)
    for s in range(n):
        r.drv.write_desc(s, r.buf(0)[0], 10, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_NEXT)
    b = Budget(1 << 20)
    assert r.ring.pop(b) is None
    assert r.ring.broken == "packed_chain_excessive"
    assert (1 << 20) - b.left <= MAX_CHAIN_DESCS + 1    # what the step walked


def test_posted_reads_each_available_descriptor_once(rig, monkeypatch):
    """inspect --desc asks which chains are posted. Found by scripts/fuzz_device.py
    (seed 5000, step 164816): asking avail_entry at every available position
    walked each chain again from there, quadratic in the ring size (the backend
    stopped for seconds on a 32768-entry ring of NEXT descriptors)."""
    from vhostnet.virtio import packed
    n = 2048
    r = rig(num=n)
    r.drv.add([(r.buf(0)[0], 10, F_WRITE)] * 3, buf_id=5)
    r.drv.add([(r.buf(1)[0], 10, F_WRITE)], buf_id=7)
    r.drv.add([(r.buf(2)[0], 10, F_WRITE)] * 2, buf_id=9)
    assert r.ring.posted() == {5: [0], 7: [3], 9: [4]}
    for s in range(6, n):                               # then a chain that never ends
        r.drv.write_desc(s, r.buf(0)[0], 10, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_NEXT)
    reads = [0]
    real = packed._desc_unpack

    def counted(*a):
        reads[0] += 1
        return real(*a)
    monkeypatch.setattr(packed, "_desc_unpack", counted)
    assert r.ring.posted() == {5: [0], 7: [3], 9: [4]}
    assert reads[0] <= n


def test_an_indirect_table_past_the_device_limit_is_refused_and_the_ring_goes_on(rig):
    from vhostnet.virtio.ring import MAX_CHAIN_DESCS
    n = 2048
    r = rig(num=n)
    entries = [(r.buf(0)[0], 1, 0)] * (MAX_CHAIN_DESCS + 1)
    gpa, length = _indirect_table(r, entries)
    r.drv.add([(gpa, length, F_INDIRECT)])
    good = r.drv.add([(r.buf(1)[0], 64, 0)])
    chain = r.ring.pop()
    assert chain is not None and chain.head == good        # the big table refused, the next chain taken
    assert r.ring.errors == {"packed_chain_excessive": 1} and r.ring.broken is None
