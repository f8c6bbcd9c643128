"""IPv6 router discovery, just enough to say "there is no IPv6 router here".

The network the stack serves is IPv4 only. Hosts that autoconfigure IPv6
send a Router Solicitation when their link comes up and wait for an answer:
iPXE's `dhcp`/`ifconf` returns only once its IPv6 configurator is done too,
and with no answer that takes about 16 s of retransmissions (iPXE
src/net/ndp.c, ipv6conf_expired). A router may answer with an advertisement
that offers nothing (RFC 4861 §4.2, §6.2.6): Router Lifetime 0 (not a
default router), no Prefix Information options (no addresses to form), the
M and O flags clear (no DHCPv6). iPXE ends its IPv6 configuration on the
first such advertisement (ipv6conf_rx_router_advertisement); Linux records
it and stops soliciting, and installs neither a route nor an address.

Theory of operation, control plane (a few frames per boot, so objects are
fine here):
  `parse_solicitation(buf, off)` takes a frame whose IPv6 header starts at
  OFF and returns the solicitation's source address, or raises NdpError
  whose `reason` names the check that failed: the IPv6 header (version,
  length; no extension headers: next header must be ICMPv6), then RFC 4861
  §6.1.1's validity rules for a Router Solicitation (hop limit 255, ICMPv6
  checksum, code 0, length, option lengths, no source link-layer option
  from the unspecified address). `NotSolicitation` (a subclass) means a
  well-formed IPv6 packet that is simply something else (an MLD report, a
  neighbour solicitation...): the caller ignores it rather than calling it
  malformed.
  `advertisement(router_mac)` builds the whole Ethernet frame of the
  answer: from the router's link-local address (modified EUI-64 of its
  MAC, RFC 4291 §2.5.1 / Appendix A), as §6.1.2 requires, with hop limit
  255, to the all-nodes group (§6.2.6: "the usual case is to multicast the
  response"), carrying only a source link-layer address option.

Deviation: §6.2.6 delays each answer by a random 0-0.5 s
(MAX_RA_DELAY_TIME) so that several routers do not answer at once. There is
one virtual router here, and the caller answers at once (as libslirp and
passt do), but never more often than MIN_DELAY_BETWEEN_RAS (§10).
"""
from __future__ import annotations

import struct

from ..checksum import checksum, ones_sum

__all__ = ["NdpError", "NotSolicitation", "parse_solicitation", "advertisement",
           "link_local", "IPV6_HLEN", "MIN_DELAY_BETWEEN_RAS", "ALL_NODES", "ALL_NODES_MAC"]

IPV6_HEADER = struct.Struct("!IHBB16s16s")     # RFC 8200 §3: ver/tc/flow, payload len, NH, hops
IPV6_HLEN = 40                                  # RFC 8200 §3
IPV6_VERSION = 6                                # RFC 8200 §3
NEXT_HEADER_ICMPV6 = 58                         # RFC 4443 §1 (IANA protocol number)
ND_HOP_LIMIT = 255                              # RFC 4861 §6.1.1, §6.1.2: never forwarded
ICMPV6_ROUTER_SOLICITATION = 133                # RFC 4861 §4.1
ICMPV6_ROUTER_ADVERTISEMENT = 134               # RFC 4861 §4.2
RS_HLEN = 8                                     # RFC 4861 §4.1: type, code, checksum, reserved
RA_HEADER = struct.Struct("!BBHBBHII")          # RFC 4861 §4.2
OPT_SOURCE_LL_ADDR = 1                          # RFC 4861 §4.6.1
OPT_UNIT = 8                                    # RFC 4861 §4.6: option lengths count 8 octets
RA_CUR_HOP_LIMIT_UNSPECIFIED = 0                # RFC 4861 §4.2
RA_FLAGS_NONE = 0                               # RFC 4861 §4.2: M=0 (no DHCPv6 addresses), O=0
RA_ROUTER_LIFETIME_NONE = 0                     # RFC 4861 §4.2: "not a default router"
RA_REACHABLE_UNSPECIFIED = 0                    # RFC 4861 §4.2
RA_RETRANS_UNSPECIFIED = 0                      # RFC 4861 §4.2
MIN_DELAY_BETWEEN_RAS = 3.0                     # RFC 4861 §10, seconds
UNSPECIFIED = bytes(16)                         # RFC 4291 §2.5.2 (::)
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")   # RFC 4291 §2.7.1
ALL_NODES_MAC = bytes.fromhex("333300000001")   # RFC 2464 §7: 33:33 + low 32 bits
LINK_LOCAL_PREFIX = bytes.fromhex("fe80000000000000")          # RFC 4291 §2.5.6: fe80::/64
EUI64_UNIVERSAL_LOCAL = 0x02                    # RFC 4291 Appendix A: the u bit, inverted
EUI64_FILLER = b"\xff\xfe"                      # RFC 4291 Appendix A
ETHERTYPE_IPV6 = b"\x86\xdd"                    # RFC 2464 §3


