"""Ring.take_writable: a frame's mergeable RX buffers in one call (split and packed).

The batched take must take exactly what pop_fast() would, one chain after
another, and leave everything else in the ring untaken and unjudged for
pop(): a looping chain, a buffer outside guest memory (or outside the cached
region), one shorter than the header, a read-only one, a head the device
still holds. Taken inside mark(), rollback() gives all of it back; push_many()
returns the buffers in ring order. Real memory: a memfd mapped by
GuestMemory, the driver writing into its own mapping of it, as in
test_packed_ring.py.
"""
from __future__ import annotations

import mmap
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vhostnet.testing.frontend import UVA_BASE
from vhostnet.testing.packed_driver import PackedDriver
from vhostnet.virtio.packed import PackedRing
from vhostnet.virtio.ring import Budget
from vhostnet.virtio.split import SplitRing
from vhostnet.vhostuser.memory import GuestMemory

GPA = 0x10000
SIZE = 1 << 20
DESC_OFF, AVAIL_OFF, USED_OFF, BUF_OFF = 0x0, 0x1000, 0x2000, 0x10000
PDRIVER_OFF, PDEVICE_OFF = 0x8000, 0x8010   # packed: the event suppression areas
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
BUF = 256          # bytes per test buffer
HDR = 12           # the virtio-net header with MRG_RXBUF (§5.1.6)
DESC = struct.Struct("<QIHH")


class SplitRig:
    """A split ring with a driver that writes descriptors and avail entries itself."""
    packed = False

    def __init__(self, num: int):
        q = self._map(num, SplitRing(0, "rx"), AVAIL_OFF, USED_OFF)
        q.attach(self.mem)
        q.started = q.enabled = True
        self.next_head = 0

    def _map(self, num: int, ring, avail_off: int, used_off: int):
        """A memfd as guest memory, and RING (num NUM) laid out in it."""
        self.fd = os.memfd_create("take-writable")
        os.ftruncate(self.fd, SIZE)
        self.mem = GuestMemory()
        self.mem.add(self.fd, GPA, SIZE, UVA_BASE, 0)
        self.mm = mmap.mmap(self.fd, SIZE)
        self.view = memoryview(self.mm)
        self.num = num
        self.ring = ring
        ring.num = num
        ring.desc_uva, ring.avail_uva, ring.used_uva = (UVA_BASE + DESC_OFF, UVA_BASE + avail_off,
                                                         UVA_BASE + used_off)
        return ring

    def post(self, length=BUF, flags=F_WRITE, addr=None, head=None, nxt=0) -> int:
        """One one-descriptor buffer (or whatever FLAGS say) made available; returns its head."""
        if head is None:
            head = self.next_head % self.num
            self.next_head += 1
        if addr is None:
            addr = GPA + BUF_OFF + head * 4096
        DESC.pack_into(self.view, DESC_OFF + 16 * head, addr, length, flags, nxt)
        self.offer(head)
        return head

    def offer(self, head: int) -> None:
        idx = struct.unpack_from("<H", self.view, AVAIL_OFF + 2)[0]
        struct.pack_into("<H", self.view, AVAIL_OFF + 4 + 2 * (idx % self.num), head)
        struct.pack_into("<H", self.view, AVAIL_OFF + 2, (idx + 1) & 0xFFFF)

    def used(self) -> list[tuple[int, int]]:
        self.ring.publish()
        n = struct.unpack_from("<H", self.view, USED_OFF + 2)[0]
        return [struct.unpack_from("<II", self.view, USED_OFF + 4 + 8 * (i % self.num)) for i in range(n)]

    def position(self):
        return self.ring.last_avail_idx

    def close(self):
        self.ring.detach()
        self.view.release()
        self.mm.close()
        self.mem.close()
        os.close(self.fd)


