"""State machine: simultaneous open/close, TIME_WAIT, RSTs, backlog, closed ports."""
from __future__ import annotations

import pytest

from stack.tcp.config import TcpConfig
from stack.tcp.connection import TcpError
from stack.tcp.state import TRANSITIONS, Event, State, TcpStateError, transition
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN

from .tcp_sim import A_IP, B_IP, RawPeer, Sim

M = 0xFFFFFFFF


def established_pair(sim, port=80):
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    acc = []
    B.listen(B_IP, port, acc.append)
    c = A.connect(sim.now, A_IP, 40000, B_IP, port)
    sim.run(until=lambda: acc and c.state is State.ESTABLISHED)
    return c, acc[0]


def test_table_is_the_single_source_of_moves():
    assert transition(State.ESTABLISHED, Event.CLOSE) is State.FIN_WAIT_1
    assert transition(State.FIN_WAIT_1, Event.RCV_FIN) is State.CLOSING
    with pytest.raises(TcpStateError):
        transition(State.TIME_WAIT, Event.CLOSE)
    # every state but CLOSED can be reset or aborted
    assert all((s, Event.RCV_RST) in TRANSITIONS for s in State if s is not State.CLOSED)


def test_simultaneous_open():
    sim = Sim(trace=True)
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    ca = A.connect(0.0, A_IP, 5000, B_IP, 6000)
    cb = B.connect(0.0, B_IP, 6000, A_IP, 5000)
    # both SYNs cross in flight
    sim.run(until=lambda: ca.state is State.SYN_RECEIVED and cb.state is State.SYN_RECEIVED)
    sim.run(until=lambda: ca.state is State.ESTABLISHED and cb.state is State.ESTABLISHED,
            max_time=5)
    assert ca.ts_ok and cb.ts_ok and ca.sack_ok and ca.ws_ok
    ca.send(b"ping")
    cb.send(b"pong")
    sim.run(until=lambda: ca.readable == 4 and cb.readable == 4, max_time=5)
    assert ca.recv() == b"pong" and cb.recv() == b"ping"
    flags = [r.flags for _, _, _, r, _ in sim.trace.records[:4]]
    assert flags[:2] == [SYN, SYN] and flags[2:4] == [SYN | ACK, SYN | ACK]


def test_simultaneous_close():
    sim = Sim()
    c, s = established_pair(sim)
    c.close()
    s.close()
    assert c.state is State.FIN_WAIT_1 and s.state is State.FIN_WAIT_1
    seen = set()

    def both_closing():
        seen.add((c.state, s.state))
        return c.state is State.TIME_WAIT and s.state is State.TIME_WAIT

    sim.run(until=both_closing, max_time=5)
    assert (State.CLOSING, State.CLOSING) in seen
    sim.run(until=lambda: c.state is State.CLOSED and s.state is State.CLOSED)
    assert c.error is None and s.error is None


def test_time_wait_expiry_and_resent_fin():
    peer = RawPeer(config=TcpConfig(msl=5.0))
    L = peer.layer
    c = L.connect(0.0, B_IP, 1234, A_IP, 80)
    syn = peer.take()[0]
    peer.send(80, 1234, 1000, syn.seq + 1, SYN | ACK, mss=1460)
    assert c.state is State.ESTABLISHED
    peer.take()
    c.close()
    fin = peer.take()[-1]
    assert fin.flags & FIN
    peer.send(80, 1234, 1001, fin.seq + 1, ACK, now=0.1)
    assert c.state is State.FIN_WAIT_2
    peer.send(80, 1234, 1001, fin.seq + 1, FIN | ACK, now=0.2)
    assert c.state is State.TIME_WAIT
    assert peer.take()[-1].ack == 1002
    # our ACK got lost: the FIN comes again, is ACKed again, and 2*MSL restarts
    peer.advance(9.0)
    assert c.state is State.TIME_WAIT
    peer.send(80, 1234, 1001, fin.seq + 1, FIN | ACK)
    assert peer.take()[-1].ack == 1002
    peer.advance(18.9)
    assert c.state is State.TIME_WAIT
    peer.advance(19.1)
    assert c.state is State.CLOSED and not L.connections


def test_time_wait_is_bounded():
    cfg = TcpConfig(max_time_wait=3)
    sim = Sim(config=cfg)
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    B.listen(B_IP, 80, lambda conn: setattr(conn, "on_readable",
                                            lambda x: x.at_eof and x.close()))
    for port in range(5):
        c = A.connect(sim.now, A_IP, 41000 + port, B_IP, 80)
        sim.run(until=lambda: c.state is State.ESTABLISHED, max_time=sim.now + 5)
        c.close()
        sim.run(until=lambda: c.state is State.TIME_WAIT, max_time=sim.now + 5)
    tw = [x for x in A.connections if x.state is State.TIME_WAIT]
    assert len(tw) == 3
    assert A.counters["time_wait_evicted"] == 2


def test_syn_to_closed_port_gets_rst_ack():
    peer = RawPeer()
    peer.send(5555, 81, 0xFFFFFFFF, 0, SYN)
    (rst,) = peer.take()
    assert rst.flags == RST | ACK and rst.seq == 0 and rst.ack == 0   # seq + 1 wraps
    assert peer.layer.counters["rx_closed_port"] == 1


def test_ack_to_closed_port_gets_rst_with_its_ack_as_seq():
    peer = RawPeer()
    peer.send(5555, 81, 10, 123456, ACK | PSH, payload=b"abc")
    (rst,) = peer.take()
    assert rst.flags == RST and rst.seq == 123456


def test_rst_never_answers_rst():
    peer = RawPeer()
    peer.send(5555, 81, 10, 0, RST)
    peer.send(5555, 81, 10, 5, RST | ACK)
    assert peer.take() == []


