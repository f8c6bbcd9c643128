"""Handshake, data and close between two TcpLayers on a clean simulated link."""
from __future__ import annotations

import os

from stack.tcp.state import State
from stack.wire.tcp import ACK, SYN

from .tcp_sim import A_IP, B_IP, BulkApp, Sim, sha


def accept_into(store):
    def on_accept(conn):
        store.append(conn)
    return on_accept


def test_handshake_negotiates_linux_options():
    sim = Sim(trace=True)
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    acc = []
    B.listen(B_IP, 80, accept_into(acc))
    c = A.connect(0.0, A_IP, 40000, B_IP, 80)
    assert c.state is State.SYN_SENT
    sim.run(until=lambda: acc and c.state is State.ESTABLISHED)
    s = acc[0]
    assert s.state is State.ESTABLISHED
    syn, synack, ack = [r for _, _, _, r, _ in sim.trace.records[:3]]
    assert syn.flags == SYN and synack.flags == SYN | ACK and ack.flags == ACK
    assert synack.ack == (syn.seq + 1) & 0xFFFFFFFF and ack.ack == (synack.seq + 1) & 0xFFFFFFFF
    for conn in (c, s):
        assert conn.ts_ok and conn.sack_ok and conn.ws_ok
        assert conn.mss == 1460 - 12
        assert conn.rcv_wscale == 3 and conn.snd_wscale == 3     # 256 KiB buffers
    # the window after the handshake is scaled and covers the 256 KiB buffer
    assert ack.window << 3 == 256 * 1024
    assert c.rtt.srtt is not None and abs(c.rtt.srtt - 0.01) < 0.002


def test_options_off_fall_back():
    from stack.tcp.config import TcpConfig
    cfg = TcpConfig(timestamps=False, sack=False, window_scaling=False, rcvbuf=65535 + 1000)
    sim = Sim(configs={A_IP: cfg})
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    acc = []
    B.listen(B_IP, 80, accept_into(acc))
    c = A.connect(0.0, A_IP, 40000, B_IP, 80)
    sim.run(until=lambda: acc and c.state is State.ESTABLISHED)
    s = acc[0]
    for conn in (c, s):
        assert not conn.ts_ok and not conn.sack_ok and not conn.ws_ok and conn.mss == 1460
        assert conn.rcv_wscale == 0 and conn.snd_wscale == 0


def test_data_both_ways_and_orderly_close():
    sim = Sim()
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    da, db = os.urandom(100_000), os.urandom(70_000)
    apps = []
    B.listen(B_IP, 80, lambda c: apps.append(BulkApp(c, db)))
    a = BulkApp(A.connect(0.0, A_IP, 40000, B_IP, 80), da)
    assert sim.run(until=lambda: apps and a.eof and apps[0].eof, max_time=30)
    assert sha(a.received) == sha(db) and sha(apps[0].received) == sha(da)
    sim.run(until=lambda: not B.connections and not A.connections)
    # whoever closed first sits in TIME_WAIT for 2*MSL; all gone after
    assert sim.now >= 60.0


def test_close_sequence_states():
    sim = Sim()
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    acc = []
    B.listen(B_IP, 80, accept_into(acc))
    c = A.connect(0.0, A_IP, 40000, B_IP, 80)
    sim.run(until=lambda: acc and c.state is State.ESTABLISHED)
    s = acc[0]
    c.send(b"bye")
    c.close()
    assert c.state is State.FIN_WAIT_1
    sim.run(until=lambda: s.state is State.CLOSE_WAIT and c.state is State.FIN_WAIT_2)
    assert s.recv() == b"bye" and s.at_eof
    s.send(b"late reply")                 # half-close: the other direction still works
    sim.run(until=lambda: c.readable == 10)
    assert c.recv() == b"late reply"
    s.close()
    assert s.state is State.LAST_ACK
    sim.run(until=lambda: s.state is State.CLOSED and c.state is State.TIME_WAIT)
    assert s.error is None
    t0 = sim.now
    sim.run(until=lambda: c.state is State.CLOSED)
    assert 59.9 < sim.now - t0 <= 60.1
    assert c.error is None and not A.connections and not B.connections
