"""A hostile or buggy driver: refused, counted, logged; the backend stays up.

Each case writes raw descriptors into the TX (or RX) ring, kicks, and then
checks the error counter by reason and that a good frame still goes through.
"""
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from vhostnet.vhostuser.memory import GuestMemory
from vhostnet.virtio.split import SplitRing
from vhostnet.virtio.ring import Budget

from .conftest import wait_counter
from vhostnet.testing.frontend import F_INDIRECT, F_NEXT, F_WRITE, Frontend, UVA_BASE
from .test_datapath import ping

from scapy.layers.inet import ICMP
from scapy.layers.l2 import Ether


async def _wait_error(server, qi, reason, count=1):
    q = server.current.backend.queues[qi]
    with trio.fail_after(5):
        while q.errors.get(reason, 0) < count:
            await trio.sleep(0.005)
    return q


async def _still_works(fe, seq=42):
    got = await fe.exchange([ping(seq=seq)], want=1)
    assert [Ether(g)[ICMP].seq for g in got] == [seq]


async def _refused(fe, server, head, reason):
    """Offer the chain at `head`, and check it is refused for `reason` and the device still works."""
    fe.tx.push_avail(head)
    fe.tx.kick()
    await _wait_error(server, 1, reason)
    await _still_works(fe)


def _frame_at(fe, slot, frame):
    addr = fe.tx.buf(slot)
    data = fe.net_hdr() + frame
    fe.mem[addr:addr + len(data)] = data
    return addr, len(data)


async def test_descriptor_outside_guest_memory(ready, server):
    r = ready.tx
    r.write_desc(0, ready.mem_size + 0x1000, 100, 0)
    r.push_avail(0)
    r.kick()
    q = await _wait_error(server, 1, "desc_out_of_bounds")
    assert q.broken is None
    # The bad chain was handed back to the driver with length 0.
    with trio.fail_after(2):
        while True:
            used = r.take_used()
            if used:
                break
            await trio.sleep(0.005)
    assert used == [(0, 0)]
    r.free = list(range(r.size))
    await _still_works(ready)


async def test_length_crossing_end_of_memory(ready, server):
    r = ready.tx
    r.write_desc(0, ready.mem_size - 10, 100, 0)
    await _refused(ready, server, 0, "desc_out_of_bounds")


async def test_chain_that_loops(ready, server):
    r = ready.tx
    addr, n = _frame_at(ready, 0, ping())
    r.write_desc(0, addr, n, F_NEXT, 1)
    r.write_desc(1, addr, 4, F_NEXT, 0)
    await _refused(ready, server, 0, "chain_too_long")


async def test_indirect_table_longer_than_queue(ready, server):
    r = ready.tx
    r.write_desc(0, 0x20000, 16 * (r.size + 1), F_INDIRECT)
    await _refused(ready, server, 0, "bad_indirect_len")


async def test_indirect_inside_indirect(ready, server):
    r = ready.tx
    table = 0x20000
    struct.pack_into("<QIHH", ready.mem, table, 0x21000, 32, F_INDIRECT, 0)
    r.write_desc(0, table, 16, F_INDIRECT)
    await _refused(ready, server, 0, "nested_indirect")


async def test_valid_indirect_chain(ready, server):
    r = ready.tx
    frame = ping(seq=77)
    hdr = ready.net_hdr()
    ready.mem[0x30000:0x30000 + len(hdr)] = hdr
    ready.mem[0x31000:0x31000 + len(frame)] = frame
    table = 0x20000
    struct.pack_into("<QIHH", ready.mem, table, 0x30000, len(hdr), F_NEXT, 1)
    struct.pack_into("<QIHH", ready.mem, table + 16, 0x31000, len(frame), 0, 0)
    slot = r.free.pop()
    r.write_desc(slot, table, 32, F_INDIRECT)
    r.chains[slot] = [slot]
    r.push_avail(slot)
    r.kick()
    assert await ready.rx.wait_call()
    assert Ether(ready.read_rx()[0][1])[ICMP].seq == 77
    assert not server.current.backend.queues[1].errors


async def test_next_index_out_of_range(ready, server):
    r = ready.tx
    addr, n = _frame_at(ready, 0, ping())
    r.write_desc(0, addr, n, F_NEXT, 5000)
    await _refused(ready, server, 0, "next_out_of_range")


