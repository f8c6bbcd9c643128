"""The C hot paths (stack/native/native.c) against their Python twins, and
scapy as the independent oracle for what the stack emits without offloads.

The agreement tests need the extension built (pip install -e . builds it;
so does `python stack/native/build.py` in a source tree). Without it they
fail, so that a broken build cannot pass silently; VHOSTNET_NATIVE=0 (the
explicit request for the fallback) skips them instead.
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

import stack.native as native
from stack import Frame, NetConfig
from stack.checksum import ones_sum, pseudo_sum
from stack.interface import Stack
from stack.native import fallback
from stack.segment import MAX_SEGMENTS, SegmentError, segment_tcp
from tests.stack.conftest import GUEST_IP, GUEST_MAC, GW_IP, GW_MAC, assert_checksums

if os.environ.get(native.ENV_SWITCH) == "0":
    pytest.skip("VHOSTNET_NATIVE=0: the fallback was asked for", allow_module_level=True)

try:
    from stack.native._native import ffi, lib
except ImportError as e:  # pragma: no cover - the failure message is the point
    pytest.fail(f"the cffi extension is not built ({e}): run `pip install -e .` or "
                "`python stack/native/build.py`", pytrace=False)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
G = bytes([10, 0, 2, 15])
GW = bytes([10, 0, 2, 2])
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def c_sum(data, start=0) -> int:
    """The C routine called directly, not through the wrapper's selection."""
    return lib.vn_ones_sum(ffi.from_buffer(data), len(data), start)


def c_copy(dst, src) -> int:
    """vn_copy called directly (native.copy only goes to C for long view lists)."""
    fb = ffi.from_buffer
    return lib.vn_copy(ffi.new("char *[]", [fb(d, require_writable=True) for d in dst]),
                       ffi.new("size_t[]", [len(d) for d in dst]), len(dst),
                       ffi.new("char *[]", [fb(s) for s in src]), ffi.new("size_t[]", [len(s) for s in src]),
                       len(src))


def misaligned(data: bytes, shift: int) -> memoryview:
    """data as a memoryview that starts `shift` bytes into a larger buffer."""
    return memoryview(bytearray(shift) + data)[shift:]


def test_selection_is_native_and_visible():
    assert native.NATIVE and native.IMPLEMENTATION == "cffi" and native.REASON == ""
    assert native.describe() == {"native": True, "implementation": "cffi", "reason": ""}
    # the stack's checksum module uses the selected routine, not a copy of its own
    assert ones_sum is native.ones_sum


def test_routines_are_the_ones_build_declares():
    from stack.native import build
    declared = set(re.findall(r"\b(vn_\w+)\(", build.CDEF))
    assert declared == set(native._ROUTINES)


