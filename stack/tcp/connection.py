"""One TCP connection: the sans-IO socket an application (or a service) uses.

Application side: `send(data) -> int` (bytes accepted into the bounded send
buffer), `recv(n) -> bytes`, `close()` (half close: FIN after the queued data;
reading goes on until the peer's FIN), `abort()` (RST), `state`,
`set_keepalive()`, and callbacks the app sets: `on_readable(conn)`,
`on_writable(conn)`, `on_established(conn)` (active opens), `on_closed(conn)`.
Callbacks run at the end of processing a segment or a timer, when the
connection is consistent, so they may call send/recv/close/abort.

Network side (called by layer.py only): `_rx(now, seg)`, `_on_timer(now)`.

The class is split by concern the way Linux splits tcp_input.c,
tcp_output.c and tcp_timer.c: this file holds the state, the app API, state
changes and option negotiation; input.py the receive path, output.py the
send loop, timers.py the timers. common.py has their shared constants.

Design:
* Sequence numbers are unwrapped: inside the stack they are plain Python
  ints that grow past 2**32 (the wire value is `x & 0xFFFFFFFF`). Incoming
  numbers are unwrapped against RCV.NXT or SND.UNA, so every comparison is
  an ordinary integer comparison and no modular arithmetic leaks out.
* Every state change goes through state.transition() (`_set_state`).
* Retransmission: RFC 6298 timer (rtt.py) with Karn's rule, or timestamps
  when negotiated; exponential backoff; abort after max_retries.
* Loss recovery: NewReno (congestion.py) driven by duplicate ACKs or SACK
  (sack.py); without SACK, each duplicate ACK counts as one segment that left
  the network (Linux's "reno sacks"), so both cases share the pipe logic.
* Buffers are bounded (buffers.py, assembler.py); the advertised window is
  the receive buffer's free space.

Limits: no urgent data, no Nagle (TCP_NODELAY behaviour; sender-side SWS
avoidance is kept), no ECN, no F-RTO/RACK/PRR/D-SACK, no TCP Fast Open;
data on a SYN is ignored (the peer resends it).
"""
from __future__ import annotations

from .assembler import Assembler
from .buffers import RecvBuffer, SendBuffer
from .common import (APP_CAN_SEND, CLOSE_WAIT, CLOSED, ESTABLISHED, FIN_WAIT_2, M,
                     SYN_RECEIVED, SYN_SENT, TIME_WAIT, TS_OPT_LEN)
from .congestion import NewReno
from .input import InputMixin
from .output import OutputMixin
from .rtt import RttEstimator
from .sack import Scoreboard
from .state import CAN_RECEIVE, CAN_SEND, SYNCHRONIZED, Event, transition
from .timers import TimersMixin

__all__ = ["TcpConnection", "TcpError"]


class TcpError(ConnectionError):
    """An application call the connection's state does not allow."""


def _wscale_for(cap: int) -> int:
    s = 0
    while (cap >> s) > 0xFFFF and s < 14:
        s += 1
    return s