async def test_head_index_out_of_range(ready, server):
    r = ready.tx
    await _refused(ready, server, 999, "head_out_of_range")


async def test_avail_index_jump_breaks_ring_until_restart(ready, server):
    r = ready.tx
    r.set_avail_idx(r.avail_idx + 1000)
    r.kick()
    q = await _wait_error(server, 1, "avail_idx_jump")
    assert q.broken == "avail_idx_jump"
    # The control plane still answers, and a driver reset (ring restart) recovers.
    base = await ready.get_vring_base(1)
    r.set_avail_idx(base)
    import os
    r.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    await ready.setup_ring(r, base=base)
    from vhostnet.testing.frontend import STATE
    from vhostnet.vhostuser.protocol import Req
    await ready.request(Req.SET_VRING_ENABLE, STATE.pack(1, 1))
    r.last_used = r.used_idx()
    r.free = list(range(r.size))
    await _still_works(ready)


async def test_readable_buffer_in_rx_queue(fe, server):
    await fe.handshake()
    r = fe.rx
    r.add([(r.buf(0), 2048, 0)])  # device-readable: useless for RX
    fe.post_rx()
    fe.rx.kick()
    got = await fe.exchange([ping(seq=5)], want=1)
    assert [Ether(g)[ICMP].seq for g in got] == [5]
    assert server.current.device.counters["rx_readonly_buffer"] == 1


async def test_bad_virtio_net_headers(ready, server):
    dev = server.current.device
    ready.post_tx(b"\0" * 6)                                     # runt
    ready.post_tx(ping(), hdr=ready.net_hdr(gso_type=3, gso_size=1400))  # UDP GSO never offered
    ready.post_tx(ping(), hdr=ready.net_hdr(flags=1, csum_start=5000, csum_offset=6))
    ready.tx.kick()
    await wait_counter(dev, "tx_bad_csum_offset", 1)
    assert dev.counters["tx_runt"] == 1
    assert dev.counters["tx_bad_gso"] == 1
    await _still_works(ready)


async def test_small_rx_buffers_without_mergeable(fe, server):
    from vhostnet.virtio import features as F
    await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.MRG_RXBUF) | 1 << 30)
    fe.post_rx(count=4, size=64)   # too small for a 98-byte ping reply
    fe.rx.kick()
    fe.post_tx(ping(seq=1))
    fe.tx.kick()
    dev = server.current.device
    await wait_counter(dev, "rx_buffer_too_small", 1)
    assert fe.rx.used_idx() == 0   # buffers kept for later frames


async def test_buffer_crossing_contiguous_regions(server):
    fe = Frontend(two_regions=True)
    await fe.connect(server.socket_path)
    await fe.handshake()
    half = fe.mem_size // 2
    frame = fe.net_hdr() + ping(seq=11)
    start = half - 40
    fe.mem[start:start + len(frame)] = frame
    slot = fe.tx.free.pop()
    fe.tx.write_desc(slot, start, len(frame), 0)
    fe.tx.chains[slot] = [slot]
    fe.tx.push_avail(slot)
    got = await fe.exchange([], want=1)
    assert [Ether(g)[ICMP].seq for g in got] == [11]
    assert not server.current.backend.queues[1].errors
    await fe.shutdown(server)


# -- the ring walker against arbitrary driver-controlled bytes ------------

@pytest.fixture(scope="module")
def guest():
    import mmap
    import os
    size = 1 << 20
    fd = os.memfd_create("fuzz")
    os.ftruncate(fd, size)
    mem = GuestMemory()
    mem.add(fd, 0x10000, size, UVA_BASE, 0)
    mm = mmap.mmap(fd, size)
    yield mem, memoryview(mm)
    mem.close()
    os.close(fd)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(desc=st.binary(min_size=16 * 8, max_size=16 * 8), avail=st.binary(min_size=22, max_size=22),
       extra=st.binary(min_size=64, max_size=64))
