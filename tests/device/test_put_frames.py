"""The split RX ring's run of small frames: SplitRing.put_frames and _fill's use of it.

With MRG_RXBUF negotiated, NetDevice._fill writes the frames waiting that
fit one posted buffer each as a run, in one call (NetDevice._rx_run ->
SplitRing.put_frames -> stack.native.split_put_frames), where _rx_one
wrote them one at a time (pop_fast, the header, _write_one, push). Held to
three things here, on real memory (memfds mapped by GuestMemory, the
driver writing into its own mapping of them, as in test_take_readable.py):

- the C routine (plain and through SplitPins) and its Python twin in
  stack/native/fallback.py agree on random ring bytes, and refuse the same
  bad sizes;
- a NetDevice filling with the run (rx_batch=True, the default) ends in
  exactly the state of one filling frame by frame (rx_batch=False, the
  loop _fill had before; packed rings: test_packed_put_frames.py): the same guest memory,
  used ring, positions, held heads, ring stats, findings, device counters,
  frames left waiting, stalls, return values and taps, for named hostile
  rings, odd frames, budgets inside a run, index wrap, and random rings;
- through the real server, an echo burst reaches the guest alike both ways.
"""
from __future__ import annotations

import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

import stack.native as native
from stack import Frame
from stack.native import fallback
from vhostnet.net import device
from vhostnet.net.device import RX_FRAME_MAX, NetDevice
from vhostnet.virtio import features as F
from vhostnet.virtio.ring import Budget
from vhostnet.virtio.split import SplitRing

from .conftest import make_server
from .ring_rig import AVAIL_OFF, BUF_OFF, DESC_OFF, GPA, GPA2, INDIRECT_OFF, USED_OFF, TwoRegions
from .test_datapath import ping
from .test_take_writable import GPA as _TW_GPA, SplitRig

assert _TW_GPA == 0x10000       # SplitRig's guest memory: the same layout as the rigs here

SIZE = 1 << 21
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
HDR = 12                         # the virtio-net header with MRG_RXBUF (§5.1.6)
DESC = struct.Struct("<QIHH")
BUF = 2048                       # a good RX buffer: holds any frame up to the MTU with its header
RX_FEATURES = 1 << F.VERSION_1 | 1 << F.MRG_RXBUF | 1 << F.GUEST_CSUM | 1 << F.GUEST_TSO4


def need_native():
    if not native.NATIVE:
        if native.REASON.startswith(native.ENV_SWITCH):
            pytest.skip("VHOSTNET_NATIVE=0: the fallback was asked for")
        pytest.fail("the cffi extension is not built (python stack/native/build.py)")


# -- the C routine against its Python twin -------------------------------------

# Descriptors in and near a 128 KiB region, mostly good writable buffers so that runs are long.
_DESCS = st.lists(st.tuples(st.sampled_from([4096 * i for i in range(32)]
                                            + [0, 5, 1 << 18, (1 << 18) - 100, (1 << 18) - 110, 4096 + (1 << 18) - 110]),
                            st.sampled_from([4096] * 40 + [200, 110, 109, 12, 1, 0, 0xFFFFFFFF]),
                            st.sampled_from([F_WRITE] * 60 + [0, 1, 3, 4, 6]), st.integers(0, 9)),
                  min_size=8, max_size=8).map(lambda ds: b"".join(DESC.pack(*d) for d in ds))
PUT_RUNS: list[int] = []        # frames written per call, and how the run stopped
PUT_STOPS: dict[str, int] = {}


def _pinned(cls):
    def put(avail, desc, held, checks, used, num, last, ahead, used_idx, region, *rest):
        pins = cls(avail, desc, held, used, region)
        try:
            return pins.put_frames(checks, num, last, ahead, used_idx, *rest)
        finally:
            pins.release()
    return put


IMPLS = [("c", native.split_put_frames), ("python", fallback.split_put_frames),
         ("c_pinned", _pinned(native.SplitPins)), ("python_pinned", _pinned(fallback.SplitPins))]


def _run_all(avail, desc, held, checks, num, last, ahead, used_idx, r_gpa, max_take, blob, lens):
    """Every implementation on fresh copies of the same bytes: (result, held, region, used) each."""
    out = []
    for _name, impl in IMPLS:
        h = bytearray(held)
        # The region is a slice of a larger buffer: a write past its end lands
        # in the guard bytes (and fails below) instead of in someone's heap.
        mem = bytearray(b"\xa5" * ((1 << 18) + GUARD))
        used = memoryview(bytearray(b"\x5a" * (4 + 8 * num + 2)))[:4 + 8 * num].cast("I")
        try:
            got = impl(avail, memoryview(desc), h, checks, used, num, last, ahead, used_idx,
                       memoryview(mem)[:1 << 18], r_gpa, max_take, blob, lens)
        except ValueError:
            got = "refused"
        assert mem[1 << 18:] == b"\xa5" * GUARD, f"{_name} wrote past the region"
        out.append((got, bytes(h), bytes(mem[:1 << 18]), used.tolist()))
    return out


