"""The host proxy: drives real host sockets from the stack's flow events.

One HostProxy per guest connection, run by the device in the connection's
nursery, so every host socket of a guest is closed when QEMU goes away.

    stack (stack/flows.py) --events--> HostProxy.run --> relays (tcp_relay.py,
    datagram.py) --calls in--> stack --frames--> flush (device RX + timer rearm)

The device calls `pump()` after a TX batch or a timer run when the flow
table has events: it takes at most EVENT_BUDGET of them there and then, in
the device's own step, so a guest's datagram is on the host socket before
the kick handler sleeps again (no second task to wake: issue 12's latency
profile, one trio scheduling pass and one epoll_wait fewer per datagram).
Past the budget, the rest waits for the loop, which sleeps on `wake` and
takes at most EVENT_BUDGET events per pass and yields, so a guest flooding
SYNs or datagrams cannot starve the vhost-user message loop. Every relay's
host socket, datagram or TCP, is waited on by one task (reactor.py). The relays call back into the
stack and then `flush()`, which hands the
frames that made to the guest and re-arms the stack's timer: at once from
the reactor's step, once at the end from pump(), and from spin() not at
all (the device flushes after it).

Addresses: the gateway (10.0.2.2) is the host's 127.0.0.1 unless
--no-map-host-loopback (then a connection to it is refused with a RST and a
datagram gets port unreachable); any other address is itself, reached from
the host's own network (namespace).

Errors from host sockets map to what a guest understands, and never end the
proxy: refused -> RST; unreachable host/net -> ICMP destination
unreachable; connect timeout -> ICMP host unreachable; reset/EPIPE during a
connection -> RST; for UDP, ECONNREFUSED -> ICMP port unreachable.
"""
from __future__ import annotations

import logging
import socket
import time

import trio

from stack import flows as F
from stack.config import ip_text
from stack.wire import icmp as icmpw
from vhostnet.ratelimit import RateLimitedLog

from .config import DEFAULT_ANSWER_SPIN
from .datagram import PingRelay, UdpRelay
from .reactor import Reactor
from .tcp_relay import TcpRelay

__all__ = ["HostProxy", "EVENT_BUDGET"]

log = logging.getLogger("vhostnet.hostnet")

#: Events handled before the loop yields to the other tasks.
EVENT_BUDGET = 256
#: Spins in a row that ended with an answer missing before spinning stops ...
SPIN_MISSES = 8
#: ... for this long (seconds): a far host, or one that does not answer, costs nothing.
SPIN_BACKOFF = 1.0
LOOPBACK = "127.0.0.1"
LOOPBACK_NET = 127              # RFC 1122 3.2.1.3 (g)


