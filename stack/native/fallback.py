"""Pure-Python twins of the C routines in stack/native/native.c.

Used when the cffi extension was not built (a source checkout run through
PYTHONPATH, a machine without a C compiler) or when VHOSTNET_NATIVE=0 asks
for them. Each function has the same signature and result as its C
counterpart's wrapper in stack/native/__init__.py; tests/stack/test_native.py
checks that on random input (the split ring's loops: tests/device/
test_take_writable.py and test_take_readable.py).
"""
from __future__ import annotations

import struct

__all__ = ["ones_sum", "l4_sum", "copy", "segment", "icmp_echo_reply", "EchoReplier", "ECHO_MAX_FRAME",
           "scatter_region", "split_take_writable", "split_put_frame", "split_put_frames", "SplitPins",
           "split_take_readable", "split_put_used", "packed_avail_run", "packed_put_frames", "PackedPins"]

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
# TCP flags that only the last (FIN, PSH) or first (CWR) segment keeps,
# as Linux's tcp_gso_segment does. RFC 793 §3.1, RFC 3168 §6.1.
_FIN, _PSH, _CWR = 0x01, 0x08, 0x80
_ETH_HLEN = 14          # IEEE 802.3 header without a VLAN tag
_IP_SRC = 12            # RFC 791 §3.1: source and destination addresses at 12..20
_PROTO_TCP = 6          # RFC 790
_ONES = 0xFFFF          # 2**16 - 1: sums are taken modulo this (RFC 1071 §2)


def ones_sum(data, start: int = 0) -> int:
    """Ones'-complement sum of data (odd length padded with a zero byte), folded to 16 bits.

    The sum of 16-bit big-endian words equals the buffer read as one big
    integer modulo 0xFFFF, because 2**16 == 1 (mod 0xFFFF); int.from_bytes
    and the modulo both run in C. Returns 0..0xFFFF; 0 only when data and
    start are all zero. `start` is a partial sum to add in.
    """
    v = int.from_bytes(data, "big")
    if len(data) & 1:
        v <<= 8
    v += start
    if v == 0:
        return 0
    r = v % _ONES
    return r if r else _ONES


def l4_sum(buf, off: int, n: int, src: bytes, dst: bytes, proto: int) -> int:
    """Folded sum of the IPv4 pseudo-header (RFC 768, RFC 793 §3.1: source,
    destination, zero, protocol, length n) plus buf[off:off+n]. A correct
    UDP or TCP segment sums to 0xFFFF; ~sum is the checksum to store.
    Raises ValueError when off + n runs past buf."""
    if off < 0 or n < 0 or off + n > len(buf):
        raise ValueError(f"range {off}+{n} outside a {len(buf)}-byte buffer")
    v = int.from_bytes(buf[off:off + n], "big")
    if n & 1:
        v <<= 8
    v += int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + n
    if v == 0:
        return 0
    r = v % _ONES
    return r if r else _ONES


def copy(dst, src) -> int:
    """Copy the concatenation of the buffers in `src` into the concatenation
    of the writable buffers in `dst`, up to the shorter total. Returns the
    number of bytes copied.

    Each step is one slice assignment (a memcpy); sources are wrapped in
    memoryviews so that slicing them never copies. Two shapes are the
    common ones and go first: one destination (gathering a chain into a
    frame) and whole destination views filled from one source (a frame
    scattered over RX buffers)."""
    if len(dst) == 1:
        out = memoryview(dst[0])
        room = len(out)
        pos = 0
        for s in src:
            k = len(s)
            if pos + k > room:
                k = room - pos
                out[pos:room] = memoryview(s)[:k]
                return room
            out[pos:pos + k] = s
            pos += k
        return pos
    done = 0
    it = iter(src)
    s = memoryview(b"")
    spos = slen = 0
    for d in dst:
        dl = len(d)
        if slen - spos >= dl:
            d[:] = s[spos:spos + dl]
            spos += dl
            done += dl
            continue
        dpos = 0
        while dpos < dl:
            if spos == slen:
                s = next(it, None)
                if s is None:
                    return done
                s = memoryview(s)
                spos, slen = 0, len(s)
                continue
            k = slen - spos
            if k > dl - dpos:
                k = dl - dpos
            d[dpos:dpos + k] = s[spos:spos + k]
            dpos += k
            spos += k
            done += k
    return done