GUARD = 1 << 13     # bytes after a test region that nothing may write


@settings(max_examples=400, deadline=None, derandomize=True)
@given(desc=_DESCS,
       ring=st.permutations(list(range(8))).map(lambda hs: struct.pack("<8H", *hs))
       | st.lists(st.sampled_from(list(range(8)) * 4 + [8, 0xFFFF]), min_size=8,
                  max_size=8).map(lambda hs: struct.pack("<8H", *hs)),
       held=st.lists(st.sampled_from([0] * 30 + [1]), min_size=8, max_size=8).map(bytes),
       checks=st.booleans(), last=st.integers(0, 0xFFFF), used_idx=st.integers(0, 0xFFFF),
       ahead=st.sampled_from([8] * 6 + [5, 1, 0]), max_take=st.sampled_from([10] * 6 + [3, 1, 0]),
       r_gpa=st.sampled_from([0, 0, 0, 4096]),
       lens=st.lists(st.sampled_from([110] * 30 + [12, 200, 201, 1526, 4096, 4097, 0]), min_size=1, max_size=10)
       | st.lists(st.sampled_from([110, 4096]), max_size=10))
def test_the_c_put_frames_agrees_with_its_python_twin(desc, ring, held, checks, last, used_idx, ahead,
                                                      max_take, r_gpa, lens):
    """Same heads, same bytes in the region, same used ring, same marks; and
    what was written is what the spec of the run says."""
    need_native()
    num = 8
    avail = memoryview(bytearray(4) + ring + bytearray(2)).cast("H")
    blob = bytes((i * 29 + 7) & 0xFF for i in range(sum(lens)))
    results = _run_all(avail, desc, held, checks, num, last, ahead, used_idx, r_gpa, max_take, blob, lens)
    assert all(r == results[0] for r in results[1:])
    heads, h, region, used = results[0]
    assert heads != "refused"
    n = len(heads)
    PUT_RUNS.append(n)
    assert n <= min(len(lens), ahead, max_take)
    pos = 0
    expect = bytearray(b"\xa5" * len(region))     # the records in order (buffers may overlap)
    for i, head in enumerate(heads):
        assert avail[2 + (last + i) % num] == head
        addr, length, flags, _ = DESC.unpack_from(desc, 16 * head)
        assert flags & 7 == F_WRITE and length >= lens[i] and length
        assert r_gpa <= addr and addr + length <= r_gpa + (1 << 18)
        expect[addr - r_gpa:addr - r_gpa + lens[i]] = blob[pos:pos + lens[i]]
        pos += lens[i]
        if checks:
            assert not held[head] and h[head]
    assert region == expect
    for i, head in enumerate(heads[-num:]):
        slot = (used_idx + len(heads) - len(heads[-num:]) + i) % num
        assert used[1 + 2 * slot:3 + 2 * slot] == [head, lens[len(heads) - len(heads[-num:]) + i]]
    if n < min(len(lens), ahead, max_take):
        stop = avail[2 + (last + n) % num]
        if stop >= num:
            why = "head_out_of_range"
        elif checks and (held[stop] or stop in heads):
            why = "held"
        else:
            addr, length, flags, _ = DESC.unpack_from(desc, 16 * stop)
            why = ("flags" if flags & 7 != F_WRITE else "too_small" if length < lens[n] or not length
                   else "region")
        PUT_STOPS[why] = PUT_STOPS.get(why, 0) + 1
    # nothing but the run is touched
    if not heads:
        assert h == held and region == b"\xa5" * len(region)


def test_the_random_rings_put_runs_and_stopped_every_way():
    """The property above wrote real runs and saw each reason a run stops (runs after it)."""
    if PUT_RUNS:
        assert max(PUT_RUNS) >= 6 and sum(1 for n in PUT_RUNS if n >= 2) > len(PUT_RUNS) // 10
        assert set(PUT_STOPS) == {"head_out_of_range", "held", "flags", "too_small", "region"}, PUT_STOPS


