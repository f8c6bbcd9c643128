"""One-line, tcpdump-like summaries of frames, virtio-net headers and descriptor flags.

Used by `vhostnet inspect --desc` (what does this chain hold?) and by
`vhostnet capture` without -w (a live tcpdump of the guest's link).

Design: each layer is a small function that reads fixed headers with a
precompiled `struct.Struct` at an offset and returns text, handing the rest
to the next layer. Nothing is copied. The input is whatever a guest left in
its buffers, so every read is length-checked first: a short header gives
tcpdump's "[|proto]" truncation mark, junk gives text, and `summarize()`
never raises (a hypothesis test holds it to that).

Limits: IPv4 in full (ARP, ICMP, UDP, TCP with options, fragments, one
802.1Q tag); IPv6 only as addresses, next header and length. No
application-layer decoding; ask tshark for that (`vhostnet capture -w`).
"""
from __future__ import annotations

import struct

__all__ = ["summarize", "vnet_hdr", "vnet_hdr_text", "desc_flags", "mac_text", "hexdump"]

_ETH = struct.Struct("!6s6sH")
_VLAN = struct.Struct("!HH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_ICMP = struct.Struct("!BBHHH")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")
_VNET12 = struct.Struct("<BBHHHHH")
_VNET10 = struct.Struct("<BBHHHH")

ETHERTYPES = {0x0800: "IPv4", 0x0806: "ARP", 0x86DD: "IPv6", 0x8100: "802.1Q", 0x8035: "RARP"}
IP_PROTOS = {1: "ICMP", 2: "IGMP", 6: "TCP", 17: "UDP", 47: "GRE", 58: "ICMP6", 132: "SCTP"}
ICMP_TYPES = {0: "echo reply", 3: "unreachable", 4: "source quench", 5: "redirect", 8: "echo request",
              11: "time exceeded", 12: "parameter problem", 13: "time stamp request",
              14: "time stamp reply"}
UNREACH = {0: "net", 1: "host", 2: "protocol", 3: "port", 4: "need to frag", 13: "admin prohibited"}
TCP_FLAGS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "."), (0x20, "U"),
             (0x40, "E"), (0x80, "W"))
DESC_FLAGS = ((1, "NEXT"), (2, "WRITE"), (4, "INDIRECT"))
VNET_FLAGS = ((1, "NEEDS_CSUM"), (2, "DATA_VALID"), (4, "RSC_INFO"))
GSO_TYPES = {0: "NONE", 1: "TCPV4", 3: "UDP", 4: "TCPV6", 5: "UDP_L4"}
MAX_TEXT = 400  # a summary line never gets longer than this


