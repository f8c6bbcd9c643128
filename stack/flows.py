"""The flow API: what the NAT (the device side's host proxy) sees of the stack.

The stack stays sans-IO. Traffic the routing step (stack/interface.py) sends
on to the NAT becomes *flows* here, and the host proxy learns about them by
pulling events, h11 style:

    while (ev := flows.next_event()) is not None:
        ...                       # TcpRequest, TcpReadable, UdpDatagram, ...

and acts on them with calls in, each taking `now` (the stack has no clock):

    flows.accept(now, fid) / flows.refuse(now, fid, code)   a held SYN
    flows.send_space(fid), flows.send(now, fid, data) -> n   bytes to the guest
    flows.readable(fid), flows.peek(fid, n), flows.consume(now, fid, n)
    flows.close(now, fid) (FIN), flows.abort(now, fid) (RST)
    flows.connect(now, guest_port) -> fid                   inbound forward
    flows.udp_send(now, fid, payload), flows.udp_open(now, guest_port) -> fid
    flows.icmp_reply(now, fid, seq, payload), flows.unreachable(now, fid, code)

Flow control holds both ways with no buffer of the proxy's own:
* guest -> host: the guest's bytes stay in the connection's receive buffer
  until the proxy `consume`s them, which it does only for what the host
  socket accepted (`peek`, `sock.send`, `consume(n_sent)`). A slow host
  reader fills that buffer, and the window the stack advertises closes.
* host -> guest: `send_space` is the room in the connection's send buffer,
  which drains only as fast as the guest's window opens. The proxy reads at
  most that much from the host socket, so a slow guest leaves the bytes in
  the host kernel and the host sender's window closes. `guest_window` is
  the window the guest last advertised, for display.

TCP events are edge-triggered and coalesced: a flow has at most one
TcpReadable and one TcpWritable waiting, so the queue is bounded by the
flow caps. UDP and ICMP datagrams are lossy: beyond `max_queued` waiting
datagrams new ones are dropped and counted.

Outbound TCP: the guest's SYN is held in SYN-RECEIVED (stack/tcp: the
unclaimed listener) and reported as TcpRequest; the proxy connects on the
host, then accepts (SYN-ACK goes out) or refuses (RST, or an ICMP error such
as host unreachable). UDP: one flow per (guest addr, guest port, dst addr,
dst port), ended after `udp_idle` seconds without traffic either way (UdpEnded).
ICMP echo: one flow per (guest, dst, identifier), likewise idle-timed.

Bounds (each counted as nat_<what>_limit when hit): TCP flows, held/half-open
SYNs (the unclaimed listener's backlog), UDP flows, ICMP flows, queued
datagrams. Nothing the guest sends allocates beyond them.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass

from .config import ip_text
from .tcp.common import CLOSED, TIME_WAIT
from .tcp.connection import TcpError
from .wire import icmp as icmpw
from .wire.ipv4 import PROTO_TCP, PROTO_UDP, build_header
from .wire.udp import HEADER as UDPH

__all__ = ["FlowConfig", "FlowTable", "TcpRequest", "TcpEstablished", "TcpReadable",
           "TcpWritable", "TcpEof", "TcpReset", "TcpClosed", "UdpDatagram", "UdpEnded",
           "IcmpEcho", "IcmpEnded"]

EPHEMERAL = (49152, 65535)      # RFC 6335 §6: the dynamic port range, for UDP forwards


@dataclass
class FlowConfig:
    outbound: bool = True           # False: --restrict (only forwards and built-in services)
    max_tcp: int = 1000             # TCP flows in any state (the TCP layer has its own cap too)
    max_half_open: int = 128        # SYNs held or SYN-ACKed, not yet established
    max_udp: int = 512
    max_icmp: int = 64
    max_queued: int = 1024          # UDP / ICMP datagrams waiting for next_event
    udp_idle: float = 60.0          # slirp uses 240 s, passt 180 s; 60 s bounds a spray sooner
    icmp_idle: float = 10.0


# ------------------------------------------------------------------ events
@dataclass(slots=True)
class TcpRequest:
    """The guest sent a SYN to dst:dport; it is held until accept/refuse."""
    fid: int
    guest_ip: bytes
    guest_port: int
    dst_ip: bytes
    dst_port: int


@dataclass(slots=True)
class TcpEstablished:
    fid: int


@dataclass(slots=True)
class TcpReadable:
    """Bytes from the guest wait: readable(fid), peek, consume."""
    fid: int


@dataclass(slots=True)
class TcpWritable:
    """send_space(fid) grew: more may go to the guest."""
    fid: int


@dataclass(slots=True)
class TcpEof:
    """The guest closed its sending side and every byte has been consumed."""
    fid: int


@dataclass(slots=True)
class TcpReset:
    """The connection ended abnormally (guest RST, timeout); the flow is gone."""
    fid: int
    reason: str


@dataclass(slots=True)
class TcpClosed:
    """Both sides closed cleanly; the flow is gone."""
    fid: int


@dataclass(slots=True)
class UdpDatagram:
    fid: int
    guest_ip: bytes
    guest_port: int
    dst_ip: bytes
    dst_port: int
    payload: bytes
    new: bool                       # the first datagram of this flow


@dataclass(slots=True)
class UdpEnded:
    fid: int


@dataclass(slots=True)
class IcmpEcho:
    fid: int
    guest_ip: bytes
    dst_ip: bytes
    ident: int
    seq: int
    payload: bytes
    new: bool


@dataclass(slots=True)
class IcmpEnded:
    fid: int


# ------------------------------------------------------------------ flows
class _Flow:
    __slots__ = ("fid", "proto", "guest_ip", "guest_port", "dst_ip", "dst_port", "inbound",
                 "created", "last", "rx", "tx", "host", "conn", "want_read", "want_write",
                 "eof_sent", "ended", "_heap_when")

    def __init__(self, fid, proto, guest_ip, guest_port, dst_ip, dst_port, inbound, now):
        self.fid = fid
        self.proto = proto
        self.guest_ip = guest_ip
        self.guest_port = guest_port      # ICMP: the guest's echo identifier
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.inbound = inbound            # opened from the host side (a forward)
        self.created = now
        self.last = now
        self.rx = 0                       # bytes (payload) from the guest
        self.tx = 0                       # bytes (payload) to the guest
        self.host = ""                    # the host side, as the proxy describes it (or a callable that does)
        self.conn = None
        self.want_read = self.want_write = False   # an event is queued already
        self.eof_sent = False
        self.ended = False
        self._heap_when = None


_PROTO_NAME = {PROTO_TCP: "tcp", PROTO_UDP: "udp", 1: "icmp"}


class FlowTable:
    """Every NAT flow, by id and by its guest-side key. Built by the Stack."""

    def __init__(self, config: FlowConfig, tcp, counters, gateway_ip: bytes, *,
                 set_now, udp_output, icmp_output, icmp_error):
        self.config = config
        self._tcp = tcp
        self._c = counters
        self._gw = gateway_ip
        self._set_now = set_now           # (now) -> None: the stack's clock for output
        self._udp_output = udp_output     # (src_ip, dst_ip, sport, dport, payload)
        self._icmp_output = icmp_output   # (src_ip, dst_ip, icmp message bytearray)
        self._icmp_error = icmp_error     # (type, code, quoted ip packet, src_ip, dst_ip)
        self._events: deque = deque()
        self._queued = 0                  # datagram events waiting
        self._ids = itertools.count(1)
        self._flows: dict[int, _Flow] = {}
        # The TCP flows not ended, by id: what every TCP call in looks up
        # (several per event: one dict lookup, no checks).
        self._tcpf: dict[int, _Flow] = {}
        self._by_key: dict[tuple, _Flow] = {}
        self._n = {PROTO_TCP: 0, PROTO_UDP: 0, 1: 0}
        self._idle: list = []             # (deadline, seq, flow) heap, UDP and ICMP
        self._seq = itertools.count()
        self._udp_port = EPHEMERAL[0]
        if config.outbound:
            tcp.listen_unclaimed(self._on_request, self._on_accept, config.max_half_open)

    # --------------------------------------------------------- pulling events
    def next_event(self):
        ev = self._events.popleft() if self._events else None
        if ev is None:
            return None
        t = type(ev)
        if t is TcpReadable:
            f = self._tcpf.get(ev.fid)
            if f is None:
                return self.next_event()
            f.want_read = False
        elif t is TcpWritable:
            f = self._tcpf.get(ev.fid)
            if f is None:
                return self.next_event()
            f.want_write = False
        elif t is UdpDatagram or t is IcmpEcho:
            self._queued -= 1
        return ev

    @property
    def pending(self) -> int:
        return len(self._events)

    # --------------------------------------------------- from the stack: TCP
    def _on_request(self, conn) -> None:
        """The TCP layer holds a SYN for an address/port nobody serves."""
        c = self._c
        if self._n[PROTO_TCP] >= self.config.max_tcp:
            c["nat_tcp_flow_limit"] += 1
            conn.refuse_held(reset=True)
            return
        f = self._new(PROTO_TCP, conn.remote_ip, conn.remote_port, conn.local_ip,
                      conn.local_port, False, self._tcp.now)
        f.conn = conn
        self._hook(f, conn)
        c["nat_tcp_requests"] += 1
        self._events.append(TcpRequest(f.fid, f.guest_ip, f.guest_port, f.dst_ip, f.dst_port))

    def _on_accept(self, conn) -> None:
        """The guest ACKed our SYN-ACK (accept(), or a forward's connection)."""
        f = self._by_key.get((PROTO_TCP, conn.remote_ip, conn.remote_port, conn.local_ip,
                              conn.local_port))
        if f is not None:
            self._established(f, conn)

    def _hook(self, f: _Flow, conn) -> None:
        conn.on_readable = lambda _c, f=f: self._tcp_readable(f)
        conn.on_writable = lambda _c, f=f: self._tcp_writable(f)
        conn.on_closed = lambda _c, f=f: self._tcp_closed(f)
        conn.on_established = lambda _c, f=f: self._established(f, _c)

    def _established(self, f: _Flow, conn) -> None:
        self._events.append(TcpEstablished(f.fid))
        self._tcp_readable(f)
        self._tcp_writable(f)

    def _tcp_readable(self, f: _Flow) -> None:
        if f.ended:
            return
        if f.conn.readable:
            if not f.want_read:
                f.want_read = True
                self._events.append(TcpReadable(f.fid))
        else:
            self._drained(f)

    def _tcp_writable(self, f: _Flow) -> None:
        if not f.ended and not f.want_write and f.conn.send_space:
            f.want_write = True
            self._events.append(TcpWritable(f.fid))

    def _tcp_closed(self, f: _Flow) -> None:
        if f.ended:
            return
        conn = f.conn
        if conn.error:
            self._c["nat_tcp_resets"] += 1
            self._end(f, TcpReset(f.fid, conn.error))   # unread bytes die with a reset
        else:
            self._check_done(f)

    def _drained(self, f: _Flow) -> None:
        """Every byte from the guest taken: TcpEof once its FIN has come, and
        the flow's end once both sides closed (_check_done, the buffer known empty)."""
        conn = f.conn
        if not f.eof_sent and conn.fin_received:
            f.eof_sent = True
            self._events.append(TcpEof(f.fid))
        st = conn.state
        if st is TIME_WAIT or (st is CLOSED and not conn.error):
            self._end(f, TcpClosed(f.fid))

    def _check_done(self, f: _Flow) -> None:
        """Both sides closed cleanly and the proxy took every byte: the flow
        is over (the connection may linger in TIME-WAIT on its own)."""
        conn = f.conn
        st = conn.state
        if (st is TIME_WAIT or (st is CLOSED and not conn.error)) and not conn.readable:
            self._end(f, TcpClosed(f.fid))

    # ----------------------------------------------------------- TCP calls in
    def accept(self, now: float, fid: int) -> None:
        f = self._tcpf.get(fid)
        if f is None or not f.conn.held:
            return
        self._set_now(now)
        f.conn.accept_held()

    def refuse(self, now: float, fid: int, icmp_code: int | None = None) -> None:
        """Refuse a held SYN: RST (icmp_code None), or ICMP destination
        unreachable with that code (RFC 792), quoting the guest's SYN."""
        f = self._tcpf.get(fid)
        if f is None or not f.conn.held:
            return
        self._set_now(now)
        conn = f.conn
        conn.refuse_held(reset=icmp_code is None)
        if icmp_code is not None:
            self._unreach(f, icmp_code, PROTO_TCP,
                          (conn.irs & 0xFFFFFFFF).to_bytes(4, "big"))
        self._c["nat_tcp_refused"] += 1
        self._end(f, None)

    def send_space(self, fid: int) -> int:
        f = self._tcpf.get(fid)
        return f.conn.send_space if f is not None else 0

    def guest_window(self, fid: int) -> int:
        f = self._tcpf.get(fid)
        return f.conn.snd_wnd if f is not None else 0

    def send(self, now: float, fid: int, data) -> int:
        """Queue bytes for the guest; returns how many were taken (<= send_space)."""
        f = self._tcpf.get(fid)
        if f is None or not f.conn.send_space:
            return 0
        self._set_now(now)
        n = f.conn.send(data)
        f.tx += n
        f.last = now
        return n

    def readable(self, fid: int) -> int:
        f = self._tcpf.get(fid)
        return f.conn.readable if f is not None else 0

    def peek(self, fid: int, n: int) -> bytes:
        f = self._tcpf.get(fid)
        if f is None:
            return b""
        return bytes(f.conn.rcvbuf.buf[:n])

    def consume(self, now: float, fid: int, n: int) -> None:
        """Drop n bytes the host socket accepted; the window reopens."""
        f = self._tcpf.get(fid)
        if f is None or n <= 0:
            return
        self._set_now(now)
        got = f.conn.skip(n)
        f.rx += got
        f.last = now
        if f.conn.readable:
            self._tcp_readable(f)
        else:
            self._drained(f)

    def close(self, now: float, fid: int) -> None:
        """The host side sent EOF: FIN to the guest after the queued bytes."""
        f = self._tcpf.get(fid)
        if f is None:
            return
        self._set_now(now)
        f.conn.close()
        self._check_done(f)

    def abort(self, now: float, fid: int) -> None:
        """The host side reset (or failed): RST to the guest, flow gone."""
        f = self._tcpf.get(fid)
        if f is None:
            return
        self._set_now(now)
        if f.conn.held:
            f.conn.refuse_held(reset=True)
        else:
            f.conn.on_closed = None
            f.conn.abort()
        self._end(f, None)

    def connect(self, now: float, guest_ip: bytes, guest_port: int) -> int:
        """Open a connection from the gateway to the guest (an inbound forward).
        Returns the flow id; TcpEstablished or TcpReset follows."""
        c = self._c
        if self._n[PROTO_TCP] >= self.config.max_tcp:
            c["nat_tcp_flow_limit"] += 1
            raise TcpError("too many NAT flows")
        self._set_now(now)
        conn = self._tcp.connect(now, self._gw, 0, guest_ip, guest_port)
        f = self._new(PROTO_TCP, guest_ip, guest_port, self._gw, conn.local_port, True, now)
        f.conn = conn
        self._hook(f, conn)
        c["nat_tcp_inbound"] += 1
        return f.fid

    # ------------------------------------------------------- UDP and ICMP
    def udp_from_guest(self, now, src, sport, dst, dport, payload) -> bool:
        """A datagram for the NAT; False if it is refused (no flow, no outbound)."""
        c = self._c
        f = self._by_key.get((PROTO_UDP, src, sport, dst, dport))
        new = f is None
        if new:
            if not self.config.outbound:
                return False
            if self._n[PROTO_UDP] >= self.config.max_udp:
                c["nat_udp_flow_limit"] += 1
                return True           # dropped; no ICMP error for hitting our own cap
            f = self._new(PROTO_UDP, src, sport, dst, dport, False, now)
            self._arm_idle(f, now)
        f.last = now
        f.rx += len(payload)
        self._datagram(UdpDatagram(f.fid, src, sport, dst, dport, bytes(payload), new))
        return True

    def has_udp(self, src, sport, dst, dport) -> bool:
        return (PROTO_UDP, src, sport, dst, dport) in self._by_key

    def udp_open(self, now: float, guest_ip: bytes, guest_port: int) -> int:
        """A flow from a gateway port to the guest (an inbound UDP forward)."""
        if self._n[PROTO_UDP] >= self.config.max_udp:
            self._c["nat_udp_flow_limit"] += 1
            raise OSError("too many NAT UDP flows")
        lo, hi = EPHEMERAL
        for _ in range(hi - lo + 1):
            p = self._udp_port
            self._udp_port = lo if p >= hi else p + 1
            if (PROTO_UDP, guest_ip, guest_port, self._gw, p) not in self._by_key:
                break
        else:
            raise OSError("no free gateway UDP port")
        f = self._new(PROTO_UDP, guest_ip, guest_port, self._gw, p, True, now)
        self._arm_idle(f, now)
        return f.fid

    def udp_send(self, now: float, fid: int, payload) -> None:
        f = self._flows.get(fid)
        if f is None or f.proto != PROTO_UDP:
            return
        self._set_now(now)
        f.last = now
        f.tx += len(payload)
        self._udp_output(f.dst_ip, f.guest_ip, f.dst_port, f.guest_port, payload)

    def udp_expressed(self, now: float, fid: int, nbytes: int) -> None:
        """NBYTES of payload of flow FID went to the host without an event (the
        device's UDP express): the flow's activity and bytes, as udp_from_guest
        counts them."""
        f = self._flows.get(fid)
        if f is not None and f.proto == PROTO_UDP:
            f.last = now
            f.rx += nbytes

    def icmp_from_guest(self, now, src, dst, ident, seq, payload) -> bool:
        c = self._c
        f = self._by_key.get((1, src, ident, dst, 0))
        new = f is None
        if new:
            if not self.config.outbound:
                return False
            if self._n[1] >= self.config.max_icmp:
                c["nat_icmp_flow_limit"] += 1
                return True
            f = self._new(1, src, ident, dst, 0, False, now)
            self._arm_idle(f, now)
        f.last = now
        f.rx += len(payload)
        self._datagram(IcmpEcho(f.fid, src, dst, ident, seq, bytes(payload), new))
        return True

    def icmp_reply(self, now: float, fid: int, seq: int, payload) -> None:
        f = self._flows.get(fid)
        if f is None or f.proto != 1:
            return
        self._set_now(now)
        f.last = now
        f.tx += len(payload)
        msg = bytearray(icmpw.HEADER.pack(icmpw.ECHO_REPLY, 0, 0, f.guest_port, seq & 0xFFFF))
        msg += payload
        self._icmp_output(f.dst_ip, f.guest_ip, msg)

    def unreachable(self, now: float, fid: int, code: int) -> None:
        """ICMP destination unreachable to the guest about a UDP or ICMP flow
        (the host said ECONNREFUSED, EHOSTUNREACH, ...)."""
        f = self._flows.get(fid)
        if f is None or f.proto == PROTO_TCP:
            return
        self._set_now(now)
        if f.proto == PROTO_UDP:
            self._unreach(f, code, PROTO_UDP, b"")
        else:
            self._unreach(f, code, 1, b"")

    def release(self, now: float, fid: int) -> None:
        """The proxy is done with a UDP/ICMP flow (its socket failed or closed)."""
        f = self._flows.get(fid)
        if f is not None and f.proto != PROTO_TCP:
            self._end(f, None)

    def describe(self, fid: int, host) -> None:
        """The proxy names the host side of a flow, for stats: a string, or a
        callable returning one, called only when a snapshot is taken (so a
        name that costs syscalls is paid for only when someone looks)."""
        f = self._flows.get(fid)
        if f is not None:
            f.host = host

    def flow_key(self, fid: int):
        f = self._flows.get(fid)
        if f is None:
            return None
        return (f.proto, f.guest_ip, f.guest_port, f.dst_ip, f.dst_port)

    # ------------------------------------------------------------- timers
    def poll(self, now: float) -> None:
        heap = self._idle
        while heap and heap[0][0] <= now:
            when, _, f = heapq.heappop(heap)
            if f.ended or f._heap_when != when:
                continue
            f._heap_when = None
            idle = self.config.udp_idle if f.proto == PROTO_UDP else self.config.icmp_idle
            due = f.last + idle
            if now >= due:
                self._c["nat_udp_expired" if f.proto == PROTO_UDP else "nat_icmp_expired"] += 1
                self._end(f, UdpEnded(f.fid) if f.proto == PROTO_UDP else IcmpEnded(f.fid))
            else:
                self._push_idle(f, due)

    def next_deadline(self) -> float | None:
        return self._idle[0][0] if self._idle else None

    def snapshot(self, now: float, limit: int | None = None) -> list[dict]:
        """Every flow, or the LIMIT most recently active ones."""
        out = []
        flows = self._flows.values()
        if limit is not None and len(self._flows) > limit:
            flows = heapq.nlargest(limit, flows, key=lambda f: f.last)
        for f in flows:
            if f.proto == PROTO_TCP:
                state = f.conn.state.value if not f.conn.held else "HELD"
            else:
                state = "ACTIVE"
            g = f"{ip_text(f.guest_ip)}:{f.guest_port}"
            d = f"{ip_text(f.dst_ip)}:{f.dst_port}" if f.proto != 1 else ip_text(f.dst_ip)
            host = f.host if type(f.host) is str else f.host()
            out.append({"id": f.fid, "proto": _PROTO_NAME[f.proto],
                        "direction": "in" if f.inbound else "out",
                        "guest": g, "remote": d, "host": host, "state": state,
                        "bytes_from_guest": f.rx, "bytes_to_guest": f.tx,
                        "age_s": round(max(now - f.created, 0.0), 3),
                        "idle_s": round(max(now - f.last, 0.0), 3)})
        return out

    def __len__(self) -> int:
        return len(self._flows)

    def counts(self) -> dict:
        return {"tcp": self._n[PROTO_TCP], "udp": self._n[PROTO_UDP], "icmp": self._n[1]}

    # ------------------------------------------------------------ internals
    def _new(self, proto, gip, gport, dip, dport, inbound, now) -> _Flow:
        f = _Flow(next(self._ids), proto, bytes(gip), gport, bytes(dip), dport, inbound, now)
        self._flows[f.fid] = f
        if proto == PROTO_TCP:
            self._tcpf[f.fid] = f
        self._by_key[(proto, f.guest_ip, gport, f.dst_ip, dport)] = f
        self._n[proto] += 1
        return f

    def _end(self, f: _Flow, event) -> None:
        if f.ended:
            return
        f.ended = True
        self._flows.pop(f.fid, None)
        self._tcpf.pop(f.fid, None)
        key = (f.proto, f.guest_ip, f.guest_port, f.dst_ip, f.dst_port)
        if self._by_key.get(key) is f:
            del self._by_key[key]
        self._n[f.proto] -= 1
        if event is not None:
            self._events.append(event)

    def _datagram(self, ev) -> None:
        if self._queued >= self.config.max_queued:
            self._c["nat_queue_limit"] += 1
            return
        self._queued += 1
        self._events.append(ev)

    def _arm_idle(self, f: _Flow, now: float) -> None:
        idle = self.config.udp_idle if f.proto == PROTO_UDP else self.config.icmp_idle
        self._push_idle(f, now + idle)

    def _push_idle(self, f: _Flow, when: float) -> None:
        f._heap_when = when
        heapq.heappush(self._idle, (when, next(self._seq), f))

    def _unreach(self, f: _Flow, code: int, proto: int, rest: bytes) -> None:
        """Quote a reconstruction of the guest's datagram: its IP header and
        the first 8 bytes of L4 (RFC 792), enough for the guest to find its socket."""
        if proto == 1:
            l4 = icmpw.HEADER.pack(icmpw.ECHO_REQUEST, 0, 0, f.guest_port, 0)
        elif proto == PROTO_UDP:
            l4 = UDPH.pack(f.guest_port, f.dst_port, 8, 0)
        else:
            l4 = f.guest_port.to_bytes(2, "big") + f.dst_port.to_bytes(2, "big") + rest
        quote = bytes(build_header(f.guest_ip, f.dst_ip, proto, len(l4), 0)) + l4
        self._icmp_error(icmpw.DEST_UNREACH, code, quote, f.dst_ip, f.guest_ip)