def test_the_c_put_frames_refuses_sizes_that_do_not_cover_the_queue():
    """Every implementation refuses alike, before it writes anything."""
    need_native()
    avail = memoryview(bytearray(4) + struct.pack("<8H", *range(8)) + bytearray(2)).cast("H")
    desc = b"".join(DESC.pack(4096 * i, 4096, F_WRITE, 0) for i in range(8))
    blob = bytes(300)
    cases = [
        dict(avail=avail[:9]),                   # avail ring one entry short
        dict(desc=desc[:16 * 7]),                # descriptor table short
        dict(held=bytes(7)),                     # held short (checks on)
        dict(num=6),                             # not a power of two
        dict(ahead=9),                           # more ahead than the ring holds
        dict(used_words=1 + 2 * 8 - 1),          # used ring short
        dict(lens=[100, 100, 101]),              # the lengths overrun the blob
        dict(lens=[100, -1]),                    # a negative length
        dict(lens=[1 << 32]),                    # a length past 32 bits
    ]
    for case in cases:
        num = case.get("num", 8)
        for _name, impl in IMPLS:
            region = bytearray(1 << 16)
            used_b = bytearray(4 + 8 * 8)
            used = memoryview(used_b)[:4 * case.get("used_words", 1 + 2 * 8)].cast("I")
            h = bytearray(case.get("held", bytes(8)))
            with pytest.raises(ValueError):
                impl(case.get("avail", avail), memoryview(case.get("desc", desc)), h, True, used, num, 0,
                     case.get("ahead", 8), 0, memoryview(region), 0, 8, blob, case.get("lens", [100, 100]))
            assert region == bytes(len(region)) and used_b == bytes(len(used_b)) and not any(h), (case, _name)
    # and a good call over the same bytes writes
    for _name, impl in IMPLS:
        used = memoryview(bytearray(4 + 8 * 8)).cast("I")
        assert impl(avail, memoryview(desc), bytearray(8), True, used, 8, 0, 8, 0, memoryview(bytearray(1 << 16)),
                    0, 8, blob, [100, 100]) == [0, 1]


@pytest.mark.parametrize("r_gpa", [0, 0x10000])
def test_a_buffer_one_byte_past_the_region_end_stops_the_run(r_gpa):
    """The region bound is exact: a buffer ending at the region's last byte
    is written, one ending a byte past it ends the run, nothing written there."""
    need_native()
    size = 1 << 16
    avail = memoryview(bytearray(4) + struct.pack("<8H", *range(8)) + bytearray(2)).cast("H")
    for end, want in ((r_gpa + size, [0, 1, 2]), (r_gpa + size + 1, [0, 1])):
        desc = b"".join(DESC.pack(r_gpa + 4096 * i, 4096, F_WRITE, 0) for i in range(2)) \
            + DESC.pack(end - 110, 110, F_WRITE, 0) + b"".join(DESC.pack(r_gpa, 4096, F_WRITE, 0) for _ in range(5))
        for _name, impl in IMPLS:
            mem = bytearray(size + GUARD)
            used = memoryview(bytearray(4 + 8 * 8)).cast("I")
            got = impl(avail, memoryview(desc), bytearray(8), True, used, 8, 0, 8, 0, memoryview(mem)[:size], r_gpa,
                       8, b"\x11" * 330, [110, 110, 110])
            assert mem[size:] == bytes(GUARD), f"{_name} wrote past the region"
            assert got == want, _name
            assert mem[size - 110:size] == (b"\x11" * 110 if len(want) == 3 else bytes(110)), _name


def test_a_head_twice_in_the_run_stops_it_at_the_second_with_the_checks_on():
    need_native()
    avail = memoryview(bytearray(4) + struct.pack("<8H", 0, 1, 2, 1, 4, 5, 6, 7) + bytearray(2)).cast("H")
    desc = b"".join(DESC.pack(4096 * i, 4096, F_WRITE, 0) for i in range(8))
    for checks, want in ((True, [0, 1, 2]), (False, [0, 1, 2, 1, 4, 5])):
        got = _run_all(avail, desc, bytes(8), checks, 8, 0, 8, 0, 0, 10, bytes(600), [100] * 6)
        assert all(r == got[0] for r in got) and got[0][0] == want


# -- SplitRing.put_frames against pop_fast + the write + push ----------------------

def _ring_rig(kinds, base: int = 0):
    r = SplitRig(16)
    q = r.ring
    q.set_base(base)
    struct.pack_into("<H", r.view, AVAIL_OFF + 2, base)
    struct.pack_into("<H", r.view, USED_OFF + 2, base)
    warm = r.post(length=BUF, head=15)                  # a walk caches the region
    assert q.pop().head == warm
    q.push(warm, 0)
    q.publish()
    for h, (length, flags) in enumerate(kinds):
        r.post(length=length, flags=flags, head=h)
    return r


_RING = struct.Struct("<H")


_ODD_BUFS = [(110, F_WRITE), (109, F_WRITE), (BUF, 0), (BUF, F_WRITE | F_NEXT), (0, F_WRITE)]
_ODD_LENS = [12, 109, 111, BUF, BUF + 1]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(kinds=st.lists(st.sampled_from([(BUF, F_WRITE)] * 12 + _ODD_BUFS), min_size=1, max_size=12)
       | st.tuples(st.integers(0, 11), st.sampled_from(_ODD_BUFS)).map(     # good buffers but one
           lambda t: [(BUF, F_WRITE)] * t[0] + [t[1]] + [(BUF, F_WRITE)] * (11 - t[0])),
       lens=st.lists(st.sampled_from([110] * 8 + _ODD_LENS), min_size=1, max_size=12)
       | st.tuples(st.integers(0, 11), st.sampled_from(_ODD_LENS)).map(     # pings but one
           lambda t: [110] * t[0] + [t[1]] + [110] * (11 - t[0])),
       budget=st.sampled_from([100, 100, 5, 3, 1, 0]), base=st.sampled_from([0, 0xFFFC]),
       checks=st.booleans())
