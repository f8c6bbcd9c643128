"""One frame across many mergeable RX buffers, each a chain of several descriptors.

The device copies a frame into the guest's RX buffers with one scatter/gather
copy over every chain's views (vhostnet/net/header.py `scatter`, which is
stack.native.copy: C through cffi, or its Python twin). A 30 KB TSO frame the
guest sends to itself comes back through buffers of two odd-sized
descriptors each; the driver side reassembles it from the used ring alone.
Both copy implementations run: the C one and the fallback.
"""
import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from stack.checksum import pseudo_sum
from stack.native import fallback
import stack.native as native
from vhostnet.net import header
from vhostnet.testing.frontend import F_WRITE, NET_HDR

GUEST_MAC = "52:54:00:12:34:56"
PIECES = (700, 333)          # bytes of the two descriptors of each RX chain
GAP = 0x800                  # the second descriptor starts this far into the slot


def tso_frame(payload_len: int) -> bytes:
    p = Ether(src=GUEST_MAC, dst=GUEST_MAC) / IP(src="10.0.2.15", dst="10.0.2.15", id=7) / \
        TCP(sport=40000, dport=5001, seq=1000, ack=1, flags="PA", window=500) / \
        bytes((i * 31) & 0xFF for i in range(payload_len))
    raw = bytearray(bytes(p))
    g = bytes([10, 0, 2, 15])
    struct.pack_into("!H", raw, 50, pseudo_sum(g, g, 6, len(raw) - 34))
    return bytes(raw)


