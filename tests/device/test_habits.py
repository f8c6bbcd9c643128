"""Driver habits the device tolerates (issue #10), each played by the in-process frontend.

The small drivers driver writers model theirs on (rcore-os/virtio-drivers,
U-Boot, iPXE, OVMF; FACTS.md) do legal but unusual things: tiny queues,
headers in their own descriptor or split anywhere, one header buffer shared
by every RX chain, no MRG_RXBUF, no offloads, NO_INTERRUPT and polling,
rings stopped and started between frames. Each test checks that traffic
passes and that the checker names nothing (these are not violations). The
one habit that is a violation, missing kicks, must still pass traffic:
the safety poll finds the entries, and `kick_missed` names it.
"""
import struct

import pytest
import trio
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from vhostnet.observe.check import check_doc
from vhostnet.testing.frontend import F_WRITE, NET_HDR, STATE, Frontend
from vhostnet.virtio import features as F
from vhostnet.vhostuser.protocol import Req

from .conftest import make_server, wait_counter
from .test_datapath import GUEST_MAC, GW_MAC, arp_request, ping

SCRATCH = 0x200000      # guest memory the frontend's rings and buffers leave free
PROTOCOL = 1 << 30      # VHOST_USER_F_PROTOCOL_FEATURES, as QEMU acks it


def no_findings(server):
    doc = check_doc(server)
    assert doc["findings"] == [], doc["findings"]


async def replies(fe, n, timeout=5.0, repost=True):
    """At least N frames from the device, reposting RX buffers as they are used."""
    got = []
    with trio.fail_after(timeout):
        while len(got) < n:
            got.extend(b for _h, b in fe.read_rx())
            if len(got) >= n:
                break
            if repost and fe.rx.free:
                fe.post_rx()
                fe.rx.kick()
            await fe.rx.wait_call(0.02)
    fe.tx.take_used()
    return got


async def connect(server, *, queue_size=256, features=None, base=0):
    fe = Frontend(queue_size=queue_size)
    await fe.connect(server.socket_path)
    await fe.handshake(features=features, base=base)
    return fe


# -- queue sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [16, 32])
async def test_small_queues(server, size):
    fe = await connect(server, queue_size=size)
    try:
        fe.post_rx()
        fe.rx.kick()
        seq = 0
        for _batch in range(5):            # 5 x 8 frames: both rings wrap more than once
            frames = [ping(seq=seq + k) for k in range(8)]
            got = await fe.exchange(frames, want=8)
            assert sorted(Ether(g)[ICMP].seq for g in got) == list(range(seq, seq + 8))
            seq += 8
        assert server.current.backend.queues[1].num == size
        no_findings(server)
    finally:
        await fe.shutdown(server)


# -- header and data split across descriptors -------------------------------------------------