def test_put_frames_writes_what_pop_fast_and_push_write(kinds, lens, budget, base, checks):
    """One call == _rx_one's fast path per frame (pop_fast, the buffer holds
    the record, the record at its start, push), up to the first buffer that
    path would give back: the same memory, used ring, positions, held
    heads, stats and budget."""
    a, b = _ring_rig(kinds, base), _ring_rig(kinds, base)
    try:
        a.ring.checks = b.ring.checks = checks
        blob = bytes((i * 7 + 3) & 0xFF for i in range(sum(lens)))
        ba, bb = Budget(budget), Budget(budget)
        n = a.ring.put_frames(blob, lens, ba)
        pos = 0
        done = 0
        for k in lens:
            c = b.ring.pop_fast(bb)
            if c is None:
                break
            if not c.writable or c.write_len < k:
                b.ring.unpop()
                bb.left += 1
                break
            c.writable[0][:k] = blob[pos:pos + k]
            b.ring.push(c.head, k)
            pos += k
            done += 1
        assert n == done
        for r in (a, b):
            r.ring.publish()
        qa, qb = a.ring, b.ring
        assert (qa.last_avail_idx, qa.used_idx, bytes(qa._held), qa.stats, qa.errors, ba.left) == \
            (qb.last_avail_idx, qb.used_idx, bytes(qb._held), qb.stats, qb.errors, bb.left)
        assert bytes(a.view) == bytes(b.view)
        RING_RUNS.append(n)
    finally:
        a.close()
        b.close()


RING_RUNS: list[int] = []


def test_the_ring_runs_were_long_and_budgets_stopped_some():
    if RING_RUNS:
        assert max(RING_RUNS) >= 10 and sum(1 for n in RING_RUNS if n > 2) > 20


def test_put_frames_stops_at_the_budget():
    r = _ring_rig([(BUF, F_WRITE)] * 8)
    try:
        b = Budget(3)
        assert r.ring.put_frames(bytes(110 * 6), [110] * 6, b) == 3 and b.left == 0
        assert r.ring.put_frames(bytes(110 * 3), [110] * 3, b) == 0
        assert r.ring.put_frames(bytes(110 * 3), [110] * 3, Budget(10), min_run=6) == 0   # 5 ahead
        assert r.ring.put_frames(bytes(110 * 6), [110] * 6, Budget(10), min_run=5) == 5
        assert [h for h, _ in r.used()[1:]] == list(range(8)) and r.ring.errors == {}
    finally:
        r.close()


# -- the device: a run per call == frame by frame -------------------------------

RUNS: list[int] = []      # frames written by every put_frames() call the batched devices made


class CountingSplitRing(SplitRing):
    def put_frames(self, blob, lens, budget, min_run=1):
        n = super().put_frames(blob, lens, budget, min_run)
        RUNS.append(n)
        return n


def udp(n: int, seq: int = 0) -> bytes:
    """An Ethernet/IPv4/UDP frame of N bytes (N >= 42), its bytes depending on SEQ."""
    body = bytes((seq * 31 + i) & 0xFF for i in range(n - 42))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, n - 14, seq & 0xFFFF, 0, 64, 17, 0, bytes([10, 0, 2, 2]),
                     bytes([10, 0, 2, 15]))
    return b"\x52\x54\x00\x12\x34\x56\x52\x55\x0a\x00\x02\x02\x08\x00" + ip + struct.pack(
        "!HHHH", 53, 4000 + seq, n - 34, 0) + body


# What a frame waiting for the guest can be (the stack's own output).
FRAME_KINDS = ["ping"] * 10 + ["valid", "partial", "bad_partial", "gso", "small_gso", "largest", "over", "big",
                                "tiny", "bytearray", "memoryview"]


def make_frame(kind: str, i: int) -> Frame:
    if kind == "ping":
        return Frame(ping(seq=i))
    if kind == "valid":
        return Frame(udp(80, i), csum_valid=True)
    if kind == "partial":                 # CHECKSUM_PARTIAL at the UDP checksum
        return Frame(udp(90, i), csum_start=34, csum_offset=6)
    if kind == "bad_partial":             # ... with the field outside the frame
        return Frame(udp(90, i), csum_start=34, csum_offset=2000)
    if kind == "gso":
        return Frame(udp(3000, i), csum_start=34, csum_offset=6, gso_size=1448)
    if kind == "small_gso":               # GSO, yet no larger than the MTU: _rx_one's fast path, its own header
        return Frame(udp(1000, i), csum_start=34, csum_offset=6, gso_size=1448)
    if kind == "largest":
        return Frame(udp(RX_FRAME_MAX, i))
    if kind == "over":
        return Frame(udp(RX_FRAME_MAX + 1, i))
    if kind == "big":
        return Frame(udp(9000, i))
    if kind == "tiny":
        return Frame(udp(42, i))
    if kind == "bytearray":
        return Frame(bytearray(ping(seq=i)))
    if kind == "memoryview":
        return Frame(memoryview(ping(seq=i)), csum_valid=True)
    raise ValueError(kind)