@pytest.mark.parametrize("impl", ["native", "fallback"])
async def test_tso_frame_spans_multi_descriptor_rx_chains(fe, monkeypatch, impl):
    _impl(monkeypatch, impl)
    await fe.handshake()
    r = fe.rx
    layout = {}
    for _ in range(100):
        base = r.buf(r.free[-1])
        descs = [(base, PIECES[0], F_WRITE), (base + GAP, PIECES[1], F_WRITE)]
        layout[r.add(descs)] = descs
    fe.rx.kick()
    frame = tso_frame(30000)
    fe.post_tx(frame, hdr=fe.net_hdr(flags=1, gso_type=1, hdr_len=54, gso_size=1448,
                                     csum_start=34, csum_offset=16))
    fe.tx.kick()
    assert await fe.rx.wait_call()
    used = r.take_used()
    room = sum(PIECES)
    need = 12 + len(frame)
    nchains = -(-need // room)
    assert len(used) == nchains
    # every chain but the last is filled to the brim; the last holds the rest
    assert [n for _h, n in used] == [room] * (nchains - 1) + [need - room * (nchains - 1)]
    stream = b""
    for head, n in used:
        for addr, length, _f in layout[head]:
            k = min(length, n)
            stream += bytes(fe.mem[addr:addr + k])
            n -= k
    hdr, body = stream[:12], stream[12:]
    flags, gso_type, _hl, gso_size, cs, co, nbuf = NET_HDR.unpack(hdr)
    assert (flags, gso_type, gso_size, cs, co, nbuf) == (1, 1, 1448, 34, 16, nchains)
    assert body == frame
    # nothing was written into the gap between a chain's two descriptors
    base = layout[used[0][0]][0][0]
    assert bytes(fe.mem[base + PIECES[0]:base + GAP]) == bytes(GAP - PIECES[0])
    assert Ether(body)[TCP].seq == 1000 and Ether(body)[IP].id == 7


def _impl(monkeypatch, impl):
    """The copy implementation under test, for both of the device's copies."""
    if impl == "native" and not native.NATIVE:
        if native.REASON.startswith(native.ENV_SWITCH):
            pytest.skip("VHOSTNET_NATIVE=0: the fallback was asked for")
        pytest.fail("the cffi extension is not built (pip install -e . builds it)")
    if impl == "fallback":
        from vhostnet.net import device
        from vhostnet.virtio import split
        monkeypatch.setattr(header, "copy", fallback.copy)
        monkeypatch.setattr(device, "scatter_region", fallback.scatter_region)
        monkeypatch.setattr(split, "split_take_writable", fallback.split_take_writable)
        monkeypatch.setattr(split, "SplitPins", fallback.SplitPins)


def _spy_runs(monkeypatch) -> list:
    """Record how many buffers each put_frame ("put") and batched take ("take") found."""
    from vhostnet.virtio.split import SplitRing
    runs = []
    take, put = SplitRing.take_writable, SplitRing.put_frame

    def spy_take(self, need, min_len, budget):
        got = take(self, need, min_len, budget)
        runs.append(("take", len(got[1])))
        return got

    def spy_put(self, *a):
        n = put(self, *a)
        runs.append(("put", n))
        return n
    monkeypatch.setattr(SplitRing, "take_writable", spy_take)
    monkeypatch.setattr(SplitRing, "put_frame", spy_put)
    return runs


async def _warm(fe) -> None:
    """One small frame through the RX ring first: its walk caches the guest
    region that take_writable's buffers must be in."""
    from .test_datapath import ping
    fe.post_rx(count=1)
    fe.rx.kick()
    fe.post_tx(ping(seq=1))
    fe.tx.kick()
    assert await fe.rx.wait_call()
    assert len(fe.rx.take_used()) == 1
    fe.tx.take_used()


async def _send_tso(fe, payload_len: int = 30000) -> bytes:
    """One TSO frame from the guest to itself (the loopback into RX); returns it."""
    frame = tso_frame(payload_len)
    fe.post_tx(frame, hdr=fe.net_hdr(flags=1, gso_type=1, hdr_len=54, gso_size=1448,
                                     csum_start=34, csum_offset=16))
    fe.tx.kick()
    assert await fe.rx.wait_call()
    return frame


def _read_frame(fe, used):
    """The header and frame of one MRG_RXBUF frame from its used elements (Linux's page_to_skb)."""
    stream = b"".join(bytes(fe.mem[fe.rx.buf(h):fe.rx.buf(h) + n]) for h, n in used)
    return NET_HDR.unpack(stream[:12]), stream[12:]


@pytest.mark.parametrize("impl", ["native", "fallback"])
async def test_tso_frame_into_plain_4k_buffers_in_one_run(fe, monkeypatch, impl):
    """Linux's layout: one-descriptor 4 KiB buffers. The ring's put_frame
    takes, fills and returns them all in one call."""
    _impl(monkeypatch, impl)
    runs = _spy_runs(monkeypatch)
    await fe.handshake()
    await _warm(fe)
    fe.post_rx(count=20)
    fe.rx.kick()
    frame = await _send_tso(fe)
    used = fe.rx.take_used()
    need = 12 + len(frame)
    k = -(-need // 4096)
    assert [n for _h, n in used] == [4096] * (k - 1) + [need - 4096 * (k - 1)]
    (flags, gso_type, _hl, gso_size, cs, co, nbuf), body = _read_frame(fe, used)
    assert (flags, gso_type, gso_size, cs, co, nbuf) == (1, 1, 1448, 34, 16, k)
    assert body == frame
    assert [r for r in runs if r[1]] == [("put", k)]      # all of them in one call


@pytest.mark.parametrize("impl", ["native", "fallback"])
async def test_a_readonly_buffer_in_the_run_is_refused_and_the_frame_still_fits(fe, server, monkeypatch, impl):
    """The batched take stops at the read-only buffer; pop() refuses it (length
    0, ahead of the frame's buffers in the used ring) and takes the rest."""
    _impl(monkeypatch, impl)
    runs = _spy_runs(monkeypatch)
    await fe.handshake()
    r = fe.rx
    await _warm(fe)
    fe.post_rx(count=3)
    ro = r.free[-1]
    r.add([(r.buf(ro), 4096, 0)])          # device-readable: useless for RX
    fe.post_rx(count=10)
    fe.rx.kick()
    frame = await _send_tso(fe)
    used = fe.rx.take_used()
    assert used[0] == (ro, 0)
    (_f, _g, _hl, _gs, _cs, _co, nbuf), body = _read_frame(fe, used[1:])
    assert nbuf == len(used) - 1 == -(-(12 + len(frame)) // 4096) and body == frame
    assert server.current.device.counters["rx_readonly_buffer"] == 1
    # the run stopped at the read-only buffer: not enough for put_frame, so
    # the batched take took the 3, pop() the rest
    assert [r for r in runs if r[1]] == [("take", 3)] and ("put", 0) in runs
