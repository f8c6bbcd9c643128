"""ICMPv4 (RFC 792): echo and the error messages the stack sends.

Errors quote the offending IP header plus the first 8 bytes of its payload
(RFC 792; enough for the guest to find its socket). `may_send_error` holds
the RFC 1122 3.2.2 rules for when an error must NOT be sent.
"""
from __future__ import annotations

import struct

from ..checksum import checksum

__all__ = ["HEADER", "ECHO_REPLY", "DEST_UNREACH", "ECHO_REQUEST", "TIME_EXCEEDED",
           "UNREACH_NET", "UNREACH_HOST", "UNREACH_PROTO", "UNREACH_PORT",
           "UNREACH_FRAG_NEEDED", "build_error", "is_error_type",
           "may_send_error"]

HEADER = struct.Struct("!BBHHH")  # type, code, checksum, id, seq (or unused/next-hop MTU)

ECHO_REPLY = 0
DEST_UNREACH = 3
SOURCE_QUENCH = 4
REDIRECT = 5
ECHO_REQUEST = 8
TIME_EXCEEDED = 11
PARAM_PROBLEM = 12

UNREACH_NET = 0
UNREACH_HOST = 1
UNREACH_PROTO = 2
UNREACH_PORT = 3
UNREACH_FRAG_NEEDED = 4

# Informational types; everything else (including unknown types) is treated
# as an error so we never answer it with another error.
_INFORMATIONAL = frozenset({0, 8, 13, 14, 15, 16, 17, 18})


def is_error_type(icmp_type: int) -> bool:
    return icmp_type not in _INFORMATIONAL


def build_error(icmp_type: int, code: int, original_ip_packet, rest: int = 0) -> bytearray:
    """ICMP error message quoting the original IP header + 8 bytes."""
    ihl = (original_ip_packet[0] & 15) * 4
    quote = bytes(original_ip_packet[:ihl + 8])
    msg = bytearray(HEADER.pack(icmp_type, code, 0, rest >> 16, rest & 0xFFFF)) + quote
    cs = checksum(msg)
    msg[2] = cs >> 8
    msg[3] = cs & 0xFF
    return msg


def may_send_error(proto: int, flags_frag: int, l4, dst_is_broadcast: bool,
                   src_ip: bytes) -> bool:
    """RFC 1122 3.2.2: no error about an ICMP error, a non-first fragment,
    a broadcast/multicast datagram, or a source that is not one unicast host."""
    if dst_is_broadcast:
        return False
    if flags_frag & 0x1FFF:
        return False
    b0 = src_ip[0]
    if not (0 < b0 < 224 and b0 != 127):
        return False
    if proto == 1:
        if len(l4) < 1 or is_error_type(l4[0]):
            return False
    return True
