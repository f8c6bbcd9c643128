"""The TCP layer: demultiplexing, listeners, TIME_WAIT bookkeeping, RSTs for
segments nobody wants, and the timer heap. This is what interface.py talks to.

    tcp = TcpLayer(emit, rng=random.Random(1))
    tcp.listen(ip, 7, on_accept)           # on_accept(conn) once the handshake is done
    tcp.receive(now, src_ip, dst_ip, seg)  # checksum already verified by the IP layer
    tcp.poll(now); tcp.next_deadline()
    emit(src_ip, dst_ip, segment: bytearray, gso_size)   # called for every segment we send

With `headroom=N` every segment handed to emit has N bytes reserved in
front of the TCP header (zeros; the segment proper is segment[N:]), so the
owner can write its lower-layer headers there and send the bytearray as
the frame, with no copy of the payload (Stack reserves Ethernet + IPv4).

Connections are found by (local ip, local port, remote ip, remote port) in a
dict. A listener bound to 0.0.0.0 takes any local address. A listener's
backlog bounds its connections still in SYN-RECEIVED; SYNs beyond it are
dropped and counted (no SYN cookies). The total number of connections is
bounded too (config.max_connections), and so is the number in TIME-WAIT
(config.max_time_wait): beyond it the oldest TIME-WAIT is dropped, as Linux
does when its bucket table overflows.

A SYN that hits a TIME-WAIT connection starts a new one if its sequence
number (or timestamp) is newer (RFC 6191); ISNs follow RFC 6528 (a 4 us
clock plus a keyed hash of the 4-tuple) so that holds for our own reuse too.

Timers: each connection has a few deadlines; the layer keeps a heap with at
most one live entry per connection (`conn._heap_when`). Pushing only happens
when a deadline moves earlier; a deadline that moved later (the usual RTO
restart on every ACK) is found out when its old entry pops, and re-pushed.
So the heap stays small and next_deadline() is O(1).

Malformed segments never raise out of receive(): they are counted under
their reason (tcp_truncated, tcp_bad_data_offset, tcp_bad_options) and dropped.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import struct
from collections import Counter, OrderedDict

from ..counters import Counters
from ..wire.tcp import ACK, FIN, HEADER, RST, SYN, TcpPacket, TcpParseError, TcpRepr
from .config import TcpConfig
from .connection import TcpConnection, TcpError
from .state import Event, State

__all__ = ["TcpLayer", "Listener", "TcpConfig", "TcpConnection", "TcpError"]

ANY = b"\x00\x00\x00\x00"
M = 0xFFFFFFFF
HALF = 0x80000000
EPHEMERAL = (49152, 65535)
# A connection id (local ip, local port, remote ip, remote port), as hashed for its ISN.
_CONN_ID = struct.Struct("!4sH4sH")
# Room reserved in front of emitted segments, at most: an Ethernet header
# with two VLAN tags (IEEE 802.1ad, 22 B) + an IPv4 header with options (RFC 791
# §3.1, 60 B), rounded up.
MAX_HEADROOM = 128


class Listener:
    __slots__ = ("ip", "port", "on_accept", "on_request", "backlog", "pending", "accepted")

    def __init__(self, ip: bytes, port: int, on_accept, backlog: int, on_request=None):
        self.ip = ip
        self.port = port
        self.on_accept = on_accept
        # Set for the unclaimed listener (NAT): a SYN is held in SYN-RECEIVED
        # without a SYN-ACK and handed to on_request(conn); conn.accept_held()
        # or conn.refuse_held() answers it later.
        self.on_request = on_request
        self.backlog = backlog
        self.pending = 0            # connections in SYN-RECEIVED
        self.accepted = 0


class TcpLayer:
    def __init__(self, emit, *, rng=None, config: TcpConfig | None = None,
                 defer_acks: bool = False, headroom: int = 0):
        self._emit = emit
        if not 0 <= headroom <= MAX_HEADROOM:
            raise ValueError(f"headroom {headroom} outside 0..{MAX_HEADROOM}")
        # Segments start with this many zero bytes (see the module docstring).
        self.headroom = headroom
        self.pad = bytes(headroom)
        # defer_acks: bare ACKs earned while receiving wait for flush_acks(),
        # which the owner calls when a batch of received frames is done
        # (Stack.take_frames does). Off, every ACK goes out at once.
        self.defer_acks = defer_acks
        self._acks_owed: dict = {}      # connections, in order (a dict as an ordered set)
        self.config = config or TcpConfig()
        self.rng = rng if rng is not None else random.SystemRandom()
        self.counters: Counter = Counters()   # item assignment at dict speed (stack/counters.py)
        self.now = 0.0
        self.tso_max: int | None = None
        self._conns: dict[tuple, TcpConnection] = {}
        self._sndbuf_grown = 0          # the connections' send-buffer growth (TcpConfig.sndbuf_grow_total)
        self._listeners: dict[tuple, Listener] = {}
        self._unclaimed: Listener | None = None
        self._time_wait: OrderedDict = OrderedDict()
        self._heap: list = []
        self._heap_seq = itertools.count()
        self._secret = self.rng.getrandbits(128).to_bytes(16, "big")
        self._challenge_sec = -1
        self._challenge_count = 0
        self._next_port = EPHEMERAL[0] + self.rng.randrange(EPHEMERAL[1] - EPHEMERAL[0])

    # ------------------------------------------------------------ contract

    def set_tso(self, max_payload: int | None) -> None:
        """Allow emitted segments with up to max_payload bytes (gso_size = MSS); None: never."""
        if max_payload is not None and max_payload <= 0:
            max_payload = None
        self.tso_max = max_payload

    def listen(self, ip: bytes, port: int, on_accept, backlog: int = 16) -> Listener:
        if not 0 < port < 65536:
            raise ValueError(f"bad TCP port {port}")
        key = (bytes(ip), port)
        if key in self._listeners:
            raise TcpError(f"port {port} already has a listener")
        lst = Listener(key[0], port, on_accept, max(1, backlog))
        self._listeners[key] = lst
        return lst

    def listen_unclaimed(self, on_request, on_accept, backlog: int) -> Listener:
        """Take SYNs that `receive(..., routed=True)` brings for an address and
        port nobody listens on (the NAT's outbound connections). Each is held
        in SYN-RECEIVED, unanswered, until the application accepts or refuses
        it; `backlog` bounds how many are half-open (held or SYN-ACKed) at once."""
        if self._unclaimed is not None:
            raise TcpError("there is already an unclaimed-SYN listener")
        self._unclaimed = Listener(ANY, 0, on_accept, max(1, backlog), on_request)
        return self._unclaimed

    def unlisten(self, ip: bytes, port: int) -> None:
        self._listeners.pop((bytes(ip), port), None)

    def connect(self, now: float, local_ip: bytes, local_port: int, remote_ip: bytes,
                remote_port: int) -> TcpConnection:
        """Active open. local_port 0 picks an ephemeral port."""
        self.now = now
        local_ip, remote_ip = bytes(local_ip), bytes(remote_ip)
        if not 0 < remote_port < 65536 or not 0 <= local_port < 65536:
            raise ValueError("bad TCP port")
        if local_port == 0:
            local_port = self._ephemeral(local_ip, remote_ip, remote_port)
        key = (local_ip, local_port, remote_ip, remote_port)
        old = self._conns.get(key)
        if old is not None:
            if old.state is not State.TIME_WAIT:
                raise TcpError("connection already exists")
            old._set_state(Event.ABORT)          # reuse a TIME-WAIT pair (we pick a newer ISN)
        if len(self._conns) >= self.config.max_connections:
            raise TcpError("too many connections")
        conn = TcpConnection(self, local_ip, local_port, remote_ip, remote_port,
                             *self._isn(now, key))
        self._conns[key] = conn
        conn._active_open(now)
        return conn

    def owe_ack(self, conn) -> None:
        """conn owes a bare ACK, to go out at the next flush_acks()."""
        self._acks_owed[conn] = None

    def flush_acks(self, now: float) -> None:
        """Send the ACKs owed since the last flush: one per connection, and
        none where a segment sent meanwhile carried it (ack_now is clear)."""
        owed = self._acks_owed
        if not owed:
            return
        self._acks_owed = {}
        self.now = now
        for conn in owed:
            if conn.ack_now and conn.state is not State.CLOSED:
                conn._send_ack(now)

    def receive(self, now: float, src_ip: bytes, dst_ip: bytes, segment,
                routed: bool = False) -> None:
        """routed: the interface's routing step sent this segment on to the
        NAT, so a SYN nobody listens for goes to the unclaimed listener."""
        self.now = now
        c = self.counters
        c["rx_segments"] += 1
        try:
            seg = TcpRepr.parse(TcpPacket.new_checked(segment))
        except TcpParseError as e:
            c[e.reason] += 1
            return
        src_ip = bytes(src_ip)
        dst_ip = bytes(dst_ip)
        key = (dst_ip, seg.dst_port, src_ip, seg.src_port)
        conn = self._conns.get(key)
        if conn is not None:
            if (conn.state is State.TIME_WAIT and seg.flags & (SYN | ACK | RST) == SYN
                    and self._time_wait_reusable(conn, seg)):
                c["time_wait_reused"] += 1
                conn._set_state(Event.ABORT)
            else:
                conn._rx(now, seg)
                return
        if seg.src_port == 0 or seg.dst_port == 0:
            c["rx_port_zero"] += 1
            return
        lst = self._listeners.get((dst_ip, seg.dst_port))
        if lst is None:
            lst = self._listeners.get((ANY, seg.dst_port))
            if lst is None and routed:
                lst = self._unclaimed
        if lst is not None:
            self._listen_rx(now, lst, key, seg)
        else:
            c["rx_closed_port"] += 1
            self._reset_for(seg, dst_ip, src_ip)

    def poll(self, now: float) -> None:
        self.now = now
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, conn = heapq.heappop(heap)
            if conn._heap_when != when:
                continue                      # superseded by an earlier entry
            conn._heap_when = None
            if conn.state is not State.CLOSED:
                conn._on_timer(now)

    def next_deadline(self) -> float | None:
        # A top that is stale because its connection has since closed is
        # dropped here, not at its time: a connect/echo/close race left one
        # such entry per connection, each a wasted timer wake-up of the
        # event loop about an RTO later (issue 12: 1.4 timer wakes per NATed
        # connection). A top that is early because its deadline moved later
        # still costs one idle poll, which re-pushes it.
        heap = self._heap
        while heap:
            when, _, conn = heap[0]
            if conn._heap_when == when and conn.state is not State.CLOSED:
                return when
            heapq.heappop(heap)
            if conn._heap_when == when:
                conn._heap_when = None
        return None

    def snapshot(self, limit: int | None = None) -> list[dict]:
        """Listeners, then connections (at most LIMIT of them, the newest)."""
        from ..config import ip_text
        u = self._unclaimed
        out = [] if u is None else [{"state": "LISTEN", "local": "*:*", "remote": "*:*",
                                     "backlog": u.backlog, "pending": u.pending}]
        out += [{"state": "LISTEN", "local": f"{ip_text(l.ip)}:{l.port}", "remote": "*:*",
                "backlog": l.backlog, "pending": l.pending}
               for l in self._listeners.values()]
        conns = self._conns.values()
        if limit is not None and len(self._conns) > limit:
            conns = list(conns)[len(self._conns) - limit:]
        out += [conn.info() for conn in conns]
        return out

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    @property
    def connections(self) -> list[TcpConnection]:
        return list(self._conns.values())

    # ------------------------------------------------------------ internals

    def _listen_rx(self, now: float, lst: Listener, key: tuple, seg) -> None:
        c = self.counters
        flags = seg.flags
        if flags & RST:
            return
        if flags & ACK:
            # An ACK for a connection we do not have (RFC 9293 3.10.7.2).
            c["rx_no_connection"] += 1
            self._reset_for(seg, key[0], key[2])
            return
        if not flags & SYN:
            c["rx_no_connection"] += 1
            return
        if lst.pending >= lst.backlog:
            c["listen_overflow"] += 1
            return
        if len(self._conns) >= self.config.max_connections:
            c["conn_limit_drops"] += 1
            return
        conn = TcpConnection(self, key[0], key[1], key[2], key[3], *self._isn(now, key))
        conn.listener = lst
        lst.pending += 1
        self._conns[key] = conn
        c["passive_opens"] += 1
        if lst.on_request is not None:
            conn._passive_open(now, seg, hold=True)
            c["held_syns"] += 1
            lst.on_request(conn)
        else:
            conn._passive_open(now, seg)

    def _reset_for(self, seg, local_ip: bytes, remote_ip: bytes) -> None:
        """RST answering a segment that belongs to no connection (RFC 9293 3.10.7.1)."""
        flags = seg.flags
        if flags & RST:
            return
        if flags & ACK:
            self._send_reset(local_ip, remote_ip, seg.dst_port, seg.src_port, seg.ack, 0, RST)
        else:
            seglen = len(seg.payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._send_reset(local_ip, remote_ip, seg.dst_port, seg.src_port, 0,
                             (seg.seq + seglen) & M, RST | ACK)

    def _send_reset(self, local_ip: bytes, remote_ip: bytes, lport: int, rport: int,
                    seq: int, ack: int, flags: int) -> None:
        self.counters["rst_sent"] += 1
        seg = bytearray(self.pad)
        seg += HEADER.pack(lport, rport, seq & M, ack & M, (20 << 10) | flags, 0, 0, 0)
        self._tx(local_ip, remote_ip, seg, 0)

    def _tx(self, src_ip: bytes, dst_ip: bytes, seg: bytearray, gso: int) -> None:
        self.counters["tx_segments"] += 1
        self._emit(src_ip, dst_ip, seg, gso)

    def _time_wait_reusable(self, conn: TcpConnection, seg) -> bool:
        if conn.ts_ok and seg.timestamp is not None:
            return (seg.timestamp[0] - conn.ts_recent) & M < HALF and \
                seg.timestamp[0] != conn.ts_recent
        return 0 < (seg.seq - conn.rcv_nxt) & M < HALF

    def _isn(self, now: float, key: tuple) -> tuple[int, int]:
        """(ISN, timestamp offset) for the connection KEY: RFC 6528's ISN, a
        4 us clock plus a keyed hash of the connection id, and RFC 7323 §5.4's
        per-connection TSval offset, a keyed hash of it too. One 8-byte
        keyed digest gives both (its halves are independent)."""
        h = int.from_bytes(hashlib.blake2s(_CONN_ID.pack(*key), key=self._secret,
                                           digest_size=8).digest(), "big")
        return (int(now * 250_000) + (h >> 32)) & M, h & M

    def _ephemeral(self, local_ip: bytes, remote_ip: bytes, remote_port: int) -> int:
        lo, hi = EPHEMERAL
        for _ in range(hi - lo + 1):
            p = self._next_port
            self._next_port = lo if p >= hi else p + 1
            if (local_ip, p, remote_ip, remote_port) not in self._conns:
                return p
        raise TcpError("no free ephemeral port")

    def _schedule(self, conn: TcpConnection, when: float) -> None:
        h = conn._heap_when
        if h is None or when < h:
            conn._heap_when = when
            heapq.heappush(self._heap, (when, next(self._heap_seq), conn))

    def _enter_time_wait(self, conn: TcpConnection) -> None:
        self._release_sndbuf(conn)      # all it sent is acknowledged; it sends no more
        tw = self._time_wait
        tw[conn.key] = conn
        while len(tw) > self.config.max_time_wait:
            _, old = tw.popitem(last=False)
            self.counters["time_wait_evicted"] += 1
            old._set_state(Event.ABORT)

    def _grow_sndbuf(self, conn: TcpConnection) -> None:
        """Double CONN's send buffer up to sndbuf_max, within the layer's
        sndbuf_grow_total (counted: tcp_sndbuf_grown, tcp_sndbuf_grow_refused)."""
        cfg = self.config
        sb = conn.sndbuf
        new = min(2 * sb.cap, cfg.sndbuf_max)
        delta = new - sb.cap
        if delta <= 0:
            return
        if self._sndbuf_grown + delta > cfg.sndbuf_grow_total:
            self.counters["tcp_sndbuf_grow_refused"] += 1
            return
        sb.cap = new
        conn.sndbuf_grown += delta
        self._sndbuf_grown += delta
        self.counters["tcp_sndbuf_grown"] += 1

    def _release_sndbuf(self, conn: TcpConnection) -> None:
        """CONN sends no more data: its growth goes back to the layer's total,
        and an empty buffer its storage (a TIME-WAIT connection holds none)."""
        sb = conn.sndbuf
        if conn.sndbuf_grown:
            self._sndbuf_grown -= conn.sndbuf_grown
            sb.cap -= conn.sndbuf_grown
            conn.sndbuf_grown = 0
        if not sb.length:
            sb.store = bytearray()
            sb.head = 0

    def _forget(self, conn: TcpConnection) -> None:
        self._release_sndbuf(conn)
        key = conn.key
        if self._conns.get(key) is conn:
            del self._conns[key]
        if self._time_wait.get(key) is conn:
            del self._time_wait[key]

    def _challenge_ok(self, now: float) -> bool:
        sec = int(now)
        if sec != self._challenge_sec:
            self._challenge_sec = sec
            self._challenge_count = 0
        self._challenge_count += 1
        return self._challenge_count <= self.config.challenge_ack_limit
