"""Built-in UDP services: echo (RFC 862, port 7) and discard (RFC 863, port 9).

Echo never answers a port-0 or non-unicast source, so it cannot be turned
into a reflector by spoofed or broadcast traffic.
"""
from __future__ import annotations

__all__ = ["install", "ECHO_PORT", "DISCARD_PORT"]

ECHO_PORT = 7
DISCARD_PORT = 9


def _echo(sock, payload, src_ip, src_port, dst_ip):
    b0 = src_ip[0]
    if src_port == 0 or not (0 < b0 < 224 and b0 != 127):
        return
    sock.send(payload, src_ip, src_port, src_ip=dst_ip)


def _discard(sock, payload, src_ip, src_port, dst_ip):
    pass


def install(udp_layer, ip: bytes) -> list:
    return [udp_layer.bind(ECHO_PORT, _echo, ip=ip),
            udp_layer.bind(DISCARD_PORT, _discard, ip=ip)]
