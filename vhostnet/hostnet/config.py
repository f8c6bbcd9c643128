"""What the host network is allowed to do, and the bundle the composition root passes on.

`HostNetConfig` holds the user's choices (--restrict, --no-services,
--no-map-host-loopback, caps); `HostNet` adds the server-level forwards
table and makes one `HostProxy` per guest connection.

File descriptors: every flow can hold one host socket, so the flow caps are
checked against RLIMIT_NOFILE at start. The soft limit is raised to the hard
one if needed; if that is still short, the caps are cut to fit (and logged),
so a guest can never make the backend run out of descriptors.
"""
from __future__ import annotations

import logging
import resource
from dataclasses import dataclass, field

from stack.flows import FlowConfig

__all__ = ["HostNetConfig", "HostNet", "FD_RESERVE", "DEFAULT_ANSWER_SPIN"]

log = logging.getLogger("vhostnet.hostnet")

#: Descriptors kept for everything else: vhost-user, eventfds, memfds, control, logs.
FD_RESERVE = 256
#: After the guest's datagrams leave, how long HostProxy.spin() waits, in the
#: device's step, for the host's answers (a loopback echo answers in 10-30 µs
#: here), so a request/response flow skips a wake-up per answer (issue 12).
DEFAULT_ANSWER_SPIN = 50e-6


@dataclass
class HostNetConfig:
    restrict: bool = False              # nothing outbound but forwards (slirp restrict=on)
    services: bool = True               # built-in echo/discard/chargen on the gateway
    map_host_loopback: bool = True      # gateway address -> 127.0.0.1 (slirp's default)
    connect_timeout: float = 30.0       # a host connect() that takes longer: host unreachable
    answer_spin: float = DEFAULT_ANSWER_SPIN   # seconds; 0: never wait (--nat-spin-us)
    express: bool = True                # the UDP express (express.py); False: --no-express
    flows: FlowConfig = field(default_factory=FlowConfig)

    def __post_init__(self) -> None:
        self.flows.outbound = not self.restrict
        fit_to_fd_limit(self.flows)


def fit_to_fd_limit(fc: FlowConfig) -> None:
    need = fc.max_tcp + fc.max_udp + fc.max_icmp + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        room = max(soft - FD_RESERVE, 16)
        scale = room / (fc.max_tcp + fc.max_udp + fc.max_icmp)
        fc.max_tcp = max(int(fc.max_tcp * scale), 4)
        fc.max_udp = max(int(fc.max_udp * scale), 4)
        fc.max_icmp = max(int(fc.max_icmp * scale), 1)
        fc.max_half_open = min(fc.max_half_open, fc.max_tcp)
        log.warning("RLIMIT_NOFILE is %d: NAT caps cut to %d TCP, %d UDP, %d ICMP flows",
                    soft, fc.max_tcp, fc.max_udp, fc.max_icmp)


class HostNet:
    """Config + forwards; `make_proxy(flows)` for each guest connection."""

    def __init__(self, config: HostNetConfig, forwards):
        self.config = config
        self.forwards = forwards

    def make_proxy(self, flows, gateway_ip: bytes, guest_ip: bytes):
        from .proxy import HostProxy
        return HostProxy(flows, self.config, self.forwards, gateway_ip=gateway_ip,
                         guest_ip=guest_ip, spin_max=self.config.answer_spin)

    async def serve(self, task_status=None) -> None:
        import trio
        await self.forwards.serve(task_status=task_status or trio.TASK_STATUS_IGNORED)
