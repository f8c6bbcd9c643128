"""TX and RX through the real server, driven by the in-process frontend."""
import struct

import pytest
import trio

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from .conftest import wait_counter

GUEST_MAC = "52:54:00:12:34:56"
GW_MAC = "52:55:0a:00:02:02"


def arp_request(target="10.0.2.2"):
    return bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") /
                 ARP(op=1, hwsrc=GUEST_MAC, psrc="10.0.2.15", pdst=target))


def ping(payload=b"x" * 56, seq=1, dst="10.0.2.2"):
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst=dst) /
                 ICMP(type=8, id=0x1234, seq=seq) / payload)


async def test_arp_for_gateway_is_answered(ready):
    got = await ready.exchange([arp_request()], want=1)
    assert len(got) == 1
    reply = Ether(got[0])
    assert reply[ARP].op == 2
    assert reply[ARP].psrc == "10.0.2.2"
    assert reply[ARP].hwsrc == GW_MAC
    assert reply[ARP].pdst == "10.0.2.15"
    assert reply.dst == GUEST_MAC


async def test_flood_keeps_a_window_in_flight_and_counts_every_answer(ready, server):
    # Frontend.flood drives bench_device.py and bench_checker.py: what it
    # counts must be the device's answers, window after window.
    import time
    deadline = time.perf_counter() + 0.5
    done = await ready.flood(ping(), deadline, window=8)
    echoed = server.current.device.stack.counters["icmp_echo"]
    assert done > 8                      # more than one window's worth
    # What it counts is answers: at most one per echo the stack answered,
    # and at most a window's worth still in flight when it stopped.
    assert echoed - 8 <= done <= echoed


async def test_ping_gateway(ready, server):
    frames = [ping(seq=i) for i in range(10)]
    got = await ready.exchange(frames, want=10)
    seqs = sorted(Ether(g)[ICMP].seq for g in got)
    assert seqs == list(range(10))
    for g in got:
        p = Ether(g)
        assert p[ICMP].type == 0 and p[IP].src == "10.0.2.2"
        assert bytes(p[ICMP].payload) == b"x" * 56
    # The TX buffers were all returned to the driver.
    assert len(ready.tx.free) == ready.tx.size
    dev = server.current.device
    assert dev.counters["tx_frames"] == 10
    assert dev.counters["rx_frames"] == 10


async def test_tx_split_header_descriptor(ready):
    ready.post_tx(ping(seq=7), split=True)
    got = await ready.exchange([], want=1)
    assert Ether(got[0])[ICMP].seq == 7


def _post_tx_pieces(fe, data: bytes, cuts: list[int]) -> None:
    """Place header + frame in the TX ring as one chain, cut at CUTS (offsets into it)."""
    r = fe.tx
    addr = r.buf(r.free[-1])
    bufs, start = [], 0
    for i, end in enumerate(cuts + [len(data)]):
        piece = data[start:end]
        a = addr + 0x100 * i + start     # pieces apart in memory, as fragments are
        fe.mem[a:a + len(piece)] = piece
        bufs.append((a, len(piece), 0))
        start = end
    r.add(bufs)


async def test_tx_linux_layout_and_split_header(ready, server):
    """Header pushed in front of the frame's start, then fragments (Linux's
    layout), and a header cut across two descriptors: the frame arrives whole."""
    hl = ready.hdr_len
    for seq, cuts in ((1, [hl + 20, hl + 40, hl + 60]), (2, [5, hl + 30]), (3, [hl + 14])):
        _post_tx_pieces(ready, ready.net_hdr() + ping(payload=bytes(range(56)), seq=seq), cuts)
    got = await ready.exchange([], want=3)
    assert sorted(Ether(g)[ICMP].seq for g in got) == [1, 2, 3]
    assert all(bytes(Ether(g)[ICMP].payload) == bytes(range(56)) for g in got)
    assert server.current.device.counters["tx_frames"] == 3


async def test_frames_wait_for_rx_buffers(fe, server):
    await fe.handshake()
    # No RX buffers posted: the reply waits in the device.
    for i in range(3):
        fe.post_tx(ping(seq=i))
    fe.tx.kick()
    await wait_counter(server.current.device, "tx_frames", 3)
    assert len(server.current.device.rx_pending) == 3
    fe.post_rx()
    fe.rx.kick()
    assert await fe.rx.wait_call()
    got = [b for _h, b in fe.read_rx()]
    assert sorted(Ether(g)[ICMP].seq for g in got) == [0, 1, 2]


async def test_rx_pending_is_bounded(tmp_path, nursery):
    from .conftest import make_server
    from vhostnet.testing.frontend import Frontend
    srv = make_server(tmp_path / "s.sock", rx_pending_limit=5)
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake()
    for i in range(12):
        fe.post_tx(ping(seq=i))
    fe.tx.kick()
    await wait_counter(srv.current.device, "tx_frames", 12)
    dev = srv.current.device
    assert len(dev.rx_pending) == 5
    assert dev.counters["rx_dropped_no_buffers"] == 7
    await fe.shutdown(srv)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_a_burst_past_the_step_bytes_is_answered_in_steps(tmp_path, nursery, packed):
    """A TX burst larger than TX_STEP_BYTES ends its first step early: the
    answers so far (for TCP: the ACKs the guest waits for to send more) and
    the used buffers go to the guest, and the next step takes the rest."""
    from vhostnet.net.device import TX_STEP_BYTES, NetDevice
    from vhostnet.testing.frontend import Frontend
    from vhostnet.vhostuser.server import Server

    steps = []      # per drain_tx: (chains taken, frames answered so far, more)

    class Spy(NetDevice):
        def drain_tx(self, rings, now, *a, **kw):
            before = rings[1].stats["chains"]
            more = super().drain_tx(rings, now, *a, **kw)
            steps.append((rings[1].stats["chains"] - before, self.counters["rx_frames"], more))
            return more

    srv = Server(str(tmp_path / "s.sock"), Spy)
    srv.listen()
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    fe = Frontend(packed=packed)
    await fe.connect(srv.socket_path)
    await fe.handshake()
    fe.post_rx()
    fe.rx.kick()
    frame = ping(payload=b"b" * 1472)
    burst = TX_STEP_BYTES // len(frame) + 20         # past one step's bytes, within the ring
    assert burst < fe.tx.size
    for i in range(burst):
        fe.post_tx(frame)
    fe.tx.kick()
    got = 0
    with trio.fail_after(10):
        while got < burst:
            got += len(fe.read_rx())
            if fe.rx.free:
                fe.post_rx()
                fe.rx.kick()
            await fe.rx.wait_call(0.05)
    busy = [s for s in steps if s[0]]
    first = busy[0]
    per_step = -(-TX_STEP_BYTES // len(frame))       # frames until the step's bytes are reached
    assert first[0] == per_step and first[2] is True  # ended by its bytes, more to come
    assert first[1] >= 1                             # its answers were out before the rest was taken
    assert sum(s[0] for s in busy) == burst
    await fe.shutdown(srv)