class HostProxy:
    def __init__(self, flows, config, forwards=None, *, gateway_ip: bytes, guest_ip: bytes,
                 spin_max: float = DEFAULT_ANSWER_SPIN):
        self.flows = flows
        self.config = config
        self.forwards = forwards
        self.gateway_ip = gateway_ip
        self.guest_ip = guest_ip
        self.rlog = RateLimitedLog(log)
        self.counters: dict[str, int] = {}
        self.relays: dict[int, object] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.reactor: Reactor | None = None    # the relays' host sockets, while run() runs
        self._flush = None
        # Inbound UDP forwards: (listening socket fd, peer) -> fid, and back.
        self._udp_in: dict[tuple, int] = {}
        self.spin_max = spin_max
        self._asked: dict = {}              # relays that sent in this step (spin()); a dict: ordered, no repeats
        self._spin_misses = 0
        self._spin_resume = 0.0             # no spinning before this time (backoff)
        self._holding = 0                   # inside pump() or spin(): flush() waits for their end
        self._flush_owed = False
        self._step_now: float | None = None  # now() inside pump() and spin(), once asked
        # The UDP express (express.py): set by the device when it runs one.
        self.express = None

    # ------------------------------------------------------------ plumbing
    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def wake(self) -> None:
        self._wake.set()

    def pump(self, flush: bool = True) -> None:
        """Handle the flow table's events now (at most EVENT_BUDGET; the loop takes
        the rest after a yield), then flush once; FLUSH False: the caller
        flushes itself when it is done (the device's TX drain does, and the
        server re-arms the timer after the step). Before `run` has started:
        leave them to it."""
        if self._nursery is None:
            self._wake.set()
            return
        outer = not self._holding
        self._holding += 1
        try:
            self._drain()
        finally:
            self._holding -= 1
            if outer:
                self._step_now = None
        if self._flush_owed and not self._holding:
            self._flush_owed = False
            if flush:
                self.flush()
            elif self.flows.pending:
                self._wake.set()

    def expect_answer(self, relay) -> None:
        """RELAY sent the guest's bytes to its host socket in this step: spin() looks for the answer."""
        if self.spin_max > 0:
            self._asked[relay] = None

    def spin(self) -> bool:
        """Wait up to spin_max for answers to what the relays sent in this step
        (datagrams, TCP bytes), taking them into the stack now (the caller then
        flushes). True if any came.

        Bounded and adaptive: SPIN_MISSES spins in a row that missed an answer
        stop spinning for SPIN_BACKOFF, so a host that answers late or never
        (DNS upstream far away, a one-way stream) costs one spin per miss."""
        asked = self._asked
        if not asked:
            return False
        outer = not self._holding
        self._holding += 1          # the caller flushes
        now = self.now()
        if now < self._spin_resume:
            self._holding -= 1
            if outer:
                self._step_now = None
            asked.clear()
            return False
        got = False
        end = time.perf_counter() + self.spin_max
        try:
            while True:
                for r in tuple(asked):
                    res = None if r.closed else r.receive_one()
                    if res is not False:
                        del asked[r]
                        got = got or bool(res)
                if not asked or time.perf_counter() >= end:
                    break
        finally:
            self._holding -= 1
            if outer:
                self._step_now = None
        if not self._holding:
            self._flush_owed = False    # the caller's flush takes what the answers made
        if self.flows.pending:
            self._wake.set()
        if asked:
            asked.clear()
            self._spin_misses += 1
            if self._spin_misses >= SPIN_MISSES:
                self._spin_misses = 0
                self._spin_resume = now + SPIN_BACKOFF
                self.count("spin_backoff")
        else:
            self._spin_misses = 0
            self.count("spin_answered")
        return got

    def flush(self) -> None:
        """Frames the last call into the stack made go to the guest now; inside
        pump() once it is done, inside spin() by its caller. A flush (RX ring
        work and the stack's next deadline for the timer) per relay call was
        two or three per event batch of one NATed connection (issue 12)."""
        if self._holding:
            # Flow events the call queued: pump()'s drain takes them, spin()
            # wakes the loop for them when it is done.
            self._flush_owed = True
            return
        if self._flush is not None:
            self._flush()
        if self.flows.pending:
            self._wake.set()

    def now(self) -> float:
        """trio's clock; inside pump() and spin() the time of the first look:
        one step's calls into the stack share it, as a TX batch's frames
        share the device's (and trio.current_time() is five calls)."""
        t = self._step_now
        if t is None:
            t = trio.current_time()
            if self._holding:
                self._step_now = t
        return t

    def host_addr(self, ip: bytes) -> str | None:
        """Where a guest's destination is on the host; None: nowhere."""
        if ip == self.gateway_ip:
            return LOOPBACK if self.config.map_host_loopback else None
        if ip[0] == LOOPBACK_NET:
            return None                 # the stack never routes these; belt and braces
        return ip_text(ip)

    async def run(self, flush, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._flush = flush
        self.reactor = Reactor(on_error=self._internal_error)
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                n.start_soon(self.reactor.run)
                if self.forwards is not None:
                    self.forwards.proxy = self
                task_status.started()
                while True:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    self._drain()
                    await trio.sleep(0)
        finally:
            if self.forwards is not None and self.forwards.proxy is self:
                self.forwards.proxy = None
            for r in list(self.relays.values()):
                r.close()
            self.relays.clear()
            self._nursery = None
            self.reactor.close()

    def _drain(self) -> None:
        flows = self.flows
        for _ in range(EVENT_BUDGET):
            ev = flows.next_event()
            if ev is None:
                return
            try:
                self._handle(ev)
            except Exception as e:      # a proxy bug must not take the backend down
                self._internal_error(e, type(ev).__name__)
        self._wake.set()                # more waiting: come back after yielding

    def _internal_error(self, e: BaseException, on: str = "a host socket") -> None:
        self.count("internal_error")
        self.rlog.log(logging.ERROR, "proxy_internal_error", "host proxy: internal error on %s: %r", on, e)

    # -------------------------------------------------------------- events
    def _handle(self, ev) -> None:
        t = type(ev)
        if t is F.TcpRequest:
            self._tcp_request(ev)
        elif t is F.UdpDatagram:
            self._udp(ev)
        elif t is F.IcmpEcho:
            self._icmp(ev)
        else:
            r = self.relays.get(ev.fid)
            if r is not None:
                r.event(ev)

    def _tcp_request(self, ev: F.TcpRequest) -> None:
        host = self.host_addr(ev.dst_ip)
        now = self.now()
        if host is None:
            self.count("tcp_no_host_mapping")
            self.flows.refuse(now, ev.fid)
            self.flush()
            return
        r = TcpRelay(self, ev.fid, (host, ev.dst_port))
        self.relays[ev.fid] = r
        r.start_outbound(self._nursery)

    def _udp(self, ev: F.UdpDatagram) -> None:
        r = self.relays.get(ev.fid)
        if r is None:
            if not ev.new:
                return                  # a flow we already gave up
            host = self.host_addr(ev.dst_ip)
            if host is None:
                self.count("udp_no_host_mapping")
                self.flows.unreachable(self.now(), ev.fid, icmpw.UNREACH_PORT)
                self.flows.release(self.now(), ev.fid)
                self.flush()
                return
            try:
                r = UdpRelay.outbound(self, ev.fid, (host, ev.dst_port))
            except OSError as e:
                self._socket_failed("udp", e, ev.fid)
                return
            self.relays[ev.fid] = r
            r.start(self.reactor)
        r.from_guest(ev.payload)
        if r.sock is not None:
            self.expect_answer(r)
            xp = self.express
            if xp is not None and r.xslot is None and not r.closed:
                # The flow's next datagrams go straight from the TX ring to r's socket.
                xp.add(r, ev.guest_ip, ev.guest_port, ev.dst_ip, ev.dst_port)

    def _icmp(self, ev: F.IcmpEcho) -> None:
        r = self.relays.get(ev.fid)
        if r is None:
            if not ev.new:
                return
            try:
                r = PingRelay(self, ev.fid, ip_text(ev.dst_ip))
            except OSError as e:
                if isinstance(e, PermissionError):
                    self.count("icmp_ping_socket_denied")
                    self.rlog.warning(
                        "ping_denied",
                        "ICMP echo to %s: unprivileged ping sockets are not allowed here "
                        "(sysctl net.ipv4.ping_group_range = %s does not include our group); "
                        "the guest's pings beyond the gateway go unanswered",
                        ip_text(ev.dst_ip), _ping_range())
                    self.flows.release(self.now(), ev.fid)
                    return
                self._socket_failed("icmp", e, ev.fid)
                return
            self.relays[ev.fid] = r
            r.start(self.reactor)
        r.from_guest(ev.seq, ev.payload)
        self.expect_answer(r)

    def _socket_failed(self, what: str, e: OSError, fid: int) -> None:
        """No host socket for a datagram flow (EMFILE, ENOBUFS...): drop it."""
        self.count(f"{what}_socket_error")
        self.rlog.warning(f"{what}_socket", "%s: cannot open a host socket: %s", what, e)
        self.flows.release(self.now(), fid)

    def forget(self, fid: int) -> None:
        self.relays.pop(fid, None)
        if self._udp_in:                # inbound UDP forwards' flows (a TCP relay is none)
            for k, v in list(self._udp_in.items()):
                if v == fid:
                    del self._udp_in[k]

    # ----------------------------------------------- inbound (forwards)
    def inbound_tcp(self, sock: socket.socket, peer, guest_ip: str, guest_port: int) -> bool:
        """A host connection to a TCP forward: open one to the guest. False: refused."""
        if self._nursery is None:
            return False
        try:
            fid = self.flows.connect(self.now(), _ip(guest_ip), guest_port)
        except (ConnectionError, OSError, ValueError) as e:
            self.count("forward_tcp_refused")
            self.rlog.warning("fwd_refused", "forward to guest port %d refused: %s", guest_port, e)
            return False
        self.flush()
        self.relays[fid] = TcpRelay(self, fid, peer, sock=sock)   # pumps once the guest accepts
        return True

    def inbound_udp(self, lsock: socket.socket, peer, data: bytes, guest_ip: str,
                    guest_port: int) -> bool:
        key = (lsock.fileno(), peer, guest_port)
        fid = self._udp_in.get(key)
        r = self.relays.get(fid) if fid is not None else None
        if r is None:
            try:
                fid = self.flows.udp_open(self.now(), _ip(guest_ip), guest_port)
            except OSError:
                self.count("forward_udp_refused")
                return False
            r = UdpRelay.inbound(self, fid, lsock, peer)
            self.relays[fid] = r
            self._udp_in[key] = fid
        self.flows.udp_send(self.now(), fid, data)
        self.flush()
        return True

    # -------------------------------------------------------------- stats
    def snapshot(self) -> dict:
        out = {"counters": dict(sorted(self.counters.items())), "relays": len(self.relays)}
        if self.express is not None:
            out["express"] = self.express.snapshot()
        return out


def _ip(text: str) -> bytes:
    return socket.inet_aton(text)


def _ping_range() -> str:
    try:
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            return "'" + " ".join(f.read().split()) + "'"
    except OSError:
        return "(unreadable)"