class DeviceFill:
    """What the split and packed RX rigs share: frames waiting for the
    device (its rx_pending) and its fill, called as the server would."""

    def wait(self, *kinds_at: tuple[str, int]) -> None:
        for kind, i in kinds_at:
            self.dev.rx_pending.append(make_frame(kind, i))

    # -- the device -------------------------------------------------------------

    def fill(self, rounds: int = 12) -> list:
        """flush_rx until it has nothing more (or ROUNDS calls); what each returned."""
        out = []
        for _ in range(rounds):
            more = self.dev.flush_rx([self.rx, self.tx])
            out.append(more)
            if not more:
                break
        return out


class RxRig(TwoRegions, DeviceFill):
    """A NetDevice and its RX split ring in a memfd, the driver writing the ring itself.

    The TX ring is never started. Frames for the guest are put straight
    into rx_pending, as the stack's output would be; flush_rx then fills."""

    def __init__(self, num: int, *, batch: bool, checks: bool = True, strict: bool = False, base: int = 0,
                 features: int = RX_FEATURES, event_idx: bool = False):
        q = self.rx = CountingSplitRing(0, "rx", checks=checks, strict=strict)
        super().__init__("rx-batch", SIZE, q, num, base)
        q.event_idx = event_idx
        self.start(base)
        self.tx = SplitRing(1, "tx")
        self.dev = NetDevice(rx_batch=batch)
        self.dev.set_features(features)
        self.seen: list = []
        self.dev.taps.append(self._tap)

    def _tap(self, direction, frame) -> None:
        self.seen.append((direction, bytes(frame.data), frame.csum_start, frame.csum_offset, frame.gso_size,
                          frame.csum_valid))

    # -- the driver ----------------------------------------------------------

    def buf(self, i: int) -> int:
        return GPA + BUF_OFF + 0x4000 * (i % 100)

    def desc(self, i: int, addr: int, length: int, flags: int = F_WRITE, nxt: int = 0) -> None:
        DESC.pack_into(self.view, DESC_OFF + 16 * i, addr, length, flags, nxt)

    def post(self, *heads: int, length: int = BUF) -> None:
        """One good writable buffer at each of HEADS, made available."""
        for h in heads:
            self.desc(h, self.buf(h), length)
        self.offer(*heads)

    def bad(self, kind: str, h: int) -> int:
        """Descriptor H made KIND of buffer (not offered); the head to offer."""
        if kind == "good":
            self.desc(h, self.buf(h), BUF)
        elif kind == "small":            # smaller than a ping and its header: _rx_one merges buffers
            self.desc(h, self.buf(h), 100)
        elif kind == "exact":            # exactly a ping and its header
            self.desc(h, self.buf(h), HDR + 98)
        elif kind == "one_short":
            self.desc(h, self.buf(h), HDR + 97)
        elif kind == "below_header":
            self.desc(h, self.buf(h), HDR - 4)
        elif kind == "readonly":
            self.desc(h, self.buf(h), BUF, 0)
        elif kind == "chain":            # a buffer in two descriptors
            self.desc(h, self.buf(h), 64, F_WRITE | F_NEXT, (h + 1) % self.num)
        elif kind == "looping":
            self.desc(h, self.buf(h), BUF, F_WRITE | F_NEXT, h)
        elif kind in ("indirect", "nested_indirect"):
            table = INDIRECT_OFF + 256 * (h % 16)
            DESC.pack_into(self.view, table, self.buf(h), BUF, F_WRITE, 0)
            if kind == "nested_indirect":
                DESC.pack_into(self.view, table, GPA + table, 16, F_INDIRECT, 0)
            self.desc(h, GPA + table, 16, F_INDIRECT)
        elif kind == "out_of_region":
            self.desc(h, 0x10 << 30, BUF)
        elif kind == "other_region":
            self.desc(h, GPA2 + 2048 * (h % 32), BUF)
        elif kind == "huge_len":
            self.desc(h, self.buf(h), 0xFFFFFFFF)
        elif kind == "crosses_end":
            self.desc(h, GPA + SIZE - 16, BUF)
        elif kind == "past_end_by_one":  # a buffer for a ping that ends one byte past guest memory
            self.desc(h, GPA + SIZE - HDR - 98 + 1, HDR + 98)
        elif kind == "at_end":           # ... and one that ends at its last byte
            self.desc(h, GPA + SIZE - HDR - 98, HDR + 98)
        elif kind == "empty":
            self.desc(h, self.buf(h), 0)
        elif kind == "head_out_of_range":
            return self.num + 3
        else:
            raise ValueError(kind)
        return h

    # -- the device: DeviceFill ----------------------------------------------------

    def outcome(self, returned) -> dict:
        q = self.rx
        n = self.num
        return {
            "returned": returned,
            "last_avail_idx": q.last_avail_idx, "used_idx": q.used_idx, "avail_seen": q.avail_seen,
            "used_ring": bytes(self.view[USED_OFF:USED_OFF + 4 + 8 * n + 2]),
            "memory": bytes(self.view[BUF_OFF:]), "memory2": bytes(self.view2),
            "held": bytes(q._held), "stats": dict(q.stats), "errors": q.errors,
            "findings": q.describe_findings(), "broken": q.broken,
            "counters": dict(self.dev.counters), "seen": self.seen,
            "pending": [(bytes(f.data), f.csum_start, f.csum_offset, f.gso_size, f.csum_valid)
                        for f in self.dev.rx_pending],
            "rx_waits": self.dev.rx_waits, "stalled": dict(self.dev._rx_stalled), "rx_more": self.dev._rx_more,
        }



