"""TCP header and options, checked both ways against scapy as an independent oracle."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from stack.checksum import ones_sum, pseudo_sum
from stack.wire.tcp import (ACK, FIN, PSH, SYN, TcpPacket, TcpParseError, TcpRepr, checksum,
                            encode_options, parse_options, verify)

SRC = bytes([10, 0, 2, 2])
DST = bytes([10, 0, 2, 15])


def scapy_view(seg: bytes):
    """Fill in the checksum with our own pseudo_sum and let scapy decode the result."""
    seg = bytearray(seg)
    cs = checksum(SRC, DST, seg)
    seg[16:18] = cs.to_bytes(2, "big")
    pkt = IP(src="10.0.2.2", dst="10.0.2.15", proto=6) / TCP(bytes(seg))
    pkt = IP(bytes(pkt))
    return pkt, seg


def scapy_checksum_ok(pkt) -> bool:
    got = pkt[TCP].chksum
    del pkt[TCP].chksum
    return IP(bytes(pkt))[TCP].chksum == got


def test_emit_syn_with_all_options_scapy_decodes():
    r = TcpRepr(40000, 80, 0xFFFFFFF0, 0, SYN, 65535, mss=1460, wscale=7, sack_permitted=True,
                timestamp=(123456, 0))
    seg = r.to_bytes()
    assert len(seg) == 40                      # Linux's 20-byte SYN option block
    pkt, _ = scapy_view(seg)
    t = pkt[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, t.window) == (40000, 80, 0xFFFFFFF0, 0, 65535)
    assert t.flags == "S"
    opts = dict((k, v) for k, v in t.options if k not in ("NOP", "EOL"))
    assert opts["MSS"] == 1460
    assert opts["WScale"] == 7
    assert "SAckOK" in opts
    assert opts["Timestamp"] == (123456, 0)
    assert scapy_checksum_ok(pkt)


def test_emit_data_with_ts_and_sack_scapy_decodes():
    payload = bytes(range(256)) * 5 + b"x"
    r = TcpRepr(80, 40000, 1000, 2000, ACK | PSH, 512, timestamp=(7, 8),
                sack_blocks=((3000, 4000), (5000, 6000), (0xFFFFFF00, 0x100)), payload=payload)
    seg = r.to_bytes()
    pkt, raw = scapy_view(seg)
    t = pkt[TCP]
    assert t.flags == "PA"
    assert bytes(t.payload) == payload
    opts = dict((k, v) for k, v in t.options if k not in ("NOP", "EOL"))
    assert opts["Timestamp"] == (7, 8)
    assert opts["SAck"] == (3000, 4000, 5000, 6000, 0xFFFFFF00, 0x100)
    assert scapy_checksum_ok(pkt)
    assert verify(SRC, DST, raw)
    # an independent check of the checksum arithmetic: the whole thing sums to 0xFFFF
    assert ones_sum(raw, pseudo_sum(SRC, DST, 6, len(raw))) == 0xFFFF


def test_sack_blocks_cut_to_fit_40_bytes():
    many = tuple((i * 100, i * 100 + 50) for i in range(6))
    assert len(encode_options(timestamp=(1, 2), sack_blocks=many)) == 40   # 12 + 4 + 3*8
    assert len(encode_options(sack_blocks=many)) == 36                      # 4 + 4*8
    _, _, _, blocks, ts = parse_options(encode_options(timestamp=(1, 2), sack_blocks=many))
    assert blocks == many[:3] and ts == (1, 2)


@pytest.mark.parametrize("flags", ["S", "SA", "A", "PA", "FA", "R", "RA", "F"])
def test_parse_what_scapy_builds(flags):
    t = TCP(sport=1234, dport=80, seq=0xDEADBEEF, ack=0x01020304, flags=flags, window=4321,
            urgptr=0, options=[("MSS", 1400), ("NOP", None), ("WScale", 20), ("SAckOK", b""),
                                ("Timestamp", (99, 77)), ("SAck", (10, 20))]) / b"hello"
    raw = bytes(t)
    r = TcpRepr.from_bytes(raw)
    assert (r.src_port, r.dst_port, r.seq, r.ack, r.window) == (1234, 80, 0xDEADBEEF, 0x01020304, 4321)
    assert r.flags == int(TCP(raw).flags)
    assert r.mss == 1400
    assert r.wscale == 14                      # RFC 7323: shifts above 14 are clamped
    assert r.sack_permitted
    assert r.timestamp == (99, 77)
    assert r.sack_blocks == ((10, 20),)
    assert bytes(r.payload) == b"hello"


def test_fast_path_timestamp_layout():
    raw = bytes(TCP(flags="A", options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))]))
    r = TcpRepr.from_bytes(raw)
    assert r.timestamp == (5, 6) and r.mss is None and not r.sack_permitted


def test_roundtrip_repr():
    r = TcpRepr(1, 2, 3, 4, SYN | ACK, 5, mss=536, wscale=0, sack_permitted=True,
                timestamp=(0xFFFFFFFF, 1), payload=b"")
    assert TcpRepr.from_bytes(r.to_bytes()) == TcpRepr(1, 2, 3, 4, SYN | ACK, 5, 0, 536, 0, True,
                                                       (), (0xFFFFFFFF, 1), b"")
    buf = bytearray(100)
    n = TcpRepr(1, 2, 3, 4, FIN | ACK, 5, payload=b"abc").emit(buf)
    assert n == 23 and bytes(buf[20:23]) == b"abc"
    assert TcpPacket.new_checked(buf[:n]).flags == FIN | ACK


@pytest.mark.parametrize("raw, reason", [
    (b"\x00" * 19, "tcp_truncated"),
    (bytes(12) + b"\x40" + bytes(7), "tcp_bad_data_offset"),          # offset 4 < 5
    (bytes(12) + b"\x60" + bytes(7), "tcp_bad_data_offset"),          # offset 6, only 20 bytes
    (bytes(12) + b"\x60" + bytes(7) + b"\x02\x04\x05", "tcp_bad_data_offset"),
    (bytes(12) + b"\x60" + bytes(7) + b"\x01\x01\x01\x02", "tcp_bad_options"),   # kind 2 w/o length
    (bytes(12) + b"\x60" + bytes(7) + b"\x08\x0a\x00\x00", "tcp_bad_options"),   # TS runs past end
    (bytes(12) + b"\x60" + bytes(7) + b"\x05\x01\x00\x00", "tcp_bad_options"),   # length < 2
])
def test_malformed(raw, reason):
    with pytest.raises(TcpParseError) as e:
        TcpRepr.from_bytes(raw)
    assert e.value.reason == reason


def test_known_option_with_wrong_length_is_ignored():
    raw = bytes(12) + b"\x70" + bytes(7) + b"\x02\x03\x05" + b"\x03\x04\x07\x00" + b"\x00"
    r = TcpRepr.from_bytes(raw)
    assert r.mss is None and r.wscale is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_parse_never_raises_anything_but_parse_error(raw):
    try:
        r = TcpRepr.from_bytes(raw)
    except TcpParseError:
        return
    assert len(r.payload) <= len(raw) - 20
