"""Multiqueue (VIRTIO_NET_F_MQ) through the real server, driven by the in-process frontend.

The frontend plays QEMU's -netdev vhost-user,queues=N: one connection, rings
2k/2k+1 per pair, SET_FEATURES once per pair, SET_VRING_ENABLE per pair.
Replies of the stack's UDP echo (10.0.2.2:7) show where RX goes.
"""
import contextlib
import logging

import pytest
import trio
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from vhostnet.net.steering import Steering, flow_key
from vhostnet.testing.frontend import Frontend, STATE, U64
from vhostnet.virtio import features as F
from vhostnet.vhostuser.protocol import ProtoFeat, Req

from .conftest import make_server

GUEST_MAC = "52:54:00:12:34:56"
GW_MAC = "52:55:0a:00:02:02"
ECHO_PORT = 7   # RFC 862


def udp(sport: int, payload: bytes = b"mq") -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.2")
                 / UDP(sport=sport, dport=ECHO_PORT) / payload)


async def serve(tmp_path, nursery, pairs):
    srv = make_server(tmp_path / "vhost.sock", queue_pairs=pairs)
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    return srv


async def connect(srv, pairs, queue_size=64, packed=False):
    fe = Frontend(pairs=pairs, queue_size=queue_size, packed=packed)
    await fe.connect(srv.socket_path)
    return fe


@contextlib.asynccontextmanager
async def session(tmp_path, nursery, pairs, **kw):
    """A server of PAIRS pairs and a frontend that did the whole handshake; shut down after."""
    srv = await serve(tmp_path, nursery, pairs)
    fe = await connect(srv, pairs, **kw)
    try:
        await fe.handshake()
        yield srv, fe
    finally:
        await fe.shutdown(srv)


def post_rx_on(fe, *pairs: int) -> None:
    """RX buffers posted and kicked on each of PAIRS."""
    for k in pairs:
        fe.post_rx(pair=k)
        fe.pair_rings[k][0].kick()


def send_on(fe, pair: int, *frames: bytes) -> None:
    """FRAMES on PAIR's TX ring, one kick."""
    for f in frames:
        fe.post_tx(f, pair=pair)
    fe.pair_rings[pair][1].kick()


async def collect(fe, want: dict[int, int], timeout: float = 5.0) -> dict[int, list[bytes]]:
    """Frames per pair until each pair k has want[k]; RX buffers reposted as they are used."""
    got: dict[int, list[bytes]] = {k: [] for k in range(len(fe.pair_rings))}
    with trio.move_on_after(timeout):
        while any(len(got[k]) < n for k, n in want.items()):
            for k, (rx, _tx) in enumerate(fe.pair_rings):
                got[k].extend(b for _h, b in fe.read_rx(pair=k))
                if rx.free:
                    fe.post_rx(pair=k)
                    rx.kick()
            await trio.sleep(0.01)
    for k, (rx, _tx) in enumerate(fe.pair_rings):
        got[k].extend(b for _h, b in fe.read_rx(pair=k))
    return got


@pytest.mark.parametrize("pairs", [2, 4])
async def test_get_queue_num_and_features(tmp_path, nursery, pairs):
    srv = await serve(tmp_path, nursery, pairs)
    fe = await connect(srv, pairs)
    try:
        assert await fe.get_u64(Req.GET_FEATURES) >> F.MQ & 1
        assert await fe.get_u64(Req.GET_PROTOCOL_FEATURES) >> ProtoFeat.MQ & 1
        await fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << ProtoFeat.MQ | 1 << ProtoFeat.REPLY_ACK))
        assert await fe.get_u64(Req.GET_QUEUE_NUM) == pairs
        # The device config space agrees (virtio 1.2 §5.1.4: max_virtqueue_pairs at offset 8).
        body = await fe.request(Req.GET_CONFIG, STATE.pack(0, 12) + U64.pack(0)[:4] + bytes(12))
        assert int.from_bytes(body[12 + 8:12 + 10], "little") == pairs
    finally:
        await fe.shutdown(srv)


async def test_one_pair_offers_no_mq_feature(tmp_path, nursery):
    srv = await serve(tmp_path, nursery, 1)
    fe = await connect(srv, 1)
    try:
        assert not await fe.get_u64(Req.GET_FEATURES) >> F.MQ & 1
        await fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << ProtoFeat.MQ))
        assert await fe.get_u64(Req.GET_QUEUE_NUM) == 1
    finally:
        await fe.shutdown(srv)


