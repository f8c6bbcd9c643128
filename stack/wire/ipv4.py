"""IPv4 header (RFC 791): validation, emission and fragmentation.

`check_header` validates once (version, IHL, total length, header checksum)
on a single precompiled `HEADER.unpack_from` and returns the fields as a
tuple: that is the receive path's fast form (stack/interface.py), with no
object built per frame. `parse_header` wraps the same check in an
`Ipv4Repr` for tests and the control plane, so there is exactly one
implementation of the checks. On failure both raise `Ipv4Error`, whose
reason is a counter suffix.

Options are accepted and skipped (never interpreted, never echoed back).
The header checksum is always checked: virtio offloads only L4 checksums.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..checksum import checksum

__all__ = ["HEADER", "HLEN", "PROTO_ICMP", "PROTO_TCP", "PROTO_UDP", "FLAG_DF",
           "FLAG_MF", "OFFSET_MASK", "Ipv4Error", "Ipv4Repr", "check_header", "parse_header",
           "build_header", "fragment_payload", "is_unicast", "MAX_PACKET"]

HEADER = struct.Struct("!BBHHHBBH4s4s")
HLEN = 20                # RFC 791 §3.1: the header without options
VERSION = 4
VIHL_PLAIN = (VERSION << 4) | (HLEN // 4)   # 0x45: version 4, no options
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


def check_header(data, off: int = 0, end: int | None = None) -> tuple:
    """Validate the header at `off` (the datagram may run to `end`, default
    the end of `data`). Returns (ihl, tos, total_len, ident, flags_frag, ttl,
    proto, src, dst), ihl in bytes."""
    avail = (len(data) if end is None else end) - off
    if avail < HLEN:
        raise Ipv4Error("ipv4_truncated")
    vihl, tos, tot, ident, ff, ttl, proto, _cs, src, dst = HEADER.unpack_from(data, off)
    if vihl == VIHL_PLAIN:
        ihl = HLEN
    else:
        if vihl >> 4 != VERSION:
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
        # A correct header sums to 0xFFFF, i.e. 0 modulo 0xFFFF (RFC 1071).
        raise Ipv4Error("ipv4_bad_checksum")
    return ihl, tos, tot, ident, ff, ttl, proto, src, dst


def parse_header(data, off: int = 0) -> Ipv4Repr:
    ihl, tos, tot, ident, ff, ttl, proto, src, dst = check_header(data, off)
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
