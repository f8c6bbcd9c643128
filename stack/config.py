"""Addressing of the user-mode network the guest sees (QEMU user-net style)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


def mac_bytes(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes, with a clear error for anything else."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}: want six hex bytes like 52:54:00:12:34:56")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r}: want six hex bytes like 52:54:00:12:34:56") from None
    if any(len(p) not in (1, 2) for p in parts):
        raise ValueError(f"bad MAC address {text!r}")
    return raw


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def ip_bytes(text: str) -> bytes:
    try:
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        raise ValueError(f"bad IPv4 address {text!r}") from None


def ip_text(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(bytes(raw)))


@dataclass
class NetConfig:
    guest_ip: str = "10.0.2.15"
    prefix_len: int = 24
    gateway_ip: str = "10.0.2.2"
    dns_ip: str = "10.0.2.3"
    guest_mac: str = "52:54:00:12:34:56"
    gateway_mac: str = "52:55:0a:00:02:02"
    mtu: int = 1500

    # Packed forms, filled in by __post_init__ for the data path.
    guest_ip_b: bytes = field(init=False, repr=False)
    gateway_ip_b: bytes = field(init=False, repr=False)
    dns_ip_b: bytes = field(init=False, repr=False)
    guest_mac_b: bytes = field(init=False, repr=False)
    gateway_mac_b: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.guest_ip_b = ip_bytes(self.guest_ip)
        self.gateway_ip_b = ip_bytes(self.gateway_ip)
        self.dns_ip_b = ip_bytes(self.dns_ip)
        self.guest_mac_b = mac_bytes(self.guest_mac)
        self.gateway_mac_b = mac_bytes(self.gateway_mac)
        if not 0 < self.prefix_len <= 30:
            raise ValueError(f"prefix length {self.prefix_len} out of range 1..30")
        if not 576 <= self.mtu <= 65535 - 14:
            raise ValueError(f"MTU {self.mtu} out of range 576..65521")
        net = ipaddress.IPv4Network(f"{self.guest_ip}/{self.prefix_len}", strict=False)
        for name in ("gateway_ip", "dns_ip"):
            if ipaddress.IPv4Address(getattr(self, name)) not in net:
                raise ValueError(f"{name} {getattr(self, name)} is outside the guest network {net}")
        if self.guest_mac_b[0] & 1 or self.gateway_mac_b[0] & 1:
            raise ValueError("a MAC address must be unicast (low bit of the first byte clear)")

    @property
    def host_ips(self) -> tuple[bytes, ...]:
        """Addresses the stack itself answers for."""
        return (self.gateway_ip_b, self.dns_ip_b)
