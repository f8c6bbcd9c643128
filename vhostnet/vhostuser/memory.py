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

Memory that cannot shrink under us. A front-end that truncates a region's
file after SET_MEM_TABLE turns the next access to the lost pages into
SIGBUS, which kills the process; Python cannot catch it. So a region must
be a memfd sealed with F_SEAL_SHRINK (fcntl F_GET_SEALS), which is what QEMU's
`-object memory-backend-memfd,...,share=on` gives by default (seal=on seals
GROW, SHRINK and SEAL). Anything else is refused at SET_MEM_TABLE with a
message naming the QEMU option:

- a memfd without the seal (QEMU's seal=off, DPDK's virtio-user): refused;
- a file (`memory-backend-file`, hugetlbfs, /dev/shm): it cannot be
  sealed at all, so it is refused too.

`--allow-unsealed-memory` (Backend/Server/make_server allow_unsealed_memory=True)
accepts both, with a warning per memory table: then a front-end that
shrinks the file kills the backend, so use it only with a front-end you
trust. Either way the region must lie within the file's current size.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

__all__ = ["GuestMemory", "Region", "MemoryError_", "OutOfBounds", "UnsealedMemory", "check_region_fd"]

F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)   # linux/fcntl.h
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)          # F_LINUX_SPECIFIC_BASE + 10
QEMU_SEALED = "-object memory-backend-memfd,id=mem,size=...,share=on (seal=on is the default)"


class MemoryError_(Exception):
    pass


class OutOfBounds(MemoryError_):
    """A guest address range not wholly inside mapped guest memory."""


class UnsealedMemory(MemoryError_):
    """A region whose file could shrink under us (no F_SEAL_SHRINK)."""


def check_region_fd(fd: int, end: int, allow_unsealed: bool = False) -> str | None:
    """Check a region's fd before mapping END bytes of it; a warning to log, or None.

    Raises MemoryError_ (UnsealedMemory for the seal) with a message for the user.
    """
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise MemoryError_(f"region fd: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MemoryError_("region fd is not a memfd or a file (QEMU sends the fd of its "
                           f"memory backend: use {QEMU_SEALED})")
    if end > st.st_size:
        raise MemoryError_(f"region ends at offset {end:#x}, past the end of its file ({st.st_size:#x} bytes)")
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
        memfd = True
    except OSError:
        seals, memfd = 0, False       # EINVAL: not a memfd, cannot be sealed
    if seals & F_SEAL_SHRINK:
        return None
    what = ("a memfd without F_SEAL_SHRINK (QEMU: memory-backend-memfd with seal=off)" if memfd else
            "a file, which cannot be sealed (QEMU: memory-backend-file)")
    risk = "the front-end could shrink it under the backend, which would then die of SIGBUS"
    if not allow_unsealed:
        raise UnsealedMemory(f"guest memory is {what}: {risk}. Use {QEMU_SEALED}, or start vhostnet with "
                             f"--allow-unsealed-memory if you trust the front-end")
    return f"guest memory is {what}, accepted (--allow-unsealed-memory): {risk}"


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
    def from_fds(cls, table, fds: list[int], *, allow_unsealed: bool = False,
                 warnings: list[str] | None = None) -> "GuestMemory":
        """Map every region of a parsed SET_MEM_TABLE. Closes no fds; the caller owns them.

        Each fd is checked first (check_region_fd); warnings for accepted
        unsealed regions are appended to WARNINGS.
        """
        if len(fds) != len(table):
            raise MemoryError_(f"SET_MEM_TABLE: {len(table)} regions but {len(fds)} fds")
        for r, fd in zip(table, fds):
            if r.memory_size <= 0 or r.mmap_offset + r.memory_size > 1 << 64:
                raise MemoryError_(f"region at {r.guest_phys_addr:#x} has size {r.memory_size}")
            warning = check_region_fd(fd, r.mmap_offset + r.memory_size, allow_unsealed)
            if warning and warnings is not None:
                warnings.append(f"region at {r.guest_phys_addr:#x}: {warning}")
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

    def region_for_gpa(self, gpa: int) -> Region | None:
        """The region holding guest-physical address GPA (for callers that cache it)."""
        return self._region_for_gpa(gpa)

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
