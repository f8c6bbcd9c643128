"""Read-only TFTP server (RFC 1350) with option negotiation (RFC 2347),
blksize (RFC 2348), tsize/timeout (RFC 2349) and windowsize (RFC 7440),
on the gateway address.

Theory of operation:
* A read request (RRQ) arrives on port 69. Each transfer gets its own
  server port (its TID, RFC 1350 §4), a fresh UDP socket on the gateway
  address; everything after the RRQ happens there. Write requests are
  refused: the server is read-only.
* File names are checked here first: no NUL, not empty, not absolute (no
  leading '/' or '\\'), no '..' component, no backslash. Then the injected
  `files` object (the device side's, see vhostnet/hostnet/tftp_root.py)
  opens it, and refuses anything that resolves outside its directory
  (symlinks included) by raising `TftpFileError`. The stack never opens a
  file itself.
* Options: blksize (clamped to 8..`max_blksize`), tsize (the file's size),
  timeout (1..255 s), windowsize (clamped to 1..`max_window`). With any
  accepted option the server sends OACK and waits for ACK 0; without
  options it starts with DATA 1.
* Sending: `windowsize` blocks (1 without the option: RFC 1350 lock-step)
  go out, then the server waits for the ACK of the window's last block.
  An ACK of an earlier block of the window means the client lost the next
  one: sending goes on from there (RFC 7440 §4). An ACK of a block not in
  flight is ignored, never answered (RFC 1123 §4.2.3.1, the Sorcerer's
  Apprentice fix). With no ACK by the deadline the window is resent from
  the first unacknowledged block, with the timeout doubling (RFC 1123
  §4.2.3.2 backoff; a negotiated timeout stays fixed), up to `retries`
  times, then the transfer is dropped.
  Block numbers wrap past 65535 to 0, as tftp-hpa and U-Boot expect for
  large files.
* Packets from an unknown TID on a transfer port get ERROR 5 and do not
  disturb the transfer (RFC 1350 §4). An ERROR from the client ends it.
* Bounds: `max_transfers` at once (ERROR 0 beyond), files up to `max_file`
  bytes, one transfer per client port (a repeated RRQ is ignored).

Counters: tftp_rrq, tftp_started, tftp_completed, tftp_failed,
tftp_timeouts, tftp_retransmits, tftp_window_rewinds, tftp_refused_<why>,
tftp_bytes (first transmissions only), drop_tftp_<reason>.
"""
from __future__ import annotations

import struct

from ..config import ip_text

__all__ = ["TftpServer", "TftpFileError", "TFTP_PORT"]

TFTP_PORT = 69                      # RFC 1350 §4
OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6   # RFC 1350 §5, RFC 2347
# RFC 1350 appendix: error codes; 8 is RFC 2347's option refusal.
ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_DISK_FULL, ERR_ILLEGAL_OP = 0, 1, 2, 3, 4
ERR_UNKNOWN_TID, ERR_EXISTS, ERR_NO_USER, ERR_OPTION = 5, 6, 7, 8
DEFAULT_BLKSIZE = 512               # RFC 1350 §2
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464  # RFC 2348
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255   # RFC 2349
MAX_WINDOW = 64                     # RFC 7440 windowsize we grant at most (1..65535 asked)
MAX_BACKOFF = 8.0                   # seconds: cap of the doubled retransmission timeout
PORT_FIRST, PORT_LAST = 50000, 59999  # server TIDs
MAX_NAME = 255                      # bytes of file name accepted
_HDR = struct.Struct("!HH")
# The counters a snapshot reports (as tftp_<name> in the stack's counters).
COUNTERS = ("started", "completed", "failed", "timeouts", "retransmits", "bytes")


