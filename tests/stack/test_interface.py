import json

import pytest

from stack import Frame, NetConfig
from stack.interface import FRAME_HEADROOM, TSO_MAX_PAYLOAD, Stack
from stack.checksum import finalize_l4_checksum
from tests.stack.conftest import (GUEST_IP, GUEST_MAC, GW_IP, GW_MAC, ICMP, IP, Ether,
                                  assert_checksums, eth, ip, send, send_raw)
from scapy.layers.inet import TCP

G = bytes([10, 0, 2, 15])
GW = bytes([10, 0, 2, 2])


class FakeTcp:
    """Stands in for stack.tcp.layer.TcpLayer to test the wiring only."""

    def __init__(self):
        self.rx = []
        self.tso = "unset"
        self.counters = {"segs": 3}

    def receive(self, now, src, dst, seg, routed=False):
        self.rx.append((now, bytes(src), bytes(dst), bytes(seg)))

    def set_tso(self, m):
        self.tso = m

    def poll(self, now):
        pass

    def flush_acks(self, now):
        pass

    def next_deadline(self):
        return 7.5

    def snapshot(self, limit=None):
        return [{"conn": 1}]

    connection_count = 1


@pytest.fixture
def st_tcp(st):
    st.tcp = FakeTcp()
    return st


def test_take_frames_clears_and_orders(st):
    send_raw(st, eth() / ip() / ICMP(type=8, seq=1))
    st.receive(Frame(bytes(eth() / ip() / ICMP(type=8, seq=2))), 0)
    st.receive(Frame(bytes(eth() / ip() / ICMP(type=8, seq=3))), 0)
    out = st.take_frames()
    assert [Ether(bytes(f.data))[ICMP].seq for f in out] == [2, 3]
    assert st.take_frames() == []
    assert st.counters["tx_frames"] == 3 and st.counters["rx_frames"] == 3


def test_snapshot_is_json(st_tcp):
    send(st_tcp, eth() / ip() / ICMP(type=8), now=1.0)
    snap = json.loads(json.dumps(st_tcp.snapshot()))
    assert set(snap) >= {"arp", "udp", "tcp", "counters"}
    assert snap["arp"][0]["mac"] == GUEST_MAC
    assert snap["tcp"] == [{"conn": 1}]
    assert snap["counters"]["icmp_echo"] == 1 and snap["counters"]["tcp_segs"] == 3


def test_next_deadline_combines(st_tcp):
    assert st_tcp.next_deadline() == 7.5
    send(st_tcp, eth() / ip() / ICMP(type=8), now=1.0)
    assert st_tcp.next_deadline() == 7.5
    st_tcp.tcp = None
    assert st_tcp.next_deadline() == 1.0 + st_tcp.arp.ttl


def test_set_offloads_drives_tso(st_tcp):
    st_tcp.set_offloads(csum=True, tso=True)
    assert st_tcp.tcp.tso == TSO_MAX_PAYLOAD == 65475
    st_tcp.set_offloads(csum=False, tso=True)  # TSO needs checksum offload
    assert st_tcp.tcp.tso is None


def test_tcp_unavailable_counted(st):
    st.tcp = None
    assert send(st, eth() / ip() / TCP(dport=7, flags="S")) == []
    assert st.counters["drop_tcp_unavailable"] == 1


def test_tcp_delivery_checks_checksum(st_tcp):
    good = eth() / ip() / TCP(sport=1234, dport=7, flags="S", seq=99)
    send(st_tcp, good, now=2.0)
    assert len(st_tcp.tcp.rx) == 1
    now, src, dst, seg = st_tcp.tcp.rx[0]
    assert (now, src, dst) == (2.0, G, GW) and TCP(seg).seq == 99
    bad = eth() / ip() / TCP(sport=1234, dport=7, flags="S", chksum=1)
    send(st_tcp, bad)
    assert st_tcp.counters["drop_tcp_bad_checksum"] == 1 and len(st_tcp.tcp.rx) == 1
    send(st_tcp, bad, csum_valid=True)
    assert len(st_tcp.tcp.rx) == 2


