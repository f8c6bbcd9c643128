"""Hot paths in C through cffi, with a pure-Python fallback: chosen here, once.

What is native (stack/native/native.c, built by stack/native/build.py at
install time through setup.py's `cffi_modules`):

    ones_sum(data, start=0) -> int        RFC 1071 sum, folded (checksum.py)
    l4_sum(buf, off, n, src, dst, proto)  the same over buf[off:off+n] plus the
                                          IPv4 pseudo-header: UDP/TCP checksums
    copy(dst_views, src_views) -> int     scatter/gather copy, bytes copied
                                          (C only for long view lists: see copy)
    segment(data, ihl, doff, tot, gso, count, partial) -> list of frames
                                          the software-TSO loop (segment.py)
    EchoReplier(gw_mac).reply(frame, end, ident) -> bytearray | None
                                          the reply to a checked echo request,
                                          None if its ICMP checksum is wrong
    scatter_region(region, offs, lens, hdr, data) -> int
                                          hdr + data into region[off:off+len]
                                          pieces (mergeable RX buffers)
    split_take_writable(avail, desc, held, ...) -> (heads, offs, lens, room)
                                          the split ring's batched take of RX
                                          buffers (vhostnet/virtio/split.py)
    split_put_frame(...) -> heads         that run, the copy and the used
                                          elements of one frame in one call
    split_put_frames(..., blob, lens) -> heads
                                          a run of small frames, each whole
                                          into the next buffer, one call
    SplitPins(avail, desc, held, used, region).put_frame(...) -> heads
    SplitPins(...).put_frames(...) -> heads
                                          the same two with the ring's views
                                          pinned once, not per call
    split_take_readable(avail, desc, held, ...) -> (heads, offs, lens)
                                          the split ring's batched take of TX
                                          chains (one readable buffer each)
    split_put_used(used, num, idx, heads, len) -> idx
                                          many used elements in one call
    packed_avail_run(desc, num, pos, wrap, limit) -> int
                                          available descriptors ahead in a
                                          packed ring (vhostnet/virtio/packed.py)
    packed_put_frames(desc, seen, ..., blob, lens) -> ids
    PackedPins(desc, seen, region).put_frames(...) -> ids
                                          the packed ring's run of small
                                          frames, each whole into the next
                                          buffer, used descriptors included

Selection: the compiled module `stack.native._native` is used when it
imports and VHOSTNET_NATIVE is not "0"; otherwise every name above comes
from stack/native/fallback.py, which computes the same results in Python.
`NATIVE` (bool), `IMPLEMENTATION` ("cffi" or "python") and `REASON` (why
the fallback, or "") say which was chosen; `vhostnet stats --json` shows
them under "native", and the choice is logged at debug level.

Calling convention: cffi passes a `bytes` object straight to a `const char *`
parameter; any other buffer (bytearray, memoryview of guest memory) goes
through ffi.from_buffer, which pins it for the duration of the call. C never
keeps a pointer after it returns. The one exception is SplitPins: it pins a
ring's views once (about 0.3 us a from_buffer, six of them per frame
before) and keeps the pins until release(); it pins its own slices of
the views, so a view released early (detach) still releases, and the mapping
stays valid under the pins until they go. PackedPins does the same for a
packed ring's descriptor ring, its scratch byte per buffer id and the region.
"""
from __future__ import annotations

import array
import logging
import os

from . import fallback

__all__ = ["NATIVE", "IMPLEMENTATION", "REASON", "ones_sum", "l4_sum", "copy", "segment", "EchoReplier",
           "scatter_region", "split_take_writable", "split_put_frame", "split_put_frames", "SplitPins",
           "split_take_readable", "split_put_used", "packed_avail_run", "packed_put_frames", "PackedPins",
           "describe"]

log = logging.getLogger("stack.native")

# Environment switch: VHOSTNET_NATIVE=0 forces the Python fallback (to
# compare the two in one benchmark run, or to rule the C out when debugging).
ENV_SWITCH = "VHOSTNET_NATIVE"

