"""The virtio-net device: TX chains in, RX buffers out, offloads translated.

Data path, top to bottom:

    kick fd -> TX ring (vhostnet/virtio) -> NetDevice.drain_tx -> header.py -> taps (pcap) -> link -> stack
    stack -> link -> NetDevice.flush_rx -> header.py -> taps -> RX ring buffers -> call fd

TX on a split ring goes by runs: from TX_RUN_MIN chains ahead, the run of
one-buffer chains pop_fast() would take comes in one call
(SplitRing.take_readable, C), the stack gets each frame, and the buffers go
back in one call (push_read) once it is done with them; whatever ends a run
goes through pop() as always. Packed rings (and `tx_batch=False`) go chain
by chain.

RX with MRG_RXBUF goes by runs too, split and packed: from RX_RUN_MIN
frames waiting, those that fit one posted buffer each (no GSO, up to the
MTU) go with their headers into the next buffers and their used elements
in one call (_rx_run -> SplitRing/PackedRing.put_frames, C); whatever ends
a run (an odd frame, a buffer pop_fast would not take or too small) goes
through _rx_one as always. `rx_batch=False` goes frame by frame.

`link` is the outermost link layer (vhostnet/link: fault injection, taps
on the stack's side), built by the `link_layers` the constructor is given;
without one it is the stack itself.

The device implements vhostnet.vhostuser.device.Device and sees rings only
through vhostnet.virtio.ring.Ring; it is handed them on every call.

The 12-byte virtio-net header (10 bytes for a legacy driver without
MRG_RXBUF) becomes the offload fields of a stack Frame and back: NEEDS_CSUM
is a partial checksum, GSO_TCPV4 a TSO segment, DATA_VALID a vouched-for
checksum. With CSUM/TSO negotiated both ways the guest and the stack move
64 KiB segments without computing a checksum, which is how a Python
backend keeps up with a guest.

Multiqueue (VIRTIO_NET_F_MQ, `queue_pairs` > 1): ring 2k is pair k's RX,
2k+1 its TX (vhost-user numbering; the control queue stays in QEMU). TX
from every pair goes into the one stack; steering.py picks the RX pair of
each frame for the guest: the pair its flow was sent from, else a hash
over the pairs whose RX ring is ready (QEMU disables the rings of pairs
the driver stopped using). With one pair none of this runs.

Bounded: frames for the guest wait in their pair's `rx_pending` deque (at
most `rx_pending_limit` frames each) while the guest has posted no RX
buffers; past that they are dropped and counted. A TX frame larger than 64 KiB plus
headers is dropped. Every driver mistake is counted by reason and logged
rate-limited.
"""
from __future__ import annotations

import array
import collections
import logging
import os
import struct
from typing import Sequence

import trio

from stack import Frame, NetConfig, Stack
from stack.checksum import finalize_l4_checksum
from stack.counters import Counters
from stack.services.config import ServicesConfig
from stack.services.dns import DnsQuery

from vhostnet.hostnet.dns import DnsForwarder
from vhostnet.hostnet.express import UdpExpress
from vhostnet import native as express_native
from vhostnet.logging_setup import one_line_traceback

from vhostnet.virtio import features as F
from vhostnet.net.steering import Steering
from vhostnet.net.header import (DATA_VALID, GSO_ECN, GSO_NONE, GSO_TCPV4, HDR10, HDR12, MAX_FRAME,
                                  NEEDS_CSUM, hdr_len_for, scatter)
from stack.native import scatter_region
from vhostnet.ratelimit import RateLimitedLog
from vhostnet.virtio.ring import MAX_CHAIN_DESCS, Budget, Ring

__all__ = ["NetDevice"]

log = logging.getLogger("vhostnet.net")

_ONE = (1).to_bytes(8, "little")
_ETH_IP_TCP = struct.Struct("!12xH")  # ethertype
RX, TX = 0, 1
# The largest frame without and with receive offloads (virtio 1.2 §5.1.6.3): the
# RX buffers a driver without MRG_RXBUF SHOULD post hold one plus the header.
RX_FRAME_MAX = 1514
RX_GSO_FRAME_MAX = 65550
VIRTIO_NET_HDR_F_RSC_INFO = 4       # §5.1.6: never for the driver to set (§5.1.6.2.1)
_NUM_BUFFERS = struct.Struct("<H")  # num_buffers, at offset 10 of the 12-byte header
NUM_BUFFERS_OFFSET = 10
# Guest-controlled work per event-loop step, in descriptors (refused chains
# count too): then the step ends and the loop yields, so the message loop
# and the other ring get their turn. At a few microseconds per descriptor
# plus the stack's work per frame this keeps a step well under 10 ms.
TX_BUDGET = 256
# Chains ahead in a split TX ring from which drain_tx takes them as a run in
# one call (SplitRing.take_readable); fewer go one by one through pop_fast(),
# cheaper than the call's set-up for one or two (docs/benchmarks.md, "The
# split TX walk").
TX_RUN_MIN = 4
# Frame bytes per TX step: past them the step ends (its ACKs and used
# buffers go to the guest, the call is written) and the next one starts at
# once. The guest's TCP can send no more than the window until our ACK comes;
# with the ACKs of a burst all at its end, the guest and the device take
# turns and each waits for the other. RFC 5681 §4.2 / RFC 9293 §3.8.6.3:
# a receiver ACKs at least every second full-sized segment; two 64 KiB TSO
# frames is that at TSO's scale (docs/benchmarks.md, "ACKs within a burst").
TX_STEP_BYTES = 128 * 1024
# Rounds of one TX step (drain_tx): the chains the driver posted while the
# last round ran, taken at once. Bounded by the step's one budget too.
TX_ROUNDS = 4
RX_BUDGET = 256
# Frames waiting from which a split RX ring with MRG_RXBUF gets a run of
# them in one call (SplitRing.put_frames, C); a lone frame goes through
# _rx_one, cheaper than the run's set-up (scripts/bench_rx_run.py: a run of
# 1 costs 1.05-1.2x _rx_one, of 2 0.8-0.85x; docs/benchmarks.md, "The split
# RX run").
RX_RUN_MIN = 2
# `serve --queues`: the most queue pairs offered. QEMU's own limit for
# -netdev vhost-user,queues= is MAX_QUEUE_NUM (include/net/net.h, 1024); one
# Python thread runs every ring, so more pairs than guest CPUs only adds rings to poll.
MAX_QUEUE_PAIRS = 64