def mac_text(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _ip4(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def _ip6(b: bytes) -> str:
    import ipaddress
    return str(ipaddress.IPv6Address(bytes(b)))


def _bits(value: int, table) -> list[str]:
    names = [name for bit, name in table if value & bit]
    rest = value & ~sum(bit for bit, _ in table)
    if rest:
        names.append(f"{rest:#x}")
    return names


def desc_flags(flags: int) -> str:
    """Descriptor flags as 'NEXT|WRITE', or '0'."""
    return "|".join(_bits(flags, DESC_FLAGS)) or "0"


# -- virtio-net header --------------------------------------------------------

def vnet_hdr(data, hdr_len: int = 12) -> dict | None:
    """The virtio-net header at the start of a buffer, or None if too short."""
    if hdr_len == 12 and len(data) >= 12:
        flags, gso, hl, gs, cs, co, nb = _VNET12.unpack_from(data)
    elif hdr_len == 10 and len(data) >= 10:
        flags, gso, hl, gs, cs, co = _VNET10.unpack_from(data)
        nb = None
    else:
        return None
    return {"flags": flags, "flag_names": _bits(flags, VNET_FLAGS), "gso_type": gso,
            "gso_type_name": GSO_TYPES.get(gso & 0x7F, f"{gso & 0x7F}") + ("|ECN" if gso & 0x80 else ""),
            "hdr_len": hl, "gso_size": gs, "csum_start": cs, "csum_offset": co, "num_buffers": nb}


def vnet_hdr_text(h: dict | None) -> str:
    if h is None:
        return "[|virtio-net header]"
    out = [f"flags {'|'.join(h['flag_names']) or 0}"]
    if h["flags"] & 1:
        out.append(f"csum_start {h['csum_start']} csum_offset {h['csum_offset']}")
    out.append(f"gso {h['gso_type_name']}")
    if h["gso_type"]:
        out.append(f"gso_size {h['gso_size']} hdr_len {h['hdr_len']}")
    if h["num_buffers"] is not None:
        out.append(f"num_buffers {h['num_buffers']}")
    return ", ".join(out)


# -- frames ---------------------------------------------------------------------

def summarize(data, link: bool = True) -> str:
    """tcpdump-like one-line summary of an Ethernet frame (tcpdump -e with LINK)."""
    try:
        text = _ether(memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data,
                      link)
    except Exception as e:  # a decoder bug must not break a dump: say so instead
        text = f"[decode error: {type(e).__name__}] {len(data)} bytes"
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 3] + "..."


def _ether(d, link: bool) -> str:
    n = len(d)
    if n < 14:
        return f"[|ether] {n} bytes"
    dst, src, et = _ETH.unpack_from(d)
    off = 14
    head = f"{mac_text(src)} > {mac_text(dst)}, " if link else ""
    vlan = ""
    if et == 0x8100:
        if n < 18:
            return head + "802.1Q [|vlan]"
        tci, et = _VLAN.unpack_from(d, 14)
        vlan = f"802.1Q vlan {tci & 0xFFF} p {tci >> 13}, "
        off = 18
    if et < 0x600:
        return head + vlan + f"802.3, length {et}"
    name = ETHERTYPES.get(et, "Unknown")
    head += vlan + (f"ethertype {name} ({et:#06x}), length {n}: " if link else "")
    if et == 0x0800:
        return head + _ipv4(d, off)
    if et == 0x0806:
        return head + _arp(d, off)
    if et == 0x86DD:
        return head + _ipv6(d, off)
    return head + f"ethertype {et:#06x}, {n - off} bytes"


def _arp(d, off: int) -> str:
    if len(d) < off + 28:
        return "ARP, [|arp]"
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(d, off)
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        return f"ARP, hardware {htype} protocol {ptype:#06x} (len {hlen}/{plen}), op {op}"
    if op == 1:
        return f"ARP, Request who-has {_ip4(tpa)} tell {_ip4(spa)}, length 28"
    if op == 2:
        return f"ARP, Reply {_ip4(spa)} is-at {mac_text(sha)}, length 28"
    return f"ARP, op {op} {_ip4(spa)} ({mac_text(sha)}) > {_ip4(tpa)}"


def _ipv4(d, off: int) -> str:
    n = len(d)
    if n < off + 20:
        return "IP [|ip]"
    vihl, tos, tot, ident, frag, ttl, proto, _cs, src, dst = _IP4.unpack_from(d, off)
    ihl = (vihl & 15) * 4
    if vihl >> 4 != 4:
        return f"IP bad version {vihl >> 4}"
    if ihl < 20:
        return f"IP bad header length {ihl}"
    s, t = _ip4(src), _ip4(dst)
    end = min(n, off + tot) if tot >= ihl else n
    extra = []
    if tot < ihl:
        extra.append(f"bad total length {tot}")
    elif off + tot > n:
        extra.append(f"truncated: total length {tot}, {n - off} captured")
    mf, offset = frag & 0x2000, (frag & 0x1FFF) * 8
    if mf or offset:
        extra.append(f"frag {ident}:{tot - ihl}@{offset}{'+' if mf else ''}")
    note = f" ({', '.join(extra)})" if extra else ""
    l4 = off + ihl
    if l4 > end:
        return f"IP {s} > {t}: [|ip]{note}"
    if offset:  # a later fragment carries no L4 header
        return f"IP {s} > {t}: {IP_PROTOS.get(proto, f'ip-proto-{proto}')}{note}"
    if proto == 1:
        return f"IP {s} > {t}: {_icmp(d, l4, end)}{note}"
    if proto == 17:
        return _udp(d, l4, end, s, t) + note
    if proto == 6:
        return _tcp(d, l4, end, s, t) + note
    return f"IP {s} > {t}: {IP_PROTOS.get(proto, f'ip-proto-{proto}')} {end - l4}{note}"


def _icmp(d, off: int, end: int) -> str:
    if end < off + 4:
        return "ICMP [|icmp]"
    typ, code, _cs, ident, seq = _ICMP.unpack_from(d, off) if end >= off + 8 else (
        d[off], d[off + 1], 0, 0, 0)
    length = end - off
    if typ in (0, 8):
        return f"ICMP {ICMP_TYPES[typ]}, id {ident}, seq {seq}, length {length}"
    if typ == 3:
        # Name what was unreachable from the quoted header, as tcpdump does.
        q = off + 8
        if end < q + 20 or d[q] >> 4 != 4:
            return f"ICMP {UNREACH.get(code, f'code {code}')} unreachable, length {length}"
        ihl, iproto, idst = (d[q] & 15) * 4, d[q + 9], _ip4(d[q + 16:q + 20])
        if code == 3 and iproto in (6, 17) and end >= q + ihl + 4:
            dport = _U16.unpack_from(d, q + ihl + 2)[0]
            return f"ICMP {idst} {IP_PROTOS[iproto].lower()} port {dport} unreachable, length {length}"
        return f"ICMP {UNREACH.get(code, f'code {code}')} {idst} unreachable, length {length}"
    return f"ICMP {ICMP_TYPES.get(typ, f'type-#{typ}')}" + (f" code {code}" if code else "") + \
        f", length {length}"


def _udp(d, off: int, end: int, s: str, t: str) -> str:
    if end < off + 8:
        return f"IP {s} > {t}: UDP [|udp]"
    sport, dport, ulen, _cs = _UDP.unpack_from(d, off)
    bad = "" if ulen == end - off else f" (udp length {ulen}, {end - off} in packet)"
    return f"IP {s}.{sport} > {t}.{dport}: UDP, length {max(ulen - 8, 0)}{bad}"


def _tcp(d, off: int, end: int, s: str, t: str) -> str:
    if end < off + 20:
        return f"IP {s} > {t}: TCP [|tcp]"
    sport, dport, seq, ack, doff, flags, win, _cs, urg = _TCP.unpack_from(d, off)
    hl = (doff >> 4) * 4
    fl = "".join(ch for bit, ch in TCP_FLAGS if flags & bit) or "none"
    out = [f"IP {s}.{sport} > {t}.{dport}: Flags [{fl}]"]
    if hl < 20 or off + hl > end:
        return out[0] + f", bad header length {hl} [|tcp]"
    plen = end - off - hl
    if plen or flags & 0x03:
        out.append(f"seq {seq}" if not plen else f"seq {seq}:{(seq + plen) & 0xFFFFFFFF}")
    if flags & 0x10:
        out.append(f"ack {ack}")
    out.append(f"win {win}")
    if flags & 0x20:
        out.append(f"urg {urg}")
    if hl > 20:
        out.append(f"options [{_tcp_options(d, off + 20, off + hl)}]")
    out.append(f"length {plen}")
    return ", ".join(out)


def _tcp_options(d, i: int, end: int) -> str:
    out = []
    while i < end and len(out) < 20:
        kind = d[i]
        if kind == 0:
            out.append("eol")
            break
        if kind == 1:
            out.append("nop")
            i += 1
            continue
        if i + 1 >= end or d[i + 1] < 2 or i + d[i + 1] > end:
            out.append("bad opt")
            break
        ln = d[i + 1]
        body = d[i + 2:i + ln]
        if kind == 2 and ln == 4:
            out.append(f"mss {_U16.unpack_from(body)[0]}")
        elif kind == 3 and ln == 3:
            out.append(f"wscale {body[0]}")
        elif kind == 4 and ln == 2:
            out.append("sackOK")
        elif kind == 8 and ln == 10:
            val, ecr = _U32X2.unpack_from(body)
            out.append(f"TS val {val} ecr {ecr}")
        elif kind == 5 and ln >= 10 and (ln - 2) % 8 == 0:
            blocks = [_U32X2.unpack_from(body, k) for k in range(0, ln - 2, 8)]
            out.append("sack " + str(len(blocks)) + " " + " ".join(f"{{{a}:{b}}}" for a, b in blocks))
        else:
            out.append(f"unknown-{kind} len {ln}")
        i += ln
    return ",".join(out)


def _ipv6(d, off: int) -> str:
    if len(d) < off + 40:
        return "IP6 [|ip6]"
    _vtf, plen, nxt, hlim, src, dst = _IP6.unpack_from(d, off)
    return (f"IP6 {_ip6(src)} > {_ip6(dst)}: {IP_PROTOS.get(nxt, f'next-header {nxt}')}, "
            f"payload length {plen}, hlim {hlim}")


def hexdump(data, limit: int = 256) -> list[str]:
    """`xxd`-like lines for the first LIMIT bytes."""
    b = bytes(data[:limit])
    lines = []
    for i in range(0, len(b), 16):
        chunk = b[i:i + 16]
        hx = " ".join(chunk[j:j + 2].hex() for j in range(0, len(chunk), 2))
        text = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
        lines.append(f"{i:04x}: {hx:<39}  {text}")
    return lines