class NdpError(ValueError):
    """A frame that is not a valid Router Solicitation; `reason` names why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NotSolicitation(NdpError):
    """Well-formed IPv6, but not a Router Solicitation (nothing to answer)."""


def _icmpv6_checksum_ok(src: bytes, dst: bytes, msg: bytes) -> bool:
    # RFC 8200 §8.1 pseudo-header: source, destination, upper-layer length
    # (32 bits), three zero octets and the next header. A correct message
    # sums, with it, to 0xFFFF (RFC 1071).
    pseudo = src + dst + struct.pack("!IxxxB", len(msg), NEXT_HEADER_ICMPV6)
    return ones_sum(pseudo + msg) == 0xFFFF


def parse_solicitation(buf, off: int) -> bytes:
    """The source address of the valid Router Solicitation at BUF[OFF:]
    (its IPv6 header); NdpError or NotSolicitation otherwise."""
    if len(buf) - off < IPV6_HLEN:
        raise NdpError("ipv6_truncated")
    vtf, plen, nh, hops, src, dst = IPV6_HEADER.unpack_from(buf, off)
    if vtf >> 28 != IPV6_VERSION:
        raise NdpError("ipv6_bad_version")
    start = off + IPV6_HLEN
    if start + plen > len(buf):
        raise NdpError("ipv6_truncated")
    if nh != NEXT_HEADER_ICMPV6:
        raise NotSolicitation("ipv6_not_icmpv6")
    msg = bytes(buf[start:start + plen])         # Ethernet padding left out
    if len(msg) < 1 or msg[0] != ICMPV6_ROUTER_SOLICITATION:
        raise NotSolicitation("ipv6_not_router_solicitation")
    # RFC 4861 §6.1.1, in its order.
    if hops != ND_HOP_LIMIT:
        raise NdpError("ndp_rs_bad_hop_limit")
    if len(msg) < RS_HLEN:
        raise NdpError("ndp_rs_truncated")
    if not _icmpv6_checksum_ok(src, dst, msg):
        raise NdpError("ndp_rs_bad_checksum")
    if msg[1] != 0:
        raise NdpError("ndp_rs_bad_code")
    k = RS_HLEN
    while k < len(msg):
        if k + 2 > len(msg) or msg[k + 1] == 0 or k + msg[k + 1] * OPT_UNIT > len(msg):
            raise NdpError("ndp_rs_bad_option")
        if msg[k] == OPT_SOURCE_LL_ADDR and src == UNSPECIFIED:
            raise NdpError("ndp_rs_source_option_from_unspecified")
        k += msg[k + 1] * OPT_UNIT
    return src


def link_local(mac: bytes) -> bytes:
    """fe80::/64 with the modified EUI-64 interface identifier of MAC."""
    return (LINK_LOCAL_PREFIX + bytes([mac[0] ^ EUI64_UNIVERSAL_LOCAL]) + mac[1:3]
            + EUI64_FILLER + mac[3:6])


def advertisement(router_mac: bytes) -> bytearray:
    """The Ethernet frame of a Router Advertisement offering nothing (see
    the module docstring), from ROUTER_MAC's link-local address to all nodes."""
    src = link_local(router_mac)
    opt = bytes([OPT_SOURCE_LL_ADDR, (2 + len(router_mac)) // OPT_UNIT]) + router_mac
    msg = bytearray(RA_HEADER.pack(ICMPV6_ROUTER_ADVERTISEMENT, 0, 0, RA_CUR_HOP_LIMIT_UNSPECIFIED,
                                   RA_FLAGS_NONE, RA_ROUTER_LIFETIME_NONE,
                                   RA_REACHABLE_UNSPECIFIED, RA_RETRANS_UNSPECIFIED)) + opt
    pseudo = src + ALL_NODES + struct.pack("!IxxxB", len(msg), NEXT_HEADER_ICMPV6)
    cs = checksum(pseudo + msg)
    msg[2:4] = cs.to_bytes(2, "big")
    ip = IPV6_HEADER.pack(IPV6_VERSION << 28, len(msg), NEXT_HEADER_ICMPV6, ND_HOP_LIMIT,
                          src, ALL_NODES)
    return bytearray(ALL_NODES_MAC + router_mac + ETHERTYPE_IPV6) + ip + msg
