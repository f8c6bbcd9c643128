"""One TCP connection: the sans-IO socket an application (or a service) uses.

Application side: `send(data) -> int` (bytes accepted into the bounded send
buffer), `recv(n) -> bytes`, `close()` (half close: FIN after the queued data;
reading goes on until the peer's FIN), `abort()` (RST), `state`,
`set_keepalive()`, and callbacks the app sets: `on_readable(conn)`,
`on_writable(conn)`, `on_established(conn)` (active opens), `on_closed(conn)`.
Callbacks run at the end of processing a segment or a timer, when the
connection is consistent, so they may call send/recv/close/abort.

Network side (called by layer.py only): `_rx(now, seg)`, `_on_timer(now)`.

Design:
* Sequence numbers are unwrapped: inside the stack they are plain Python
  ints that grow past 2**32 (the wire value is `x & 0xFFFFFFFF`). Incoming
  numbers are unwrapped against RCV.NXT or SND.UNA, so every comparison below
  is an ordinary integer comparison and no modular arithmetic leaks out.
* The receive path follows RFC 9293 3.10.7.4 step by step (sequence check
  with PAWS, RST per RFC 5961, SYN -> challenge ACK, ACK, data, FIN). Every
  state change goes through state.transition().
* The send path is one loop, `_output`: first bytes presumed lost (a hole
  below the highest SACK, the first segment on fast retransmit / partial ACK,
  or everything after an RTO), then new data, then a FIN, each while the
  pipe (RFC 6675 estimate of bytes in the network) is below cwnd and the
  peer's window allows. With TSO one emitted segment carries up to
  `set_tso(n)` bytes and gso_size = MSS.
* Retransmission: RFC 6298 timer (rtt.py) with Karn's rule, or timestamps
  when negotiated; exponential backoff; abort after max_retries.
* Loss recovery: NewReno (congestion.py) driven by duplicate ACKs or SACK
  (sack.py); without SACK, each duplicate ACK counts as one segment that left
  the network (Linux's "reno sacks"), so both cases share the pipe logic.
* Receiving: in-order data goes to the receive buffer; out-of-order data to
  the assembler (assembler.py) and an immediate ACK with SACK blocks;
  delayed ACK (40 ms or every second full-sized segment). The window
  advertised comes from the buffer's free space, never shrinks, and follows
  receiver-side silly window avoidance.

Limits: no urgent data, no Nagle (TCP_NODELAY behaviour; sender-side SWS
avoidance is kept), no ECN, no F-RTO/RACK/PRR/D-SACK, no TCP Fast Open;
data on a SYN is ignored (the peer resends it).
"""
from __future__ import annotations

from ..wire.tcp import (ACK, FIN, HEADER, PSH, RST, SYN, encode_options)
from .assembler import Assembler
from .buffers import RecvBuffer, SendBuffer
from .congestion import LOSS, OPEN, RECOVERY, NewReno
from .rtt import RttEstimator
from .sack import Scoreboard
from .state import (CAN_RECEIVE, CAN_SEND, SYNCHRONIZED, Event, State, transition)

__all__ = ["TcpConnection", "TcpError"]

M = 0xFFFFFFFF
HALF = 0x80000000
TS_OPT_LEN = 12
MAX_IP_PAYLOAD = 65535 - 20          # IPv4 total length bound

CLOSED = State.CLOSED
SYN_SENT = State.SYN_SENT
SYN_RECEIVED = State.SYN_RECEIVED
ESTABLISHED = State.ESTABLISHED
FIN_WAIT_1 = State.FIN_WAIT_1
FIN_WAIT_2 = State.FIN_WAIT_2
CLOSE_WAIT = State.CLOSE_WAIT
CLOSING = State.CLOSING
LAST_ACK = State.LAST_ACK
TIME_WAIT = State.TIME_WAIT

_APP_CAN_SEND = frozenset({SYN_SENT, SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT})
_KEEPALIVE_STATES = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, FIN_WAIT_2, CLOSING,
                               LAST_ACK})
_TS_HEAD = b"\x01\x01\x08\x0a"
_NO_OPTS = b""


