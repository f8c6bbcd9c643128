"""UDP sockets for the stack's own services (bind a port, get a callback, send).

Sans-IO: `deliver` runs the socket's callback synchronously, and `send`
hands the datagram straight to the interface's output (which may queue it
behind ARP). A socket bound to a specific address only sees unicast to that
address; a wildcard socket (ip=None) also sees broadcast/multicast, as on
Linux. Bounded: at most `max_sockets` sockets; a payload is at most 65,507
bytes (the largest that fits one IPv4 datagram).
"""
from __future__ import annotations

from typing import Callable, Optional

from .config import ip_text

__all__ = ["UdpLayer", "UdpSocket", "MAX_PAYLOAD"]

MAX_PAYLOAD = 65535 - 20 - 8

# on_datagram(sock, payload: bytes, src_ip: bytes, src_port: int, dst_ip: bytes)
OnDatagram = Callable[["UdpSocket", bytes, bytes, int, bytes], None]


class UdpSocket:
    __slots__ = ("layer", "ip", "port", "on_datagram", "rx", "tx", "closed")

    def __init__(self, layer: "UdpLayer", ip: Optional[bytes], port: int, on_datagram: OnDatagram):
        self.layer = layer
        self.ip = ip
        self.port = port
        self.on_datagram = on_datagram
        self.rx = 0
        self.tx = 0
        self.closed = False

    def send(self, payload, dst_ip: bytes, dst_port: int, src_ip: Optional[bytes] = None,
             dst_mac: Optional[bytes] = None) -> None:
        """dst_mac skips ARP: for a DHCP client that has no address yet, or broadcast."""
        if self.closed:
            raise ValueError("send on a closed UDP socket")
        src = src_ip if src_ip is not None else self.ip
        if src is None:
            src = self.layer.default_ip
        self.layer.send(src, self.port, dst_ip, dst_port, payload, dst_mac)
        self.tx += 1

    def close(self) -> None:
        self.layer.close(self)


class UdpLayer:
    def __init__(self, output, counters, default_ip: bytes, *, max_sockets: int = 256):
        # output(src_ip, dst_ip, src_port, dst_port, payload[, dst_mac])
        self._output = output
        self._c = counters
        self.default_ip = default_ip
        self.max_sockets = max_sockets
        self._socks: dict[tuple, UdpSocket] = {}
        # Sockets bound so far: a change tells the device's UDP express that a
        # gateway port it sends straight to the host may be a local one now.
        self.binds = 0

    def bind(self, port: int, on_datagram: OnDatagram, ip: Optional[bytes] = None) -> UdpSocket:
        if not 0 < port < 65536:
            raise ValueError(f"UDP port {port} out of range 1..65535")
        key = (ip, port)
        if key in self._socks:
            raise OSError(f"UDP port {port} already bound")
        if len(self._socks) >= self.max_sockets:
            raise OSError(f"too many UDP sockets (limit {self.max_sockets})")
        s = self._socks[key] = UdpSocket(self, ip, port, on_datagram)
        self.binds += 1
        return s

    def close(self, sock: UdpSocket) -> None:
        if not sock.closed:
            sock.closed = True
            self._socks.pop((sock.ip, sock.port), None)

    def deliver(self, src_ip: bytes, dst_ip: bytes, src_port: int, dst_port: int,
                payload: bytes, broadcast: bool = False) -> bool:
        """Hand a datagram to its socket; False if no socket wants it."""
        socks = self._socks
        s = None
        if not broadcast:
            s = socks.get((dst_ip, dst_port))
        if s is None:
            s = socks.get((None, dst_port))
        if s is None:
            return False
        s.rx += 1
        s.on_datagram(s, payload, src_ip, src_port, dst_ip)
        return True

    def send(self, src_ip, src_port, dst_ip, dst_port, payload, dst_mac=None) -> None:
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"UDP payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        if dst_mac is None:
            self._output(src_ip, dst_ip, src_port, dst_port, payload)
        else:
            self._output(src_ip, dst_ip, src_port, dst_port, payload, dst_mac)

    def snapshot(self) -> list[dict]:
        return [{"ip": ip_text(s.ip) if s.ip else "0.0.0.0", "port": s.port,
                 "rx": s.rx, "tx": s.tx} for s in self._socks.values()]
