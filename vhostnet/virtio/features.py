"""virtio (virtio 1.2 §6) and virtio-net (§5.1.3) feature bits, with names for decoding."""
from __future__ import annotations

CSUM = 0
GUEST_CSUM = 1
MTU = 3
MAC = 5
GUEST_TSO4 = 7
GUEST_TSO6 = 8
GUEST_ECN = 9
GUEST_UFO = 10
HOST_TSO4 = 11
HOST_TSO6 = 12
HOST_ECN = 13
HOST_UFO = 14
MRG_RXBUF = 15
STATUS = 16
CTRL_VQ = 17
MQ = 22
NOTIFY_ON_EMPTY = 24
ANY_LAYOUT = 27
INDIRECT_DESC = 28
EVENT_IDX = 29
PROTOCOL_FEATURES = 30
VERSION_1 = 32
RING_PACKED = 34      # virtio 1.2 §6: the packed virtqueue layout (§2.8)

FEATURE_NAMES = {
    0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC",
    7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4",
    12: "HOST_TSO6", 13: "HOST_ECN", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS",
    17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN", 21: "GUEST_ANNOUNCE", 22: "MQ",
    23: "CTRL_MAC_ADDR", 24: "NOTIFY_ON_EMPTY", 27: "ANY_LAYOUT", 28: "RING_INDIRECT_DESC",
    29: "RING_EVENT_IDX", 30: "PROTOCOL_FEATURES(vhost-user)", 32: "VERSION_1",
    33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER", 36: "ORDER_PLATFORM",
    37: "SR_IOV", 38: "NOTIFICATION_DATA",
}

# What vhostnet offers by default. The offloads are how a Python backend
# keeps up: one 64 KiB TSO segment costs about what one 1500-byte frame does.
DEFAULT_FEATURES = (
    1 << CSUM | 1 << GUEST_CSUM | 1 << MAC | 1 << GUEST_TSO4 | 1 << HOST_TSO4
    | 1 << MRG_RXBUF | 1 << STATUS | 1 << INDIRECT_DESC | 1 << EVENT_IDX | 1 << VERSION_1
    | 1 << RING_PACKED
)
OFFLOAD_FEATURES = 1 << CSUM | 1 << GUEST_CSUM | 1 << GUEST_TSO4 | 1 << HOST_TSO4

# Names accepted by --disable-feature.
BY_NAME = {
    "csum": CSUM, "guest-csum": GUEST_CSUM, "mac": MAC, "guest-tso4": GUEST_TSO4,
    "host-tso4": HOST_TSO4, "mrg-rxbuf": MRG_RXBUF, "status": STATUS,
    "indirect-desc": INDIRECT_DESC, "event-idx": EVENT_IDX, "packed": RING_PACKED,
}


# virtio 1.2 §5.1.3.1: feature -> the features one of which it requires.
REQUIRES = {
    GUEST_TSO4: (GUEST_CSUM,), GUEST_TSO6: (GUEST_CSUM,), GUEST_ECN: (GUEST_TSO4, GUEST_TSO6),
    GUEST_UFO: (GUEST_CSUM,), HOST_TSO4: (CSUM,), HOST_TSO6: (CSUM,),
    HOST_ECN: (HOST_TSO4, HOST_TSO6), HOST_UFO: (CSUM,), MQ: (CTRL_VQ,),
}


def missing_requirements(bits: int) -> list[str]:
    """What BITS take without a feature they require (§5.1.3.1), one phrase each."""
    out = []
    for feat, needs in REQUIRES.items():
        if bits >> feat & 1 and not any(bits >> n & 1 for n in needs):
            out.append(f"{FEATURE_NAMES[feat]} without {' or '.join(FEATURE_NAMES[n] for n in needs)}")
    return out


def names(bits: int, table: dict[int, str] = FEATURE_NAMES) -> list[str]:
    return [table.get(i, f"bit{i}") for i in range(64) if bits >> i & 1]
