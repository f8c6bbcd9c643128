"""Bulk transfers between two TcpLayers over the simulated link (virtual time,
fixed seeds): clean, and with 5 % loss, duplication, reordering and delay.
4 MiB each way at once, checked by sha256 in both directions."""
from __future__ import annotations

import random

import pytest

from stack.tcp.config import TcpConfig

from .tcp_sim import A_IP, B_IP, BulkApp, Sim, sha

SIZE = 4 << 20


def bulk(sim, size=SIZE, seed=0, max_time=3000.0):
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    rnd = random.Random(seed)
    da, db = rnd.randbytes(size), rnd.randbytes(size)
    apps = []
    B.listen(B_IP, 80, lambda c: apps.append(BulkApp(c, db, chunk=256 * 1024)))
    a = BulkApp(A.connect(0.0, A_IP, 40000, B_IP, 80), da, chunk=256 * 1024)
    done = sim.run(until=lambda: apps and a.eof and apps[0].eof, max_time=max_time)
    assert done, f"transfer stalled at t={sim.now}: {a.conn.info()} / " \
                 f"{apps[0].conn.info() if apps else None}"
    b = apps[0]
    sim.t_done = sim.now
    assert a.rx_len == size and b.rx_len == size
    assert sha(a.received) == sha(db), "B->A stream corrupted"
    assert sha(b.received) == sha(da), "A->B stream corrupted"
    # both sides close cleanly
    sim.run(until=lambda: not A.connections and not B.connections)
    assert a.conn.error is None and b.conn.error is None
    return a.conn, b.conn


@pytest.mark.parametrize("tso", [None, 65536])
def test_clean_link(tso):
    sim = Sim(seed=1, tso=tso)
    sim.set_links(delay=0.005)
    c, s = bulk(sim, seed=1)
    assert c.retransmits == 0 and s.retransmits == 0
    assert sim.layers[A_IP].counters["rx_ooo_segments"] == 0
    # window scaling lets the window open to the whole 256 KiB buffer
    assert c.max_snd_wnd == 256 * 1024 and s.max_snd_wnd == 256 * 1024
    if tso:
        # few, large segments: this is how a Python stack keeps up
        assert sim.delivered < 2 * 2 * SIZE / 30_000


LOSSY = dict(delay=0.01, jitter=0.002, loss=0.05, dup=0.01, reorder=0.02, reorder_delay=0.01)


@pytest.mark.parametrize("seed, tso, cfg", [
    (11, None, None),
    (12, 16384, None),
    (13, 65536, None),
    (14, 8192, TcpConfig(sack=False)),
    (15, 8192, TcpConfig(timestamps=False)),
    (16, 8192, TcpConfig(timestamps=False, sack=False, window_scaling=False)),
])
def test_lossy_link(seed, tso, cfg):
    sim = Sim(seed=seed, tso=tso, config=cfg)
    sim.set_links(**LOSSY)
    c, s = bulk(sim, seed=seed)
    stats = sim.link(A_IP, B_IP).stats
    assert stats["lost"] > 0 and stats["dup"] > 0 and stats["reordered"] > 0
    assert c.retransmits > 0 and s.retransmits > 0


def test_bottleneck_with_queue_drops():
    """Congestion control against a 10 MB/s bottleneck with a 64 KiB drop-tail queue."""
    sim = Sim(seed=21, tso=16384)
    sim.set_links(delay=0.01, rate=10e6, queue_bytes=64 * 1024)
    c, s = bulk(sim, seed=21, size=2 << 20)
    drops = sim.link(A_IP, B_IP).stats["queue_drops"]
    assert drops > 0                                     # slow start overshoots the queue...
    assert sim.layers[A_IP].counters["fast_retransmits"] > 0   # ...and recovers without RTOs
    # goodput close to the bottleneck (each way shares nothing: one queue per direction)
    assert sim.t_done < 1.5          # 2 MiB at 10 MB/s is 0.21 s of pure transfer time


def test_asymmetric_small_buffers_and_slow_reader():
    cfg = TcpConfig(sndbuf=8192, rcvbuf=4096 + 2048)
    sim = Sim(seed=31, configs={B_IP: cfg})
    sim.set_links(**LOSSY)
    bulk(sim, seed=31, size=256 * 1024)


@pytest.mark.parametrize("tso", [None, 16384])
def test_every_segment_fits_the_mtu_even_with_sack_blocks(tso):
    """Options (timestamps + up to 3 SACK blocks) come out of the payload, so each
    wire segment (or each GSO piece) stays within 1500-byte IP packets."""
    sim = Sim(seed=41, tso=tso, trace=True)
    sim.set_links(**LOSSY)
    bulk(sim, seed=41, size=1 << 20)
    sizes = 0
    saw_sack_with_data = False
    for _, _, _, r, gso in sim.trace.records:
        hdr = r.header_len()
        if r.sack_blocks and r.payload:
            saw_sack_with_data = True
        if gso:
            assert len(r.payload) > gso and 20 + hdr + gso <= 1500
            assert tso and len(r.payload) <= tso
        else:
            assert 20 + hdr + len(r.payload) <= 1500
        sizes += 1
    assert sizes > 100 and saw_sack_with_data


def test_tso_does_not_leave_a_runt_after_every_frame():
    """64 KiB application writes with TSO: the sub-MSS remainder of each write
    waits for the ACK and joins the next write, instead of going out as its
    own tiny frame (which costs the guest an interrupt for 0.6 % of the bytes)."""
    sim = Sim(seed=3, tso=65536, trace=True)
    sim.set_links(delay=0.002)
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    data = random.Random(3).randbytes(8 << 20)
    apps = []
    B.listen(B_IP, 80, lambda c: apps.append(BulkApp(c, b"", close_when_done=False)))
    a = BulkApp(A.connect(0.0, A_IP, 40000, B_IP, 80), data, chunk=65536)
    assert sim.run(until=lambda: apps and apps[0].rx_len == len(data), max_time=600)
    assert sha(apps[0].received) == sha(data)
    sizes = [len(r.payload) for r in sim.trace.segs(A_IP) if r.payload]
    mss = a.conn.mss
    big = sum(1 for n in sizes if n > mss)
    runts = sum(1 for n in sizes if n < mss)
    assert big > 50
    assert runts <= big // 10, f"{runts} sub-MSS segments for {big} TSO frames"
