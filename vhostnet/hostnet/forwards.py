"""Inbound port forwards: host sockets whose connections reach a guest port.

Spec syntax is QEMU's `hostfwd` (docs: qemu-doc "-netdev user"):

    tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT     (and udp:)

An empty HOSTADDR binds every host address (0.0.0.0), as QEMU does; an empty
GUESTADDR is the guest's address. HOSTPORT 0 takes any free port (the one
bound is shown by `forward list`), handy for tests and scripts.

`Forwards` is server-level: its listening sockets outlive a QEMU
reconnect. Sockets are bound synchronously (`add`), so a port in use is an
error at once, with the port in the message; the accept/receive loops run
in the nursery `serve` opens next to the vhost-user server. A connection
or datagram is handed to the proxy of the connected guest
(`attach`/`detach`); with no guest connected a TCP connection is closed at
once and a datagram dropped, each counted.

Bounded: at most MAX_FORWARDS forwards. Connections through them count
against the NAT's TCP flow cap (the proxy refuses past it, counted).
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass

import trio

__all__ = ["ForwardSpec", "ForwardError", "ForwardBindError", "Forwards", "MAX_FORWARDS"]

log = logging.getLogger("vhostnet.hostnet")

MAX_FORWARDS = 64
LISTEN_BACKLOG = 128            # listen(2) backlog for a TCP forward
UDP_MAX_DATAGRAM = 65535 - 20 - 8   # RFC 768 over IPv4: the largest payload

_SPEC = re.compile(r"^(?:(tcp|udp):)?([0-9.]*):(\d+)-([0-9.]*):(\d+)$")


class ForwardError(ValueError):
    """A bad spec or a forward that cannot be added/removed (message for the user)."""


class ForwardBindError(OSError):
    """The host port cannot be bound (in use, no permission...)."""


@dataclass(frozen=True)
class ForwardSpec:
    proto: str                  # "tcp" or "udp"
    host_addr: str              # "" = every address
    host_port: int              # 0 = any free port
    guest_addr: str             # "" = the guest's address
    guest_port: int

    @classmethod
    def parse(cls, text: str) -> "ForwardSpec":
        m = _SPEC.match(text.strip())
        if m is None:
            raise ForwardError(f"bad forward {text!r}: want tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT "
                               f"(QEMU hostfwd syntax), e.g. tcp:127.0.0.1:2222-:22")
        proto, haddr, hport, gaddr, gport = m.groups()
        for a in (haddr, gaddr):
            if a:
                try:
                    ipaddress.IPv4Address(a)
                except ValueError:
                    raise ForwardError(f"bad forward {text!r}: {a!r} is not an IPv4 address") from None
        hport, gport = int(hport), int(gport)
        if not 0 <= hport <= 65535:
            raise ForwardError(f"bad forward {text!r}: host port {hport} out of range 0..65535")
        if not 0 < gport <= 65535:
            raise ForwardError(f"bad forward {text!r}: guest port {gport} out of range 1..65535")
        return cls(proto or "tcp", haddr, hport, gaddr, gport)

    def __str__(self) -> str:
        return f"{self.proto}:{self.host_addr}:{self.host_port}-{self.guest_addr}:{self.guest_port}"


class _Forward:
    """One forward with its bound socket and counters."""

    def __init__(self, spec: ForwardSpec, sock: socket.socket):
        self.spec = spec
        self.sock = sock
        self.bound = sock.getsockname()
        self.scope = trio.CancelScope()
        self.accepted = 0           # connections (TCP) or datagrams (UDP) handed to the guest
        self.refused = 0            # no guest connected, or the NAT's caps

    def info(self, guest_ip: str) -> dict:
        s = self.spec
        return {"spec": str(s), "proto": s.proto, "host": f"{self.bound[0]}:{self.bound[1]}",
                "guest": f"{s.guest_addr or guest_ip}:{s.guest_port}",
                "accepted": self.accepted, "refused": self.refused}


class Forwards:
    def __init__(self, specs: list[ForwardSpec], guest_ip: str):
        self.guest_ip = guest_ip
        self._fwd: dict[ForwardSpec, _Forward] = {}
        self._nursery: trio.Nursery | None = None
        self.proxy = None               # the connected guest's HostProxy, or None
        try:
            for s in specs:
                self.add(s)
        except (ForwardError, ForwardBindError):
            self.close()
            raise

    # -------------------------------------------------------------- table
    def add(self, spec: ForwardSpec) -> dict:
        if spec in self._fwd or self._find(spec) is not None:
            raise ForwardError(f"forward {spec} exists already")
        if len(self._fwd) >= MAX_FORWARDS:
            raise ForwardError(f"too many forwards (limit {MAX_FORWARDS})")
        sock = socket.socket(socket.AF_INET,
                             socket.SOCK_STREAM if spec.proto == "tcp" else socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((spec.host_addr or "0.0.0.0", spec.host_port))
            if spec.proto == "tcp":
                sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            why = "address in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise ForwardBindError(f"cannot bind {spec.proto} {spec.host_addr or '0.0.0.0'}:"
                               f"{spec.host_port} for forward {spec}: {why}") from None
        f = self._fwd[spec] = _Forward(spec, sock)
        if self._nursery is not None:
            self._nursery.start_soon(self._loop, f)
        log.info("forward %s: host %s:%d -> guest port %d", spec, *f.bound, spec.guest_port)
        return f.info(self.guest_ip)

    def remove(self, spec: ForwardSpec) -> dict:
        f = self._find(spec)
        if f is None:
            raise ForwardError(f"no forward {spec}; `vhostnet forward list` shows them")
        del self._fwd[f.spec]
        info = f.info(self.guest_ip)
        f.scope.cancel()
        self._close_sock(f)
        log.info("forward %s removed", f.spec)
        return info

    def list(self) -> list[dict]:
        return [f.info(self.guest_ip) for f in self._fwd.values()]

    def _find(self, spec: ForwardSpec) -> _Forward | None:
        """A forward matches on protocol and host side (a port 0 spec matches
        the port it was given)."""
        for f in self._fwd.values():
            s = f.spec
            if s.proto == spec.proto and s.host_addr == spec.host_addr and \
                    spec.host_port in (s.host_port, f.bound[1]) and \
                    (spec.host_port != 0 or s == spec):
                return f
        return None

    def close(self) -> None:
        for f in self._fwd.values():
            f.scope.cancel()
            self._close_sock(f)
        self._fwd.clear()

    @staticmethod
    def _close_sock(f: _Forward) -> None:
        try:
            trio.lowlevel.notify_closing(f.sock)
        except RuntimeError:
            pass                        # not inside trio (closing before serve)
        f.sock.close()

    # --------------------------------------------------------------- loops
    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                for f in self._fwd.values():
                    n.start_soon(self._loop, f)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.close()

    async def _loop(self, f: _Forward) -> None:
        with f.scope:
            try:
                if f.spec.proto == "tcp":
                    await self._accept_loop(f)
                else:
                    await self._udp_loop(f)
            except (OSError, trio.ClosedResourceError) as e:
                if f.spec in self._fwd:
                    log.warning("forward %s stopped: %s", f.spec, e)

    def _guest(self, f: _Forward) -> tuple[str, int]:
        return f.spec.guest_addr or self.guest_ip, f.spec.guest_port

    async def _accept_loop(self, f: _Forward) -> None:
        while True:
            await trio.lowlevel.wait_readable(f.sock)
            try:
                conn, peer = f.sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    f.refused += 1
                    log.warning("forward %s: out of file descriptors", f.spec)
                    await trio.sleep(0.1)   # let flows close before accepting again
                    continue
                raise
            proxy = self.proxy
            if proxy is None or not proxy.inbound_tcp(conn, peer, *self._guest(f)):
                f.refused += 1
                conn.close()
                continue
            f.accepted += 1

    async def _udp_loop(self, f: _Forward) -> None:
        while True:
            await trio.lowlevel.wait_readable(f.sock)
            try:
                data, peer = f.sock.recvfrom(UDP_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                if e.errno == errno.ECONNREFUSED:
                    continue            # an earlier reply to a peer that went away
                raise
            proxy = self.proxy
            if proxy is None or not proxy.inbound_udp(f.sock, peer, data, *self._guest(f)):
                f.refused += 1
                continue
            f.accepted += 1
