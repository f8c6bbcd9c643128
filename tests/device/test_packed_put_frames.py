"""The packed RX ring's run of small frames: PackedRing.put_frames and _fill's use of it.

The packed counterpart of test_put_frames.py. With MRG_RXBUF, NetDevice._fill
writes the frames waiting that fit one posted buffer each as a run, in one
call (NetDevice._rx_run -> PackedRing.put_frames ->
stack.native.packed_put_frames), where _rx_one wrote them one at a time
(pop_fast, the header, _write_one, push). Held to three things here, on
real memory (memfds mapped by GuestMemory, the driver writing into its own
mapping of them):

- the C routine (plain and through PackedPins) and its Python twin agree
  on random ring bytes, write only what the run's spec says (the used
  descriptors of virtio 1.2 §2.8.1/§2.8.3/§2.8.6 at the used positions,
  the records into the buffers), never past the descriptor ring, the id
  scratch bytes or the region (guard bytes after each), and refuse the
  same bad sizes;
- PackedRing.put_frames ends where pop_fast + the write + push + publish
  end, chains in flight, ring ends and budgets included;
- a NetDevice filling with the run (rx_batch=True) ends in exactly the
  state of one filling frame by frame (rx_batch=False): the same guest
  memory, descriptor ring, positions and wrap counters, chains in flight,
  ring stats (interrupts included), findings, device counters, frames left
  waiting, stalls, return values and taps, for named hostile rings, odd
  frames, budgets inside a run, the ring's end, and random rings; and
  through the real server an echo burst reaches the guest alike.
"""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import stack.native as native
from stack.native import fallback
from vhostnet.net import device
from vhostnet.net.device import NetDevice
from vhostnet.virtio import features as F
from vhostnet.virtio.packed import PackedRing, encode_base
from vhostnet.virtio.ring import Budget

from .ring_rig import AVAIL_OFF, BUF_OFF, DESC_OFF, GPA, GPA2, INDIRECT_OFF, USED_OFF, TwoRegions
from .test_datapath import ping
from .test_put_frames import FRAME_KINDS, RX_FEATURES, DeviceFill, both_alike, echo_burst, need_native, pings
from .test_put_frames import rx_run_min  # noqa: F401  (the fixture, by name)

SIZE = 1 << 21
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AV, US = 1 << 7, 1 << 15                  # §2.8.1 VIRTQ_DESC_F_AVAIL / VIRTQ_DESC_F_USED
HDR = 12                                  # the virtio-net header with MRG_RXBUF (§5.1.6)
DESC = struct.Struct("<QIHH")             # §2.8.13 struct pvirtq_desc: addr, len, id, flags
BUF = 2048
REGION = 1 << 18                          # the C tests' region
GUARD = 1 << 13                           # bytes after a test buffer that nothing may write


def avail_bits(wrap: bool) -> int:
    """§2.8.1: available for WRAP: AVAIL equal to it, USED not."""
    return AV if wrap else US


def used_bits(wrap: bool) -> int:
    """§2.8.1: used for WRAP: AVAIL and USED both equal to it."""
    return AV | US if wrap else 0


# -- the C routine against its Python twin -------------------------------------

def _pinned(cls):
    def put(desc, seen, num, avail_pos, avail_wrap, used_pos, used_wrap, free, region, r_gpa, max_take, blob,
            lens):
        pins = cls(desc, seen, region)
        try:
            return pins.put_frames(num, avail_pos, avail_wrap, used_pos, used_wrap, free, r_gpa, max_take, blob,
                                   lens)
        finally:
            pins.release()
    return put


IMPLS = [("c", native.packed_put_frames), ("python", fallback.packed_put_frames),
         ("c_pinned", _pinned(native.PackedPins)), ("python_pinned", _pinned(fallback.PackedPins))]


def _run_all(desc, seen, num, avail_pos, avail_wrap, used_pos, used_wrap, free, r_gpa, max_take, blob, lens,
             impls=IMPLS):
    """Every implementation on fresh copies of the same bytes, each buffer a
    slice of a larger one whose guard bytes must stay: (result, ring, seen, region) each."""
    out = []
    for name, impl in impls:
        ring = bytearray(desc + b"\xa5" * GUARD)
        seen_b = bytearray(bytes(seen) + b"\xa5" * GUARD)
        mem = bytearray(b"\x5a" * (REGION + GUARD))
        try:
            got = impl(memoryview(ring)[:len(desc)], memoryview(seen_b)[:len(seen)], num, avail_pos, avail_wrap,
                       used_pos, used_wrap, free, memoryview(mem)[:REGION], r_gpa, max_take, blob, lens)
        except ValueError:
            got = "refused"
        assert ring[len(desc):] == b"\xa5" * GUARD, f"{name} wrote past the descriptor ring"
        assert seen_b[len(seen):] == b"\xa5" * GUARD, f"{name} wrote past the id bytes"
        assert mem[REGION:] == b"\x5a" * GUARD, f"{name} wrote past the region"
        out.append((got, bytes(ring[:len(desc)]), bytes(seen_b[:len(seen)]), bytes(mem[:REGION])))
    return out


_KINDS = ["good"] * 100 + ["readonly", "next", "indirect", "write_indirect", "both_bits", "no_bits", "other_lap"]


def _flags(kind: str, wrap: bool) -> int:
    """A descriptor's flags for KIND, at a position whose expected wrap counter is WRAP."""
    a = avail_bits(wrap)
    return {"good": F_WRITE | a, "readonly": a, "next": F_WRITE | F_NEXT | a, "indirect": F_INDIRECT | a,
            "write_indirect": F_WRITE | F_INDIRECT | a, "both_bits": F_WRITE | AV | US, "no_bits": F_WRITE,
            "other_lap": F_WRITE | avail_bits(not wrap)}[kind]


