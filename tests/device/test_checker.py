"""The driver-conformance checker: each violation committed through the
in-process frontend is named (rule, virtio 1.2 section, MUST/SHOULD) in the
`check` document, with its first example; the device carries on where it
can, and `--strict` breaks the ring at the first MUST instead.
"""
import os
import struct

import pytest
import trio
from scapy.layers.inet import ICMP
from scapy.layers.l2 import Ether

from vhostnet.observe.check import check_doc
from vhostnet.vhostuser.safety_poll import LATE_KICK_GRACE
from vhostnet.testing.frontend import F_INDIRECT, F_NEXT, F_WRITE, STATE, U64, Frontend
from vhostnet.virtio import features as F
from vhostnet.vhostuser.protocol import Req

from .conftest import make_server
from .test_datapath import ping

SCRATCH = 0x200000     # guest memory no ring or buffer of the frontend uses
RX, TX = 0, 1


async def named(server, queue, rule, section, level, count=1, timeout=5.0) -> dict:
    """Wait until the check document names RULE on QUEUE; check its section and level."""
    with trio.fail_after(timeout):
        while True:
            doc = check_doc(server)
            got = [f for f in doc["findings"] if f["rule"] == rule and f["queue"] == queue]
            if got and got[0]["count"] >= count:
                break
            await trio.sleep(0.005)
    f = got[0]
    assert (f["rule"], f["section"], f["level"]) == (rule, section, level), f
    assert f["message"].startswith(f"virtio 1.2 §{section}: ")
    assert f["example"]["detail"]
    return f


def rules(server) -> set[str]:
    return {f["rule"] for f in check_doc(server)["findings"]}


async def still_works(fe, seq=42):
    got = await fe.exchange([ping(seq=seq)], want=1)
    assert [Ether(g)[ICMP].seq for g in got] == [seq]


def frame_at(fe, addr, frame, hdr=None):
    data = (fe.net_hdr() if hdr is None else hdr) + frame
    fe.mem[addr:addr + len(data)] = data
    return len(data)


def offer(r, head):
    r.chains[head] = [head]
    r.free.remove(head)
    r.push_avail(head)
    r.kick()


# -- descriptors and chains (virtio 1.2 §2.7.4, §2.7.5) -------------------------------

async def test_device_writable_before_device_readable(ready, server):
    r = ready.tx
    n = frame_at(ready, SCRATCH, ping())
    r.add([(SCRATCH + 0x1000, 64, F_WRITE), (SCRATCH, n, 0)])
    r.kick()
    f = await named(server, TX, "read_after_write", "2.7.4.2", "MUST")
    assert f["example"]["addr"] == SCRATCH and f["example"]["len"] == n
    await still_works(ready)


async def test_indirect_without_the_feature(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.INDIRECT_DESC) | 1 << 30)
    fe.post_rx()
    fe.rx.kick()
    r = fe.tx
    n = frame_at(fe, SCRATCH + 0x1000, ping(seq=9))
    struct.pack_into("<QIHH", fe.mem, SCRATCH, SCRATCH + 0x1000, n, 0, 0)
    head = r.free[-1]
    r.write_desc(head, SCRATCH, 16, F_INDIRECT)
    offer(r, head)
    f = await named(server, TX, "indirect_not_negotiated", "2.7.5.3.1", "MUST")
    assert f["example"]["head"] == head and f["example"]["addr"] == SCRATCH
    # Tolerated: the frame went through.
    with trio.fail_after(5):
        while not (got := fe.read_rx()):
            await fe.rx.wait_call(0.05)
    assert Ether(got[0][1])[ICMP].seq == 9


async def test_indirect_with_next(ready, server):
    r = ready.tx
    head = r.free[-1]
    r.write_desc(head, SCRATCH, 16, F_INDIRECT | F_NEXT, 0)
    offer(r, head)
    f = await named(server, TX, "indirect_with_next", "2.7.5.3.1", "MUST")
    assert f["example"]["flags"] == F_INDIRECT | F_NEXT


async def test_indirect_table_not_a_multiple_of_16(ready, server):
    r = ready.tx
    head = r.free[-1]
    r.write_desc(head, SCRATCH, 24, F_INDIRECT)
    offer(r, head)
    f = await named(server, TX, "bad_indirect_len", "2.7.5.3", "MUST")
    assert f["example"]["seen"] == 24


