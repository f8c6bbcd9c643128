"""Timers and loss handling: RTO and its backoff, giving up, zero-window probes,
keepalive, delayed ACK, fast retransmit / NewReno, RTT estimation."""
from __future__ import annotations

import pytest

from stack.tcp.config import TcpConfig
from stack.tcp.congestion import LOSS, OPEN, RECOVERY, NewReno
from stack.tcp.rtt import RttEstimator
from stack.tcp.state import State
from stack.wire.tcp import ACK, PSH, RST, SYN

from .tcp_sim import A_IP, B_IP, RawPeer, Sim

M = 0xFFFFFFFF


def established_pair(sim, port=80, on_accept=None):
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    acc = []

    def accept(conn):
        acc.append(conn)
        if on_accept:
            on_accept(conn)
    B.listen(B_IP, port, accept)
    c = A.connect(sim.now, A_IP, 40000, B_IP, port)
    sim.run(until=lambda: acc and c.state is State.ESTABLISHED)
    return c, acc[0]


def active_to_raw(cfg=None, mss=1000, sack=True, ts=False, window=65535, wscale=None):
    """Our layer connects to a hand-driven peer. Returns (peer, conn, peer_isn)."""
    peer = RawPeer(config=cfg)
    conn = peer.layer.connect(0.0, B_IP, 1234, A_IP, 80)
    syn = peer.take()[0]
    opts = dict(mss=mss, sack_permitted=sack)
    if ts:
        opts["timestamp"] = (1, syn.timestamp[0])
    if wscale is not None:
        opts["wscale"] = wscale
    peer.send(80, 1234, 7000, syn.seq + 1, SYN | ACK, window=window, now=0.05, **opts)
    assert conn.state is State.ESTABLISHED
    peer.take()
    return peer, conn, syn.seq + 1


def test_rtt_estimator_rfc6298():
    r = RttEstimator(initial_rto=1.0, min_rto=0.2, max_rto=60.0)
    assert r.rto == 1.0
    r.sample(0.1)
    assert r.srtt == pytest.approx(0.1) and r.rttvar == pytest.approx(0.05)
    assert r.rto == pytest.approx(0.3)                   # 0.1 + 4 * 0.05
    r.sample(0.5)
    assert r.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.4)
    assert r.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.5)
    r2 = RttEstimator()
    r2.sample(0.001)
    assert r2.rto == 0.2                                 # floor
    for _ in range(20):
        r2.on_timeout()
    assert r2.rto == 60.0                                # ceiling
    r2.sample(0.001)
    assert r2.rto == 0.2 and r2.backoff == 0            # a new sample clears the backoff


def test_newreno_window_arithmetic():
    cc = NewReno(1000)
    assert cc.cwnd == 10_000                             # RFC 6928 IW10
    cc.on_ack(5000, True)
    assert cc.cwnd == 15_000                             # slow start
    cc.on_ack(5000, False)
    assert cc.cwnd == 15_000                             # not cwnd-limited: no growth
    cc.enter_recovery(flight=20_000, snd_nxt=50_000)
    assert cc.ca_state == RECOVERY and cc.ssthresh == 10_000 and cc.cwnd == 10_000
    cc.exit_recovery(flight=4000)
    assert cc.ca_state == OPEN and cc.cwnd == 5000       # min(ssthresh, flight + mss)
    for _ in range(10):
        cc.on_ack(1000, True)
    assert cc.cwnd == 10_000                             # slow start up to ssthresh...
    cc.on_ack(10_000, True)
    assert cc.cwnd == 11_000                             # ...then one MSS per cwnd acked
    cc.on_timeout(flight=8000, snd_nxt=60_000)
    assert cc.ca_state == LOSS and cc.cwnd == 1000 and cc.ssthresh == 4000
    cc.on_timeout(flight=8000, snd_nxt=60_000)
    assert cc.ssthresh == 4000                           # repeated timeout keeps ssthresh


def test_rto_backoff_and_give_up():
    cfg = TcpConfig(max_retries=5)
    sim = Sim(config=cfg, trace=True)
    c, s = established_pair(sim)
    sim.link(A_IP, B_IP).loss = 1.0
    closed = []
    c.on_closed = closed.append
    sim.trace.clear()
    t0 = sim.now
    sim.layers[A_IP].poll(t0)          # the app acts "now": let the layer see the time
    c.send(b"x" * 1000)
    sim.run(until=lambda: c.state is State.CLOSED, max_time=t0 + 200)
    data_tx = [t for (t, src, _, r, _) in sim.trace.records if src == A_IP and r.payload]
    assert len(data_tx) == 6                               # original + 5 retransmissions
    gaps = [b - a for a, b in zip(data_tx, data_tx[1:])]
    for g1, g2 in zip(gaps, gaps[1:]):
        assert g2 == pytest.approx(2 * g1, rel=0.01)       # exponential backoff
    assert gaps[0] >= 0.2                                  # min RTO
    assert c.error == "connection timed out" and closed == [c]
    last = sim.trace.records[-1][3]
    assert last.flags & RST                                # the peer is told
    assert sim.layers[A_IP].counters["conn_timeouts"] == 1


