"""One NAT'ed TCP connection: a host socket and a stack flow, bytes both ways.

Outbound (the guest's SYN, held by the stack): connect on the host, then
accept the SYN (the SYN-ACK goes to the guest only once the host said yes)
or refuse it: ECONNREFUSED -> RST; EHOSTUNREACH/ENETUNREACH -> ICMP
unreachable; no answer within the connect timeout -> ICMP host unreachable
(like a router that gave up on ARP). Inbound (a forward): the host socket
exists; the stack connects to the guest, and the relay starts once the
guest accepts (a RST from the guest closes the host socket with a RST).

Then bytes move both ways, each bounded by the far side's appetite:
* host -> guest reads at most `send_space` (the room the guest's window
  leaves in the stack's send buffer), so a slow guest leaves bytes in the
  host kernel and the host sender's window closes;
* guest -> host peeks the stack's receive buffer, sends what the host
  socket takes, and consumes exactly that much, so a slow host reader
  closes the window the stack advertises to the guest.
No task does this: the socket is registered once with the proxy's reactor
(reactor.py, edge-triggered epoll), whose events and the stack's flow
events (TcpReadable, TcpWritable, TcpEof) call the relay, which reads or
writes until the socket would block or the far side has no room. Two flags
remember readiness between edges. EPOLLOUT joins the registration only
once a send would block, and the socket leaves the epoll once both
directions are closed: until then each would be an edge, and a reactor
pass, for nothing. Latency (issue 12's profile): the host
connect starts in the proxy's step that saw the SYN, and a loopback
connect is complete when connect() returns, so the SYN-ACK goes to the
guest in that same step; only a connect still in progress gets a task, to
wait for it under the connect timeout. A host read goes into the stack and
out to the guest in the reactor's step, with no scheduler pass between.
The host's answer to the guest's bytes, and its FIN after the guest's
(SHUT_WR), are looked for by HostProxy.spin before the step ends.

EOF maps to FIN both ways (shutdown(SHUT_WR) on the host socket after the
guest's FIN; close() in the stack after the host's EOF). A reset either way
is a reset on the other: an error on the host socket aborts the flow (RST
to the guest); a RST from the guest closes the host socket with SO_LINGER 0
so the host peer sees a RST too.
"""
from __future__ import annotations

import errno
import select
import socket
import struct

import trio

from stack import flows as F
from stack.wire import icmp as icmpw

__all__ = ["TcpRelay", "RECV_CHUNK", "SEND_CHUNK"]

RECV_CHUNK = 256 * 1024         # at most this much per host read (and never past send_space)
SEND_CHUNK = 256 * 1024         # at most this much offered per host write
_LINGER_RST = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST (socket(7))

# connect() errors that are an ICMP error for the guest (RFC 1122 3.2.2.1 codes).
_UNREACH = {errno.EHOSTUNREACH: icmpw.UNREACH_HOST, errno.ENETUNREACH: icmpw.UNREACH_NET,
            errno.EHOSTDOWN: icmpw.UNREACH_HOST}


