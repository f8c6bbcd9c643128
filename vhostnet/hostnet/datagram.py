"""NAT'ed UDP flows and ICMP echo: one host socket per flow.

UDP outbound: a socket connect()ed to the flow's destination, so only that
peer's replies come back (the kernel filters the rest) and an ICMP port
unreachable from the host's side shows up as ECONNREFUSED, which goes back
to the guest as ICMP port unreachable. UDP inbound (a forward): no socket of
its own; replies go out of the forward's listening socket to the peer that
opened the flow. Sends never wait: a datagram the host socket cannot take
right now is dropped and counted, as a router would.

ICMP echo: an unprivileged ping socket (SOCK_DGRAM, IPPROTO_ICMP; Linux
net.ipv4.ping_group_range decides who may open one). The kernel picks the
echo identifier and filters replies by it; the stack puts the guest's own
identifier back.

Receiving: no task per flow. Each outbound flow's socket is registered with
the proxy's reactor (reactor.py), level-triggered: a socket with datagrams
left after its pass's DATAGRAM_BUDGET is reported again on the next pass, so a
host that floods one flow gets a bounded share and the loop a checkpoint
between passes (issue 12: a task per flow cost a scheduler pass and two
epoll_ctl calls per datagram that missed the answer spin).

Flows end when the stack says so (idle timeout, stack/flows.py): the socket
leaves the reactor and closes.
"""
from __future__ import annotations

import errno
import select
import socket
import struct

from stack import flows as F
from stack.wire import icmp as icmpw

__all__ = ["UdpRelay", "PingRelay"]

UDP_MAX_DATAGRAM = 65535 - 20 - 8           # RFC 768 over IPv4
ICMP_ECHO = struct.Struct("!BBHHH")         # RFC 792: type, code, checksum, id, seq
#: Datagrams taken from one socket per reactor pass (then the other sockets, then a checkpoint).
DATAGRAM_BUDGET = 16
#: Level-triggered (epoll(7)): what is left after a pass's budget is reported again.
READABLE = select.EPOLLIN | select.EPOLLERR