@st.composite
def packed_cases(draw):
    """A packed ring (sizes need not be powers of two, §2.8) of random
    descriptors, mostly good writable buffers so that runs are long, and the
    positions, counters, limits and frames of one call."""
    num = draw(st.sampled_from([8] * 6 + [5, 3, 1]))
    avail_pos = draw(st.integers(0, num - 1))
    avail_wrap = draw(st.booleans())
    r_gpa = draw(st.sampled_from([0, 0, 0, 4096, (1 << 64) - REGION - 4096]))
    ids = draw(st.permutations(list(range(num))) | st.permutations(list(range(num)))
               | st.permutations(list(range(num))) | st.lists(st.sampled_from(list(range(num)) * 4 + [num, 0xFFFF]), min_size=num, max_size=num))
    descs = []
    for slot in range(num):
        wrap = avail_wrap if slot >= avail_pos else not avail_wrap
        kind = draw(st.sampled_from(_KINDS))
        off = draw(st.sampled_from([4096 * i for i in range(32)] * 3
                                   + [0, 5, REGION, REGION - 100, REGION - 110, -16, 4096 + REGION - 110]))
        length = draw(st.sampled_from([4096] * 100 + [200, 110, 109, 12, 1, 0, 0xFFFFFFFF]))
        descs.append(DESC.pack((r_gpa + off) % (1 << 64), length, ids[slot], _flags(kind, wrap)))
    seen = draw(st.lists(st.sampled_from([0] * 20 + [1]), min_size=num, max_size=num).map(bytes))
    lag = min(num, draw(st.sampled_from([0] * 6 + [1, 2, num])))      # slots the device holds: used trails avail
    free = draw(st.sampled_from([num - lag] * 6 + [min(num - lag, 3), min(num - lag, 1), 0]))
    used_lin = (avail_pos if avail_wrap else avail_pos + num) - lag
    used_lin %= 2 * num
    used_pos, used_wrap = (used_lin, True) if used_lin < num else (used_lin - num, False)
    max_take = draw(st.sampled_from([10] * 6 + [3, 1, 0]))
    lens = draw(st.lists(st.sampled_from([110] * 30 + [12, 200, 201, 1526, 4096, 4097, 0]), min_size=10, max_size=10)
                | st.lists(st.sampled_from([110] * 30 + [12, 200, 201, 1526, 4096, 4097, 0]), min_size=1, max_size=10)
                | st.lists(st.sampled_from([110, 4096]), max_size=10))
    return (b"".join(descs), seen, num, avail_pos, avail_wrap, used_pos, used_wrap, free, r_gpa, max_take, lens)


PUT_RUNS: list[tuple[int, bool, bool]] = []    # (frames, the avail side wrapped, the used side wrapped)
PUT_STOPS: dict[str, int] = {}


@settings(max_examples=500, deadline=None, derandomize=True)
@given(case=packed_cases())
def test_the_c_put_frames_agrees_with_its_python_twin(case):
    """Same ids, same ring, region and id bytes; and what was written is what
    the run's spec says: each record in its buffer, each used descriptor at
    the used positions (id, length, AVAIL/USED per the used wrap counter,
    WRITE), nothing else of the ring changed, the id bytes as they were."""
    need_native()
    desc, seen, num, avail_pos, avail_wrap, used_pos, used_wrap, free, r_gpa, max_take, lens = case
    blob = bytes((i * 29 + 7) & 0xFF for i in range(sum(lens)))
    results = _run_all(desc, seen, num, avail_pos, avail_wrap, used_pos, used_wrap, free, r_gpa, max_take, blob,
                       lens)
    assert all(r == results[0] for r in results[1:]), [r[0] for r in results]
    ids, ring, seen_after, region = results[0]
    assert ids != "refused"
    n = len(ids)
    limit = min(len(lens), max_take, free)
    assert n <= limit
    assert seen_after == seen
    expect_region = bytearray(b"\x5a" * REGION)   # the records in order (buffers may overlap)
    pos, wrap, bpos = avail_pos, avail_wrap, 0
    for i, buf_id in enumerate(ids):
        addr, length, did, flags = DESC.unpack_from(desc, 16 * pos)
        assert did == buf_id and flags & (AV | US | F_NEXT | F_INDIRECT | F_WRITE) == F_WRITE | avail_bits(wrap)
        assert length >= lens[i] and length and r_gpa <= addr and addr + length <= r_gpa + REGION
        assert buf_id < num and not seen[buf_id] and buf_id not in ids[:i]
        expect_region[addr - r_gpa:addr - r_gpa + lens[i]] = blob[bpos:bpos + lens[i]]
        bpos += lens[i]
        pos += 1
        if pos == num:
            pos, wrap = 0, not wrap
    assert region == expect_region
    expect_ring = bytearray(desc)
    upos, uwrap = used_pos, used_wrap
    for buf_id, k in zip(ids, lens):
        struct.pack_into("<IHH", expect_ring, 16 * upos + 8, k, buf_id, used_bits(uwrap) | (F_WRITE if k else 0))
        upos += 1
        if upos == num:
            upos, uwrap = 0, not uwrap
    assert ring == bytes(expect_ring)
    PUT_RUNS.append((n, avail_pos + n > num, used_pos + n > num))
    if n < limit:
        addr, length, did, flags = DESC.unpack_from(desc, 16 * pos)
        if flags & (AV | US) != avail_bits(wrap):
            why = "not_available"
        elif flags & (F_NEXT | F_INDIRECT | F_WRITE) != F_WRITE:
            why = "flags"
        elif length < lens[n] or not length:
            why = "too_small"
        elif not (r_gpa <= addr and addr + length <= r_gpa + REGION):
            why = "region"
        elif did >= num:
            why = "id_out_of_range"
        else:
            assert seen[did] or did in ids
            why = "id_held" if seen[did] else "id_twice"
        PUT_STOPS[why] = PUT_STOPS.get(why, 0) + 1


def test_the_random_rings_put_runs_and_stopped_every_way():
    """The property above wrote real runs, across the ring's end on both
    sides, and saw each reason a run stops (runs after it)."""
    if PUT_RUNS:
        assert max(n for n, _, _ in PUT_RUNS) >= 7
        assert sum(1 for n, _, _ in PUT_RUNS if n >= 2) > len(PUT_RUNS) // 10
        assert sum(1 for _, a, _ in PUT_RUNS if a) > 5 and sum(1 for _, _, u in PUT_RUNS if u) > 5
        assert set(PUT_STOPS) == {"not_available", "flags", "too_small", "region", "id_out_of_range", "id_held",
                                  "id_twice"}, PUT_STOPS


