"""A guest for the flow-API tests: a TcpLayer of our own at 10.0.2.15 whose
segments travel as real Ethernet/IPv4 frames to a Stack with NAT flows.

Frames both ways are built and decoded by scapy (the independent
implementation): the guest's segments are wrapped by scapy, which computes
the checksums, and every frame the stack sends back is parsed by scapy and
checked before its TCP segment is handed to the guest's layer. `frames`
keeps every decoded frame the stack sent, for assertions.
"""
from __future__ import annotations

import random

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from stack import Frame, NetConfig
from stack.flows import FlowConfig
from stack.interface import Stack
from stack.tcp.config import TcpConfig
from stack.tcp.layer import TcpLayer

CFG = NetConfig()
GUEST_IP = CFG.guest_ip
GUEST_B = CFG.guest_ip_b
GW_B = CFG.gateway_ip_b


def tcp_checksum_ok(p) -> bool:
    q = p[IP].copy()
    q[TCP].chksum = None
    return IP(bytes(q))[TCP].chksum == p[TCP].chksum


class NatGuest:
    def __init__(self, flow_config: FlowConfig | None = None, *, services: bool = True,
                 guest_tcp: TcpConfig | None = None):
        self.stack = Stack(CFG, flows=flow_config or FlowConfig(), services=services)
        self.flows = self.stack.flows
        self.tcp = TcpLayer(self._emit, rng=random.Random(5), config=guest_tcp)
        self.now = 1.0
        self.frames: list = []            # every frame from the stack, decoded by scapy
        self.other: list = []             # the ones that were not TCP to the guest
        self._pending: list = []

    # guest -> stack
    def _emit(self, src, dst, seg, gso):
        self._pending.append((src, dst, bytes(seg)))

    def send_ip(self, pkt) -> None:
        """Any scapy IP packet from the guest."""
        f = Ether(src=CFG.guest_mac, dst=CFG.gateway_mac) / pkt
        self.stack.receive(Frame(bytes(f)), self.now)

    def pump(self, rounds: int = 10_000) -> None:
        """Move frames both ways until both sides are quiet."""
        for _ in range(rounds):
            moved = False
            pend, self._pending = self._pending, []
            for src, dst, seg in pend:
                moved = True
                p = IP(src=_txt(src), dst=_txt(dst), proto=6) / TCP(seg)
                del p[TCP].chksum
                self.send_ip(IP(bytes(p)))
            for f in self.stack.take_frames():
                moved = True
                self._deliver(Ether(bytes(f.data)))
            if not moved:
                return
        raise AssertionError("the link never went quiet")

    def _deliver(self, p) -> None:
        self.frames.append(p)
        if ARP in p and p[ARP].op == 1 and p[ARP].pdst == GUEST_IP:
            r = Ether(src=CFG.guest_mac, dst=p[ARP].hwsrc) / ARP(
                op=2, hwsrc=CFG.guest_mac, psrc=GUEST_IP, hwdst=p[ARP].hwsrc, pdst=p[ARP].psrc)
            self.stack.receive(Frame(bytes(r)), self.now)
        elif TCP in p and p[IP].dst == GUEST_IP:
            assert tcp_checksum_ok(p), "TCP checksum from the stack"
            seg = bytes(p[TCP])[:p[IP].len - p[IP].ihl * 4]
            self.tcp.receive(self.now, bytes(map(int, p[IP].src.split("."))), GUEST_B, seg)
        else:
            self.other.append(p)

    def advance(self, dt: float) -> None:
        self.now += dt
        self.stack.poll(self.now)
        self.tcp.poll(self.now)
        self.pump()

    def events(self) -> list:
        out = []
        while (ev := self.flows.next_event()) is not None:
            out.append(ev)
        return out

    def connect(self, dst: str, port: int):
        conn = self.tcp.connect(self.now, GUEST_B, 0, _b(dst), port)
        self.pump()
        return conn


def _txt(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def _b(t: str) -> bytes:
    return bytes(int(x) for x in t.split("."))


__all__ = ["NatGuest", "GUEST_IP", "GUEST_B", "GW_B", "ICMP", "IP", "TCP", "UDP", "Raw",
           "Ether", "_b"]
