"""ARP for IPv4 over Ethernet (RFC 826), the only hardware/protocol pair we speak.

`parse` validates a packet once and returns an `ArpRepr`; `emit` writes one.
Anything that is not Ethernet/IPv4 with 6/4 address lengths is rejected:
the interface counts it and moves on.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["PACKET", "LEN", "OP_REQUEST", "OP_REPLY", "ArpRepr", "ArpError"]

PACKET = struct.Struct("!HHBBH6s4s6s4s")
LEN = PACKET.size  # 28
OP_REQUEST = 1
OP_REPLY = 2


class ArpError(ValueError):
    """Malformed ARP packet; .reason is a short counter suffix."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ArpRepr:
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes

    @classmethod
    def parse(cls, data, off: int = 0) -> "ArpRepr":
        if len(data) - off < LEN:
            raise ArpError("arp_truncated")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = PACKET.unpack_from(data, off)
        if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
            raise ArpError("arp_unsupported")
        if op not in (OP_REQUEST, OP_REPLY):
            raise ArpError("arp_bad_op")
        return cls(op, sha, spa, tha, tpa)

    def emit(self) -> bytes:
        return PACKET.pack(1, 0x0800, 6, 4, self.op, self.sender_mac, self.sender_ip,
                           self.target_mac, self.target_ip)

    @property
    def is_probe(self) -> bool:
        """RFC 5227 address probe: the sender has no address yet."""
        return self.op == OP_REQUEST and self.sender_ip == b"\0\0\0\0"

    @property
    def is_gratuitous(self) -> bool:
        """An announcement of the sender's own binding, not a question."""
        return self.sender_ip == self.target_ip