def test_syn_sent_gives_up():
    cfg = TcpConfig(syn_retries=3)
    sim = Sim(config=cfg, trace=True)
    sim.link(A_IP, B_IP).loss = 1.0
    c = sim.layers[A_IP].connect(0.0, A_IP, 40000, B_IP, 80)
    sim.run(until=lambda: c.state is State.CLOSED, max_time=100)
    syns = [t for (t, src, _, r, _) in sim.trace.records if r.flags == SYN]
    assert syns == pytest.approx([0.0, 1.0, 3.0, 7.0])     # 1 s initial RTO, doubled
    assert c.error == "connection timed out"
    assert sim.now == pytest.approx(15.0)


def test_zero_window_probes_with_backoff_then_recovery():
    cfg_b = TcpConfig(rcvbuf=16384)
    sim = Sim(configs={B_IP: cfg_b}, trace=True)
    c, s = established_pair(sim)
    data = bytes(range(256)) * 400                         # 100 KiB, far more than B buffers
    sent = c.send(data)
    # B's app does not read: B's window fills and closes
    sim.run(until=lambda: c.snd_wnd == 0 and c.snd_una == c.snd_nxt, max_time=10)
    assert s.readable == 16384
    t0 = sim.now
    sim.advance(60.0)
    probes = [(t, r) for (t, src, _, r, _) in sim.trace.records
              if src == A_IP and t >= t0 and not r.payload and r.seq == (c.snd_una - 1) & M]
    assert len(probes) >= 4
    gaps = [b[0] - a[0] for a, b in zip(probes, probes[1:])]
    assert all(g2 > g1 * 1.5 for g1, g2 in zip(gaps, gaps[1:]))   # backing off
    assert c.state is State.ESTABLISHED                   # answered probes never time out
    assert sim.layers[A_IP].counters["zero_window_probes"] == len(probes)
    # the app reads: a window update restarts the flow at once
    got = bytearray()

    def drain(conn):
        got.extend(conn.recv())
    s.on_readable = drain
    drain(s)
    total = sent
    while total < len(data):
        total += c.send(data[total:])
        sim.run(until=lambda: c.send_space > 0 or len(got) >= len(data), max_time=sim.now + 10)
    sim.run(until=lambda: len(got) == len(data), max_time=sim.now + 10)
    assert bytes(got) == data


def test_keepalive_probes_and_timeout():
    sim = Sim(trace=True)
    c, s = established_pair(sim)
    assert c.t_keepalive is None                         # off by default
    c.set_keepalive(True, idle=10.0, interval=2.0, count=3)
    t0 = sim.now
    sim.advance(35.0)
    probes = [t for (t, src, _, r, _) in sim.trace.records
              if src == A_IP and t > t0 and not r.payload and r.flags == ACK]
    assert len(probes) == 3                               # every 10 s idle, answered each time
    assert probes[0] - t0 == pytest.approx(10.0, abs=0.05)
    assert c.state is State.ESTABLISHED
    # now the peer vanishes
    sim.link(B_IP, A_IP).loss = 1.0
    sim.link(A_IP, B_IP).loss = 1.0
    t1 = sim.now
    sim.run(until=lambda: c.state is State.CLOSED, max_time=t1 + 60)
    assert c.error == "keepalive timed out"
    assert sim.now - t1 <= 10.0 + 3 * 2.0 + 2.5


def test_delayed_ack_and_quick_ack():
    peer = RawPeer()
    acc = []
    peer.layer.listen(B_IP, 80, acc.append)
    peer.send(4444, 80, 1000, 0, SYN, mss=1000, sack_permitted=True, now=0.0)
    synack = peer.take()[0]
    isn = synack.seq + 1
    peer.send(4444, 80, 1001, isn, ACK, now=0.01)
    conn = acc[0]
    assert conn.rcv_mss == 1460
    # one small segment: no ACK yet, then one after the delayed-ACK timeout
    peer.send(4444, 80, 1001, isn, ACK | PSH, payload=b"a" * 100, now=1.0)
    assert peer.take() == []
    peer.advance(1.035)
    assert peer.take() == []
    peer.advance(1.045)
    (ack,) = peer.take()
    assert ack.ack == 1101
    # two full-sized segments: ACK at once
    peer.send(4444, 80, 1101, isn, ACK, payload=b"b" * 1460, now=2.0)
    assert peer.take() == []
    peer.send(4444, 80, 2561, isn, ACK, payload=b"c" * 1460, now=2.001)
    (ack,) = peer.take()
    assert ack.ack == 4021
    # out of order: immediate duplicate ACK with a SACK block
    peer.send(4444, 80, 6000, isn, ACK, payload=b"d" * 500, now=3.0)
    (dup,) = peer.take()
    assert dup.ack == 4021 and dup.sack_blocks == ((6000, 6500),)
    # filling the hole: immediate ACK covering both
    peer.send(4444, 80, 4021, isn, ACK, payload=b"e" * (6000 - 4021), now=3.01)
    (ack,) = peer.take()
    assert ack.ack == 6500 and ack.sack_blocks == ()
    assert conn.recv() == b"a" * 100 + b"b" * 1460 + b"c" * 1460 + b"e" * 1979 + b"d" * 500


