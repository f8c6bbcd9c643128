"""DNS relay, stack half (stack/services/dns.py): queries become pulled events,
answers go back verbatim, silence becomes SERVFAIL, the cap holds. dnspython
builds the queries and scapy/dnspython decode what the guest receives."""
from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from stack import Frame, NetConfig
from stack.interface import Stack
from stack.services.config import ServicesConfig
from stack.services.dns import DnsQuery
from stack.tcp.layer import TcpLayer
from tests.stack.conftest import DNS_IP, GUEST_IP, IP, UDP, Ether, assert_checksums, eth, ip, send

G = bytes([10, 0, 2, 15])
D = bytes([10, 0, 2, 3])


def mk(**kw) -> Stack:
    return Stack(NetConfig(), net_services=ServicesConfig(dhcp=False, **kw))


def query(name="example.test.", rdtype="A", qid=0x4242, **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    q.id = qid
    return q


def udp_q(wire: bytes, sport=5353):
    return eth() / ip(DNS_IP) / UDP(sport=sport, dport=53) / wire


def reply_of(p) -> bytes:
    assert p[IP].src == DNS_IP and p[IP].dst == GUEST_IP and p[UDP].sport == 53
    assert_checksums(p)
    return bytes(p[UDP])[8:p[UDP].len]


def answer_for(q, rcode=dns.rcode.NOERROR, tc=False, addr="192.0.2.7") -> bytes:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if rcode == dns.rcode.NOERROR:
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", addr))
    if tc:
        r.flags |= dns.flags.TC
    return r.to_wire()


def test_udp_query_becomes_event_and_answer_is_verbatim():
    st = mk()
    q = query()
    assert send(st, udp_q(q.to_wire())) == []
    ev = st.take_events()
    assert len(ev) == 1 and isinstance(ev[0], DnsQuery)
    e = ev[0]
    assert e.wire == q.to_wire() and e.transport == "udp" and e.qname == "example.test." and e.qtype == 1
    a = answer_for(q)
    st.net_services.dns.answer(e.key, a)
    out = [Ether(bytes(f.data)) for f in st.take_frames()]
    assert len(out) == 1 and reply_of(out[0]) == a and out[0][UDP].dport == 5353
    assert st.counters["dns_queries"] == 1 and st.counters["dns_answered"] == 1
    assert st.take_events() == []


@pytest.mark.parametrize("rcode,tc,counter", [(dns.rcode.NXDOMAIN, False, "dns_nxdomain"),
                                               (dns.rcode.NOERROR, True, "dns_truncated")])
def test_nxdomain_and_truncation_relayed_as_sent(rcode, tc, counter):
    st = mk()
    q = query()
    send(st, udp_q(q.to_wire()))
    (e,) = st.take_events()
    a = answer_for(q, rcode, tc)
    st.net_services.dns.answer(e.key, a)
    (p,) = [Ether(bytes(f.data)) for f in st.take_frames()]
    got = dns.message.from_wire(reply_of(p))
    assert reply_of(p) == a and got.rcode() == rcode and bool(got.flags & dns.flags.TC) == tc
    assert st.counters[counter] == 1


def test_silent_upstream_times_out_to_servfail():
    st = mk(dns_timeout=2.0)
    q = query()
    send(st, udp_q(q.to_wire()), now=10.0)
    (e,) = st.take_events()
    assert st.net_services.next_deadline() == 12.0
    st.poll(11.9)
    assert st.take_frames() == []
    st.poll(12.0)
    (p,) = [Ether(bytes(f.data)) for f in st.take_frames()]
    r = dns.message.from_wire(reply_of(p))
    assert r.id == q.id and r.rcode() == dns.rcode.SERVFAIL and r.question == q.question
    assert st.counters["dns_timed_out"] == 1
    st.net_services.dns.answer(e.key, answer_for(q))       # too late: dropped, counted
    assert st.take_frames() == [] and st.counters["dns_late_answer"] == 1


def test_upstream_failure_is_servfail():
    st = mk()
    q = query()
    send(st, udp_q(q.to_wire()))
    (e,) = st.take_events()
    st.net_services.dns.fail(e.key)
    (p,) = [Ether(bytes(f.data)) for f in st.take_frames()]
    assert dns.message.from_wire(reply_of(p)).rcode() == dns.rcode.SERVFAIL
    assert st.counters["dns_failed"] == 1


def test_answer_with_wrong_id_is_not_relayed():
    st = mk()
    q = query()
    send(st, udp_q(q.to_wire()))
    (e,) = st.take_events()
    bad = bytearray(answer_for(q))
    bad[0:2] = b"\x99\x99"
    st.net_services.dns.answer(e.key, bytes(bad))
    (p,) = [Ether(bytes(f.data)) for f in st.take_frames()]
    r = dns.message.from_wire(reply_of(p))
    assert r.id == q.id and r.rcode() == dns.rcode.SERVFAIL
    assert st.counters["dns_bad_answer"] == 1


def test_inflight_cap_answers_servfail_and_counts():
    st = mk(dns_max_inflight=2)
    for i in range(2):
        assert send(st, udp_q(query(qid=i).to_wire(), sport=6000 + i)) == []
    (p,) = send(st, udp_q(query(qid=2).to_wire(), sport=6002))
    assert len(st.take_events()) == 2
    r = dns.message.from_wire(reply_of(p))
    assert r.id == 2 and r.rcode() == dns.rcode.SERVFAIL and p[UDP].dport == 6002
    assert st.counters["dns_inflight_cap"] == 1
    assert st.snapshot()["services"]["dns"]["inflight"] == 2


def test_malformed_queries():
    st = mk()
    assert send(st, udp_q(b"\x01\x02\x03")) == []
    assert st.counters["drop_dns_truncated"] == 1
    resp = answer_for(query())
    assert send(st, udp_q(resp)) == []                  # a response, not a query
    assert st.counters["drop_dns_not_query"] == 1
    (p,) = send(st, udp_q(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff"))
    r = reply_of(p)
    assert r[:2] == b"\x12\x34" and r[3] & 0xF == dns.rcode.FORMERR and r[2] & 0x80
    assert st.counters["dns_formerr"] == 1 and st.take_events() == []


def test_only_on_the_dns_address():
    st = mk()
    out = send(st, eth() / ip("10.0.2.2") / UDP(sport=5353, dport=53) / query().to_wire())
    assert out and out[0].haslayer("ICMP") and st.take_events() == []


# ------------------------------------------------------------------ TCP
class TcpClient:
    """A TcpLayer as the guest, wired to the Stack through real frames."""

    def __init__(self, st: Stack):
        self.st = st
        self.layer = TcpLayer(self._emit)
        self.now = 0.0

    def _emit(self, src, dst, seg, gso):
        pkt = bytes(eth() / IP(src=GUEST_IP, dst=DNS_IP, proto=6)) + bytes(seg)
        raw = bytearray(pkt)
        raw[16:18] = struct.pack("!H", 20 + len(seg))
        raw[24:26] = b"\0\0"
        from stack.checksum import checksum
        raw[24:26] = struct.pack("!H", checksum(bytes(raw[14:34])))
        self.st.receive(Frame(bytes(raw), csum_valid=True), self.now)

    def pump(self, rounds=50):
        for _ in range(rounds):
            frames = self.st.take_frames()
            if not frames:
                return
            for f in frames:
                b = bytes(f.data)
                if b[12:14] != b"\x08\x00" or b[23] != 6:
                    continue
                tot = struct.unpack_from("!H", b, 16)[0]
                self.layer.receive(self.now, b[26:30], b[30:34], memoryview(b)[34:14 + tot])


def framed(wire: bytes) -> bytes:
    return len(wire).to_bytes(2, "big") + wire


def test_tcp_queries_pipelined_answers_out_of_order():
    st = mk()
    cl = TcpClient(st)
    got = bytearray()
    conn = cl.layer.connect(0.0, G, 40000, D, 53)
    conn.on_readable = lambda c: got.extend(c.recv())
    cl.pump()
    q1, q2 = query("a.test.", qid=1), query("b.test.", "AAAA", qid=2)
    conn.send(framed(q1.to_wire())[:5])                 # split across segments
    cl.pump()
    conn.send(framed(q1.to_wire())[5:] + framed(q2.to_wire()))
    cl.pump()
    e1, e2 = st.take_events()
    assert e1.transport == e2.transport == "tcp" and e1.wire == q1.to_wire() and e2.qtype == 28
    a2, a1 = answer_for(q2), answer_for(q1, dns.rcode.NXDOMAIN)
    st.net_services.dns.answer(e2.key, a2)
    st.net_services.dns.answer(e1.key, a1)
    cl.pump()
    assert bytes(got) == framed(a2) + framed(a1)
    conn.close()
    cl.pump()
    assert st.counters["dns_tcp_conns"] == 1 and st.counters["dns_queries_tcp"] == 2


def test_tcp_connection_cap():
    st = mk(dns_tcp_max_conns=1)
    cl = TcpClient(st)
    c1 = cl.layer.connect(0.0, G, 40001, D, 53)
    cl.pump()
    c2 = cl.layer.connect(0.0, G, 40002, D, 53)
    cl.pump()
    assert c1.state.value == "ESTABLISHED" and c2.state.value == "CLOSED"
    assert st.counters["dns_tcp_refused"] == 1


def test_tcp_connection_is_not_read_past_the_pipeline_limit():
    from stack.services.dns import TCP_PIPELINE
    st = mk()
    cl = TcpClient(st)
    conn = cl.layer.connect(0.0, G, 40003, D, 53)
    cl.pump()
    conn.send(b"".join(framed(query(qid=i).to_wire()) for i in range(TCP_PIPELINE + 3)))
    cl.pump()
    ev = st.take_events()
    assert len(ev) == TCP_PIPELINE
    st.net_services.dns.answer(ev[0].key, answer_for(query(qid=0)))
    cl.pump()
    assert len(st.take_events()) == 1                   # one answered, one more read


def test_idle_tcp_connection_is_closed_and_frees_its_slot():
    from stack.services.dns import TCP_IDLE_TIMEOUT
    st = mk(dns_tcp_max_conns=1)
    cl = TcpClient(st)
    c1 = cl.layer.connect(0.0, G, 40010, D, 53)
    cl.pump()
    assert st.net_services.dns.next_deadline() == TCP_IDLE_TIMEOUT
    cl.now = TCP_IDLE_TIMEOUT
    st.poll(TCP_IDLE_TIMEOUT)
    cl.pump()
    assert st.counters["dns_tcp_idle_closed"] == 1 and c1.fin_received
    c2 = cl.layer.connect(cl.now, G, 40011, D, 53)
    cl.pump()
    assert c2.state.value == "ESTABLISHED" and st.counters["dns_tcp_refused"] == 0
