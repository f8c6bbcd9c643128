"""TCP header (RFC 9293 section 3.1) and options (RFC 9293 MSS, RFC 7323 window
scale and timestamps, RFC 2018 SACK).

Two layers, smoltcp style:

* `TcpPacket` is a checked view over a memoryview. `new_checked` validates the
  data offset once; accessors read fields in place.
* `TcpRepr` is the parsed value (a slots dataclass). `TcpRepr.parse` turns a
  packet into it, `emit` / `to_bytes` write it back.

The checksum is never computed here on the data path: the IP layer fills it
(fully, or as a CHECKSUM_PARTIAL pseudo-header sum). `checksum()` exists for
tests and tools.

Options are laid out the way Linux lays them out (MSS, SACK_PERM+TS or
NOP NOP TS, NOP WS, NOP NOP SACK), so every option is 4-byte aligned and the
common data segment (timestamps only) can be parsed by one struct read, like
Linux's tcp_fast_parse_options. Limits: urgent data is parsed but carries no
meaning; unknown options are skipped; a known option with a wrong length is
ignored (as Linux does); options that run past the header or have a length
below 2 make the whole segment malformed (TcpParseError).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..checksum import l4_sum

__all__ = [
    "FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR",
    "HEADER_LEN", "MAX_WSCALE", "TcpParseError", "TcpPacket", "TcpRepr",
    "encode_options", "parse_options", "checksum", "flags_text",
]

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

HEADER_LEN = 20
MAX_OPTIONS_LEN = 40
MAX_WSCALE = 14            # RFC 7323 2.3: larger shifts are clamped to 14
PROTO_TCP = 6

OPT_END, OPT_NOP, OPT_MSS, OPT_WS, OPT_SACK_PERM, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8

# src port, dst port, seq, ack, data offset (4 bits) + reserved + flags, window, checksum, urgent
HEADER = struct.Struct("!HHIIHHHH")
_U16 = struct.Struct("!H")
_TS = struct.Struct("!II")
_TS_FAST = b"\x01\x01\x08\x0a"           # NOP NOP TS(len 10): Linux's data-segment layout
_TS_HEAD = b"\x01\x01\x08\x0a"
_SACKPERM_TS_HEAD = b"\x04\x02\x08\x0a"  # SACK_PERM then TS, Linux's SYN layout
_PAIR = struct.Struct("!II")

_FLAG_NAMES = ((FIN, "F"), (SYN, "S"), (RST, "R"), (PSH, "P"), (ACK, "."), (URG, "U"),
               (ECE, "E"), (CWR, "W"))


def flags_text(flags: int) -> str:
    """tcpdump-like flag letters, e.g. 'S.' for SYN-ACK."""
    return "".join(name for bit, name in _FLAG_NAMES if flags & bit) or "none"


class TcpParseError(ValueError):
    """A malformed segment. `reason` is a counter name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TcpPacket:
    """Zero-copy view over one TCP segment (header, options, payload)."""

    __slots__ = ("buf", "header_len")

    def __init__(self, buf, header_len: int):
        self.buf = buf
        self.header_len = header_len

    @classmethod
    def new_checked(cls, buf) -> "TcpPacket":
        buf = memoryview(buf)
        n = len(buf)
        if n < HEADER_LEN:
            raise TcpParseError("tcp_truncated")
        hlen = (buf[12] >> 4) * 4
        if hlen < HEADER_LEN:
            raise TcpParseError("tcp_bad_data_offset")
        if hlen > n:
            raise TcpParseError("tcp_bad_data_offset")
        return cls(buf, hlen)

    @property
    def src_port(self) -> int:
        return _U16.unpack_from(self.buf, 0)[0]

    @property
    def dst_port(self) -> int:
        return _U16.unpack_from(self.buf, 2)[0]

    @property
    def seq(self) -> int:
        return int.from_bytes(self.buf[4:8], "big")

    @property
    def ack(self) -> int:
        return int.from_bytes(self.buf[8:12], "big")

    @property
    def flags(self) -> int:
        return self.buf[13]

    @property
    def window(self) -> int:
        return _U16.unpack_from(self.buf, 14)[0]

    @property
    def checksum(self) -> int:
        return _U16.unpack_from(self.buf, 16)[0]

    @property
    def urgent(self) -> int:
        return _U16.unpack_from(self.buf, 18)[0]

    @property
    def options(self) -> memoryview:
        return self.buf[HEADER_LEN:self.header_len]

    @property
    def payload(self) -> memoryview:
        return self.buf[self.header_len:]