def _good_ring(num: int = 8, wrap: bool = True) -> bytes:
    return b"".join(DESC.pack(4096 * i, 4096, i, F_WRITE | avail_bits(wrap)) for i in range(num))


def test_the_c_put_frames_refuses_sizes_that_do_not_cover_the_ring():
    """Every implementation refuses alike, before it reads or writes anything."""
    need_native()
    desc = _good_ring()
    blob = bytes(300)
    good = dict(desc=desc, seen=bytes(8), num=8, avail_pos=0, avail_wrap=True, used_pos=0, used_wrap=True, free=8,
                r_gpa=0, lens=[100, 100])
    cases = [
        dict(desc=desc[:16 * 7]),               # descriptor ring one short
        dict(seen=bytes(7)),                    # id bytes one short
        dict(num=0), dict(num=32769, desc=desc * 4097, seen=bytes(32769)),   # §2.8: 1..32768
        dict(avail_pos=8), dict(avail_pos=-1),  # positions outside the ring
        dict(used_pos=8), dict(used_pos=-1),
        dict(free=9), dict(free=-1),            # more free slots than the ring has
        dict(lens=[100, 100, 101]),             # the lengths overrun the blob
        dict(lens=[100, -1]), dict(lens=[1 << 32]),
        dict(r_gpa=(1 << 64) - REGION + 1),     # the region wraps the address space
    ]
    for case in cases:
        args = {**good, **case}
        got = _run_all(args["desc"], args["seen"], args["num"], args["avail_pos"], args["avail_wrap"],
                       args["used_pos"], args["used_wrap"], args["free"], args["r_gpa"], 8, blob, args["lens"])
        for r in got:
            assert r == ("refused", args["desc"], args["seen"], b"\x5a" * REGION), case
    # and the good call over the same bytes writes
    got = _run_all(desc, bytes(8), 8, 0, True, 0, True, 8, 0, 8, blob, [100, 100])
    assert all(r[0] == [0, 1] for r in got)


def test_the_avail_run_counts_available_descriptors_across_the_ring_end():
    """packed_avail_run (PackedRing.pending): C, pinned C and the twin alike,
    bounded by LIMIT and the ring, the wrap counter flipping at its end."""
    need_native()
    num = 8
    # positions 5, 6, 7 available for wrap 0, then 0, 1 for wrap 1 (the next lap), 2 not
    wraps = {5: False, 6: False, 7: False, 0: True, 1: True, 2: False, 3: True, 4: True}
    desc = bytearray(b"".join(DESC.pack(0, 1, i, F_WRITE | avail_bits(wraps[i])) for i in range(num)))

    def all_impls(pos, wrap, limit):
        pins = [native.PackedPins(desc, bytearray(num), bytearray(16)),
                fallback.PackedPins(desc, bytearray(num), bytearray(16))]
        try:
            got = {native.packed_avail_run(desc, num, pos, wrap, limit),
                   fallback.packed_avail_run(desc, num, pos, wrap, limit),
                   *(p.avail_run(num, pos, wrap, limit) for p in pins)}
        finally:
            for p in pins:
                p.release()
        assert len(got) == 1
        return got.pop()
    assert all_impls(5, False, 100) == 5 and all_impls(5, False, 4) == 4 and all_impls(5, False, 0) == 0
    assert all_impls(5, True, 100) == 0 and all_impls(3, True, 100) == 2
    for bad in ((8, True, 1), (-1, True, 1)):
        for f in (native.packed_avail_run, fallback.packed_avail_run):
            with pytest.raises(ValueError):
                f(desc, num, *bad)
    with pytest.raises(ValueError):
        native.packed_avail_run(desc[:16 * 7], num, 0, True, 1)
    with pytest.raises(ValueError):
        fallback.packed_avail_run(desc[:16 * 7], num, 0, True, 1)


@pytest.mark.parametrize("r_gpa", [0, 0x10000, (1 << 64) - 1 - REGION])
def test_a_buffer_one_byte_past_the_region_end_stops_the_run(r_gpa):
    """The region bound is exact: a buffer ending at the region's last byte
    is written, one ending a byte past it ends the run, nothing written there
    (a region ending at the last guest physical address, 2**64 - 1, included)."""
    need_native()
    for end, want in ((r_gpa + REGION, [0, 1, 2]), (r_gpa + REGION + 1, [0, 1])):
        desc = b"".join(DESC.pack(r_gpa + 4096 * i, 4096, i, F_WRITE | AV) for i in range(2)) \
            + DESC.pack((end - 110) % (1 << 64), 110, 2, F_WRITE | AV) \
            + b"".join(DESC.pack(r_gpa, 4096, 3 + i, F_WRITE | AV) for i in range(5))
        got = _run_all(desc, bytes(8), 8, 0, True, 0, True, 8, r_gpa, 8, b"\x11" * 330, [110, 110, 110])
        assert all(r == got[0] for r in got)
        ids, _ring, _seen, region = got[0]
        assert ids == want
        assert region[REGION - 110:] == (b"\x11" * 110 if len(want) == 3 else b"\x5a" * 110)


def test_a_run_across_the_ring_end_flips_both_wrap_counters():
    """Avail positions 6, 7 (wrap 1), then 0, 1, 2 of the next lap (wrap 0);
    the used descriptors at 6, 7 with AVAIL = USED = 1 and at 0, 1, 2 with
    both 0 (§2.8.1): the ring's end on both sides in one run."""
    need_native()
    num = 8
    desc = b"".join(DESC.pack(4096 * i, 4096, 7 - i, F_WRITE | avail_bits(not 0 <= i <= 2)) for i in range(num))
    got = _run_all(desc, bytes(num), num, 6, True, 6, True, 8, 0, 10, bytes(range(110)) * 6, [110] * 6)
    assert all(r == got[0] for r in got)
    ids, ring, _seen, _region = got[0]
    assert ids == [1, 0, 7, 6, 5]                      # position 3 holds a descriptor of the lap before
    used = [DESC.unpack_from(ring, 16 * p) for p in range(num)]
    for p, buf_id in zip((6, 7, 0, 1, 2), ids):
        _addr, length, did, flags = used[p]
        assert (did, length, flags) == (buf_id, 110, F_WRITE | (AV | US if p >= 6 else 0)), p
    assert used[3] == DESC.unpack_from(desc, 48)


