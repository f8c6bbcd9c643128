"""Replay what a Linux 6.1 guest sends, built by scapy (an independent
implementation), and check our answers with scapy too: the handshake with all
of Linux's SYN options, data to echo, a 64 KiB TSO segment, and the close."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP

from stack.services import tcp_services
from stack.tcp.layer import TcpLayer
from stack.tcp.state import State
from stack.wire.tcp import checksum

GUEST = "10.0.2.15"
GW = "10.0.2.2"
GUEST_B = bytes([10, 0, 2, 15])
GW_B = bytes([10, 0, 2, 2])
M = 0xFFFFFFFF


class Gateway:
    def __init__(self):
        self.out = []
        self.layer = TcpLayer(self._emit)
        tcp_services.install(self.layer, GW_B)
        self.now = 100.0

    def _emit(self, src, dst, seg, gso):
        assert (src, dst) == (GW_B, GUEST_B)
        seg = bytearray(seg)
        seg[16:18] = checksum(src, dst, seg).to_bytes(2, "big")
        pkt = IP(bytes(IP(src=GW, dst=GUEST, proto=6) / TCP(bytes(seg))))
        # scapy agrees with our checksum
        got = pkt[TCP].chksum
        del pkt[TCP].chksum
        assert IP(bytes(pkt))[TCP].chksum == got
        self.out.append((pkt[TCP], gso))

    def guest_sends(self, tcp, dt=0.001):
        self.now += dt
        raw = bytes(IP(src=GUEST, dst=GW) / tcp)[20:]
        self.layer.receive(self.now, GUEST_B, GW_B, memoryview(raw))
        out, self.out = self.out, []
        return out


def opts(t):
    return {k: v for k, v in t.options if k not in ("NOP", "EOL")}


def test_linux_guest_session_against_echo():
    gw = Gateway()
    isn = 0xFFFFFF00                             # wraps during the session
    ts = 0x7FFFFFF0
    syn = TCP(sport=43210, dport=7, flags="S", seq=isn, window=64240,
              options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (ts, 0)),
                       ("NOP", None), ("WScale", 7)])
    ((synack, gso),) = gw.guest_sends(syn)
    assert synack.flags == "SA" and synack.ack == (isn + 1) & M and gso == 0
    o = opts(synack)
    assert o["MSS"] == 1460 and "SAckOK" in o and o["WScale"] == 3
    assert o["Timestamp"][1] == ts
    our_ts = o["Timestamp"][0]
    seq = (isn + 1) & M
    ack = (synack.seq + 1) & M
    # handshake ACK with Linux's data-segment option layout
    out = gw.guest_sends(TCP(sport=43210, dport=7, flags="A", seq=seq, ack=ack, window=502,
                             options=[("NOP", None), ("NOP", None),
                                      ("Timestamp", (ts + 1, our_ts))]))
    assert out == []
    (conn,) = gw.layer.connections
    assert conn.state is State.ESTABLISHED and conn.snd_wnd == 502 << 7
    assert conn.mss == 1448
    # data: echoed back, carrying the ACK
    out = gw.guest_sends(TCP(sport=43210, dport=7, flags="PA", seq=seq, ack=ack, window=502,
                             options=[("NOP", None), ("NOP", None),
                                      ("Timestamp", (ts + 2, our_ts))]) / b"hello\n")
    ((echo, _),) = out
    assert bytes(echo.payload) == b"hello\n"
    assert echo.ack == (seq + 6) & M and echo.seq == ack
    assert opts(echo)["Timestamp"][1] == ts + 2
    seq = (seq + 6) & M
    # a 64 KiB TSO segment (the guest's gso_size 1448): one segment, fully echoed
    big = bytes(range(256)) * 250                # 64000 bytes: about the largest TSO a guest builds
    out = gw.guest_sends(TCP(sport=43210, dport=7, flags="PA", seq=seq, ack=(ack + 6) & M,
                             window=8192, options=[("NOP", None), ("NOP", None),
                                                   ("Timestamp", (ts + 3, our_ts))]) / big)
    assert conn.bytes_in == 6 + len(big)
    echoed = b"".join(bytes(t.payload) for t, _ in out)
    assert echoed == big[:len(echoed)] and len(echoed) > 0
    assert all(len(t.payload) <= 1448 for t, _ in out)          # no TSO allowed: MSS-sized
    assert out[-1][0].ack == (seq + len(big)) & M
    seq = (seq + len(big)) & M
    # guest FIN: echo finishes what it owes, then closes too
    out = gw.guest_sends(TCP(sport=43210, dport=7, flags="FA", seq=seq,
                             ack=(ack + 6 + len(echoed)) & M, window=8192,
                             options=[("NOP", None), ("NOP", None),
                                      ("Timestamp", (ts + 4, our_ts))]))
    assert conn.state in (State.CLOSE_WAIT, State.LAST_ACK)
    assert out[-1][0].ack == (seq + 1) & M
    # the guest acknowledges everything (all the echo and our FIN)
    for _ in range(100):
        if conn.state is State.CLOSED:
            break
        gw.now += 0.01
        gw.layer.poll(gw.now)
        gw.out = []
        gw.guest_sends(TCP(sport=43210, dport=7, flags="A", seq=(seq + 1) & M,
                           ack=(conn.snd_nxt) & M, window=8192,
                           options=[("NOP", None), ("NOP", None),
                                    ("Timestamp", (ts + 5, our_ts))]))
    assert conn.state is State.CLOSED and conn.error is None
    assert conn.bytes_out == 6 + len(big) + 1


def test_linux_guest_to_closed_port_and_tso_to_discard():
    gw = Gateway()
    gw.layer.set_tso(65536)
    ((rst, _),) = gw.guest_sends(TCP(sport=40000, dport=8080, flags="S", seq=5))
    assert rst.flags == "RA" and rst.ack == 6 and rst.seq == 0
    ((synack, _),) = gw.guest_sends(TCP(sport=40001, dport=9, flags="S", seq=5, window=64240,
                                        options=[("MSS", 1460), ("SAckOK", b""),
                                                 ("NOP", None), ("WScale", 7)]))
    assert "Timestamp" not in opts(synack)        # only what the guest offered
    gw.guest_sends(TCP(sport=40001, dport=9, flags="A", seq=6, ack=synack.seq + 1, window=502))
    big = b"\xab" * 65000
    out = gw.guest_sends(TCP(sport=40001, dport=9, flags="PA", seq=6, ack=synack.seq + 1,
                             window=502) / big)
    ((ack, _),) = out                             # more than 2 full segments: ACK at once
    assert ack.ack == 6 + 65000 and ack.flags == "A"
    assert ack.window << 3 == 256 * 1024          # discard read it all: full window again