def parse_options(opts):
    """-> (mss, wscale, sack_permitted, sack_blocks, timestamp). Raises TcpParseError."""
    n = len(opts)
    if n == 12 and opts[:4] == _TS_FAST:
        return None, None, False, (), _TS.unpack_from(opts, 4)
    mss = wscale = ts = None
    sackp = False
    blocks = ()
    i = 0
    while i < n:
        kind = opts[i]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise TcpParseError("tcp_bad_options")
        length = opts[i + 1]
        if length < 2 or i + length > n:
            raise TcpParseError("tcp_bad_options")
        if kind == OPT_TS:
            if length == 10:
                ts = _TS.unpack_from(opts, i + 2)
        elif kind == OPT_MSS:
            if length == 4:
                mss = _U16.unpack_from(opts, i + 2)[0]
        elif kind == OPT_WS:
            if length == 3:
                wscale = min(opts[i + 2], MAX_WSCALE)
        elif kind == OPT_SACK_PERM:
            if length == 2:
                sackp = True
        elif kind == OPT_SACK:
            if length >= 10 and (length - 2) % 8 == 0:
                blocks = tuple(_PAIR.unpack_from(opts, j) for j in range(i + 2, i + length, 8))
        i += length
    return mss, wscale, sackp, blocks, ts


def encode_options(mss=None, wscale=None, sack_permitted=False, sack_blocks=(),
                   timestamp=None) -> bytes:
    """Options in Linux's aligned layout; at most 40 bytes (SACK blocks are cut to fit)."""
    out = b""
    if mss is not None:
        out += b"\x02\x04" + _U16.pack(mss)
    if timestamp is not None:
        out += (_SACKPERM_TS_HEAD if sack_permitted else _TS_HEAD) + _TS.pack(*timestamp)
    elif sack_permitted:
        out += b"\x01\x01\x04\x02"
    if wscale is not None:
        out += b"\x01\x03\x03" + bytes((wscale,))
    if sack_blocks:
        room = (MAX_OPTIONS_LEN - len(out) - 4) // 8
        blocks = sack_blocks[:room]
        if blocks:
            out += b"\x01\x01\x05" + bytes((2 + 8 * len(blocks),))
            out += b"".join(_PAIR.pack(a & 0xFFFFFFFF, b & 0xFFFFFFFF) for a, b in blocks)
    return out


@dataclass(slots=True)
class TcpRepr:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    urgent: int = 0
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple = ()
    timestamp: tuple[int, int] | None = None   # (TSval, TSecr)
    payload: object = b""                     # bytes-like; a memoryview into the input after parse

    @classmethod
    def parse(cls, packet: TcpPacket) -> "TcpRepr":
        buf = packet.buf
        sp, dp, seq, ack, offflags, win, _cs, urg = HEADER.unpack_from(buf, 0)
        hlen = packet.header_len
        if hlen > HEADER_LEN:
            mss, ws, sackp, blocks, ts = parse_options(buf[HEADER_LEN:hlen])
            return cls(sp, dp, seq, ack, offflags & 0xFF, win, urg, mss, ws, sackp, blocks, ts,
                       buf[hlen:])
        return cls(sp, dp, seq, ack, offflags & 0xFF, win, urg, payload=buf[hlen:])

    @classmethod
    def from_bytes(cls, data) -> "TcpRepr":
        return cls.parse(TcpPacket.new_checked(data))

    def options_bytes(self) -> bytes:
        return encode_options(self.mss, self.wscale, self.sack_permitted, self.sack_blocks,
                              self.timestamp)

    def header_len(self) -> int:
        return HEADER_LEN + len(self.options_bytes())

    def emit_header(self, opts: bytes | None = None) -> bytes:
        if opts is None:
            opts = self.options_bytes()
        hlen = HEADER_LEN + len(opts)
        return HEADER.pack(self.src_port, self.dst_port, self.seq & 0xFFFFFFFF,
                           self.ack & 0xFFFFFFFF, (hlen << 10) | self.flags, self.window,
                           0, self.urgent) + opts

    def emit(self, buf) -> int:
        """Write header, options and payload into buf (checksum field 0). Returns the length."""
        hdr = self.emit_header()
        n = len(hdr) + len(self.payload)
        buf[:len(hdr)] = hdr
        buf[len(hdr):n] = self.payload
        return n

    def to_bytes(self) -> bytearray:
        seg = bytearray(self.emit_header())
        seg += self.payload
        return seg


def checksum(src_ip: bytes, dst_ip: bytes, segment) -> int:
    """The checksum field value for `segment` whose own checksum field is 0."""
    return (~l4_sum(segment, 0, len(segment), src_ip, dst_ip, PROTO_TCP)) & 0xFFFF


def verify(src_ip: bytes, dst_ip: bytes, segment) -> bool:
    return l4_sum(segment, 0, len(segment), src_ip, dst_ip, PROTO_TCP) == 0xFFFF