def test_the_id_bytes_stop_the_run_at_an_id_held_or_seen_twice():
    need_native()
    desc = b"".join(DESC.pack(4096 * i, 4096, i_d, F_WRITE | AV) for i, i_d in enumerate([0, 1, 2, 1, 4, 5, 6, 7]))
    got = _run_all(desc, bytes(8), 8, 0, True, 0, True, 8, 0, 10, bytes(600), [100] * 6)
    assert all(r == got[0] for r in got) and got[0][0] == [0, 1, 2] and got[0][2] == bytes(8)
    held = bytes([0, 0, 1, 0, 0, 0, 0, 0])           # id 2 in flight
    got = _run_all(desc, held, 8, 0, True, 0, True, 8, 0, 10, bytes(600), [100] * 6)
    assert all(r == got[0] for r in got) and got[0][0] == [0, 1] and got[0][2] == held


# -- the order of the C's reads and writes of the ring ------------------------------
#
# The driver may read and write the ring while the C runs, so the order of
# its accesses is part of its contract (§2.8.21.1: a descriptor's flags are
# written last, so read first; §2.8.9 and §2.8.15: a used descriptor's id and
# len before its flags, the run's first flags last). One test build of
# native.c, unchanged, with every memcpy (all its ring accesses are memcpys)
# logged when it touches the ring: the order in the log is the program
# order, which the C's barriers keep the compiler and the CPU to.

