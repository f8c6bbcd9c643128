"""Loopback: IPv4 frames the guest sends to its own address come back to it.

The frame is returned unchanged except for the destination MAC (set to the
guest's, i.e. the frame's own source MAC), keeping its offload metadata
(partial checksum, GSO size, DATA_VALID). What the guest did not accept on
its RX side is done here in software: a partial checksum is finalized, and
a GSO TCP frame is cut into gso_size segments (stack/segment.py). GSO on a
non-TCP frame cannot be honoured and is dropped (counted).
"""
from __future__ import annotations

from .checksum import finalize_l4_checksum
from .frame import Frame
from .segment import SegmentError, segment_tcp

__all__ = ["loop_back"]


def loop_back(frame: Frame, data: bytes, csum_ok: bool, tso_ok: bool, counters) -> list[Frame]:
    """`data` is a private copy of frame.data (already validated as IPv4 to
    the guest). Returns the frames to hand to the guest."""
    d = bytearray(data)
    d[0:6] = data[6:12]
    gso = frame.gso_size
    if gso:
        if data[23] != 6:
            counters["drop_loopback_gso_not_tcp"] += 1
            return []
        if not tso_ok:
            try:
                segs = segment_tcp(d, gso, partial=csum_ok)
            except SegmentError:
                counters["drop_loopback_bad_gso"] += 1
                return []
            counters["loopback_segmented"] += len(segs)
            if csum_ok:
                start = 14 + (d[14] & 15) * 4
                return [Frame(s, csum_start=start, csum_offset=16) for s in segs]
            return [Frame(s, csum_valid=frame.csum_valid) for s in segs]
    out = Frame(d, frame.csum_start, frame.csum_offset, gso, frame.csum_valid)
    if out.csum_start and not csum_ok:
        try:
            finalize_l4_checksum(out)
        except ValueError:
            counters["drop_loopback_bad_csum_start"] += 1
            return []
    return [out]
