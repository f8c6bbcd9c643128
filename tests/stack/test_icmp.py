import pytest

from tests.stack.conftest import (DNS_IP, GUEST_IP, GUEST_MAC, GW_IP, GW_MAC, ICMP, IP,
                                  UDP, assert_checksums, eth, ip, send)


def ping(dst=GW_IP, size=56, ident=0x1234, seq=1, **kw):
    return eth() / ip(dst, **kw) / ICMP(type=8, id=ident, seq=seq) / (bytes(range(256)) * 300)[:size]


@pytest.mark.parametrize("dst", [GW_IP, DNS_IP])
@pytest.mark.parametrize("size", [0, 1, 56, 1472])
def test_echo_reply(st, dst, size):
    req = ping(dst, size)
    out = send(st, req)
    assert len(out) == 1
    p = out[0]
    assert p.src == GW_MAC and p.dst == GUEST_MAC
    assert p[IP].src == dst and p[IP].dst == GUEST_IP and p[IP].ttl == 64
    assert p[IP].flags == 0 and p[IP].frag == 0
    assert p[ICMP].type == 0 and p[ICMP].code == 0
    assert p[ICMP].id == 0x1234 and p[ICMP].seq == 1
    assert bytes(p[ICMP].payload)[:size] == bytes(req[ICMP].payload)
    assert_checksums(p)


def test_many_echo_ids_differ_and_checksums_hold(st):
    ids = set()
    for seq in range(200):
        p = send(st, ping(size=seq, seq=seq, ident=(seq * 331) & 0xFFFF))[0]
        assert_checksums(p)
        ids.add(p[IP].id)
    assert len(ids) == 200


def test_bad_icmp_checksum_dropped(st):
    req = ping()
    req[ICMP].chksum = 0xDEAD
    assert send(st, req) == []
    assert st.counters["drop_icmp_bad_checksum"] == 1


def test_csum_valid_skips_verification(st):
    req = ping()
    raw = bytearray(bytes(req))
    out = send(st, bytes(raw), csum_valid=True)
    assert len(out) == 1
    assert_checksums(out[0])


def test_echo_to_broadcast_ignored(st):
    req = eth("ff:ff:ff:ff:ff:ff") / ip("10.0.2.255") / ICMP(type=8)
    assert send(st, req) == []
    assert st.counters["icmp_echo_broadcast_ignored"] == 1


def test_echo_reply_from_guest_is_not_answered(st):
    assert send(st, eth() / ip() / ICMP(type=0)) == []


def test_outside_address_host_unreachable(st):
    req = ping("8.8.8.8")
    out = send(st, req)
    assert len(out) == 1
    p = out[0]
    assert p[IP].src == GW_IP and p[IP].dst == GUEST_IP
    assert p[ICMP].type == 3 and p[ICMP].code == 1
    quoted = bytes(p[ICMP].payload)
    assert quoted == bytes(req[IP])[:28]
    assert_checksums(p)
    assert st.counters["drop_ipv4_no_route"] == 1


def test_ttl_expired_time_exceeded(st):
    out = send(st, ping("8.8.8.8", ttl=1))
    assert out[0][ICMP].type == 11 and out[0][ICMP].code == 0


def test_unreachable_rate_limited(st):
    n = 0
    for i in range(100):
        n += len(send(st, ping("8.8.8.8"), now=0.0))
    assert n == 20
    assert st.counters["icmp_err_ratelimited"] == 80
    assert len(send(st, ping("8.8.8.8"), now=1.0)) == 1


def test_no_error_about_icmp_error(st):
    err = eth() / ip("8.8.8.8") / ICMP(type=3, code=3) / IP(src="8.8.8.8", dst=GUEST_IP) / UDP()
    assert send(st, err) == []
    assert st.counters["icmp_err_suppressed"] == 1


def test_no_error_about_non_first_fragment(st):
    frag = eth() / ip("8.8.8.8", frag=10) / bytes(16)
    assert send(st, frag) == []
    assert st.counters["icmp_err_suppressed"] == 1


def test_port_unreachable_quotes_header_and_8_bytes(st):
    req = eth() / ip(DNS_IP) / UDP(sport=4444, dport=53) / b"query-bytes"
    out = send(st, req)
    assert len(out) == 1
    p = out[0]
    assert p[IP].src == DNS_IP and p[ICMP].type == 3 and p[ICMP].code == 3
    assert bytes(p[ICMP].payload) == bytes(req[IP])[:28]
    assert_checksums(p)


def test_protocol_unreachable(st):
    out = send(st, eth() / ip(proto=47) / b"gre?")
    assert out[0][ICMP].type == 3 and out[0][ICMP].code == 2