def tcp_segment(payload_len, flags=0x18):
    """A segment as the TCP layer hands it to Stack._tcp_emit: FRAME_HEADROOM
    bytes in front (TcpLayer(headroom=...)), checksum field zero."""
    seg = bytes(TCP(sport=7, dport=40000, seq=1000, ack=1, flags=flags, window=100))
    seg = bytearray(seg)
    seg[16] = seg[17] = 0
    return bytearray(FRAME_HEADROOM) + seg + bytes((i * 3) & 0xFF for i in range(payload_len))


def test_tcp_frame_built_in_the_segment(st):
    """The frame is the segment's own bytearray, the headers written into
    its headroom: no copy of the payload (full checksum, partial, TSO)."""
    send(st, eth() / ip() / ICMP(type=8))
    for csum, tso, plen, gso in ((False, False, 100, 0), (True, False, 100, 0), (True, True, 10000, 1460)):
        st.set_offloads(csum=csum, tso=tso)
        seg = tcp_segment(plen)
        tcp = bytes(seg[FRAME_HEADROOM:])
        st._tcp_emit(GW, G, seg, gso)
        f, = st.take_frames()
        assert f.data is seg
        p = Ether(bytes(f.data))
        assert p.dst == GUEST_MAC and p[IP].len == 20 + len(tcp) and p[IP].flags.DF
        raw = bytes(p[IP].payload)
        assert raw[:16] == tcp[:16] and raw[18:] == tcp[18:]     # all but the checksum field
        finalize_l4_checksum(f)
        p = Ether(bytes(f.data))
        q = p[IP].copy()
        q[TCP].chksum = None
        assert IP(bytes(q))[TCP].chksum == p[TCP].chksum
        assert IP(bytes(p[IP])).chksum == p[IP].chksum


def test_tcp_layer_emits_segments_with_the_stacks_headroom(st):
    """The stack's TCP layer reserves exactly FRAME_HEADROOM zero bytes in
    front of every segment it emits (what _send_ip writes over)."""
    seen = []
    emit = st._tcp_emit
    st.tcp._emit = lambda s, d, seg, gso: (seen.append(bytes(seg)), emit(s, d, seg, gso))
    send(st, eth() / ip() / ICMP(type=8))
    syn = eth() / ip() / TCP(sport=40001, dport=9, seq=1, flags="S", options=[("MSS", 1460)])
    send(st, syn)
    assert st.tcp.headroom == FRAME_HEADROOM and seen
    for seg in seen:
        assert seg[:FRAME_HEADROOM] == bytes(FRAME_HEADROOM)
        assert TCP(seg[FRAME_HEADROOM:]).flags == "SA"


def test_tcp_emit_full_checksum(st):
    send(st, eth() / ip() / ICMP(type=8))  # learn the guest MAC
    st._tcp_emit(GW, G, tcp_segment(100), 0)
    f, = st.take_frames()
    assert f.csum_start == 0
    p = Ether(bytes(f.data))
    assert p.dst == GUEST_MAC and p[IP].flags.DF and p[IP].proto == 6
    q = p[IP].copy()
    q[TCP].chksum = None
    assert IP(bytes(q))[TCP].chksum == p[TCP].chksum


def test_tcp_emit_partial_and_tso(st):
    st.set_offloads(csum=True, tso=True)
    send(st, eth() / ip() / ICMP(type=8))
    st._tcp_emit(GW, G, tcp_segment(100), 0)
    st._tcp_emit(GW, G, tcp_segment(10000), 1460)
    a, b = st.take_frames()
    assert (a.csum_start, a.csum_offset, a.gso_size) == (34, 16, 0)
    assert (b.csum_start, b.csum_offset, b.gso_size) == (34, 16, 1460)
    assert Ether(bytes(b.data))[IP].len == 20 + 20 + 10000
    for f in (a, b):
        finalize_l4_checksum(f)
        p = Ether(bytes(f.data))
        q = p[IP].copy()
        q[TCP].chksum = None
        assert IP(bytes(q))[TCP].chksum == p[TCP].chksum