@pytest.fixture(params=[1, device.RX_RUN_MIN], ids=["run_min_1", "run_min_default"])
def rx_run_min(request, monkeypatch):
    """_fill takes runs from RX_RUN_MIN frames waiting: every device test
    below runs with runs from one frame on too, so that short runs go
    through the batch as well."""
    monkeypatch.setattr(device, "RX_RUN_MIN", request.param)
    return request.param


def both_alike(rig, build, *, rounds: int = 12, then=None, **kw) -> dict:
    """BUILD the same ring and frames in a batched and a frame-by-frame RIG
    (a device and its ring: RxRig here, PackedRxRig for packed rings), fill
    both (THEN, if given, builds more and fills again); they must end
    alike. Returns the batched one's outcome."""
    outs = []
    num = kw.pop("num", 16)
    for batch in (True, False):
        r = rig(num, batch=batch, **kw)
        try:
            build(r)
            returned = r.fill(rounds)
            if then is not None:
                then(r)
                returned += r.fill(rounds)
            outs.append(r.outcome(returned))
        finally:
            r.close()
    batched, single = outs
    for key in single:
        assert batched[key] == single[key], key
    return batched


def both(build, **kw) -> dict:
    return both_alike(RxRig, build, **kw)


def pings(r, *seqs: int) -> None:
    r.wait(*(("ping", s) for s in seqs))


def _used_heads(out, num=16):
    n = struct.unpack_from("<H", out["used_ring"], 2)[0]
    return [struct.unpack_from("<II", out["used_ring"], 4 + 8 * (i % num)) for i in range(n)]


@pytest.mark.usefixtures("rx_run_min")
def test_a_burst_of_pings_goes_into_one_buffer_each():
    """The common case: every frame whole in the next buffer, header num_buffers 1."""
    RUNS.clear()

    def build(r):
        r.post(*range(12))
        pings(r, 0)
        r.fill()                          # the first frame's walk caches the region
        pings(r, *range(1, 10))
    out = both(build)
    assert out["counters"]["rx_frames"] == 10 and out["pending"] == [] and out["errors"] == {}
    assert _used_heads(out) == [(h, HDR + 98) for h in range(10)]
    mem = out["memory"]
    for h in range(10):
        o = 0x4000 * h
        assert mem[o:o + HDR] == struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)
        assert mem[o + HDR:o + HDR + 98] == ping(seq=h)
    assert [n for n in RUNS if n] == [9]    # after the first frame, one run


@pytest.mark.parametrize("bad", ["small", "exact", "one_short", "below_header", "readonly", "chain", "looping",
                                 "indirect", "nested_indirect", "out_of_region", "other_region", "huge_len",
                                 "crosses_end", "past_end_by_one", "at_end", "empty", "head_out_of_range",
                                 "held_head"])
@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.usefixtures("rx_run_min")
def test_a_buffer_the_run_leaves_goes_through_rx_one_as_before(bad, checks):
    """Good buffers, one BAD buffer, good buffers, frames for all of them:
    batched and frame by frame alike."""
    def build(r):
        r.post(0, 1, 2, 3)
        b = 2 if bad == "held_head" else r.bad(bad, 5)
        r.offer(b)
        r.post(6, 7, 8, 9, 10, 11, 12)
        pings(r, *range(11))
    out = both(build, checks=checks)
    assert out["counters"].get("rx_frames", 0) >= 4


@pytest.mark.parametrize("kind", ["valid", "partial", "bad_partial", "gso", "small_gso", "largest", "over", "big",
                                  "tiny", "bytearray", "memoryview"])
@pytest.mark.parametrize("features", [RX_FEATURES, 1 << F.VERSION_1 | 1 << F.MRG_RXBUF],
                         ids=["offloads", "no_offloads"])
