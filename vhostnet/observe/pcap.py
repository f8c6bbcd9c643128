"""Packet capture: classic pcap files of the guest's link, and the tap that feeds them.

A tap is a callable `tap(direction, frame)` in `NetDevice.taps` (the
server shares one list with every connection's device). The device calls
it for each frame: direction "tx" is a frame the guest sent, "rx" one
written into the guest's RX buffers. With no capture running the list is
empty and a tap costs one empty loop per frame.

In the data path a tap only copies: `snapshot(frame)` takes the bytes at
once (a TX frame's data is a view of guest memory the guest may reuse the
moment its chain is returned) together with the offload facts. The rest
(checksum completion, file writes, streaming) happens off that path or
after it.

What the file holds, and what it does not:
- Classic pcap (not pcapng), LINKTYPE_ETHERNET, microsecond timestamps
  from the wall clock, snaplen 262144. Frames are written whole.
- No direction: classic pcap has no field for it. Filter on the guest's MAC
  (`eth.src == 52:54:00:12:34:56` is TX), or use `vhostnet capture` without
  -w, whose live lines say tx/rx.
- Partial checksums are completed. A frame with csum_start set (the guest's
  NEEDS_CSUM on TX, or our frames to a guest that negotiated GUEST_CSUM)
  carries only the pseudo-header sum in its L4 checksum field; tcpdump would
  call it bad, as it does when capturing on a host with checksum offload.
  We write what the wire would carry: `finalize_l4_checksum` on a private
  copy. The `--raw-csum` option of capture and serve --pcap keeps the bytes
  as the guest left them instead, for debugging a driver's offload fields.
- TSO frames (gso_size set) are written as the one large segment the guest
  or the stack handed over (up to 64 KiB), not cut into MTU-sized
  segments, as a host capture with TSO/GRO shows them.
"""
from __future__ import annotations

import struct
import time

from stack import Frame
from stack.interface import finalize_l4_checksum

__all__ = ["PcapWriter", "Snap", "snapshot", "wire_bytes", "FileTap", "LINKTYPE_ETHERNET", "SNAPLEN"]

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
MAGIC = 0xA1B2C3D4
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


class Snap:
    """A frame copied out of the data path: bytes, direction, time, offload facts."""
    __slots__ = ("ts", "direction", "data", "csum_start", "csum_offset", "gso_size")

    def __init__(self, ts, direction, data, csum_start=0, csum_offset=0, gso_size=0):
        self.ts, self.direction, self.data = ts, direction, data
        self.csum_start, self.csum_offset, self.gso_size = csum_start, csum_offset, gso_size


def snapshot(direction: str, frame: Frame) -> Snap:
    """Copy a frame at once (it may be a view of guest memory)."""
    return Snap(time.time(), direction, bytes(frame.data), frame.csum_start, frame.csum_offset,
                frame.gso_size)


def wire_bytes(snap: Snap, complete_csum: bool = True) -> bytes:
    """The frame as the wire would carry it: partial L4 checksum completed.

    A csum_start/csum_offset that points outside the frame (a driver bug,
    which the device refuses and counts) leaves the bytes as they are.
    """
    if not (complete_csum and snap.csum_start):
        return snap.data
    f = Frame(bytearray(snap.data), snap.csum_start, snap.csum_offset)
    try:
        finalize_l4_checksum(f)
    except ValueError:
        return snap.data
    return bytes(f.data)


class PcapWriter:
    """Classic pcap on a binary file object; `write()` one record per frame."""

    def __init__(self, f, snaplen: int = SNAPLEN, linktype: int = LINKTYPE_ETHERNET):
        self.f = f
        self.snaplen = snaplen
        self.frames = 0
        f.write(_GLOBAL.pack(MAGIC, 2, 4, 0, 0, snaplen, linktype))

    def write(self, data, ts: float | None = None) -> None:
        if ts is None:
            ts = time.time()
        sec = int(ts)
        usec = min(int((ts - sec) * 1_000_000), 999_999)
        caplen = min(len(data), self.snaplen)
        self.f.write(_RECORD.pack(sec, usec, caplen, len(data)))
        self.f.write(data[:caplen])
        self.frames += 1

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class FileTap:
    """A tap writing every frame to a pcap file (`serve --pcap`).

    Writes go to a buffered file in the data path (a memory copy, no
    syscall most of the time); the caller flushes now and then so the file
    can be read while the backend runs.
    """

    def __init__(self, path: str, complete_csum: bool = True):
        self.writer = PcapWriter(open(path, "wb"))
        self.complete_csum = complete_csum

    def __call__(self, direction: str, frame: Frame) -> None:
        snap = snapshot(direction, frame)
        self.writer.write(wire_bytes(snap, self.complete_csum), snap.ts)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