def test_ring_walker_never_raises_or_escapes(guest, desc, avail, extra):
    mem, raw = guest
    q = SplitRing(1, "tx")
    q.num = 8
    q.desc_uva, q.avail_uva, q.used_uva = UVA_BASE, UVA_BASE + 0x1000, UVA_BASE + 0x2000
    raw[0:len(desc)] = desc
    raw[0x1000:0x1000 + len(avail)] = avail
    raw[0x3000:0x3000 + len(extra)] = extra  # target for indirect tables at gpa 0x13000
    q.attach(mem)
    q.started = q.enabled = True
    taken = 0
    for _ in range(40):
        c = q.pop()
        if c is None:
            break
        taken += 1
        for v in c.readable + c.writable:
            assert len(v) <= 1 << 20
        assert c.read_len + c.write_len <= 8 * 0xFFFFFFFF
    q.publish()
    q.detach()
    assert taken <= 8


def test_fast_path_chains_have_every_field(guest):
    """pop_fast builds its Chain without Chain.__init__: every slot must be
    set, to what the walk (pop() on a chain the fast path leaves) gives."""
    import struct
    from vhostnet.virtio.ring import Chain
    mem, raw = guest
    raw[0:0x3000] = bytes(0x3000)
    q = SplitRing(0, "tx")
    q.num = 8
    q.desc_uva, q.avail_uva, q.used_uva = UVA_BASE, UVA_BASE + 0x1000, UVA_BASE + 0x2000
    struct.pack_into("<QIHH", raw, 0, 0x14000, 64, 0, 0)        # 0: 64 readable bytes
    struct.pack_into("<QIHH", raw, 16, 0x14100, 32, 2, 0)       # 1: 32 writable bytes
    q.attach(mem)
    q.started = q.enabled = True

    def offer(h):
        idx = struct.unpack_from("<H", raw, 0x1002)[0]
        struct.pack_into("<H", raw, 0x1004 + 2 * (idx % 8), h)
        struct.pack_into("<H", raw, 0x1002, idx + 1)

    def fields(c):
        return {k: (tuple(bytes(v) for v in getattr(c, k)) if k in ("readable", "writable") else getattr(c, k))
                for k in Chain.__slots__}
    walked = {}
    for h in (0, 1):
        offer(h)
        q._rcache = None                  # no region cached: pop() walks
        walked[h] = fields(q.pop())
        q.push(h, 0)
        q.publish()
    for h in (0, 1):
        offer(h)
        c = q.pop_fast(Budget(8))
        assert c is not None and type(c) is Chain
        assert fields(c) == walked[h]
        q.push(h, 0)
        q.publish()
    q.detach()


def test_pop_fast_takes_only_what_needs_no_finding(guest):
    """pop_fast (the device's RX fast path) takes a plain one-descriptor chain
    and leaves anything a finding would be recorded for to pop(), untouched."""
    import struct
    mem, raw = guest
    raw[0:0x3000] = bytes(0x3000)   # the module's memory: clear what the walker test left
    q = SplitRing(0, "rx")
    q.num = 8
    q.desc_uva, q.avail_uva, q.used_uva = UVA_BASE, UVA_BASE + 0x1000, UVA_BASE + 0x2000
    for i in range(3):   # descriptors 0..2: 64 writable bytes each at gpa 0x14000 + 64 i
        struct.pack_into("<QIHH", raw, 16 * i, 0x14000 + 64 * i, 64, 2, 0)
    q.attach(mem)
    q.started = q.enabled = True

    def offer(*heads):
        for k, h in enumerate(heads):
            idx = struct.unpack_from("<H", raw, 0x1002)[0]
            struct.pack_into("<H", raw, 0x1004 + 2 * (idx % 8), h)
            struct.pack_into("<H", raw, 0x1002, idx + 1)
    offer(0)
    assert q.pop().head == 0                  # a walk: caches the region
    offer(0)                                  # head 0 again, still held by the device
    assert q.pop_fast(Budget(8)) is None and q.errors == {} and q.last_avail_idx == 1
    assert q.pop() is None and q.errors == {"avail_head_in_use": 1}
    offer(1)
    c = q.pop_fast(Budget(8))
    assert c.head == 1 and c.write_len == 64 and len(c.writable) == 1
    q.unpop()
    assert q.pop().head == 1 and q.errors == {"avail_head_in_use": 1}
    struct.pack_into("<QIHH", raw, 32, 0x14000 + 128, 64, 2 | 1, 0)   # descriptor 2 chains to 0
    offer(2)
    assert q.pop_fast(Budget(8)) is None and q.last_avail_idx == 3
    q.detach()
