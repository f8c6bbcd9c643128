"""Hypothesis: nothing a peer sends makes TcpLayer.receive raise, and the
connection's invariants (bounded buffers, sane sequence variables) hold."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack.tcp.config import TcpConfig
from stack.wire.tcp import ACK, SYN, TcpRepr

from .tcp_sim import A_IP, B_IP, RawPeer

CFG = TcpConfig(rcvbuf=8192, sndbuf=8192, ooo_max_ranges=4, max_connections=16)


def setup():
    """A layer with a listener and one established passive connection (peer 4444 -> 80)."""
    peer = RawPeer(config=CFG)
    acc = []
    peer.layer.listen(B_IP, 80, acc.append, backlog=4)
    peer.send(4444, 80, 1000, 0, SYN, mss=536, wscale=1, sack_permitted=True,
              timestamp=(100, 0))
    synack = peer.take()[0]
    peer.send(4444, 80, 1001, synack.seq + 1, ACK, timestamp=(101, synack.timestamp[0]))
    conn = acc[0]
    conn.send(b"z" * 3000)
    peer.take()
    return peer, conn, synack.seq + 1


def check_invariants(layer):
    for conn in layer.connections:
        assert conn.snd_una <= conn.snd_nxt
        assert len(conn.rcvbuf) <= conn.rcvbuf.cap
        assert len(conn.sndbuf) <= conn.sndbuf.cap
        assert conn.ooo.nbytes <= conn.rcvbuf.cap
        assert len(conn.ooo) <= CFG.ooo_max_ranges
        assert conn.rcv_adv >= conn.rcv_nxt or conn.rcv_adv == 0
        assert conn.cc.cwnd >= 1
    assert len(layer.connections) <= CFG.max_connections


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120))
def test_random_bytes(raw):
    peer, conn, _ = setup()
    peer.layer.receive(1.0, A_IP, B_IP, memoryview(raw))
    check_invariants(peer.layer)


option_items = st.lists(st.one_of(
    st.binary(min_size=1, max_size=12),
    st.sampled_from([b"\x01", b"\x00", b"\x02\x04\x00\x00", b"\x03\x03\x0e", b"\x04\x02",
                     b"\x08\x0a" + bytes(8), b"\x05\x0a" + bytes(8), b"\x05\x02"]),
), max_size=6).map(lambda parts: b"".join(parts)[:40])


@st.composite
def segments(draw, base):
    """Segments aimed at the established connection, near or far from its sequence space."""
    near = st.integers(min_value=-70_000, max_value=70_000)
    seq = (1001 + draw(near)) & 0xFFFFFFFF
    ack = (base + draw(near)) & 0xFFFFFFFF
    flags = draw(st.integers(0, 255))
    window = draw(st.integers(0, 0xFFFF))
    opts = draw(option_items)
    opts += b"\x00" * (-len(opts) % 4)
    payload = draw(st.binary(max_size=3000))
    sport = draw(st.sampled_from([4444, 4444, 4444, 5555]))
    hdr = TcpRepr(sport, 80, seq, ack, flags, window).emit_header(opts=opts)
    return hdr + payload


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_structured_segment_sequences(data):
    peer, conn, base = setup()
    t = 1.0
    for _ in range(data.draw(st.integers(1, 12))):
        seg = data.draw(segments(base))
        t += data.draw(st.floats(0, 3))
        peer.layer.receive(t, A_IP, B_IP, memoryview(seg))
        if data.draw(st.booleans()):
            peer.layer.poll(t)
        if data.draw(st.booleans()) and conn.state.value != "CLOSED":
            conn.recv(data.draw(st.integers(-1, 5000)))
        check_invariants(peer.layer)
    # time runs on: every timer path terminates and the layer stays consistent
    peer.advance(t + 2000.0)
    check_invariants(peer.layer)
