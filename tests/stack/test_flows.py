"""The flow API (stack/flows.py) and the routing step that feeds it, in
process: a guest TCP layer talks to the Stack through real frames that scapy
builds and decodes (tests/stack/nat_guest.py), and the test plays the host
proxy by pulling events and calling in."""
from __future__ import annotations

from stack.flows import (FlowConfig, IcmpEcho, IcmpEnded, TcpClosed, TcpEof, TcpEstablished,
                         TcpReadable, TcpRequest, TcpReset, TcpWritable, UdpDatagram, UdpEnded)
from stack.tcp.state import State
from stack.wire import icmp as icmpw

from .nat_guest import GUEST_B, GUEST_IP, GW_B, ICMP, IP, TCP, UDP, NatGuest, Raw, _b

FAR = "192.0.2.10"          # RFC 5737 TEST-NET-1: never leaves (no sockets here anyway)


def only(evs, kind):
    got = [e for e in evs if isinstance(e, kind)]
    assert len(got) == 1, evs
    return got[0]


def test_syn_is_held_until_accept_then_data_both_ways_and_clean_close():
    g = NatGuest()
    conn = g.connect(FAR, 80)
    req = only(g.events(), TcpRequest)
    assert (req.guest_ip, req.dst_ip, req.dst_port) == (GUEST_B, _b(FAR), 80)
    assert req.guest_port == conn.local_port
    # Held: the guest's SYN got no answer at all.
    assert [p for p in g.frames if TCP in p] == []
    assert conn.state is State.SYN_SENT
    g.flows.accept(g.now, req.fid)
    g.pump()
    synack = [p for p in g.frames if TCP in p][0]
    assert synack[TCP].flags == "SA" and synack[IP].src == FAR and synack[TCP].sport == 80
    assert conn.state is State.ESTABLISHED
    evs = g.events()
    assert only(evs, TcpEstablished).fid == req.fid
    # guest -> host
    conn.send(b"hello host")
    g.pump()
    assert any(isinstance(e, TcpReadable) for e in g.events())
    assert g.flows.readable(req.fid) == 10
    assert g.flows.peek(req.fid, 4) == b"hell"
    g.flows.consume(g.now, req.fid, 10)
    assert g.flows.readable(req.fid) == 0
    # host -> guest
    assert g.flows.send(g.now, req.fid, b"hello guest") == 11
    g.pump()
    assert conn.recv() == b"hello guest"
    # guest closes first, then the host side
    conn.close()
    g.pump()
    assert any(isinstance(e, TcpEof) for e in g.events())
    g.flows.close(g.now, req.fid)
    g.pump()
    assert only(g.events(), TcpClosed).fid == req.fid
    assert g.flows.counts()["tcp"] == 0
    assert conn.state in (State.TIME_WAIT, State.CLOSED)


def test_refuse_with_rst_and_with_icmp_unreachable():
    g = NatGuest()
    c1 = g.connect(FAR, 81)
    r1 = only(g.events(), TcpRequest)
    g.flows.refuse(g.now, r1.fid)
    g.pump()
    rst = [p for p in g.frames if TCP in p][-1]
    assert "R" in str(rst[TCP].flags) and rst[TCP].ack == (c1.iss + 1) & 0xFFFFFFFF
    assert c1.state is State.CLOSED and c1.error == "connection refused"

    c2 = g.connect(FAR, 82)
    r2 = only(g.events(), TcpRequest)
    g.flows.refuse(g.now, r2.fid, icmpw.UNREACH_HOST)
    g.pump()
    icmp = [p for p in g.other if ICMP in p][-1]
    assert (icmp[ICMP].type, icmp[ICMP].code) == (3, 1)
    quoted = icmp[ICMP].payload            # scapy decodes the quote as IP / TCP (8 bytes)
    assert quoted.dst == FAR and quoted.src == GUEST_IP
    assert bytes(quoted)[20:24] == c2.local_port.to_bytes(2, "big") + (82).to_bytes(2, "big")
    assert g.flows.counts()["tcp"] == 0