class TcpRelay:
    def __init__(self, proxy, fid: int, remote, sock: socket.socket | None = None):
        self.p = proxy
        self.fid = fid
        self.remote = remote
        self.sock = sock                # the host socket (non-blocking), ours to close
        if sock is not None:
            sock.setblocking(False)
        # The in-progress connect's task, if any (a loopback connect has none:
        # no scope to make, and nothing to tell trio about at close).
        self.scope: trio.CancelScope | None = None
        self.pumping = False            # registered with the reactor: bytes move
        self.can_read = False           # readiness seen and not yet used up (edge-triggered)
        self.can_write = False
        self.registered = False         # the socket is in the reactor's epoll
        self.out_events = False         # ... with EPOLLOUT (only once a send would block)
        self.host_eof = False
        self.read_bytes = 0             # from the host socket, so far
        self.guest_eof = False
        self.shut = False               # SHUT_WR sent after the guest's FIN
        self.reset = False
        self.closed = False

    # ------------------------------------------------------- from the proxy
    def event(self, ev) -> None:
        t = type(ev)
        if t is F.TcpReadable:
            self._guarded(self._to_host)
        elif t is F.TcpWritable:
            self._guarded(self._to_guest)
        elif t is F.TcpEof:
            self.guest_eof = True
            self._guarded(self._to_host)
        elif t is F.TcpEstablished:
            # Inbound: the guest accepted. Outbound relays pump (and are
            # described) since the host connect; the guest's ACK changes nothing.
            if not self.pumping:
                self._describe()
                self._start_pumps()
        elif t is F.TcpReset:
            self.reset = True
            self._end()
        elif t is F.TcpClosed:
            self._end()

    def _end(self) -> None:
        self._cancel_connect()
        self.close()
        self.p.forget(self.fid)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        s = self.sock
        if s is None:
            return
        if self.registered:
            self.registered = False
            self.p.reactor.remove(s.fileno())
        if self.scope is not None:
            try:
                trio.lowlevel.notify_closing(s)     # the connect task may be waiting on it
            except RuntimeError:
                pass
        if self.reset:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        s.close()

    # ----------------------------------------------------------- outbound
    def start_outbound(self, nursery) -> None:
        """Called by the proxy on the guest's SYN: connect now; a connect that
        completes at once (loopback) is accepted here, in the proxy's step."""
        p = self.p
        try:
            # Non-blocking from socket(2) on: no FIONBIO ioctl of setblocking.
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | _NONBLOCK)
        except OSError as e:
            p.count("tcp_socket_error")
            p.rlog.warning("tcp_socket", "TCP: cannot open a host socket: %s", e)
            self._refuse(None)
            return
        err = self.sock.connect_ex(self.remote)
        if err == errno.EINPROGRESS:
            err = _connect_ended(self.sock)
        if err == errno.EINPROGRESS:
            self.scope = trio.CancelScope()
            nursery.start_soon(self.run_outbound)
        elif self._connected(err):
            self._start_pumps()

    def _cancel_connect(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    def _connected(self, err: int) -> bool:
        """Accept or refuse the guest's SYN after the host connect ended with ERR."""
        if err:
            code = _UNREACH.get(err)
            self.p.count("tcp_connect_refused" if code is None else "tcp_connect_unreachable")
            self._refuse(code)
            return False
        self.p.flows.accept(self.p.now(), self.fid)
        self.p.flush()
        self._describe()
        return True

    async def run_outbound(self) -> None:
        """A connect still in progress: wait for it (at most the connect timeout)."""
        p = self.p
        with self.scope:
            try:
                with trio.fail_after(p.config.connect_timeout):
                    await trio.lowlevel.wait_writable(self.sock)
            except trio.TooSlowError:
                p.count("tcp_connect_timeout")
                self._refuse(icmpw.UNREACH_HOST)
                return
            except OSError as e:            # the socket went away under us
                self._connected(e.errno or errno.EHOSTUNREACH)
                return
            if self._connected(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)):
                self._start_pumps()

    def _refuse(self, icmp_code) -> None:
        self.p.flows.refuse(self.p.now(), self.fid, icmp_code)
        self.p.flush()
        self.close()
        self.p.forget(self.fid)

    def _describe(self) -> None:
        # Told lazily: the two syscalls only when someone asks (stats), not
        # once per connection (issue 12's connect/close race).
        self.p.flows.describe(self.fid, self.host_side)

    def host_side(self) -> str:
        """The host socket's local -> peer addresses ("" once it is gone)."""
        try:
            a, b = self.sock.getsockname(), self.sock.getpeername()
        except (OSError, AttributeError):
            return ""
        return f"{a[0]}:{a[1]}->{b[0]}:{b[1]}"

    # ---------------------------------------------------------- the pumps
    def _start_pumps(self) -> None:
        if self.closed or self.pumping:
            return
        if self.fid not in self.p.relays:
            return                          # refused or ended meanwhile
        try:
            self.p.reactor.add(self.sock.fileno(), self._on_socket, _EDGE_IN)
        except (OSError, ValueError) as e:  # ENOMEM/ENOSPC from epoll: give the flow up
            self._guarded_error(e)
            return
        self.pumping = self.registered = True
        # Registration reports the current state as an edge: bytes the host
        # has sent already come as EPOLLIN (a recv now would find none, on
        # a connect just made, and cost a syscall per connection). Whatever
        # the guest has already sent need not wait for an edge.
        self.can_write = True
        self._guarded(self._to_host)

    def _want_out(self) -> None:
        """A send would block: from now on the socket's EPOLLOUT edges count.
        Until then they are left out of the registration: a socket that
        takes every send has room at every edge, and each ACK from the host
        peer that frees room is an edge, a reactor pass for nothing (issue
        12: two per NATed connection). Added, EPOLL_CTL_MOD reports the
        socket at once if it has room again by then (epoll(7))."""
        if not self.out_events and self.registered:
            self.out_events = True
            self.p.reactor.modify(self.sock.fileno(), _EDGE_IN | select.EPOLLOUT)

    def _leave_reactor_if_done(self) -> None:
        """Both directions ended (the host's EOF read, the guest's FIN passed
        on with SHUT_WR): the socket has nothing more to say that the flow
        needs, but it stays readable and hung up (EPOLLIN, EPOLLHUP), an
        edge at each wake-up until the guest's last ACK ends the flow. Out
        of the epoll now, not at close()."""
        if self.host_eof and self.shut and self.registered:
            self.registered = False
            self.p.reactor.remove(self.sock.fileno())

    def _on_socket(self, events: int) -> None:
        if events & _READ_EVENTS:
            self.can_read = True
            self._guarded(self._to_guest)
        if events & _WRITE_EVENTS:
            self.can_write = True
            self._guarded(self._to_host)

    def _guarded(self, direction) -> None:
        if self.closed or not self.pumping:
            return
        try:
            direction()
        except OSError as e:
            self._guarded_error(e)

    def _guarded_error(self, e: OSError) -> None:
        # ECONNRESET, EPIPE, ETIMEDOUT...: the host side is gone; tell the guest.
        self.p.count("tcp_host_reset" if e.errno in (errno.ECONNRESET, errno.EPIPE)
                     else "tcp_host_error")
        self.p.flows.abort(self.p.now(), self.fid)
        self.p.flush()
        self.reset = True
        self._cancel_connect()
        self.close()
        self.p.forget(self.fid)

    def receive_one(self) -> bool | None:
        """HostProxy.spin's look for an answer: True if host bytes went into the
        stack, False if none are there yet, None if the relay ended."""
        if self.closed or not self.pumping or self.host_eof:
            return None
        self.can_read = True            # edge-triggered: a look we make ourselves
        before = self.read_bytes
        self._guarded(self._to_guest)
        if self.read_bytes > before:
            return True
        return None if self.closed or self.host_eof else False

    def _to_guest(self) -> None:
        """Host bytes into the stack while the socket has some and the guest has room."""
        p, flows, fid, s = self.p, self.p.flows, self.fid, self.sock
        while self.can_read and not self.host_eof:
            space = flows.send_space(fid)
            if space <= 0:
                return                      # TcpWritable calls again
            try:
                data = s.recv(min(space, RECV_CHUNK))
            except (BlockingIOError, InterruptedError):
                self.can_read = False
                return
            if not data:
                self.host_eof = True
                flows.close(p.now(), fid)
                p.flush()
                self._leave_reactor_if_done()
                return
            self.read_bytes += len(data)
            flows.send(p.now(), fid, data)
            p.flush()
            if self.closed:
                return

    def _to_host(self) -> None:
        """The guest's bytes out to the host while it takes them; its FIN after them."""
        p, flows, fid, s = self.p, self.p.flows, self.fid, self.sock
        while self.can_write:
            n = flows.readable(fid)
            if not n:
                if self.guest_eof and not self.shut:
                    self.shut = True
                    s.shutdown(socket.SHUT_WR)
                    # A host that closes on EOF (most do) answers with its FIN
                    # at once on loopback: caught by the spin, it goes out with
                    # the ACK of the guest's FIN, one segment and step (issue 12).
                    p.expect_answer(self)
                    self._leave_reactor_if_done()
                return
            try:
                sent = s.send(flows.peek(fid, min(n, SEND_CHUNK)))
            except (BlockingIOError, InterruptedError):
                self.can_write = False
                self._want_out()
                return
            flows.consume(p.now(), fid, sent)
            p.expect_answer(self)
            p.flush()
            if self.closed:
                return


# The registration (epoll(7), edge-triggered); EPOLLERR and EPOLLHUP are always reported.
_EDGE_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_NONBLOCK = socket.SOCK_NONBLOCK   # socket(2), Linux


def _connect_ended(sock: socket.socket) -> int:
    """How a non-blocking connect that said EINPROGRESS stands now: 0 if
    connected, its error if it failed, EINPROGRESS if it goes on. On
    loopback the handshake is done by the time connect() returns, so the
    common case costs one getpeername (ENOTCONN until connected, connect(2))."""
    try:
        sock.getpeername()
        return 0
    except OSError:
        pass
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.EINPROGRESS
