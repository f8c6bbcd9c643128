"""Software TSO: cut one large TCP/IPv4 frame into MSS-sized frames.

Used when a frame with gso_size > 0 must reach a guest that did not accept
GUEST_TSO4 (loopback of the guest's own TSO frames, or the TCP layer asking
for TSO that the guest lost). Mirrors what Linux's tcp_gso_segment does:
each segment gets its own IP id (first id + i), total length and header
checksum; the TCP sequence advances by the payload cut so far; FIN and PSH
stay only on the last segment and CWR only on the first.

Checksums: `partial=True` leaves the pseudo-header sum in the TCP checksum
field (the caller marks the frames csum_start/csum_offset); otherwise each
segment is fully checksummed. IP options are copied to every segment.

This module validates the headers; the loop that writes the segments is
stack.native.segment (C through cffi, or its Python twin). With the C loop
the segments are memoryview slices of one new bytearray, else bytearrays;
either is writable and owned by the caller.
"""
from __future__ import annotations

from .native import segment

__all__ = ["segment_tcp", "SegmentError"]

# At most this many segments from one frame (64 KiB at a 536-byte MSS is
# 123); a smaller gso_size is refused rather than allocating without bound.
MAX_SEGMENTS = 256


class SegmentError(ValueError):
    pass


def segment_tcp(data, gso_size: int, partial: bool = False) -> list:
    """`data` is a whole Ethernet frame. Returns the segment frames."""
    if gso_size <= 0:
        raise SegmentError("gso_size must be positive")
    n = len(data)
    if n < 14 + 20 or data[12] != 0x08 or data[13] != 0x00:
        raise SegmentError("not an IPv4 frame")
    ihl = (data[14] & 15) * 4
    tot = (data[16] << 8) | data[17]
    if data[14] >> 4 != 4 or ihl < 20 or data[23] != 6:
        raise SegmentError("not TCP/IPv4")
    l4 = 14 + ihl
    if l4 + 20 > n or 14 + tot > n or tot < ihl + 20:
        raise SegmentError("truncated TCP/IPv4 frame")
    doff = (data[l4 + 12] >> 4) * 4
    if doff < 20 or l4 + doff > 14 + tot:
        raise SegmentError("bad TCP data offset")
    pay = l4 + doff
    end = 14 + tot
    plen = end - pay
    if plen <= gso_size:
        count = 1
    else:
        count = -(-plen // gso_size)
    if count > MAX_SEGMENTS:
        raise SegmentError(f"{count} segments exceed the limit of {MAX_SEGMENTS}")
    return segment(data, ihl, doff, tot, gso_size, count, partial)