class PackedRig(SplitRig):
    packed = True

    def __init__(self, num: int):
        q = self._map(num, PackedRing(0, "rx"), PDRIVER_OFF, PDEVICE_OFF)
        q.attach(self.mem)
        q.started = q.enabled = True
        q.on_start()
        self.drv = PackedDriver(self.view, num, DESC_OFF, PDRIVER_OFF, PDEVICE_OFF)
        self.next_id = 0

    def post(self, length=BUF, flags=F_WRITE, addr=None, head=None, nxt=0) -> int:
        if head is None:
            head = self.next_id % self.num
            self.next_id += 1
        if addr is None:
            addr = GPA + BUF_OFF + head * 4096
        if flags & F_NEXT:       # a chain of two: this descriptor, then one more
            return self.drv.add([(addr, length, flags & ~F_NEXT), (addr + 1024, length, flags & ~F_NEXT)],
                                buf_id=head)
        return self.drv.add([(addr, length, flags)], buf_id=head)

    def used(self):
        self.ring.publish()
        return self.drv.used()

    def position(self):
        return self.ring.last_avail_idx, self.ring.avail_wrap


@pytest.fixture(params=["split", "packed"])
def rig(request):
    rigs = []

    def make(num=16):
        r = (PackedRig if request.param == "packed" else SplitRig)(num)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


def warm(r) -> None:
    """pop() one buffer and return it: the walk caches the region take_writable works in."""
    h = r.post()
    c = r.ring.pop()
    assert c is not None and c.head == h
    r.ring.push(c.head, 0)
    r.ring.publish()


def test_takes_until_the_frame_fits_and_push_many_returns_them_in_order(rig):
    r = rig()
    warm(r)
    heads = [r.post() for _ in range(6)]
    q = r.ring
    b = Budget(100)
    q.mark()
    region, got, offs, lens, room = q.take_writable(4 * BUF - 10, HDR, b)
    assert got == heads[:4] and lens == [BUF] * 4 and room == 4 * BUF
    assert b.left == 96 and q.stats["chains"] == 5
    for h, o in zip(got, offs):     # each offset is the buffer's place in the region's view
        region[o:o + 4] = b"mark"
        assert bytes(r.view[BUF_OFF + h * 4096:BUF_OFF + h * 4096 + 4]) == b"mark"
    q.commit()
    q.push_many(got, [BUF, BUF, BUF, BUF - 10])
    assert r.used()[1:] == [(h, n) for h, n in zip(got, [BUF, BUF, BUF, BUF - 10])]
    assert q.errors == {}
    # the rest are still there, for pop() or the next take
    assert q.pop().head == heads[4]


def test_nothing_taken_without_a_cached_region_or_when_empty(rig):
    r = rig()
    q = r.ring
    r.post()
    assert q.take_writable(100, HDR, Budget(10))[1:] == ([], [], [], 0)   # no walk yet: no region
    q.pop()
    assert q.take_writable(100, HDR, Budget(10))[1:] == ([], [], [], 0)   # nothing available
    assert q.errors == {}


def test_budget_stops_the_run(rig):
    r = rig()
    warm(r)
    for _ in range(8):
        r.post()
    b = Budget(3)
    _, got, _, _, room = r.ring.take_writable(8 * BUF, HDR, b)
    assert len(got) == 3 and room == 3 * BUF and b.left == 0
    assert r.ring.take_writable(8 * BUF, HDR, b)[1] == []


@pytest.mark.parametrize("bad", ["looping", "chain", "indirect", "out_of_memory", "other_region",
                                 "below_header", "empty", "readonly"])
