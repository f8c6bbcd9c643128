"""Batched ACKs: segments received back to back get one cumulative ACK per
take_frames() (Stack builds its TcpLayer with defer_acks), as Linux's GRO
gives one ACK per aggregate; out-of-order data is still ACKed with SACK
at once; a bare TcpLayer (defer_acks off) ACKs every segment as before.
scapy builds and decodes every frame."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from stack import Frame, NetConfig
from stack.interface import Stack
from tests.stack.conftest import GUEST_IP, GUEST_MAC, GW_IP, GW_MAC

DISCARD = 9
MSS = 1460


def seg(flags, seq, ack=0, payload=b"", options=()):
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST_IP, dst=GW_IP) /
                 TCP(sport=40000, dport=DISCARD, seq=seq, ack=ack, flags=flags, window=65535,
                     options=list(options)) / payload)


def established():
    st = Stack(NetConfig())
    st.receive(Frame(seg("S", 100, options=[("MSS", MSS), ("SAckOK", b"")])), 0.0)
    (synack,) = [Ether(bytes(f.data)) for f in st.take_frames()]
    assert synack[TCP].flags == "SA"
    iss = synack[TCP].seq
    st.receive(Frame(seg("A", 101, iss + 1)), 0.0)
    assert st.take_frames() == []
    return st, iss + 1


def acks(st):
    return [Ether(bytes(f.data))[TCP] for f in st.take_frames()]


def test_back_to_back_segments_get_one_cumulative_ack():
    st, snd = established()
    seq = 101
    for _ in range(4):
        st.receive(Frame(seg("PA", seq, snd, bytes(MSS))), 0.001)
        seq += MSS
    got = acks(st)
    assert len(got) == 1 and got[0].flags == "A" and got[0].ack == seq
    # the next batch: again exactly one
    st.receive(Frame(seg("PA", seq, snd, bytes(MSS))), 0.002)
    st.receive(Frame(seg("PA", seq + MSS, snd, bytes(MSS))), 0.002)
    assert [a.ack for a in acks(st)] == [seq + 2 * MSS]


def test_one_ack_per_take_when_taken_after_each_segment():
    st, snd = established()
    seq = 101
    for _ in range(3):
        st.receive(Frame(seg("PA", seq, snd, bytes(2 * MSS))), 0.001)
        seq += 2 * MSS
        assert [a.ack for a in acks(st)] == [seq]


def test_out_of_order_is_acked_at_once_with_sack():
    st, snd = established()
    # a hole at 101: this segment lands out of order
    st.receive(Frame(seg("PA", 101 + MSS, snd, bytes(MSS))), 0.001)
    st.receive(Frame(seg("PA", 101 + 3 * MSS, snd, bytes(MSS))), 0.001)
    got = acks(st)
    assert len(got) == 2                      # one dup ACK per out-of-order segment, not merged
    assert all(a.ack == 101 for a in got)
    assert all(any(o[0] == "SAck" for o in a.options) for a in got)


def test_bare_layer_acks_every_segment():
    from stack.tcp.layer import TcpLayer
    assert TcpLayer(lambda *a: None).defer_acks is False
