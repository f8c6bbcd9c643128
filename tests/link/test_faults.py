"""The fault layer on its own, sans-IO: a real Stack behind it, frames and `now` in.

Every fault at about its rate with a fixed seed (the runs are
deterministic; the bounds are several standard deviations wide so a change
of seed or of the order of RNG draws does not make them flaky), order,
time, bounds, guest-memory copies, repeatability and live changes.
"""
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from stack import Frame, Stack
from stack.checksum import checksum
from vhostnet.link import LinkSettings
from vhostnet.link.faults import FaultInjector, FaultSettings, REORDER_HOLD
from vhostnet.link.spec import parse
from vhostnet.link.taps import StackTaps

GUEST_MAC, GW_MAC = "52:54:00:12:34:56", "52:55:0a:00:02:02"
_PING = bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.2") /
              ICMP(type=8, id=0x1234, seq=0) / (b"x" * 56))
ICMP_AT = 14 + 20


def ping(seq: int) -> bytes:
    """_PING with another ICMP sequence number (checksum fixed)."""
    b = bytearray(_PING)
    struct.pack_into("!H", b, ICMP_AT + 6, seq & 0xFFFF)
    b[ICMP_AT + 2:ICMP_AT + 4] = b"\0\0"
    struct.pack_into("!H", b, ICMP_AT + 2, checksum(b[ICMP_AT:]))
    return bytes(b)


def seq_of(frame_bytes) -> int:
    return struct.unpack_from("!H", frame_bytes, ICMP_AT + 6)[0]


class Net:
    """The fault layer around a stack, with a tap on the stack's side recording what it gets."""

    def __init__(self, spec: str):
        self.settings = FaultSettings(parse(spec))
        self.stack = Stack()
        self.seen: list[bytes] = []      # frames the stack received, in order
        self.sent: list[bytes] = []      # frames the stack sent, before the fault layer
        self.link = FaultInjector(StackTaps(self.stack, [self._tap]), self.settings)
        self.now = 1000.0
        self.out: list[Frame] = []       # frames out of the layer, for the guest

    def _tap(self, direction, frame):
        (self.seen if direction == "tx" else self.sent).append(bytes(frame.data))

    def send(self, data, step: float = 0.0) -> None:
        self.link.receive(Frame(data), self.now)
        self.out += self.link.take_frames()
        self.now += step

    def run_until(self, t: float) -> None:
        """Drive time like the backend's timer: poll at each deadline up to T."""
        while True:
            d = self.link.next_deadline()
            if d is None or d > t:
                break
            self.now = max(self.now, d)
            self.link.poll(self.now)
            self.out += self.link.take_frames()
        self.now = max(self.now, t)

    @property
    def tx(self):
        return self.link.tx.counters

    @property
    def rx(self):
        return self.link.rx.counters


N = 4000


def between(n, lo, hi):
    assert lo <= n <= hi, f"{n} not in [{lo}, {hi}]"


def test_no_faults_hands_the_callers_frame_on_uncopied():
    net = Net("none")
    seen = []
    net.link.inner.taps[:] = [lambda d, f: seen.append(f.data)]
    buf = bytearray(ping(1))
    view = memoryview(buf)
    net.link.receive(Frame(view), net.now)
    assert seen[0] is view           # no copy, no queue: a pass-through layer
    assert net.link.next_deadline() == net.stack.next_deadline()   # nothing of its own
    assert net.tx["frames"] == 0     # not even counted: the layer is off


def test_loss_at_about_the_rate_each_direction():
    net = Net("tx.loss=5%,rx.loss=10%,seed=1")
    for i in range(N):
        net.send(ping(i))
    between(net.tx["lost"], 0.05 * N - 60, 0.05 * N + 60)
    assert net.tx["frames"] == N and len(net.seen) == net.tx["delivered"] == N - net.tx["lost"]
    replies = len(net.sent)
    assert net.rx["frames"] == replies
    between(net.rx["lost"], 0.10 * replies - 80, 0.10 * replies + 80)
    assert len(net.out) == replies - net.rx["lost"]
    assert net.link.tx.next_deadline() is None    # nothing held: no delay was asked for


def test_duplicates_are_independent_copies():
    net = Net("dir=tx,dup=10%,seed=2")
    for i in range(N):
        net.send(ping(i))
    between(net.tx["duplicated"], 0.10 * N - 80, 0.10 * N + 80)
    assert len(net.seen) == N + net.tx["duplicated"]
    seqs = [seq_of(f) for f in net.seen]
    dups = [s for k, s in enumerate(seqs) if k and seqs[k - 1] == s]
    assert len(dups) == net.tx["duplicated"]   # each copy right after its original
    assert len(net.out) == len(net.seen)       # the stack answered every copy


def test_reordering_swaps_a_frame_with_the_next():
    net = Net("dir=tx,reorder=5%,seed=3")
    for i in range(N):
        net.send(ping(i))
    net.run_until(net.now + 1)
    r = net.tx["reordered"]
    between(r, 0.05 * N - 60, 0.05 * N + 60)
    seqs = [seq_of(f) for f in net.seen]
    assert sorted(seqs) == list(range(N))      # nothing lost, nothing doubled
    late = sum(1 for k in range(1, N) if seqs[k] < seqs[k - 1])
    assert late == r + 0 * net.tx["reorder_timeouts"]
    assert net.tx["reorder_timeouts"] <= 1     # only the last frame can wait alone