class TcpError(ConnectionError):
    """An application call the connection's state does not allow."""


def _wscale_for(cap: int) -> int:
    s = 0
    while (cap >> s) > 0xFFFF and s < 14:
        s += 1
    return s


class TcpConnection:
    def __init__(self, layer, local_ip: bytes, local_port: int, remote_ip: bytes,
                 remote_port: int, iss: int):
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
        # RFC 7323 5.4: a keyed hash of the 4-tuple, so a new connection on the
        # same pair continues the clock (needed for TIME-WAIT reuse, RFC 6191).
        self.ts_offset = layer._ts_offset(self.key)
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
        if self.state not in _APP_CAN_SEND or self.fin_queued:
            return 0
        return self.sndbuf.space

    @property
    def at_eof(self) -> bool:
        """The peer closed its side and every byte has been read."""
        return (self.fin_received or self.state is CLOSED) and not self.rcvbuf.buf

    @property
    def unsent(self) -> int:
        """Bytes queued but not yet acknowledged by the peer."""
        return len(self.sndbuf.buf)

    def send(self, data) -> int:
        if self.state not in _APP_CAN_SEND or self.fin_queued:
            raise TcpError(f"cannot send in {self.state.value}"
                           + (" after close()" if self.fin_queued else "")
                           + (f" ({self.error})" if self.error else ""))
        n = self.sndbuf.write(data)
        if n and self.state in CAN_SEND:
            self._output(self._layer.now)
        return n

    def recv(self, n: int = -1) -> bytes:
        data = self.rcvbuf.read(n)
        if data and self.state in CAN_RECEIVE:
            # Window update (RFC 9293 3.8.6.2.2): tell the peer once the window
            # has grown by at least an MSS and at least doubled.
            old = self.rcv_adv - self.rcv_nxt
            new = self.rcvbuf.cap - len(self.rcvbuf.buf)
            if new - old >= self.rcv_mss and new >= 2 * old:
                if self._in_rx:
                    self.ack_now = True     # goes out with whatever we send next
                else:
                    self._send_ack(self._layer.now)
        return data

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
            "unread": len(self.rcvbuf.buf), "unacked": len(self.sndbuf.buf),
            "ooo_bytes": self.ooo.nbytes,
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
            if self.on_writable and self.state in _APP_CAN_SEND and not self.fin_queued:
                self.on_writable(self)
        if self._n_closed:
            self._n_closed = False
            if self.listener is not None:
                self.listener.pending -= 1
                self.listener = None
            if self.on_closed:
                self.on_closed(self)

    # ------------------------------------------------------------------ timers

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
        if self.ka_idle is None or self.state not in _KEEPALIVE_STATES:
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

    def _passive_open(self, now: float, seg) -> None:
        self.irs = seg.seq
        self.rcv_nxt = self.rcv_adv = seg.seq + 1
        self._negotiate(seg)
        self.snd_wnd = seg.window                 # never scaled in a SYN
        self.max_snd_wnd = self.snd_wnd
        self.snd_wl1 = seg.seq
        self.snd_wl2 = self.iss
        self._set_state(Event.RCV_SYN)
        self._send_syn(now, True)

    def _send_syn(self, now: float, with_ack: bool) -> None:
        cfg = self._cfg
        if with_ack:
            # Only what the peer offered (RFC 7323 / 2018): our negotiated view.
            ts = (self._tsval(now), self.ts_recent) if self.ts_ok else None
            opts = encode_options(mss=cfg.mss,
                                  wscale=self.rcv_wscale if self.ws_ok else None,
                                  sack_permitted=self.sack_ok, timestamp=ts)
            flags = SYN | ACK
            win = min(self.rcvbuf.free, 0xFFFF)
            self.rcv_adv = max(self.rcv_adv, self.rcv_nxt + win)
            self.last_ack_sent = self.rcv_nxt
        else:
            ts = (self._tsval(now), 0) if cfg.timestamps else None
            opts = encode_options(mss=cfg.mss,
                                  wscale=self.our_wscale if cfg.window_scaling else None,
                                  sack_permitted=cfg.sack, timestamp=ts)
            flags = SYN
            win = min(self.rcvbuf.free, 0xFFFF)
        if self.snd_nxt == self.iss:
            self.syn_time = now
            self.snd_nxt = self.iss + 1
        else:
            self.rtt_seq = None          # retransmitted SYN: no RTT sample from it (Karn)
            self.syn_time = -1.0
        hdr = HEADER.pack(self.local_port, self.remote_port, self.iss & M,
                          (self.rcv_nxt & M) if with_ack else 0,
                          ((20 + len(opts)) << 10) | flags, win, 0, 0) + opts
        self._emit(bytearray(hdr), 0)
        if flags & ACK:
            self.unacked_rx = 0
            self.t_delack = None
        self._arm("t_rtx", now + self.rtt.rto)

    # ------------------------------------------------------------ receiving

    def _rx(self, now: float, seg) -> None:
        self.segs_in += 1
        self.last_rx = now
        st = self.state
        if st is SYN_SENT:
            self._rx_syn_sent(now, seg)
        elif st is TIME_WAIT:
            self._rx_time_wait(now, seg)
        elif st is not CLOSED:
            self._rx_synchronized(now, seg)
        # App callbacks first, so a reply written in on_readable carries the ACK.
        self._in_rx = True
        try:
            self._notify()
        finally:
            self._in_rx = False
        st = self.state
        if st in CAN_SEND:
            self._output(now)
        elif self.ack_now and st is not CLOSED:
            self._send_ack(now)

    def _rx_syn_sent(self, now: float, seg) -> None:
        flags = seg.flags
        if flags & ACK:
            if seg.ack != (self.iss + 1) & M:
                if not flags & RST:
                    self._layer._send_reset(self.local_ip, self.remote_ip, self.local_port,
                                            self.remote_port, seg.ack, 0, RST)
                return
        if flags & RST:
            if flags & ACK:
                self._c["rst_rx"] += 1
                self._reset("connection refused")
            return
        if not flags & SYN:
            return
        self.irs = seg.seq
        self.rcv_nxt = self.rcv_adv = seg.seq + 1
        self._negotiate(seg)
        self.snd_wl1 = seg.seq
        if flags & ACK:
            self.snd_una = self.iss + 1
            self.snd_wl2 = self.snd_una
            self.snd_wnd = seg.window              # never scaled in a SYN
            self.max_snd_wnd = self.snd_wnd
            self.retries = 0
            self.t_rtx = None
            if self.ts_ok and seg.timestamp[1]:
                self._ts_sample(now, seg.timestamp[1])
            elif self.syn_time >= 0:
                self.rtt.sample(now - self.syn_time)
            self.lost_end = self.retx_nxt = self.snd_una
            self._set_state(Event.RCV_SYN_ACK)
            self.ack_now = True
            self._output(now)               # data queued before the handshake finished
        else:
            # Simultaneous open (RFC 9293 figure 8): SYN-ACK with our same ISS.
            self.snd_wnd = seg.window
            self.max_snd_wnd = self.snd_wnd
            self.snd_wl2 = self.iss
            self._set_state(Event.RCV_SYN)
            self.t_rtx = None
            self._send_syn(now, True)

    def _rx_time_wait(self, now: float, seg) -> None:
        flags = seg.flags
        if flags & RST:
            return                          # RFC 1337: no TIME-WAIT assassination
        seq = self._unwrap_rcv(seg.seq)
        if flags & FIN and seq + len(seg.payload) + 1 == self.rcv_nxt:
            # The peer did not get our last ACK: ACK again, restart 2*MSL.
            self._arm("t_2msl", now + 2 * self._cfg.msl)
        self.ack_now = True

    def _unwrap_rcv(self, s: int) -> int:
        r = self.rcv_nxt
        return r + ((s - r + HALF) & M) - HALF

    def _rx_synchronized(self, now: float, seg) -> None:
        c = self._c
        flags = seg.flags
        payload = seg.payload
        plen = len(payload)
        r = self.rcv_nxt
        seq = r + ((seg.seq - r + HALF) & M) - HALF

        if flags & SYN and seq == self.irs:
            if self.state is SYN_RECEIVED and not flags & ACK:
                # The peer resent its SYN: our SYN-ACK was lost.
                self._send_syn(now, True)
                return
            # A resent SYN-ACK (simultaneous open) or SYN: drop the SYN, keep the rest.
            flags &= ~SYN
            seq += 1

        # PAWS (RFC 7323 5): drop segments carrying an old timestamp.
        ts = seg.timestamp
        if ts is not None and self.ts_ok and not flags & RST:
            if (ts[0] - self.ts_recent) & M >= HALF:
                c["paws_rejected"] += 1
                self.ack_now = True
                return

        # Sequence check (RFC 9293 3.10.7.4 first): acceptable if any part is in the window.
        wnd = self.rcv_adv - r
        if wnd < 0:
            wnd = 0
        seglen = plen + (1 if flags & FIN else 0) + (1 if flags & SYN else 0)
        if seglen == 0:
            ok = r <= seq <= r + wnd if wnd else seq == r
        elif wnd == 0:
            # Zero window: no data fits, but ACK and RST must still work.
            ok = seq == r
            if ok:
                payload = payload[:0]
                plen = 0
                flags &= ~FIN
                if seglen:
                    c["rx_zero_window_drops"] += 1
                    self.ack_now = True
        else:
            end = seq + seglen - 1
            ok = (r <= seq < r + wnd) or (r <= end < r + wnd) or (seq < r and end >= r + wnd)
        if not ok:
            if not flags & RST:
                c["rx_out_of_window"] += 1
                self.ack_now = True
            return

        # RST (RFC 5961 3.2): exact match resets, anything else in window gets a challenge ACK.
        if flags & RST:
            c["rst_rx"] += 1
            if seq == r:
                if self.state is SYN_RECEIVED and self.listener is not None:
                    self.error = "reset during handshake"
                    self._set_state(Event.RCV_RST)
                else:
                    self._reset("connection reset by peer")
            else:
                self._challenge_ack(now)
            return

        # SYN in a synchronized state (RFC 5961 4): challenge ACK, drop.
        if flags & SYN:
            self._challenge_ack(now)
            return

        if not flags & ACK:
            return

        # Timestamps (RFC 7323 4.3): remember the peer's clock.
        if ts is not None and self.ts_ok and seq <= self.last_ack_sent:
            self.ts_recent = ts[0]

        # Trim to the window.
        if seq < r:
            cut = r - seq
            if cut >= plen:
                cut = plen
            payload = payload[cut:]
            plen -= cut
            seq += cut
        right = r + wnd
        if seq + plen > right:
            payload = payload[:max(right - seq, 0)]
            plen = len(payload)
            flags &= ~FIN
            c["rx_trimmed"] += 1

        # ACK field.
        if self.state is SYN_RECEIVED:
            ack = self._unwrap_snd(seg.ack)
            if not self.snd_una < ack <= self.snd_nxt:
                self._layer._send_reset(self.local_ip, self.remote_ip, self.local_port,
                                        self.remote_port, seg.ack, 0, RST)
                return
            self.snd_wnd = seg.window << self.snd_wscale
            self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            self.snd_una = ack
            self.retries = 0
            self.t_rtx = None
            if self.ts_ok and ts is not None and ts[1]:
                self._ts_sample(now, ts[1])
            elif self.syn_time >= 0:
                self.rtt.sample(now - self.syn_time)
            self.lost_end = self.retx_nxt = ack
            self._set_state(Event.RCV_ACK_OF_SYN)
            if self.listener is not None:
                # Accept now, before the data below is delivered, so the app
                # has set its callbacks when on_readable fires.
                self._n_est = False
                lst, self.listener = self.listener, None
                lst.pending -= 1
                lst.on_accept(self)
                if self.state is CLOSED:
                    return
        elif not self._rx_ack(now, seg, seq, flags, plen):
            return
        st = self.state
        if st is CLOSED or st is TIME_WAIT:
            return

        # Segment text (RFC 9293 seventh).
        if plen and st in CAN_RECEIVE:
            self._rx_data(now, seq, payload)
        elif plen:
            c["rx_data_after_fin"] += 1

        # FIN (eighth).
        if flags & FIN:
            fin_seq = seq + plen
            if fin_seq == self.rcv_nxt:
                self._rx_fin(now)
            elif fin_seq > self.rcv_nxt and st in CAN_RECEIVE:
                self.ooo_fin = fin_seq
                self.ack_now = True

    def _unwrap_snd(self, s: int) -> int:
        u = self.snd_una
        return u + ((s - u + HALF) & M) - HALF

    def _challenge_ack(self, now: float) -> None:
        if self._layer._challenge_ok(now):
            self._c["challenge_acks"] += 1
            self._send_ack(now)

    def _ts_sample(self, now: float, tsecr: int) -> None:
        # Karn's rule for timestamps: after an RTO, an ACK echoing a timestamp
        # from before the timeout was not caused by the retransmission. It is
        # typically an ACK that was lost and repeated only when the peer
        # retransmitted (minutes later with backoff); as a sample it would
        # push the RTO to its ceiling, and with both sides losing ACKs that
        # feeds itself. RFC 7323 4.1 leaves such samples to judgement.
        if self.rto_ts is not None:
            if (tsecr - self.rto_ts) & M >= HALF:
                return
            self.rto_ts = None
        r = (self._tsval(now) - tsecr) & M
        if r < HALF:
            self.rtt.sample(r / 1000.0)

    def _tsval(self, now: float) -> int:
        return (int(now * 1000) + self.ts_offset) & M

    def _rx_ack(self, now: float, seg, seq: int, flags: int, plen: int) -> bool:
        """ACK processing in a synchronized state. False: stop processing this segment."""
        una = self.snd_una
        nxt = self.snd_nxt
        ack = una + ((seg.ack - una + HALF) & M) - HALF
        if ack > nxt:
            self._c["rx_ack_too_new"] += 1
            self.ack_now = True
            return False
        if ack < una:
            if ack < una - max(self.max_snd_wnd, 1):
                self._challenge_ack(now)          # RFC 5961 5.2
                return False
            return True                           # old duplicate: ignore its ACK field
        win = seg.window << self.snd_wscale
        newly_sacked = 0
        if self.sack_ok and seg.sack_blocks and nxt > una:
            blocks = [(una + ((s - una + HALF) & M) - HALF, una + ((e - una + HALF) & M) - HALF)
                      for s, e in seg.sack_blocks]
            newly_sacked = self.sb.update(una, nxt, blocks)
        if ack > una:
            self._ack_advanced(now, seg, ack)
        elif nxt > una and ((plen == 0 and not flags & FIN and win == self.snd_wnd)
                            or newly_sacked > 0):
            self._dupack(now)
        elif self.cc.ca_state == RECOVERY and newly_sacked:
            self.lost_end = max(self.lost_end, self.sb.highest)
        # Window update (RFC 9293 3.10.7.4 fifth, SND.WL1/WL2 rule).
        if self.snd_wl1 < seq or (self.snd_wl1 == seq and self.snd_wl2 <= ack):
            if win > self.snd_wnd:
                self.persist_backoff = 0
            self.snd_wnd = win
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            if win > self.max_snd_wnd:
                self.max_snd_wnd = win
        self.probes = 0
        st = self.state
        if ack > self.sndbuf.end and self.fin_queued:
            # Our FIN is acknowledged.
            if st is FIN_WAIT_1 or st is CLOSING or st is LAST_ACK:
                self._set_state(Event.RCV_ACK_OF_FIN)
                if self.state is CLOSED:
                    return False
        return True

    def _ack_advanced(self, now: float, seg, ack: int) -> None:
        una = self.snd_una
        nxt = self.snd_nxt
        acked = ack - una
        flight_before = nxt - una
        ts = seg.timestamp
        if self.ts_ok and ts is not None and ts[1]:
            self._ts_sample(now, ts[1])
        elif self.rtt_seq is not None and ack >= self.rtt_seq:
            self.rtt.sample(now - self.rtt_time)
            self.rtt_seq = None
        sb = self.sndbuf
        room_before = sb.cap - len(sb.buf)
        sb.ack_to(min(ack, sb.end))
        self.snd_una = ack
        self.bytes_out += acked
        self.sb.advance(ack)
        self.retries = 0
        self.dupacks = 0
        if not self.sack_ok and self.reno_sacked:
            self.reno_sacked = max(0, self.reno_sacked - max(0, acked - self.mss))
        if self.lost_end < ack:
            self.lost_end = ack
        if self.retx_nxt < ack:
            self.retx_nxt = ack
        cc = self.cc
        ca = cc.ca_state
        if ca == RECOVERY:
            if ack >= cc.recover:
                cc.exit_recovery(nxt - ack)
                self.lost_end = self.retx_nxt = ack
                self.reno_sacked = 0
            else:
                # Partial ACK (RFC 6582 3.2 step 5): the next hole is lost too.
                if self.sb:
                    self.lost_end = max(self.lost_end, self.sb.highest)
                if self.lost_end <= ack or not self.sb:
                    self.lost_end = max(self.lost_end, ack + min(self.mss, nxt - ack))
                    if self.retx_nxt > ack and not self.sb:
                        self.retx_nxt = ack
                self.force_retx = True
        else:
            if ca == LOSS and ack >= cc.recover:
                cc.exit_loss()
            cc.on_ack(acked, 2 * flight_before >= cc.cwnd)
        if ack == nxt:
            self.t_rtx = None
        else:
            self._arm("t_rtx", now + self.rtt.rto)     # RFC 6298 5.3: restart
        # Wake the writer when half the buffer is free (a low-water mark, like
        # Linux's sk_stream_wspace), not for every ACK: fewer, larger writes.
        if room_before < sb.cap // 2 <= sb.cap - len(sb.buf):
            self._n_write = True

    def _dupack(self, now: float) -> None:
        self.dupacks += 1
        cc = self.cc
        mss = self.mss
        if not self.sack_ok:
            out = self.snd_nxt - self.snd_una
            self.reno_sacked = min(self.reno_sacked + mss, max(out - mss, 0))
        ca = cc.ca_state
        if ca == OPEN:
            if self.dupacks >= 3 or (self.sack_ok and self.sb.sacked >= 3 * mss):
                self._enter_recovery(now)
        elif ca == RECOVERY and self.sb:
            self.lost_end = max(self.lost_end, self.sb.highest)

    def _enter_recovery(self, now: float) -> None:
        una, nxt = self.snd_una, self.snd_nxt
        self._c["fast_retransmits"] += 1
        self.cc.enter_recovery(nxt - una, nxt)
        self.lost_end = max(self.sb.highest, una + min(self.mss, nxt - una))
        self.retx_nxt = una
        self.force_retx = True

    def _rx_data(self, now: float, seq: int, payload) -> None:
        plen = len(payload)
        r = self.rcv_nxt
        c = self._c
        if seq == r:
            self.rcvbuf.push(payload)
            r += plen
            self.bytes_in += plen
            if self.ooo:
                # Filling (part of) a gap: ACK at once (RFC 5681 4.2).
                self.ack_now = True
                while True:
                    more = self.ooo.pop(r)
                    if more is None:
                        break
                    self.rcvbuf.push(more)
                    r += len(more)
                    self.bytes_in += len(more)
            self.rcv_nxt = r
            self._n_read = True
            self.unacked_rx += plen
            if self.ooo_fin is not None and self.ooo_fin == r:
                self.ooo_fin = None
                self._rx_fin(now)
            elif self.unacked_rx >= 2 * self.rcv_mss:
                self.ack_now = True
            elif not self.ack_now and self.t_delack is None:
                self._arm("t_delack", now + self._cfg.delack)
        else:
            # Out of order: keep (bounded) and ACK at once with SACK (RFC 5681 4.2).
            c["rx_ooo_segments"] += 1
            if not self.ooo.add(seq, payload):
                c["rx_ooo_dropped"] += 1
            self.ack_now = True

    def _rx_fin(self, now: float) -> None:
        self.rcv_nxt += 1
        self.fin_received = True
        self.ack_now = True
        self._n_read = True
        st = self.state
        if st is ESTABLISHED or st is FIN_WAIT_1 or st is FIN_WAIT_2:
            self._set_state(Event.RCV_FIN)

    # ------------------------------------------------------------ sending

    def _pipe(self) -> int:
        una = self.snd_una
        out = self.snd_nxt - una
        out -= self.sb.sacked if self.sack_ok else self.reno_sacked
        if self.lost_end > self.retx_nxt:
            out -= self.sb.unsacked_between(max(self.retx_nxt, una), self.lost_end)
        return out if out > 0 else 0

    def _seg_max(self, mss: int) -> int:
        tso = self._layer.tso_max
        if tso is None or tso <= mss:
            return mss
        m = min(tso, MAX_IP_PAYLOAD - 60)
        return m - m % mss

    def _data_options(self, now: float) -> bytes:
        if self.ts_ok:
            opts = _TS_HEAD + (((int(now * 1000) + self.ts_offset) & M).to_bytes(4, "big")
                               + (self.ts_recent & M).to_bytes(4, "big"))
            if self.sack_ok and self.ooo:
                opts += encode_options(sack_blocks=self.ooo.sack_blocks(3))
            return opts
        if self.sack_ok and self.ooo:
            return encode_options(sack_blocks=self.ooo.sack_blocks(4))
        return _NO_OPTS

    def _output(self, now: float) -> None:
        """Send whatever the windows allow: lost bytes, new data, FIN; then a bare ACK if owed."""
        if self.state not in CAN_SEND:
            if self.ack_now and self.state is not CLOSED:
                self._send_ack(now)
            return
        sndbuf = self.sndbuf
        data_end = sndbuf.seq + len(sndbuf.buf)
        fin = self.fin_queued
        if not (self.lost_end > self.retx_nxt or data_end > self.snd_nxt
                or (fin and self.snd_nxt == data_end)):
            # Nothing to send (the common case on the receiving side).
            if self.snd_nxt == self.snd_una:
                self.t_rtx = None
            if self.ack_now:
                self._send_ack(now)
            return
        opts = self._data_options(now)
        mss = self.mss - (len(opts) - self.base_opt_len)
        seg_max = self._seg_max(mss)
        cc = self.cc
        while True:
            una = self.snd_una
            nxt = self.snd_nxt
            room = cc.cwnd - self._pipe()
            # 1. Bytes presumed lost.
            lost_end = self.lost_end
            if lost_end > self.retx_nxt:
                start = self.retx_nxt if self.retx_nxt > una else una
                hole = self.sb.next_hole(start, lost_end) if start < lost_end else None
                if hole is None:
                    self.retx_nxt = lost_end
                else:
                    hs, he = hole
                    n = he - hs
                    if n > seg_max:
                        n = seg_max
                    if n > room:
                        if self.force_retx:
                            n = min(n, max(mss, room - room % mss))
                        elif room >= mss:
                            n = room - room % mss
                        else:
                            break
                    self.force_retx = False
                    self._send_range(now, hs, hs + n, opts, mss, data_end, True)
                    self.retx_nxt = hs + n
                    continue
            self.force_retx = False
            # 2. New data.
            avail = data_end - nxt
            if avail > 0:
                n = una + self.snd_wnd - nxt
                if n <= 0:
                    break
                if n > avail:
                    n = avail
                if n > seg_max:
                    n = seg_max
                if n < mss and n < avail and n < self.max_snd_wnd // 2 and not self.sws_override:
                    break                       # sender-side SWS avoidance
                if n > room:
                    if room >= mss:
                        n = room - room % mss
                    elif room > 0 and self.sws_override:
                        n = room
                    else:
                        break
                elif n > mss and n < avail:
                    n -= n % mss                # whole segments; the tail waits for the rest
                end = nxt + n
                if fin and end == data_end:
                    end += 1
                self._send_range(now, nxt, end, opts, mss, data_end, False)
                continue
            # 3. A FIN on its own.
            if fin and nxt == data_end:
                self._send_range(now, nxt, nxt + 1, opts, mss, data_end, False)
                continue
            break
        if self.snd_nxt > self.snd_una:
            if self.t_rtx is None:
                self._arm("t_rtx", now + self.rtt.rto)
            self.t_persist = None
        elif data_end > self.snd_nxt and self.t_persist is None:
            self._arm("t_persist", now + self._persist_interval())
        if self.ack_now:
            self._send_ack(now)

    def _send_range(self, now: float, seq: int, end: int, opts: bytes, mss: int,
                    data_end: int, retransmit: bool) -> None:
        dend = end if end < data_end else data_end
        plen = dend - seq
        flags = ACK
        if end > data_end:
            flags |= FIN
        if plen > 0 and dend == data_end:
            flags |= PSH
        seg = bytearray(HEADER.pack(self.local_port, self.remote_port, seq & M,
                                    self.rcv_nxt & M, ((20 + len(opts)) << 10) | flags,
                                    self._rcv_window(), 0, 0))
        seg += opts
        if plen > 0:
            self.sndbuf.append_to(seg, seq, plen)
        self._emit(seg, mss if plen > mss else 0)
        self.last_ack_sent = self.rcv_nxt
        self.unacked_rx = 0
        self.ack_now = False
        self.t_delack = None
        if retransmit:
            self.retransmits += 1
            self._c["retransmitted_segments"] += 1
            self._c["retransmitted_bytes"] += plen
            if self.rtt_seq is not None and seq < self.rtt_seq and end > self.rtt_start:
                self.rtt_seq = None         # Karn: the timed segment is now ambiguous
        else:
            if end > self.snd_nxt:
                self.snd_nxt = end
            if self.rtt_seq is None and not self.ts_ok:
                self.rtt_start = seq
                self.rtt_seq = end
                self.rtt_time = now

    def _rcv_window(self) -> int:
        """The window field; moves rcv_adv right when worth it (never left)."""
        r = self.rcv_nxt
        cap = self.rcvbuf.cap
        edge = r + cap - len(self.rcvbuf.buf)
        adv = self.rcv_adv
        if edge > adv:
            # Receiver SWS avoidance: move the edge by at least min(buffer/2, MSS).
            if edge - adv >= self.rcv_mss or edge - adv >= cap // 2 or adv - r > self.rcv_mss:
                self.rcv_adv = adv = edge
        w = (adv - r) >> self.rcv_wscale
        if w > 0xFFFF:
            w = 0xFFFF
        return w if w > 0 else 0

    def _xmit(self, now: float, seq: int, flags: int, opts: bytes) -> None:
        """A segment without payload (ACK, probe)."""
        seg = bytearray(HEADER.pack(self.local_port, self.remote_port, seq & M,
                                    self.rcv_nxt & M, ((20 + len(opts)) << 10) | flags,
                                    self._rcv_window(), 0, 0))
        seg += opts
        self._emit(seg, 0)
        if flags & ACK:
            self.last_ack_sent = self.rcv_nxt
            self.unacked_rx = 0
            self.ack_now = False
            self.t_delack = None

    def _send_ack(self, now: float) -> None:
        if self.state is SYN_RECEIVED or self.state is SYN_SENT:
            self.ack_now = False
            return
        self._xmit(now, self.snd_nxt, ACK, self._data_options(now))

    def _send_rst_ack(self, now: float) -> None:
        self._c["rst_sent"] += 1
        seg = bytearray(HEADER.pack(self.local_port, self.remote_port, self.snd_nxt & M,
                                    self.rcv_nxt & M, (20 << 10) | RST | ACK, 0, 0, 0))
        self._emit(seg, 0)

    def _emit(self, seg: bytearray, gso: int) -> None:
        self.segs_out += 1
        self._layer._tx(self.local_ip, self.remote_ip, seg, gso)
