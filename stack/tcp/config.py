"""Tunables of the TCP layer, shared by all its connections.

Defaults follow Linux where it has a documented value (200 ms min RTO,
15 data retries, 6 SYN retries, 40 ms delayed ACK) and this project's needs
elsewhere: 256 KiB buffers so a Linux guest can fill a fast path, and a 30 s
MSL so TIME_WAIT (2*MSL) is short for a user-mode network.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TcpConfig"]


@dataclass
class TcpConfig:
    mss: int = 1460                 # what we advertise, and the cap on what we send (MTU 1500)
    sndbuf: int = 256 * 1024
    rcvbuf: int = 256 * 1024
    # A send buffer the peer empties as fast as it is filled (every byte in
    # flight, the peer's window and cwnd larger) doubles up to sndbuf_max,
    # as Linux grows its up to tcp_wmem[2]: with 256 KiB and a slow guest's
    # RTT of a millisecond or more, the buffer caps a download at ~1.5 Gbit/s
    # (docs/benchmarks.md, "The send buffer grows"). All connections' growth
    # together stays within sndbuf_grow_total, so what a guest can make the
    # layer hold rises by that much at most.
    sndbuf_max: int = 1024 * 1024
    sndbuf_grow_total: int = 64 * 1024 * 1024
    timestamps: bool = True         # RFC 7323
    window_scaling: bool = True     # RFC 7323
    sack: bool = True               # RFC 2018
    msl: float = 30.0               # TIME_WAIT lasts 2*MSL
    max_time_wait: int = 512        # oldest TIME_WAIT is dropped beyond this
    # All connections in any state. With 256 KiB each way this caps what a
    # guest can make the TCP layer buffer at 1024 * 512 KiB = 512 MiB, plus
    # sndbuf_grow_total. A Stack
    # with NAT flows raises it to its flow cap + TIME-WAIT + services
    # (stack/interface.py _tcp_config_for); the flow cap then bounds the buffers.
    max_connections: int = 1024
    syn_retries: int = 6
    max_retries: int = 15           # data retransmissions / unanswered probes before abort
    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 60.0
    delack: float = 0.04            # delayed-ACK timeout (RFC 9293 allows up to 0.5 s)
    fin_timeout: float = 180.0      # FIN-WAIT-2 idle limit; > 2 * max_rto so a live but
                                    # backed-off peer is not cut off (Linux: 60 s, orphans only)
    ooo_max_ranges: int = 32        # out-of-order ranges per connection
    challenge_ack_limit: int = 1000  # RFC 5961 challenge ACKs per second, whole layer
    # How long a SYN may be held unanswered (NAT: while the host connects).
    # Longer than Linux's connect() gives up (tcp_syn_retries = 6: 127 s), so
    # the host side's verdict normally comes first.
    hold_timeout: float = 130.0
    keepalive_idle: float = 7200.0  # defaults for set_keepalive(True)
    keepalive_interval: float = 75.0
    keepalive_count: int = 9

    def __post_init__(self) -> None:
        if not 88 <= self.mss <= 65495:
            raise ValueError(f"TCP MSS {self.mss} out of range 88..65495")
        for name in ("sndbuf", "rcvbuf", "sndbuf_max"):
            v = getattr(self, name)
            if not 4096 <= v <= 1 << 30:
                raise ValueError(f"TCP {name} {v} out of range 4 KiB..1 GiB")
        if self.sndbuf_max < self.sndbuf:
            raise ValueError(f"TCP sndbuf_max {self.sndbuf_max} below sndbuf {self.sndbuf}")
        if not 0 <= self.sndbuf_grow_total <= 1 << 40:
            raise ValueError(f"TCP sndbuf_grow_total {self.sndbuf_grow_total} out of range")
        if self.msl < 0 or self.min_rto <= 0 or self.max_rto < self.min_rto:
            raise ValueError("bad TCP timer settings")