_TRACE_PRELUDE = r"""
#include <string.h>
#include <stdint.h>
#define VN_TRACE_MAX 4096
static const char *vn_trace_lo;
static size_t vn_trace_len, vn_trace_n;
static uint64_t vn_trace_log[VN_TRACE_MAX];
static void *vn_traced_memcpy(void *d, const void *s, size_t n)
{
    const char *dc = (const char *)d, *sc = (const char *)s;
    if (vn_trace_n < VN_TRACE_MAX) {
        if (dc >= vn_trace_lo && dc < vn_trace_lo + vn_trace_len)
            vn_trace_log[vn_trace_n++] = (1ull << 63) | ((uint64_t)(dc - vn_trace_lo) << 8) | n;
        else if (sc >= vn_trace_lo && sc < vn_trace_lo + vn_trace_len)
            vn_trace_log[vn_trace_n++] = ((uint64_t)(sc - vn_trace_lo) << 8) | n;
    }
    return memcpy(d, s, n);
}
#define memcpy vn_traced_memcpy
"""
_TRACE_POSTLUDE = r"""
void vn_trace_start(const char *lo, size_t len) { vn_trace_lo = lo; vn_trace_len = len; vn_trace_n = 0; }
size_t vn_trace_take(uint64_t *out, size_t max)
{
    size_t n = vn_trace_n < max ? vn_trace_n : max;
    for (size_t i = 0; i < n; i++)
        out[i] = vn_trace_log[i];
    return n;
}
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """native.c built with its ring accesses logged (ffi, lib)."""
    need_native()
    import importlib.util

    from cffi import FFI

    from stack.native import build
    ffi = FFI()
    ffi.cdef(build.CDEF + "void vn_trace_start(const char *lo, size_t len);\n"
             "size_t vn_trace_take(uint64_t *out, size_t max);\n")
    with open(os.path.join(build.HERE, "native.c"), encoding="utf-8") as f:
        src = _TRACE_PRELUDE + f.read() + _TRACE_POSTLUDE
    ffi.set_source("_vn_traced", src, extra_compile_args=["-O2", "-std=c99"])
    so = ffi.compile(tmpdir=str(tmp_path_factory.mktemp("traced")))
    spec = importlib.util.spec_from_file_location("_vn_traced", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ffi, mod.lib


@pytest.mark.parametrize("avail_pos,used_pos,n", [(6, 6, 5), (0, 0, 8), (3, 1, 4), (7, 7, 1)])
def test_the_c_reads_flags_first_and_writes_the_first_flags_last(traced, avail_pos, used_pos, n):
    ffi, lib = traced
    num = 8
    wrap_at = {p: p >= avail_pos for p in range(num)}           # positions of this lap, then the next
    ring = bytearray(b"".join(DESC.pack(4096 * p, 4096, p, F_WRITE | avail_bits(wrap_at[p])) for p in range(num)))
    if n < num:                                                  # the run stops at the descriptor after it
        stop = (avail_pos + n) % num
        struct.pack_into("<H", ring, 16 * stop + 14, F_WRITE | avail_bits(not wrap_at[stop]))
    region = bytearray(REGION)
    seen = bytearray(num)
    ids = ffi.new("uint64_t[]", 256)
    lens = ffi.new("uint32_t[]", [110] * num)
    rp = ffi.from_buffer(ring)
    lib.vn_trace_start(rp, len(ring))
    got = lib.vn_packed_put_frames(rp, len(ring), ffi.from_buffer(seen), num, num, avail_pos, 1, used_pos, 1,
                                   num, ffi.from_buffer(region), 0, REGION, 256, bytes(110 * num), 110 * num,
                                   lens, num, ids)
    assert got == n
    out = ffi.new("uint64_t[]", 4096)
    log = [(int(e) >> 63, (int(e) >> 8) & 0xFFFFFFFF, int(e) & 0xFF) for e in out[0:lib.vn_trace_take(out, 4096)]]
    reads = [(off, k) for w, off, k in log if not w]
    writes = [(off, k) for w, off, k in log if w]
    # each descriptor looked at: its flags, then (if they pass) the rest, once each
    looked = [(avail_pos + i) % num for i in range(min(n + 1, num))]
    expect_reads = []
    for i, p in enumerate(looked):
        expect_reads.append((16 * p + 14, 2))
        if i < n:
            expect_reads.append((16 * p, 14))
    assert reads == expect_reads
    used = [(used_pos + i) % num for i in range(n)]
    body = [w for w in writes if w[0] % 16 != 14]
    flags = [w for w in writes if w[0] % 16 == 14]
    assert sorted(body) == sorted([(16 * p + 8, 4) for p in used] + [(16 * p + 12, 2) for p in used])
    assert sorted(flags) == sorted((16 * p + 14, 2) for p in used)
    assert writes[:len(body)] == body, "a used descriptor's flags before every id and len"
    assert writes[-1] == (16 * used_pos + 14, 2), "the run's first flags not last"


# -- the rig: a packed RX ring in two guest regions, the driver writing it itself ----

class PackedRxRig(TwoRegions, DeviceFill):
    """A packed RX ring at ring position POS with wrap counters WRAP (both
    sides), in the rig's memory: the descriptor ring at DESC_OFF, the driver
    event suppression at AVAIL_OFF, the device's at USED_OFF. Optionally a
    NetDevice on it (the TX ring is never started); its frames go straight
    into rx_pending, as the stack's output would."""

    def __init__(self, num: int, *, pos: int = 0, wrap: bool = True, checks: bool = True, strict: bool = False,
                 event_idx: bool = False, batch: bool | None = None, features: int = RX_FEATURES):
        q = CountingPackedRing(0, "rx", checks=checks, strict=strict)
        super().__init__("packed-rx", SIZE, q, num, 0)
        q.event_idx = event_idx
        q.attach(self.mem)
        q.set_base(encode_base(pos, wrap, pos, wrap))
        q.started = q.enabled = True
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        q.call_fd = self.call
        self.next_avail, self.avail_wrap = pos, wrap
        self.next_id = 0
        self.seen: list = []
        self.dev = None
        if batch is not None:
            self.tx = PackedRing(1, "tx")
            self.dev = NetDevice(rx_batch=batch)
            self.dev.set_features(features | 1 << F.RING_PACKED)
            self.dev.taps.append(self._tap)

    def _tap(self, direction, frame) -> None:
        self.seen.append((direction, bytes(frame.data), frame.csum_start, frame.csum_offset, frame.gso_size,
                          frame.csum_valid))

    # -- the driver (§2.8.21.1, or a hostile one) -----------------------------

    def buf(self, i: int) -> int:
        return GPA + BUF_OFF + 0x4000 * (i % 100)

    def write(self, addr: int, length: int, flags: int, buf_id: int | None = None, avail: bool = True) -> int:
        """One descriptor at the driver's next position, made available (AVAIL/USED
        for its wrap counter, unless AVAIL is False: the other lap's); returns its id."""
        if buf_id is None:
            buf_id = self.next_id % self.num
            self.next_id += 1
        DESC.pack_into(self.view, DESC_OFF + 16 * self.next_avail, addr, length, buf_id,
                       flags | avail_bits(self.avail_wrap if avail else not self.avail_wrap))
        self.next_avail += 1
        if self.next_avail == self.num:
            self.next_avail, self.avail_wrap = 0, not self.avail_wrap
        return buf_id

    def post(self, n: int = 1, length: int = BUF) -> list:
        return [self.write(self.buf(self.next_id), length, F_WRITE) for _ in range(n)]

    def offer(self, kind: str) -> None:
        """One buffer of KIND made available."""
        i = self.next_id
        if kind == "good":
            self.write(self.buf(i), BUF, F_WRITE)
        elif kind == "small":            # smaller than a ping and its header: _rx_one merges buffers
            self.write(self.buf(i), 100, F_WRITE)
        elif kind == "exact":            # exactly a ping and its header
            self.write(self.buf(i), HDR + 98, F_WRITE)
        elif kind == "one_short":
            self.write(self.buf(i), HDR + 97, F_WRITE)
        elif kind == "below_header":
            self.write(self.buf(i), HDR - 4, F_WRITE)
        elif kind == "readonly":
            self.write(self.buf(i), BUF, 0)
        elif kind == "chain":            # a buffer in two descriptors, the id in the last (§2.8.6)
            self.next_id += 1
            self.write(self.buf(i), 64, F_WRITE | F_NEXT, buf_id=i % self.num)
            self.write(self.buf(i) + 64, BUF, F_WRITE, buf_id=i % self.num)
        elif kind in ("indirect", "nested_indirect"):
            table = INDIRECT_OFF + 256 * (i % 16)
            DESC.pack_into(self.view, table, self.buf(i), BUF, 0, F_WRITE)
            if kind == "nested_indirect":
                DESC.pack_into(self.view, table, GPA + table, 16, 0, F_INDIRECT)
            self.write(GPA + table, 16, F_INDIRECT)
        elif kind == "out_of_region":
            self.write(0x10 << 30, BUF, F_WRITE)
        elif kind == "other_region":
            self.write(GPA2 + 2048 * (i % 32), BUF, F_WRITE)
        elif kind == "huge_len":
            self.write(self.buf(i), 0xFFFFFFFF, F_WRITE)
        elif kind == "crosses_end":
            self.write(GPA + SIZE - 16, BUF, F_WRITE)
        elif kind == "past_end_by_one":  # a buffer for a ping that ends one byte past guest memory
            self.write(GPA + SIZE - HDR - 98 + 1, HDR + 98, F_WRITE)
        elif kind == "at_end":           # ... and one that ends at its last byte
            self.write(GPA + SIZE - HDR - 98, HDR + 98, F_WRITE)
        elif kind == "empty":
            self.write(self.buf(i), 0, F_WRITE)
        elif kind == "id_out_of_range":
            self.next_id += 1
            self.write(self.buf(i), BUF, F_WRITE, buf_id=self.num + 3)
        elif kind == "id_twice":         # the id of the buffer before (§2.8: ids are the driver's to keep apart)
            self.write(self.buf(i), BUF, F_WRITE, buf_id=(i - 1) % self.num)
        elif kind == "not_available":    # written for the other lap: the driver has not made it available
            self.write(self.buf(i), BUF, F_WRITE, avail=False)
        else:
            raise ValueError(kind)

    # -- the device: DeviceFill ----------------------------------------------------

    @property
    def rx(self):
        return self.ring

    def state(self) -> dict:
        q = self.ring
        return {
            "positions": (q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap), "avail_seen": q.avail_seen,
            "ring": bytes(self.view[DESC_OFF:DESC_OFF + 16 * self.num]),
            "events": bytes(self.view[AVAIL_OFF:AVAIL_OFF + 4]) + bytes(self.view[USED_OFF:USED_OFF + 4]),
            "memory": bytes(self.view[BUF_OFF:]), "memory2": bytes(self.view2),
            "inflight": list(q._inflight), "held": q._held, "id_count": dict(q._id_count),
            "unpublished": q.has_unpublished(), "stats": dict(q.stats), "errors": q.errors,
            "findings": q.describe_findings(), "broken": q.broken, "seen_ids": bytes(q._seen),
        }

    def outcome(self, returned) -> dict:
        d = self.dev
        return {**self.state(), "returned": returned, "counters": dict(d.counters), "taps": self.seen,
                "pending": [(bytes(f.data), f.csum_start, f.csum_offset, f.gso_size, f.csum_valid)
                            for f in d.rx_pending],
                "rx_waits": d.rx_waits, "stalled": dict(d._rx_stalled), "rx_more": d._rx_more}

    def close(self) -> None:
        os.close(self.call)
        super().close()