def segment(data, ihl: int, doff: int, tot: int, gso: int, count: int,
            partial: bool) -> list:
    """Cut the validated TCP/IPv4 frame `data` into `count` frames of at most
    `gso` payload bytes (see stack/segment.py for the rules). Returns the
    frames as bytearrays."""
    l4 = _ETH_HLEN + ihl
    pay = l4 + doff
    end = _ETH_HLEN + tot
    head = bytes(data[:pay])
    ident = (data[18] << 8) | data[19]
    seq = _U32.unpack_from(data, l4 + 4)[0]
    flags = data[l4 + 13]
    addr = int.from_bytes(data[_ETH_HLEN + _IP_SRC:_ETH_HLEN + _IP_SRC + 4], "big") \
        + int.from_bytes(data[_ETH_HLEN + _IP_SRC + 4:_ETH_HLEN + _IP_SRC + 8], "big") + _PROTO_TCP
    out = []
    mv = memoryview(data)
    for i in range(count):
        o = pay + i * gso
        chunk = mv[o:min(o + gso, end)]
        f = bytearray(head)
        f += chunk
        _U16.pack_into(f, 16, ihl + doff + len(chunk))
        _U16.pack_into(f, 18, (ident + i) & 0xFFFF)
        f[24] = f[25] = 0
        _U16.pack_into(f, 24, (~ones_sum(memoryview(f)[_ETH_HLEN:l4])) & 0xFFFF)
        _U32.pack_into(f, l4 + 4, (seq + i * gso) & 0xFFFFFFFF)
        fl = flags
        if i != count - 1:
            fl &= ~(_FIN | _PSH)
        if i != 0:
            fl &= ~_CWR
        f[l4 + 13] = fl
        ps = addr + doff + len(chunk)
        ps = ps % _ONES or _ONES
        if partial:
            _U16.pack_into(f, l4 + 16, ps)
        else:
            f[l4 + 16] = f[l4 + 17] = 0
            _U16.pack_into(f, l4 + 16, (~ones_sum(memoryview(f)[l4:], ps)) & 0xFFFF)
        out.append(f)
    return out


# ======================================================================
# ICMP echo reply (issue 12, item 5: the per-frame echo path); the twin of
# native.c's vn_icmp_echo_reply, which documents what is checked and written.
# ======================================================================
_MIN_FRAME = 60             # IEEE 802.3 minimum frame without the FCS
_L4 = _ETH_HLEN + 20        # RFC 791 §3.1: Ethernet + an IPv4 header without options
_ICMP_HLEN = 8              # RFC 792: type, code, checksum, id, sequence
_ECHO_HEAD = struct.Struct("!BBHHHBBH4s4s")   # RFC 791 §3.1 header, as stack/wire/ipv4.HEADER
_VIHL_PLAIN = 0x45          # version 4, IHL 5 words
_ECHO_TTL = 64              # the stack's TTL for everything it sends (ipv4.build_header)
_PROTO_ICMP = 1             # RFC 790
# RFC 1624 eqn. 3, the type byte 8 -> 0: ~m + m' = 0xFFFF - 0x0800.
_ECHO_TYPE_DELTA = 0xF7FF
# The largest reply: an IPv4 datagram of the largest total length (RFC 791
# §3.1) in an Ethernet frame; the stack answers only up to its MTU.
ECHO_MAX_FRAME = _ETH_HLEN + 65535


