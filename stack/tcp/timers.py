"""TcpConnection's timers: retransmission (RFC 6298 with backoff and give-up),
persist (zero-window probes, backed off, never giving up while the peer
answers), keepalive (off by default), delayed ACK, FIN-WAIT-2 and TIME-WAIT.

Each timer is an absolute deadline attribute (t_rtx, t_persist, t_delack,
t_keepalive, t_fw2, t_2msl) or None. `_arm` sets one and tells the layer's
heap; the layer calls `_on_timer` when the earliest may be due, which runs
whatever is due and re-registers the next deadline. Idle timers (keepalive,
FIN-WAIT-2) are checked lazily against `last_rx` instead of being re-armed on
every segment.
"""
from __future__ import annotations

from ..wire.tcp import ACK
from .common import (CLOSED, SYN_SENT, SYN_RECEIVED, FIN_WAIT_2, KEEPALIVE_STATES)
from .state import CAN_SEND, Event


class TimersMixin:
    def _arm(self, name: str, when: float) -> None:
        setattr(self, name, when)
        self._layer._schedule(self, when)

    def next_deadline(self) -> float | None:
        ts = [t for t in (self.t_rtx, self.t_persist, self.t_delack, self.t_keepalive,
                          self.t_fw2, self.t_2msl) if t is not None]
        return min(ts) if ts else None

    def _on_timer(self, now: float) -> None:
        if self.t_2msl is not None and now >= self.t_2msl:
            self.t_2msl = None
            self._set_state(Event.TIMEOUT)
        if self.t_delack is not None and now >= self.t_delack:
            self.t_delack = None
            if self.state is not CLOSED:
                self._send_ack(now)
        if self.t_rtx is not None and now >= self.t_rtx:
            self.t_rtx = None
            self._on_rto(now)
        if self.t_persist is not None and now >= self.t_persist:
            self.t_persist = None
            self._on_persist(now)
        if self.t_keepalive is not None and now >= self.t_keepalive:
            self.t_keepalive = None
            self._on_keepalive(now)
        if self.t_fw2 is not None and now >= self.t_fw2:
            self.t_fw2 = None
            if self.state is FIN_WAIT_2:
                due = self.last_rx + self._cfg.fin_timeout   # same expression both ways (floats)
                if now >= due:
                    self._give_up("FIN-WAIT-2 timeout")
                else:
                    self._arm("t_fw2", due)
        if self.state is not CLOSED:
            nd = self.next_deadline()
            if nd is not None:
                self._layer._schedule(self, nd)
        self._notify()

    def _on_rto(self, now: float) -> None:
        st = self.state
        if self.held:
            self._c["held_syn_timeouts"] += 1
            self._give_up("held SYN timed out")
            return
        if st is SYN_SENT or st is SYN_RECEIVED:
            self.retries += 1
            if self.retries > self._cfg.syn_retries:
                self._give_up("connection timed out")
                return
            self.rtt.on_timeout()
            self._c["syn_retransmits"] += 1
            self.retransmits += 1
            self._send_syn(now, st is SYN_RECEIVED)
            return
        una, nxt = self.snd_una, self.snd_nxt
        if nxt == una or st not in CAN_SEND:
            return
        self.retries += 1
        if self.retries > self._cfg.max_retries:
            self._give_up("connection timed out")
            return
        self._c["rto_timeouts"] += 1
        self.cc.on_timeout(nxt - una, nxt)
        # RFC 6298 5.4-5.6 / RFC 5681: everything outstanding is presumed
        # lost and resent from SND.UNA in slow start. SACKed ranges are
        # skipped unless this is a repeated timeout (the peer may have reneged).
        self.lost_end = nxt
        self.retx_nxt = una
        self.reno_sacked = 0
        self.dupacks = 0
        if self.retries > 1:
            self.sb.clear()
        self.rtt.on_timeout()
        self.rtt_seq = None
        if self.ts_ok:
            self.rto_ts = self._tsval(now)
        self.force_retx = True
        self._output(now)

    def _on_persist(self, now: float) -> None:
        if (self.state not in CAN_SEND or self.snd_nxt != self.snd_una
                or self.sndbuf.end <= self.snd_nxt):
            self.persist_backoff = 0
            return
        if self.probes >= self._cfg.max_retries:
            self._give_up("zero window probes unanswered")
            return
        self.probes += 1
        self.persist_backoff += 1
        if self.snd_una + self.snd_wnd > self.snd_nxt:
            # A window smaller than we would fill (sender SWS): send what fits.
            self.sws_override = True
            self._output(now)
            self.sws_override = False
        else:
            # Zero window: a probe the peer must answer with its window
            # (Linux style: an old sequence number, so it carries no data).
            self._c["zero_window_probes"] += 1
            self._xmit(now, self.snd_una - 1, ACK, self._data_options(now))
        if self.t_persist is None and self.snd_nxt == self.snd_una:
            self._arm("t_persist", now + self._persist_interval())

    def _persist_interval(self) -> float:
        return min(self.rtt.base_rto * (1 << min(self.persist_backoff, 16)), self._cfg.max_rto)

    def _on_keepalive(self, now: float) -> None:
        if self.ka_idle is None or self.state not in KEEPALIVE_STATES:
            return
        if self.ka_sent and self.last_rx >= self.ka_last_probe:
            self.ka_sent = 0                 # the peer answered
        if self.ka_sent == 0:
            due = self.last_rx + self.ka_idle
            if now < due:
                self._arm("t_keepalive", due)
                return
            if self.snd_nxt != self.snd_una:
                # Data outstanding: the retransmission timer watches the peer.
                self._arm("t_keepalive", now + self.ka_idle)
                return
        if self.ka_sent >= self.ka_count:
            self._give_up("keepalive timed out")
            return
        self.ka_sent += 1
        self.ka_last_probe = now
        self._c["keepalive_probes"] += 1
        self._xmit(now, self.snd_una - 1, ACK, self._data_options(now))
        self._arm("t_keepalive", now + self.ka_interval)
