"""RX buffers a driver gets wrong while frames wait for them (issue 7, cases 1, 2 and 11).

A frame that does not fit the posted buffers waits (it is not retried in a
loop); what was written before it is published; a ring that breaks stops
work on it; and chains taken for a frame that then did not fit are given
back exactly once, in order, refused ones included.
"""
import struct

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