async def test_nested_indirect(ready, server):
    r = ready.tx
    struct.pack_into("<QIHH", ready.mem, SCRATCH, SCRATCH + 0x1000, 16, F_INDIRECT, 0)
    head = r.free[-1]
    r.write_desc(head, SCRATCH, 16, F_INDIRECT)
    offer(r, head)
    f = await named(server, TX, "nested_indirect", "2.7.5.3.1", "MUST")
    assert f["example"]["indirect_table"] is True


# -- the avail ring (§2.7.6, §2.7.7, §2.7.13) ----------------------------------------------

async def test_head_made_available_again_while_held(ready, server):
    r = ready.tx
    head = ready.post_tx(ping(seq=3))
    r.push_avail(head)          # the same head again, before the device returned it
    r.kick()
    f = await named(server, TX, "avail_head_in_use", "2.7.13.1", "MUST")
    assert f["example"]["head"] == head
    with trio.fail_after(5):
        while server.current.backend.queues[TX].last_avail_idx != r.avail_idx:
            await trio.sleep(0.005)
    # The frame went out once; the id came back once.
    with trio.fail_after(5):
        while not (got := ready.read_rx()):
            await ready.rx.wait_call(0.05)
    assert [Ether(g[1])[ICMP].seq for g in got] == [3]
    assert server.current.device.counters["tx_frames"] == 1
    assert r.take_used() == [(head, 0)]
    await still_works(ready)


async def test_avail_idx_backwards_breaks_ring(ready, server):
    await still_works(ready, seq=1)
    r = ready.tx
    r.set_avail_idx(r.avail_idx - 1)
    r.kick()
    f = await named(server, TX, "avail_idx_backwards", "2.7.6.1", "MUST")
    assert f["example"]["seen"] == r.avail_idx and f["example"]["last_avail_idx"] == r.avail_idx + 1
    assert server.current.backend.queues[TX].broken == "avail_idx_backwards"


async def test_avail_idx_past_the_queue_size(ready, server):
    r = ready.tx
    r.set_avail_idx(r.avail_idx + r.size + 1)
    r.kick()
    f = await named(server, TX, "avail_idx_jump", "2.7.6.1", "MUST")
    assert f["example"]["seen"] == r.size + 1


async def test_avail_flags_with_event_idx(ready, server):
    assert ready.features >> F.EVENT_IDX & 1
    ready.rx.set_avail_flags(1)   # NO_INTERRUPT: meaningless with EVENT_IDX, must be 0
    await still_works(ready)
    f = await named(server, RX, "avail_flags_invalid", "2.7.7.1", "MUST")
    assert f["example"]["seen"] == 1 and f["example"]["event_idx"] is True


async def test_avail_flags_without_event_idx(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.EVENT_IDX) | 1 << 30)
    fe.post_rx()
    fe.rx.set_avail_flags(2)
    fe.rx.kick()
    await still_works(fe)
    f = await named(server, RX, "avail_flags_invalid", "2.7.7.1", "MUST")
    assert f["example"]["seen"] == 2 and f["example"]["expected"] == "0 or 1"


async def test_avail_flag_no_interrupt_without_event_idx_is_fine(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.EVENT_IDX) | 1 << 30)
    fe.post_rx()
    fe.rx.set_avail_flags(1)
    fe.rx.kick()
    fe.post_tx(ping(seq=4))
    fe.tx.kick()
    with trio.fail_after(5):
        while not fe.read_rx():
            await trio.sleep(0.005)
    assert rules(server) == set()


async def test_published_entries_without_a_kick(ready, server):
    """Notifications enabled (EVENT_IDX, avail_event at the next entry) and no kick."""
    await still_works(ready, seq=1)
    q = server.current.backend.queues[TX]
    assert ready.tx.avail_event() == ready.tx.avail_idx   # the device asks for a kick at the next one
    ready.post_tx(ping(seq=2))                            # ... and gets none
    with trio.fail_after(5):
        while not (got := ready.read_rx()):
            await ready.rx.wait_call(0.05)
    assert Ether(got[0][1])[ICMP].seq == 2                 # the safety poll found it
    f = await named(server, TX, "kick_missed", "2.7.10.1", "MUST")
    assert f["example"]["entries"] == 1 and f["example"]["seen"] == "none"
    assert q.stats["unkicked"] == 1


