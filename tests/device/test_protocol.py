"""vhost-user protocol handling: handshake, REPLY_ACK, ring start/stop/enable, bad requests."""
import os
import struct

import trio

from vhostnet.virtio import features as F
from vhostnet.vhostuser.protocol import ProtoFeat, Req

from vhostnet.testing.frontend import ADDR, HDR, STATE, U64, UVA_BASE, Frontend
from .test_datapath import ping

from scapy.layers.inet import ICMP
from scapy.layers.l2 import Ether


async def test_offered_features(fe):
    feats = await fe.get_u64(Req.GET_FEATURES)
    for bit in (30, F.VERSION_1, F.MRG_RXBUF, F.MAC, F.STATUS, F.CSUM, F.GUEST_CSUM,
                F.HOST_TSO4, F.GUEST_TSO4, F.EVENT_IDX, F.INDIRECT_DESC):
        assert feats >> bit & 1, f"feature bit {bit} not offered"
    pf = await fe.get_u64(Req.GET_PROTOCOL_FEATURES)
    assert pf >> ProtoFeat.REPLY_ACK & 1


async def test_reply_ack_success_and_failure(fe, server):
    await fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << ProtoFeat.REPLY_ACK))
    assert await fe.ack(Req.SET_OWNER) == 0
    assert await fe.ack(Req.SET_VRING_NUM, STATE.pack(0, 3)) != 0        # not a power of two
    assert await fe.ack(Req.SET_VRING_NUM, STATE.pack(7, 256)) != 0      # no such queue
    assert await fe.ack(Req.SET_VRING_NUM, b"\0" * 4) != 0               # truncated payload
    assert await fe.ack(99) != 0                                         # unknown request
    assert await fe.ack(Req.SET_FEATURES, U64.pack(1 << 63)) != 0        # bit never offered
    assert await fe.ack(Req.SET_VRING_NUM, STATE.pack(0, 256)) == 0
    errors = server.current.backend.errors
    assert errors["bad_set_vring_num"] == 3
    assert errors["unknown_request"] == 1
    assert errors["bad_set_features"] == 1


async def test_unknown_request_without_reply_keeps_connection(fe):
    await fe.request(77, b"junk", expect_reply=False)
    assert await fe.get_u64(Req.GET_FEATURES) >> 30 & 1


async def test_oversized_payload_refused(fe, server):
    await fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << ProtoFeat.REPLY_ACK))
    assert await fe.ack(Req.SET_CONFIG, b"\0" * 5000) != 0
    assert await fe.get_u64(Req.GET_FEATURES) >> 30 & 1


async def test_get_config_gives_mac_and_link_up(fe):
    body = await fe.request(Req.GET_CONFIG, struct.pack("<III", 0, 10, 0) + b"\0" * 10)
    offset, size, _flags = struct.unpack_from("<III", body)
    assert (offset, size) == (0, 10)
    cfg = body[12:]
    assert cfg[:6] == bytes.fromhex("525400123456")
    assert struct.unpack_from("<H", cfg, 6)[0] & 1  # VIRTIO_NET_S_LINK_UP


async def test_ring_disabled_until_enable(fe, server):
    await fe.handshake(enable=False)
    fe.post_rx()
    fe.post_tx(ping(seq=1))
    fe.tx.kick()
    fe.rx.kick()
    await trio.sleep(0.1)
    assert server.current.device.counters["tx_frames"] == 0
    for r in fe.rings:
        await fe.request(Req.SET_VRING_ENABLE, STATE.pack(r.index, 1))
    fe.tx.kick()
    assert await fe.rx.wait_call()
    assert Ether(fe.read_rx()[0][1])[ICMP].seq == 1


async def test_without_protocol_features_rings_start_enabled(fe, server):
    feats = F.DEFAULT_FEATURES  # no bit 30
    await fe.handshake(features=feats, enable=False)
    got = await fe.exchange([ping(seq=3)], want=1)
    assert Ether(got[0])[ICMP].seq == 3


async def test_get_vring_base_stops_ring_and_restart_resumes(ready, server):
    got = await ready.exchange([ping(seq=i) for i in range(5)], want=5)
    assert len(got) == 5
    base = await ready.get_vring_base(1)
    assert base == 5
    q = server.current.backend.queues[1]
    assert not q.started
    # Kicks on a stopped ring are not processed.
    ready.post_tx(ping(seq=9))
    await trio.sleep(0.05)
    assert server.current.device.counters["tx_frames"] == 5
    # QEMU restarts the ring with a new kick fd and the base it read.
    ready.tx.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    await ready.setup_ring(ready.tx, base=base)
    await ready.request(Req.SET_VRING_ENABLE, STATE.pack(1, 1))
    ready.tx.kick()
    assert await ready.rx.wait_call()
    seqs = [Ether(b)[ICMP].seq for _h, b in ready.read_rx()]
    assert seqs == [9]


async def test_polled_kick_without_fd(fe, server):
    await fe.handshake()
    # Replace the TX kick fd by "no fd, poll the ring".
    await fe.request(Req.GET_VRING_BASE, STATE.pack(1, 0))
    await fe.request(Req.SET_VRING_KICK, U64.pack(1 | 0x100))
    await fe.request(Req.SET_VRING_ENABLE, STATE.pack(1, 1))
    fe.post_rx()
    fe.rx.kick()
    fe.post_tx(ping(seq=4))   # no kick at all
    assert await fe.rx.wait_call()
    assert Ether(fe.read_rx()[0][1])[ICMP].seq == 4