class TcpConnection(InputMixin, OutputMixin, TimersMixin):
    def __init__(self, layer, local_ip: bytes, local_port: int, remote_ip: bytes,
                 remote_port: int, iss: int, ts_offset: int):
        cfg = layer.config
        self._layer = layer
        self._cfg = cfg
        self._c = layer.counters
        self.local_ip = local_ip
        self.local_port = local_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.key = (local_ip, local_port, remote_ip, remote_port)
        self.state = CLOSED
        self.listener = None            # the Listener that spawned us, until accepted
        self.held = False               # SYN held unanswered (NAT) until accept_held()
        self.error: str | None = None   # why the connection ended abnormally

        # --- send sequence space (unwrapped ints) ---
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.max_snd_wnd = 0
        self.snd_wscale = 0
        self.sndbuf = SendBuffer(cfg.sndbuf, iss + 1)
        self.sndbuf_grown = 0           # bytes of the layer's sndbuf_grow_total this one holds
        self.fin_queued = False         # app closed: FIN goes after sndbuf's last byte

        # --- receive sequence space ---
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0                # right edge of the window we advertised
        self.our_wscale = _wscale_for(cfg.rcvbuf) if cfg.window_scaling else 0
        self.rcv_wscale = 0
        self.rcvbuf = RecvBuffer(cfg.rcvbuf)
        self.ooo = Assembler(cfg.ooo_max_ranges)
        self.ooo_fin: int | None = None  # sequence number of a FIN seen out of order
        self.fin_received = False
        self.unacked_rx = 0             # bytes received since our last ACK
        self.ack_now = False

        # --- options ---
        self.mss = 536                  # payload bytes per segment we send (set at handshake)
        self.rcv_mss = cfg.mss          # what we expect the peer to send per segment
        self.ts_ok = False
        self.ts_recent = 0
        # RFC 7323 5.4: a keyed hash of the 4-tuple (TcpLayer._isn), so a new
        # connection on the same pair continues the clock (needed for
        # TIME-WAIT reuse, RFC 6191).
        self.ts_offset = ts_offset
        self.last_ack_sent = 0
        self.sack_ok = False
        self.ws_ok = False
        self.base_opt_len = 0

        # --- RTT, congestion, loss recovery ---
        self.rtt = RttEstimator(cfg.initial_rto, cfg.min_rto, cfg.max_rto)
        self.rtt_seq: int | None = None  # Karn: the end of the one segment being timed
        self.rtt_start = 0
        self.rto_ts: int | None = None  # our TSval when the last RTO fired
        self.rtt_time = 0.0
        self.syn_time = 0.0
        self.cc = NewReno(self.mss, max_cwnd=4 * cfg.sndbuf + (1 << 20))
        self.sb = Scoreboard()
        self.dupacks = 0
        self.reno_sacked = 0            # bytes assumed delivered by duplicate ACKs (no SACK)
        self.lost_end = iss             # unSACKed bytes below this are presumed lost...
        self.retx_nxt = iss             # ...and those below this were retransmitted already
        self.force_retx = False         # fast retransmit / partial ACK: one segment now
        self.sws_override = False       # persist timer: send a sub-MSS segment anyway

        # --- timers (absolute times or None) and their counters ---
        self.t_rtx: float | None = None
        self.t_persist: float | None = None
        self.t_delack: float | None = None
        self.t_keepalive: float | None = None
        self.t_fw2: float | None = None
        self.t_2msl: float | None = None
        self.retries = 0
        self.probes = 0                 # unanswered zero-window probes
        self.persist_backoff = 0
        self.last_rx = layer.now
        self.ka_idle: float | None = None
        self.ka_interval = cfg.keepalive_interval
        self.ka_count = cfg.keepalive_count
        self.ka_sent = 0
        self.ka_last_probe = 0.0
        self._heap_when: float | None = None   # layer timer-heap bookkeeping

        # --- statistics ---
        self.retransmits = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.segs_in = 0
        self.segs_out = 0

        # --- application callbacks ---
        self.on_readable = None
        self.on_writable = None
        self.on_established = None
        self.on_closed = None
        self._n_read = self._n_write = self._n_est = self._n_closed = False
        self._in_rx = False             # inside _rx: callbacks' ACKs can wait for the end
        # At the end of _rx with the layer's defer_acks: a bare ACK is owed to
        # the layer (sent by TcpLayer.flush_acks) instead of emitted now.
        self._defer_ack = False

    # ------------------------------------------------------------------ app API

    def __repr__(self) -> str:
        return (f"<TcpConnection {self.local_port}->{self.remote_port} {self.state.value}>")

    @property
    def readable(self) -> int:
        """Bytes ready for recv()."""
        return len(self.rcvbuf.buf)

    @property
    def send_space(self) -> int:
        """Bytes send() would accept now."""
        if self.state not in APP_CAN_SEND or self.fin_queued:
            return 0
        return self.sndbuf.space

    @property
    def at_eof(self) -> bool:
        """The peer closed its side and every byte has been read."""
        return (self.fin_received or self.state is CLOSED) and not self.rcvbuf.buf

    @property
    def unsent(self) -> int:
        """Bytes queued but not yet acknowledged by the peer."""
        return len(self.sndbuf)

    def send(self, data) -> int:
        if self.state not in APP_CAN_SEND or self.fin_queued:
            raise TcpError(f"cannot send in {self.state.value}"
                           + (" after close()" if self.fin_queued else "")
                           + (f" ({self.error})" if self.error else ""))
        n = self.sndbuf.write(data)
        if n and self.state in CAN_SEND:
            self._output(self._layer.now)
        return n

    def recv(self, n: int = -1) -> bytes:
        data = self.rcvbuf.read(n)
        if data:
            self._window_update()
        return data

    def skip(self, n: int, lazy: bool = True) -> int:
        """Drop up to n received bytes unread (a NAT proxy that already copied
        them out with a peek, or discard); returns how many. The window logic
        of recv, lazy by default (see _window_update); lazy=False announces
        a grown window as recv() does."""
        buf = self.rcvbuf.buf
        n = min(max(n, 0), len(buf))
        if n:
            del buf[:n]
            self._window_update(lazy=lazy)
        return n

    def _window_update(self, lazy: bool = False) -> None:
        """lazy: a window that is still at least an eighth of the buffer is
        only announced with the next segment or the delayed ACK. (The first
        read of every connection would otherwise send a bare ACK: the SYN
        carries at most 64 KiB, unscaled, RFC 7323 2.2.)"""
        if self.state in CAN_RECEIVE:
            # Window update (RFC 9293 3.8.6.2.2): tell the peer once the window
            # has grown by at least an MSS and at least doubled.
            old = self.rcv_adv - self.rcv_nxt
            new = self.rcvbuf.cap - len(self.rcvbuf.buf)
            if new - old >= self.rcv_mss and new >= 2 * old:
                if lazy and old >= self.rcvbuf.cap // 8:
                    if self.t_delack is None:
                        self._arm("t_delack", self._layer.now + self._cfg.delack)
                elif self._in_rx:
                    self.ack_now = True     # goes out with whatever we send next
                else:
                    self._send_ack(self._layer.now)

    def close(self) -> None:
        st = self.state
        if st is SYN_SENT:
            self._set_state(Event.CLOSE)
        elif st in (SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT):
            self.fin_queued = True
            self._set_state(Event.CLOSE)
            if self.state in CAN_SEND:
                self._output(self._layer.now)
        # already closing or closed: nothing to do

    def accept_held(self) -> None:
        """Answer a held SYN with our SYN-ACK (the host side connected)."""
        if not self.held or self.state is not SYN_RECEIVED:
            raise TcpError(f"no held SYN to accept in {self.state.value}")
        self.held = False
        self.retries = 0
        self.t_rtx = None
        self._send_syn(self._layer.now, True)

    def refuse_held(self, reset: bool = True) -> None:
        """Drop a held SYN: with a RST (the host refused), or silently (the
        caller answers with an ICMP error instead)."""
        if not self.held or self.state is not SYN_RECEIVED:
            raise TcpError(f"no held SYN to refuse in {self.state.value}")
        self.held = False
        if self.listener is not None:
            self.listener.pending -= 1
            self.listener = None
        if reset:
            self._send_rst_ack(self._layer.now)
        self.error = "refused"
        self._set_state(Event.ABORT)
        self._n_closed = False          # the caller asked for this: no on_closed

    def abort(self) -> None:
        """Send RST (if the peer knows us) and drop everything."""
        st = self.state
        if st is CLOSED:
            return
        if st in SYNCHRONIZED and st is not TIME_WAIT or st is SYN_RECEIVED:
            self._send_rst_ack(self._layer.now)
        self.error = self.error or "aborted"
        self._set_state(Event.ABORT)

    def set_keepalive(self, enabled: bool = True, idle: float | None = None,
                      interval: float | None = None, count: int | None = None) -> None:
        cfg = self._cfg
        if not enabled:
            self.ka_idle = None
            self.t_keepalive = None
            return
        self.ka_idle = cfg.keepalive_idle if idle is None else idle
        self.ka_interval = cfg.keepalive_interval if interval is None else interval
        self.ka_count = cfg.keepalive_count if count is None else count
        self.ka_sent = 0
        self._arm("t_keepalive", self.last_rx + self.ka_idle)

    def info(self) -> dict:
        """Like one line of `ss -ti`."""
        from ..config import ip_text
        rtt = self.rtt
        return {
            "state": self.state.value,
            "local": f"{ip_text(self.local_ip)}:{self.local_port}",
            "remote": f"{ip_text(self.remote_ip)}:{self.remote_port}",
            "snd_una": self.snd_una & M, "snd_nxt": self.snd_nxt & M,
            "rcv_nxt": self.rcv_nxt & M,
            "snd_wnd": self.snd_wnd, "rcv_wnd": max(self.rcv_adv - self.rcv_nxt, 0),
            "wscale": f"{self.snd_wscale},{self.rcv_wscale}",
            "mss": self.mss,
            "ts": self.ts_ok, "sack": self.sack_ok,
            "srtt_ms": None if rtt.srtt is None else round(rtt.srtt * 1000, 3),
            "rttvar_ms": round(rtt.rttvar * 1000, 3),
            "rto_ms": round(rtt.rto * 1000, 3),
            "cwnd": self.cc.cwnd, "ssthresh": min(self.cc.ssthresh, 1 << 30),
            "ca_state": self.cc.ca_state,
            "retransmits": self.retransmits,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "segs_in": self.segs_in, "segs_out": self.segs_out,
            "unread": len(self.rcvbuf.buf), "unacked": len(self.sndbuf),
            "ooo_bytes": self.ooo.nbytes, "held": self.held,
            "error": self.error,
        }

    # ------------------------------------------------------------ state changes

    def _set_state(self, event: Event) -> None:
        old = self.state
        new = transition(old, event)
        self.state = new
        if new is old:
            return
        if new is ESTABLISHED:
            self._n_est = True
            self._n_write = True
        elif new is FIN_WAIT_2:
            self._arm("t_fw2", self._layer.now + self._cfg.fin_timeout)
        elif new is TIME_WAIT:
            self.t_rtx = self.t_persist = self.t_keepalive = self.t_fw2 = None
            self._arm("t_2msl", self._layer.now + 2 * self._cfg.msl)
            self._layer._enter_time_wait(self)
        elif new is CLOSED:
            self.t_rtx = self.t_persist = self.t_delack = None
            self.t_keepalive = self.t_fw2 = self.t_2msl = None
            self._n_closed = True
            self._n_read = True
            self._layer._forget(self)

    def _reset(self, reason: str) -> None:
        self.error = reason
        self._set_state(Event.RCV_RST)

    def _give_up(self, reason: str) -> None:
        self._c["conn_timeouts"] += 1
        if self.state in SYNCHRONIZED:
            self._send_rst_ack(self._layer.now)
        self.error = reason
        self._set_state(Event.ABORT)

    def _notify(self) -> None:
        """Run app callbacks collected while processing (the connection is consistent now)."""
        if self._n_est:
            self._n_est = False
            if self.listener is not None:
                lst, self.listener = self.listener, None
                lst.pending -= 1
                lst.on_accept(self)
            elif self.on_established:
                self.on_established(self)
        if self._n_read:
            self._n_read = False
            if self.on_readable:
                self.on_readable(self)
        if self._n_write:
            self._n_write = False
            if self.on_writable and self.state in APP_CAN_SEND and not self.fin_queued:
                self.on_writable(self)
        if self._n_closed:
            self._n_closed = False
            if self.listener is not None:
                self.listener.pending -= 1
                self.listener = None
            if self.on_closed:
                self.on_closed(self)

    # ------------------------------------------------------------ opening

    def _negotiate(self, seg) -> None:
        """Options from the peer's SYN (RFC 9293 3.7.1, RFC 7323 1.3/2.2, RFC 2018 2)."""
        cfg = self._cfg
        self.ts_ok = cfg.timestamps and seg.timestamp is not None
        if self.ts_ok:
            self.ts_recent = seg.timestamp[0]
        self.sack_ok = cfg.sack and seg.sack_permitted
        # Scaling is on only when both SYNs carried the option (a shift of 0 is legal).
        self.ws_ok = cfg.window_scaling and seg.wscale is not None
        if self.ws_ok:
            self.snd_wscale = seg.wscale
            self.rcv_wscale = self.our_wscale
        else:
            self.snd_wscale = self.rcv_wscale = 0
        peer_mss = seg.mss if seg.mss else 536          # RFC 9293 3.7.1 default
        opt = TS_OPT_LEN if self.ts_ok else 0
        self.base_opt_len = opt
        self.mss = max(min(peer_mss, cfg.mss) - opt, 64)
        self.rcv_mss = max(cfg.mss - opt, 64)
        self.cc.set_mss(self.mss)

    def _active_open(self, now: float) -> None:
        self._set_state(Event.ACTIVE_OPEN)
        self._send_syn(now, False)

    def _passive_open(self, now: float, seg, hold: bool = False) -> None:
        self.irs = seg.seq
        self.rcv_nxt = self.rcv_adv = seg.seq + 1
        self._negotiate(seg)
        self.snd_wnd = seg.window                 # never scaled in a SYN
        self.max_snd_wnd = self.snd_wnd
        self.snd_wl1 = seg.seq
        self.snd_wl2 = self.iss
        self._set_state(Event.RCV_SYN)
        if hold:
            # No SYN-ACK yet; the retransmission timer doubles as the limit
            # on how long the application may take to decide.
            self.held = True
            self._arm("t_rtx", now + self._cfg.hold_timeout)
        else:
            self._send_syn(now, True)
