"""Built-in services: echo, discard, chargen (RFC 862/863/864) over the simulated link."""
from __future__ import annotations

import os

from stack.services import tcp_services
from stack.services.tcp_services import CHARGEN_BLOCK, chargen_pattern
from stack.tcp.state import State

from .tcp_sim import A_IP, B_IP, BulkApp, Sim, sha


def service_sim(**link):
    sim = Sim(seed=5, tso=65536)
    if link:
        sim.set_links(**link)
    tcp_services.install(sim.layers[B_IP], B_IP)
    return sim


def test_echo_returns_one_mebibyte():
    sim = service_sim(delay=0.002)
    data = os.urandom(1 << 20)
    a = BulkApp(sim.layers[A_IP].connect(0.0, A_IP, 40000, B_IP, 7), data)
    assert sim.run(until=lambda: a.eof, max_time=60)
    assert a.rx_len == len(data) and sha(a.received) == sha(data)
    # echo closed after our FIN and after echoing everything
    sim.run(until=lambda: not sim.layers[B_IP].connections)
    assert a.conn.error is None


def test_echo_over_lossy_link_with_flow_control():
    sim = service_sim(delay=0.01, loss=0.05, dup=0.01, reorder=0.02)
    data = os.urandom(512 * 1024)
    a = BulkApp(sim.layers[A_IP].connect(0.0, A_IP, 40000, B_IP, 7), data)
    assert sim.run(until=lambda: a.eof, max_time=600)
    assert sha(a.received) == sha(data)


def test_echo_applies_backpressure_when_client_does_not_read():
    sim = service_sim(delay=0.002)
    c = sim.layers[A_IP].connect(0.0, A_IP, 40000, B_IP, 7)
    data = os.urandom(4 << 20)
    sent = [0]

    def push(conn):
        while sent[0] < len(data) and conn.send_space:
            sent[0] += conn.send(data[sent[0]:sent[0] + conn.send_space])
    c.on_writable = c.on_established = push
    sim.run(until=lambda: False, max_time=30)
    # we never read: our receive buffer, echo's send buffer, echo's receive
    # buffer and our send buffer fill, and then everything stops
    assert c.readable == c.rcvbuf.cap
    assert sent[0] < len(data)
    (srv,) = sim.layers[B_IP].connections
    assert srv.sndbuf.space < srv.sndbuf.cap // 2      # echo stopped with its send buffer full
    assert sent[0] <= 4 * 256 * 1024 + 64 * 1024
    # reading resumes the flow and nothing is lost
    got = bytearray(c.recv())
    c.on_readable = lambda conn: got.extend(conn.recv())
    sim.run(until=lambda: len(got) >= sent[0] and sent[0] == len(data), max_time=300)
    assert bytes(got) == data


def test_discard_swallows_everything():
    sim = service_sim(delay=0.002)
    data = os.urandom(1 << 20)
    a = BulkApp(sim.layers[A_IP].connect(0.0, A_IP, 40000, B_IP, 9), data)
    assert sim.run(until=lambda: a.eof, max_time=60)
    assert a.rx_len == 0                          # nothing comes back
    assert a.conn.bytes_out == len(data) + 1      # all acked (+ our FIN)


def test_chargen_pattern_and_flow_control():
    assert len(CHARGEN_BLOCK) == 95 * 74
    lines = CHARGEN_BLOCK.split(b"\r\n")[:-1]
    assert len(lines) == 95 and all(len(l) == 72 for l in lines)
    assert lines[0] == bytes(range(32, 104))      # ' !"#...g'
    assert lines[1] == bytes(range(33, 105))
    assert lines[94] == bytes([126]) + bytes(range(32, 103))
    sim = service_sim(delay=0.002)
    c = sim.layers[A_IP].connect(0.0, A_IP, 40000, B_IP, 19)
    got = bytearray()
    c.on_readable = lambda conn: got.extend(conn.recv())
    sim.run(until=lambda: len(got) >= 3 << 20, max_time=60)
    assert bytes(got[:len(got)]) == chargen_pattern(0, len(got))
    # stop reading: chargen must stop too (flow control), with bounded buffering
    c.on_readable = None
    sim.run(until=lambda: False, max_time=sim.now + 5)
    before = c.bytes_in
    sim.run(until=lambda: False, max_time=sim.now + 5)
    assert c.bytes_in == before and c.readable == c.rcvbuf.cap
    # our close ends the service
    got.extend(c.recv())
    c.on_readable = lambda conn: got.extend(conn.recv())
    c.close()
    sim.run(until=lambda: c.state is State.CLOSED or c.state is State.TIME_WAIT, max_time=sim.now + 30)
    assert c.at_eof
    assert bytes(got) == chargen_pattern(0, len(got))
