"""IPv4 header (RFC 791): validation, emission and fragmentation.

`parse_header` validates once (version, IHL, total length, header checksum)
and returns an `Ipv4Repr`; on failure it raises `Ipv4Error` whose reason is a
counter suffix. The interface's hot path performs the same checks inline on
a single `HEADER.unpack_from` to stay cheap; this module is the reference.

Options are accepted and skipped (never interpreted, never echoed back).
The header checksum is always checked: virtio offloads only L4 checksums.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..checksum import checksum

__all__ = ["HEADER", "HLEN", "PROTO_ICMP", "PROTO_TCP", "PROTO_UDP", "FLAG_DF",
           "FLAG_MF", "OFFSET_MASK", "Ipv4Error", "Ipv4Repr", "parse_header",
           "build_header", "fragment_payload", "is_unicast", "MAX_PACKET"]

HEADER = struct.Struct("!BBHHHBBH4s4s")
HLEN = 20
MAX_PACKET = 65535

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

FLAG_DF = 0x4000
FLAG_MF = 0x2000
OFFSET_MASK = 0x1FFF


class Ipv4Error(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_unicast(ip: bytes) -> bool:
    """Not 0.0.0.0/8, multicast, class E/limited broadcast, or loopback."""
    b0 = ip[0]
    return 0 < b0 < 224 and b0 != 127


@dataclass
class Ipv4Repr:
    src: bytes
    dst: bytes
    proto: int
    ihl: int             # header length in bytes
    total_len: int
    ident: int = 0
    flags_frag: int = 0  # DF/MF flags and the offset in 8-byte units, as on the wire
    ttl: int = 64
    tos: int = 0

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags_frag & FLAG_MF)

    @property
    def frag_offset(self) -> int:
        """Offset in bytes."""
        return (self.flags_frag & OFFSET_MASK) << 3

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_frag & (FLAG_MF | OFFSET_MASK))


def parse_header(data, off: int = 0) -> Ipv4Repr:
    avail = len(data) - off
    if avail < HLEN:
        raise Ipv4Error("ipv4_truncated")
    vihl, tos, tot, ident, ff, ttl, proto, _cs, src, dst = HEADER.unpack_from(data, off)
    if vihl >> 4 != 4:
        raise Ipv4Error("ipv4_bad_version")
    ihl = (vihl & 15) * 4
    if ihl < HLEN:
        raise Ipv4Error("ipv4_bad_ihl")
    if ihl > avail:
        raise Ipv4Error("ipv4_truncated")
    if tot < ihl:
        raise Ipv4Error("ipv4_bad_total_length")
    if tot > avail:
        raise Ipv4Error("ipv4_truncated")
    if int.from_bytes(data[off:off + ihl], "big") % 0xFFFF:
        # A correct header sums to 0xFFFF, i.e. 0 modulo 0xFFFF.
        raise Ipv4Error("ipv4_bad_checksum")
    return Ipv4Repr(src, dst, proto, ihl, tot, ident, ff, ttl, tos)


def build_header(src: bytes, dst: bytes, proto: int, payload_len: int, ident: int,
                 flags_frag: int = 0, ttl: int = 64, tos: int = 0) -> bytearray:
    """A 20-byte header with a correct checksum."""
    h = bytearray(HEADER.pack(0x45, tos, HLEN + payload_len, ident & 0xFFFF, flags_frag,
                              ttl, proto, 0, src, dst))
    cs = checksum(h)
    h[10] = cs >> 8
    h[11] = cs & 0xFF
    return h


def fragment_payload(payload_len: int, mtu: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of an L4 payload so that each fits in `mtu` with a
    20-byte header; every piece but the last is a multiple of 8 bytes."""
    step = ((mtu - HLEN) // 8) * 8
    pieces = []
    off = 0
    while True:
        n = min(step, payload_len - off)
        pieces.append((off, n))
        off += n
        if off >= payload_len:
            return pieces