TX_SPLITS = {
    "header alone": lambda hl, n: [hl, n - hl],
    "header split in two": lambda hl, n: [5, hl - 5, n - hl],
    "header with part of the data": lambda hl, n: [hl + 14, n - hl - 14],
    "header and data in 7-byte pieces": lambda hl, n: [7] * (n // 7) + ([n % 7] if n % 7 else []),
    "one byte, then the rest": lambda hl, n: [1, n - 1],
}


@pytest.mark.parametrize("split", TX_SPLITS)
async def test_tx_split_anywhere(ready, server, split):
    data = ready.net_hdr() + ping(seq=11)
    pieces = TX_SPLITS[split](ready.hdr_len, len(data))
    assert sum(pieces) == len(data)
    bufs, pos = [], 0
    for k, n in enumerate(pieces):
        addr = SCRATCH + 0x100 * k     # scattered, in chain order
        ready.mem[addr:addr + n] = data[pos:pos + n]
        bufs.append((addr, n, 0))
        pos += n
    ready.tx.add(bufs)
    ready.tx.kick()
    [got] = await replies(ready, 1)
    assert Ether(got)[ICMP].seq == 11
    no_findings(server)


RX_SPLITS = [[12, 2036], [5, 7, 2036], [1, 11, 14, 2022], [64, 64, 1920]]


@pytest.mark.parametrize("pieces", RX_SPLITS, ids=lambda p: "+".join(map(str, p)))
async def test_rx_split_anywhere(fe, server, pieces):
    await fe.handshake()
    r = fe.rx
    layout = {}
    for c in range(4):
        base = SCRATCH + 0x10000 * c
        bufs, off = [], 0
        for n in pieces:
            bufs.append((base + off, n, F_WRITE))
            off += n + 0x40     # gaps: nothing may rely on the pieces being adjacent
        head = r.add(bufs)
        layout[head] = bufs
    r.kick()
    fe.post_tx(ping(seq=12))
    fe.tx.kick()
    with trio.fail_after(5):
        while not (used := r.take_used()):
            await r.wait_call(0.05)
    [(head, length)] = used
    out = b"".join(bytes(fe.mem[a:a + n]) for a, n, _f in layout[head])[:length]
    hdr, frame = out[:12], out[12:]
    assert NET_HDR.unpack(hdr)[6] == 1       # num_buffers
    assert Ether(frame)[ICMP].seq == 12
    no_findings(server)


# -- one header buffer shared by every RX chain (iPXE) -----------------------------------------

async def test_one_header_buffer_shared_by_every_rx_chain(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.MRG_RXBUF | F.OFFLOAD_FEATURES) | PROTOCOL)
    r = fe.rx
    shared = SCRATCH
    data = {}
    for c in range(8):
        addr = SCRATCH + 0x1000 * (c + 1)
        head = r.add([(shared, fe.hdr_len, F_WRITE), (addr, 1514, F_WRITE)])
        data[head] = addr
    r.kick()
    for seq in range(20):      # more frames than chains: each comes back and is re-posted
        fe.post_tx(ping(seq=seq))
        fe.tx.kick()
        with trio.fail_after(5):
            while not (used := r.take_used()):
                await r.wait_call(0.05)
        for head, length in used:
            frame = bytes(fe.mem[data[head]:data[head] + length - fe.hdr_len])
            assert Ether(frame)[ICMP].seq == seq
            assert NET_HDR.unpack(bytes(fe.mem[shared:shared + 12]))[6] == 1
            new = r.add([(shared, fe.hdr_len, F_WRITE), (data[head], 1514, F_WRITE)])
            data[new] = data.pop(head) if new != head else data[head]
        r.kick()
        fe.tx.take_used()
    no_findings(server)


# -- no MRG_RXBUF, no offloads ------------------------------------------------------------------

async def test_no_mergeable_buffers_one_frame_per_chain_small_ones_dropped(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.MRG_RXBUF) | PROTOCOL)
    dev = server.current.device
    fe.post_rx(count=4, size=80)   # big enough for an ARP reply (60 B), too small for a ping reply
    fe.rx.kick()
    fe.post_tx(ping(seq=1))
    fe.tx.kick()
    await wait_counter(dev, "rx_buffer_too_small", 1)   # dropped, counted, buffer kept
    fe.post_tx(arp_request())
    fe.tx.kick()
    [(hdr, frame)] = await _rx_frames(fe, 1)
    assert NET_HDR.unpack(hdr)[6] == 1                   # one chain per frame
    assert Ether(frame)[ARP].op == 2
    doc = check_doc(server)
    assert doc["must"] == 0
    assert {f["rule"] for f in doc["findings"]} == {"rx_buffer_too_small", "rx_buffer_below_minimum"}


async def _rx_frames(fe, n):
    out = []
    with trio.fail_after(5):
        while len(out) < n:
            out.extend(fe.read_rx())
            await fe.rx.wait_call(0.05)
    return out