RUNS: list[int] = []      # frames written by every put_frames() call the rigs' rings made
OFFERED: list[tuple[int, int]] = []   # (frames offered, descriptors available) of each call


class CountingPackedRing(PackedRing):
    def put_frames(self, blob, lens, budget, min_run=1):
        OFFERED.append((len(lens), self.pending()))
        n = super().put_frames(blob, lens, budget, min_run)
        RUNS.append(n)
        return n


def warm(r: PackedRxRig) -> None:
    """pop() one buffer and return it: the walk caches the region the run works in."""
    (h,) = r.post()
    c = r.ring.pop()
    assert c is not None and c.head == h
    r.ring.push(c.head, 0)
    r.ring.publish()


# -- PackedRing.put_frames against pop_fast + the write + push ----------------------

_ODD = ["small", "exact", "one_short", "readonly", "chain", "indirect", "other_region", "empty", "id_out_of_range",
        "id_twice", "not_available"]
_ODD_LENS = [12, 109, 111, BUF, BUF + 1]


@settings(max_examples=250, deadline=None, derandomize=True)
@given(kinds=st.lists(st.sampled_from(["good"] * 12 + _ODD), min_size=1, max_size=12)
       | st.tuples(st.integers(0, 11), st.sampled_from(_ODD)).map(     # good buffers but one
           lambda t: ["good"] * t[0] + [t[1]] + ["good"] * (11 - t[0])),
       lens=st.lists(st.sampled_from([110] * 8 + _ODD_LENS), min_size=1, max_size=14)
       | st.tuples(st.integers(0, 11), st.sampled_from(_ODD_LENS)).map(     # pings but one
           lambda t: [110] * t[0] + [t[1]] + [110] * (11 - t[0])),
       budget=st.sampled_from([100, 100, 5, 3, 1, 0]), pos=st.sampled_from([0, 9, 13, 15]),
       wrap=st.booleans(), inflight=st.sampled_from([0, 0, 0, 1, 3]), min_run=st.sampled_from([1, 1, 1, 4, 13]))
def test_put_frames_writes_what_pop_fast_and_push_write(kinds, lens, budget, pos, wrap, inflight, min_run):
    """One call == _rx_one's fast path per frame (pop_fast, the buffer holds
    the record, the record at its start, push), up to the first buffer that
    path would give back, then publish(): the same ring and memory,
    positions and wrap counters, chains in flight, stats, budget and the
    publish's answer; the ring's end included. With chains in flight (taken
    before, not pushed) the run does not start at all."""
    a, b = PackedRxRig(16, pos=pos, wrap=wrap), PackedRxRig(16, pos=pos, wrap=wrap)
    try:
        for r in (a, b):
            warm(r)
            kept = [r.ring.pop() for _ in r.post(inflight)]    # in flight: taken, not pushed
            assert all(c is not None for c in kept)
            for kind in kinds:
                r.offer(kind)
        blob = bytes((i * 7 + 3) & 0xFF for i in range(sum(lens)))
        ba, bb = Budget(budget), Budget(budget)
        n = a.ring.put_frames(blob, lens, ba, min_run)
        # The per-frame path, with the run's two rules of its own: nothing in
        # flight, and an id taken once stops it (pop_fast takes it again once
        # it is pushed; the device's _rx_one does, after the run).
        taken: list = []
        bpos = 0
        for k in lens if not inflight and b.ring.pending() >= min_run else ():
            c = b.ring.pop_fast(bb)
            if c is None:
                break
            if not c.writable or c.write_len < k or c.head in taken:
                b.ring.unpop()
                bb.left += 1
                break
            c.writable[0][:k] = blob[bpos:bpos + k]
            b.ring.push(c.head, k)
            bpos += k
            taken.append(c.head)
        assert n == len(taken)
        assert (a.ring.publish(), ba.left) == (b.ring.publish(), bb.left)
        assert a.state() == b.state()
        assert bytes(a.view) == bytes(b.view)
        RING_RUNS.append((n, a.ring.last_avail_idx < pos or a.ring.avail_wrap != wrap))
    finally:
        a.close()
        b.close()


RING_RUNS: list[tuple[int, bool]] = []


def test_the_ring_runs_were_long_and_crossed_the_ring_end():
    if RING_RUNS:
        assert max(n for n, _ in RING_RUNS) >= 10 and sum(1 for n, _ in RING_RUNS if n > 2) > 20
        assert sum(1 for n, crossed in RING_RUNS if crossed and n > 2) > 5