class TftpFileError(Exception):
    """A refusal by the file source, with the TFTP error code to send."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def check_name(raw: bytes) -> str:
    """The stack's own path rules; raises TftpFileError."""
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise TftpFileError(ERR_ACCESS, "file name must be ASCII") from None
    if not name or len(raw) > MAX_NAME:
        raise TftpFileError(ERR_ACCESS, "bad file name length")
    if name[0] in "/\\" or "\\" in name or ":" in name.split("/")[0][1:2]:
        raise TftpFileError(ERR_ACCESS, "absolute paths are refused")
    if any(p == ".." for p in name.split("/")):
        raise TftpFileError(ERR_ACCESS, "'..' is refused")
    if any(ord(ch) < 32 for ch in name):
        raise TftpFileError(ERR_ACCESS, "control characters in file name")
    return name


def error_packet(code: int, message: str) -> bytes:
    return _HDR.pack(OP_ERROR, code) + message.encode("ascii", "replace")[:200] + b"\0"


class _Transfer:
    """Block numbers here are absolute (they do not wrap); the wire carries
    them mod 65536. Blocks acked+1 .. sent are in flight; `oack` is the OACK
    while it waits for ACK 0."""
    __slots__ = ("sock", "peer_ip", "peer_port", "file", "blksize", "size", "nblocks", "window",
                 "acked", "sent", "oack", "deadline", "timeout", "fixed_timeout", "tries", "name",
                 "bytes_sent", "high")

    def __init__(self, sock, peer_ip, peer_port, f, name, blksize, timeout, fixed, window, oack):
        self.sock = sock
        self.peer_ip = peer_ip
        self.peer_port = peer_port
        self.file = f
        self.name = name
        self.blksize = blksize
        self.size = f.size
        # The last block is shorter than blksize: empty when size is a multiple.
        self.nblocks = f.size // blksize + 1
        self.window = window
        self.acked = 0
        self.sent = 0
        self.oack = oack
        self.deadline = 0.0
        self.timeout = timeout
        self.fixed_timeout = fixed
        self.tries = 0
        self.bytes_sent = 0
        self.high = 0                # the highest block ever sent