async def test_no_offloads(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~F.OFFLOAD_FEATURES | PROTOCOL)
    fe.post_rx()
    fe.rx.kick()
    udp = bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.2") /
                UDP(sport=4000, dport=7) / (b"u" * 1000))
    fe.post_tx(udp)
    fe.post_tx(ping(seq=2))
    fe.tx.kick()
    got = await _rx_frames(fe, 2)
    for hdr, frame in got:
        flags, gso_type = hdr[0], hdr[1]
        assert (flags, gso_type) == (0, 0)      # full checksums, no GSO: nothing negotiated
    echo = [Ether(f) for _h, f in got if UDP in Ether(f)][0]
    assert bytes(echo[UDP].payload) == b"u" * 1000
    want = echo[UDP].chksum
    del echo[UDP].chksum
    assert Ether(bytes(echo))[UDP].chksum == want   # the device completed the checksum
    no_findings(server)


# -- polling with NO_INTERRUPT (OVMF, iPXE, U-Boot) -----------------------------------------------

async def test_polling_driver_with_no_interrupt(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.EVENT_IDX) | PROTOCOL)
    for r in fe.rings:
        r.set_avail_flags(1)      # VRING_AVAIL_F_NO_INTERRUPT: "I poll"
    fe.post_rx()
    fe.rx.kick()
    for seq in range(10):
        fe.post_tx(ping(seq=seq))
        fe.tx.kick()
        with trio.fail_after(5):   # poll the used ring, never wait for a call
            while not (got := fe.read_rx()):
                await trio.sleep(0.001)
        assert Ether(got[0][1])[ICMP].seq == seq
        fe.tx.take_used()
    rxq, txq = server.current.backend.queues
    assert rxq.stats["calls"] == txq.stats["calls"] == 0
    assert rxq.stats["calls_suppressed"] >= 10
    no_findings(server)


# -- rings stopped and started between frames ------------------------------------------------------

async def test_rings_stopped_and_started_between_frames(ready, server):
    for seq in range(6):
        got = await ready.exchange([ping(seq=seq)], want=1)
        assert [Ether(g)[ICMP].seq for g in got] == [seq]
        for r in ready.rings:
            base = await ready.get_vring_base(r.index)
            assert base == r.last_used       # every chain taken was returned
            await ready.setup_ring(r, base=base)
            await ready.request(Req.SET_VRING_ENABLE, STATE.pack(r.index, 1))
        await ready.get_u64(Req.GET_FEATURES)
    no_findings(server)


# -- drivers that miss kicks --------------------------------------------------------------------

async def test_driver_that_never_kicks_tx(ready, server):
    """A driver that kicks once and then only polls its used ring: the safety poll carries it."""
    q = server.current.backend.queues[1]
    await ready.exchange([ping(seq=100)], want=1)
    for seq in range(10):
        ready.post_tx(ping(seq=seq))          # no kick
        with trio.fail_after(5):
            while not (got := ready.read_rx()):
                await ready.rx.wait_call(0.05)
        assert Ether(got[0][1])[ICMP].seq == seq
        ready.tx.take_used()
    assert q.stats["unkicked"] == 10
    with trio.fail_after(5):
        while "kick_missed" not in {f["rule"] for f in check_doc(server)["findings"]}:
            await trio.sleep(0.01)
    [f] = check_doc(server)["findings"]
    assert (f["rule"], f["section"], f["level"], f["queue"]) == ("kick_missed", "2.7.10.1", "MUST", 1)


def rcore_kick(r):
    """rcore-os/virtio-drivers' EVENT_IDX check, unsigned 16-bit compare without wrap-around:
    `avail_idx >= avail_event + 1`. Once avail->idx wraps past 0 while avail_event is
    still near 65535 it is false, and the driver stops kicking."""
    if r.avail_idx >= (r.avail_event() + 1) & 0xFFFF:
        r.kick()


async def rcore_traffic(fe, batches, per_batch=4, timeout=5.0):
    seq = 0
    for _ in range(batches):
        for k in range(per_batch):
            fe.post_tx(ping(seq=seq + k))
        rcore_kick(fe.tx)
        got = []
        with trio.fail_after(timeout):
            while len(got) < per_batch:
                got.extend(Ether(b)[ICMP].seq for _h, b in fe.read_rx())
                if fe.rx.free:
                    fe.post_rx()
                    rcore_kick(fe.rx)
                await fe.rx.wait_call(0.02)
        assert sorted(got) == list(range(seq, seq + per_batch))
        fe.tx.take_used()
        seq += per_batch


