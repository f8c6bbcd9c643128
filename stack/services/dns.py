"""DNS on the DNS address (10.0.2.3), UDP and TCP port 53: the stack half of a relay.

The stack does not resolve anything. It checks that a guest message is a
query (dnspython parses it: one question, opcode QUERY, QR clear), counts
it, and queues a `DnsQuery` event that the device side pulls
(`Stack.take_events`), sends to an upstream resolver, and answers with
`answer(key, wire)` or `fail(key)`. The answer goes back verbatim - rcode,
TC bit and all - so NXDOMAIN, truncation and the guest's TCP fallback
behave exactly as upstream decided. The only checks on an answer are
those that keep a confused upstream from answering the wrong question:
at least a header, QR set, and the query's ID.

Bounds: at most `max_inflight` queries wait for answers; one more gets
SERVFAIL at once (counted `dns_inflight_cap`). A query not answered in
`timeout` seconds gets SERVFAIL (`dns_timed_out`). TCP (RFC 7766): two-byte
length framing, several queries per connection, answers in any order; at
most `max_tcp_conns` connections, closed after `TCP_IDLE_TIMEOUT` seconds
with nothing in flight, and a connection stops being read while
`TCP_PIPELINE` of its queries are in flight, so a client cannot queue
unbounded work. Unparseable queries with a readable header get FORMERR
(RFC 1035 §4.1.1), anything else is dropped and counted.

Counters: dns_queries, dns_answered, dns_nxdomain, dns_truncated,
dns_failed, dns_timed_out, dns_inflight_cap, dns_formerr, dns_late_answer,
dns_bad_answer, drop_dns_<reason>, dns_tcp_conns, dns_tcp_refused,
dns_tcp_idle_closed.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode

__all__ = ["DnsRelay", "DnsQuery", "DNS_PORT"]

DNS_PORT = 53                      # RFC 1035 §4.2
HEADER_LEN = 12                    # RFC 1035 §4.1.1
QR = 0x8000                        # RFC 1035 §4.1.1 flags
TC = 0x0200
RCODE_MASK = 0x000F
OPCODE_MASK = 0x7800
RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN = 1, 2, 3
TCP_PIPELINE = 8                   # queries in flight per TCP connection before we stop reading
TCP_MAX_BUFFER = 2 + 65535         # one full length-prefixed message (RFC 1035 §4.2.2)
TCP_IDLE_TIMEOUT = 30.0            # seconds; RFC 7766 §6.2.3: servers close idle connections
_H = struct.Struct("!HH")
# The counters a snapshot reports (as dns_<name> in the stack's counters).
COUNTERS = ("queries", "answered", "nxdomain", "truncated", "failed", "timed_out",
            "inflight_cap", "formerr")


@dataclass
class DnsQuery:
    """A guest query to relay. `transport` is "udp" or "tcp": a TCP query
    should go to upstream over TCP (the guest fell back because of TC)."""
    key: int
    wire: bytes
    transport: str
    qname: str
    qtype: int


class _Pending:
    __slots__ = ("key", "wire", "qid", "deadline", "reply")

    def __init__(self, key, wire, deadline, reply):
        self.key = key
        self.wire = wire
        self.qid = wire[:2]
        self.deadline = deadline
        self.reply = reply            # callable(bytes)


class _TcpSession:
    """One guest TCP connection to port 53."""

    def __init__(self, relay: "DnsRelay", conn):
        self.relay = relay
        self.conn = conn
        self.buf = bytearray()
        self.out = bytearray()
        self.inflight = 0
        self.alive = True
        self.last = relay._clock()
        conn.on_readable = self.pump
        conn.on_writable = self.flush
        conn.on_closed = self.closed
        self.pump(conn)

    def pump(self, conn) -> None:
        while self.alive and self.inflight < TCP_PIPELINE:
            room = TCP_MAX_BUFFER - len(self.buf)
            if room > 0 and conn.readable:
                self.buf += conn.recv(room)
                self.last = self.relay._clock()
            if len(self.buf) < 2:
                break
            n = (self.buf[0] << 8) | self.buf[1]
            if len(self.buf) < 2 + n:
                break
            msg = bytes(self.buf[2:2 + n])
            del self.buf[:2 + n]
            self.inflight += 1
            if not self.relay._query(msg, "tcp", self.reply):
                self.inflight -= 1
        self._maybe_close()

    def reply(self, wire: bytes) -> None:
        self.inflight -= 1
        if not self.alive:
            return
        self.last = self.relay._clock()
        self.out += len(wire).to_bytes(2, "big") + wire
        self.flush(self.conn)
        self.pump(self.conn)

    def flush(self, conn) -> None:
        if self.out and conn.send_space:
            try:
                n = conn.send(self.out)
            except ConnectionError:  # TcpError: the peer reset meanwhile, nothing to deliver to
                self.out.clear()
                return
            del self.out[:n]
        self._maybe_close()

    def _maybe_close(self) -> None:
        c = self.conn
        if self.alive and c.at_eof and not self.inflight and not self.out:
            self.alive = False
            c.close()

    def closed(self, conn) -> None:
        if self.alive:
            self.alive = False
            self.relay._tcp_conns -= 1
        self.relay._sessions.discard(self)

    def idle_deadline(self) -> float | None:
        return self.last + TCP_IDLE_TIMEOUT if self.alive and not self.inflight else None

    def close_idle(self) -> None:
        self.alive = False
        self.relay._tcp_conns -= 1
        self.relay._sessions.discard(self)
        self.conn.close()


class DnsRelay:
    def __init__(self, udp_layer, tcp_layer, counters, clock, emit, *, ip: bytes,
                 timeout: float, max_inflight: int, max_tcp_conns: int):
        self._c = counters
        self._clock = clock
        self._emit = emit
        self._timeout = timeout
        self._max = max_inflight
        self._max_tcp = max_tcp_conns
        self._tcp_conns = 0
        self._sessions: set[_TcpSession] = set()
        self._pending: dict[int, _Pending] = {}
        self._next_key = 1
        self.sock = udp_layer.bind(DNS_PORT, self._on_datagram, ip=ip)
        if tcp_layer is not None:
            tcp_layer.listen(ip, DNS_PORT, self._on_accept)

    # --------------------------------------------------------------- guest side
    def _on_datagram(self, sock, payload, src_ip, src_port, dst_ip) -> None:
        if src_port == 0:
            self._c["drop_dns_port_zero"] += 1
            return
        self._query(payload, "udp",
                    lambda wire: sock.send(wire, src_ip, src_port, src_ip=dst_ip))

    def _on_accept(self, conn) -> None:
        if self._tcp_conns >= self._max_tcp:
            self._c["dns_tcp_refused"] += 1
            conn.abort()
            return
        self._tcp_conns += 1
        self._c["dns_tcp_conns"] += 1
        self._sessions.add(_TcpSession(self, conn))

    def _query(self, wire: bytes, transport: str, reply) -> bool:
        """Validate, then queue an event. True when an answer will come later."""
        c = self._c
        if len(wire) < HEADER_LEN:
            c["drop_dns_truncated"] += 1
            return False
        flags = _H.unpack_from(wire, 0)[1]
        if flags & QR:
            c["drop_dns_not_query"] += 1
            return False
        try:
            m = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, UnicodeError):
            m = None
        if m is None or m.opcode() != dns.opcode.QUERY or len(m.question) != 1:
            c["dns_formerr"] += 1
            reply(_header_reply(wire, RCODE_FORMERR))
            return False
        c["dns_queries"] += 1
        c["dns_queries_" + transport] += 1
        if len(self._pending) >= self._max:
            c["dns_inflight_cap"] += 1
            reply(_header_reply(wire, RCODE_SERVFAIL, question=True))
            return False
        key = self._next_key
        self._next_key += 1
        self._pending[key] = _Pending(key, wire, self._clock() + self._timeout, reply)
        q = m.question[0]
        self._emit(DnsQuery(key, wire, transport, q.name.to_text(), int(q.rdtype)))
        return True

    # -------------------------------------------------------------- device side
    def answer(self, key: int, wire: bytes) -> None:
        """Upstream's answer to query `key`, relayed verbatim."""
        p = self._pending.pop(key, None)
        c = self._c
        if p is None:
            c["dns_late_answer"] += 1
            return
        if len(wire) < HEADER_LEN or wire[:2] != p.qid or not _H.unpack_from(wire, 0)[1] & QR \
                or len(wire) > 65535:
            c["dns_bad_answer"] += 1
            c["dns_failed"] += 1
            p.reply(_header_reply(p.wire, RCODE_SERVFAIL, question=True))
            return
        flags = _H.unpack_from(wire, 0)[1]
        c["dns_answered"] += 1
        if flags & RCODE_MASK == RCODE_NXDOMAIN:
            c["dns_nxdomain"] += 1
        if flags & TC:
            c["dns_truncated"] += 1
        p.reply(wire)

    def fail(self, key: int, reason: str = "failed") -> None:
        """No upstream could answer ("failed") or none spoke in time
        ("timed_out"): SERVFAIL to the guest."""
        p = self._pending.pop(key, None)
        if p is None:
            self._c["dns_late_answer"] += 1
            return
        self._c["dns_timed_out" if reason == "timed_out" else "dns_failed"] += 1
        p.reply(_header_reply(p.wire, RCODE_SERVFAIL, question=True))

    @property
    def inflight(self) -> int:
        return len(self._pending)

    def poll(self, now: float) -> None:
        for key in [k for k, p in self._pending.items() if p.deadline <= now]:
            p = self._pending.pop(key)
            self._c["dns_timed_out"] += 1
            p.reply(_header_reply(p.wire, RCODE_SERVFAIL, question=True))
        for s in [s for s in self._sessions if (s.idle_deadline() or now + 1) <= now]:
            self._c["dns_tcp_idle_closed"] += 1
            s.close_idle()

    def next_deadline(self) -> float | None:
        if not self._pending and not self._sessions:
            return None     # the usual case, asked after every frame
        ds = [p.deadline for p in self._pending.values()]
        ds += [d for d in (s.idle_deadline() for s in self._sessions) if d is not None]
        return min(ds, default=None)

    def snapshot(self) -> dict:
        c = self._c
        return {"enabled": True, "inflight": len(self._pending), "max_inflight": self._max,
                "tcp_connections": self._tcp_conns,
                **{k: c.get("dns_" + k, 0) for k in COUNTERS}}


def _header_reply(query: bytes, rcode: int, question: bool = False) -> bytes:
    """A reply with `rcode` built from the query: header only (FORMERR), or the
    question echoed back (SERVFAIL: RFC 1035 §4.1.1, as resolvers do)."""
    qid, flags = _H.unpack_from(query, 0)
    flags = QR | (flags & (OPCODE_MASK | 0x0100)) | 0x0080 | rcode   # keep opcode + RD, set RA
    if question:
        try:
            m = dns.message.from_wire(query)
            r = dns.message.make_response(m)
            r.set_rcode(rcode)
            return r.to_wire()
        except (dns.exception.DNSException, ValueError):
            pass
    return _H.pack(qid, flags) + bytes(8)