class TftpServer:
    def __init__(self, udp_layer, counters, clock, files, *, ip: bytes,
                 max_transfers: int, max_file: int, timeout: float, retries: int,
                 max_blksize: int = MAX_BLKSIZE, max_window: int = MAX_WINDOW):
        self._udp = udp_layer
        self._c = counters
        self._clock = clock
        self._files = files
        self._ip = ip
        self._max = max_transfers
        self._max_file = max_file
        self._timeout = timeout
        self._retries = retries
        self._max_blksize = max_blksize
        self._max_window = max_window
        self._next_port = PORT_FIRST
        self._by_sock: dict[int, _Transfer] = {}       # server port -> transfer
        self._by_peer: dict[tuple, _Transfer] = {}     # (ip, port) -> transfer
        self.sock = udp_layer.bind(TFTP_PORT, self._on_request, ip=ip)

    # ------------------------------------------------------------ requests
    def _on_request(self, sock, payload, src_ip, src_port, dst_ip) -> None:
        c = self._c
        if src_port == 0:
            c["drop_tftp_port_zero"] += 1
            return
        if len(payload) < 4:
            c["drop_tftp_truncated"] += 1
            return
        op = (payload[0] << 8) | payload[1]
        if op == OP_WRQ:
            c["tftp_refused_write"] += 1
            sock.send(error_packet(ERR_ACCESS, "read-only server"), src_ip, src_port)
            return
        if op != OP_RRQ:
            c["drop_tftp_bad_opcode"] += 1
            sock.send(error_packet(ERR_ILLEGAL_OP, "expected RRQ"), src_ip, src_port)
            return
        c["tftp_rrq"] += 1
        if (src_ip, src_port) in self._by_peer:
            c["tftp_duplicate_rrq"] += 1      # our first packet is in flight or was lost
            return
        fields = payload[2:].split(b"\0")
        if payload[-1] != 0 or len(fields) < 3 or len(fields) % 2 == 0:
            c["drop_tftp_bad_request"] += 1
            sock.send(error_packet(ERR_ILLEGAL_OP, "malformed request"), src_ip, src_port)
            return
        fields.pop()                            # after the final NUL
        raw_name, mode = fields[0], fields[1].lower()
        opts = {}
        for i in range(2, len(fields), 2):
            opts[fields[i].lower()] = fields[i + 1]
        if mode != b"octet":
            c["tftp_refused_mode"] += 1
            sock.send(error_packet(ERR_ILLEGAL_OP, "only octet mode is served"), src_ip, src_port)
            return
        if len(self._by_sock) >= self._max:
            c["tftp_refused_busy"] += 1
            sock.send(error_packet(ERR_UNDEFINED, "too many transfers"), src_ip, src_port)
            return
        try:
            name = check_name(raw_name)
            f = self._files.open(name)
        except TftpFileError as e:
            c["tftp_refused_" + ("not_found" if e.code == ERR_NOT_FOUND else "access")] += 1
            sock.send(error_packet(e.code, e.message), src_ip, src_port)
            return
        if f.size > self._max_file:
            f.close()
            c["tftp_refused_too_large"] += 1
            sock.send(error_packet(ERR_UNDEFINED, "file too large"), src_ip, src_port)
            return
        oack = []
        blksize = DEFAULT_BLKSIZE
        timeout, fixed = self._timeout, False
        if b"blksize" in opts:
            try:
                want = int(opts[b"blksize"])
            except ValueError:
                want = 0
            if want >= MIN_BLKSIZE:
                blksize = min(want, self._max_blksize)
                oack += [b"blksize", str(blksize).encode()]
        if b"tsize" in opts:
            oack += [b"tsize", str(f.size).encode()]
        if b"timeout" in opts:
            try:
                t = int(opts[b"timeout"])
            except ValueError:
                t = 0
            if MIN_TIMEOUT <= t <= MAX_TIMEOUT:
                timeout, fixed = float(t), True
                oack += [b"timeout", opts[b"timeout"]]
        window = 1
        if b"windowsize" in opts:
            try:
                want = int(opts[b"windowsize"])
            except ValueError:
                want = 0
            if want >= 1:
                window = min(want, self._max_window)
                oack += [b"windowsize", str(window).encode()]
        tsock = self._bind()
        if tsock is None:
            f.close()
            c["tftp_refused_no_port"] += 1
            sock.send(error_packet(ERR_UNDEFINED, "no free port"), src_ip, src_port)
            return
        t = _Transfer(tsock, src_ip, src_port, f, name, blksize, timeout, fixed, window,
                      _HDR.pack(OP_OACK, 0)[:2] + b"\0".join(oack) + b"\0" if oack else None)
        self._by_sock[tsock.port] = t
        self._by_peer[(src_ip, src_port)] = t
        c["tftp_started"] += 1
        now = self._clock()
        if t.oack is not None:
            t.deadline = now + t.timeout
            tsock.send(t.oack, src_ip, src_port)
        else:
            self._send_window(t, now)

    def _bind(self):
        for _ in range(PORT_LAST - PORT_FIRST + 1):
            port = self._next_port
            self._next_port = PORT_FIRST if port >= PORT_LAST else port + 1
            try:
                return self._udp.bind(port, self._on_transfer, ip=self._ip)
            except OSError:
                continue
        return None

    # ------------------------------------------------------------ transfers
    def _on_transfer(self, sock, payload, src_ip, src_port, dst_ip) -> None:
        c = self._c
        t = self._by_sock.get(sock.port)
        if t is None:
            return
        if (src_ip, src_port) != (t.peer_ip, t.peer_port):
            c["tftp_unknown_tid"] += 1
            if src_port:
                sock.send(error_packet(ERR_UNKNOWN_TID, "unknown transfer ID"), src_ip, src_port)
            return
        if len(payload) < 4:
            c["drop_tftp_truncated"] += 1
            return
        op, num = _HDR.unpack_from(payload, 0)
        if op == OP_ERROR:
            c["tftp_client_error"] += 1
            self._finish(t, ok=False)
            return
        if op != OP_ACK:
            c["drop_tftp_bad_opcode"] += 1
            sock.send(error_packet(ERR_ILLEGAL_OP, "expected ACK"), src_ip, src_port)
            self._finish(t, ok=False)
            return
        now = self._clock()
        if t.oack is not None:
            if num != 0:
                c["tftp_duplicate_ack"] += 1
                return
            t.oack = None
            self._progress(t, now)
            self._send_window(t, now)
            return
        # The absolute block this ACK names: one of those in flight.
        blk = t.acked + ((num - t.acked) & 0xFFFF)
        if not t.acked < blk <= t.sent:
            c["tftp_duplicate_ack"] += 1      # RFC 1123 §4.2.3.1: never resend on one
            return
        if blk == t.nblocks:
            self._finish(t, ok=True)
            return
        if blk < t.sent:
            # RFC 7440 §4: the client lost a block of the window; go on from its ACK.
            c["tftp_window_rewinds"] += 1
        t.acked = blk
        t.sent = blk
        self._progress(t, now)
        self._send_window(t, now)

    def _progress(self, t: _Transfer, now: float) -> None:
        t.tries = 0
        if not t.fixed_timeout:
            t.timeout = self._timeout

    def _send_window(self, t: _Transfer, now: float) -> None:
        """Send blocks sent+1 .. acked+window (at most the last block)."""
        last = min(t.acked + t.window, t.nblocks)
        while t.sent < last:
            block = t.sent + 1
            off = (block - 1) * t.blksize
            try:
                data = t.file.read(off, min(t.blksize, max(0, t.size - off)))
            except OSError as e:
                self._c["tftp_read_errors"] += 1
                t.sock.send(error_packet(ERR_UNDEFINED, f"read error: {e.strerror}"),
                            t.peer_ip, t.peer_port)
                self._finish(t, ok=False)
                return
            if block > t.high:                              # first transmission of this block
                t.high = block
                t.bytes_sent += len(data)
                self._c["tftp_bytes"] += len(data)
            t.sock.send(_HDR.pack(OP_DATA, block & 0xFFFF) + data, t.peer_ip, t.peer_port)
            t.sent = block
        t.deadline = now + t.timeout

    def _finish(self, t: _Transfer, ok: bool) -> None:
        self._c["tftp_completed" if ok else "tftp_failed"] += 1
        self._by_sock.pop(t.sock.port, None)
        self._by_peer.pop((t.peer_ip, t.peer_port), None)
        t.sock.close()
        try:
            t.file.close()
        except OSError:
            pass

    def poll(self, now: float) -> None:
        for t in [t for t in self._by_sock.values() if t.deadline <= now]:
            if t.tries >= self._retries:
                self._c["tftp_timeouts"] += 1
                self._finish(t, ok=False)
                continue
            t.tries += 1
            self._c["tftp_retransmits"] += 1
            if not t.fixed_timeout:
                t.timeout = min(t.timeout * 2, MAX_BACKOFF)
            if t.oack is not None:
                t.deadline = now + t.timeout
                t.sock.send(t.oack, t.peer_ip, t.peer_port)
            else:
                t.sent = t.acked                 # resend the whole window
                self._send_window(t, now)

    def next_deadline(self) -> float | None:
        return min((t.deadline for t in self._by_sock.values()), default=None)

    def snapshot(self) -> dict:
        c = self._c
        return {"enabled": True, "max_transfers": self._max,
                "transfers": [{"file": t.name, "client": f"{ip_text(t.peer_ip)}:{t.peer_port}",
                               "blksize": t.blksize, "windowsize": t.window, "size": t.size,
                               "sent": t.bytes_sent, "retransmits": t.tries} for t in self._by_sock.values()],
                **{k: c.get("tftp_" + k, 0) for k in COUNTERS}}