def test_slow_host_reader_closes_the_guests_window():
    g = NatGuest()
    conn = g.connect(FAR, 5001)
    req = only(g.events(), TcpRequest)
    g.flows.accept(g.now, req.fid)
    g.pump()
    data = bytes(range(256)) * 4096             # 1 MiB, more than the stack buffers
    sent = 0
    for _ in range(200):
        sent += conn.send(memoryview(data)[sent:])
        g.advance(0.05)
        if sent == len(data) or g.flows.readable(req.fid) == g.stack.tcp.config.rcvbuf:
            break
    g.advance(0.5)                              # the delayed ACK goes out
    cap = g.stack.tcp.config.rcvbuf
    # The proxy consumed nothing: the stack holds exactly one receive buffer...
    assert g.flows.readable(req.fid) == cap
    # ...and told the guest so: its last ACK (decoded by scapy) is a zero window.
    acks = [p for p in g.frames if TCP in p and p[IP].src == FAR]
    assert acks[-1][TCP].window == 0 and conn.snd_wnd == 0
    assert sent < len(data)
    # The host socket took 100 KiB: the window reopens, more data comes.
    g.flows.consume(g.now, req.fid, 100_000)
    g.pump()
    assert [p for p in g.frames if TCP in p and p[IP].src == FAR][-1][TCP].window > 0
    for _ in range(20):
        sent += conn.send(memoryview(data)[sent:])
        g.advance(0.05)
    assert g.flows.readable(req.fid) == cap
    assert g.flows.peek(req.fid, 4) == data[100_000:100_004]


def test_slow_guest_closes_the_host_side():
    from stack.tcp.config import TcpConfig
    g = NatGuest(guest_tcp=TcpConfig(rcvbuf=16384))
    conn = g.connect(FAR, 5002)
    req = only(g.events(), TcpRequest)
    g.flows.accept(g.now, req.fid)
    g.pump()
    g.events()
    fid = req.fid
    offered = 0
    blob = b"x" * 65536
    # The guest application never reads: the proxy keeps offering host bytes.
    for _ in range(100):
        space = g.flows.send_space(fid)
        if space == 0:
            break
        offered += g.flows.send(g.now, fid, blob[:min(space, len(blob))])
        g.advance(0.05)
    assert g.flows.send_space(fid) == 0
    assert g.flows.send(g.now, fid, b"more") == 0
    # The guest's window is shut, up to less than one segment (sender SWS
    # avoidance, RFC 9293 3.8.6.2.1, keeps that sliver unused).
    assert g.flows.guest_window(fid) < conn.mss
    # The stack holds at most its send buffer plus what the guest took.
    assert offered <= g.stack.tcp.config.sndbuf + 16384
    assert 16384 - conn.mss < conn.readable <= 16384
    g.events()
    # The guest reads: the stack drains and tells the proxy it may read more.
    got = 0
    for _ in range(100):
        got += len(conn.recv())
        g.advance(0.25)
        if any(isinstance(e, TcpWritable) for e in g.events()):
            break
    assert got > 0 and g.flows.send_space(fid) > 0


def test_guest_reset_and_host_abort():
    g = NatGuest()
    conn = g.connect(FAR, 6000)
    req = only(g.events(), TcpRequest)
    g.flows.accept(g.now, req.fid)
    g.pump()
    g.events()
    conn.abort()
    g.pump()
    ev = only(g.events(), TcpReset)
    assert ev.fid == req.fid and "reset" in ev.reason
    conn2 = g.connect(FAR, 6001)
    r2 = only(g.events(), TcpRequest)
    g.flows.accept(g.now, r2.fid)
    g.pump()
    g.flows.abort(g.now, r2.fid)
    g.pump()
    assert conn2.state is State.CLOSED and "reset" in conn2.error
    assert g.flows.counts()["tcp"] == 0