class _DatagramRelay:
    def __init__(self, proxy, fid: int):
        self.p = proxy
        self.fid = fid
        self.sock: socket.socket | None = None
        self.closed = False
        self.xslot = None       # its entry in the proxy's UDP express, while it has one

    def event(self, ev) -> None:
        if type(ev) in (F.UdpEnded, F.IcmpEnded):
            self.close()
            self.p.forget(self.fid)

    def start(self, reactor) -> None:
        """Datagrams from the host reach the stack from now on."""
        reactor.add(self.sock.fileno(), self._on_socket, READABLE)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.xslot is not None:
                self.p.express.remove(self)    # before close: C must never send on a closed fd
            if self.sock is not None:
                r = self.p.reactor
                if r is not None:
                    r.remove(self.sock.fileno())   # before close: the number may be reused
                self.sock.close()

    # (counter, rate-limit key, message) for a failed recv; and what a
    # datagram from the host becomes: the subclass's.
    RECV_ERROR = ("datagram_recv_error", "dgram_recv", "recv from the host failed: %s")

    def _deliver(self, data: bytes) -> None:
        raise NotImplementedError

    def _refused_by_host(self) -> None:
        self.p.count(self.RECV_ERROR[0])

    def _on_socket(self, _events: int) -> None:
        """The reactor saw the socket readable: up to DATAGRAM_BUDGET datagrams into the stack."""
        got = False
        for _ in range(DATAGRAM_BUDGET):
            res = self.receive_one()
            if res is False or self.closed:
                break
            got = True
        if got:
            self.p.flush()

    def receive_one(self) -> bool | None:
        """One datagram from the host socket into the stack, if one is there.
        True: delivered (the caller flushes); False: nothing yet; None: an error, counted."""
        p = self.p
        try:
            data = self.sock.recv(UDP_MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionRefusedError:
            self._refused_by_host()
            return None
        except OSError as e:
            counter, key, message = self.RECV_ERROR
            p.count(counter)
            p.rlog.warning(key, message, e)
            return None
        self._deliver(data)
        return True

    def _send(self, data, addr=None) -> None:
        try:
            if addr is None:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.p.count("datagram_send_dropped")
        except OSError as e:
            self.send_failed(e)

    def send_failed(self, e: OSError) -> None:
        """A send to the host socket failed with E (not a full buffer): here, or
        in the UDP express (express.py settles its failures here)."""
        if isinstance(e, ConnectionRefusedError):
            self._refused()
            return
        self.p.count("datagram_send_error")
        self.p.rlog.warning("dgram_send", "datagram to the host failed: %s", e)
        code = {errno.EHOSTUNREACH: icmpw.UNREACH_HOST,
                errno.ENETUNREACH: icmpw.UNREACH_NET}.get(e.errno)
        if code is not None:
            self.p.flows.unreachable(self.p.now(), self.fid, code)
            self.p.flush()

    def _refused(self) -> None:
        self.p.count("udp_port_unreachable")
        self.p.flows.unreachable(self.p.now(), self.fid, icmpw.UNREACH_PORT)
        self.p.flush()


class UdpRelay(_DatagramRelay):
    @classmethod
    def outbound(cls, proxy, fid: int, remote) -> "UdpRelay":
        r = cls(proxy, fid)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.connect(remote)
            a, b = s.getsockname(), s.getpeername()
        except OSError:
            s.close()
            raise
        r.sock = s
        r.peer = None
        proxy.flows.describe(fid, f"{a[0]}:{a[1]}->{b[0]}:{b[1]}")
        return r

    @classmethod
    def inbound(cls, proxy, fid: int, lsock: socket.socket, peer) -> "UdpRelay":
        r = cls(proxy, fid)
        r.sock = None
        r.lsock = lsock
        r.peer = peer
        a = lsock.getsockname()
        proxy.flows.describe(fid, f"{peer[0]}:{peer[1]}->{a[0]}:{a[1]}")
        return r

    def from_guest(self, payload: bytes) -> None:
        if self.peer is None:
            self._send(payload)
        else:
            try:
                self.lsock.sendto(payload, self.peer)
            except (BlockingIOError, InterruptedError):
                self.p.count("datagram_send_dropped")
            except OSError as e:
                self.p.count("datagram_send_error")
                self.p.rlog.warning("dgram_send", "UDP forward reply failed: %s", e)

    RECV_ERROR = ("datagram_recv_error", "dgram_recv", "UDP from the host failed: %s")

    def _refused_by_host(self) -> None:
        self._refused()

    def _deliver(self, data: bytes) -> None:
        self.p.flows.udp_send(self.p.now(), self.fid, data)


class PingRelay(_DatagramRelay):
    def __init__(self, proxy, fid: int, dst: str):
        super().__init__(proxy, fid)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        try:
            s.setblocking(False)
            s.connect((dst, 0))
            a = s.getsockname()
        except OSError:
            s.close()
            raise
        self.sock = s
        self.dst = dst
        proxy.flows.describe(fid, f"{a[0]} id {a[1]}->{dst}")

    def from_guest(self, seq: int, payload: bytes) -> None:
        # The kernel fills in the identifier and the checksum (ping socket).
        self._send(ICMP_ECHO.pack(icmpw.ECHO_REQUEST, 0, 0, 0, seq) + payload)

    RECV_ERROR = ("icmp_recv_error", "icmp_recv", "ICMP from the host failed: %s")

    def _deliver(self, data: bytes) -> None:
        p = self.p
        if len(data) < ICMP_ECHO.size or data[0] != icmpw.ECHO_REPLY:
            p.count("icmp_unexpected")
            return
        _t, _c, _cs, _id, seq = ICMP_ECHO.unpack_from(data)
        p.flows.icmp_reply(p.now(), self.fid, seq, data[ICMP_ECHO.size:])