def passive_established(peer, port=80, isn=5000):
    acc = []
    peer.layer.listen(B_IP, port, acc.append)
    peer.send(4444, port, isn, 0, SYN, mss=1460, wscale=2, sack_permitted=True)
    synack = peer.take()[0]
    peer.send(4444, port, isn + 1, synack.seq + 1, ACK, window=1000)
    return acc[0], synack


def test_exact_rst_resets_in_window_rst_gets_challenge_ack():
    peer = RawPeer()
    conn, synack = passive_established(peer)
    closed = []
    conn.on_closed = closed.append
    # in the window but not at RCV.NXT: RFC 5961 challenge ACK, connection survives
    peer.send(4444, 80, 5001 + 100, 0, RST)
    (ch,) = peer.take()
    assert ch.flags == ACK and ch.ack == 5001 and conn.state is State.ESTABLISHED
    assert peer.layer.counters["challenge_acks"] == 1
    # outside the window: silently dropped
    peer.send(4444, 80, 5001 + 10_000_000, 0, RST)
    assert peer.take() == [] and conn.state is State.ESTABLISHED
    # exactly RCV.NXT: reset
    peer.send(4444, 80, 5001, 0, RST)
    assert conn.state is State.CLOSED and conn.error == "connection reset by peer"
    assert closed == [conn]
    with pytest.raises(TcpError):
        conn.send(b"x")


def test_syn_on_established_gets_challenge_ack():
    peer = RawPeer()
    conn, _ = passive_established(peer)
    peer.send(4444, 80, 9999, 0, SYN)
    (ch,) = peer.take()
    assert ch.flags == ACK and ch.ack == 5001 and conn.state is State.ESTABLISHED


def test_bad_ack_in_syn_received_gets_rst():
    peer = RawPeer()
    acc = []
    peer.layer.listen(B_IP, 80, acc.append)
    peer.send(4444, 80, 5000, 0, SYN)
    synack = peer.take()[0]
    peer.send(4444, 80, 5001, synack.seq + 77, ACK)        # acknowledges nothing we sent
    (rst,) = peer.take()
    assert rst.flags == RST and rst.seq == (synack.seq + 77) & M
    assert not acc
    # the real ACK still completes the handshake
    peer.send(4444, 80, 5001, synack.seq + 1, ACK)
    assert acc and acc[0].state is State.ESTABLISHED


def test_rst_in_syn_received_drops_half_open():
    peer = RawPeer()
    lst = peer.layer.listen(B_IP, 80, lambda c: None)
    peer.send(4444, 80, 5000, 0, SYN)
    peer.take()
    assert lst.pending == 1
    peer.send(4444, 80, 5001, 0, RST)
    assert lst.pending == 0 and not peer.layer.connections


def test_rst_answers_syn_sent_connection_refused():
    sim = Sim()
    A = sim.layers[A_IP]
    c = A.connect(0.0, A_IP, 40000, B_IP, 9)               # nobody listens on B:9
    sim.run(until=lambda: c.state is State.CLOSED, max_time=5)
    assert c.error == "connection refused"


def test_listen_backlog_overflow():
    peer = RawPeer()
    acc = []
    lst = peer.layer.listen(B_IP, 80, acc.append, backlog=2)
    for i in range(5):
        peer.send(3000 + i, 80, 100 * i, 0, SYN)
    synacks = peer.take()
    assert len(synacks) == 2 and all(r.flags == SYN | ACK for r in synacks)
    assert peer.layer.counters["listen_overflow"] == 3
    assert lst.pending == 2
    # completing one frees a slot
    peer.send(3000, 80, 1, synacks[0].seq + 1, ACK)
    assert len(acc) == 1 and lst.pending == 1
    peer.send(3009, 80, 0, 0, SYN)
    assert peer.take()[0].flags == SYN | ACK


def test_syn_received_gives_up_after_syn_retries():
    peer = RawPeer(config=TcpConfig(syn_retries=3))
    lst = peer.layer.listen(B_IP, 80, lambda c: None)
    peer.send(4444, 80, 5000, 0, SYN)
    peer.advance(100.0)
    synacks = [r for r in peer.take() if r.flags == SYN | ACK]
    assert len(synacks) == 4                          # first + 3 retries
    assert lst.pending == 0 and not peer.layer.connections


def test_time_wait_accepts_newer_syn():
    sim = Sim()
    c, s = established_pair(sim)
    s.close()                                   # B closes first, so B ends in TIME_WAIT
    sim.run(until=lambda: c.state is State.CLOSE_WAIT, max_time=5)
    c.close()
    sim.run(until=lambda: s.state is State.TIME_WAIT and c.state is State.CLOSED, max_time=5)
    B = sim.layers[B_IP]
    acc = []
    B.unlisten(B_IP, 80)
    B.listen(B_IP, 80, acc.append)
    c2 = sim.layers[A_IP].connect(sim.now + 1, A_IP, 40000, B_IP, 80)
    sim.run(until=lambda: c2.state is State.ESTABLISHED and acc, max_time=sim.now + 5)
    assert s.state is State.CLOSED
    assert B.counters["time_wait_reused"] == 1


def test_total_connections_are_bounded():
    peer = RawPeer(config=TcpConfig(max_connections=3))
    peer.layer.listen(B_IP, 80, lambda c: None, backlog=100)
    for i in range(5):
        peer.send(3000 + i, 80, 100 * i, 0, SYN)
    assert len(peer.take()) == 3
    assert peer.layer.counters["conn_limit_drops"] == 2
    with pytest.raises(TcpError):
        peer.layer.connect(0.0, B_IP, 1, A_IP, 2)
