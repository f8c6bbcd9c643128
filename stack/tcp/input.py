"""TcpConnection's receive path, RFC 9293 3.10.7.4 step by step.

Sequence check (with PAWS, RFC 7323 5), RST handling (RFC 5961: exact match
resets, otherwise a rate-limited challenge ACK), SYN in a synchronized state
(challenge ACK), ACK processing (window update per SND.WL1/WL2, RTT samples,
duplicate-ACK / SACK loss detection feeding congestion.py), segment text
(in order to the receive buffer, out of order to the assembler with an
immediate SACK-carrying ACK), FIN. Incoming sequence numbers are unwrapped
against RCV.NXT or SND.UNA first, so all comparisons are plain integers.

Delayed ACK: every second full-sized segment, out-of-order data, a filled
hole and a FIN are ACKed at once; otherwise after config.delack.
"""
from __future__ import annotations

from ..wire.tcp import ACK, FIN, RST, SYN
from .common import (M, HALF, CLOSED, SYN_SENT, SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1,
                     FIN_WAIT_2, CLOSING, LAST_ACK, TIME_WAIT)
from .congestion import LOSS, OPEN, RECOVERY
from .state import CAN_RECEIVE, CAN_SEND, Event


class InputMixin:
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
        # Batched ACKs (TcpLayer defer_acks): the bare ACK this segment earns
        # waits until the end of the receive batch, so several back-to-back
        # segments (64 KiB TSO frames from one TX kick) get one cumulative
        # ACK, as Linux's GRO gives one per aggregate. Never with
        # out-of-order data queued: those ACKs carry SACK news (RFC 5681 4.2).
        self._defer_ack = self._layer.defer_acks and not self.ooo
        try:
            if st in CAN_SEND:
                self._output(now)
            elif self.ack_now and st is not CLOSED:
                self._send_ack(now)
        finally:
            self._defer_ack = False

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
                # The peer resent its SYN: our SYN-ACK was lost (or, while
                # the SYN is held, not sent yet: nothing to say).
                if self.held:
                    c["held_syn_retransmits"] += 1
                else:
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
        room_before = sb.cap - len(sb)
        if room_before == 0 and flight_before >= sb.cap - sb.cap // 4 \
                and self.snd_wnd > flight_before and self.cc.cwnd > flight_before:
            # Full, nearly all of it in flight, and neither the peer's window
            # nor cwnd the limit: the buffer is (TcpConfig.sndbuf_max).
            self._layer._grow_sndbuf(self)
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
        if room_before < sb.cap // 2 <= sb.cap - len(sb):
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