@pytest.mark.parametrize("pairs,packed", [(2, False), (4, False), (2, True)])
async def test_rx_goes_back_on_the_pair_the_flow_came_from(tmp_path, nursery, pairs, packed):
    async with session(tmp_path, nursery, pairs, packed=packed) as (srv, fe):
        dev = srv.current.device
        assert [q.name for q in srv.current.backend.queues][:4] == ["rx", "tx", "rx1", "tx1"]
        post_rx_on(fe, *range(pairs))
        # Three flows per pair, each sent from its pair.
        for k in range(pairs):
            for j in range(3):
                fe.post_tx(udp(40000 + 10 * k + j, b"pair%d" % k), pair=k)
            fe.pair_rings[k][1].kick()
        got = await collect(fe, {k: 3 for k in range(pairs)})
        for k in range(pairs):
            replies = [Ether(f) for f in got[k]]
            assert sorted(p[UDP].dport for p in replies) == [40000 + 10 * k + j for j in range(3)], (k, got)
            assert all(p[Raw].load == b"pair%d" % k for p in replies)
        st = dev.steering.describe()
        assert st["rx_by_flow"] == 3 * pairs and st["learned"] == 3 * pairs
        # Every ring of every pair moved chains: TX drained, RX filled.
        for q in srv.current.backend.queues:
            assert q.stats["chains"] > 0, q.name
            assert q.packed is packed


async def test_disabled_pair_gets_no_frames(tmp_path, nursery):
    """`ethtool -L eth0 combined 1`: QEMU disables pair 1; its flows' replies come on pair 0."""
    async with session(tmp_path, nursery, 2) as (srv, fe):
        post_rx_on(fe, 0, 1)
        send_on(fe, 1, udp(41000))
        got = await collect(fe, {1: 1})
        assert len(got[1]) == 1 and not got[0]
        # Pair 1 off (both rings). The flow learned on pair 1, sent again from pair 0
        # (the guest moved it, as XPS does), answered on pair 0; so is a new flow.
        await fe.enable_pair(1, False)
        rx1_chains = srv.current.backend.queues[2].stats["chains"]
        send_on(fe, 0, udp(41000), udp(41001))
        got = await collect(fe, {0: 2})
        assert sorted(Ether(f)[UDP].dport for f in got[0]) == [41000, 41001]
        assert not got[1] and srv.current.backend.queues[2].stats["chains"] == rx1_chains
        # Back on: the flow that pair 1 sends again goes back there.
        await fe.enable_pair(1, True)
        send_on(fe, 1, udp(41002))
        got = await collect(fe, {1: 1})
        assert [Ether(f)[UDP].dport for f in got[1]] == [41002] and not got[0]


async def test_frames_waiting_on_a_disabled_pair_move_to_an_enabled_one(tmp_path, nursery):
    async with session(tmp_path, nursery, 2) as (srv, fe):
        post_rx_on(fe, 0)
        # Pair 1 posts no RX buffers: its replies wait in its deque.
        for j in range(4):
            fe.post_tx(udp(42000 + j), pair=1)
        fe.pair_rings[1][1].kick()
        dev = srv.current.device
        with trio.fail_after(5):
            while dev.rx_pendings[1].__len__() < 4:
                await trio.sleep(0.01)
        await fe.enable_pair(1, False)
        fe.post_tx(udp(42100), pair=0)     # anything that makes the device flush RX again
        fe.tx.kick()
        got = await collect(fe, {0: 5})
        assert sorted(Ether(f)[UDP].dport for f in got[0]) == [42000, 42001, 42002, 42003, 42100]
        assert dev.rx_waiting() == 0


async def test_too_many_pairs_is_told_once_across_connections(tmp_path, nursery, caplog):
    """A front-end that wants a ring of pair 2 from a 2-pair backend (refused), and one that
    leaves right after GET_QUEUE_NUM as QEMU does: one line for all of them, at server level."""
    srv = await serve(tmp_path, nursery, 2)
    caplog.set_level(logging.WARNING, logger="vhostnet.server")
    for attempt in range(5):
        fe = await connect(srv, 2)
        pf = await fe.get_u64(Req.GET_PROTOCOL_FEATURES)
        await fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(pf))
        assert await fe.get_u64(Req.GET_QUEUE_NUM) == 2
        if attempt % 2:
            status = await fe.ack(Req.SET_VRING_NUM, STATE.pack(5, 64))   # pair 2's TX ring
            assert status != 0
        await fe.shutdown(srv)
    assert srv.queue_num_short_seen == 5
    told = [r.getMessage() for r in caplog.records if "start vhostnet with --queues" in r.getMessage()]
    assert len(told) == 1, told
    assert "queues=2" in told[0]


async def test_hostile_ring_of_pair_one_leaves_pair_zero_working(tmp_path, nursery):
    """A descriptor index past the ring on tx1: a finding on tx1, refused; pair 0 still echoes."""
    async with session(tmp_path, nursery, 2, queue_size=64) as (srv, fe):
        post_rx_on(fe, 0)
        tx1 = fe.pair_rings[1][1]
        tx1.push_avail(1000)           # head 1000 in a 64-entry ring (virtio 1.2 §2.7.13.1)
        tx1.kick()
        backend = srv.current.backend
        with trio.fail_after(5):
            while not backend.queues[3].errors:
                await trio.sleep(0.01)
        assert not backend.queues[1].errors
        got = await fe.exchange([udp(43000)], want=1)
        assert Ether(got[0])[UDP].dport == 43000


