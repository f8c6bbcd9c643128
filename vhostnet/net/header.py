"""struct virtio_net_hdr (virtio 1.2 §5.1.6) and the copies around it.

The header is 12 bytes when VERSION_1 or MRG_RXBUF was negotiated and 10
bytes for a legacy driver without MRG_RXBUF (§5.1.6.1, "Legacy Interface").
Its fields become a stack Frame's offload fields and back:

- NEEDS_CSUM + csum_start/csum_offset: a partial checksum (§5.1.6.2);
- gso_type TCPV4 + gso_size: a TSO segment (§5.1.6.2);
- DATA_VALID: a checksum the device vouches for (§5.1.6.3).

Precompiled struct only: this runs once per frame.
"""
from __future__ import annotations

import struct

from stack.native import copy

__all__ = ["HDR10", "HDR12", "NEEDS_CSUM", "DATA_VALID", "GSO_NONE", "GSO_TCPV4", "GSO_ECN",
           "MAX_FRAME", "hdr_len_for", "scatter"]

#: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (§5.1.6)
HDR10 = struct.Struct("<BBHHHH")
#: the same plus num_buffers (§5.1.6, with MRG_RXBUF or VERSION_1)
HDR12 = struct.Struct("<BBHHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM = NEEDS_CSUM = 1    # §5.1.6
VIRTIO_NET_HDR_F_DATA_VALID = DATA_VALID = 2    # §5.1.6
VIRTIO_NET_HDR_GSO_NONE = GSO_NONE = 0          # §5.1.6
VIRTIO_NET_HDR_GSO_TCPV4 = GSO_TCPV4 = 1        # §5.1.6
VIRTIO_NET_HDR_GSO_ECN = GSO_ECN = 0x80         # §5.1.6
#: An Ethernet header plus the largest IPv4 packet (RFC 791 total length).
MAX_FRAME = 14 + 65535


def hdr_len_for(mrg_rxbuf: bool, version_1: bool) -> int:
    return HDR12.size if (mrg_rxbuf or version_1) else HDR10.size


def scatter(views, hdr, data) -> int:
    """Copy hdr then data into consecutive views; returns bytes written.

    One call of the native scatter/gather copy (stack/native: C through
    cffi, or its Python twin), however many views."""
    return copy(views, (hdr, data))
