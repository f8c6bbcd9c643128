"""The packed ring through the real server: the in-process frontend drives
packed rings (vhostnet/testing/packed_driver.py) and RING_PACKED is negotiated."""
from __future__ import annotations

import pytest
import trio
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether

from vhostnet.testing.frontend import Frontend
from vhostnet.virtio import features as F
from vhostnet.virtio.packed import decode_base
from vhostnet.vhostuser.protocol import Req

from .conftest import make_server
from .test_datapath import arp_request, ping


@pytest.fixture
async def packed_server(tmp_path, nursery):
    srv = make_server(tmp_path / "vhost.sock")
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    yield srv


async def _packed_frontend(server, queue_size=256, features=None):
    fe = Frontend(queue_size=queue_size, packed=True)
    await fe.connect(server.socket_path)
    await fe.handshake(features=features)
    fe.post_rx()
    fe.rx.kick()
    return fe


@pytest.mark.parametrize("features", [
    None,                                                          # EVENT_IDX, MRG_RXBUF, offloads
    F.DEFAULT_FEATURES & ~(1 << F.EVENT_IDX | 1 << F.MRG_RXBUF) | 1 << 30,
], ids=["default", "no-event-idx-no-mrg"])
async def test_ping_through_packed_rings(packed_server, features):
    fe = await _packed_frontend(packed_server, features=features)
    assert fe.features >> F.RING_PACKED & 1
    conn = packed_server.current
    assert all(q.packed for q in conn.backend.queues)
    got = await fe.exchange([arp_request()] + [ping(seq=i) for i in range(20)], want=21)
    assert Ether(got[0])[ARP].op == 2
    assert sorted(Ether(g)[ICMP].seq for g in got[1:]) == list(range(20))
    doc = conn.backend.queues[1].describe()
    assert doc["format"] == "packed" and doc["chains"] == 21
    await fe.shutdown(packed_server)


async def test_small_packed_ring_wraps_many_times(packed_server):
    fe = await _packed_frontend(packed_server, queue_size=16)
    seq = 0
    for _ in range(12):                     # 12 x 8 frames each way through 16-entry rings
        got = await fe.exchange([ping(seq=seq + i) for i in range(8)], want=8)
        assert sorted(Ether(g)[ICMP].seq for g in got) == list(range(seq, seq + 8))
        seq += 8
    tx = packed_server.current.backend.queues[1]
    assert tx.errors == {} and tx.broken is None
    # GET_VRING_BASE carries both positions and wrap counters (vhost-user.rst, "Ring states").
    avail, avail_wrap, used, used_wrap = decode_base(await fe.get_vring_base(1))
    # 96 slots = 6 laps: each counter started at 1 and flipped 6 times.
    assert avail == used == 0 and avail_wrap is used_wrap is True
    await fe.shutdown(packed_server)


async def test_tcp_handshake_through_packed_rings(packed_server):
    """The gateway's echo service answers a SYN with a SYN-ACK over packed rings."""
    fe = await _packed_frontend(packed_server)
    isn = 1000
    syn = bytes(Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") /
                IP(src="10.0.2.15", dst="10.0.2.2") / TCP(sport=40000, dport=7, flags="S", seq=isn))
    got = await fe.exchange([syn], want=1)
    synack = Ether(got[0])[TCP]
    assert synack.flags == "SA" and synack.ack == isn + 1
    await fe.shutdown(packed_server)


async def test_disable_feature_packed_withholds_it(tmp_path, nursery):
    srv = make_server(tmp_path / "v.sock", features=F.DEFAULT_FEATURES & ~(1 << F.RING_PACKED))
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    fe = Frontend()
    await fe.connect(srv.socket_path)
    offered = await fe.get_u64(Req.GET_FEATURES)
    assert not offered >> F.RING_PACKED & 1
    await fe.handshake()
    got = await fe.exchange([ping(seq=3)], want=1)
    assert Ether(got[0])[ICMP].seq == 3
    assert not any(q.packed for q in srv.current.backend.queues)
    await fe.shutdown(srv)
    from vhostnet.launch.serve import _features
    assert not _features(["packed"]) >> F.RING_PACKED & 1


