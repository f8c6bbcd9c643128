"""The guest memory and the mapped split ring that the batched-walk tests share
(test_take_readable.py's TxRig, test_put_frames.py's RxRig).

Two memfd regions (the ring and its usual buffers in the first; the second
is a region the ring's cached one is not), the ring's parts at fixed
offsets of the first, its avail and used indices both at BASE, started."""
from __future__ import annotations

import mmap
import os
import struct

from vhostnet.testing.frontend import UVA_BASE
from vhostnet.vhostuser.memory import GuestMemory

GPA = 0x10000
DESC_OFF, AVAIL_OFF, USED_OFF, BUF_OFF = 0x0, 0x1000, 0x2000, 0x10000
INDIRECT_OFF = 0x8000            # indirect tables, 256 bytes apart
GPA2, SIZE2 = 0x400000, 1 << 16  # a second guest region: not the cached one
UVA2 = UVA_BASE + (1 << 24)


class TwoRegions:
    """Memory of SIZE bytes at GPA plus the second region; ring Q (num, attached at BASE) in it."""

    def __init__(self, name: str, size: int, q, num: int, base: int):
        self.fd = os.memfd_create(name)
        os.ftruncate(self.fd, size)
        self.fd2 = os.memfd_create(name + "-2")
        os.ftruncate(self.fd2, SIZE2)
        self.mem = GuestMemory()
        self.mem.add(self.fd, GPA, size, UVA_BASE, 0)
        self.mem.add(self.fd2, GPA2, SIZE2, UVA2, 0)
        self.mm = mmap.mmap(self.fd, size)
        self.mm2 = mmap.mmap(self.fd2, SIZE2)
        self.view = memoryview(self.mm)
        self.view2 = memoryview(self.mm2)
        self.num = num
        self.ring = q
        q.num = num
        q.desc_uva, q.avail_uva, q.used_uva = UVA_BASE + DESC_OFF, UVA_BASE + AVAIL_OFF, UVA_BASE + USED_OFF

    def start(self, base: int) -> None:
        """Map the ring (after the caller set what attach reads, such as event_idx)."""
        q = self.ring
        q.attach(self.mem)
        q.set_base(base)
        struct.pack_into("<H", self.view, AVAIL_OFF + 2, base)
        struct.pack_into("<H", self.view, USED_OFF + 2, base)
        q.started = q.enabled = True

    # -- the driver's avail ring --------------------------------------------------

    def offer(self, *heads: int) -> None:
        """HEADS made available, in order."""
        for h in heads:
            idx = struct.unpack_from("<H", self.view, AVAIL_OFF + 2)[0]
            struct.pack_into("<H", self.view, AVAIL_OFF + 4 + 2 * (idx % self.num), h)
            struct.pack_into("<H", self.view, AVAIL_OFF + 2, (idx + 1) & 0xFFFF)

    def jump(self, by: int) -> None:
        """avail->idx moved BY entries with nothing written (a hostile driver)."""
        idx = struct.unpack_from("<H", self.view, AVAIL_OFF + 2)[0]
        struct.pack_into("<H", self.view, AVAIL_OFF + 2, (idx + by) & 0xFFFF)

    def close(self) -> None:
        self.ring.detach()
        self.view.release()
        self.view2.release()
        self.mm.close()
        self.mm2.close()
        self.mem.close()
        os.close(self.fd)
        os.close(self.fd2)