@pytest.mark.usefixtures("rx_run_min")
def test_a_frame_the_run_leaves_goes_through_rx_one_as_before(kind, features):
    """Pings, one frame of KIND, pings: the header each gets, the buffers,
    the counters (a dropped GSO frame, a partial checksum that cannot be
    completed) alike."""
    def build(r):
        r.post(*range(16))
        pings(r, 0, 1, 2)
        r.wait((kind, 3))
        pings(r, 4, 5, 6, 7)
    out = both(build, features=features)
    assert out["pending"] == []


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 7])
@pytest.mark.usefixtures("rx_run_min")
def test_budget_spent_inside_a_run(budget, monkeypatch):
    """RX_BUDGET ends a fill inside the run ("more"); the next fills go on alike."""
    monkeypatch.setattr(device, "RX_BUDGET", budget)

    def build(r):
        r.post(*range(14))
        pings(r, *range(12))
    out = both(build, rounds=20)
    assert out["counters"]["rx_frames"] == 12 and out["returned"][0] is (budget < 12)


@pytest.mark.parametrize("base", [0xFFFA, 0xFFFF, 0xFFF0])
@pytest.mark.usefixtures("rx_run_min")
def test_indices_wrap_at_65535(base):
    def build(r):
        r.post(*range(14))
        pings(r, *range(14))
    out = both(build, base=base)
    assert out["last_avail_idx"] == (base + 14) & 0xFFFF and out["counters"]["rx_frames"] == 14


@pytest.mark.usefixtures("rx_run_min")
def test_fewer_buffers_than_frames_the_rest_wait_and_go_on_when_more_are_posted():
    def build(r):
        r.post(*range(5))
        pings(r, *range(12))

    def then(r):
        r.post(*range(5, 16))
    out = both(build, then=then, event_idx=True)
    assert out["counters"]["rx_frames"] == 12 and out["rx_waits"] == 1


@pytest.mark.usefixtures("rx_run_min")
def test_an_avail_index_jump_past_the_queue_size_breaks_the_ring_alike():
    def build(r):
        r.post(0, 1, 2)
        pings(r, *range(8))
        r.jump(40)
    out = both(build)
    assert out["broken"] == "avail_idx_jump"


@pytest.mark.usefixtures("rx_run_min")
def test_a_jump_after_a_run_is_taken_up_to_it():
    def build(r):
        r.post(*range(6))
        pings(r, *range(6))
        r.fill()                          # the region cached, all six written; then the driver jumps
        r.post(6, 7, 8)
        pings(r, *range(6, 12))
        r.jump(30)
    out = both(build)
    assert out["broken"] == "avail_idx_jump" and out["counters"]["rx_frames"] == 6


@pytest.mark.parametrize("bad", ["below_header", "readonly", "looping", "out_of_region"])
@pytest.mark.usefixtures("rx_run_min")
def test_strict_a_violation_after_a_run_breaks_the_ring_alike(bad):
    def build(r):
        r.post(*range(5))
        r.offer(r.bad(bad, 5))
        r.post(6, 7, 8)
        pings(r, *range(10))
    out = both(build, strict=True)
    assert out["broken"] is not None


@pytest.mark.parametrize("bad", ["chain", "other_region", "small"])
def test_a_ring_of_buffers_the_run_does_not_take_costs_one_run_per_fill(bad):
    """Every buffer one the run stops at: after the first stop the fill goes
    frame by frame (one run's set-up per fill, not one per frame), and ends
    as the frame-by-frame device does."""
    def build(r):
        r.post(30)                        # a good one first: the walk caches the region
        for h in range(0, 28, 2):         # chains take two descriptors each
            r.offer(r.bad(bad, h))
        pings(r, *range(14))
    RUNS.clear()
    out = both(build, num=32)
    assert len(RUNS) <= 2 and out["counters"]["rx_frames"] >= 7, RUNS     # a fill: the walk, then one stop


@pytest.mark.usefixtures("rx_run_min")
def test_a_ring_without_mrg_rxbuf_goes_frame_by_frame():
    """No MRG_RXBUF: each buffer must hold a whole frame; no run (nothing to batch differently)."""
    RUNS.clear()

    def build(r):
        r.post(*range(12))
        pings(r, *range(10))
    out = both(build, features=1 << F.VERSION_1)
    assert out["counters"]["rx_frames"] == 10 and RUNS == []


