"""Ethernet II framing (no 802.1Q: the guest's virtio NIC has no VLANs here).

`HEADER` is the precompiled 14-byte header; the data path slices frames
directly and uses `EthernetRepr` only off the hot path (tests, slow paths).
There is no FCS: virtio frames never carry one.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["HEADER", "HLEN", "MIN_FRAME", "ETHERTYPE_IPV4", "ETHERTYPE_ARP",
           "ETHERTYPE_IPV6", "BROADCAST", "is_multicast", "header", "pad",
           "EthernetRepr"]

HEADER = struct.Struct("!6s6sH")
HLEN = 14
# Smallest frame a real NIC delivers (64 bytes minus the 4-byte FCS).
MIN_FRAME = 60

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD

BROADCAST = b"\xff" * 6
_TYPE_BYTES = {t: t.to_bytes(2, "big") for t in (ETHERTYPE_IPV4, ETHERTYPE_ARP, ETHERTYPE_IPV6)}


def is_multicast(mac) -> bool:
    """True for group addresses, which includes broadcast."""
    return bool(mac[0] & 1)


def header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    tb = _TYPE_BYTES.get(ethertype)
    if tb is None:
        tb = ethertype.to_bytes(2, "big")
    return dst + src + tb


def pad(frame: bytearray) -> bytearray:
    """Zero-pad a short frame to the Ethernet minimum, in place."""
    short = MIN_FRAME - len(frame)
    if short > 0:
        frame += bytes(short)
    return frame


@dataclass
class EthernetRepr:
    dst: bytes
    src: bytes
    ethertype: int

    @classmethod
    def parse(cls, data) -> "EthernetRepr":
        if len(data) < HLEN:
            raise ValueError("truncated Ethernet header")
        dst, src, et = HEADER.unpack_from(data, 0)
        return cls(dst, src, et)

    def emit(self, payload=b"") -> bytearray:
        return bytearray(header(self.dst, self.src, self.ethertype)) + payload
