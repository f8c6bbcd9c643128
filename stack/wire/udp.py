"""UDP header (RFC 768).

A zero checksum means "none" on receive; on send we always fill it in (a
computed 0 is sent as 0xFFFF).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..checksum import l4_sum, pseudo_sum

__all__ = ["HEADER", "HLEN", "UdpError", "UdpRepr", "verify", "build"]

HEADER = struct.Struct("!HHHH")
HLEN = 8
CSUM_OFFSET = 6


class UdpError(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class UdpRepr:
    src_port: int
    dst_port: int
    length: int
    checksum: int

    @classmethod
    def parse(cls, data) -> "UdpRepr":
        """Header of an IP payload `data` (already trimmed to the IP total length)."""
        if len(data) < HLEN:
            raise UdpError("udp_truncated")
        sp, dp, ln, cs = HEADER.unpack_from(data, 0)
        if ln < HLEN or ln > len(data):
            raise UdpError("udp_bad_length")
        return cls(sp, dp, ln, cs)


def verify(src_ip: bytes, dst_ip: bytes, datagram) -> bool:
    """True if the checksum is absent (0) or correct. `datagram` is exactly `length` bytes."""
    if datagram[6] == 0 and datagram[7] == 0:
        return True
    return l4_sum(datagram, 0, len(datagram), src_ip, dst_ip, 17) == 0xFFFF


def build(src_ip: bytes, dst_ip: bytes, src_port: int, dst_port: int, payload,
          partial: bool = False) -> bytearray:
    """Header + payload. partial=True leaves the pseudo-header sum in the
    checksum field (for a guest that accepts CHECKSUM_PARTIAL)."""
    n = HLEN + len(payload)
    d = bytearray(HEADER.pack(src_port, dst_port, n, 0))
    d += payload
    if partial:
        cs = pseudo_sum(src_ip, dst_ip, 17, n)
    else:
        cs = (~l4_sum(d, 0, n, src_ip, dst_ip, 17)) & 0xFFFF or 0xFFFF
    d[6] = cs >> 8
    d[7] = cs & 0xFF
    return d
