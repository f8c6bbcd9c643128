"""RX buffers a driver gets wrong while frames wait for them (issue 7, cases 1, 2 and 11).

A frame that does not fit the posted buffers waits (it is not retried in a
loop); what was written before it is published; a ring that breaks stops
work on it; and chains taken for a frame that then did not fit are given
back exactly once, in order, refused ones included.
"""

import trio
from scapy.layers.inet import ICMP
from scapy.layers.l2 import Ether

from vhostnet.testing.frontend import F_WRITE, NET_HDR, Frontend

from .conftest import ask_backend, responsive, wait_counter
from .test_datapath import ping


async def test_mrg_rx_buffer_too_small_waits_and_publishes_what_was_written(proc_backend):
    """Case 1: MRG_RXBUF, a 64-byte buffer for a 110-byte frame: no spin; the frame before it is published."""
    fe = Frontend()
    await fe.connect(proc_backend.socket)
    await fe.handshake()
    assert fe.features >> 15 & 1              # MRG_RXBUF
    fe.post_rx(count=1, size=2048)
    fe.post_rx(count=1, size=64)
    fe.rx.kick()
    for seq in (1, 2):
        fe.post_tx(ping(seq=seq))
    fe.tx.kick()
    assert await fe.rx.wait_call()
    await responsive(fe, proc_backend)
    got = fe.read_rx()
    assert [Ether(f)[ICMP].seq for _h, f in got] == [1]   # the first reply, published
    # The second waits for more room, then spans the 64-byte buffer and a new one.
    fe.post_rx(count=1, size=2048)
    fe.rx.kick()
    assert await fe.rx.wait_call()
    got = fe.read_rx()
    assert [Ether(f)[ICMP].seq for _h, f in got] == [2]
    assert NET_HDR.unpack(got[0][0])[6] == 2                # num_buffers
    await responsive(fe, proc_backend)
    await fe.close()
    fe.release()


async def test_rx_avail_jump_while_a_frame_waits_breaks_the_ring_without_spinning(proc_backend):
    """Case 2: avail->idx jumps past the queue size while a frame waits for a buffer."""
    fe = Frontend()
    await fe.connect(proc_backend.socket)
    await fe.handshake()                       # no RX buffers posted: the reply waits
    fe.post_tx(ping(seq=1))
    fe.tx.kick()
    with trio.fail_after(5):
        while (await ask_backend(proc_backend))["rx_pending"] != 1:
            await trio.sleep(0.01)
    fe.rx.set_avail_idx(fe.rx.avail_idx + 1000)
    fe.rx.kick()
    await responsive(fe, proc_backend)
    with trio.fail_after(5):
        while (rxq := (await ask_backend(proc_backend))["queues"][0])["broken"] is None:
            await trio.sleep(0.01)
    assert rxq["broken"] == "avail_idx_jump" and rxq["errors"]["avail_idx_jump"] >= 1
    [finding] = rxq["findings"]
    assert finding["section"] == "2.7.6.1" and finding["first"]["seen"] == 1000
    await responsive(fe, proc_backend)
    await fe.close()
    fe.release()


async def test_chains_given_back_for_a_frame_are_returned_once_and_in_order(fe, server):
    """Case 11: MRG_RXBUF, buffers [64 bytes, read-only, ...]: retrying the frame used to
    return the refused buffer twice and lose the small one."""
    await fe.handshake()
    r = fe.rx
    b = r.add([(r.buf(r.free[-1]), 64, F_WRITE)])
    a = r.add([(r.buf(r.free[-1]), 2048, 0)])           # device-readable: refused
    r.kick()
    fe.post_tx(ping(seq=7))
    fe.tx.kick()
    dev = server.current.device
    await wait_counter(dev, "tx_frames", 1)               # the reply met [b, a] and did not fit
    assert r.used_idx() == 0
    c = r.add([(r.buf(r.free[-1]), 2048, F_WRITE)])
    r.kick()
    assert await r.wait_call()
    used = r.take_used()
    assert sorted(h for h, _ in used) == sorted([a, b, c])        # each exactly once
    assert dict(used)[a] == 0
    lens = dict(used)
    data = bytes(fe.mem[r.buf(b):r.buf(b) + lens[b]]) + bytes(fe.mem[r.buf(c):r.buf(c) + lens[c]])
    assert NET_HDR.unpack(data[:12])[6] == 2                      # num_buffers: b and c
    assert Ether(data[12:])[ICMP].seq == 7
    # In ring order at the publish: a prefix of the avail ring (QEMU's reconnect needs it).
    assert r.used_idx() == 3 == server.current.backend.queues[0].last_avail_idx
    assert server.current.backend.queues[0].errors == {"rx_readonly_buffer": 1}


async def _reply_behind_a_looping_chain(fe, first_len: int) -> None:
    """MRG_RXBUF negotiated; RX: one FIRST_LEN-byte buffer, then a chain whose
    NEXT is itself; then a ping, whose reply cannot fit and waits."""
    await fe.handshake()
    assert fe.features >> 15 & 1                   # MRG_RXBUF
    r = fe.rx
    r.add([(r.buf(r.free[-1]), first_len, F_WRITE)])
    loop = r.free.pop()
    r.write_desc(loop, r.buf(loop), 64, F_WRITE | 1, loop)
    r.push_avail(loop)
    r.kick()
    fe.post_tx(ping(seq=1))
    fe.tx.kick()


