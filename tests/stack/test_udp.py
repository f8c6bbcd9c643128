import pytest

from stack import Frame
from stack.checksum import finalize_l4_checksum
from stack.udp import MAX_PAYLOAD, UdpLayer
from stack.wire import udp as udpw
from tests.stack.conftest import (DNS_IP, GUEST_IP, GUEST_MAC, GW_IP, GW_MAC, ICMP, IP, UDP,
                                  Ether, assert_checksums, eth, ip, send, send_raw)

G = bytes([10, 0, 2, 15])
GW = bytes([10, 0, 2, 2])


def dgram(payload=b"hello", dport=7, sport=5000, dst=GW_IP, **kw):
    return eth() / ip(dst) / UDP(sport=sport, dport=dport, **kw) / payload


@pytest.mark.parametrize("payload", [b"", b"x", b"hello world", bytes(1472)])
def test_echo(st, payload):
    out = send(st, dgram(payload))
    assert len(out) == 1
    p = out[0]
    assert p.dst == GUEST_MAC and p.src == GW_MAC
    assert p[IP].src == GW_IP and p[IP].dst == GUEST_IP
    assert p[UDP].sport == 7 and p[UDP].dport == 5000
    assert bytes(p[UDP].payload)[:len(payload)] == payload and p[UDP].len == 8 + len(payload)
    assert p[UDP].chksum != 0
    assert_checksums(p)


def test_discard(st):
    assert send(st, dgram(b"gone", dport=9)) == []
    assert st.counters["udp_rx"] == 1
    assert st.snapshot()["udp"][1] == {"ip": GW_IP, "port": 9, "rx": 1, "tx": 0}


def test_echo_only_on_gateway(st):
    out = send(st, dgram(dst=DNS_IP))
    assert out[0][ICMP].type == 3 and out[0][ICMP].code == 3


def test_bad_checksum_dropped(st):
    assert send(st, dgram(chksum=0x1234)) == []
    assert st.counters["drop_udp_bad_checksum"] == 1


def test_zero_checksum_means_none(st):
    assert len(send(st, dgram(chksum=0))) == 1


@pytest.mark.parametrize("meta", [{"csum_valid": True}, {"csum_start": 34, "csum_offset": 6}])
def test_checksum_offload_from_guest_skips_verification(st, meta):
    assert len(send(st, dgram(chksum=0x1234), **meta)) == 1


@pytest.mark.parametrize("mutate,reason", [
    (lambda b: b[:14 + 20 + 4], "ipv4_bad_total_length"),
    (lambda b: b[:38] + b"\x00\x04" + b[40:], "udp_bad_length"),
    (lambda b: b[:38] + b"\xff\x00" + b[40:], "udp_bad_length"),
])
def test_malformed(st, mutate, reason):
    raw = bytes(dgram())
    bad = mutate(raw)
    st.receive(Frame(bad), 0)
    assert st.take_frames() == []
    assert sum(v for k, v in st.counters.items() if k.startswith("drop_")) == 1
    if reason.startswith("udp"):
        assert st.counters["drop_" + reason] == 1


def test_truncated_udp_header(st):
    raw = bytes(eth() / ip(proto=17) / b"abc")
    assert send(st, raw) == []
    assert st.counters["drop_udp_truncated"] == 1


def test_partial_checksum_when_guest_accepts_it(st):
    st.set_offloads(csum=True, tso=False)
    frames = send_raw(st, dgram(b"partial please"))
    assert len(frames) == 1
    f = frames[0]
    assert f.csum_start == 34 and f.csum_offset == 6
    p = Ether(bytes(f.data))
    # The field holds the (uncomplemented) pseudo-header sum.
    from stack.checksum import pseudo_sum
    assert p[UDP].chksum == pseudo_sum(GW, G, 17, 8 + 14)
    finalize_l4_checksum(f)
    assert f.csum_start == 0
    assert_checksums(Ether(bytes(f.data)))


def test_partial_not_used_for_fragmented(st):
    st.set_offloads(csum=True, tso=True)
    from scapy.layers.inet import fragment
    frames = []
    for fr in fragment(ip() / UDP(sport=1, dport=7) / bytes(3000), fragsize=1480):
        frames += send_raw(st, eth() / fr)
    assert len(frames) == 3 and all(f.csum_start == 0 for f in frames)