# A random RX ring: each descriptor one of these kinds, a random avail ring over them, random frames.
BUF_KINDS = ["good"] * 40 + ["small", "exact", "one_short", "below_header", "readonly", "chain", "looping",
                             "indirect", "nested_indirect", "out_of_region", "other_region", "huge_len",
                             "crosses_end", "past_end_by_one", "at_end", "empty", "head_out_of_range"]


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kinds=st.lists(st.sampled_from(BUF_KINDS), min_size=16, max_size=16)
       | st.tuples(st.integers(0, 15), st.sampled_from(BUF_KINDS)).map(      # good ones but one
           lambda t: ["good"] * t[0] + [t[1]] + ["good"] * (15 - t[0])),
       heads=st.permutations(list(range(16)))
       | st.lists(st.sampled_from(list(range(16)) * 3 + [32, 0xFFFF]), min_size=1, max_size=16),
       more=st.lists(st.sampled_from(list(range(16))), max_size=8),
       frames=st.lists(st.sampled_from(FRAME_KINDS + ["ping"] * 20), min_size=1, max_size=24)
       | st.tuples(st.integers(0, 20), st.sampled_from(FRAME_KINDS)).map(   # pings but one
           lambda t: ["ping"] * t[0] + [t[1]] + ["ping"] * (20 - t[0])),
       base=st.sampled_from([0, 0xFFF8, 0xFFFF, 1000]), budget=st.sampled_from([None, None, 1, 3, 8]),
       checks=st.booleans(), strict=st.sampled_from([False, False, True]), event_idx=st.booleans(),
       features=st.sampled_from([RX_FEATURES, RX_FEATURES, 1 << F.VERSION_1 | 1 << F.MRG_RXBUF]),
       jump=st.sampled_from([0] * 8 + [33, 3, 0xFFFF]), warm=st.sampled_from([True, True, False]))
@pytest.mark.usefixtures("rx_run_min")
def test_random_rings_end_alike(kinds, heads, more, frames, base, budget, checks, strict, event_idx, features,
                                jump, warm):
    def build(r):
        if warm:                          # a frame first, its buffer walked: the region is cached
            r.post(31)
            r.wait(("ping", 99))
            r.fill()
        for i, kind in enumerate(kinds):
            r.bad(kind, i)
        r.offer(*(h if h >= 16 or kinds[h] != "head_out_of_range" else 32 + h for h in heads))
        r.wait(*((k, i) for i, k in enumerate(frames)))
        if jump:
            r.jump(jump)

    def then(r):                          # the driver posts more (good ones) and the device goes on
        r.post(*more)
    with pytest.MonkeyPatch.context() as mp:
        if budget is not None:
            mp.setattr(device, "RX_BUDGET", budget)
        both(build, then=then, checks=checks, strict=strict, base=base, features=features, event_idx=event_idx,
             num=32)


def test_the_random_rings_were_filled_in_runs():
    """The property above went through the run, not only through _rx_one (runs after it)."""
    if RUNS:
        assert max(RUNS) >= 12 and sum(1 for n in RUNS if n > 1) > 100


# -- through the real server: an echo burst reaches the guest alike ---------------

async def echo_burst(tmp_path, nursery, batch: bool, runs: list, packed: bool = False) -> tuple:
    """48 pings through the real server in three bursts, the RX run on or off
    (BATCH), split or PACKED rings; RUNS gets each put_frames call's count.
    Returns what the guest read and what the device counted."""
    from vhostnet.testing.frontend import Frontend
    path = tmp_path / f"vhost-{batch}.sock"
    srv = make_server(path)
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    fe = Frontend(queue_size=64, packed=True) if packed else Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake()
    dev = srv.current.device
    dev.rx_batch = batch
    rx = srv.current.backend.queues[0]
    assert rx.packed == packed
    real = rx.put_frames

    def counting(blob, lens, budget, min_run=1):
        n = real(blob, lens, budget, min_run)
        runs.append(n)
        return n
    rx.put_frames = counting
    fe.post_rx()
    fe.rx.kick()
    frames = [ping(seq=i, payload=bytes([i]) * (56 + i)) for i in range(48)]
    got = []
    for burst in (frames[:1], frames[1:41], frames[41:]):     # one first: its walk caches the region
        for f in burst:
            fe.post_tx(f)
        fe.tx.kick()
        with trio.fail_after(5):
            while dev.counters["rx_frames"] < len(got) + len(burst):
                await trio.sleep(0.005)
        got += fe.read_rx()
        fe.post_rx()
        fe.rx.kick()
    counters = dict(dev.counters)
    stats = {k: v for k, v in rx.stats.items() if k not in ("kicks", "calls", "calls_suppressed", "unkicked")}
    await fe.shutdown(srv)
    return got, counters, stats, rx.errors


async def test_an_echo_burst_through_the_server_reaches_the_guest_alike(tmp_path, nursery):
    """48 pings, one then two bursts: the guest reads the same headers and replies,
    and the device counts the same, with the run (which took them) and without."""
    runs_b: list = []
    runs_s: list = []
    batched = await echo_burst(tmp_path, nursery, True, runs_b)
    single = await echo_burst(tmp_path, nursery, False, runs_s)
    assert batched == single
    got = batched[0]
    assert len(got) == 48 and all(h == struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1) for h, _ in got)
    assert sum(runs_b) >= 40 and runs_s == []