def test_a_buffer_pop_must_judge_stops_the_run_untaken(rig, bad):
    """The run ends before BAD; it stays in the ring with nothing recorded,
    and pop() then refuses (or takes) it exactly as it would have anyway."""
    r = rig()
    warm(r)
    q = r.ring
    good = [r.post(), r.post()]
    if bad == "looping":
        if r.packed:
            pytest.skip("a packed chain is ring order, it cannot loop (§2.8.6); chain covers NEXT")
        h = r.next_head
        r.next_head += 1
        bad_head = r.post(head=h, flags=F_WRITE | F_NEXT, nxt=h)  # NEXT to itself
    elif bad == "chain":
        bad_head = r.post(flags=F_WRITE | F_NEXT, nxt=(r.next_head + 1) % r.num if not r.packed else 0)
        if not r.packed:
            DESC.pack_into(r.view, DESC_OFF + 16 * (r.next_head % r.num), GPA + 0x30000, BUF, F_WRITE, 0)
            r.next_head += 1
    elif bad == "indirect":
        table = GPA + 0x40000
        DESC.pack_into(r.view, 0x40000, GPA + 0x41000, BUF, F_WRITE, 0)
        bad_head = r.post(addr=table, length=16, flags=F_INDIRECT)
    elif bad == "out_of_memory":
        bad_head = r.post(addr=GPA + SIZE - 16)                 # runs past the end of guest memory
    elif bad == "other_region":
        bad_head = r.post(addr=0x10 << 30)                      # in no region at all
    elif bad == "below_header":
        bad_head = r.post(length=HDR - 1)
    elif bad == "empty":
        bad_head = r.post(length=0)
    else:
        bad_head = r.post(flags=0)                                       # device-readable
    after = r.post()
    before = q.stats["chains"]
    mark = q.mark()
    _, got, _, _, room = q.take_writable(10 * BUF, HDR, Budget(100))
    assert got == good and room == 2 * BUF
    assert q.errors == {} and q.stats["chains"] == before + 2
    taken_pos = r.position()
    q.rollback(mark)                      # all given back: pop() starts from the first good one
    assert q.stats["chains"] == before
    assert [q.pop().head for _ in good] == good
    assert r.position() == taken_pos
    c = q.pop()                           # pop() judges BAD as it always did
    expected = {"looping": "chain_too_long", "out_of_memory": "desc_out_of_bounds",
                "other_region": "desc_out_of_bounds"}.get(bad)
    if r.packed and expected:
        expected = "packed_" + expected if bad != "looping" else expected
    if expected:                          # refused and returned with length 0; pop() goes on
        assert c.head == after and list(q.errors) == [expected]
        assert r.used()[-1] == (bad_head, 0)
    else:                                 # a chain the device takes through pop() (and judges itself)
        assert q.errors == {} and c.head == bad_head


def test_a_head_the_device_holds_stops_the_run(rig):
    r = rig()
    warm(r)
    q = r.ring
    h = r.post()
    if r.packed:
        r.post(head=h)                   # the same buffer id again, still in flight once taken
    else:
        r.offer(h)                       # the same head twice in the avail ring
    mark = q.mark()
    _, got, _, _, _ = q.take_writable(10 * BUF, HDR, Budget(100))
    assert got == [h] and q.errors == {}
    q.rollback(mark)
    assert q.pop().head == h
    q.pop()
    assert list(q.errors) == ["packed_id_in_flight" if r.packed else "avail_head_in_use"]


def test_wraps_the_ring(rig):
    """Index arithmetic past the end of the ring (and the packed wrap counter)."""
    r = rig(num=4)
    warm(r)
    q = r.ring
    for _lap in range(5):
        heads = [r.post() for _ in range(3)]
        q.mark()
        _, got, _, lens, room = q.take_writable(3 * BUF, HDR, Budget(10))
        assert got == heads and room == 3 * BUF
        q.commit()
        q.push_many(got, lens)
        assert r.used()[-3:] == [(h, BUF) for h in heads]
    assert q.errors == {}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(desc=st.binary(min_size=16 * 8, max_size=16 * 8), ring=st.binary(min_size=20, max_size=20),
       need=st.integers(1, 1 << 20))