def test_finalize_udp_zero_becomes_ffff():
    # Choose a payload so that the full checksum computes to 0.
    from stack.checksum import ones_sum, pseudo_sum
    base = udpw.build(GW, G, 7, 5000, b"\0\0", partial=False)
    cs = (base[6] << 8) | base[7]
    # Adding `cs` to the payload word makes the sum 0xFFFF -> checksum 0.
    payload = bytes([cs >> 8, cs & 0xFF])
    d = udpw.build(GW, G, 7, 5000, payload, partial=True)
    frame = Frame(bytearray(14 + 20) + d, csum_start=34, csum_offset=6)
    finalize_l4_checksum(frame)
    assert frame.data[34 + 6:34 + 8] == b"\xff\xff"
    assert ones_sum(frame.data[34:], pseudo_sum(GW, G, 17, len(d))) == 0xFFFF


def test_finalize_rejects_field_past_end():
    with pytest.raises(ValueError):
        finalize_l4_checksum(Frame(bytearray(40), csum_start=34, csum_offset=16))


def test_wire_build_parse_against_scapy():
    d = udpw.build(GW, G, 53, 1234, b"payload")
    p = UDP(bytes(d))
    assert (p.sport, p.dport, p.len) == (53, 1234, 15)
    r = udpw.UdpRepr.parse(bytes(UDP(sport=1, dport=2) / b"abc"))
    assert (r.src_port, r.dst_port, r.length) == (1, 2, 11)
    full = bytes(IP(src=GUEST_IP, dst=GW_IP) / UDP(sport=1, dport=2) / b"abc")[20:]
    assert udpw.verify(G, GW, full)
    assert not udpw.verify(G, GW, full[:-1] + b"d")
    with pytest.raises(udpw.UdpError):
        udpw.UdpRepr.parse(b"\0" * 7)


def test_max_size_echo(st):
    from scapy.layers.inet import defragment, fragment
    data = bytes(range(256)) * 255 + bytes(range(227))
    assert len(data) == MAX_PAYLOAD
    out = []
    for fr in fragment(ip() / UDP(sport=999, dport=7) / data, fragsize=1480):
        out += send(st, eth() / fr)
    assert len(out) == 45
    whole = IP(bytes(defragment([IP(bytes(p[IP])[:p[IP].len]) for p in out])[0]))
    assert whole.len == 65535 and bytes(whole[UDP].payload) == data


def test_broadcast_reaches_only_wildcard_sockets(st):
    got = []
    st.udp.bind(5353, lambda s, d, sip, sp, dip: got.append((d, dip)))
    bc = eth("ff:ff:ff:ff:ff:ff") / ip("10.0.2.255") / UDP(sport=1, dport=5353) / b"hi"
    assert send(st, bc) == []
    bc7 = eth("ff:ff:ff:ff:ff:ff") / ip("10.0.2.255") / UDP(sport=1, dport=7) / b"hi"
    assert send(st, bc7) == []  # echo is bound to 10.0.2.2 only
    assert got == [(b"hi", bytes([10, 0, 2, 255]))]


def test_socket_layer_api():
    sent = []
    from collections import Counter
    layer = UdpLayer(lambda *a: sent.append(a), Counter(), GW, max_sockets=2)
    s = layer.bind(100, lambda *a: None)
    with pytest.raises(OSError):
        layer.bind(100, lambda *a: None)
    layer.bind(101, lambda *a: None)
    with pytest.raises(OSError):
        layer.bind(102, lambda *a: None)
    with pytest.raises(ValueError):
        layer.bind(0, lambda *a: None)
    s.send(b"x", G, 9)
    assert sent == [(GW, G, 100, 9, b"x")]
    with pytest.raises(ValueError):
        s.send(bytes(MAX_PAYLOAD + 1), G, 9)
    s.close()
    with pytest.raises(ValueError):
        s.send(b"x", G, 9)
    layer.bind(100, lambda *a: None)  # port free again


def test_echo_ignores_port_zero(st):
    assert send(st, dgram(sport=0)) == []