async def test_hostile_packed_chain_is_named_and_survived(packed_server):
    """A head made available before the rest of its chain (§2.8.17) breaks the
    ring; restarting it (SET_VRING_KICK) brings traffic back."""
    fe = await _packed_frontend(packed_server)
    from vhostnet.virtio.packed import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_NEXT
    drv = fe.tx.drv
    drv.write_desc(drv.next_avail, fe.tx.buf(0), 64, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_NEXT)
    fe.tx.kick()
    tx = packed_server.current.backend.queues[1]
    with trio.fail_after(5):
        while tx.broken is None:
            await trio.sleep(0.01)
    assert tx.broken == "packed_desc_not_avail"
    finding = tx.describe_findings()[0]
    assert finding["section"] == "2.8.17" and finding["level"] == "MUST"
    # The backend still answers on the socket.
    assert await fe.get_u64(Req.GET_FEATURES) >> F.RING_PACKED & 1
    await fe.shutdown(packed_server)


async def test_inspect_shows_the_packed_state(packed_server):
    from vhostnet.observe.render import inspect_text
    from vhostnet.observe.report import desc_doc, inspect_doc
    fe = await _packed_frontend(packed_server, queue_size=16)
    for k in range(2):              # 20 frames through 16 slots: the counters flipped
        await fe.exchange([ping(seq=10 * k + i) for i in range(10)], want=10)
    doc = inspect_doc(packed_server)
    tx = doc["queues"][1]
    assert tx["format"] == "packed"
    assert tx["avail_wrap_counter"] == 0 and tx["last_avail_idx"] == 4
    assert tx["driver_event"] is not None and tx["device_event"]["flags"] == 2   # EVENT_IDX: DESC
    assert tx["last_used"]["idx"] == 3
    text = inspect_text(doc)
    assert "queue 1 (tx): size 16" in text and ", packed" in text
    assert "next avail position 4 (wrap 0)" in text
    assert "device event suppression: DESC at position 4 wrap 0" in text
    # --desc on a ring position decodes the chain there.
    d = desc_doc(packed_server, 1, 3)
    assert d["descriptors"][0]["index"] == 3
    await fe.shutdown(packed_server)


async def test_safety_poll_finds_packed_descriptors_made_available_without_a_kick(packed_server):
    """The packed counterpart of the split ring's safety poll: a TX descriptor
    made available (AVAIL == wrap counter, USED != it) with no kick is found
    and sent, counted as unkicked, and with notifications enabled it is a
    packed_kick_missed finding (virtio 1.2 §2.8.21.3.1)."""
    from .test_checker import named
    fe = await _packed_frontend(packed_server)
    got = await fe.exchange([ping(seq=1)], want=1)           # kicked: the ring runs
    assert [Ether(g)[ICMP].seq for g in got] == [1]
    conn = packed_server.current
    tx = conn.backend.queues[1]
    assert tx.packed and conn._polls[1].__class__.__name__ == "PackedSafetyPoll"
    kicks = tx.stats["kicks"]
    fe.post_tx(ping(seq=2))                                  # available, never kicked
    with trio.fail_after(5):
        while not (got := fe.read_rx()):
            await fe.rx.wait_call(0.05)
    assert [Ether(f)[ICMP].seq for _h, f in got] == [2]       # the safety poll found it
    assert tx.stats["unkicked"] == 1 and tx.stats["kicks"] == kicks
    f = await named(packed_server, 1, "packed_kick_missed", "2.8.21.3.1", "MUST")
    assert f["example"]["entries"] == 1 and f["example"]["seen"] == "none"
    await fe.shutdown(packed_server)


