"""One Ethernet frame plus the offload facts that travel with it.

The device side turns the 12-byte virtio-net header into these fields and
back; the stack only ever sees this generic form (the same meaning Linux
gives CHECKSUM_PARTIAL / CHECKSUM_UNNECESSARY / GSO on an skb), so it never
learns about virtio.
"""
from __future__ import annotations

__all__ = ["Frame"]


class Frame:
    __slots__ = ("data", "csum_start", "csum_offset", "gso_size", "csum_valid")

    def __init__(self, data, csum_start: int = 0, csum_offset: int = 0,
                 gso_size: int = 0, csum_valid: bool = False):
        # bytes, bytearray or memoryview. A receiver must not keep a memoryview
        # past the call that handed it over: it may point into guest memory.
        self.data = data
        # csum_start > 0: the L4 checksum is partial. The field at
        # csum_start + csum_offset holds the pseudo-header sum; the real
        # checksum covers data[csum_start:]. (Frames from the guest with
        # NEEDS_CSUM, or frames to a guest that accepts GUEST_CSUM.)
        self.csum_start = csum_start
        self.csum_offset = csum_offset
        # gso_size > 0: a TCP/IPv4 frame larger than the MTU whose payload is
        # to be cut into segments of this many bytes (TSO).
        self.gso_size = gso_size
        # The sender vouches for the checksums (DATA_VALID).
        self.csum_valid = csum_valid

    def __repr__(self) -> str:
        extra = ""
        if self.csum_start:
            extra += f" csum_partial={self.csum_start}+{self.csum_offset}"
        if self.gso_size:
            extra += f" gso={self.gso_size}"
        if self.csum_valid:
            extra += " csum_valid"
        return f"<Frame {len(self.data)}B{extra}>"