async def test_event_idx_publishes_avail_event_and_suppresses_calls(ready, server):
    assert ready.features >> F.EVENT_IDX & 1
    ready.rx.auto_used_event = False
    ready.rx.set_used_event(0x7FFF)   # the driver says: no interrupt for a long time
    calls_before = server.current.backend.queues[0].stats["calls"]
    ready.post_tx(ping(seq=1))
    ready.tx.kick()
    await trio.sleep(0.1)
    rxq = server.current.backend.queues[0]
    assert rxq.stats["calls"] == calls_before
    assert rxq.stats["calls_suppressed"] >= 1
    assert len(ready.read_rx()) == 1      # the frame is there, just no interrupt
    assert ready.tx.avail_event() == ready.tx.avail_idx  # "kick me at the next one"


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def _fd_links():
    out = {}
    for n in os.listdir("/proc/self/fd"):
        try:
            out[n] = os.readlink(f"/proc/self/fd/{n}")
        except OSError:
            pass
    return out


async def test_disconnect_unmaps_and_closes_fds_then_reconnect(server):
    before = _fd_count()
    links = _fd_links()
    for round_ in range(3):
        fe = Frontend()
        await fe.connect(server.socket_path)
        await fe.handshake()
        got = await fe.exchange([ping(seq=round_)], want=1)
        assert Ether(got[0])[ICMP].seq == round_
        await fe.shutdown(server)
        now = _fd_links()
        assert _fd_count() == before, ("fds leaked across a connection: "
                                       f"{ {k: v for k, v in now.items() if links.get(k) != v} }, "
                                       f"gone: { {k: v for k, v in links.items() if now.get(k) != v} }")
    assert server.connections == 3


async def test_garbage_bytes_do_not_kill_the_server(server):
    fe = Frontend()
    await fe.connect(server.socket_path)
    await fe.send_raw(HDR.pack(1, 1, 0xFFFFFFF0) + os.urandom(64))
    await fe.close()
    fe.release()
    fe2 = Frontend()
    await fe2.connect(server.socket_path)
    with trio.fail_after(5):
        await fe2.handshake()
    got = await fe2.exchange([ping(seq=2)], want=1)
    assert len(got) == 1
    await fe2.shutdown(server)


async def test_too_many_fds_are_closed(fe, server):
    await fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << ProtoFeat.REPLY_ACK))
    extra = [os.eventfd(0) for _ in range(3)]
    before = _fd_count()
    assert await fe.ack(Req.SET_OWNER, b"", extra) != 0
    for fd in extra:
        os.close(fd)
    assert _fd_count() == before - 3


async def test_mem_table_with_unmappable_fd_is_refused(fe, server):
    await fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << ProtoFeat.REPLY_ACK))
    r, w = os.pipe()
    payload = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 20, UVA_BASE, 0)
    assert await fe.ack(Req.SET_MEM_TABLE, payload, [r]) != 0
    os.close(r)
    os.close(w)
    # A table claiming more regions than fds.
    payload = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 0, 1 << 20, UVA_BASE, 0) * 2
    assert await fe.ack(Req.SET_MEM_TABLE, payload, [fe.memfd]) != 0
    # Ring addresses outside memory are refused.
    good, fds = fe.mem_table()
    assert await fe.ack(Req.SET_MEM_TABLE, good, fds) == 0
    assert await fe.ack(Req.SET_VRING_NUM, STATE.pack(1, 256)) == 0
    assert await fe.ack(Req.SET_VRING_ADDR, ADDR.pack(1, 0, 0x1000, 0x2000, 0x3000, 0)) != 0
    assert server.current.backend.errors["bad_set_mem_table"] == 2


async def test_refused_get_vring_base_names_the_ring_asked_for(fe):
    body = await fe.request(Req.GET_VRING_BASE, STATE.pack(3, 0))   # no ring 3
    assert STATE.unpack(body) == (3, 0)


async def _one_ping_tx_stats(ready, server, guest_takes_tx_meanwhile: bool) -> dict:
    """One ping; while the device is still in the step, after publishing TX
    and writing the RX call, the guest may take its TX buffers (its interrupt
    handler, on another vCPU; here: inside flush_rx, which runs there)."""
    dev = server.current.device
    flush_rx = dev.flush_rx

    def flush_and_guest(rings):
        more = flush_rx(rings)
        if guest_takes_tx_meanwhile:
            ready.tx.take_used()         # and, as Linux does, used_event = what it took
        return more
    dev.flush_rx = flush_and_guest
    tx = server.current.backend.queues[1]
    before = dict(tx.stats)
    ready.post_tx(ping(seq=3))
    ready.tx.kick()
    assert await ready.rx.wait_call()
    assert Ether(ready.read_rx()[0][1])[ICMP].seq == 3
    with trio.fail_after(5):
        while tx.stats["calls"] + tx.stats["calls_late_suppressed"] == \
                before["calls"] + before["calls_late_suppressed"]:
            await trio.sleep(0.005)
    return {k: tx.stats[k] - before[k] for k in ("calls", "calls_late_suppressed")}


async def test_a_tx_call_the_driver_no_longer_wants_is_not_sent(ready, server):
    """EVENT_IDX: publish() found the TX call wanted; by the time it is due the
    driver took the buffers and moved used_event past them. Asked again at
    signal time (as Linux's vhost_notify does), it is not sent."""
    assert ready.features >> F.EVENT_IDX & 1
    got = await _one_ping_tx_stats(ready, server, guest_takes_tx_meanwhile=True)
    assert got == {"calls": 0, "calls_late_suppressed": 1}
    assert ready.tx.calls() == 0


async def test_a_tx_call_still_wanted_is_sent(ready, server):
    got = await _one_ping_tx_stats(ready, server, guest_takes_tx_meanwhile=False)
    assert got == {"calls": 1, "calls_late_suppressed": 0}
    assert ready.tx.calls() == 1
    assert [h for h, _ in ready.tx.take_used()]        # the buffer came back with it
