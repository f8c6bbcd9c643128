"""The DNS upstream relay: the host half of the guest's resolver at 10.0.2.3.

The sans-IO stack (stack/services/dns.py) turns each guest query into a
`DnsQuery` event; the device (vhostnet/net/device.py) pulls it and
`submit`s it here. `DnsForwarder.serve` (a trio task of the device's
connection) sends it, byte for byte, to the upstream resolvers in order:
over UDP for a UDP query, over TCP for a TCP one (a guest that got TC over
UDP retries over TCP itself, and so do we, by following it). The first
answer whose ID matches is handed back through `deliver(key, wire, None)`;
when every upstream failed or stayed silent, `deliver(key, None, reason)`
with reason "failed" or "timed_out", and the stack answers SERVFAIL.

Each query has a connected UDP socket to itself while it waits (the
kernel drops datagrams from any other address; the answer must carry the
query's ID and question); up to IDLE_SOCKETS sockets per upstream are kept
for later queries, emptied of late datagrams first. TCP queries get their
own connection. One upstream gets at most `per_upstream` seconds, and
the whole query at most `budget` seconds (kept below the stack's timeout,
so the answer we give is ours, not the stack's fallback).

Upstreams: `--dns-upstream ADDR[:PORT]` (repeatable; `[v6]:port` too), or
else the nameservers of /etc/resolv.conf (`resolv_conf_upstreams`).
Bounded: the queue into `serve` holds `max_pending` queries (the stack
caps them before that), and at most `max_pending` run at once.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import struct

import trio

__all__ = ["DnsForwarder", "parse_upstream", "resolv_conf_upstreams", "DNS_PORT"]

log = logging.getLogger("vhostnet.dns")

DNS_PORT = 53                         # RFC 1035 §4.2
MAX_UDP_ANSWER = 65535                # the largest UDP payload we accept
IDLE_SOCKETS = 16                     # kept UDP sockets per upstream
PER_UPSTREAM_TIMEOUT = 2.0            # seconds, as resolv.conf's `timeout:` defaults go per try
RESOLV_CONF = "/etc/resolv.conf"


def parse_upstream(text: str) -> tuple[str, int]:
    """'ADDR', 'ADDR:PORT', '[V6]' or '[V6]:PORT' -> (address, port); ValueError otherwise."""
    t = text.strip()
    port = DNS_PORT
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad DNS upstream {text!r}: want ADDR[:PORT] or [V6ADDR]:PORT")
        if rest:
            port = _port(rest[1:], text)
    elif t.count(":") == 1:
        host, p = t.split(":")
        port = _port(p, text)
    else:
        host = t
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad DNS upstream {text!r}: {host!r} is not an IP address") from None
    return host, port


def _port(p: str, text: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise ValueError(f"bad DNS upstream {text!r}: port must be 1..65535")
    return int(p)


def resolv_conf_upstreams(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """The `nameserver` lines of resolv.conf (IPv6 scope ids dropped); [] if none."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        out.append(parse_upstream(parts[1].split("%")[0]))
                    except ValueError:
                        continue
    except OSError:
        return []
    return out