def test_an_out_of_date_extension_means_python_for_everything():
    """An extension built from an older native.c (no vn_icmp_echo_reply):
    the fallback for every routine, and the reason says why."""
    code = textwrap.dedent("""
        import importlib, sys, types
        import stack.native._native as real     # (imports stack.native, with the real one)
        lib = types.SimpleNamespace(**{n: getattr(real.lib, n) for n in dir(real.lib)
                                       if n != "vn_icmp_echo_reply"})
        sys.modules["stack.native._native"] = types.SimpleNamespace(ffi=real.ffi, lib=lib)
        import stack.native as native
        native = importlib.reload(native)      # the selection again, with the stale one
        from stack import NetConfig, Stack
        from stack.native import fallback
        assert not native.NATIVE and "out of date" in native.REASON, native.REASON
        assert "vn_icmp_echo_reply" in native.REASON
        assert native.EchoReplier is fallback.EchoReplier and native.ones_sum is fallback.ones_sum
        Stack(NetConfig())
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(native.ENV_SWITCH, None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ------------------------------------------------------------------ ones_sum
def test_rfc1071_example():
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert c_sum(data) == fallback.ones_sum(data) == native.ones_sum(data) == 0xDDF2


@pytest.mark.parametrize("n", [0, 1, 2, 3, 15, 16, 17, 1471, 1472, 1480, 65535])
def test_all_zero_sums_to_zero_and_all_ones_to_ffff(n):
    zero = bytes(n)
    assert c_sum(zero) == fallback.ones_sum(zero) == 0
    ones = b"\xff" * n
    # 0xFFFF words are negative zero: an even all-ones buffer sums to 0xFFFF;
    # odd, the last byte is the word 0xFF00, and 0xFFFF + 0xFF00 folds to 0xFF00.
    expect = 0 if n == 0 else (0xFF00 if n & 1 else 0xFFFF)
    assert c_sum(ones) == fallback.ones_sum(ones) == expect


@pytest.mark.parametrize("start", [0, 1, 0xFFFE, 0xFFFF, 0x10000, 0x1FFFE, 0xFFFFFFFF])
def test_start_folds_like_python(start):
    for data in (b"", bytes(7), b"\x12\x34\x56"):
        assert c_sum(data, start) == fallback.ones_sum(data, start)


@SETTINGS
@given(data=hs.binary(max_size=3000), start=hs.integers(0, 0xFFFF), shift=hs.integers(0, 7))
def test_sum_agrees_on_random_input(data, start, shift):
    want = fallback.ones_sum(data, start)
    assert c_sum(data, start) == want
    assert c_sum(misaligned(data, shift), start) == want
    assert native.ones_sum(data, start) == want                       # bytes: passed directly
    assert native.ones_sum(bytearray(data), start) == want
    assert native.ones_sum(misaligned(data, shift), start) == want


@SETTINGS
@given(data=hs.binary(min_size=2, max_size=2000).filter(lambda d: len(d) % 2 == 0))
def test_stored_checksum_verifies(data):
    # Put ~sum into a 2-byte field: the whole then sums to 0xFFFF (or 0 for all zeros).
    d = bytearray(data) + b"\0\0"
    cs = (~c_sum(d)) & 0xFFFF
    d[-2:] = cs.to_bytes(2, "big")
    assert c_sum(d) in (0xFFFF, 0) and c_sum(d) == fallback.ones_sum(d)


# -------------------------------------------------------------------- l4_sum
@SETTINGS
@given(data=hs.binary(max_size=3000), cut=hs.data(), src=hs.binary(min_size=4, max_size=4),
       dst=hs.binary(min_size=4, max_size=4), proto=hs.sampled_from([6, 17, 0, 255]), shift=hs.integers(0, 7))
def test_l4_sum_agrees_with_pseudo_sum_plus_ones_sum(data, cut, src, dst, proto, shift):
    off = cut.draw(hs.integers(0, len(data)))
    n = cut.draw(hs.integers(0, len(data) - off))
    want = fallback.ones_sum(data[off:off + n], pseudo_sum(src, dst, proto, n))
    assert fallback.l4_sum(data, off, n, src, dst, proto) == want
    assert lib.vn_l4_sum(data, len(data), off, n, src, dst, proto) == want
    for buf in (data, bytearray(data), misaligned(data, shift)):
        assert native.l4_sum(buf, off, n, src, dst, proto) == want
    assert native.l4_sum(data, off, n, bytearray(src), memoryview(dst), proto) == want


@pytest.mark.parametrize("impl", [native.l4_sum, fallback.l4_sum])
def test_l4_sum_refuses_ranges_past_the_buffer(impl):
    g = bytes(4)
    for off, n in ((0, 11), (10, 1), (11, 0), (-1, 2), (2, -1)):
        with pytest.raises(ValueError):
            impl(bytes(10), off, n, g, g, 17)
    assert impl(bytes(10), 10, 0, g, g, 17) == 17      # empty range at the end: the pseudo-header alone


# ---------------------------------------------------------------------- copy
def model_copy(dst_sizes, src):
    whole = b"".join(src)
    n = min(len(whole), sum(dst_sizes))
    return n, whole[:n]


@SETTINGS
@given(src=hs.lists(hs.binary(max_size=600), max_size=6),
       dst_sizes=hs.lists(hs.integers(0, 700), min_size=1, max_size=6),
       shift=hs.integers(0, 7))
def test_copy_agrees_on_random_input(src, dst_sizes, shift):
    n, want = model_copy(dst_sizes, src)
    for impl in (c_copy, native.copy, fallback.copy):
        # destinations: misaligned memoryviews into one guest-memory-like buffer
        backing = bytearray(b"\xa5" * (shift + sum(dst_sizes)))
        mv = memoryview(backing)
        dst, o = [], shift
        for k in dst_sizes:
            dst.append(mv[o:o + k])
            o += k
        srcs = [misaligned(s, shift) for s in src]
        assert impl(dst, srcs) == n
        assert bytes(backing[shift:shift + n]) == want
        # nothing written past the copied bytes, nor before the first view
        assert backing[:shift] == b"\xa5" * shift
        assert backing[shift + n:] == b"\xa5" * (len(backing) - shift - n)


def test_copy_gathers_views_into_one_frame_and_scatters_back():
    views = [memoryview(b"abc"), memoryview(bytearray(b"defgh"))[1:], b"", b"ij"]
    out = bytearray(9)
    assert native.copy([out], views) == 9 and out == b"abcefghij"
    bufs = [bytearray(4), bytearray(4), bytearray(4)]
    assert native.copy(bufs, [b"hdr", out]) == 12
    assert b"".join(bufs) == b"hdrabcefghij"


def test_copy_of_long_view_lists_goes_through_c_and_agrees():
    # 64 KiB + header into 1 KiB views: past COPY_C_MIN_VIEWS, native.copy is C.
    data = os.urandom(65536)
    for nviews in (native.COPY_C_MIN_VIEWS - 2, native.COPY_C_MIN_VIEWS + 10):
        outs = {}
        for impl in (native.copy, fallback.copy):
            backing = bytearray(1024 * nviews + 5)
            mv = memoryview(backing)
            views = [mv[i * 1024:(i + 1) * 1024] for i in range(nviews)]
            assert impl(views, [b"hdr-12-bytes", memoryview(data)]) == min(12 + len(data), 1024 * nviews)
            outs[impl] = bytes(backing)
        assert outs[native.copy] == outs[fallback.copy]
        n = min(12 + len(data), 1024 * nviews)
        assert outs[native.copy][:n] == (b"hdr-12-bytes" + data)[:n]


def test_copy_refuses_readonly_destination():
    for impl in (c_copy, fallback.copy):
        with pytest.raises((TypeError, BufferError, ValueError)):
            impl([b"readonly", bytearray(2)], [b"0123456789"])


# ------------------------------------------------------------------- segment
def tcp_frame(payload: bytes, *, flags="PA", options=(), ip_opts=b"", ident=100, seq=1000,
              partial=False) -> bytearray:
    p = Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST_IP, dst=GW_IP, id=ident, flags="DF",
                                              options=ip_opts) / \
        TCP(sport=40000, dport=5201, seq=seq, ack=5, flags=flags, window=500, options=list(options)) / payload
    raw = bytearray(bytes(p))
    if partial:
        l4 = 14 + (raw[14] & 15) * 4
        raw[l4 + 16:l4 + 18] = pseudo_sum(G, GW, 6, len(raw) - l4).to_bytes(2, "big")
    return raw


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plen=hs.integers(0, 9000), gso=hs.integers(1, 3000), flags=hs.sampled_from(["PA", "FPA", "A", "CA", "FPAC"]),
       ident=hs.integers(0, 0xFFFF), seq=hs.integers(0, 0xFFFFFFFF), partial=hs.booleans(),
       ts=hs.booleans(), ipopt=hs.booleans())
def test_segment_agrees_with_python(plen, gso, flags, ident, seq, partial, ts, ipopt):
    payload = bytes((i * 13 + plen) & 0xFF for i in range(plen))
    opts = [("Timestamp", (1, 2))] if ts else []
    ip_opts = b"\x01\x01\x01\x00" if ipopt else b""   # NOP NOP NOP EOL
    raw = tcp_frame(payload, flags=flags, options=opts, ip_opts=ip_opts, ident=ident, seq=seq)
    ihl = (raw[14] & 15) * 4
    doff = (raw[14 + ihl + 12] >> 4) * 4
    tot = len(raw) - 14
    count = max(1, -(-plen // gso))
    if count > MAX_SEGMENTS:
        with pytest.raises(SegmentError):
            segment_tcp(raw, gso, partial)
        return
    want = fallback.segment(raw, ihl, doff, tot, gso, count, partial)
    got = native.segment(raw, ihl, doff, tot, gso, count, partial)
    assert [bytes(s) for s in got] == [bytes(s) for s in want]
    # and the public entry point, fed a misaligned memoryview of the frame
    via = segment_tcp(misaligned(bytes(raw), 3), gso, partial)
    assert [bytes(s) for s in via] == [bytes(s) for s in want]


def test_segment_arguments_that_do_not_add_up_are_refused_by_c():
    raw = bytes(tcp_frame(bytes(3000)))
    out = bytearray(10000)
    lens = ffi.new("uint32_t[]", 8)
    tot = len(raw) - 14
    # wrong count, gso 0, total length past the frame, output too small
    assert lib.vn_segment_tcp(raw, len(raw), 20, 20, tot, 1000, 2, 0, ffi.from_buffer(out), len(out), lens) == -1
    assert lib.vn_segment_tcp(raw, len(raw), 20, 20, tot, 0, 3, 0, ffi.from_buffer(out), len(out), lens) == -1
    assert lib.vn_segment_tcp(raw, len(raw), 20, 20, tot + 1, 1000, 3, 0, ffi.from_buffer(out), len(out), lens) == -1
    assert lib.vn_segment_tcp(raw, len(raw), 20, 20, tot, 1000, 3, 0, ffi.from_buffer(out), 3000, lens) == -1
    assert out == bytes(10000)


@pytest.mark.parametrize("plen,gso", [(1, 1448), (1448, 1448), (1449, 1448), (65483, 1448), (5000, 536)])
def test_segments_checksums_per_scapy(plen, gso):
    payload = os.urandom(plen)
    raw = tcp_frame(payload, flags="FPA", options=[("Timestamp", (7, 9))], ident=0xFFFE, seq=0xFFFFF000)
    segs = segment_tcp(raw, gso, partial=False)
    got = b""
    for i, s in enumerate(segs):
        p = Ether(bytes(s))
        assert_checksums(p)
        q = p[IP].copy()
        q[TCP].chksum = None
        assert IP(bytes(q))[TCP].chksum == p[TCP].chksum, f"TCP checksum of segment {i}"
        assert p[IP].id == (0xFFFE + i) & 0xFFFF and p[TCP].seq == (0xFFFFF000 + i * gso) & 0xFFFFFFFF
        assert ("F" in p[TCP].flags) == (i == len(segs) - 1)
        got += bytes(p[TCP].payload)
    assert got == payload


# ------------------------------------------- the stack without offload, per scapy
def test_udp_1472_echo_without_offload_per_scapy():
    st = Stack(NetConfig())
    payload = os.urandom(1472)
    p = Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST_IP, dst=GW_IP) / UDP(sport=40000, dport=7) / payload
    for view in (bytes(p), misaligned(bytes(p), 5)):
        st.receive(Frame(view), 0.0)
        (out,) = st.take_frames()
        r = Ether(bytes(out.data))
        assert out.csum_start == 0 and bytes(r[UDP].payload) == payload
        q = r[IP].copy()
        q[UDP].chksum = None
        assert IP(bytes(q))[UDP].chksum == r[UDP].chksum
        assert_checksums(r)


def test_udp_bad_checksum_still_caught_by_native_sum():
    st = Stack(NetConfig())
    raw = bytearray(bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST_IP, dst=GW_IP) /
                          UDP(sport=40000, dport=7) / os.urandom(1472)))
    raw[-1] ^= 1
    st.receive(Frame(raw), 0.0)
    assert st.take_frames() == [] and st.counters["drop_udp_bad_checksum"] == 1


def test_loopback_tso_segmented_in_c_per_scapy():
    # The guest's own 64 KiB TSO frame to itself, guest without GUEST_CSUM/TSO:
    # the stack cuts it (stack/segment.py -> C) and checksums every segment.
    st = Stack(NetConfig())
    payload = os.urandom(65483 - 12)
    p = Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST_IP, dst=GUEST_IP, flags="DF") / \
        TCP(sport=40000, dport=5201, seq=7, flags="PA", options=[("Timestamp", (1, 2))]) / payload
    raw = bytearray(bytes(p))
    raw[50:52] = pseudo_sum(G, G, 6, len(raw) - 34).to_bytes(2, "big")
    st.receive(Frame(raw, csum_start=34, csum_offset=16, gso_size=1448), 0.0)
    frames = st.take_frames()
    assert len(frames) == -(-len(payload) // 1448)
    got = b""
    for f in frames:
        assert f.csum_start == 0 and f.gso_size == 0
        r = Ether(bytes(f.data))
        q = r[IP].copy()
        q[TCP].chksum = None
        assert IP(bytes(q))[TCP].chksum == r[TCP].chksum
        assert_checksums(r)
        got += bytes(r[TCP].payload)
    assert got == payload


def test_tcp_emit_without_offload_per_scapy():
    # A SYN to the discard service: the SYN-ACK is checksummed in full by C.
    st = Stack(NetConfig())   # the built-in services listen on the gateway address
    syn = Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST_IP, dst=GW_IP) / \
        TCP(sport=40001, dport=9, seq=1, flags="S", options=[("MSS", 1460)])
    st.receive(Frame(bytes(syn)), 0.0)
    (out,) = st.take_frames()
    r = Ether(bytes(out.data))
    assert r[TCP].flags == "SA"
    q = r[IP].copy()
    q[TCP].chksum = None
    assert IP(bytes(q))[TCP].chksum == r[TCP].chksum
    assert struct.unpack("!H", bytes(out.data)[50:52])[0] == r[TCP].chksum


# -- ICMP echo reply (native.c's last section) ---------------------------------

GW_MAC_B = bytes.fromhex(GW_MAC.replace(":", ""))


def c_echo(frame, end, gw_mac, ident):
    """The C routine through its wrapper (native.EchoReplier), as the stack calls it."""
    return native.EchoReplier(gw_mac).reply(frame, end, ident)


def echo_request(payload: bytes, ident: int = 0x1234, seq: int = 1, tos: int = 0, ip_id: int = 7,
                 flags: int = 0, ttl: int = 64, pad: bytes = b"", chksum=None) -> bytes:
    from scapy.layers.inet import ICMP
    p = Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST_IP, dst=GW_IP, tos=tos, id=ip_id, flags=flags,
                                              ttl=ttl) / ICMP(type=8, id=ident, seq=seq, chksum=chksum) / payload
    return bytes(p) + pad


@pytest.mark.parametrize("impl", ["c", "python"])
def test_echo_reply_per_scapy(impl):
    from scapy.layers.inet import ICMP
    fn = c_echo if impl == "c" else fallback.icmp_echo_reply
    req = echo_request(b"ping" * 14, tos=0x10, ip_id=0x4242, flags=2, ttl=3)
    r = fn(req, len(req), GW_MAC_B, 0xBEEF)
    assert type(r) is bytearray and len(r) == len(req)
    p = Ether(bytes(r))
    assert p.src == GW_MAC and p.dst == GUEST_MAC
    assert (p[IP].src, p[IP].dst, p[IP].id, p[IP].ttl, p[IP].tos) == (GW_IP, GUEST_IP, 0xBEEF, 64, 0x10)
    assert p[IP].flags == 0 and p[IP].frag == 0 and p[IP].ihl == 5 and p[IP].len == len(req) - 14
    assert (p[ICMP].type, p[ICMP].code, p[ICMP].id, p[ICMP].seq) == (0, 0, 0x1234, 1)
    assert bytes(p[ICMP].payload) == b"ping" * 14
    assert_checksums(p)


@SETTINGS
@given(payload=hs.binary(max_size=1472), ident=hs.integers(0, 0xFFFF), seq=hs.integers(0, 0xFFFF),
       tos=hs.integers(0, 255), ip_id=hs.integers(0, 0xFFFF), reply_id=hs.integers(0, 0xFFFF),
       pad=hs.binary(max_size=8), shift=hs.integers(0, 7))
def test_echo_reply_agrees_with_python(payload, ident, seq, tos, ip_id, reply_id, pad, shift):
    req = echo_request(payload, ident, seq, tos, ip_id, pad=pad)
    end = len(req) - len(pad)       # Ethernet padding after the datagram is not echoed
    c = c_echo(misaligned(req, shift), end, GW_MAC_B, reply_id)
    py = fallback.icmp_echo_reply(req, end, GW_MAC_B, reply_id)
    assert c == py
    assert len(c) == max(end, 60) and c[end:] == bytes(len(c) - end)
    assert_checksums(Ether(bytes(c)))


def test_echo_reply_whose_patched_checksum_is_zero_is_recomputed():
    # type 8, code 0, checksum 0xF7FF, id and sequence 0, no data: sums to
    # 0xFFFF. Patched, the reply's checksum would be 0x0000; an all-zero
    # message stores 0xFFFF (as a full computation gives).
    req = echo_request(b"", ident=0, seq=0, chksum=0xF7FF)
    for fn in (c_echo, fallback.icmp_echo_reply):
        r = fn(req, len(req), GW_MAC_B, 1)
        assert r[34:42] == b"\0\0\xff\xff\0\0\0\0"


@pytest.mark.parametrize("impl", ["c", "python"])
def test_echo_reply_bad_checksum_is_none(impl):
    fn = c_echo if impl == "c" else fallback.icmp_echo_reply
    req = echo_request(b"x" * 56, chksum=0xDEAD)
    assert fn(req, len(req), GW_MAC_B, 1) is None
    # all zero (type 0 too): sums to 0, never a correct message
    zero = bytes(req[:34]) + bytes(8)
    assert fn(zero, len(zero), GW_MAC_B, 1) is None


@pytest.mark.parametrize("impl", ["c", "python"])
def test_echo_reply_lengths_that_do_not_add_up_are_refused(impl):
    fn = c_echo if impl == "c" else fallback.icmp_echo_reply
    req = echo_request(b"abcd")
    for end, mac in ((41, GW_MAC_B), (len(req) + 1, GW_MAC_B), (len(req), GW_MAC_B[:5])):
        with pytest.raises(ValueError):
            fn(req, end, mac, 1)


def test_replies_are_copies_out_of_the_scratch_buffer():
    # The native replier writes every reply into one buffer: each reply
    # returned must be its own bytearray, untouched by the next.
    rep = native.EchoReplier(GW_MAC_B)
    a, b = echo_request(b"a" * 100, seq=1), echo_request(b"b" * 30, seq=2)
    ra = rep.reply(a, len(a), 1)
    ra_bytes = bytes(ra)
    rb = rep.reply(b, len(b), 2)
    assert bytes(ra) == ra_bytes and ra is not rb
    assert rb == fallback.icmp_echo_reply(b, len(b), GW_MAC_B, 2) and len(rb) == len(b)
    assert ra == fallback.icmp_echo_reply(a, len(a), GW_MAC_B, 1)


def test_replier_refuses_a_request_larger_than_any_datagram():
    big = echo_request(b"z" * 1000) + bytes(65536)   # longer than 14 + 65535: no IPv4 datagram is
    for rep in (native.EchoReplier(GW_MAC_B), fallback.EchoReplier(GW_MAC_B)):
        with pytest.raises(ValueError):
            rep.reply(big, fallback.ECHO_MAX_FRAME + 1, 1)
    for cls in (native.EchoReplier, fallback.EchoReplier):
        with pytest.raises(ValueError):
            cls(GW_MAC_B[:5])


def test_stack_echo_through_the_python_twin_per_scapy(monkeypatch):
    """The stack's hot path gives the same frames with the fallback."""
    import stack.interface as iface
    from scapy.layers.inet import ICMP
    outs = []
    for cls in (native.EchoReplier, fallback.EchoReplier):
        monkeypatch.setattr(iface, "EchoReplier", cls)
        st = Stack(NetConfig())
        st.receive(Frame(echo_request(b"q" * 64)), 0.0)
        bad = echo_request(b"q" * 64, chksum=0x1111)
        st.receive(Frame(bad), 0.0)
        out = st.take_frames()
        assert len(out) == 1 and st.counters["drop_icmp_bad_checksum"] == 1
        assert st.counters["icmp_echo"] == 1
        p = Ether(bytes(out[0].data))
        assert p[ICMP].type == 0 and p[IP].dst == GUEST_IP
        assert_checksums(p)
        outs.append(bytes(out[0].data))
    assert outs[0] == outs[1]


# ------------------------------------------------------------ scatter_region
@SETTINGS
@given(hdr=hs.binary(max_size=12), data=hs.binary(max_size=3000),
       bufs=hs.lists(hs.tuples(hs.integers(0, 300), hs.integers(0, 900)), max_size=8),
       shift=hs.integers(0, 7))
def test_scatter_region_agrees_on_random_input(hdr, data, bufs, shift):
    """C and fallback write the same bytes, and only into the pairs' pieces,
    in pair order: the model is a copy into the pieces one after another."""
    size = shift + sum(g + k for g, k in bufs) + 5
    offs, lens, o = [], [], shift
    for gap, k in bufs:          # pieces in order with gaps between them
        o += gap
        offs.append(o)
        lens.append(k)
        o += k
    want = bytearray(b"\xa5" * size)
    stream = hdr + data
    pos = 0
    for off, k in zip(offs, lens):
        take = stream[pos:pos + k]
        want[off:off + len(take)] = take
        pos += len(take)
    for impl in (native.scatter_region, fallback.scatter_region):
        backing = bytearray(b"\xa5" * size)
        region = memoryview(backing)
        assert impl(region, offs, lens, hdr, misaligned(data, shift)) == pos
        assert backing == want


@pytest.mark.parametrize("impl", [native.scatter_region, fallback.scatter_region])
def test_scatter_region_refuses_a_pair_outside_and_writes_nothing(impl):
    backing = bytearray(64)
    region = memoryview(backing)
    for offs, lens in (([0, 60], [8, 8]),           # runs past the end
                       ([0, 65], [8, 0]),           # starts past the end
                       ([8], [2 ** 64 - 4]),         # off + len wraps around in 64 bits
                       ([0, -1], [8, 4]),           # negative
                       ([0], [8, 8])):              # lists that do not pair up
        with pytest.raises(ValueError):
            impl(region, offs, lens, b"hdr", b"x" * 40)
        assert backing == bytes(64)
    with pytest.raises((TypeError, BufferError, ValueError)):
        impl(memoryview(bytes(64)), [0], [8], b"hdr", b"data")   # a read-only region
    assert impl(region, [60], [4], b"", b"abcdefgh") == 4 and backing[60:] == b"abcd"