async def test_a_late_kick_is_not_a_missed_one(ready, server):
    """A driver descheduled between its idx store and its kick: the kick comes late, no finding."""
    await still_works(ready, seq=1)
    q = server.current.backend.queues[TX]
    ready.post_tx(ping(seq=2))
    with trio.fail_after(5):
        while q.stats["unkicked"] < 1:
            await trio.sleep(0.002)
    ready.tx.kick()                                       # late, with nothing new
    with trio.fail_after(5):
        while q.stats["kicks"] < 2:
            await trio.sleep(0.002)
    await trio.sleep(LATE_KICK_GRACE + 0.1)   # past it: a finding would have been confirmed by now
    assert "kick_missed" not in rules(server)


async def test_a_batch_kicked_once_at_its_end_is_no_missed_kick(fe, server):
    """Linux fills its RX ring entry by entry and kicks once at the end, which under TCG
    can take longer than the poll's interval: the kick within the grace period covers it."""
    await fe.handshake()
    q = server.current.backend.queues[RX]
    fe.post_rx(count=100)                                 # published, not kicked yet ...
    with trio.fail_after(5):
        while q.stats["unkicked"] < 100:                  # ... so the poll found them
            await trio.sleep(0.002)
    fe.post_rx(count=50)
    fe.rx.kick()                                          # the batch's kick, with more entries
    with trio.fail_after(5):
        while q.stats["kicks"] < 1:
            await trio.sleep(0.002)
    await trio.sleep(LATE_KICK_GRACE + 0.1)
    assert "kick_missed" not in rules(server)
    await still_works(fe)


# -- the virtio-net header (§5.1.6.2.1) and RX buffers (§5.1.6.3.1) ----------------------

async def test_tx_num_buffers_not_zero(ready, server):
    ready.post_tx(ping(seq=5), hdr=ready.net_hdr(num_buffers=3))
    ready.tx.kick()
    f = await named(server, TX, "tx_num_buffers", "5.1.6.2.1", "MUST")
    assert f["example"]["seen"] == 3
    with trio.fail_after(5):   # tolerated
        while not (got := ready.read_rx()):
            await ready.rx.wait_call(0.05)
    assert Ether(got[0][1])[ICMP].seq == 5


async def test_tx_checksum_offload_not_negotiated(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~F.OFFLOAD_FEATURES | 1 << 30)
    fe.post_rx()
    fe.rx.kick()
    fe.post_tx(ping(seq=6), hdr=fe.net_hdr(flags=1, csum_start=34, csum_offset=2))
    fe.tx.kick()
    f = await named(server, TX, "tx_csum_not_negotiated", "5.1.6.2.1", "MUST")
    assert f["example"]["seen"] == 1


async def test_tx_gso_not_negotiated(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~F.OFFLOAD_FEATURES | 1 << 30)
    fe.post_tx(ping(), hdr=fe.net_hdr(flags=1, gso_type=1, gso_size=1400, csum_start=34, csum_offset=2))
    fe.tx.kick()
    await named(server, TX, "tx_bad_gso", "5.1.6.2.1", "MUST")


async def test_tx_data_valid(ready, server):
    ready.post_tx(ping(), hdr=ready.net_hdr(flags=2))
    ready.tx.kick()
    await named(server, TX, "tx_data_valid", "5.1.6.2.1", "MUST")


async def test_tx_csum_outside_the_frame(ready, server):
    ready.post_tx(ping(), hdr=ready.net_hdr(flags=1, csum_start=90, csum_offset=16))
    ready.tx.kick()
    f = await named(server, TX, "tx_bad_csum_offset", "5.1.6.2.1", "MUST")
    assert (f["example"]["csum_start"], f["example"]["csum_offset"]) == (90, 16)
    await still_works(ready)


async def test_tx_gso_type_without_gso_size(ready, server):
    ready.post_tx(ping(), hdr=ready.net_hdr(flags=1, gso_type=1, gso_size=0, csum_start=34, csum_offset=16))
    ready.tx.kick()
    f = await named(server, TX, "tx_gso_without_size", "5.1.6.2.1", "MUST")
    assert f["example"]["seen"] == 0


async def test_tx_gso_type_without_needs_csum(ready, server):
    ready.post_tx(ping(), hdr=ready.net_hdr(gso_type=1, gso_size=1400))
    ready.tx.kick()
    await named(server, TX, "tx_gso_without_csum", "5.1.6.2.1", "MUST")