def test_random_split_ring_bytes_take_only_in_region_buffers(desc, ring, need):
    """Whatever the driver wrote: every buffer taken is inside the cached
    region, writable, one descriptor, at least the header, taken once."""
    r = SplitRig(8)
    try:
        warm(r)
        q = r.ring
        r.view[DESC_OFF:DESC_OFF + len(desc)] = desc
        r.view[AVAIL_OFF + 2:AVAIL_OFF + 2 + len(ring)] = ring
        q.last_avail_idx = 0
        q.reset_held()
        mark = q.mark()
        region, got, offs, lens, room = q.take_writable(need, HDR, Budget(64))
        assert len(got) == len(set(got)) <= 8 and room == sum(lens)
        for h, o, k in zip(got, offs, lens):
            addr, length, flags, _ = DESC.unpack_from(r.view, DESC_OFF + 16 * h)
            assert flags & (F_NEXT | F_INDIRECT | F_WRITE) == F_WRITE
            assert length == k >= HDR and 0 <= o and o + k <= len(region)
            assert r.mem.contains_gpa(addr, length)
        q.rollback(mark)
        assert q.last_avail_idx == 0 and not any(q._held)
    finally:
        r.close()


# Descriptors near a 128 KiB region, mostly writable ones, so that runs are long and every check is met.
_DESCS = st.lists(st.tuples(st.integers(0, 1 << 17), st.sampled_from([4096] * 4 + [100, 12, 0, 5, 1 << 16, 0xFFFFFFFF]),
                            st.sampled_from([2] * 10 + [0, 1, 3, 4, 6]), st.integers(0, 9)),
                  min_size=8, max_size=8).map(lambda ds: b"".join(DESC.pack(*d) for d in ds))


# derandomize: the same examples every run, so that the coverage check after it is stable
@settings(max_examples=300, deadline=None, derandomize=True)
@given(desc=_DESCS, ring=st.lists(st.sampled_from(list(range(8)) * 4 + [8, 9, 0xFFFF]), min_size=8, max_size=8).map(
           lambda hs: struct.pack("<8H", *hs)),
       held=st.lists(st.sampled_from([0] * 9 + [1]), min_size=8, max_size=8).map(bytes),
       checks=st.booleans(), last=st.integers(0, 0xFFFF),
       ahead=st.sampled_from([8, 8, 5, 1, 0]), need=st.sampled_from([1 << 18, 20000, 4097, 1, 0]),
       min_len=st.sampled_from([12, 12, 0, 101, 5000]), max_take=st.sampled_from([10, 10, 3, 0]),
       region=st.tuples(st.sampled_from([0, 0, 4096, 1 << 17]), st.sampled_from([1 << 18, 1 << 17, 5000, 0])))
def test_the_c_take_agrees_with_its_python_twin(desc, ring, held, checks, last, ahead, need, min_len,
                                                max_take, region):
    """stack.native.split_take_writable (C) and fallback.split_take_writable
    take the same buffers from the same bytes, and mark the same heads held."""
    import stack.native as native
    from stack.native import fallback
    if not native.NATIVE:
        if native.REASON.startswith(native.ENV_SWITCH):
            pytest.skip("VHOSTNET_NATIVE=0: the fallback was asked for")
        pytest.fail("the cffi extension is not built (python stack/native/build.py)")
    avail = memoryview(bytearray(4) + ring + bytearray(2)).cast("H")   # flags, idx, ring[8], used_event
    r_gpa, r_len = region
    results = []
    for impl in (native.split_take_writable, fallback.split_take_writable):
        h = bytearray(held)
        got = impl(avail, memoryview(desc), h, checks, 8, last, ahead, r_gpa, r_gpa + r_len, need, min_len, max_take)
        results.append((got, bytes(h)))
    assert results[0] == results[1]
    (heads, offs, lens, room), _ = results[0]
    TAKEN.append(len(heads))
    assert len(heads) <= min(ahead, max_take) and room == sum(lens)
    for o, k in zip(offs, lens):
        assert o + k <= r_len and k >= max(min_len, 1)


TAKEN: list[int] = []


def test_the_random_rings_took_runs():
    """The property above saw real runs, not only empty ones (runs after it)."""
    if TAKEN:
        assert max(TAKEN) >= 3 and sum(1 for n in TAKEN if n) > len(TAKEN) // 20