def test_fast_retransmit_on_three_dupacks_newreno():
    peer, conn, isn = active_to_raw(mss=1000, sack=False)
    conn.send(bytes(20_000))
    segs = peer.take()
    assert [len(r.payload) for r in segs] == [1000] * 10   # IW10
    una = isn
    # ACK the first segment; slow start opens two more
    peer.send(80, 1234, 7001, una + 1000, ACK, now=0.1)
    segs = peer.take()
    assert len(segs) == 2
    # three duplicate ACKs for 1000 (segment 2 lost)
    for i in range(2):
        peer.send(80, 1234, 7001, una + 1000, ACK, now=0.11 + i * 0.001)
        # limited transmit (RFC 3042): each duplicate ACK lets one new segment out
        assert [(r.seq - una) & M for r in peer.take()] == [12_000 + 1000 * i]
    peer.send(80, 1234, 7001, una + 1000, ACK, now=0.113)
    out = peer.take()
    assert out and out[0].seq == (una + 1000) & M and len(out[0].payload) == 1000
    assert conn.cc.ca_state == RECOVERY
    assert conn.cc.ssthresh == (14_000 - 1000) // 2   # flight at entry / 2
    assert peer.layer.counters["fast_retransmits"] == 1
    # partial ACK (up to 5000): the next hole is retransmitted at once (RFC 6582)
    peer.send(80, 1234, 7001, una + 5000, ACK, now=0.2)
    out = peer.take()
    assert any(r.seq == (una + 5000) & M for r in out)
    assert conn.cc.ca_state == RECOVERY
    # full ACK: recovery ends with cwnd = ssthresh or less
    assert conn.cc.recover - una == 14_000
    peer.send(80, 1234, 7001, una + 13_000, ACK, now=0.25)
    assert conn.cc.ca_state == RECOVERY                  # still below `recover`
    peer.send(80, 1234, 7001, una + 14_000, ACK, now=0.3)
    assert conn.cc.ca_state == OPEN
    assert conn.cc.cwnd <= conn.cc.ssthresh


def test_sack_recovery_retransmits_only_holes():
    peer, conn, isn = active_to_raw(mss=1000, sack=True)
    conn.send(bytes(10_000))
    peer.take()
    una = isn
    # segments 1 and 4 lost; the rest SACKed
    blocks = [((una + 1000) & M, (una + 3000) & M), ((una + 4000) & M, (una + 10_000) & M)]
    peer.send(80, 1234, 7001, una, ACK, now=0.1, sack_blocks=tuple(blocks))
    out = peer.take()
    assert {(r.seq - una) & M for r in out if r.payload} == {0, 3000}
    assert all(len(r.payload) == 1000 for r in out if r.payload)
    peer.send(80, 1234, 7001, una + 10_000, ACK, now=0.2)
    assert conn.cc.ca_state == OPEN and conn.snd_una == conn.snd_nxt


def test_tso_segments_carry_gso_size():
    peer, conn, isn = active_to_raw(mss=1000, window=65535, wscale=4)
    peer.layer.set_tso(65536)
    conn.cc.cwnd = 1 << 20
    conn.send(bytes(100_000))
    out = list(peer.out)
    big = [(r, g) for r, g in out if len(r.payload) > 1000]
    assert big and all(g == 1000 and len(r.payload) % 1000 == 0 for r, g in big)
    assert all(len(r.payload) <= 65535 - 20 - 60 for r, _ in out)
    assert all(g == 0 for r, g in out if len(r.payload) <= 1000)


def test_a_closed_connection_leaves_no_timer_deadline():
    """The passive closer's connection ends CLOSED with its retransmission
    timer's heap entry still in place; next_deadline() must not ask the event
    loop to wake for it (issue 12: one wasted wake-up per NATed connection)."""
    sim = Sim()
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    assert B.next_deadline() is None
    c, s = established_pair(sim)
    c.send(b"ping")
    sim.run(until=lambda: s.recv() == b"ping")
    s.send(b"pong")                      # arms B's RTO; the ACK that stops it comes later
    sim.run(until=lambda: c.recv() == b"pong")
    c.close()
    sim.run(until=lambda: s.state is State.CLOSE_WAIT)
    s.close()
    sim.run(until=lambda: s.state is State.CLOSED)
    assert c.state is State.TIME_WAIT    # A keeps its 2MSL timer, as it must
    assert A.next_deadline() is not None
    assert B.next_deadline() is None