# Views (sources + destinations) from which native.copy goes to C; below it
# the Python slice loop is faster (see copy()).
COPY_C_MIN_VIEWS = 64

# Every C routine stack/native/build.py declares.
_ROUTINES = ("vn_ones_sum", "vn_l4_sum", "vn_copy", "vn_segment_tcp", "vn_icmp_echo_reply", "vn_scatter_region",
             "vn_split_take_writable", "vn_split_put_frame", "vn_split_put_frames", "vn_split_take_readable",
             "vn_split_put_used", "vn_packed_avail_run", "vn_packed_put_frames")

_lib = _ffi = None
if os.environ.get(ENV_SWITCH, "1") == "0":
    REASON = f"{ENV_SWITCH}=0"
else:
    try:
        from ._native import ffi as _ffi, lib as _lib
        REASON = ""
    except ImportError as e:  # not built: a plain checkout, or no compiler at install
        REASON = f"extension not built ({e})"
    else:
        # An extension built from an older native.c lacks the newer routines:
        # all of them from Python then, with the reason shown, rather than an
        # AttributeError on import or a mix of the two.
        _missing = [name for name in _ROUTINES if not hasattr(_lib, name)]
        if _missing:
            _lib = _ffi = None
            REASON = (f"extension out of date (no {', '.join(_missing)}): rebuild it "
                      "(python stack/native/build.py, or pip install -e .)")

NATIVE = _lib is not None
IMPLEMENTATION = "cffi" if NATIVE else "python"


def describe() -> dict:
    """JSON-able: which implementation the hot paths use, and why."""
    return {"native": NATIVE, "implementation": IMPLEMENTATION, "reason": REASON}