def test_the_c_take_refuses_sizes_that_do_not_cover_the_queue():
    import stack.native as native
    from stack.native import fallback
    avail = memoryview(bytearray(2 * (2 + 8))).cast("H")
    desc = memoryview(bytearray(16 * 8))
    for impl in {native.split_take_writable, fallback.split_take_writable}:
        for args in ((avail[:9], desc, bytearray(8), True, 8),       # avail ring one entry short
                     (avail, desc[:16 * 7], bytearray(8), True, 8),  # descriptor table short
                     (avail, desc, bytearray(7), True, 8),           # held short
                     (avail, desc, bytearray(8), True, 6)):          # not a power of two
            with pytest.raises(ValueError):
                impl(*args, 0, 8, 0, 1 << 20, 100, 12, 8)
        with pytest.raises(ValueError):
            impl(avail, desc, bytearray(8), True, 8, 0, 9, 0, 1 << 20, 100, 12, 8)   # more ahead than the ring


# -- put_frame: the take, the copy and the used elements of one frame at once (split rings) --

COUNT_OFF = 10    # num_buffers in the 12-byte virtio-net header (§5.1.6)


@pytest.fixture(params=["native", "fallback"])
def split_rig(request, monkeypatch):
    import stack.native as native
    from stack.native import fallback
    from vhostnet.virtio import split
    if request.param == "native" and not native.NATIVE:
        if native.REASON.startswith(native.ENV_SWITCH):
            pytest.skip("VHOSTNET_NATIVE=0: the fallback was asked for")
        pytest.fail("the cffi extension is not built (python stack/native/build.py)")
    if request.param == "fallback":
        monkeypatch.setattr(split, "SplitPins", fallback.SplitPins)
        monkeypatch.setattr(split, "split_take_writable", fallback.split_take_writable)
    rigs = []

    def make(num=16):
        r = SplitRig(num)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


def _stream(r, used):
    return b"".join(bytes(r.view[BUF_OFF + h * 4096:BUF_OFF + h * 4096 + n]) for h, n in used)


def test_put_frame_writes_the_frame_its_count_and_the_used_elements(split_rig):
    r = split_rig()
    warm(r)
    heads = [r.post() for _ in range(5)]
    q = r.ring
    b = Budget(100)
    hdr = bytes(range(12))
    data = bytes((i * 7) & 0xFF for i in range(3 * BUF + 40))
    assert q.put_frame(hdr, data, HDR, b, COUNT_OFF) == 4
    assert b.left == 96 and q.last_avail_idx == 5 and q.stats["bytes"] == len(hdr) + len(data)
    used = r.used()[1:]
    assert used == [(h, BUF) for h in heads[:3]] + [(heads[3], 12 + len(data) - 3 * BUF)]
    got = _stream(r, used)
    assert got[:10] == hdr[:10] and got[10:12] == (4).to_bytes(2, "little") and got[12:] == data
    assert q.errors == {} and q.pop().head == heads[4]
    assert not q._held[heads[0]]        # published: the device no longer holds them


@pytest.mark.parametrize("bad", ["looping", "out_of_memory", "below_header", "readonly", "too_few"])
def test_put_frame_takes_nothing_when_the_run_does_not_hold_the_frame(split_rig, bad):
    """The run stops at anything pop() must judge (or the buffers run out)
    before the frame fits: 0, nothing taken, written, marked or recorded."""
    r = split_rig()
    warm(r)
    q = r.ring
    good = [r.post(), r.post()]
    if bad == "looping":
        h = r.next_head
        r.next_head += 1
        r.post(head=h, flags=F_WRITE | F_NEXT, nxt=h)
    elif bad == "out_of_memory":
        r.post(addr=GPA + SIZE - 16)
    elif bad == "below_header":
        r.post(length=HDR - 1)
    elif bad == "readonly":
        r.post(flags=0)
    r.post()
    before = (q.last_avail_idx, q.used_idx, dict(q.stats), bytes(q._held))
    snapshot = bytes(r.view[BUF_OFF:BUF_OFF + 16 * 4096])
    assert q.put_frame(bytes(12), b"x" * (4 * BUF), HDR, Budget(100), COUNT_OFF) == 0
    assert (q.last_avail_idx, q.used_idx, dict(q.stats), bytes(q._held)) == before
    assert bytes(r.view[BUF_OFF:BUF_OFF + 16 * 4096]) == snapshot and q.errors == {}
    assert [q.pop().head for _ in good] == good


