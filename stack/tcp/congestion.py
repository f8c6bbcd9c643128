"""Congestion control: slow start, congestion avoidance (RFC 5681) and NewReno
fast recovery (RFC 6582), counted in bytes.

The window logic is kept apart from loss detection: the connection decides
*that* a loss happened (three duplicate ACKs, SACKed bytes beyond the
duplicate threshold, or an RTO) and calls into this class, which decides how
cwnd and ssthresh move. Three sub-states, as in Linux's ca_state:

  OPEN      normal operation
  RECOVERY  fast recovery until SND.UNA passes `recover` (RFC 6582): cwnd is
            held at ssthresh and the connection's "pipe" (bytes really in the
            network, RFC 6675) limits sending, so no inflate/deflate dance
  LOSS      after an RTO until SND.UNA passes `recover`; slow start from one
            segment, and duplicate ACKs must not start a fast retransmit
            (RFC 6582 section 4 "avoid multiple fast retransmits")

Growth: slow start adds every acked byte (Linux; RFC 3465 L=2 would cripple
stretch ACKs of 64 KiB TSO segments), congestion avoidance adds one SMSS per
cwnd of acked bytes. cwnd only grows while the sender actually uses it (RFC
7661 in spirit) and never beyond `max_cwnd`. The initial window is RFC 6928's
ten segments.
"""
from __future__ import annotations

__all__ = ["NewReno", "OPEN", "RECOVERY", "LOSS"]

OPEN, RECOVERY, LOSS = "open", "recovery", "loss"


def initial_window(mss: int) -> int:
    return min(10 * mss, max(2 * mss, 14600))


class NewReno:
    __slots__ = ("mss", "cwnd", "ssthresh", "ca_state", "recover", "_ca_acc", "max_cwnd")

    def __init__(self, mss: int, max_cwnd: int = 1 << 26):
        self.mss = mss
        self.cwnd = initial_window(mss)
        self.ssthresh = 1 << 30          # "arbitrarily high" (RFC 5681 3.1)
        self.ca_state = OPEN
        self.recover = 0
        self._ca_acc = 0
        self.max_cwnd = max_cwnd

    def set_mss(self, mss: int) -> None:
        """Called once the handshake fixed the segment size."""
        self.mss = mss
        self.cwnd = initial_window(mss)

    def on_ack(self, acked: int, cwnd_limited: bool) -> None:
        """New data acked outside fast recovery."""
        if not cwnd_limited or self.ca_state == RECOVERY:
            return
        cwnd = self.cwnd
        if cwnd < self.ssthresh:
            cwnd += acked
            if cwnd > self.ssthresh:
                self._ca_acc += cwnd - self.ssthresh
                cwnd = self.ssthresh
        else:
            self._ca_acc += acked
            if self._ca_acc >= cwnd:
                self._ca_acc -= cwnd
                cwnd += self.mss
        self.cwnd = min(cwnd, self.max_cwnd)

    def enter_recovery(self, flight: int, snd_nxt: int) -> None:
        """RFC 5681 3.2 step 2/3 and RFC 6582 3.2 step 2."""
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh
        self.ca_state = RECOVERY
        self.recover = snd_nxt
        self._ca_acc = 0

    def exit_recovery(self, flight: int) -> None:
        """Full ACK (RFC 6582 3.2 step 3, option 1 with the burst guard)."""
        self.cwnd = max(min(self.ssthresh, flight + self.mss), 2 * self.mss)
        self.ca_state = OPEN

    def on_timeout(self, flight: int, snd_nxt: int) -> None:
        """RFC 5681 3.1 eq. (4): only the first timeout of a loss episode lowers ssthresh."""
        if self.ca_state != LOSS:
            self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self.ca_state = LOSS
        self.recover = snd_nxt
        self._ca_acc = 0

    def exit_loss(self) -> None:
        self.ca_state = OPEN