if NATIVE:
    _from_buffer = _ffi.from_buffer
    _new = _ffi.new
    _sum = _lib.vn_ones_sum
    _copy = _lib.vn_copy
    _l4 = _lib.vn_l4_sum
    _OUT_OF_RANGE = 0x10000   # vn_l4_sum's refusal (native.c VN_OUT_OF_RANGE)
    _seg = _lib.vn_segment_tcp

    def ones_sum(data, start: int = 0) -> int:
        """Ones'-complement sum of data, folded to 16 bits (see fallback.ones_sum)."""
        if type(data) is bytes:
            return _sum(data, len(data), start)
        return _sum(_from_buffer(data), len(data), start)

    def l4_sum(buf, off: int, n: int, src: bytes, dst: bytes, proto: int) -> int:
        """Pseudo-header + buf[off:off+n], folded (see fallback.l4_sum). One C
        call and no slice copy: bytes go straight to C, other buffers
        through ffi.from_buffer."""
        if off < 0 or n < 0:
            raise ValueError(f"range {off}+{n} outside a {len(buf)}-byte buffer")
        if type(src) is not bytes or type(dst) is not bytes or len(src) != 4 or len(dst) != 4:
            src, dst = bytes(src), bytes(dst)
            if len(src) != 4 or len(dst) != 4:
                raise ValueError("IPv4 addresses are 4 bytes")
        r = _l4(buf if type(buf) is bytes else _from_buffer(buf), len(buf), off, n, src, dst, proto)
        if r == _OUT_OF_RANGE:
            raise ValueError(f"range {off}+{n} outside a {len(buf)}-byte buffer")
        return r

    def copy(dst, src) -> int:
        """Copy concat(src) into concat(dst) up to the shorter; returns bytes copied.

        C only for long view lists: each view costs an ffi.from_buffer and
        an array slot (about 0.5 us), while the Python loop's slice
        assignment is itself a memcpy in C; scripts/bench_native.py measured
        the two level at about 64 views (64 KiB in 1 KiB buffers) and the
        Python loop 1.2-4x faster below that."""
        nd, ns = len(dst), len(src)
        if nd + ns < COPY_C_MIN_VIEWS:
            return fallback.copy(dst, src)
        dp = _new("char *[]", [_from_buffer(d, require_writable=True) for d in dst])
        dl = _new("size_t[]", [len(d) for d in dst])
        sp = _new("char *[]", [_from_buffer(s) for s in src])
        sl = _new("size_t[]", [len(s) for s in src])
        return _copy(dp, dl, nd, sp, sl, ns)

    def segment(data, ihl: int, doff: int, tot: int, gso: int, count: int,
                partial: bool) -> list:
        """The software-TSO loop in C: all segments go into one new buffer,
        returned as writable memoryview slices of it, one per segment."""
        pay = 14 + ihl + doff
        total = count * pay + (tot + 14 - pay)
        out = bytearray(total)
        lens = _new("uint32_t[]", count)
        src = data if type(data) is bytes else _from_buffer(data)
        if _seg(src, len(data), ihl, doff, tot, gso, count, 1 if partial else 0,
                _from_buffer(out), total, lens) != total:
            raise ValueError("vn_segment_tcp refused validated arguments")
        mv = memoryview(out)
        frames = []
        o = 0
        for n in lens:
            frames.append(mv[o:o + n])
            o += n
        return frames

    # -- ICMP echo reply (issue 12, item 5; native.c's last section) --------
    _echo = _lib.vn_icmp_echo_reply
    _ECHO_BAD_CHECKSUM = 1     # native.c VN_ECHO_BAD_CHECKSUM
    _MIN_FRAME = 60            # IEEE 802.3 minimum frame without the FCS

    class EchoReplier:
        """Replies to ICMP echo requests in one C call each (see
        fallback.icmp_echo_reply for what is checked and written).

        C writes into this object's own scratch buffer, pinned once, and the
        reply is copied out of it: an ffi.from_buffer of a fresh bytearray
        per reply cost more than the copy. One per Stack (a Stack is never
        shared between threads, and the C call releases the GIL)."""
        __slots__ = ("gw_mac", "_buf", "_pinned")

        def __init__(self, gw_mac: bytes):
            if len(gw_mac) != 6:
                raise ValueError("a MAC address is 6 bytes")
            self.gw_mac = bytes(gw_mac)
            self._buf = bytearray(fallback.ECHO_MAX_FRAME)
            self._pinned = _from_buffer(self._buf, require_writable=True)

        def reply(self, frame, end: int, ident: int):
            """The reply to the echo request frame[:end], padded to the
            Ethernet minimum, as a new bytearray; None if the request's ICMP
            checksum is wrong. ValueError if the lengths do not add up."""
            n = end if end > _MIN_FRAME else _MIN_FRAME
            if n > fallback.ECHO_MAX_FRAME:
                n = fallback.ECHO_MAX_FRAME    # and C refuses: out_len < end
            rc = _echo(frame if type(frame) is bytes else _from_buffer(frame), len(frame), end,
                       self._pinned, n, self.gw_mac, 6, ident)
            if rc:
                if rc == _ECHO_BAD_CHECKSUM:
                    return None
                raise ValueError(f"echo request of {end} bytes in a {len(frame)}-byte frame")
            return self._buf[:n]
    # ---- RX scatter into one guest region (native.c vn_scatter_region) ----
    _scatter = _lib.vn_scatter_region
    _SCATTER_OUT_OF_RANGE = -1   # native.c VN_SCATTER_OUT_OF_RANGE

    def scatter_region(region, offs, lens, hdr, data) -> int:
        """hdr + data into region[offs[i]:offs[i] + lens[i]] in order (see
        fallback.scatter_region): one C call for all of a frame's RX
        buffers; a pair outside the region raises ValueError, nothing written."""
        n = len(offs)
        if len(lens) != n:
            raise ValueError(f"{n} offsets, {len(lens)} lengths")
        try:
            # size_t arrays: cffi refuses a negative entry (OverflowError)
            r = _scatter(_from_buffer(region, require_writable=True), len(region), _new("size_t[]", offs),
                         _new("size_t[]", lens), n, hdr if type(hdr) is bytes else _from_buffer(hdr),
                         len(hdr), data if type(data) is bytes else _from_buffer(data), len(data))
        except OverflowError:
            raise ValueError("negative offset or length") from None
        if r == _SCATTER_OUT_OF_RANGE:
            raise ValueError(f"a buffer outside the {len(region)}-byte region")
        return r

    # ---- RX: the split ring's batched take (native.c vn_split_take_writable) ----
    _take = _lib.vn_split_take_writable
    _U64_ZERO = array.array("Q", [0])

    def split_take_writable(avail_h, desc, held, checks: bool, num: int, last: int, ahead: int,
                            r_gpa: int, r_end: int, need: int, min_len: int, max_take: int):
        """SplitRing.take_writable's loop in C (see fallback.split_take_writable)."""
        m = min(ahead, max_take)
        if m <= 0:
            return [], [], [], 0
        # The results go to an array.array, not an ffi.new array: tolist()
        # makes the ints in C, ffi.unpack took 0.8 us per 17 of them.
        out = _U64_ZERO * (3 * m + 1)            # heads, offsets, lengths, room
        p = _from_buffer("uint64_t[]", out)
        n = _take(_from_buffer("uint16_t[]", avail_h), len(avail_h), _from_buffer(desc), len(desc),
                  _from_buffer(held, require_writable=True), len(held), 1 if checks else 0, num, last,
                  ahead, r_gpa, r_end, need, min_len, m, p, p + m, p + 2 * m, p + 3 * m)
        if n < 0:
            raise ValueError("ring sizes do not cover the queue size")
        return out[:n].tolist(), out[m:m + n].tolist(), out[2 * m:2 * m + n].tolist(), out[3 * m]

    # ---- RX: a whole frame into the split ring's next buffers (native.c vn_split_put_frame) ----
    _put = _lib.vn_split_put_frame
    PUT_MAX_BUFFERS = fallback.PUT_MAX_BUFFERS

    def split_put_frame(avail_h, desc, held, checks: bool, used_i, num: int, last: int, ahead: int,
                        used_idx: int, region, r_gpa: int, min_len: int, max_take: int, hdr, data,
                        count_off: int) -> list:
        """The take, the copy and the used elements of one frame in one C call
        (see fallback.split_put_frame). Returns the heads used, [] if the run
        does not hold the frame."""
        m = min(ahead, max_take, PUT_MAX_BUFFERS)
        if m <= 0:
            return []
        out = _U64_ZERO * m
        n = _put(_from_buffer("uint16_t[]", avail_h), len(avail_h), _from_buffer(desc), len(desc),
                 _from_buffer(held, require_writable=True), len(held), 1 if checks else 0,
                 _from_buffer("uint32_t[]", used_i, require_writable=True), len(used_i), num, last, ahead,
                 used_idx, _from_buffer(region, require_writable=True), r_gpa, len(region), min_len, m,
                 hdr if type(hdr) is bytes else _from_buffer(hdr), len(hdr),
                 data if type(data) is bytes else _from_buffer(data), len(data), count_off,
                 _from_buffer("uint64_t[]", out))
        if n < 0:
            raise ValueError("used ring shorter than the queue, or the count outside the first buffer")
        return out[:n].tolist() if n else []

    # ---- RX: a run of small frames, one per buffer (native.c vn_split_put_frames) ----
    _put_n = _lib.vn_split_put_frames

    def _lens_array(lens):
        """LENS as the uint32 array C reads (an array('I') as it is: the device builds one)."""
        if type(lens) is array.array and lens.typecode == "I":
            return lens
        try:
            return array.array("I", lens)
        except OverflowError:      # negative, or past 32 bits: no frame is that long
            raise ValueError("a frame length outside 0..2**32-1") from None

    def split_put_frames(avail_h, desc, held, checks: bool, used_i, num: int, last: int, ahead: int,
                         used_idx: int, region, r_gpa: int, max_take: int, blob, lens) -> list:
        """The run of frames in one C call (see fallback.split_put_frames). Returns the heads used."""
        la = _lens_array(lens)
        m = min(ahead, max_take, len(la), PUT_MAX_BUFFERS)
        out = _U64_ZERO * max(m, 1)
        n = _put_n(_from_buffer("uint16_t[]", avail_h), len(avail_h), _from_buffer(desc), len(desc),
                   _from_buffer(held, require_writable=True), len(held), 1 if checks else 0,
                   _from_buffer("uint32_t[]", used_i, require_writable=True), len(used_i), num, last, ahead,
                   used_idx, _from_buffer(region, require_writable=True), r_gpa, len(region), max(m, 0),
                   blob if type(blob) is bytes else _from_buffer(blob), len(blob),
                   _from_buffer("uint32_t[]", la), len(la), _from_buffer("uint64_t[]", out))
        if n < 0:
            raise ValueError("ring sizes do not cover the queue size, or the lengths overrun the blob")
        return out[:n].tolist() if n else []

    _release = _ffi.release

    class SplitPins:
        """split_put_frame with the ring's views pinned once (see
        fallback.SplitPins for the lifetime rules). Its own slices of the
        views are pinned, never the views themselves, so releasing a view
        (SplitRing.detach, GuestMemory.close) is never refused because of
        a pin, and the memory under a pin stays mapped until release()."""
        __slots__ = ("_views", "_held", "_pins", "_lens", "_out", "_outp")

        def __init__(self, avail_h, desc, held, used_i, region):
            va, vd, vu, vr = avail_h[:], desc[:], used_i[:], region[:]
            self._views = (va, vd, vu, vr)
            self._held = held
            self._out = _U64_ZERO * PUT_MAX_BUFFERS
            self._outp = _from_buffer("uint64_t[]", self._out)
            self._pins = (_from_buffer("uint16_t[]", va), _from_buffer(vd),
                          _from_buffer(held, require_writable=True),
                          _from_buffer("uint32_t[]", vu, require_writable=True),
                          _from_buffer(vr, require_writable=True))
            self._lens = (len(va), len(vd), len(held), len(vu), len(vr))

        def put_frame(self, checks: bool, num: int, last: int, ahead: int, used_idx: int, r_gpa: int,
                      min_len: int, max_take: int, hdr, data, count_off: int) -> list:
            """split_put_frame over the pinned views (same arguments otherwise)."""
            pins = self._pins
            if pins is None:
                raise ValueError("SplitPins used after release()")
            m = min(ahead, max_take, PUT_MAX_BUFFERS)
            if m <= 0:
                return []
            pa, pd, ph, pu, pr = pins
            la, ld, lh, lu, lr = self._lens
            n = _put(pa, la, pd, ld, ph, lh, 1 if checks else 0, pu, lu, num, last, ahead, used_idx,
                     pr, r_gpa, lr, min_len, m, hdr if type(hdr) is bytes else _from_buffer(hdr), len(hdr),
                     data if type(data) is bytes else _from_buffer(data), len(data), count_off, self._outp)
            if n < 0:
                raise ValueError("used ring shorter than the queue, or the count outside the first buffer")
            return self._out[:n].tolist() if n else []

        def put_frames(self, checks: bool, num: int, last: int, ahead: int, used_idx: int, r_gpa: int,
                       max_take: int, blob, lens) -> list:
            """split_put_frames over the pinned views (same arguments otherwise)."""
            pins = self._pins
            if pins is None:
                raise ValueError("SplitPins used after release()")
            la = _lens_array(lens)
            m = min(ahead, max_take, len(la), PUT_MAX_BUFFERS)
            if m < 0:
                m = 0
            pa, pd, ph, pu, pr = pins
            la_, ld, lh, lu, lr = self._lens
            n = _put_n(pa, la_, pd, ld, ph, lh, 1 if checks else 0, pu, lu, num, last, ahead, used_idx,
                       pr, r_gpa, lr, m, blob if type(blob) is bytes else _from_buffer(blob), len(blob),
                       _from_buffer("uint32_t[]", la), len(la), self._outp)
            if n < 0:
                raise ValueError("ring sizes do not cover the queue size, or the lengths overrun the blob")
            return self._out[:n].tolist() if n else []

        def release(self) -> None:
            """Unpin (at once, not at garbage collection); put_frame raises after it."""
            if self._pins is None:
                return
            for p in self._pins:
                _release(p)
            _release(self._outp)
            for v in self._views:
                v.release()
            self._pins = self._views = self._held = self._outp = None

    # ---- TX: the split ring's batched take (native.c vn_split_take_readable) ----
    _take_r = _lib.vn_split_take_readable

    def split_take_readable(avail_h, desc, held, checks: bool, num: int, last: int, ahead: int,
                            r_gpa: int, r_end: int, max_take: int):
        """SplitRing.take_readable's loop in C (see fallback.split_take_readable)."""
        m = min(ahead, max_take)
        if m <= 0:
            return [], [], []
        out = _U64_ZERO * (3 * m)                # heads, offsets, lengths
        p = _from_buffer("uint64_t[]", out)
        n = _take_r(_from_buffer("uint16_t[]", avail_h), len(avail_h), _from_buffer(desc), len(desc),
                    _from_buffer(held, require_writable=True), len(held), 1 if checks else 0, num, last,
                    ahead, r_gpa, r_end, m, p, p + m, p + 2 * m)
        if n < 0:
            raise ValueError("ring sizes do not cover the queue size")
        if not n:
            return [], [], []
        return out[:n].tolist(), out[m:m + n].tolist(), out[2 * m:2 * m + n].tolist()

    # ---- many used elements in one call (native.c vn_split_put_used) ----
    _put_used = _lib.vn_split_put_used

    def split_put_used(used_i, num: int, used_idx: int, heads, length: int) -> int:
        """Used elements (heads[i], LENGTH) from USED_IDX on (see fallback.split_put_used)."""
        try:
            r = _put_used(_from_buffer("uint32_t[]", used_i, require_writable=True), len(used_i), num,
                          used_idx, _new("uint64_t[]", heads), len(heads), length)
        except OverflowError:       # a negative head: cffi refuses it for uint64_t
            r = -1
        if r < 0:
            raise ValueError("used ring shorter than the queue, a head out of range, or too many heads")
        return r

    # ---- RX: a run of small frames into a packed ring (native.c vn_packed_put_frames) ----
    _p_avail = _lib.vn_packed_avail_run
    _p_put = _lib.vn_packed_put_frames

    def packed_avail_run(desc, num: int, pos: int, wrap: bool, limit: int) -> int:
        """Available descriptors from POS on, at most LIMIT (see fallback.packed_avail_run)."""
        try:
            n = _p_avail(_from_buffer(desc), len(desc), num, pos, 1 if wrap else 0, max(limit, 0))
        except OverflowError:       # a negative position: cffi refuses it for uint32_t
            n = -1
        if n < 0:
            raise ValueError("the descriptor ring does not cover the queue size, or the position is outside it")
        return n

    def _packed_put(pd, ld, ps, ls, num, avail_pos, avail_wrap, used_pos, used_wrap, free, pr, r_gpa, lr,
                    max_take, blob, lens, outp, out) -> list:
        la = _lens_array(lens)
        try:
            n = _p_put(pd, ld, ps, ls, num, avail_pos, 1 if avail_wrap else 0, used_pos, 1 if used_wrap else 0,
                       free, pr, r_gpa, lr, max(min(max_take, PUT_MAX_BUFFERS), 0),
                       blob if type(blob) is bytes else _from_buffer(blob), len(blob),
                       _from_buffer("uint32_t[]", la), len(la), outp)
        except OverflowError:       # a negative position or count: cffi refuses it for uint32_t
            n = -1
        if n < 0:
            raise ValueError("ring sizes do not cover the queue size, a position is outside the ring, "
                             "or the lengths overrun the blob")
        return out[:n].tolist() if n else []

    def packed_put_frames(desc, seen, num: int, avail_pos: int, avail_wrap: bool, used_pos: int, used_wrap: bool,
                          free: int, region, r_gpa: int, max_take: int, blob, lens) -> list:
        """The packed ring's run of frames in one C call (see fallback.packed_put_frames). Returns the ids used."""
        out = _U64_ZERO * PUT_MAX_BUFFERS
        return _packed_put(_from_buffer(desc, require_writable=True), len(desc),
                           _from_buffer(seen, require_writable=True), len(seen), num, avail_pos, avail_wrap,
                           used_pos, used_wrap, free, _from_buffer(region, require_writable=True), r_gpa,
                           len(region), max_take, blob, lens, _from_buffer("uint64_t[]", out), out)

    class PackedPins:
        """packed_put_frames with the ring's views pinned once (see SplitPins
        for the lifetime rules: its own slices of the views are pinned, so
        releasing a view is never refused because of a pin)."""
        __slots__ = ("_views", "_pins", "_lens", "_out", "_outp")

        def __init__(self, desc, seen, region):
            vd, vr = desc[:], region[:]
            self._views = (vd, vr)
            self._out = _U64_ZERO * PUT_MAX_BUFFERS
            self._outp = _from_buffer("uint64_t[]", self._out)
            self._pins = (_from_buffer(vd, require_writable=True), _from_buffer(seen, require_writable=True),
                          _from_buffer(vr, require_writable=True), seen)
            self._lens = (len(vd), len(seen), len(vr))

        def put_frames(self, num: int, avail_pos: int, avail_wrap: bool, used_pos: int, used_wrap: bool,
                       free: int, r_gpa: int, max_take: int, blob, lens) -> list:
            """packed_put_frames over the pinned views (same arguments otherwise)."""
            pins = self._pins
            if pins is None:
                raise ValueError("PackedPins used after release()")
            ld, ls, lr = self._lens
            return _packed_put(pins[0], ld, pins[1], ls, num, avail_pos, avail_wrap, used_pos, used_wrap, free,
                               pins[2], r_gpa, lr, max_take, blob, lens, self._outp, self._out)

        def avail_run(self, num: int, pos: int, wrap: bool, limit: int) -> int:
            """packed_avail_run over the pinned descriptor ring."""
            pins = self._pins
            if pins is None:
                raise ValueError("PackedPins used after release()")
            try:
                n = _p_avail(pins[0], self._lens[0], num, pos, 1 if wrap else 0, max(limit, 0))
            except OverflowError:
                n = -1
            if n < 0:
                raise ValueError("the descriptor ring does not cover the queue size, or the position is outside it")
            return n

        def release(self) -> None:
            """Unpin (at once, not at garbage collection); put_frames raises after it."""
            if self._pins is None:
                return
            for p in self._pins[:3]:
                _release(p)
            _release(self._outp)
            for v in self._views:
                if isinstance(v, memoryview):
                    v.release()
            self._pins = self._views = self._outp = None
else:
    ones_sum = fallback.ones_sum
    l4_sum = fallback.l4_sum
    copy = fallback.copy
    segment = fallback.segment
    EchoReplier = fallback.EchoReplier
    scatter_region = fallback.scatter_region
    split_take_writable = fallback.split_take_writable
    split_put_frame = fallback.split_put_frame
    split_put_frames = fallback.split_put_frames
    SplitPins = fallback.SplitPins
    split_take_readable = fallback.split_take_readable
    split_put_used = fallback.split_put_used
    packed_avail_run = fallback.packed_avail_run
    packed_put_frames = fallback.packed_put_frames
    PackedPins = fallback.PackedPins

log.debug("hot paths: %s%s", IMPLEMENTATION, f" ({REASON})" if REASON else "")