def test_put_frames_stops_at_the_budget_the_free_slots_and_inside_a_mark():
    r = PackedRxRig(16)
    try:
        warm(r)
        r.post(10)
        q = r.ring
        b = Budget(3)
        assert q.put_frames(bytes(110 * 6), [110] * 6, b) == 3 and b.left == 0
        assert q.put_frames(bytes(110 * 3), [110] * 3, b) == 0
        assert q.put_frames(bytes(110 * 3), [110] * 3, Budget(10), min_run=8) == 0     # 7 ahead
        m = q.mark()                                                                 # a tentative take open
        assert q.put_frames(bytes(110 * 3), [110] * 3, Budget(10)) == 0
        q.rollback(m)
        assert q.put_frames(bytes(110 * 7), [110] * 7, Budget(10), min_run=7) == 7
        assert q.has_unpublished() and q.publish()
        assert not q.has_unpublished() and not q.publish()
        assert q.stats["chains"] == 11 and q.errors == {}
    finally:
        r.close()


def test_used_descriptors_of_a_run_are_visible_at_once_and_publish_decides_the_interrupt():
    """The run writes its used descriptors itself (first flags last);
    publish() then writes nothing more and answers per the driver's event
    suppression (§2.8.10): ENABLE, DISABLE, and with EVENT_IDX a position
    inside or past the run."""
    for event, wanted in (("enable", True), ("disable", False), ("desc_inside", True), ("desc_past", False)):
        r = PackedRxRig(16, event_idx=event.startswith("desc"))
        try:
            warm(r)
            ids = r.post(5)
            q = r.ring
            if event == "disable":
                struct.pack_into("<HH", r.view, AVAIL_OFF, 0, 1)
            elif event.startswith("desc"):
                struct.pack_into("<HH", r.view, AVAIL_OFF, (3 if event == "desc_inside" else 9) | 1 << 15, 2)
            assert q.put_frames(bytes(110 * 5), [110] * 5, Budget(10)) == 5
            ring = bytes(r.view[DESC_OFF:DESC_OFF + 16 * 16])
            assert [DESC.unpack_from(ring, 16 * p)[1:] for p in range(1, 6)] == \
                [(110, i, F_WRITE | AV | US) for i in ids]
            assert q.publish() is wanted, event
            assert bytes(r.view[DESC_OFF:DESC_OFF + 16 * 16]) == ring
        finally:
            r.close()


# -- the device: a run per call == frame by frame -------------------------------

def both(build, **kw) -> dict:
    """test_put_frames.both_alike with packed rigs."""
    return both_alike(PackedRxRig, build, **kw)


def _used(out, first: int, n: int, num: int = 16) -> list:
    return [DESC.unpack_from(out["ring"], 16 * ((first + i) % num))[1:] for i in range(n)]


@pytest.mark.usefixtures("rx_run_min")
def test_a_burst_of_pings_goes_into_one_buffer_each():
    """The common case: every frame whole in the next buffer, header num_buffers 1."""
    RUNS.clear()

    def build(r):
        r.post(12)
        pings(r, 0)
        r.fill()                          # the first frame's walk caches the region
        pings(r, *range(1, 10))
    out = both(build)
    assert out["counters"]["rx_frames"] == 10 and out["pending"] == [] and out["errors"] == {}
    assert _used(out, 0, 10) == [(HDR + 98, i, F_WRITE | AV | US) for i in range(10)]
    mem = out["memory"]
    for h in range(10):
        o = 0x4000 * h
        assert mem[o:o + HDR] == struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)
        assert mem[o + HDR:o + HDR + 98] == ping(seq=h)
    assert [n for n in RUNS if n] == [9]    # after the first frame, one run
    assert out["stats"]["calls"] == 2


BAD_KINDS = ["small", "exact", "one_short", "below_header", "readonly", "chain", "indirect", "nested_indirect",
             "out_of_region", "other_region", "huge_len", "crosses_end", "past_end_by_one", "at_end", "empty",
             "id_out_of_range", "id_twice", "not_available"]


@pytest.mark.parametrize("bad", BAD_KINDS)
@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.usefixtures("rx_run_min")
def test_a_buffer_the_run_leaves_goes_through_rx_one_as_before(bad, checks):
    """Good buffers, one BAD buffer, good buffers, frames for all of them:
    batched and frame by frame alike."""
    def build(r):
        r.post(4)
        r.offer(bad)
        r.post(7)
        pings(r, *range(11))
    out = both(build, checks=checks)
    assert out["counters"].get("rx_frames", 0) >= 4


@pytest.mark.parametrize("kind", ["valid", "partial", "bad_partial", "gso", "small_gso", "largest", "over", "big",
                                  "tiny", "bytearray", "memoryview"])
@pytest.mark.parametrize("features", [RX_FEATURES, 1 << F.VERSION_1 | 1 << F.MRG_RXBUF],
                         ids=["offloads", "no_offloads"])
@pytest.mark.usefixtures("rx_run_min")
def test_a_frame_the_run_leaves_goes_through_rx_one_as_before(kind, features):
    def build(r):
        r.post(16)
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
        r.post(14)
        pings(r, *range(12))
    out = both(build, rounds=20)
    assert out["counters"]["rx_frames"] == 12 and out["returned"][0] is (budget < 12)


@pytest.mark.parametrize("pos,wrap", [(10, True), (15, True), (15, False), (0, False), (3, False)])
@pytest.mark.usefixtures("rx_run_min")
def test_runs_across_the_ring_end(pos, wrap):
    """14 buffers from ring position POS: the run crosses the end, both wrap
    counters flip, the used descriptors after it are flagged for the new lap."""
    def build(r):
        r.post(14)
        pings(r, *range(14))
    out = both(build, pos=pos, wrap=wrap)
    end = pos + 14
    assert out["positions"] == (end % 16, wrap ^ (end >= 16), end % 16, wrap ^ (end >= 16))
    assert out["counters"]["rx_frames"] == 14


@pytest.mark.parametrize("event_idx", [True, False])
@pytest.mark.usefixtures("rx_run_min")
def test_fewer_buffers_than_frames_the_rest_wait_and_go_on_when_more_are_posted(event_idx):
    """And the device offers a run no more frames than there are buffers
    (the descriptor scan bounds the blob it builds)."""
    def build(r):
        r.post(5)
        pings(r, *range(12))

    def then(r):
        r.post(11)
    OFFERED.clear()
    out = both(build, then=then, event_idx=event_idx)
    assert out["counters"]["rx_frames"] == 12 and out["rx_waits"] == 1
    assert OFFERED and all(frames <= avail for frames, avail in OFFERED), OFFERED


