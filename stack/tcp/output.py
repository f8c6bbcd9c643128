"""TcpConnection's send path: one loop, `_output`, plus segment building.

Each round picks, while the pipe (RFC 6675: bytes really in the network =
outstanding - SACKed - presumed lost and not yet resent) is below cwnd:
  1. bytes presumed lost (unSACKed below lost_end and not yet resent):
     holes below the highest SACK, the first segment on fast retransmit or a
     partial ACK (RFC 6582), everything outstanding after an RTO;
  2. new data within the peer's window, with sender-side SWS avoidance;
  3. a FIN once all data is out.
With TSO one segment carries up to set_tso(n) bytes, whole MSS multiples,
and is emitted with gso_size = MSS. Option bytes (timestamps, SACK blocks)
come out of the payload so every wire segment fits the MTU.

The window we advertise comes from the receive buffer's free space; its right
edge never moves left and only moves right by a useful amount (receiver SWS).
"""
from __future__ import annotations

from ..wire.tcp import ACK, FIN, HEADER, PSH, RST, SYN, encode_options
from .common import (M, MAX_IP_PAYLOAD, CLOSED, SYN_SENT, SYN_RECEIVED, TS_HEAD, NO_OPTS)
from .state import CAN_SEND


class OutputMixin:
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
        seg = bytearray(self._layer.pad)
        seg += HEADER.pack(self.local_port, self.remote_port, self.iss & M,
                           (self.rcv_nxt & M) if with_ack else 0,
                           ((20 + len(opts)) << 10) | flags, win, 0, 0)
        seg += opts
        self._emit(seg, 0)
        if flags & ACK:
            self.unacked_rx = 0
            self.t_delack = None
        self._arm("t_rtx", now + self.rtt.rto)


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
            opts = TS_HEAD + (((int(now * 1000) + self.ts_offset) & M).to_bytes(4, "big")
                               + (self.ts_recent & M).to_bytes(4, "big"))
            if self.sack_ok and self.ooo:
                opts += encode_options(sack_blocks=self.ooo.sack_blocks(3))
            return opts
        if self.sack_ok and self.ooo:
            return encode_options(sack_blocks=self.ooo.sack_blocks(4))
        return NO_OPTS

    def _output(self, now: float) -> None:
        """Send whatever the windows allow: lost bytes, new data, FIN; then a bare ACK if owed."""
        if self.state not in CAN_SEND:
            if self.ack_now and self.state is not CLOSED:
                self._send_ack(now)
            return
        sndbuf = self.sndbuf
        data_end = sndbuf.seq + sndbuf.length
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
        # Set once this pass has sent a multi-segment (TSO) frame: a tail
        # shorter than one segment then waits for the ACK, by which time the
        # application has usually written more (Linux: tcp_tso_should_defer).
        # Without it every 64 KiB write became a TSO frame plus a runt, and
        # half the frames the guest had to take carried 0.6 % of the bytes.
        sent_tso = False
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
                if sent_tso and n < mss and not fin:
                    break                       # TSO deferral, see above
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
                if n > mss:
                    sent_tso = True
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
        # The layer's headroom first (zeros): the owner writes its headers
        # there and sends this bytearray as the frame, the payload copied once.
        seg = bytearray(self._layer.pad)
        seg += HEADER.pack(self.local_port, self.remote_port, seq & M,
                           self.rcv_nxt & M, ((20 + len(opts)) << 10) | flags,
                           self._rcv_window(), 0, 0)
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
        seg = bytearray(self._layer.pad)
        seg += HEADER.pack(self.local_port, self.remote_port, seq & M,
                           self.rcv_nxt & M, ((20 + len(opts)) << 10) | flags,
                           self._rcv_window(), 0, 0)
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
        if self._defer_ack:
            self._layer.owe_ack(self)
            return
        self._xmit(now, self.snd_nxt, ACK, self._data_options(now))

    def _send_rst_ack(self, now: float) -> None:
        self._c["rst_sent"] += 1
        seg = bytearray(self._layer.pad)
        seg += HEADER.pack(self.local_port, self.remote_port, self.snd_nxt & M,
                           self.rcv_nxt & M, (20 << 10) | RST | ACK, 0, 0, 0)
        self._emit(seg, 0)

    def _emit(self, seg: bytearray, gso: int) -> None:
        self.segs_out += 1
        self._layer._tx(self.local_ip, self.remote_ip, seg, gso)
