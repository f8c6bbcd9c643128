import pytest

from stack.checksum import ones_sum
from stack.wire.ipv4 import Ipv4Error, build_header, fragment_payload, parse_header
from tests.stack.conftest import (GUEST_IP, GUEST_MAC, GW_IP, ICMP, IP, UDP, Ether,
                                  assert_checksums, eth, eth_ip_header, ip, send)
from scapy.layers.inet import IPOption_RR, IPOption_NOP
from scapy.layers.inet import defragment


def ping(size=56, **kw):
    return eth() / ip(**kw) / ICMP(type=8, id=7, seq=9) / (bytes(range(251)) * 300)[:size]


def test_parse_header_against_scapy():
    raw = bytes(IP(src="1.2.3.4", dst="5.6.7.8", id=77, ttl=9, tos=0x10, flags="DF", proto=17)
                / (b"x" * 10))
    r = parse_header(raw)
    assert (r.src, r.dst, r.proto, r.ihl, r.total_len, r.ident, r.ttl, r.tos) == \
        (bytes([1, 2, 3, 4]), bytes([5, 6, 7, 8]), 17, 20, 30, 77, 9, 0x10)
    assert r.flags_frag == 0x4000 and not r.is_fragment


def test_build_header_decoded_by_scapy():
    h = build_header(bytes([10, 0, 2, 2]), bytes([10, 0, 2, 15]), 17, 100, 0x1234, 0x2000 | 3)
    p = IP(bytes(h) + bytes(100))
    assert p.src == GW_IP and p.dst == GUEST_IP and p.len == 120 and p.id == 0x1234
    assert p.flags.MF and p.frag == 3
    assert_checksums(p)
    parse_header(bytes(h) + bytes(100))


@pytest.mark.parametrize("mutate,reason", [
    (lambda b: b[:10], "ipv4_truncated"),
    (lambda b: bytes([0x65]) + b[1:], "ipv4_bad_version"),
    (lambda b: bytes([0x44]) + b[1:], "ipv4_bad_ihl"),
    (lambda b: bytes([0x4F]) + b[1:], "ipv4_truncated"),
    (lambda b: b[:2] + b"\x00\x10" + b[4:], "ipv4_bad_total_length"),
    (lambda b: b[:2] + b"\x04\x00" + b[4:], "ipv4_truncated"),
    (lambda b: b[:10] + bytes([b[10] ^ 1]) + b[11:], "ipv4_bad_checksum"),
])
def test_malformed_headers(st, mutate, reason):
    raw = bytes(ip() / ICMP(type=8) / b"abcd")
    bad = mutate(raw)
    with pytest.raises(Ipv4Error) as ei:
        parse_header(bad)
    assert ei.value.reason == reason
    assert send(st, eth_ip_header() + bad) == []
    assert st.counters["drop_" + reason] == 1


def test_padding_after_total_length_ignored(st):
    req = ping(size=4)
    out = send(st, bytes(req) + b"\xee" * 20)
    assert len(out) == 1
    assert bytes(out[0][ICMP].payload)[:4] == bytes(req[ICMP].payload)
    assert_checksums(out[0])


def test_options_skipped(st):
    req = eth() / ip(options=[IPOption_RR(routers=["1.1.1.1"]), IPOption_NOP()]) / \
        ICMP(type=8, id=3) / b"options!"
    out = send(st, req)
    assert len(out) == 1
    p = out[0]
    assert p[IP].ihl == 5 and p[ICMP].type == 0 and bytes(p[ICMP].payload)[:8] == b"options!"
    assert_checksums(p)


def test_multicast_source_dropped(st):
    req = eth() / IP(src="224.0.0.1", dst=GW_IP) / ICMP(type=8)
    assert send(st, req) == []
    assert st.counters["drop_ipv4_bad_src"] == 1


def test_our_own_address_as_source_dropped(st):
    req = eth() / IP(src=GW_IP, dst=GW_IP) / UDP(sport=7, dport=7) / b"loop?"
    assert send(st, req) == []
    assert st.counters["drop_ipv4_bad_src"] == 1


def test_wrong_destination_mac_dropped(st):
    req = Ether(src=GUEST_MAC, dst="52:54:00:aa:bb:cc") / ip() / ICMP(type=8)
    assert send(st, req) == []
    assert st.counters["drop_eth_not_for_us"] == 1


def test_fragment_payload_pieces():
    pieces = fragment_payload(65515, 1500)
    assert pieces[0] == (0, 1480) and sum(n for _, n in pieces) == 65515
    assert all(n % 8 == 0 for _, n in pieces[:-1])
    assert fragment_payload(10, 1500) == [(0, 10)]


@pytest.mark.parametrize("size", [1473, 4000, 65507])
def test_big_echo_fragmented_both_ways(st, size):
    from scapy.layers.inet import fragment
    req = ping(size=size)
    frames = fragment(req[IP], fragsize=1480)
    out = []
    for f in frames:
        out += send(st, eth() / f)
    assert len(out) == -(-(size + 8) // 1480)
    for p in out:
        assert len(bytes(p)) <= 1514
        assert not p[IP].flags.DF
        assert_checksums(p)
    assert len({p[IP].id for p in out}) == 1
    whole = defragment([IP(bytes(p[IP])[:p[IP].len]) for p in out])
    assert len(whole) == 1
    rep = IP(bytes(whole[0]))
    assert rep[ICMP].type == 0 and bytes(rep[ICMP].payload) == bytes(req[ICMP].payload)
    # The reply's ICMP checksum covers the whole reassembled message.
    assert ones_sum(bytes(rep[ICMP])) == 0xFFFF
    assert st.counters["reasm_ok"] == (1 if len(frames) > 1 else 0)


def test_ping_of_death_fragment_dropped(st):
    # offset 8184*8 = 65472, + 100 bytes > 65535
    bad = eth() / ip(frag=8184, proto=1) / bytes(100)
    assert send(st, bad) == []
    assert st.counters["drop_reasm_too_big"] == 1


def test_udp_to_broadcast_no_error(st):
    req = eth("ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255") / \
        UDP(sport=68, dport=67) / b"dhcp"
    assert send(st, req) == []
    assert st.counters["drop_udp_no_socket"] == 1
    assert st.counters["icmp_err_tx"] == 0