async def test_rx_buffers_below_the_spec_minimum_are_a_should(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.MRG_RXBUF | F.OFFLOAD_FEATURES) | 1 << 30)
    fe.post_rx(size=1024)
    fe.rx.kick()
    await still_works(fe)      # a 98-byte reply fits: delivered
    f = await named(server, RX, "rx_buffer_below_minimum", "5.1.6.3.1", "SHOULD")
    assert f["example"]["seen"] == 1024 and f["example"]["expected"] == ">= 1526 bytes"
    doc = check_doc(server)
    assert doc["must"] == 0 and doc["should"] == 1


async def test_rx_buffer_minimum_with_receive_offloads_is_65562(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.MRG_RXBUF) | 1 << 30)
    fe.post_rx(size=4096)
    fe.rx.kick()
    await still_works(fe)
    f = await named(server, RX, "rx_buffer_below_minimum", "5.1.6.3.1", "SHOULD")
    assert f["example"]["expected"] == ">= 65562 bytes"


# -- features (§2.2.1) ----------------------------------------------------------------------

async def test_features_not_offered(fe, server):
    offered = await fe.get_u64(Req.GET_FEATURES)
    await fe.request(Req.SET_FEATURES, U64.pack(offered | 1 << 40))
    await fe.get_u64(Req.GET_FEATURES)   # a round trip
    f = await named(server, None, "feature_not_offered", "2.2.1", "MUST")
    assert "bit40" in f["example"]["extra"] and f["queue_name"] == "device"


async def test_feature_without_the_one_it_requires(fe, server):
    await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.CSUM) | 1 << 30)   # HOST_TSO4 without CSUM
    f = await named(server, None, "feature_dependency", "2.2.1", "MUST")
    assert f["example"]["seen"] == ["HOST_TSO4 without CSUM"]


async def test_clean_driver_has_no_finding(ready, server):
    for seq in range(40):      # more than a ring's worth of RX and TX
        await still_works(ready, seq=seq)
    doc = check_doc(server)
    assert doc["findings"] == [] and doc["must"] == doc["should"] == 0
    assert doc["unkicked"] == {"rx": 0, "tx": 0}


# -- serve --strict and the disconnect summary --------------------------------------------

@pytest.fixture
async def strict_server(tmp_path, nursery):
    srv = make_server(tmp_path / "strict.sock", strict=True)
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    yield srv


async def test_strict_breaks_the_ring_and_signals_the_error_fd(strict_server):
    fe = Frontend()
    await fe.connect(strict_server.socket_path)
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        await fe.handshake()
        await fe.request(Req.SET_VRING_ERR, U64.pack(TX), [err])
        fe.post_rx()
        fe.rx.kick()
        await still_works(fe, seq=1)
        fe.post_tx(ping(seq=2), hdr=fe.net_hdr(num_buffers=1))   # tolerated without --strict
        fe.post_tx(ping(seq=3))
        fe.tx.kick()
        await named(strict_server, TX, "tx_num_buffers", "5.1.6.2.1", "MUST")
        q = strict_server.current.backend.queues[TX]
        assert q.broken == "tx_num_buffers"
        with trio.fail_after(5):
            while True:
                try:
                    assert os.eventfd_read(err) >= 1
                    break
                except BlockingIOError:
                    await trio.sleep(0.005)
        # Neither the violating frame nor the one after it went out.
        assert strict_server.current.device.counters["tx_frames"] == 1
        assert check_doc(strict_server)["strict"] is True
        assert check_doc(strict_server)["broken"] == {"tx": "tx_num_buffers"}
    finally:
        await fe.shutdown(strict_server)
        os.close(err)


async def test_disconnect_logs_one_line_per_finding(fe, server, caplog):
    await fe.handshake()
    fe.post_tx(ping(), hdr=fe.net_hdr(flags=2))
    fe.post_tx(ping(), hdr=fe.net_hdr(flags=2))
    fe.post_tx(ping(), hdr=fe.net_hdr(num_buffers=7))
    fe.tx.kick()
    await named(server, TX, "tx_num_buffers", "5.1.6.2.1", "MUST")
    await fe.close()
    with trio.fail_after(5):
        while server.current is not None:
            await trio.sleep(0.005)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finding ")]
    assert lines == [
        "finding MUST tx_data_valid §5.1.6.2.1 on tx: 2 time(s), first: tx: header at descriptor "
        f"{255} sets flags 0x2 (DATA_VALID/RSC_INFO)",
        "finding MUST tx_num_buffers §5.1.6.2.1 on tx: 1 time(s), first: tx: header at descriptor "
        f"{253} has num_buffers 7",
    ]
