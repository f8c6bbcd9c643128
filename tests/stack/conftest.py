"""Shared helpers for the stack tests: scapy is the independent oracle."""
from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from stack import Frame, NetConfig
from stack.interface import Stack

CFG = NetConfig()
GUEST_MAC = CFG.guest_mac
GW_MAC = CFG.gateway_mac
GUEST_IP = CFG.guest_ip
GW_IP = CFG.gateway_ip
DNS_IP = CFG.dns_ip


@pytest.fixture
def st() -> Stack:
    return Stack(NetConfig())


def send(stack: Stack, pkt, now: float = 0.0, **meta) -> list:
    """Feed a scapy packet (or raw bytes) to the stack; return the frames it
    produced, decoded by scapy."""
    stack.receive(Frame(bytes(pkt), **meta), now)
    return [Ether(bytes(f.data)) for f in stack.take_frames()]


def send_raw(stack: Stack, pkt, now: float = 0.0, **meta) -> list:
    stack.receive(Frame(bytes(pkt), **meta), now)
    return stack.take_frames()


def eth(dst: str = GW_MAC, **kw):
    return Ether(src=GUEST_MAC, dst=dst, **kw)


def eth_ip_header(dst: str = GW_MAC) -> bytes:
    """14 raw bytes of an IPv4 Ethernet header (scapy alone would pick another type)."""
    return bytes(Ether(src=GUEST_MAC, dst=dst, type=0x0800))


def ip(dst: str = GW_IP, **kw):
    return IP(src=GUEST_IP, dst=dst, **kw)


def assert_checksums(p) -> None:
    """scapy recomputes every checksum and compares with what we sent."""
    if IP in p:
        got = p[IP].chksum
        q = p[IP].copy()
        q.chksum = None
        assert IP(bytes(q))[IP].chksum == got, "IPv4 header checksum"
    if ICMP in p and not (p[IP].flags.MF or p[IP].frag):
        got = p[ICMP].chksum
        q = p[ICMP].copy()
        q.chksum = None
        assert ICMP(bytes(q)).chksum == got, "ICMP checksum"
    if UDP in p and not (p[IP].flags.MF or p[IP].frag):
        got = p[UDP].chksum
        q = p[IP].copy()
        q[UDP].chksum = None
        assert IP(bytes(q))[UDP].chksum == got, "UDP checksum"


__all__ = ["st", "send", "eth_ip_header", "send_raw", "eth", "ip", "assert_checksums", "ARP", "Ether",
           "IP", "ICMP", "UDP", "GUEST_MAC", "GW_MAC", "GUEST_IP", "GW_IP", "DNS_IP", "CFG"]
