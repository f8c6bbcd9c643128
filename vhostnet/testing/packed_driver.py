"""The driver's side of one packed virtqueue (virtio 1.2 §2.8), for tests.

It follows §2.8.21's procedure: write every descriptor of a chain, the
head's flags last, flip the Driver Ring Wrap Counter when passing the end;
read used descriptors at its own used position, skipping as many slots as
the completed chain took. Raw writers (`write_desc`, `set_driver_event`)
let tests play a hostile driver.
"""
from __future__ import annotations

import struct

from vhostnet.virtio.packed import (DESC, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
                                    RING_EVENT_FLAGS_ENABLE, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_NEXT,
                                    VIRTQ_DESC_F_USED)

__all__ = ["PackedDriver"]

_EVENT = struct.Struct("<HH")


class PackedDriver:
    def __init__(self, mem: memoryview, size: int, desc: int, driver_area: int, device_area: int):
        self.mem, self.size = mem, size
        self.desc, self.driver_area, self.device_area = desc, driver_area, device_area
        self.next_avail = 0
        self.avail_wrap = True
        self.next_used = 0
        self.used_wrap = True
        self.free_ids = list(range(size))[::-1]
        self.slots_of: dict[int, int] = {}   # buffer id -> slots its chain took
        self.free_slots = size

    # -- raw access ------------------------------------------------------------

    def write_desc(self, slot: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        DESC.pack_into(self.mem, self.desc + 16 * slot, addr, length, buf_id, flags)

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.mem, self.desc + 16 * slot)

    def avail_flags(self, wrap: bool) -> int:
        return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED

    def set_driver_event(self, flags: int, off: int = 0, wrap: bool = True) -> None:
        _EVENT.pack_into(self.mem, self.driver_area, off | wrap << 15, flags)

    def enable_interrupts(self) -> None:
        self.set_driver_event(RING_EVENT_FLAGS_ENABLE)

    def disable_interrupts(self) -> None:
        self.set_driver_event(RING_EVENT_FLAGS_DISABLE)

    def interrupt_at_next(self) -> None:
        """EVENT_IDX: an interrupt when the device uses the next descriptor we wait for."""
        self.set_driver_event(RING_EVENT_FLAGS_DESC, self.next_used, self.used_wrap)

    def device_event(self) -> tuple[int, int, bool]:
        desc, flags = _EVENT.unpack_from(self.mem, self.device_area)
        return flags & 3, desc & 0x7FFF, bool(desc >> 15)

    # -- making buffers available ---------------------------------------------------

    def add(self, bufs: list[tuple[int, int, int]], buf_id: int | None = None) -> int:
        """bufs = [(addr, len, flags)] (WRITE/INDIRECT only; NEXT is filled in). Returns the id."""
        if len(bufs) > self.free_slots:
            raise RuntimeError("ring full")
        if buf_id is None:
            buf_id = self.free_ids.pop()
        head_slot, head_wrap = self.next_avail, self.avail_wrap
        head_flags = None
        slot, wrap = head_slot, head_wrap
        for k, (addr, length, flags) in enumerate(bufs):
            f = flags | self.avail_flags(wrap) | (VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0)
            if k == 0:
                # The head goes last (§2.8.6): write it not-yet-available now.
                head_flags = f
                self.write_desc(slot, addr, length, buf_id, f ^ (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED))
            else:
                self.write_desc(slot, addr, length, buf_id, f)
            slot += 1
            if slot == self.size:
                slot, wrap = 0, not wrap
        self.write_head_flags(head_slot, head_flags)
        self.next_avail, self.avail_wrap = slot, wrap
        self.slots_of[buf_id] = len(bufs)
        self.free_slots -= len(bufs)
        return buf_id

    def write_head_flags(self, slot: int, flags: int) -> None:
        struct.pack_into("<H", self.mem, self.desc + 16 * slot + 14, flags)

    # -- used buffers -----------------------------------------------------------------

    def used(self) -> list[tuple[int, int]]:
        """(id, len) of every chain the device returned since the last call, in order."""
        out = []
        while True:
            _addr, length, buf_id, flags = self.read_desc(self.next_used)
            avail, used = bool(flags & VIRTQ_DESC_F_AVAIL), bool(flags & VIRTQ_DESC_F_USED)
            if not (avail == used == self.used_wrap):
                return out
            out.append((buf_id, length))
            n = self.slots_of.pop(buf_id, 1)
            self.free_slots += n
            self.free_ids.append(buf_id)
            self.next_used += n
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap = not self.used_wrap


def frontend_ring(*args, **kwargs):
    """A packed ring with the in-process frontend's Ring interface (frontend.py)."""
    from vhostnet.testing.frontend import Ring

    class PackedFrontendRing(Ring):
        """frontend.Ring's calls on a packed ring: one buffer id per chain,
        buffers addressed by id (buf(id)), used ids in completion order."""
        packed = True

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            # The split layout's desc / avail / used areas hold the packed ring,
            # the driver event area and the device event area.
            self.drv = PackedDriver(self.mem, self.size, self.desc, self.avail, self.used)
            self.event_idx = False

        def add(self, bufs):
            if not self.free or len(bufs) > self.drv.free_slots:
                raise RuntimeError("ring full")
            buf_id = self.free.pop()
            self.drv.add(bufs, buf_id=buf_id)
            self.chains[buf_id] = [buf_id]
            return buf_id

        def take_used(self):
            out = self.drv.used()
            for buf_id, _ in out:
                self.chains.pop(buf_id, None)
                if buf_id not in self.free:
                    self.free.append(buf_id)
            if self.event_idx and self.auto_used_event:
                self.drv.interrupt_at_next()
            return out

        def set_avail_flags(self, flags: int) -> None:
            # Split's VRING_AVAIL_F_NO_INTERRUPT: the driver event's DISABLE.
            self.drv.disable_interrupts() if flags & 1 else self.drv.enable_interrupts()

        def used_idx(self) -> int:
            return self.drv.next_used

        def avail_event(self) -> int:
            return self.drv.device_event()[1]

    return PackedFrontendRing(*args, **kwargs)
