"""The network services the guest sees: DHCP, DNS and TFTP, built from one
`ServicesConfig` and driven by the stack's own poll/deadline/snapshot.

The stack holds one `NetworkServices` (stack/interface.py). This object
owns the three services, merges their deadlines, runs their timers in
`poll(now)`, and queues their events for the device side, which pulls them
with `take_events()` (h11 style: nothing is pushed to the device from
inside packet processing). Events are `DnsQuery` (stack/services/dns.py).
The device answers through `dns` (`answer`/`fail`), the one service that
needs a peer outside the stack.
"""
from __future__ import annotations

from ..deadline import earliest
from .config import ServicesConfig
from .dhcp import DhcpServer
from .dns import COUNTERS as DNS_COUNTERS, DnsRelay
from .tftp import COUNTERS as TFTP_COUNTERS, TftpServer

__all__ = ["NetworkServices", "ServicesConfig", "disabled_snapshot"]


class NetworkServices:
    def __init__(self, cfg: ServicesConfig, net, udp_layer, tcp_layer, counters, clock):
        self.config = cfg
        self._events: list = []
        self.dhcp = self.dns = self.tftp = None
        if cfg.dhcp:
            self.dhcp = DhcpServer(
                udp_layer, counters, clock, server_ip=net.gateway_ip_b, dns_ip=net.dns_ip_b,
                first_ip=net.guest_ip_b, prefix_len=net.prefix_len, mtu=net.mtu,
                lease_time=cfg.lease_time, pool_size=cfg.pool_size, restrict=cfg.restrict,
                bootfile=cfg.bootfile if cfg.tftp else None)
        if cfg.dns:
            self.dns = DnsRelay(udp_layer, tcp_layer, counters, clock, self._events.append,
                                ip=net.dns_ip_b, timeout=cfg.dns_timeout,
                                max_inflight=cfg.dns_max_inflight,
                                max_tcp_conns=cfg.dns_tcp_max_conns)
        if cfg.tftp:
            self.tftp = TftpServer(udp_layer, counters, clock, cfg.tftp_files,
                                   ip=net.gateway_ip_b,
                                   max_transfers=cfg.tftp_max_transfers,
                                   max_file=cfg.tftp_max_file, timeout=cfg.tftp_timeout,
                                   retries=cfg.tftp_retries)

    def take_events(self) -> list:
        ev = self._events[:]
        self._events.clear()
        return ev

    def poll(self, now: float) -> None:
        if self.dns is not None:
            self.dns.poll(now)
        if self.tftp is not None:
            self.tftp.poll(now)

    def next_deadline(self) -> float | None:
        return earliest(None if self.dns is None else self.dns.next_deadline(),
                        None if self.tftp is None else self.tftp.next_deadline())

    def snapshot(self) -> dict:
        """Every field always present (disabled services as zeros), so that
        the stats document has one shape (docs/json.md)."""
        off = disabled_snapshot()
        return {
            "dhcp": {"enabled": True, "leases": self.dhcp.snapshot()} if self.dhcp else off["dhcp"],
            "dns": self.dns.snapshot() if self.dns else off["dns"],
            "tftp": self.tftp.snapshot() if self.tftp else off["tftp"],
        }


def disabled_snapshot() -> dict:
    """The snapshot of a stack without any of the services."""
    return {
        "dhcp": {"enabled": False, "leases": []},
        "dns": {"enabled": False, "inflight": 0, "max_inflight": 0, "tcp_connections": 0,
                **{k: 0 for k in DNS_COUNTERS}},
        "tftp": {"enabled": False, "max_transfers": 0, "transfers": [],
                 **{k: 0 for k in TFTP_COUNTERS}},
    }
