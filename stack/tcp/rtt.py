"""Retransmission timeout estimation (RFC 6298).

srtt/rttvar are updated from each RTT sample with the standard gains
(alpha 1/8, beta 1/4); RTO = srtt + max(G, 4*rttvar), clamped to
[min_rto, max_rto]. Linux's 200 ms floor replaces RFC 6298's 1 s (2.4 allows
a lower bound); the ceiling is 60 s.

Exponential backoff (5.5) is kept as a separate shift so that a new sample
restores the computed RTO at once. Where samples come from (Karn's rule or
timestamps, RFC 7323 section 4) is the connection's business: this class only
averages what it is given. Limit: no per-window sample scaling (RFC 7323
appendix G); with timestamps every ACK is a sample, which makes rttvar decay
faster than with one sample per RTT, as in Linux.
"""
from __future__ import annotations

__all__ = ["RttEstimator"]


class RttEstimator:
    __slots__ = ("srtt", "rttvar", "base_rto", "backoff", "min_rto", "max_rto",
                 "granularity", "samples")

    def __init__(self, initial_rto: float = 1.0, min_rto: float = 0.2,
                 max_rto: float = 60.0, granularity: float = 0.001):
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.base_rto = initial_rto      # RFC 6298 2.1 (1 s, as in Linux)
        self.backoff = 0
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity
        self.samples = 0

    def sample(self, r: float) -> None:
        if r < 0:
            return
        srtt = self.srtt
        if srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(srtt - r)
            self.srtt = 0.875 * srtt + 0.125 * r
        rto = self.srtt + max(self.granularity, 4 * self.rttvar)
        self.base_rto = min(max(rto, self.min_rto), self.max_rto)
        self.backoff = 0
        self.samples += 1

    @property
    def rto(self) -> float:
        """The timeout to arm now, backoff included."""
        return min(self.base_rto * (1 << self.backoff), self.max_rto)

    def on_timeout(self) -> None:
        """RFC 6298 5.5: double the RTO (the 60 s ceiling bounds the shift)."""
        if self.base_rto * (1 << self.backoff) < self.max_rto:
            self.backoff += 1