def test_a_held_frame_leaves_on_its_own_after_the_hold():
    net = Net("dir=tx,reorder=100%,seed=4")
    t0 = net.now
    net.send(ping(1))
    assert net.seen == [] and net.link.next_deadline() == pytest.approx(t0 + REORDER_HOLD)
    net.run_until(t0 + REORDER_HOLD / 2)
    assert net.seen == []
    net.run_until(t0 + REORDER_HOLD)
    assert [seq_of(f) for f in net.seen] == [1] and net.tx["reorder_timeouts"] == 1


def refused(stack) -> int:
    """Frames the stack dropped: a bad checksum, or a check before it (a flip in a length field)."""
    return sum(v for k, v in stack.counters.items() if k.startswith("drop_"))


def test_corruption_leaves_a_checksum_wrong():
    net = Net("dir=tx,corrupt=5%,seed=5")
    for i in range(N):
        net.send(ping(i))
    corrupted = net.tx["corrupted"]
    between(corrupted, 0.05 * N - 60, 0.05 * N + 60)
    # Every corrupted frame reached the stack and was refused by a checksum check;
    # no corrupted frame got an answer.
    assert len(net.seen) == N
    assert refused(net.stack) == corrupted
    assert net.stack.counters["drop_icmp_bad_checksum"] + net.stack.counters["drop_ipv4_bad_checksum"] > 0.9 * corrupted
    assert len(net.out) == N - corrupted
    assert sum(1 for a, b in zip(net.seen, (ping(i) for i in range(N))) if a != b) == corrupted
    for a, b in zip(net.seen, (ping(i) for i in range(N))):
        if a != b:   # exactly one bit, past the Ethernet header
            diff = [k for k in range(len(a)) if a[k] != b[k]]
            assert len(diff) == 1 and diff[0] >= 14 and bin(a[diff[0]] ^ b[diff[0]]).count("1") == 1


def udp_partial(seq: int) -> Frame:
    """A UDP echo request with NEEDS_CSUM (the pseudo-header sum in the field), as Linux sends it."""
    p = Ether(bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.2") /
                    UDP(sport=5555, dport=7) / (b"%06d" % seq)))
    b = bytearray(bytes(p))
    from stack.checksum import pseudo_sum
    ps = pseudo_sum(bytes(b[26:30]), bytes(b[30:34]), 17, len(b) - 34)
    struct.pack_into("!H", b, 34 + 6, ps)
    return Frame(bytes(b), csum_start=34, csum_offset=6)


def test_corrupting_a_partial_checksum_frame_completes_the_checksum_first():
    net = Net("dir=tx,corrupt=20%,seed=6")
    n = 1000
    for i in range(n):
        net.link.receive(udp_partial(i), net.now)
        net.out += net.link.take_frames()
    corrupted = net.tx["corrupted"]
    between(corrupted, 0.2 * n - 60, 0.2 * n + 60)
    # Left partial, the flip would pass unnoticed (the stack trusts a partial
    # checksum); completed and then flipped, a checksum check catches it.
    assert refused(net.stack) == corrupted
    assert len(net.out) == n - corrupted      # UDP echo answered every intact one


def tso_frame(payload_len=8000, gso=1448) -> Frame:
    p = Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.2", id=7) / \
        TCP(sport=40000, dport=9, seq=1000, ack=1, flags="PA", window=500) / (bytes(range(256)) * 40)[:payload_len]
    b = bytearray(bytes(p))
    from stack.checksum import pseudo_sum
    ps = pseudo_sum(bytes(b[26:30]), bytes(b[30:34]), 6, len(b) - 34)
    struct.pack_into("!H", b, 34 + 16, ps)
    return Frame(bytes(b), csum_start=34, csum_offset=16, gso_size=gso)


def test_corrupting_a_tso_frame_cuts_it_and_corrupts_one_segment():
    net = Net("dir=tx,corrupt=100%,seed=7")
    net.link.receive(tso_frame(8000, 1448), net.now)
    c = net.tx
    assert c["corrupted"] == 1 and c["corrupt_segmented"] == 1
    segs = [Ether(s) for s in net.seen]
    assert len(segs) == 6                          # 8000 bytes in 1448-byte segments
    assert all(len(s[TCP].payload) <= 1448 for s in segs)
    assert refused(net.stack) == 1   # one refused, five taken


def test_arp_is_not_corrupted_but_counted():
    from scapy.layers.l2 import ARP
    arp = bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") /
                ARP(op=1, hwsrc=GUEST_MAC, psrc="10.0.2.15", pdst="10.0.2.2"))
    net = Net("dir=tx,corrupt=100%,seed=8")
    net.send(arp)
    assert net.seen == [arp] and net.tx["corrupt_skipped"] == 1 and net.tx["corrupted"] == 0