def test_put_frame_stops_at_the_budget_and_at_a_held_head(split_rig):
    r = split_rig()
    warm(r)
    q = r.ring
    for _ in range(4):
        r.post()
    assert q.put_frame(bytes(12), b"y" * (3 * BUF), HDR, Budget(3), COUNT_OFF) == 0   # needs 4
    h = r.post()
    r.offer(h)                           # the same head again, behind the first
    assert q.put_frame(bytes(12), b"y" * (5 * BUF), HDR, Budget(100), COUNT_OFF) == 0
    assert q.errors == {} and not any(q._held)


def test_put_frame_pins_follow_the_ring_and_go_at_detach(split_rig):
    """put_frame's views are pinned once (SplitPins), made again when the
    ring's views or held bytes are replaced, and released at detach: the
    guest mapping can then be closed (a pin left would keep it open)."""
    r = split_rig()
    warm(r)
    q = r.ring
    hdr, data = bytes(12), b"p" * (BUF + 10)
    heads = [r.post() for _ in range(2)]
    assert q.put_frame(hdr, data, HDR, Budget(100), COUNT_OFF) == 2
    first = q._pins
    assert first is not None and all(q._held[h] for h in heads)
    r.used()
    heads = [r.post() for _ in range(2)]
    assert q.put_frame(hdr, data, HDR, Budget(100), COUNT_OFF) == 2
    assert q._pins is first                          # kept: nothing was replaced
    r.used()
    q.on_start()                                     # the held bytes are a new bytearray
    assert q._pins is None
    heads = [r.post() for _ in range(2)]
    assert q.put_frame(hdr, data, HDR, Budget(100), COUNT_OFF) == 2
    assert q._pins is not first and all(q._held[h] for h in heads)   # marked in the new bytes
    with pytest.raises(ValueError):
        first[3].put_frame(True, q.num, 0, 1, 0, GPA, HDR, 1, hdr, data, COUNT_OFF)   # released
    q.detach()
    assert q._pins is None
    reg = r.mem.regions[0]
    r.mem.close()
    assert reg.mm.closed                             # no pin held the mapping open
    r.mem = GuestMemory()


def test_put_frame_writes_into_the_region_of_its_buffers(split_rig):
    """Buffers in a second guest region: the pins follow the region the walk
    cached, the frame lands there and nowhere in the first."""
    r = split_rig()
    q = r.ring
    fd2 = os.memfd_create("take-writable-2")
    os.ftruncate(fd2, SIZE)
    gpa2 = GPA + 2 * SIZE
    r.mem.add(fd2, gpa2, SIZE, UVA_BASE + 2 * SIZE, 0)
    mm2 = mmap.mmap(fd2, SIZE)
    try:
        warm(r)                                      # region 1 cached
        r.post()
        r.post()
        assert q.put_frame(bytes(12), b"1" * (BUF + 10), HDR, Budget(100), COUNT_OFF) == 2
        r.used()
        h = r.post(addr=gpa2)                        # pop() walks it: region 2 cached
        c = q.pop()
        assert c is not None and c.head == h
        q.push(c.head, 0)
        r.used()
        before = bytes(r.view[BUF_OFF:BUF_OFF + 16 * 4096])
        heads = [r.post(addr=gpa2 + 4096 * (i + 1)) for i in range(2)]
        data = bytes((i * 5) & 0xFF for i in range(BUF + 10))
        assert q.put_frame(bytes(12), data, HDR, Budget(100), COUNT_OFF) == 2
        assert bytes(r.view[BUF_OFF:BUF_OFF + 16 * 4096]) == before
        got = mm2[4096:4096 + BUF] + mm2[2 * 4096:2 * 4096 + 22]
        assert got[12:] == data and got[10:12] == (2).to_bytes(2, "little")
        assert [u[0] for u in r.used()[-2:]] == heads
    finally:
        q.detach()
        mm2.close()
        os.close(fd2)