def test_syn_flood_is_capped_and_counted():
    g = NatGuest(FlowConfig(max_half_open=32))
    for port in range(1000, 1600):
        g.send_ip(IP(src=GUEST_IP, dst=FAR) / TCP(sport=port, dport=80, flags="S", seq=port))
    reqs = [e for e in g.events() if isinstance(e, TcpRequest)]
    assert len(reqs) == 32
    assert g.flows.counts()["tcp"] == 32
    assert g.stack.all_counters()["tcp_listen_overflow"] == 600 - 32
    # The proxy refusing them frees the slots.
    for r in reqs:
        g.flows.refuse(g.now, r.fid)
    g.send_ip(IP(src=GUEST_IP, dst=FAR) / TCP(sport=2000, dport=80, flags="S", seq=1))
    assert len([e for e in g.events() if isinstance(e, TcpRequest)]) == 1


def test_held_syn_times_out_without_an_answer():
    g = NatGuest()
    g.send_ip(IP(src=GUEST_IP, dst=FAR) / TCP(sport=3333, dport=80, flags="S", seq=7))
    only(g.events(), TcpRequest)
    # A retransmitted SYN while held is not answered either.
    g.send_ip(IP(src=GUEST_IP, dst=FAR) / TCP(sport=3333, dport=80, flags="S", seq=7))
    assert g.stack.take_frames() == []
    g.advance(g.stack.tcp.config.hold_timeout + 1)
    assert isinstance(g.events()[-1], TcpReset)
    assert g.stack.all_counters()["tcp_held_syn_timeouts"] == 1


def test_udp_flow_reply_idle_expiry_and_spray_cap():
    g = NatGuest(FlowConfig(max_udp=50, udp_idle=30.0))
    g.send_ip(IP(src=GUEST_IP, dst=FAR) / UDP(sport=4000, dport=53) / Raw(b"query"))
    g.send_ip(IP(src=GUEST_IP, dst=FAR) / UDP(sport=4000, dport=53) / Raw(b"again"))
    evs = g.events()
    assert [(e.payload, e.new) for e in evs] == [(b"query", True), (b"again", False)]
    assert evs[0].fid == evs[1].fid and evs[0].dst_port == 53
    g.flows.udp_send(g.now, evs[0].fid, b"answer")
    g.pump()
    p = g.other[-1]
    assert p[IP].src == FAR and p[UDP].sport == 53 and p[UDP].dport == 4000
    assert p[Raw].load == b"answer"
    q = p[IP].copy()
    q[UDP].chksum = None
    assert IP(bytes(q))[UDP].chksum == p[UDP].chksum
    g.advance(29.0)
    assert g.events() == []
    g.advance(2.0)
    assert isinstance(only(g.events(), UdpEnded), UdpEnded)
    for port in range(5000, 5200):
        g.send_ip(IP(src=GUEST_IP, dst=FAR) / UDP(sport=port, dport=9999) / Raw(b"s"))
    assert len(g.events()) == 50
    assert g.stack.counters["nat_udp_flow_limit"] == 150


def test_tcp_calls_with_a_udp_flows_id_do_nothing():
    g = NatGuest()
    g.send_ip(IP(src=GUEST_IP, dst=FAR) / UDP(sport=4001, dport=53) / Raw(b"query"))
    fid = only(g.events(), UdpDatagram).fid
    fl = g.flows
    assert (fl.send_space(fid), fl.readable(fid), fl.peek(fid, 10), fl.guest_window(fid)) == (0, 0, b"", 0)
    assert fl.send(g.now, fid, b"x") == 0
    for call in (fl.accept, fl.refuse, fl.close, fl.abort):
        call(g.now, fid)
    fl.consume(g.now, fid, 1)
    assert fl.counts() == {"tcp": 0, "udp": 1, "icmp": 0}
    fl.udp_send(g.now, fid, b"still here")
    g.pump()
    assert g.other[-1][Raw].load == b"still here"


def test_icmp_echo_to_a_far_host():
    g = NatGuest()
    g.send_ip(IP(src=GUEST_IP, dst=FAR) / ICMP(type=8, id=0x1234, seq=3) / Raw(b"ping!"))
    ev = only(g.events(), IcmpEcho)
    assert (ev.ident, ev.seq, ev.payload, ev.new) == (0x1234, 3, b"ping!", True)
    g.flows.icmp_reply(g.now, ev.fid, 3, b"ping!")
    g.pump()
    p = g.other[-1]
    assert p[IP].src == FAR and p[ICMP].type == 0 and p[ICMP].id == 0x1234
    assert p[ICMP].seq == 3 and p[Raw].load == b"ping!"
    q = p[ICMP].copy()
    q.chksum = None
    assert ICMP(bytes(q)).chksum == p[ICMP].chksum
    g.advance(g.flows.config.icmp_idle + 1)
    only(g.events(), IcmpEnded)