def icmp_echo_reply(frame, end: int, gw_mac: bytes, ident: int):
    """The reply to the echo request frame[:end] (IPv4 header already
    checked, 20 bytes), padded to the Ethernet minimum, as a new bytearray;
    None if the request's ICMP checksum is wrong. ValueError if the
    lengths do not add up."""
    if end < _L4 + _ICMP_HLEN or end > ECHO_MAX_FRAME or end > len(frame) or len(gw_mac) != 6:
        raise ValueError(f"echo request of {end} bytes in a {len(frame)}-byte frame")
    if ones_sum(frame[_L4:end]) != _ONES:
        return None
    r = bytearray(frame[:end])
    r[0:6] = frame[6:12]
    r[6:12] = gw_mac
    _ECHO_HEAD.pack_into(r, _ETH_HLEN, _VIHL_PLAIN, frame[15], (frame[16] << 8) | frame[17],
                         ident & 0xFFFF, 0, _ECHO_TTL, _PROTO_ICMP, 0,
                         bytes(frame[30:34]), bytes(frame[26:30]))
    cs = (~ones_sum(memoryview(r)[_ETH_HLEN:_L4])) & 0xFFFF
    r[24] = cs >> 8
    r[25] = cs & 0xFF
    r[_L4] = 0
    s = (~((frame[36] << 8) | frame[37]) & 0xFFFF) + _ECHO_TYPE_DELTA
    s = (s & 0xFFFF) + (s >> 16)
    cs = ~s & 0xFFFF
    if cs == 0:
        # Both zeros look alike to the patch: recompute (see native.c).
        r[36] = r[37] = 0
        cs = (~ones_sum(memoryview(r)[_L4:])) & 0xFFFF
    r[36] = cs >> 8
    r[37] = cs & 0xFF
    if end < _MIN_FRAME:
        r += bytes(_MIN_FRAME - end)
    return r


