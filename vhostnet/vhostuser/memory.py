"""Guest memory: the regions QEMU shares with SET_MEM_TABLE, and checked translation.

Each region is a file descriptor (a memfd for QEMU's memory-backend-memfd)
mapped shared. Two address spaces point into it:

- guest-physical addresses (descriptor buffers), and
- QEMU's own virtual addresses ("user addresses"; the ring addresses of
  SET_VRING_ADDR are given this way).

Nothing else in vhostnet touches raw addresses: every access goes through
`gpa_view` / `uva_view`, which refuse ranges that are not wholly inside
mapped memory. A buffer may cross from one region into the next when the
regions are contiguous in guest-physical space; `gpa_views` returns one view
per piece for that case.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

__all__ = ["GuestMemory", "Region", "MemoryError_", "OutOfBounds"]


class MemoryError_(Exception):
    pass


class OutOfBounds(MemoryError_):
    """A guest address range not wholly inside mapped guest memory."""


@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    mmap_offset: int
    mm: mmap.mmap
    view: memoryview  # the region's bytes, from mmap_offset, `size` long

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    def describe(self) -> dict:
        return {"guest_phys_addr": self.gpa, "size": self.size,
                "userspace_addr": self.uva, "mmap_offset": self.mmap_offset}


class GuestMemory:
    def __init__(self) -> None:
        self.regions: list[Region] = []
        # One-entry cache: the data path nearly always stays in one region.
        self._last: Region | None = None

    @classmethod
    def from_fds(cls, table, fds: list[int]) -> "GuestMemory":
        """Map every region of a parsed SET_MEM_TABLE. Closes no fds; the caller owns them."""
        if len(fds) != len(table):
            raise MemoryError_(f"SET_MEM_TABLE: {len(table)} regions but {len(fds)} fds")
        mem = cls()
        try:
            for r, fd in zip(table, fds):
                mem.add(fd, r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        except BaseException:
            mem.close()
            raise
        return mem

    def add(self, fd: int, gpa: int, size: int, uva: int, mmap_offset: int) -> Region:
        if size <= 0:
            raise MemoryError_(f"region at {gpa:#x} has size {size}")
        if gpa + size > 1 << 64 or uva + size > 1 << 64:
            raise MemoryError_(f"region at {gpa:#x} size {size:#x} wraps the address space")
        for r in self.regions:
            if gpa < r.gpa_end and r.gpa < gpa + size:
                raise MemoryError_(f"region at {gpa:#x} overlaps region at {r.gpa:#x}")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise MemoryError_(f"region fd {fd}: {e}") from None
        if st.st_size and mmap_offset + size > st.st_size:
            raise MemoryError_(f"region at {gpa:#x}: offset {mmap_offset:#x} + size {size:#x} "
                               f"is past the end of its file ({st.st_size:#x} bytes)")
        try:
            mm = mmap.mmap(fd, mmap_offset + size, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise MemoryError_(f"cannot map region at {gpa:#x} size {size:#x}: {e}") from None
        view = memoryview(mm)[mmap_offset:mmap_offset + size]
        reg = Region(gpa, size, uva, mmap_offset, mm, view)
        self.regions.append(reg)
        self.regions.sort(key=lambda r: r.gpa)
        return reg

    def close(self) -> None:
        """Unmap everything. Views handed out earlier must be dropped first."""
        for r in self.regions:
            r.view.release()
            try:
                r.mm.close()
            except BufferError:
                # Someone still holds a view; the mapping goes when that does.
                pass
        self.regions = []
        self._last = None

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

    # -- translation -----------------------------------------------------

    def _region_for_gpa(self, gpa: int) -> Region | None:
        r = self._last
        if r is not None and r.gpa <= gpa < r.gpa + r.size:
            return r
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                self._last = r
                return r
        return None

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """A view of [gpa, gpa+length) that lies inside one region, or OutOfBounds."""
        r = self._last
        if r is None or not (r.gpa <= gpa and gpa + length <= r.gpa + r.size):
            r = self._region_for_gpa(gpa)
            if r is None or gpa + length > r.gpa + r.size:
                raise OutOfBounds(f"guest range {gpa:#x}+{length:#x} is not inside one memory region")
        off = gpa - r.gpa
        return r.view[off:off + length]

    def gpa_views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering [gpa, gpa+length), split where it crosses contiguous regions."""
        if length == 0:
            return []
        r = self._region_for_gpa(gpa)
        if r is not None and gpa + length <= r.gpa + r.size:
            off = gpa - r.gpa
            return [r.view[off:off + length]]
        out = []
        left = length
        addr = gpa
        while left:
            r = self._region_for_gpa(addr)
            if r is None:
                raise OutOfBounds(f"guest range {gpa:#x}+{length:#x} leaves guest memory at {addr:#x}")
            off = addr - r.gpa
            n = min(left, r.size - off)
            out.append(r.view[off:off + n])
            addr += n
            left -= n
        return out

    def uva_to_region(self, uva: int, length: int) -> tuple[Region, int]:
        for r in self.regions:
            if r.uva <= uva and uva + length <= r.uva + r.size:
                return r, uva - r.uva
        raise OutOfBounds(f"QEMU address range {uva:#x}+{length:#x} is not inside one memory region")

    def uva_view(self, uva: int, length: int) -> memoryview:
        r, off = self.uva_to_region(uva, length)
        return r.view[off:off + length]

    def uva_to_gpa(self, uva: int) -> int | None:
        for r in self.regions:
            if r.uva <= uva < r.uva + r.size:
                return r.gpa + uva - r.uva
        return None

    def contains_gpa(self, gpa: int, length: int) -> bool:
        try:
            self.gpa_views(gpa, length)
            return True
        except OutOfBounds:
            return False

    def describe(self) -> list[dict]:
        return [r.describe() for r in self.regions]