@pytest.mark.parametrize("rewrite", [False, True])
@pytest.mark.usefixtures("rx_run_min")
def test_chains_in_flight_keep_the_fill_frame_by_frame(rewrite):
    """Chains taken and not returned (the device's own RX fill never leaves
    any): the run does not start, as its used descriptors would land on
    those chains' slots; with REWRITE the driver has made one of them
    available again (§2.8.16 forbids it), which the per-frame path takes.
    Both devices alike."""
    def build(r):
        warm(r)
        r.kept = [r.ring.pop() for _ in r.post(3)]
        r.post(5)
        if rewrite:                       # the writer is at position 1 of the next lap: over the first chain in flight
            assert (r.next_avail, r.avail_wrap) == (1, False)
            r.write(r.buf(20), BUF, F_WRITE, buf_id=6)
        pings(r, *range(8))
    RUNS.clear()
    out = both(build, num=8)
    assert out["counters"]["rx_frames"] == (5 if not rewrite else 6) and not any(RUNS)
    assert out["inflight"] == [(1, 1), (2, 1), (3, 1)]


@pytest.mark.usefixtures("rx_run_min")
def test_a_ring_of_all_buffers_posted_fills_once_round():
    """Every slot posted (16 buffers, 20 frames): the run takes the whole
    ring, no further (its own used descriptors are not available)."""
    def build(r):
        r.post(16)
        pings(r, *range(20))
    out = both(build, pos=7)
    assert out["counters"]["rx_frames"] == 16 and len(out["pending"]) == 4


@pytest.mark.parametrize("bad", ["below_header", "readonly", "nested_indirect", "out_of_region"])
@pytest.mark.usefixtures("rx_run_min")
def test_strict_a_violation_after_a_run_breaks_the_ring_alike(bad):
    def build(r):
        r.post(5)
        r.offer(bad)
        r.post(3)
        pings(r, *range(10))
    out = both(build, strict=True)
    assert out["broken"] is not None or out["errors"]


@pytest.mark.parametrize("bad", ["chain", "other_region", "small"])
def test_a_ring_of_buffers_the_run_does_not_take_costs_one_run_per_fill(bad):
    def build(r):
        r.post(1)                         # a good one first: the walk caches the region
        for _ in range(12):
            r.offer(bad)
        pings(r, *range(12))
    RUNS.clear()
    out = both(build, num=32)
    assert len(RUNS) <= 2 and out["counters"]["rx_frames"] >= 6, RUNS


@pytest.mark.usefixtures("rx_run_min")
def test_a_ring_without_mrg_rxbuf_goes_frame_by_frame():
    RUNS.clear()

    def build(r):
        r.post(12)
        pings(r, *range(10))
    out = both(build, features=1 << F.VERSION_1)
    assert out["counters"]["rx_frames"] == 10 and RUNS == []


# A random packed RX ring: each buffer one of these kinds, random frames.
RANDOM_KINDS = ["good"] * 40 + BAD_KINDS


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kinds=st.lists(st.sampled_from(RANDOM_KINDS), min_size=1, max_size=24)
       | st.tuples(st.integers(0, 20), st.sampled_from(RANDOM_KINDS)).map(      # good ones but one
           lambda t: ["good"] * t[0] + [t[1]] + ["good"] * (20 - t[0])),
       more=st.integers(0, 8),
       frames=st.lists(st.sampled_from(FRAME_KINDS + ["ping"] * 20), min_size=1, max_size=24)
       | st.tuples(st.integers(0, 20), st.sampled_from(FRAME_KINDS)).map(   # pings but one
           lambda t: ["ping"] * t[0] + [t[1]] + ["ping"] * (20 - t[0])),
       pos=st.sampled_from([0, 20, 31, 9]), wrap=st.booleans(), budget=st.sampled_from([None, None, 1, 3, 8]),
       checks=st.booleans(), strict=st.sampled_from([False, False, True]), event_idx=st.booleans(),
       features=st.sampled_from([RX_FEATURES, RX_FEATURES, 1 << F.VERSION_1 | 1 << F.MRG_RXBUF]),
       warm_first=st.sampled_from([True, True, False]))
@pytest.mark.usefixtures("rx_run_min")
def test_random_rings_end_alike(kinds, more, frames, pos, wrap, budget, checks, strict, event_idx, features,
                                warm_first):
    def build(r):
        if warm_first:                    # a frame first, its buffer walked: the region is cached
            r.post(1)
            r.wait(("ping", 99))
            r.fill()
        for kind in kinds:
            r.offer(kind)
        r.wait(*((k, i) for i, k in enumerate(frames)))

    def then(r):                          # the driver posts more (good ones) and the device goes on
        r.post(more)
    with pytest.MonkeyPatch.context() as mp:
        if budget is not None:
            mp.setattr(device, "RX_BUDGET", budget)
        both(build, then=then, checks=checks, strict=strict, pos=pos, wrap=wrap, features=features,
             event_idx=event_idx, num=32)


def test_the_random_rings_were_filled_in_runs():
    """The property above went through the run, not only through _rx_one (runs after it)."""
    if RUNS:
        assert max(RUNS) >= 12 and sum(1 for n in RUNS if n > 1) > 100


# -- through the real server: an echo burst reaches the guest alike ---------------

async def test_an_echo_burst_through_the_server_reaches_the_guest_alike(tmp_path, nursery):
    """48 pings over packed rings, one then two bursts: the guest reads the
    same headers and replies, and the device counts the same, with the run
    (which took them) and without."""
    runs_b: list = []
    runs_s: list = []
    batched = await echo_burst(tmp_path, nursery, True, runs_b, packed=True)
    single = await echo_burst(tmp_path, nursery, False, runs_s, packed=True)
    assert batched == single
    got = batched[0]
    assert len(got) == 48 and all(h == struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1) for h, _ in got)
    assert sum(runs_b) >= 40 and runs_s == []
