"""DHCP messages on the wire (RFC 2131 §2, options RFC 2132), declared with construct.

DHCP is control plane (a handful of messages per boot), so the messages are
declared with construct rather than hand-packed. `parse` turns a UDP payload
into a `DhcpMessage` (fixed BOOTP fields + an options dict; repeated option
codes are concatenated as RFC 3396 asks); `build` does the reverse for the
server's replies and pads them to the BOOTP minimum of 300 bytes, which some
old clients insist on (RFC 1542 §3.4 / RFC 951).

`parse` raises `DhcpWireError` with a short reason for anything malformed:
too short, wrong magic cookie, a bad hardware address length, or options
that run past the end of the packet.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import construct as cs

__all__ = ["DhcpMessage", "DhcpWireError", "parse", "build",
           "BOOTREQUEST", "BOOTREPLY", "MAGIC_COOKIE", "FLAG_BROADCAST",
           "DHCPDISCOVER", "DHCPOFFER", "DHCPREQUEST", "DHCPDECLINE", "DHCPACK",
           "DHCPNAK", "DHCPRELEASE", "DHCPINFORM", "MESSAGE_TYPE_NAMES"]

BOOTREQUEST, BOOTREPLY = 1, 2            # RFC 2131 §2 'op'
HTYPE_ETHERNET = 1                       # RFC 1700 hardware type
HLEN_ETHERNET = 6
FLAG_BROADCAST = 0x8000                  # RFC 2131 §2, figure 2
MAGIC_COOKIE = 0x63825363                # RFC 2131 §3, RFC 2132 §2
BOOTP_MIN_LEN = 300                      # RFC 1542 §3.4: the minimum BOOTP message

# RFC 2132 §9.6: DHCP message type (option 53) values.
DHCPDISCOVER, DHCPOFFER, DHCPREQUEST, DHCPDECLINE = 1, 2, 3, 4
DHCPACK, DHCPNAK, DHCPRELEASE, DHCPINFORM = 5, 6, 7, 8
MESSAGE_TYPE_NAMES = {DHCPDISCOVER: "discover", DHCPOFFER: "offer", DHCPREQUEST: "request",
                      DHCPDECLINE: "decline", DHCPACK: "ack", DHCPNAK: "nak",
                      DHCPRELEASE: "release", DHCPINFORM: "inform"}

OPT_PAD, OPT_END = 0, 255                # RFC 2132 §3.1, §3.2

# Compiled (construct's code generation): about ten times faster than the
# interpreted form, which matters when a client loops DISCOVER.
_Fixed = cs.Struct(
    "op" / cs.Int8ub,
    "htype" / cs.Int8ub,
    "hlen" / cs.Int8ub,
    "hops" / cs.Int8ub,
    "xid" / cs.Int32ub,
    "secs" / cs.Int16ub,
    "flags" / cs.Int16ub,
    "ciaddr" / cs.Bytes(4),
    "yiaddr" / cs.Bytes(4),
    "siaddr" / cs.Bytes(4),
    "giaddr" / cs.Bytes(4),
    "chaddr" / cs.Bytes(16),
    "sname" / cs.Bytes(64),
    "file" / cs.Bytes(128),
    "cookie" / cs.Int32ub,
).compile()
FIXED_LEN = _Fixed.sizeof()              # 240: 236 BOOTP bytes + the magic cookie

_Option = cs.Struct(
    "code" / cs.Int8ub,
    "data" / cs.If((cs.this.code != OPT_PAD) & (cs.this.code != OPT_END),
                   cs.Prefixed(cs.Int8ub, cs.GreedyBytes)),
).compile()


class DhcpWireError(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DhcpMessage:
    op: int
    xid: int
    chaddr: bytes                         # the 6-byte Ethernet address
    flags: int = 0
    secs: int = 0
    ciaddr: bytes = b"\0\0\0\0"
    yiaddr: bytes = b"\0\0\0\0"
    siaddr: bytes = b"\0\0\0\0"
    giaddr: bytes = b"\0\0\0\0"
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def message_type(self) -> int | None:
        v = self.options.get(53)          # RFC 2132 §9.6
        return v[0] if v is not None and len(v) == 1 else None


def parse(payload: bytes) -> DhcpMessage:
    if len(payload) < FIXED_LEN:
        raise DhcpWireError("dhcp_truncated")
    f = _Fixed.parse(payload)
    if f.cookie != MAGIC_COOKIE:
        raise DhcpWireError("dhcp_bad_cookie")
    if f.htype != HTYPE_ETHERNET or f.hlen != HLEN_ETHERNET:
        raise DhcpWireError("dhcp_bad_hardware")
    options: dict[int, bytes] = {}
    pos, n = FIXED_LEN, len(payload)
    ended = False
    while pos < n:
        code = payload[pos]
        if code == OPT_END:
            ended = True
            break
        if code == OPT_PAD:
            pos += 1
            continue
        # The compiled parser does not check the length byte against the end.
        if pos + 2 > n or pos + 2 + payload[pos + 1] > n:
            raise DhcpWireError("dhcp_bad_options")
        o = _Option.parse(payload[pos:pos + 2 + payload[pos + 1]])
        pos += 2 + len(o.data)
        options[code] = options.get(code, b"") + o.data      # RFC 3396 §5
    if not ended and pos != n:
        raise DhcpWireError("dhcp_bad_options")
    return DhcpMessage(op=f.op, xid=f.xid, chaddr=f.chaddr[:6], flags=f.flags, secs=f.secs,
                       ciaddr=f.ciaddr, yiaddr=f.yiaddr, siaddr=f.siaddr, giaddr=f.giaddr,
                       sname=f.sname.rstrip(b"\0"), file=f.file.rstrip(b"\0"), options=options)


def build(m: DhcpMessage) -> bytes:
    if len(m.sname) > 63 or len(m.file) > 127:
        raise ValueError("sname/file too long for the BOOTP fields (RFC 2131 §2)")
    out = bytearray(_Fixed.build(dict(
        op=m.op, htype=HTYPE_ETHERNET, hlen=HLEN_ETHERNET, hops=0, xid=m.xid, secs=0,
        flags=m.flags, ciaddr=m.ciaddr, yiaddr=m.yiaddr, siaddr=m.siaddr, giaddr=m.giaddr,
        chaddr=m.chaddr.ljust(16, b"\0"), sname=m.sname.ljust(64, b"\0"),
        file=m.file.ljust(128, b"\0"), cookie=MAGIC_COOKIE)))
    for code, data in m.options.items():
        # RFC 3396: a value longer than 255 bytes is split over several instances.
        for i in range(0, max(len(data), 1), 255):
            out += _Option.build(dict(code=code, data=data[i:i + 255]))
    out.append(OPT_END)
    if len(out) < BOOTP_MIN_LEN:
        out += bytes(BOOTP_MIN_LEN - len(out))
    return bytes(out)