def test_flow_key_is_symmetric_and_hash_spreads():
    a = udp(40000)
    b = bytes(Ether(src=GW_MAC, dst=GUEST_MAC) / IP(src="10.0.2.2", dst="10.0.2.15")
              / UDP(sport=ECHO_PORT, dport=40000))
    assert flow_key(a) == flow_key(b) is not None
    assert flow_key(udp(40001)) != flow_key(a)
    arp = bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.2.15", pdst="10.0.2.2"))
    assert flow_key(arp) is None
    s = Steering(4)
    # Never-seen flows: spread by the hash, only over the ready pairs.
    picks = {s.choose(udp(50000 + i), [0, 1, 2, 3]) for i in range(64)}
    assert picks == {0, 1, 2, 3}
    assert {s.choose(udp(50000 + i), [1, 3]) for i in range(64)} == {1, 3}
    assert s.choose(arp, [2, 3]) == 2
    s.learn(a, 3)
    assert s.choose(b, [0, 1, 2, 3]) == 3
    assert s.choose(b, [0, 1]) in (0, 1)     # its pair is not ready: hashed instead


def test_flow_map_is_bounded():
    s = Steering(2, capacity=8)
    for i in range(100):
        s.learn(udp(30000 + i), i % 2)
    assert len(s.flows) == 8 and s.counters["evicted"] == 92


async def test_inspect_and_stats_show_every_queue(tmp_path, nursery):
    """Both documents list every pair's rings and the pairs in use, as docs/json.md says."""
    import json
    from vhostnet.observe.report import inspect_doc, stats_doc
    from ..observe import check_doc
    async with session(tmp_path, nursery, 2) as (srv, fe):
        post_rx_on(fe, 1)
        send_on(fe, 1, udp(44000))
        assert len((await collect(fe, {1: 1}))[1]) == 1
        await fe.enable_pair(1, False)
        ins = json.loads(json.dumps(inspect_doc(srv)))
        check_doc(ins, "inspect", allow_missing=["queues[].last_used.", "memory[]"])
        assert [(q["name"], q["pair"]) for q in ins["queues"]] == [("rx", 0), ("tx", 0), ("rx1", 1), ("tx1", 1)]
        assert ins["queue_pairs"]["served"] == 2 and ins["queue_pairs"]["enabled"] == [0]
        assert ins["queue_pairs"]["steering"]["rx_by_flow"] == 1
        st = json.loads(json.dumps(stats_doc(srv)))
        check_doc(st, "stats", allow_missing=["stack.", "nat.", "forwards[]", "services.", "faults.",
                                              "capture.", "backend."])
        rings = {q["name"]: q for q in st["queues"]}
        assert rings["tx1"]["chains"] == 1 and rings["rx1"]["chains"] == 1 and not rings["rx1"]["enabled"]
        assert rings["tx"]["chains"] == 0


async def test_a_late_disconnect_is_not_taken_for_too_many_pairs(tmp_path, nursery, caplog, monkeypatch):
    """QEMU crashing (MSI-X under TCG) before SET_FEATURES is no queue-count problem: only a
    front-end that leaves within QUEUE_NUM_GIVE_UP of connecting gets the --queues line."""
    from vhostnet.vhostuser import server as server_mod
    monkeypatch.setattr(server_mod, "QUEUE_NUM_GIVE_UP", 0.0)
    srv = await serve(tmp_path, nursery, 2)
    caplog.set_level(logging.WARNING, logger="vhostnet.server")
    fe = await connect(srv, 2)
    pf = await fe.get_u64(Req.GET_PROTOCOL_FEATURES)
    await fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(pf))
    assert await fe.get_u64(Req.GET_QUEUE_NUM) == 2
    await fe.shutdown(srv)
    assert srv.queue_num_short_seen == 0
    assert not [r for r in caplog.records if "--queues" in r.getMessage()]


async def test_safety_poll_watches_every_pair(tmp_path, nursery):
    """A frame made available on tx1 without a kick: pair 1's own safety poll finds it
    (its `unkicked` count), and its reply comes back on rx1."""
    async with session(tmp_path, nursery, 2) as (srv, fe):
        post_rx_on(fe, 1)
        fe.post_tx(udp(45000), pair=1)      # no kick
        queues = srv.current.backend.queues
        with trio.fail_after(5):
            while queues[3].stats["unkicked"] < 1:
                await trio.sleep(0.01)
        got = await collect(fe, {1: 1})
        assert [Ether(f)[UDP].dport for f in got[1]] == [45000] and not got[0]
        assert queues[1].stats["unkicked"] == 0