# Mostly good buffers, so that many frames fit several of them (and some do not).
_GOOD_DESCS = st.lists(st.tuples(st.integers(0, 1 << 17), st.sampled_from([4096] * 8 + [100, 12, 5, 0xFFFFFFFF]),
                                 st.sampled_from([2] * 20 + [0, 1, 4]), st.integers(0, 9)),
                       min_size=8, max_size=8).map(lambda ds: b"".join(DESC.pack(*d) for d in ds))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(desc=_GOOD_DESCS, ring=st.permutations(list(range(8))).map(lambda hs: struct.pack("<8H", *hs))
       | st.lists(st.sampled_from(list(range(8)) * 4 + [8, 0xFFFF]), min_size=8,
                  max_size=8).map(lambda hs: struct.pack("<8H", *hs)),
       held=st.lists(st.sampled_from([0] * 19 + [1]), min_size=8, max_size=8).map(bytes),
       checks=st.booleans(), last=st.integers(0, 0xFFFF), used_idx=st.integers(0, 0xFFFF),
       ahead=st.sampled_from([8, 8, 5, 1, 0]), dlen=st.sampled_from([0, 50, 4000, 5000, 9000, 20000]),
       max_take=st.sampled_from([10, 10, 3, 0]), r_gpa=st.sampled_from([0, 4096]))
def test_the_c_put_frame_agrees_with_its_python_twin(desc, ring, held, checks, last, used_idx, ahead, dlen,
                                                     max_take, r_gpa):
    """Same heads, same bytes in the region, same used ring, same marks."""
    import stack.native as native
    from stack.native import fallback
    if not native.NATIVE:
        if native.REASON.startswith(native.ENV_SWITCH):
            pytest.skip("VHOSTNET_NATIVE=0: the fallback was asked for")
        pytest.fail("the cffi extension is not built (python stack/native/build.py)")
    avail = memoryview(bytearray(4) + ring + bytearray(2)).cast("H")
    hdr = bytes(range(12))
    data = bytes((i * 13) & 0xFF for i in range(dlen))
    results = []
    def pinned(impl):
        def put(avail, desc, held, checks, used, num, last, ahead, used_idx, region, *rest):
            pins = impl(avail, desc, held, used, region)
            try:
                return pins.put_frame(checks, num, last, ahead, used_idx, *rest)
            finally:
                pins.release()
        return put
    for impl in (native.split_put_frame, fallback.split_put_frame, pinned(native.SplitPins),
                 pinned(fallback.SplitPins)):
        h = bytearray(held)
        region = bytearray(b"\xa5" * (1 << 18))
        used = memoryview(bytearray(4 + 8 * 8 + 2)).cast("B")[:4 + 8 * 8].cast("I")
        got = impl(avail, memoryview(desc), h, checks, used, 8, last, ahead, used_idx, memoryview(region),
                   r_gpa, HDR, max_take, hdr, data, COUNT_OFF)
        results.append((got, bytes(h), bytes(region), used.tolist()))
    assert results[0] == results[1] == results[2] == results[3]
    heads, h, _, _ = results[0]
    if not heads:
        assert h == held                  # nothing left marked
    TAKEN_PUT.append(len(heads))


TAKEN_PUT: list[int] = []


def test_the_random_rings_put_frames():
    """The property above wrote frames into several buffers, not only none or one."""
    if TAKEN_PUT:
        assert max(TAKEN_PUT) >= 3 and sum(1 for n in TAKEN_PUT if n) > len(TAKEN_PUT) // 20