async def test_a_frame_waiting_behind_a_looping_rx_chain_does_not_poll_for_ever(fe, server):
    """Found by scripts/fuzz_device.py (seed 1, step 544): with MRG_RXBUF, RX
    buffers too small to hold a frame followed by a chain that loops. The
    gather walks the loop, gives everything back and spends the step's budget;
    that must read as "wait for the driver", not "more work now", or the
    device asks to be polled again at once, for ever, with no kick."""
    await _reply_behind_a_looping_chain(fe, 16)   # room for the header and 4 bytes
    dev = None
    with trio.fail_after(5):
        while dev is None or len(dev.rx_pending) != 1:
            await trio.sleep(0.01)
            dev = server.current.device
    # The device waits for a kick: no deadline of "now" (0.0) keeps it busy.
    with trio.fail_after(5):
        while server.current.device.next_deadline() == 0.0:
            await trio.sleep(0.01)
    for _ in range(20):
        await trio.sleep(0)
        assert server.current.device.next_deadline() != 0.0
    # More room from the driver, and the frame goes out past the bad chain.
    fe.post_rx(count=4, size=2048)
    fe.rx.kick()
    with trio.fail_after(5):
        while not any(Ether(f).haslayer(ICMP) for _h, f in fe.read_rx()):
            await fe.rx.wait_call(0.1)


async def test_a_waiting_frame_is_not_tried_again_until_the_driver_posts_more(fe, server):
    """Found by scripts/fuzz_device.py (seed 202, step 9909: `mrgref ... extra:loop`,
    then traffic): a frame waiting behind RX buffers that cannot hold it was
    gathered again, and given back again, by every call to flush_rx: each TX
    drain, timer poll, host socket and (for a polled ring) every millisecond,
    walking a looping chain each time. It waits for the driver now: nothing is
    walked again until avail moves or the ring restarts."""
    await _reply_behind_a_looping_chain(fe, 1)    # smaller than the header: refused
    with trio.fail_after(5):
        while server.current is None or len(server.current.device.rx_pending) != 1:
            await trio.sleep(0.01)
    dev = server.current.device
    rings = server.current.backend.queues
    with trio.fail_after(5):
        while dev.rx_waits == 0:
            await trio.sleep(0.01)
    waits = dev.rx_waits
    # TX traffic (each drain calls flush_rx), kicks with nothing new and
    # direct calls: the frame is not gathered again.
    for seq in range(2, 6):
        fe.post_tx(ping(seq=seq))
        fe.tx.kick()
    await wait_counter(dev, "tx_frames", 5)
    for _ in range(50):
        assert dev.flush_rx(rings) is False
    fe.rx.kick()
    for _ in range(20):
        await trio.sleep(0)
    assert dev.rx_waits == waits
    assert dev.next_deadline() != 0.0
    assert len(dev.rx_pending) == 5
    # More room from the driver: the frames go out past the bad chains.
    fe.post_rx(count=8, size=2048)
    fe.rx.kick()
    seqs = []
    with trio.fail_after(5):
        while len(seqs) < 5:
            await fe.rx.wait_call(0.1)
            seqs += [Ether(f)[ICMP].seq for _h, f in fe.read_rx() if Ether(f).haslayer(ICMP)]
    assert seqs == [1, 2, 3, 4, 5]
    assert not dev.rx_pending


async def test_a_waiting_frame_is_tried_again_when_the_ring_restarts(fe, server):
    """The wait ends with the ring's epoch too: a ring restarted (SET_VRING_KICK)
    over the same avail index gets the waiting frame tried again at once."""
    await fe.handshake()
    r = fe.rx
    small = r.add([(r.buf(r.free[-1]), 1, F_WRITE)])
    r.kick()
    fe.post_tx(ping(seq=1))
    fe.tx.kick()
    with trio.fail_after(5):
        while server.current is None or server.current.device.rx_waits == 0:
            await trio.sleep(0.01)
    dev = server.current.device
    q = server.current.backend.queues[0]
    epoch = q.epoch
    # The driver rewrites the refused buffer in place (no avail move): only a
    # restart tells the device to look again.
    r.write_desc(small, r.buf(small), 2048, F_WRITE)
    assert dev.flush_rx(server.current.backend.queues) is False and len(dev.rx_pending) == 1
    base = await fe.get_vring_base(0)
    await fe.setup_ring(r, base=base)
    with trio.fail_after(5):
        while q.epoch == epoch:
            await trio.sleep(0.01)
    with trio.fail_after(5):
        while dev.rx_pending:
            await trio.sleep(0.01)
    got = []
    with trio.fail_after(5):
        while not got:
            await r.wait_call(0.1)
            got = [Ether(f)[ICMP].seq for _h, f in fe.read_rx() if Ether(f).haslayer(ICMP)]
    assert got == [1]