def test_restrict_sends_nothing_outbound():
    g = NatGuest(FlowConfig(outbound=False))
    g.send_ip(IP(src=GUEST_IP, dst=FAR) / TCP(sport=1234, dport=80, flags="S"))
    g.send_ip(IP(src=GUEST_IP, dst=FAR) / UDP(sport=1234, dport=53) / Raw(b"q"))
    g.send_ip(IP(src=GUEST_IP, dst="10.0.2.2") / TCP(sport=1235, dport=8080, flags="S"))
    g.pump()
    assert g.events() == []
    unreach = [p for p in g.other if ICMP in p]
    assert [(p[ICMP].type, p[ICMP].code) for p in unreach] == [(3, 1), (3, 1)]
    assert any(TCP in p and "R" in str(p[TCP].flags) for p in g.frames)   # gateway port


def test_gateway_ports_go_to_the_nat_unless_a_service_has_them():
    g = NatGuest()
    conn = g.connect("10.0.2.2", 7)            # the built-in echo answers
    assert conn.state is State.ESTABLISHED and g.events() == []
    g.connect("10.0.2.2", 8080)
    assert only(g.events(), TcpRequest).dst_ip == GW_B
    g.connect("10.0.2.3", 8080)                # DNS address: never the NAT
    assert g.events() == []
    g2 = NatGuest(services=False)              # --no-services: 7 goes to the host too
    g2.connect("10.0.2.2", 7)
    assert only(g2.events(), TcpRequest).dst_port == 7
    g2.send_ip(IP(src=GUEST_IP, dst="10.0.2.2") / UDP(sport=99, dport=7) / Raw(b"e"))
    assert only(g2.events(), UdpDatagram).dst_port == 7


def test_inbound_forward_connection_and_udp():
    g = NatGuest()
    accepted = []
    g.tcp.listen(GUEST_B, 22, accepted.append)
    fid = g.flows.connect(g.now, GUEST_B, 22)
    g.pump()
    assert len(accepted) == 1 and accepted[0].remote_ip == GW_B
    assert only(g.events(), TcpEstablished).fid == fid
    assert g.flows.send(g.now, fid, b"SSH-2.0-x\r\n") == 11
    g.pump()
    assert accepted[0].recv() == b"SSH-2.0-x\r\n"
    ufid = g.flows.udp_open(g.now, GUEST_B, 5353)
    g.flows.udp_send(g.now, ufid, b"to guest")
    g.pump()
    p = g.other[-1]
    assert p[IP].src == "10.0.2.2" and p[UDP].dport == 5353
    g.send_ip(IP(src=GUEST_IP, dst="10.0.2.2") / UDP(sport=5353, dport=p[UDP].sport)
              / Raw(b"reply"))
    ev = only(g.events(), UdpDatagram)
    assert ev.fid == ufid and ev.payload == b"reply" and not ev.new
    snap = {f["id"]: f for f in g.stack.snapshot()["nat"]}
    assert snap[fid]["direction"] == "in" and snap[fid]["bytes_to_guest"] == 11
    assert snap[ufid]["bytes_from_guest"] == 5


def test_host_loopback_and_the_guest_network_are_never_forwarded():
    g = NatGuest()
    g.send_ip(IP(src=GUEST_IP, dst="127.0.0.1") / TCP(sport=1, dport=22, flags="S"))
    g.send_ip(IP(src=GUEST_IP, dst="10.0.2.77") / UDP(sport=1, dport=53) / Raw(b"q"))
    g.pump()
    assert g.events() == []
    assert [(p[ICMP].type, p[ICMP].code) for p in g.other if ICMP in p] == [(3, 1), (3, 1)]
    assert g.stack.counters["drop_ipv4_no_route"] == 2