class EchoReplier:
    """icmp_echo_reply for one gateway MAC: the interface of the native
    EchoReplier (stack/native/__init__.py), which keeps a scratch buffer."""
    __slots__ = ("gw_mac",)

    def __init__(self, gw_mac: bytes):
        if len(gw_mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.gw_mac = bytes(gw_mac)

    def reply(self, frame, end: int, ident: int):
        return icmp_echo_reply(frame, end, self.gw_mac, ident)


# ---- RX scatter into one guest region (native.c vn_scatter_region) ------

def scatter_region(region, offs, lens, hdr, data) -> int:
    """Copy hdr then data into region[offs[i]:offs[i] + lens[i]] for each i in
    order, up to the shorter total; returns the bytes copied. Every pair is
    checked against len(region) first: a pair outside it raises ValueError
    with nothing written."""
    size = len(region)
    if len(offs) != len(lens):
        raise ValueError(f"{len(offs)} offsets, {len(lens)} lengths")
    for o, k in zip(offs, lens):
        if o < 0 or k < 0 or o + k > size:
            raise ValueError(f"buffer {o}+{k} outside a {size}-byte region")
    return copy([region[o:o + k] for o, k in zip(offs, lens)], (hdr, data))


# ---- RX: the split ring's batched take (native.c vn_split_take_writable) ----

_DESC = struct.Struct("<QIHH")        # virtio 1.2 §2.7.5 struct virtq_desc: addr, len, flags, next
_F_NEXT, _F_WRITE, _F_INDIRECT = 1, 2, 4
_NEXT_INDIRECT_WRITE = _F_NEXT | _F_INDIRECT | _F_WRITE
_U64_MAX = (1 << 64) - 1              # guest physical addresses are 64-bit (§2.7.5)


def split_take_writable(avail_h, desc, held, checks: bool, num: int, last: int, ahead: int,
                        r_gpa: int, r_end: int, need: int, min_len: int, max_take: int):
    """The loop of vhostnet/virtio/split.py SplitRing.take_writable (see
    native.c vn_split_take_writable): (heads, offsets, lengths, room) of the
    one-descriptor writable buffers of at least MIN_LEN bytes inside the
    region [r_gpa, r_end), from avail ring index LAST on, at most AHEAD and
    MAX_TAKE of them, until they hold NEED bytes; the first other entry ends
    the run. Taken heads are marked in HELD when CHECKS."""
    return _take_run(avail_h, desc, held, checks, num, last, ahead, r_gpa, r_end, _F_WRITE, need, min_len,
                     max_take)


def _take_one(avail_h, desc, held, checks: bool, num: int, slot: int, want: int, min_len: int,
              r_gpa: int, r_end: int):
    """The avail entry at SLOT if it is one buffer the runs take: head in range
    and not held, flags among NEXT|INDIRECT|WRITE equal to WANT, at least
    MIN_LEN (and one) bytes, inside [r_gpa, r_end); marked held when CHECKS
    (a head twice in a run stops it at the second). (head, addr, length) or None."""
    head = avail_h[2 + slot]
    if head >= num or (checks and held[head]):
        return None
    addr, length, flags, _nxt = _DESC.unpack_from(desc, head << 4)
    if (flags & _NEXT_INDIRECT_WRITE != want or length < min_len or not length
            or not (r_gpa <= addr and addr + length <= r_end)):
        return None
    if checks:
        held[head] = 1
    return head, addr, length


def _check_lens(lens, blob) -> None:
    """put_frames' records, LENS bytes back to back, must lie inside BLOB."""
    if sum(lens) > len(blob) or any(k < 0 for k in lens):
        raise ValueError("the frames' lengths overrun their blob")


def _take_run(avail_h, desc, held, checks: bool, num: int, last: int, ahead: int, r_gpa: int, r_end: int,
              want: int, need: int, min_len: int, max_take: int):
    """The run both takes share (native.c split_take_run): one-descriptor
    buffers whose flags among NEXT|INDIRECT|WRITE are WANT, until NEED
    bytes, MAX_TAKE buffers or the first other entry. (heads, offsets,
    lengths, room)."""
    if not num or num & (num - 1) or len(avail_h) < 2 + num or len(desc) < 16 * num \
            or (checks and len(held) < num) or ahead > num:
        raise ValueError("ring sizes do not cover the queue size")
    heads: list[int] = []
    offs: list[int] = []
    lens: list[int] = []
    mask = num - 1
    room = 0
    n = 0
    limit = min(ahead, max_take)
    while room < need and n < limit:
        took = _take_one(avail_h, desc, held, checks, num, (last + n) & mask, want, min_len, r_gpa, r_end)
        if took is None:
            break
        head, addr, length = took
        heads.append(head)
        offs.append(addr - r_gpa)
        lens.append(length)
        room += length
        n += 1
    return heads, offs, lens, room


# ---- RX: a whole frame into the split ring's next buffers (native.c vn_split_put_frame) ----

PUT_MAX_BUFFERS = 256     # native.c VN_PUT_MAX_BUFFERS: a frame needing more goes the slow way


def split_put_frame(avail_h, desc, held, checks: bool, used_i, num: int, last: int, ahead: int,
                    used_idx: int, region, r_gpa: int, min_len: int, max_take: int, hdr, data,
                    count_off: int) -> list:
    """split_take_writable's run for len(hdr) + len(data) bytes; if it holds
    them, the copy into the region, the used elements (USED_I: the used ring
    as 32-bit words) from USED_IDX on, and the number of buffers as a
    little-endian 16-bit value at COUNT_OFF of the stream. Returns the heads
    used; [] (nothing written, nothing left marked) when the run does not
    hold the frame."""
    if len(used_i) < 1 + 2 * num or count_off + 2 > min_len:
        raise ValueError("used ring shorter than the queue, or the count outside the first buffer")
    need = len(hdr) + len(data)
    heads, offs, lens, room = split_take_writable(avail_h, desc, held, checks, num, last, ahead, r_gpa,
                                                  r_gpa + len(region), need, min_len,
                                                  min(max_take, PUT_MAX_BUFFERS))
    if not heads or room < need:
        if checks:
            for h in heads:
                held[h] = 0     # given back: the device no longer holds them
        return []
    n = len(heads)
    scatter_region(region, offs, lens, hdr, data)
    o = offs[0] + count_off
    region[o] = n & 0xFF
    region[o + 1] = n >> 8 & 0xFF
    mask = num - 1
    left = need
    for i, (h, k) in enumerate(zip(heads, lens)):
        slot = (used_idx + i) & mask
        k = k if k < left else left
        used_i[1 + 2 * slot] = h
        used_i[2 + 2 * slot] = k
        left -= k
    return heads


def split_put_frames(avail_h, desc, held, checks: bool, used_i, num: int, last: int, ahead: int,
                     used_idx: int, region, r_gpa: int, max_take: int, blob, lens) -> list:
    """A run of small frames, each whole into the next posted buffer
    (native.c vn_split_put_frames): record i is LENS[i] bytes of BLOB (the
    records back to back: header, then frame). While the entry at avail
    ring index LAST + i is one device-writable buffer inside the region
    that holds record i (the checks of _take_run), the record goes to the
    buffer's start and its used element (head, LENS[i]) to USED_I at
    USED_IDX + i; at most AHEAD, MAX_TAKE and PUT_MAX_BUFFERS of them. The
    first other entry ends the run untouched. Returns the heads used.
    ValueError, nothing read or written, when the sizes do not cover the
    queue or the lengths overrun the blob."""
    if not num or num & (num - 1) or len(avail_h) < 2 + num or len(desc) < 16 * num \
            or (checks and len(held) < num) or ahead > num or len(used_i) < 1 + 2 * num:
        raise ValueError("ring sizes do not cover the queue size")
    if r_gpa + len(region) > _U64_MAX:
        raise ValueError("the region wraps the address space")
    _check_lens(lens, blob)
    mask = num - 1
    r_end = r_gpa + len(region)
    heads: list[int] = []
    pos = 0
    for i in range(min(len(lens), ahead, max_take, PUT_MAX_BUFFERS)):
        k = lens[i]
        took = _take_one(avail_h, desc, held, checks, num, (last + i) & mask, _F_WRITE, k, r_gpa, r_end)
        if took is None:
            break
        head, addr, _length = took
        off = addr - r_gpa
        region[off:off + k] = blob[pos:pos + k]
        pos += k
        slot = (used_idx + i) & mask
        used_i[1 + 2 * slot] = head
        used_i[2 + 2 * slot] = k
        heads.append(head)
    return heads


class SplitPins:
    """A split ring's RX arguments held for split_put_frame, once per mapping.

    The C twin (stack.native.SplitPins) pins the ring's views for the life of
    this object, so a frame costs no per-call pinning; this one only keeps
    its own slices of the views (the same lifetime rules, nothing to pin).
    The owner makes a new one whenever any of the views is replaced
    (SplitRing: attach, the held bytes reset, another guest region) and
    release()s the old: its slices do not keep the views from being
    released, and after release() put_frame raises ValueError."""
    __slots__ = ("_args",)

    def __init__(self, avail_h, desc, held, used_i, region):
        self._args = (avail_h[:], desc[:], held, used_i[:], region[:])

    def put_frame(self, checks: bool, num: int, last: int, ahead: int, used_idx: int, r_gpa: int,
                  min_len: int, max_take: int, hdr, data, count_off: int) -> list:
        """split_put_frame over the held views (same arguments otherwise)."""
        if self._args is None:
            raise ValueError("SplitPins used after release()")
        avail_h, desc, held, used_i, region = self._args
        return split_put_frame(avail_h, desc, held, checks, used_i, num, last, ahead, used_idx, region,
                               r_gpa, min_len, max_take, hdr, data, count_off)

    def put_frames(self, checks: bool, num: int, last: int, ahead: int, used_idx: int, r_gpa: int,
                   max_take: int, blob, lens) -> list:
        """split_put_frames over the held views (same arguments otherwise)."""
        if self._args is None:
            raise ValueError("SplitPins used after release()")
        avail_h, desc, held, used_i, region = self._args
        return split_put_frames(avail_h, desc, held, checks, used_i, num, last, ahead, used_idx, region,
                                r_gpa, max_take, blob, lens)

    def release(self) -> None:
        if self._args is not None:
            for v in self._args:
                if isinstance(v, memoryview):
                    v.release()
            self._args = None

# ---- TX: the split ring's batched take (native.c vn_split_take_readable) ----

def split_take_readable(avail_h, desc, held, checks: bool, num: int, last: int, ahead: int,
                        r_gpa: int, r_end: int, max_take: int):
    """The loop of vhostnet/virtio/split.py SplitRing.take_readable (see
    native.c vn_split_take_readable): (heads, offsets, lengths) of the
    one-descriptor device-readable chains of at least one byte inside the
    region [r_gpa, r_end), from avail ring index LAST on, at most AHEAD and
    MAX_TAKE of them; the first other entry ends the run. Taken heads are
    marked in HELD when CHECKS. Each entry and descriptor is read once."""
    heads, offs, lens, _room = _take_run(avail_h, desc, held, checks, num, last, ahead, r_gpa, r_end, 0,
                                         1 << 64, 1, max_take)
    return heads, offs, lens


def split_put_used(used_i, num: int, used_idx: int, heads, length: int) -> int:
    """Used elements (heads[i], LENGTH) into USED_I (the used ring as 32-bit
    words) from USED_IDX on, in order (native.c vn_split_put_used); returns
    the used index after them. ValueError, nothing written, when the used
    ring is shorter than NUM entries, a head is not below NUM, or there are
    more than NUM heads."""
    n = len(heads)
    if not num or num & (num - 1) or len(used_i) < 1 + 2 * num or n > num \
            or any(h >= num or h < 0 for h in heads):
        raise ValueError("used ring shorter than the queue, a head out of range, or too many heads")
    mask = num - 1
    for i, h in enumerate(heads):
        slot = (used_idx + i) & mask
        used_i[1 + 2 * slot] = h
        used_i[2 + 2 * slot] = length
    return (used_idx + n) & 0xFFFF


# ---- RX: a run of small frames into a packed ring (native.c vn_packed_put_frames) ----

_PDESC = struct.Struct("<QIHH")       # virtio 1.2 §2.8.13 struct pvirtq_desc: addr, len, id, flags
_PLEN = struct.Struct("<I")           # its len, at byte 8
_PU16 = struct.Struct("<H")           # its id (byte 12) and flags (byte 14)
_P_AVAIL, _P_USED = 1 << 7, 1 << 15   # §2.8.1 (NEXT, WRITE, INDIRECT: the split values, §2.8.6/§2.8.3/§2.8.7)
_P_AVAIL_USED = _P_AVAIL | _P_USED
_PACKED_MAX_QUEUE = 32768             # §2.8: a queue size up to 2**15


def _packed_sizes_ok(desc, num: int, pos: int) -> bool:
    return 0 < num <= _PACKED_MAX_QUEUE and len(desc) >= 16 * num and 0 <= pos < num


def packed_avail_run(desc, num: int, pos: int, wrap: bool, limit: int) -> int:
    """How many descriptors from ring position POS on are available for
    wrap counter WRAP (§2.8.1: AVAIL equal to it, USED not), at most LIMIT
    and NUM (native.c vn_packed_avail_run). ValueError when DESC does not
    cover NUM descriptors or POS is outside the ring."""
    if not _packed_sizes_ok(desc, num, pos):
        raise ValueError("the descriptor ring does not cover the queue size, or the position is outside it")
    expect = _P_AVAIL if wrap else _P_USED
    n = 0
    limit = min(limit, num)
    while n < limit and _PU16.unpack_from(desc, 16 * pos + 14)[0] & _P_AVAIL_USED == expect:
        n += 1
        pos += 1
        if pos == num:
            pos = 0
            wrap = not wrap
            expect = _P_AVAIL if wrap else _P_USED
    return n


def packed_put_frames(desc, seen, num: int, avail_pos: int, avail_wrap: bool, used_pos: int, used_wrap: bool,
                      free: int, region, r_gpa: int, max_take: int, blob, lens) -> list:
    """A run of small frames, each whole into the next available buffer of a
    packed ring (native.c vn_packed_put_frames, which documents the checks
    and the order of the writes): record i (LENS[i] bytes of BLOB, back to
    back) goes to the buffer at ring position AVAIL_POS + i while that
    descriptor is available, one device-writable buffer inside the region
    that holds the record, with a buffer id below NUM not marked in SEEN;
    at most len(LENS), MAX_TAKE, FREE and PUT_MAX_BUFFERS of them. Then the
    used descriptors (id, LENS[i], flags per the used wrap counter) from
    USED_POS on, the first one's flags last. Returns the buffer ids used;
    SEEN as it was. ValueError, nothing read or written, when the sizes do
    not cover the ring, a position is outside it, the lengths overrun the
    blob or the region wraps the address space."""
    if not _packed_sizes_ok(desc, num, avail_pos) or not 0 <= used_pos < num or len(seen) < num \
            or not 0 <= free <= num:
        raise ValueError("ring sizes do not cover the queue size, or a position is outside the ring")
    if r_gpa + len(region) > _U64_MAX:
        raise ValueError("the region wraps the address space")
    _check_lens(lens, blob)
    r_end = r_gpa + len(region)
    pos, wrap = avail_pos, avail_wrap
    expect = _P_AVAIL if wrap else _P_USED
    ids: list[int] = []
    bpos = 0
    for i in range(min(len(lens), max_take, free, PUT_MAX_BUFFERS)):
        k = lens[i]
        addr, length, buf_id, flags = _PDESC.unpack_from(desc, 16 * pos)
        if (flags & _P_AVAIL_USED != expect or flags & _NEXT_INDIRECT_WRITE != _F_WRITE
                or length < k or not length or not (r_gpa <= addr and addr + length <= r_end)
                or buf_id >= num or seen[buf_id]):
            break
        seen[buf_id] = 1        # an id twice in the run stops it at the second
        off = addr - r_gpa
        region[off:off + k] = blob[bpos:bpos + k]
        bpos += k
        ids.append(buf_id)
        pos += 1
        if pos == num:
            pos = 0
            wrap = not wrap
            expect = _P_AVAIL if wrap else _P_USED
    for buf_id in ids:
        seen[buf_id] = 0
    flags = []
    pos, wrap = used_pos, used_wrap
    for buf_id, k in zip(ids, lens):
        o = 16 * pos
        _PLEN.pack_into(desc, o + 8, k)
        _PU16.pack_into(desc, o + 12, buf_id)
        flags.append((o + 14, (_P_AVAIL_USED if wrap else 0) | (_F_WRITE if k else 0)))
        pos += 1
        if pos == num:
            pos = 0
            wrap = not wrap
    for o, f in reversed(flags):    # the first descriptor's flags last
        _PU16.pack_into(desc, o, f)
    return ids


class PackedPins:
    """A packed ring's RX arguments held for packed_put_frames, once per
    mapping (the twin of stack.native.PackedPins, as SplitPins is of its
    C twin: the same lifetime rules, nothing to pin). SEEN is the ring's
    scratch byte per buffer id, zero between calls."""
    __slots__ = ("_args",)

    def __init__(self, desc, seen, region):
        self._args = (desc[:], seen, region[:])

    def put_frames(self, num: int, avail_pos: int, avail_wrap: bool, used_pos: int, used_wrap: bool, free: int,
                   r_gpa: int, max_take: int, blob, lens) -> list:
        """packed_put_frames over the held views (same arguments otherwise)."""
        if self._args is None:
            raise ValueError("PackedPins used after release()")
        desc, seen, region = self._args
        return packed_put_frames(desc, seen, num, avail_pos, avail_wrap, used_pos, used_wrap, free, region, r_gpa,
                                 max_take, blob, lens)

    def avail_run(self, num: int, pos: int, wrap: bool, limit: int) -> int:
        """packed_avail_run over the held descriptor ring."""
        if self._args is None:
            raise ValueError("PackedPins used after release()")
        return packed_avail_run(self._args[0], num, pos, wrap, limit)

    def release(self) -> None:
        if self._args is not None:
            for v in self._args:
                if isinstance(v, memoryview):
                    v.release()
            self._args = None