WRAP_BASE = 0x10000 - 8    # both rings start 8 entries before the 16-bit index wraps


async def test_rcore_stops_kicking_at_the_index_wrap(server):
    fe = await connect(server, queue_size=16, base=WRAP_BASE)
    try:
        assert fe.features >> F.EVENT_IDX & 1
        fe.post_rx()
        rcore_kick(fe.rx)
        await rcore_traffic(fe, batches=6)     # across the wrap and well past it
        q = server.current.backend.queues[1]
        assert q.stats["unkicked"] >= 1
        with trio.fail_after(5):
            while "kick_missed" not in {f["rule"] for f in check_doc(server)["findings"]}:
                await trio.sleep(0.01)
        [f] = [f for f in check_doc(server)["findings"] if f["rule"] == "kick_missed"]
        assert f["queue"] == 1 and f["example"]["event_idx"] is True
        assert f["example"]["avail_idx"] < f["example"]["device_knew"]   # the wrap
    finally:
        await fe.shutdown(server)


async def test_rcore_wrap_stalls_without_the_safety_poll(tmp_path, nursery):
    """The same driver, no safety poll: the ring stalls at the wrap (what the poll is for)."""
    srv = make_server(tmp_path / "nopoll.sock", safety_poll=False)
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    fe = await connect(srv, queue_size=16, base=WRAP_BASE)
    try:
        fe.post_rx()
        rcore_kick(fe.rx)
        with pytest.raises(trio.TooSlowError):
            await rcore_traffic(fe, batches=3, timeout=1.0)
        assert srv.current.device.counters["tx_frames"] == 4   # the batch before the wrap only
    finally:
        await fe.shutdown(srv)


async def test_safety_poll_parks_when_idle_and_resumes_on_a_kick(ready, server):
    """An idle guest costs nothing: the poll stops looking; the next kick (any queue) resumes it."""
    await ready.exchange([ping(seq=1)], want=1)
    poll = server.current._polls[1]
    with trio.fail_after(5):
        while poll.looking:            # QUIET_AFTER with nothing new: parked
            await trio.sleep(0.01)
    q = server.current.backend.queues[1]
    ready.post_tx(ping(seq=2))         # no kick, and the poll is parked ...
    ready.rx.kick()                    # ... until a kick on the other queue wakes it
    with trio.fail_after(5):
        while not (got := ready.read_rx()):
            await ready.rx.wait_call(0.05)
    assert Ether(got[0][1])[ICMP].seq == 2
    assert q.stats["unkicked"] == 1 and poll.looking


async def test_parked_safety_poll_still_finds_a_missed_first_kick(ready, server):
    """The first frame after a quiet spell, not kicked, and nothing else to wake the device:
    the parked poll's idle look (IDLE_LOOK) finds it."""
    from vhostnet.vhostuser.safety_poll import IDLE_LOOK
    await ready.exchange([ping(seq=1)], want=1)
    poll = server.current._polls[1]
    with trio.fail_after(5):
        while poll.looking:
            await trio.sleep(0.01)
    ready.post_tx(ping(seq=2))
    with trio.fail_after(IDLE_LOOK * 3):
        while not (got := ready.read_rx()):
            await ready.rx.wait_call(0.05)
    assert Ether(got[0][1])[ICMP].seq == 2
    assert server.current.backend.queues[1].stats["unkicked"] == 1


async def test_a_failing_safety_poll_stops_alone_and_the_ring_goes_on(ready, server):
    """A bug in the safety poll (here: kicked() raising) is counted and logged
    once; the poll stops for that ring, the connection and the traffic go on."""
    poll = server.current._polls[1]

    def broken() -> None:
        raise RuntimeError("poll bug")
    poll.kicked = broken
    for seq in (1, 2, 3):
        got = await ready.exchange([ping(seq=seq)], want=1)
        assert Ether(got[0])[ICMP].seq == seq
    assert poll.failed
    assert server.current.backend.errors["safety_poll_error"] == 1