class DnsForwarder:
    #: udp/tcp: queries sent upstream by transport (one per upstream tried);
    #: errors: refused/reset/closed; timeouts: an upstream or the whole budget ran out;
    #: queue_full: submit() refused (the stack answered SERVFAIL).
    COUNTERS = ("udp", "tcp", "errors", "timeouts", "queue_full")

    def __init__(self, upstreams, *, budget: float = 4.5, per_upstream: float = PER_UPSTREAM_TIMEOUT,
                 max_pending: int = 64):
        self.upstreams = [tuple(u) for u in upstreams]
        self.budget = budget
        self.per_upstream = per_upstream
        self.max_pending = max_pending
        self._send, self._recv = trio.open_memory_channel(max_pending)
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self._idle: dict[tuple, list] = {}      # (host, port) -> kept UDP sockets

    def submit(self, query) -> bool:
        """Queue one DnsQuery; False (counted) when the queue is full. Never blocks."""
        try:
            self._send.send_nowait(query)
            return True
        except trio.WouldBlock:
            self.counters["queue_full"] += 1
            return False

    async def serve(self, deliver) -> None:
        """Relay queued queries until cancelled; deliver(key, wire, reason) per query."""
        limiter = trio.Semaphore(self.max_pending)
        try:
            async with trio.open_nursery() as nursery:
                async for query in self._recv:
                    await limiter.acquire()
                    nursery.start_soon(self._one, query, deliver, limiter)
        finally:
            self.close()

    def close(self) -> None:
        """Close the kept UDP sockets (the connection is over)."""
        for idle in self._idle.values():
            for _raw, s in idle:
                s.close()
        self._idle.clear()

    async def _one(self, query, deliver, limiter) -> None:
        try:
            try:
                wire, reason = await self.resolve(query.wire, query.transport)
            except Exception as e:      # a relay bug must not end the connection
                log.error("DNS relay error: %r", e)
                wire, reason = None, "failed"
            deliver(query.key, wire, reason)
        finally:
            limiter.release()

    async def resolve(self, wire: bytes, transport: str) -> tuple[bytes | None, str | None]:
        """(answer, None), or (None, "failed" | "timed_out")."""
        reason = "failed"
        with trio.move_on_after(self.budget):
            for host, port in self.upstreams:
                try:
                    with trio.fail_after(self.per_upstream):
                        if transport == "tcp":
                            self.counters["tcp"] += 1
                            return await self._tcp(host, port, wire), None
                        self.counters["udp"] += 1
                        return await self._udp(host, port, wire), None
                except trio.TooSlowError:
                    self.counters["timeouts"] += 1
                    reason = "timed_out"
                except (OSError, EOFError, trio.BrokenResourceError) as e:
                    self.counters["errors"] += 1
                    log.debug("DNS upstream %s:%d: %s", host, port, e)
                    if reason != "timed_out":
                        reason = "failed"
            return None, reason
        self.counters["timeouts"] += 1
        return None, "timed_out"

    async def _udp(self, host: str, port: int, wire: bytes) -> bytes:
        raw, s = self._take_socket(host, port)
        ok = False
        try:
            await s.send(wire)
            qend = _question_end(wire)
            while True:
                data = await s.recv(MAX_UDP_ANSWER)
                # Our ID and our question, else a stale or spoofed datagram
                # (RFC 5452 §9.1): keep waiting.
                if len(data) >= 2 and data[:2] == wire[:2] and (
                        qend is None or data[12:qend] == wire[12:qend]):
                    ok = True
                    return data
        finally:
            idle = self._idle.setdefault((host, port), [])
            if ok and len(idle) < IDLE_SOCKETS:
                idle.append((raw, s))
            else:
                s.close()

    def _take_socket(self, host: str, port: int):
        """A connected UDP socket to the upstream: a kept one, emptied of any
        late datagrams, or a new one. Kept sockets save the kernel's
        per-socket setup, which costs more than relaying the query."""
        idle = self._idle.get((host, port))
        while idle:
            raw, s = idle.pop()
            try:
                while True:
                    raw.recv(MAX_UDP_ANSWER, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return raw, s
            except OSError:               # e.g. a queued ICMP error: start afresh
                s.close()
        raw = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        raw.setblocking(False)
        raw.connect((host, port))         # a UDP connect only sets the peer
        return raw, trio.socket.from_stdlib_socket(raw)

    @staticmethod
    async def _tcp(host: str, port: int, wire: bytes) -> bytes:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(struct.pack("!H", len(wire)) + wire)
            head = await _read_exactly(stream, 2)
            return await _read_exactly(stream, struct.unpack("!H", head)[0])

    def snapshot(self) -> dict:
        return {"upstreams": [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.upstreams],
                **self.counters}


def _question_end(wire: bytes) -> int | None:
    """Offset just past the first question (name, type, class), or None
    when the name uses compression or runs past the end (then only the ID
    is compared)."""
    pos = 12
    while pos < len(wire):
        n = wire[pos]
        if n == 0:
            end = pos + 5
            return end if end <= len(wire) else None
        if n & 0xC0:
            return None
        pos += 1 + n
    return None


async def _read_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError("upstream closed the TCP connection")
        buf += chunk
    return bytes(buf)
