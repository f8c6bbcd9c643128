"""vhost-user messages, declared once (QEMU docs/interop/vhost-user.rst).

Every message is a 12-byte header (request, flags, size) followed by `size`
bytes of payload; file descriptors ride along as SCM_RIGHTS ancillary data.
This is the control plane, so clarity wins: payloads are construct structs,
parsed once per message. Nothing here knows about virtio-net.
"""
from __future__ import annotations

import enum

from construct import (Array, Bytes, Int32ul, Int64ul, Padding, Struct,
                       StreamError, ConstructError)

__all__ = ["Req", "ProtoFeat", "Header", "HEADER_SIZE", "MAX_PAYLOAD", "MAX_FDS",
           "PAYLOADS", "FLAG_VERSION", "FLAG_REPLY", "FLAG_NEED_REPLY",
           "VRING_IDX_MASK", "VRING_NOFD_MASK", "MAX_MEM_REGIONS", "parse_payload",
           "BadMessage", "feature_names", "VHOST_USER_F_PROTOCOL_FEATURES"]


class Req(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtoFeat(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# The transport bit that makes QEMU accept a vhost-user backend at all.
VHOST_USER_F_PROTOCOL_FEATURES = 30

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VERSION_MASK = 0x3

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

MAX_MEM_REGIONS = 8
MAX_FDS = 8
HEADER_SIZE = 12
# The largest payload QEMU sends is SET_CONFIG (12 + 256) / GET_CONFIG.
MAX_PAYLOAD = 4096

Header = Struct("request" / Int32ul, "flags" / Int32ul, "size" / Int32ul)

U64 = Struct("value" / Int64ul)
VringState = Struct("index" / Int32ul, "num" / Int32ul)
VringAddr = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "desc_user_addr" / Int64ul,
    "used_user_addr" / Int64ul,
    "avail_user_addr" / Int64ul,
    "log_guest_addr" / Int64ul,
)
MemRegion = Struct(
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)
MemTableHead = Struct("nregions" / Int32ul, Padding(4))
SingleMemRegion = Struct(Padding(8), "region" / MemRegion)
ConfigSpace = Struct("offset" / Int32ul, "size" / Int32ul, "flags" / Int32ul)

# Which payload layout each request carries (requests not listed carry none
# we interpret). Sizes are checked before parsing.
PAYLOADS = {
    Req.SET_FEATURES: U64,
    Req.SET_PROTOCOL_FEATURES: U64,
    Req.SET_VRING_NUM: VringState,
    Req.SET_VRING_BASE: VringState,
    Req.GET_VRING_BASE: VringState,
    Req.SET_VRING_ENABLE: VringState,
    Req.SET_VRING_ADDR: VringAddr,
    Req.SET_VRING_KICK: U64,
    Req.SET_VRING_CALL: U64,
    Req.SET_VRING_ERR: U64,
    Req.NET_SET_MTU: U64,
    Req.SET_LOG_BASE: U64,
    Req.SEND_RARP: U64,
    Req.SET_STATUS: U64,
    Req.GET_CONFIG: ConfigSpace,
    Req.SET_CONFIG: ConfigSpace,
    Req.ADD_MEM_REG: SingleMemRegion,
    Req.REM_MEM_REG: SingleMemRegion,
}


class BadMessage(Exception):
    """A request the backend refuses; the text is what goes into the log."""


def parse_payload(req: int, payload: bytes):
    """Parse a request's payload into a construct Container, with clear errors."""
    if req == Req.SET_MEM_TABLE:
        return parse_mem_table(payload)
    layout = PAYLOADS.get(req)
    if layout is None:
        return None
    need = layout.sizeof()
    # GET/SET_CONFIG carry the config bytes after the fixed part.
    if len(payload) < need or (req not in (Req.GET_CONFIG, Req.SET_CONFIG) and len(payload) != need):
        name = Req(req).name if req in Req._value2member_map_ else str(req)
        raise BadMessage(f"{name}: payload is {len(payload)} bytes, expected {need}")
    try:
        return layout.parse(payload)
    except (StreamError, ConstructError) as e:  # pragma: no cover - sizes checked above
        raise BadMessage(f"cannot parse payload of request {req}: {e}") from None


def parse_mem_table(payload: bytes):
    if len(payload) < MemTableHead.sizeof():
        raise BadMessage(f"SET_MEM_TABLE: payload of {len(payload)} bytes is too short")
    head = MemTableHead.parse(payload)
    n = head.nregions
    if not 1 <= n <= MAX_MEM_REGIONS:
        raise BadMessage(f"SET_MEM_TABLE: {n} regions (allowed 1..{MAX_MEM_REGIONS})")
    need = MemTableHead.sizeof() + n * MemRegion.sizeof()
    if len(payload) < need:
        raise BadMessage(f"SET_MEM_TABLE: {n} regions need {need} bytes, got {len(payload)}")
    return Array(n, MemRegion).parse(payload[MemTableHead.sizeof():need])


def request_name(req: int) -> str:
    try:
        return Req(req).name
    except ValueError:
        return f"UNKNOWN({req})"


def feature_names(bits: int, names: dict[int, str]) -> list[str]:
    """Decode a feature bitmask into names, unknown bits as 'bit N'."""
    out = []
    for i in range(64):
        if bits >> i & 1:
            out.append(names.get(i, f"bit {i}"))
    return out


PROTOCOL_FEATURE_NAMES = {f.value: f.name for f in ProtoFeat}