async def test_packed_safety_poll_leaves_a_frame_waiting_for_rx_room_alone(packed_server):
    """Chains given back for a frame that did not fit (a rollback) are available
    again at the device's position, but the driver announced them: not unkicked."""
    fe = Frontend(queue_size=256, packed=True)
    await fe.connect(packed_server.socket_path)
    await fe.handshake()
    fe.post_rx(count=1, size=64)          # MRG_RXBUF: too small for the reply, and nothing more
    fe.rx.kick()
    fe.post_tx(ping(seq=1))
    fe.tx.kick()
    dev = packed_server.current.device
    rx = packed_server.current.backend.queues[0]
    with trio.fail_after(5):
        while dev.rx_waits == 0:
            await trio.sleep(0.01)
    poll = packed_server.current._polls[0]
    with trio.fail_after(5):
        while poll.looking:            # it looks a while, finds nothing new, and parks
            await trio.sleep(0.01)
    assert rx.stats["unkicked"] == 0 and len(dev.rx_pending) == 1
    fe.post_rx(count=1, size=2048)
    fe.rx.kick()
    with trio.fail_after(5):
        while not any(Ether(f).haslayer(ICMP) for _h, f in fe.read_rx()):
            await fe.rx.wait_call(0.05)
    assert rx.stats["unkicked"] == 0
    await fe.shutdown(packed_server)


async def test_packed_rx_buffers_posted_with_a_kick_are_not_unkicked(packed_server):
    """Seen with Linux (packed=on) in CI: RX buffers posted and kicked, with no
    frame for the device to send, so nothing pops and the position does not
    move. The poll took them for unkicked at its second look and named a
    packed_kick_missed. The kick announced them."""
    fe = Frontend(queue_size=256, packed=True)
    await fe.connect(packed_server.socket_path)
    await fe.handshake()
    rx = packed_server.current.backend.queues[0]
    poll = packed_server.current._polls[0]
    kicks = rx.stats["kicks"]
    fe.post_rx(count=64, size=2048)
    fe.rx.kick()
    with trio.fail_after(5):
        while rx.stats["kicks"] == kicks or not poll.looking:   # the kick woke it
            await trio.sleep(0.005)
        while poll.looking:                                    # it looks, finds nothing new, parks
            await trio.sleep(0.01)
    poll.close()                                               # a suspect would be a finding now
    assert rx.stats["unkicked"] == 0
    assert "packed_kick_missed" not in rx.errors
    await fe.shutdown(packed_server)


async def test_a_packed_base_beyond_a_shrunk_ring_is_refused_not_read_past_its_end():
    """Found by scripts/fuzz_device.py (seed 2003, step 666): SET_VRING_BASE with
    positions valid for the old size, then SET_VRING_NUM 2: the ring started with
    positions past its end, pop() raised IndexError, and inspect (pending()) ended
    the process. The ring now refuses to start; inspect and the guest go on."""
    import shutil
    import tempfile
    from vhostnet.testing.dpdk import VhostnetServe
    from vhostnet.testing.frontend import ADDR, STATE, U64, UVA_BASE
    from vhostnet.virtio.packed import encode_base
    from .conftest import ask_backend, responsive
    d = tempfile.mkdtemp(prefix="vn-", dir="/tmp")
    try:
        with VhostnetServe(d, log_level="info") as b:
            fe = Frontend(queue_size=256, packed=True)
            await fe.connect(b.socket)
            await fe.handshake()
            r = fe.rx
            await fe.get_vring_base(0)                                   # stop RX
            await fe.request(Req.SET_VRING_BASE, STATE.pack(0, encode_base(200, True, 200, True)))
            await fe.request(Req.SET_VRING_NUM, STATE.pack(0, 2))
            await fe.request(Req.SET_VRING_ADDR, ADDR.pack(0, 0, UVA_BASE + r.desc, UVA_BASE + r.used,
                                                           UVA_BASE + r.avail, 0))
            await fe.request(Req.SET_VRING_KICK, U64.pack(0), [r.kick_fd])
            r.kick()
            await responsive(fe, b)
            doc = await ask_backend(b)
            rxq = doc["queues"][0]
            assert not rxq["started"] and rxq["size"] == 2
            assert b.proc.poll() is None
            # Set up properly again, the ring works.
            await fe.request(Req.SET_VRING_NUM, STATE.pack(0, 256))
            await fe.request(Req.SET_VRING_BASE, STATE.pack(0, encode_base(0, True, 0, True)))
            await responsive(fe, b)
            assert b.proc.poll() is None
            await fe.close()
            fe.release()
    finally:
        shutil.rmtree(d, ignore_errors=True)