def test_delay_with_jitter_keeps_order_and_stays_in_bounds():
    net = Net("dir=tx,delay=20ms,jitter=5ms,seed=9")
    sent_at = {}
    arrived = {}
    for i in range(200):
        sent_at[i] = net.now
        net.send(ping(i), step=0.001)
        # Poll in 1 ms steps like a timer would, noting when each frame arrives.
        before = len(net.seen)
        net.run_until(net.now)
        for f in net.seen[before:]:
            arrived[seq_of(f)] = net.now
    end = net.now + 0.1
    while net.link.tx.next_deadline() is not None:
        before = len(net.seen)
        net.run_until(net.link.tx.next_deadline())
        for f in net.seen[before:]:
            arrived[seq_of(f)] = net.now
    assert net.now < end
    assert [seq_of(f) for f in net.seen] == list(range(200))   # jitter does not reorder
    waits = [arrived[i] - sent_at[i] for i in range(200)]
    assert min(waits) >= 0.015 - 1e-9 and max(waits) <= 0.025 + 0.001
    assert max(waits) - min(waits) > 0.005                     # the jitter is there
    assert net.tx["delayed"] == 200


def test_nothing_arrives_before_its_time():
    net = Net("dir=rx,delay=50ms,seed=10")
    t0 = net.now
    net.send(ping(1))
    assert len(net.seen) == 1 and net.out == []       # tx untouched, the reply waits
    assert net.link.next_deadline() == pytest.approx(t0 + 0.05) == net.link.rx.next_deadline()
    net.run_until(t0 + 0.049)
    assert net.out == []
    net.run_until(t0 + 0.05)
    assert len(net.out) == 1 and seq_of(net.out[0].data) == 1


def test_rate_limit_spaces_frames_by_their_size():
    net = Net("dir=tx,rate=1mbit,seed=11")
    n = len(ping(0)) * 8 / 1e6        # seconds per frame at 1 Mbit/s
    t0 = net.now
    for i in range(50):
        net.send(ping(i))
    assert len(net.seen) == 0 and net.tx["rate_delayed"] == 49
    times = []
    while net.link.tx.next_deadline() is not None:
        before = len(net.seen)
        net.run_until(net.link.tx.next_deadline())
        times += [net.now] * (len(net.seen) - before)
    assert len(times) == 50
    for k, t in enumerate(times):
        assert t - t0 == pytest.approx((k + 1) * n, rel=1e-6)


def test_queues_are_bounded_in_frames_and_bytes():
    net = Net("dir=tx,delay=1s,limit=50,seed=12")
    for i in range(200):
        net.send(ping(i))
    assert net.link.tx.snapshot()["queued"] == 50 and net.tx["overflow"] == 150
    net2 = Net(f"dir=tx,delay=1s,limit-bytes={20 * len(ping(0))},seed=12")
    for i in range(200):
        net2.send(ping(i))
    snap = net2.link.tx.snapshot()
    assert snap["queued"] == 20 and snap["queued_bytes"] == 20 * len(ping(0))
    assert net2.tx["overflow"] == 180
    net.run_until(net.now + 2)
    assert [seq_of(f) for f in net.seen] == list(range(50))
    assert net.link.tx.snapshot()["queued_bytes"] == 0


def test_a_delayed_guest_frame_is_copied_before_its_buffer_goes_back():
    net = Net("dir=tx,delay=10ms,dup=100%,seed=13")
    guest_buf = bytearray(ping(42))
    net.link.receive(Frame(memoryview(guest_buf)), net.now)
    guest_buf[:] = b"\xee" * len(guest_buf)     # the guest reuses its buffer at once
    net.run_until(net.now + 0.02)
    assert net.seen == [ping(42), ping(42)]


def test_the_same_seed_repeats_a_run_and_another_does_not():
    spec = "loss=5%,dup=2%,reorder=3%,corrupt=1%,delay=5ms,jitter=2ms,seed={}"

    def run(seed):
        net = Net(spec.format(seed))
        for i in range(1000):
            net.send(ping(i), step=0.0005)
            net.run_until(net.now)
        net.run_until(net.now + 1)
        return net.seen, [bytes(f.data) for f in net.out], net.link.snapshot()

    assert run(21) == run(21)
    assert run(21)[0] != run(22)[0]


def test_a_live_change_takes_effect_and_clear_drains_what_waits():
    net = Net("none")
    net.settings.set(parse("dir=tx,delay=30ms,seed=14"))
    net.send(ping(1))
    assert net.seen == []
    net.settings.clear()
    net.send(ping(2))                 # queued behind ping 1: order is kept
    assert net.seen == []
    net.run_until(net.now + 0.03)
    assert [seq_of(f) for f in net.seen] == [1, 2]
    net.send(ping(3))
    assert seq_of(net.seen[-1]) == 3 and net.link.tx.passthrough


def test_link_settings_compose_the_layers():
    settings = LinkSettings(FaultSettings(parse("loss=1%,seed=1")))
    stack = Stack()
    link = settings.compose(stack)
    assert isinstance(link, FaultInjector) and link.inner.inner is stack
    assert link.inner.taps is settings.stack_taps