def queue_names(pairs: int) -> tuple[str, ...]:
    """rx, tx for pair 0 (as with one pair), then rx1, tx1, rx2, tx2..."""
    return ("rx", "tx") + tuple(f"{d}{k}" for k in range(1, pairs) for d in ("rx", "tx"))


class NetDevice:
    num_queues = 2
    queue_names = ("rx", "tx")

    def __init__(self, config: NetConfig | None = None, *, features: int = F.DEFAULT_FEATURES,
                 queue_pairs: int = 1, rx_pending_limit: int = 1024, rlog: RateLimitedLog | None = None,
                 taps: list | None = None, link_layers=None, hostnet=None,
                 net_services: ServicesConfig | None = None, dns_upstreams=(), tx_batch: bool = True,
                 tx_step_bytes: int = TX_STEP_BYTES, rx_batch: bool = True):
        self.config = config or NetConfig()
        # Split TX rings: take runs of chains per call (SplitRing.take_readable).
        # False: one chain at a time, as on packed rings (tests and benchmarks
        # hold the two to the same outcome and compare their speed).
        self.tx_batch = tx_batch
        # RX rings with MRG_RXBUF (split and packed): small frames a run per
        # call (Ring.put_frames); False: each through _rx_one (tests hold the
        # two to the same end state).
        self.rx_batch = rx_batch
        self.tx_step_bytes = tx_step_bytes
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue pairs {queue_pairs} not in 1..{MAX_QUEUE_PAIRS}")
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        self.queue_names = queue_names(queue_pairs)
        # MQ (§5.1.3) only with something to steer; MQ's CTRL_VQ is QEMU's (the control queue stays there).
        self.device_features = features | (1 << F.MQ if queue_pairs > 1 else 0)
        self.steering = Steering(queue_pairs) if queue_pairs > 1 else None
        self._all_pairs = tuple(range(queue_pairs))
        # With a host network (vhostnet/hostnet), the stack's NAT flows are
        # driven by a HostProxy that `run` starts in the connection's nursery.
        # DHCP/DNS/TFTP run inside the stack; DNS queries leave it as pulled
        # events that `dns` relays upstream from the same nursery.
        if hostnet is None:
            self.stack = Stack(self.config, net_services=net_services)
            self.proxy = None
        else:
            self.stack = Stack(self.config, flows=hostnet.config.flows,
                               services=hostnet.config.services, net_services=net_services)
            self.proxy = hostnet.make_proxy(self.stack.flows, self.config.gateway_ip_b,
                                            self.config.guest_ip_b)
        # The UDP express (vhostnet/hostnet/express.py): an established UDP
        # flow's datagrams from the TX ring to the host socket in one C call.
        self.express = None
        self._stack_receive = self.stack.receive
        self._express_receive = None
        if self.proxy is not None and hostnet.config.express and express_native.AVAILABLE:
            xp = self.express = self.proxy.express = UdpExpress(
                self.stack, self.proxy, hostnet.config.flows.max_udp,
                gateway_mac=self.config.gateway_mac_b, guest_ip=self.config.guest_ip_b)
            self._express_receive = xp.receiver(self._stack_receive)
        self._services = net_services is not None
        self.dns = (DnsForwarder(dns_upstreams, budget=net_services.dns_timeout * 0.9,
                                 max_pending=net_services.dns_max_inflight)
                    if net_services is not None and net_services.dns and dns_upstreams else None)
        # Link layers (vhostnet/link: faults, stack-side taps) wrap the stack;
        # frames and time go through the outermost one, which is the stack if none.
        self.link = link_layers(self.stack) if link_layers is not None else self.stack
        self.rlog = rlog or RateLimitedLog(log)
        self.negotiated = 0
        self.hdr_len = 12
        self.mrg = False
        self.guest_csum = False
        self.guest_tso = False
        self.host_csum = False
        self.host_tso = False
        # Frames waiting for RX buffers, one deque per pair; rx_pending is pair 0's.
        self.rx_pendings: list[collections.deque[Frame]] = [collections.deque() for _ in range(queue_pairs)]
        self.rx_pending = self.rx_pendings[0]
        self.rx_pending_limit = rx_pending_limit
        self.counters = Counters()   # a Counter with item assignment at dict speed (stack/counters.py)
        # Link taps, callables tap(direction, frame), "tx" = from the guest.
        # The list is the caller's: a capture can outlive a connection.
        self.taps: list = taps if taps is not None else []
        self.mtu = self.config.mtu
        self.rx_min = self.hdr_len + RX_FRAME_MAX   # §5.1.6.3.1, set again by set_features
        # The headers of _rx_run's frames without a partial checksum: plain,
        # and vouched for (DATA_VALID when GUEST_CSUM allows it; plain else),
        # num_buffers 1 (§5.1.6.4). Set again by set_features.
        self._rx_hdr_plain = self._rx_hdr_valid = HDR12.pack(0, GSO_NONE, 0, 0, 0, 0, 1)
        self._rx_more = False   # flush_rx stopped on its budget with work left
        # RX ring index -> the ring's epoch when the head of its pending frames
        # found no room; present only while the driver has posted nothing since. See _fill.
        self._rx_stalled: dict[int, int] = {}
        self.rx_waits = 0       # times a frame found no room and began to wait (not a drop)

    # -- negotiation (called by the backend) -----------------------------

    def set_features(self, feats: int) -> None:
        self.negotiated = feats
        has = lambda bit: bool(feats >> bit & 1)
        self.mrg = has(F.MRG_RXBUF)
        self.hdr_len = hdr_len_for(self.mrg, has(F.VERSION_1))
        rx_gso = has(F.GUEST_TSO4) or has(F.GUEST_TSO6) or has(F.GUEST_UFO)
        self.rx_min = self.hdr_len + (RX_GSO_FRAME_MAX if rx_gso else RX_FRAME_MAX)
        self.guest_csum = has(F.GUEST_CSUM)
        self._rx_hdr_valid = HDR12.pack(DATA_VALID if self.guest_csum else 0, GSO_NONE, 0, 0, 0, 0, 1)
        self.guest_tso = has(F.GUEST_TSO4) and self.guest_csum
        self.host_csum = has(F.CSUM)
        self.host_tso = has(F.HOST_TSO4) and self.host_csum
        self.stack.set_offloads(csum=self.guest_csum, tso=self.guest_tso)
        if feats:
            log.info("features negotiated: %s", " ".join(F.names(feats)))

    @property
    def vhost_queue_num(self) -> int:
        """What GET_QUEUE_NUM answers: queue pairs, as QEMU's net/vhost-user.c reads it."""
        return self.queue_pairs

    def set_mtu(self, mtu: int) -> None:
        self.mtu = mtu

    def get_config(self, offset: int, size: int) -> bytes:
        # struct virtio_net_config: mac, status (LINK_UP), max_virtqueue_pairs, mtu
        cfg = self.config.guest_mac_b + struct.pack("<HHH", 1, self.queue_pairs, self.mtu)
        return cfg[offset:offset + size].ljust(size, b"\0") if 0 <= offset <= 0x100 and size <= 0x100 else b""

    # -- events ----------------------------------------------------------

    def process(self, rings: Sequence[Ring], index: int, now: float) -> bool:
        """Work on ring INDEX after a kick (or a poll). True if more work is waiting."""
        if index & 1:
            return self.drain_tx(rings, now, pair=index >> 1)
        return self.flush_rx(rings)

    def poll(self, rings: Sequence[Ring], now: float) -> None:
        self.link.poll(now)
        self.flush_rx(rings)
        self._wake_proxy()

    def _wake_proxy(self, flush: bool = True) -> None:
        p = self.proxy
        if p is not None and self.stack.flows.pending:
            p.pump(flush)

    def idle_watch_fds(self) -> tuple[int, ...]:
        """What a kick waiter's idle poll gives way to: the host sockets' reactor, while it runs."""
        p = self.proxy
        r = p.reactor if p is not None else None
        return () if r is None else (r.fileno(),)

    def next_deadline(self):
        if self._rx_more:
            return 0.0   # RX work left over from a spent budget: poll() as soon as the loop allows
        return self.link.next_deadline()

    async def run(self, rings: Sequence[Ring], after_work) -> None:
        """The device's own tasks for the life of the connection: the host
        proxy and the DNS upstream relay (returns at once when there are none)."""
        async with trio.open_nursery() as nursery:
            if self.proxy is not None:
                def flush() -> None:
                    self.flush_rx(rings)
                    after_work()
                nursery.start_soon(self.proxy.run, flush)
            if self.dns is not None:
                nursery.start_soon(self._relay_dns, rings, after_work)

    async def _relay_dns(self, rings: Sequence[Ring], after_work) -> None:
        """Each upstream answer goes into the stack, its frame to the guest,
        and after_work() re-arms the server's timer."""
        dns = self.stack.net_services.dns

        def deliver(key: int, wire: bytes | None, reason: str | None) -> None:
            if wire is not None:
                dns.answer(key, wire)
            else:
                dns.fail(key, reason or "failed")
            self.flush_rx(rings)
            after_work()
        await self.dns.serve(deliver)

    def _service_io(self) -> None:
        """Send the stack's new DNS queries upstream (SERVFAIL if there is none)."""
        dns = self.stack.net_services.dns
        for ev in self.stack.take_events():
            if isinstance(ev, DnsQuery):
                if self.dns is None or not self.dns.submit(ev):
                    dns.fail(ev.key, "failed")      # no upstream: SERVFAIL now

    def _signal(self, q) -> None:
        if q.call_fd is None:
            return
        try:
            os.write(q.call_fd, _ONE)
            q.stats["calls"] += 1
        except BlockingIOError:
            q.stats["calls"] += 1  # counter saturated: the guest has an interrupt pending anyway
        except OSError as e:
            self.rlog.warning("call_fd", "%s: cannot signal call fd: %s", q.name, e)

    def _count(self, reason: str, detail: str = "", *args) -> None:
        self.counters[reason] += 1
        if detail:
            self.rlog.warning(reason, detail, *args)

    def _refuse(self, q, reason: str, example: dict, detail: str, *args) -> None:
        """A driver mistake: a device counter (stats' drops) and a finding on the ring, which logs it."""
        self.counters[reason] += 1
        finding = q.record(reason, detail % args, **example)
        r = finding.rule
        self.rlog.warning(reason, detail + " (%s %s)", *args, r.message, r.level)

    def _note(self, q, reason: str, example: dict, detail: str, *args) -> None:
        """A driver mistake the device tolerates: a finding on the ring, logged; no drop counted."""
        finding = q.record(reason, detail % args, **example)
        r = finding.rule
        self.rlog.warning(reason, detail + " (%s %s; tolerated)", *args, r.message, r.level)

    def _check_tx_header(self, q, head: int, hdr, flags: int, gso_type: int) -> None:
        """The driver requirements of §5.1.6.2.1 the device can carry on after."""
        if self.hdr_len == 12:
            nbuf = _NUM_BUFFERS.unpack_from(hdr, NUM_BUFFERS_OFFSET)[0]
            if nbuf:
                self._note(q, "tx_num_buffers", {"head": head, "expected": 0, "seen": nbuf},
                           "tx: header at descriptor %d has num_buffers %d", head, nbuf)
        if flags & NEEDS_CSUM and not self.host_csum:
            self._note(q, "tx_csum_not_negotiated", {"head": head, "expected": "flags 0", "seen": flags},
                       "tx: header at descriptor %d sets NEEDS_CSUM, VIRTIO_NET_F_CSUM not negotiated", head)
        if flags & (DATA_VALID | VIRTIO_NET_HDR_F_RSC_INFO):
            self._note(q, "tx_data_valid", {"head": head, "expected": "no DATA_VALID, no RSC_INFO",
                                            "seen": f"flags {flags:#x}"},
                       "tx: header at descriptor %d sets flags %#x (DATA_VALID/RSC_INFO)", head, flags)

    # -- TX: guest -> stack ----------------------------------------------

    def drain_tx(self, rings: Sequence[Ring], now: float, budget: int | None = None, pair: int = 0) -> bool:
        """One step's TX work on PAIR: up to TX_ROUNDS rounds, one budget. True: more waits."""
        q = rings[2 * pair + TX]
        if not q.ready:
            return False
        b = Budget(TX_BUDGET if budget is None else budget)
        # A driver that posted more while a round ran (a TCP guest's ACK, data
        # and FIN, microseconds apart) gets another round now, inside the same
        # budget, not in a later step: that was a trio task and a scheduler
        # pass per such burst (issue 12, the crr profile). A round that ends
        # on the budget or on the step's bytes ends the step.
        for _ in range(TX_ROUNDS):
            more = self._tx_round(rings, q, now, b, pair)
            if not more or b.spent:
                return more
        return more

    def _tx_round(self, rings: Sequence[Ring], q, now: float, b: Budget, pair: int) -> bool:
        """The chains in ring Q now, within budget B, to the stack and the NAT;
        then the used buffers, the host's answers and the calls. True: more waits."""
        step_bytes = self.tx_step_bytes
        # Per frame, the fewest Python calls: the ring's fast path first (pop()
        # would start with it too), the frame counters summed here and added
        # once per drain, and the link layers asked once which of them has
        # work to do on this batch (Link.receiver: the stack's own receive
        # when no fault is in force and no stack-side tap installed).
        pop_fast, pop, push = q.pop_fast, q.pop, q.push
        # Split rings: the run of common chains in one call (take_readable:
        # pop_fast()'s checks, in C), their frames, then their used elements
        # in one call (push_read); whatever ends a run goes through pop().
        take = None if q.packed or not self.tx_batch else q.take_readable
        tx_frame = self._tx_frame
        hl = self.hdr_len
        hl12 = hl == 12                              # num_buffers is there (§5.1.6)
        shortest, longest = hl + 14, hl + MAX_FRAME  # _tx_frame's tx_runt and tx_oversize bounds
        receive = self.link.receiver(now)
        xp = self.express
        if xp is not None and receive == self._stack_receive:
            # Nothing between the device and the stack (no faults, no stack-side taps).
            xp.check_binds(self.stack.udp.binds)
            receive = self._express_receive
        taps = self.taps
        steering = self.steering
        frames = nbytes = 0
        while True:
            if take is not None:
                region, heads, offs, lens = take(b, TX_RUN_MIN)
                if heads:
                    done = 0
                    for head, off, n in zip(heads, offs, lens):
                        done += 1
                        v = region[off:off + n]
                        try:
                            # A plain frame (header flags 0, GSO_NONE, num_buffers
                            # 0: ARP, ICMP, anything sent without offloads) needs
                            # nothing of _tx_frame but its length check: built
                            # here, a call less per frame. Anything else goes there.
                            if shortest <= n <= longest and not (v[0] or v[1] or (hl12 and (v[10] or v[11]))):
                                frame = Frame(v[hl:])
                            else:
                                frame = tx_frame(q, head, (v,), n)
                            if frame is not None:
                                frames += 1
                                nbytes += len(frame.data)
                                if steering is not None:
                                    steering.learn(frame.data, pair)
                                for tap in taps:
                                    tap("tx", frame)
                                receive(frame, now)
                        except Exception as e:  # a stack bug must not take the device down
                            self._tx_internal_error(e)
                        if q.broken is not None or nbytes >= step_bytes:
                            # --strict: this frame's violation broke the ring; or
                            # the step's bytes are done. The chains after it go
                            # back untaken, as pop_fast() would never have taken them.
                            q.untake(heads[done:], b)
                            del heads[done:]
                            break
                    # The buffers go back only after the stack is done with
                    # them: frame views point into guest memory.
                    q.push_read(heads)
                    if nbytes >= step_bytes:
                        b.left = 0
                        break
                    continue
                if region is not None:
                    chain = pop(b, False)    # take() just looked: straight to the walk
                else:
                    chain = pop_fast(b) or pop(b, False)
            else:
                chain = pop_fast(b)
                if chain is None:
                    chain = pop(b, False)    # pop_fast just looked: straight to the walk
            if chain is None:
                break
            try:
                frame = tx_frame(q, chain.head, chain.readable, chain.read_len)
                if frame is not None:
                    frames += 1
                    nbytes += len(frame.data)
                    if steering is not None:
                        steering.learn(frame.data, pair)
                    for tap in taps:
                        tap("tx", frame)
                    receive(frame, now)
            except Exception as e:  # a stack bug must not take the device down
                self._tx_internal_error(e)
            # The buffer goes back only after the stack is done with it:
            # frame views point into guest memory.
            push(chain.head, 0)
            if nbytes >= step_bytes:
                b.left = 0      # "more": the next step starts as soon as the loop allows
                break
        chain = frame = region = v = None    # no view of guest memory outlives the drain
        if frames:
            c = self.counters
            c["tx_frames"] += frames
            c["tx_bytes"] += nbytes
            if xp is not None:
                xp.settle(now)
        # The NAT first: the guest's datagrams and SYNs go to their host
        # sockets before the eventfd write below, which wakes QEMU and on a
        # busy host may cost this process its core (issue 12 latency profile).
        # No flush of the proxy's own: this drain flushes RX below, after the
        # spin, and the server re-arms the timer after the step.
        self._wake_proxy(flush=False)
        # Chains refused by pop() were pushed too, so publish regardless.
        notify = False
        if q.has_unpublished():
            notify = q.publish()
            if not notify:
                q.stats["calls_suppressed"] += 1
        more = (b.spent or q.want_kick_at_next()) and q.ready
        # The host's answers to what just left, if they come at once
        # (HostProxy.spin), go to the guest in this step, and the TX call is
        # written after the RX one: microseconds apart, QEMU raises one
        # interrupt for both (TCG has no irqfd: each call is a main-loop
        # wake-up and an INTx the guest handles).
        if self.proxy is not None:
            self.proxy.spin()
        self.flush_rx(rings)
        if notify:
            if q.still_wants_call():
                self._signal(q)
            else:
                q.stats["calls_late_suppressed"] += 1
        return more

    def _tx_internal_error(self, e: Exception) -> None:
        self.counters["tx_internal_error"] += 1
        # A guest can trigger this per frame: rate-limited, one line.
        self.rlog.log(logging.ERROR, "tx_internal_error",
                      "internal error handling a TX frame: %s", one_line_traceback(e))

    def _tx_frame(self, q, head: int, views, total: int) -> Frame | None:
        """The frame of the TX chain at HEAD (its device-readable VIEWS, TOTAL
        bytes), its virtio-net header checked and turned into offload fields;
        None if refused (counted, a finding recorded)."""
        hl = self.hdr_len
        if total < hl + 14:
            return self._refuse(q, "tx_runt", {"head": head, "expected": f">= {hl + 14} bytes", "seen": total},
                                "tx: chain of %d bytes is shorter than the %d-byte virtio-net header plus an Ethernet header",
                                total, hl)
        if total > hl + MAX_FRAME:
            return self._refuse(q, "tx_oversize", {"head": head, "expected": f"<= {hl + MAX_FRAME} bytes",
                                                   "seen": total},
                                "tx: frame of %d bytes exceeds the %d-byte maximum", total - hl, MAX_FRAME)
        first = views[0]
        if len(views) == 1:
            hdr = first
            data = first[hl:]
        elif len(first) == hl and len(views) == 2:
            hdr = first
            data = views[1]
        elif len(first) >= hl:
            # Linux's layout (header pushed in front of the linear part, then
            # the fragments): one join of the frame alone, and bytes, so the
            # stack need not make its private copy of it again.
            hdr = first
            data = b"".join([first[hl:], *views[1:]])
        else:
            buf = b"".join(views)
            hdr = buf
            data = buf[hl:]
        flags, gso_type, _hl, gso_size, csum_start, csum_offset = HDR10.unpack_from(hdr)
        # The checks of _check_tx_header, tested inline first (one call per
        # frame saved): a nonzero num_buffers, NEEDS_CSUM without CSUM,
        # DATA_VALID or RSC_INFO.
        if q.checks and ((hl == 12 and (hdr[10] or hdr[11]))
                         or flags & (DATA_VALID | VIRTIO_NET_HDR_F_RSC_INFO)
                         or (flags & NEEDS_CSUM and not self.host_csum)):
            self._check_tx_header(q, head, hdr, flags, gso_type)
            if q.broken is not None:
                return   # --strict: the violation broke the ring; its frame goes nowhere
        frame = Frame(data)
        if flags & NEEDS_CSUM:
            if csum_start + csum_offset + 2 > len(data) or csum_start < 14:
                return self._refuse(q, "tx_bad_csum_offset",
                                    {"head": head, "csum_start": csum_start, "csum_offset": csum_offset,
                                     "expected": f"14 <= csum_start, csum_start + csum_offset + 2 <= {len(data)}",
                                     "seen": csum_start + csum_offset + 2},
                                    "tx: NEEDS_CSUM with csum_start %d + csum_offset %d outside the %d-byte frame",
                                    csum_start, csum_offset, len(data))
            frame.csum_start = csum_start
            frame.csum_offset = csum_offset
        elif flags & DATA_VALID:
            frame.csum_valid = True
        if gso_type != GSO_NONE:
            if gso_type & ~GSO_ECN != GSO_TCPV4 or not self.host_tso:
                return self._refuse(q, "tx_bad_gso",
                                    {"head": head, "gso_type": gso_type, "gso_size": gso_size,
                                     "expected": "TCPV4 with HOST_TSO4" if self.host_tso else "GSO_NONE",
                                     "seen": f"gso_type {gso_type} gso_size {gso_size}"},
                                    "tx: gso_type %d gso_size %d not allowed by the negotiated features (HOST_TSO4=%s)",
                                    gso_type, gso_size, self.host_tso)
            if gso_size == 0:
                return self._refuse(q, "tx_gso_without_size",
                                    {"head": head, "gso_type": gso_type, "expected": "gso_size > 0 (the MSS)",
                                     "seen": 0}, "tx: gso_type %d with gso_size 0", gso_type)
            if not flags & NEEDS_CSUM:
                return self._refuse(q, "tx_gso_without_csum",
                                    {"head": head, "gso_type": gso_type, "expected": "NEEDS_CSUM in flags",
                                     "seen": f"flags {flags:#x}"},
                                    "tx: gso_type %d without NEEDS_CSUM", gso_type)
            frame.gso_size = gso_size
        return frame

    # -- RX: stack -> guest ----------------------------------------------

    def flush_rx(self, rings: Sequence[Ring]) -> bool:
        if self._services:
            self._service_io()
        out = self.link.take_frames()
        if self.steering is not None:
            return self._flush_pairs(rings, out)
        pending = self.rx_pending
        if out:
            self._queue_rx(pending, out)
        self._rx_more = False
        if not pending:
            self._rx_stalled.pop(RX, None)
            return False
        q = rings[RX]
        if not q.ready:
            return False
        self._rx_more = self._fill(q, pending)
        return self._rx_more

    def _queue_rx(self, pending: collections.deque, out) -> None:
        """OUT joins PENDING, past rx_pending_limit dropped and counted."""
        room = self.rx_pending_limit - len(pending)
        if len(out) > room:
            dropped = len(out) - max(room, 0)
            out = out[:max(room, 0)]
            self.counters["rx_dropped_no_buffers"] += dropped
            self.rlog.warning("rx_dropped_no_buffers",
                              "rx: guest posts no RX buffers; %d frame(s) dropped (%d waiting)",
                              dropped, len(pending))
        pending.extend(out)

    def _flush_pairs(self, rings: Sequence[Ring], out) -> bool:
        """Multiqueue: each frame to its pair's deque (steering.py), then every ready RX ring filled."""
        pendings = self.rx_pendings
        ready = [p for p in self._all_pairs if rings[2 * p + RX].ready]
        if ready:
            # Frames left on a pair whose ring went away (disabled by `ethtool -L`, stopped)
            # are steered again, ahead of the new ones.
            stranded = [f for p in self._all_pairs if p not in ready for f in pendings[p]]
            if stranded:
                for p in self._all_pairs:
                    if p not in ready:
                        pendings[p].clear()
                out = stranded + list(out)
        if out:
            choose = self.steering.choose
            among = ready or self._all_pairs
            by_pair: dict[int, list] = {}
            for f in out:
                by_pair.setdefault(choose(f.data, among), []).append(f)
            for p, frames in by_pair.items():
                self._queue_rx(pendings[p], frames)
        more = False
        for p in ready:
            if pendings[p]:
                more |= self._fill(rings[2 * p + RX], pendings[p])
            else:
                self._rx_stalled.pop(2 * p + RX, None)
        self._rx_more = more
        return more

    def _fill(self, q, pending: collections.deque) -> bool:
        """Frames of PENDING into ring Q's posted buffers, a budget's worth. True: call again soon."""
        # A frame that found no room waits for the driver to post more (or to
        # restart the ring): until then, trying again would walk the same
        # buffers and give them back, as often as anything calls flush_rx
        # (every TX drain, timer poll, host socket and 1 kHz ring poll): busy
        # for nothing, up to MAX_CHAIN_DESCS descriptors a time.
        if self._rx_stalled.get(q.index) == q.epoch and not q.want_kick_at_next(q.avail_seen):
            return False
        self._rx_stalled.pop(q.index, None)
        b = Budget(RX_BUDGET)
        waiting = False
        # MRG_RXBUF: the frames that fit a buffer each, a run per call
        # (_rx_run); whatever ends a run (a frame to treat, a buffer that is
        # not the common case) goes through _rx_one.
        run = self._rx_run if self.mrg and self.rx_batch else None
        while pending and not b.spent and q.ready:
            if run is not None and len(pending) >= RX_RUN_MIN:
                if not run(q, pending, b):
                    # The ring holds an entry the run does not take: the rest
                    # of this fill frame by frame, so that a ring of such
                    # entries costs one run's set-up per fill, not per frame.
                    run = None
                if not pending or b.spent:
                    break
            if self._rx_one(q, pending[0], b):
                pending.popleft()
                continue
            # No room: the buffers posted (given back by rollback) are not
            # enough. Ask to be kicked when the driver posts more; go round
            # again only if it already has (the budget bounds the retries).
            if not q.ready or not q.want_kick_at_next(q.avail_seen):
                waiting = True
                self._rx_stalled[q.index] = q.epoch
                self.rx_waits += 1
                break
        if q.has_unpublished():
            if q.publish():
                self._signal(q)
            else:
                q.stats["calls_suppressed"] += 1
        # Budget spent with frames and buffers waiting: poll() again at once
        # (next_deadline), after the loop has had its turn.
        # Not when the frame waits for the driver: a failed gather (a looping
        # chain walked and given back, say) can spend the budget too, and
        # "more" then would poll the same ring for ever without a kick.
        return bool(pending) and b.spent and q.ready and not waiting

    def _rx_run(self, q, pending: collections.deque, budget: Budget) -> bool:
        """The frames at the head of PENDING that _rx_one's fast path would
        write whole into one buffer each, as a run in one call
        (SplitRing.put_frames); popped from PENDING and counted. False if
        the ring stopped the run short (an entry it does not take, or no
        cached region yet); True if it took every frame it was given, or
        there were fewer than RX_RUN_MIN to give (no call made).

        A frame joins the run if _rx_one would give it the fast path with
        no work of its own: no GSO, at most RX_FRAME_MAX bytes, a partial
        checksum only when the guest takes it (GUEST_CSUM: NEEDS_CSUM in
        the header; without it _rx_one completes the checksum, which can
        fail and be counted). Its header is _rx_one's, num_buffers 1. The
        run ends at the first other frame, and the ring ends it at the
        first buffer pop_fast would not take or that is too small, exactly
        where _rx_one's fast path would give up: what follows goes through
        _rx_one, which does with it what it did before. Taps see each
        frame in order once the run is written.
        """
        plain, valid = self._rx_hdr_plain, self._rx_hdr_valid
        guest_csum = self.guest_csum
        pack, hl = HDR12.pack, HDR12.size
        parts = []
        lens = array.array("I")
        # No more frames than the budget and the buffers posted could take
        # (a jump past the queue size: put_frames refuses, _rx_one judges);
        # a packed ring scans its descriptors for that, so no further than needed.
        limit = min(budget.left, q.pending(min(budget.left, len(pending))) if q.packed else q.pending())
        if limit < RX_RUN_MIN:
            return True
        for f in pending:
            if f.gso_size:
                break
            data = f.data
            n = len(data)
            if n > RX_FRAME_MAX:
                break
            if f.csum_start:
                if not guest_csum:
                    break
                parts.append(pack(NEEDS_CSUM, GSO_NONE, 0, 0, f.csum_start, f.csum_offset, 1))
            else:
                parts.append(valid if f.csum_valid else plain)
            parts.append(data)
            lens.append(hl + n)
            if len(lens) >= limit:
                break
        k = len(lens)
        if k < RX_RUN_MIN:
            return True
        done = q.put_frames(b"".join(parts), lens, budget)
        if not done:
            return False
        c = self.counters
        c["rx_frames"] += done
        c["rx_bytes"] += sum(lens[:done]) - hl * done
        taps = self.taps
        popleft = pending.popleft
        if taps:
            for _ in range(done):
                f = popleft()
                for tap in taps:
                    tap("rx", f)
        elif done == len(pending):
            pending.clear()
        else:
            for _ in range(done):
                popleft()
        return done == k

    def _rx_one(self, q, f: Frame, budget: Budget) -> bool:
        """Write one frame into posted RX buffers, or drop it. False: no room yet, try later."""
        data = f.data
        n = len(data)
        flags = gso_type = hdr_len = gso_size = cs = co = 0
        if f.gso_size:
            if not self.guest_tso:
                self._count("rx_gso_not_negotiated")
                return True
            gso_type, gso_size = GSO_TCPV4, f.gso_size
        if f.csum_start:
            if self.guest_csum:
                flags = NEEDS_CSUM
                cs, co = f.csum_start, f.csum_offset
            else:
                try:
                    finalize_l4_checksum(f)
                except ValueError as e:
                    self._count("rx_bad_partial_checksum", "rx: %s", e)
                    return True
                data = f.data
        elif f.csum_valid and self.guest_csum:
            flags = DATA_VALID
        need = self.hdr_len + n
        if self.mrg:
            # Fast path for a frame up to the MTU (a 64 B echo in a 4 KiB
            # buffer): the next buffer holds header and frame, no tentative
            # take. pop_fast takes only a chain that needs no finding, so
            # giving a too-small one back (nothing pushed since) leaves
            # nothing behind, and _gather decides. A TSO frame goes straight
            # to _gather: it needs many buffers (17 of Linux's 4 KiB ones).
            if need <= self.hdr_len + RX_FRAME_MAX:
                c = q.pop_fast(budget)
                if c is not None:
                    if c.writable and c.write_len >= need:
                        hdr = HDR12.pack(flags, gso_type, hdr_len, gso_size, cs, co, 1)
                        self._write_one(q, c, hdr, data, need)
                        self.counters["rx_frames"] += 1
                        self.counters["rx_bytes"] += n
                        for tap in self.taps:
                            tap("rx", f)
                        return True
                    q.unpop()
                    budget.left += c.ndesc   # _gather charges it again
            # The common case in one call: the next buffers are plain ones and
            # hold the frame; the ring writes it, num_buffers included.
            if q.put_frame(HDR12.pack(flags, gso_type, hdr_len, gso_size, cs, co, 0), data, self.hdr_len,
                           budget, NUM_BUFFERS_OFFSET):
                self.counters["rx_frames"] += 1
                self.counters["rx_bytes"] += n
                for tap in self.taps:
                    tap("rx", f)
                return True
            got = self._gather(q, need, budget)
            if got is None:
                return False
            if not got:
                return True   # dropped, counted
            hdr = HDR12.pack(flags, gso_type, hdr_len, gso_size, cs, co, len(got[0]))
            self._write_merged(q, got, hdr, data, need)
        else:
            c = q.pop(budget)
            if c is None:
                return False
            if c.write_len < self.rx_min and q.checks:
                self._note(q, "rx_buffer_below_minimum",
                           {"head": c.head, "expected": f">= {self.rx_min} bytes", "seen": c.write_len},
                           "rx: buffer at descriptor %d holds %d bytes; without MRG_RXBUF the spec asks "
                           "for %d", c.head, c.write_len, self.rx_min)
            if c.write_len < need:
                q.unpop()
                self._refuse(q, "rx_buffer_too_small",
                             {"head": c.head, "expected": f">= {need} bytes", "seen": c.write_len},
                             "rx: posted buffer of %d bytes cannot hold a %d-byte frame plus the %d-byte header "
                             "(without MRG_RXBUF each buffer must hold a whole frame); frame dropped",
                             c.write_len, n, self.hdr_len)
                return True
            hdr = (HDR12.pack(flags, gso_type, hdr_len, gso_size, cs, co, 1) if self.hdr_len == 12
                   else HDR10.pack(flags, gso_type, hdr_len, gso_size, cs, co))
            scatter(c.writable, hdr, data)
            q.push(c.head, need)
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += n
        for tap in self.taps:
            tap("rx", f)
        return True

    def _gather(self, q, need: int, budget: Budget):
        """MRG_RXBUF (virtio 1.2 §5.1.6.4): buffers holding NEED bytes for one frame.

        Returns None if there is no room yet, () if the frame is dropped
        (counted), else (heads, lengths, region, offsets, views): the
        buffers' heads and lengths in ring order, and where they are: in
        the one guest region REGION at OFFSETS (the batched take, the
        common case), or (REGION None) as the flat list of writable VIEWS.

        A tentative take (Ring.mark): on no room everything taken is given
        back, refused chains included, so retrying later returns each chain
        exactly once and in ring order. Ring.take_writable takes the run of
        plain one-descriptor buffers in one call; anything else (a chain of
        several descriptors, a buffer in another region, one to refuse) goes
        through pop() one chain at a time, as before. Refused buffers
        (read-only, smaller than the header) are pushed with length 0 before
        the frame's own, so the frame's num_buffers buffers stay consecutive
        in the used ring.
        """
        mark = q.mark()
        frame_budget = Budget(MAX_CHAIN_DESCS)   # bounds one frame's walk, whatever the ring holds
        region, heads, offs, lens, room = q.take_writable(need, self.hdr_len, frame_budget)
        if room >= need:
            budget.left -= MAX_CHAIN_DESCS - frame_budget.left
            q.commit()
            return heads, lens, region, offs, None
        # The run stopped short: the rest chain by chain, the run as views.
        views = [region[o:o + k] for o, k in zip(offs, lens)]
        refused = []
        while room < need:
            c = q.pop(frame_budget)
            if c is None:
                budget.left -= MAX_CHAIN_DESCS - frame_budget.left
                whole_ring = q.taken_since(mark) >= q.num or frame_budget.spent
                q.rollback(mark)
                if not whole_ring or not q.ready:
                    return None
                # Every buffer the driver can post, together, is too small (or too
                # fragmented): waiting would stop RX for ever. Drop this frame.
                self._refuse(q, "rx_ring_too_small",
                             {"expected": f">= {need} bytes", "seen": f"{room} bytes in {len(heads)} buffers"},
                             "rx: the %d RX buffers posted hold %d bytes, not the %d this frame needs; frame dropped",
                             len(heads), room, need)
                return ()
            if not c.writable or c.write_len < self.hdr_len:
                q.push(c.head, 0)
                refused.append(c)
                continue
            heads.append(c.head)
            lens.append(c.write_len)
            views.extend(c.writable)
            room += c.write_len
        budget.left -= MAX_CHAIN_DESCS - frame_budget.left
        q.commit()
        for c in refused:
            if not c.writable:
                self._refuse(q, "rx_readonly_buffer", {"head": c.head, "seen": f"{c.read_len} readable bytes"},
                             "rx: buffer at descriptor %d has no device-writable part", c.head)
            else:
                self._refuse(q, "rx_buffer_below_header",
                             {"head": c.head, "expected": f">= {self.hdr_len} bytes", "seen": c.write_len},
                             "rx: buffer at descriptor %d holds %d bytes, less than the %d-byte header",
                             c.head, c.write_len, self.hdr_len)
        return heads, lens, None, None, views

    @staticmethod
    def _write_merged(q, got: tuple, hdr: bytes, data, need: int) -> None:
        """Header and frame into the buffers _gather found; their used elements, in ring order."""
        heads, lens, region, offs, views = got
        if region is not None:
            scatter_region(region, offs, lens, hdr, data)   # one C call, however many buffers
        else:
            scatter(views, hdr, data)
        # Every buffer but the last is full: _gather stops at NEED bytes.
        lens[-1] -= sum(lens) - need
        q.push_many(heads, lens)

    @staticmethod
    def _write_one(q, c, hdr: bytes, data, need: int) -> None:
        """A frame in one buffer (the fast path: NEED fits c's first view or its chain)."""
        v = c.writable[0]
        if len(v) >= need:
            v[:12] = hdr
            v[12:need] = data
        else:
            scatter(c.writable, hdr, data)
        q.push(c.head, need)

    def describe(self) -> dict:
        return {
            "features": self.negotiated,
            "feature_names": F.names(self.negotiated),
            "hdr_len": self.hdr_len,
            "mergeable_rx_buffers": self.mrg,
            "offloads": {"guest_csum": self.guest_csum, "guest_tso4": self.guest_tso,
                         "host_csum": self.host_csum, "host_tso4": self.host_tso},
            "rx_pending": self.rx_waiting(),
            "counters": dict(self.counters),
            "queue_pairs": self.queue_pairs,
            "rx_pending_by_pair": [len(d) for d in self.rx_pendings],
            "steering": self.steering.describe() if self.steering is not None else None,
        }

    def rx_waiting(self) -> int:
        """Frames waiting for RX buffers, every pair together."""
        return sum(len(d) for d in self.rx_pendings)