def test_tcp_emit_gso_without_tso_is_segmented(st):
    send(st, eth() / ip() / ICMP(type=8))
    st._tcp_emit(GW, G, tcp_segment(4000, flags=0x19), 1460)
    out = st.take_frames()
    assert len(out) == 3
    for i, f in enumerate(out):
        p = Ether(bytes(f.data))
        assert p[TCP].seq == 1000 + 1460 * i and len(p) <= 1514
        assert ("F" in str(p[TCP].flags)) == (i == 2)


def test_oversize_df_dropped(st):
    send(st, eth() / ip() / ICMP(type=8))
    st._tcp_emit(GW, G, tcp_segment(3000), 0)
    assert st.take_frames() == []
    assert st.counters["drop_tx_df_too_big"] == 1


def test_custom_config_addresses():
    cfg = NetConfig(guest_ip="192.168.7.9", gateway_ip="192.168.7.1", dns_ip="192.168.7.53",
                    mtu=576)
    st = Stack(cfg)
    req = Ether(src=GUEST_MAC, dst=cfg.gateway_mac) / IP(src="192.168.7.9", dst="192.168.7.53") \
        / ICMP(type=8) / bytes(1000)
    from scapy.layers.inet import fragment
    out = []
    for fr in fragment(req[IP], fragsize=552):
        out += send(st, Ether(src=GUEST_MAC, dst=cfg.gateway_mac) / fr)
    assert out and all(len(p[IP]) <= 576 for p in out)
    assert all(p[IP].src == "192.168.7.53" for p in out)


def test_frame_views_are_not_kept(st):
    """The stack copies what it keeps: scribbling over the guest buffer
    afterwards does not change queued output."""
    buf = bytearray(bytes(eth() / ip() / ICMP(type=8, seq=5) / b"abcdefgh"))
    st.receive(Frame(memoryview(buf)), 0.0)
    buf[:] = bytes(len(buf))
    p = Ether(bytes(st.take_frames()[0].data))
    assert p[ICMP].seq == 5 and bytes(p[ICMP].payload)[:8] == b"abcdefgh"
    assert_checksums(p)


def test_tcp_handshake_through_real_layer():
    """SYN -> SYN-ACK -> ACK against the real TCP layer, scapy on both ends."""
    pytest.importorskip("stack.tcp.layer")
    st = Stack(NetConfig())
    assert st.tcp is not None
    accepted = []
    st.tcp.listen(GW, 5555, accepted.append)
    syn = eth() / ip() / TCP(sport=41000, dport=5555, flags="S", seq=1000, window=64240,
                             options=[("MSS", 1460)])
    out = send(st, syn, now=1.0)
    assert len(out) == 1
    p = out[0]
    assert p.dst == GUEST_MAC and p.src == GW_MAC
    assert p[IP].src == GW_IP and p[IP].dst == GUEST_IP and p[IP].flags.DF
    t = p[TCP]
    assert str(t.flags) == "SA" and t.ack == 1001 and (t.sport, t.dport) == (5555, 41000)
    q = p[IP].copy()
    q[TCP].chksum = None
    assert IP(bytes(q))[TCP].chksum == t.chksum
    ack = eth() / ip() / TCP(sport=41000, dport=5555, flags="A", seq=1001, ack=t.seq + 1,
                             window=64240)
    send(st, ack, now=1.01)
    assert len(accepted) == 1
    assert st.snapshot()["tcp"]


def test_tcp_closed_port_gets_rst():
    pytest.importorskip("stack.tcp.layer")
    st = Stack(NetConfig())
    out = send(st, eth() / ip() / TCP(sport=41000, dport=5556, flags="S", seq=5), now=0.0)
    assert len(out) == 1 and "R" in str(out[0][TCP].flags) and out[0][TCP].ack == 6


def test_output_queue_bounded():
    st = Stack(NetConfig(), max_out=5)
    for i in range(8):
        st.receive(Frame(bytes(eth() / ip() / ICMP(type=8, seq=i))), 0.0)
    assert len(st.take_frames()) == 5
    assert st.counters["drop_tx_queue_full"] == 3
