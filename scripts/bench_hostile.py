#!/usr/bin/env python3
"""The longest event-loop step under hostile input (issue 7), measured two ways.

For each scenario a fresh `vhostnet serve` runs as a subprocess and the
in-process frontend plays a hostile driver or front-end. Meanwhile a probe
sends GET_FEATURES every PROBE_EVERY seconds and records the longest round
trip: from outside, how long the backend's event loop was deaf (capped at
PROBE_TIMEOUT: "hung"). Afterwards the backend's own `loop` counters
(inspect, docs/json.md) give the longest step it timed and how many took
over 10 ms; a tree without them prints "-".

The peer is a normal ping flood in the same run: what a well-behaved driver
costs per step. Run it against another tree to compare before and after:

    PYTHONPATH=/path/to/other/tree python3 scripts/bench_hostile.py

Prints a table; not a test.
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import tempfile
import threading
import time

import trio
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vhostnet.testing.dpdk import VhostnetServe
from vhostnet.testing.frontend import F_INDIRECT, F_NEXT, F_WRITE, Frontend
from vhostnet.vhostuser.protocol import Req

PROBE_EVERY = 0.01
PROBE_TIMEOUT = 5.0
PING = bytes(Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") / IP(src="10.0.2.15", dst="10.0.2.2")
             / ICMP(type=8, id=0x1234, seq=1) / (b"x" * 56))


# -- scenarios: each sets up, then returns an async "keep it up" coroutine ----------

async def normal_pings(fe, duration):
    fe.post_rx()
    fe.rx.kick()
    end = trio.current_time() + duration
    while trio.current_time() < end:
        await fe.exchange([PING] * 8, want=8, timeout=1)


async def tx_long_chains(fe, duration):
    """Case 12: 512 chains, each as long as the queue (4096 descriptors)."""
    r = fe.tx
    for i in range(r.size):
        r.write_desc(i, r.buf(0) + i, 1, F_NEXT if i + 1 < r.size else 0, i + 1)
    end = trio.current_time() + duration
    while trio.current_time() < end:
        for _ in range(512):
            struct.pack_into("<H", fe.mem, r.avail + 4 + 2 * (r.avail_idx % r.size), 0)
            r.avail_idx = (r.avail_idx + 1) & 0xFFFF
        r.set_avail_idx(r.avail_idx)
        r.kick()
        await trio.sleep(duration / 3)


async def refused_feed(fe, duration):
    """Case 5: the TX ring kept half full of refused chains (loops) while the device takes them."""
    r = fe.tx
    r.write_desc(0, r.buf(0), 4, F_NEXT, 0)
    stop = threading.Event()

    def feed():
        n, c, a = r.size, r.avail_idx, r.avail_idx
        while not stop.is_set():
            while c != a and struct.unpack_from("<I", fe.mem, r.used + 4 + 8 * (c % n))[0] != 0xFFFFFFFF:
                c += 1
            while a - c < n // 2:
                struct.pack_into("<I", fe.mem, r.used + 4 + 8 * (a % n), 0xFFFFFFFF)
                struct.pack_into("<H", fe.mem, r.avail + 4 + 2 * (a % n), 0)
                a += 1
                struct.pack_into("<H", fe.mem, r.avail + 2, a & 0xFFFF)
            time.sleep(0)   # let the probe (same process) have the GIL
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, feed)
        try:
            end = trio.current_time() + duration
            while trio.current_time() < end:
                r.kick()                 # the device asked for a kick at the next chain (EVENT_IDX)
                await trio.sleep(0.01)
        finally:
            stop.set()


async def rx_mrg_too_small(fe, duration):
    """Case 1: MRG_RXBUF, one 64-byte RX buffer for a 110-byte frame."""
    fe.post_rx(count=1, size=64)
    fe.rx.kick()
    fe.post_tx(PING)
    fe.tx.kick()
    await trio.sleep(duration)


async def rx_avail_jump(fe, duration):
    """Case 2: RX avail->idx jumps past the queue size while a frame waits."""
    fe.post_tx(PING)
    fe.tx.kick()
    await trio.sleep(0.2)
    fe.rx.set_avail_idx(fe.rx.avail_idx + 1000)
    fe.rx.kick()
    await trio.sleep(duration)


async def desc_huge_indirect(fe, duration, backend=None):
    """Case 6: inspect --desc on an indirect table of 1 MiB, every entry chained to the next."""
    table, entries = 0x1000000, 1 << 16
    for i in range(entries):
        struct.pack_into("<QIHH", fe.mem, table + 16 * i, 0x30000, 64, F_NEXT, (i + 1) & 0xFFFF)
    fe.tx.write_desc(200, table, 16 * entries, F_INDIRECT)
    end = trio.current_time() + duration
    while trio.current_time() < end:
        t0 = time.perf_counter()
        try:
            doc = await trio.to_thread.run_sync(backend.request, {"cmd": "desc", "queue": 1, "head": 200}, 30)
            backend.desc_result = (len(doc["descriptors"]), time.perf_counter() - t0)
        except Exception as e:   # noqa: BLE001 - a bench records what happened
            backend.desc_result = (f"error {e}", time.perf_counter() - t0)
        await trio.sleep(0.1)


SCENARIOS = {
    "normal pings (peer)": (normal_pings, {}),
    "tx: 512 queue-long chains (case 12)": (tx_long_chains, {"queue_size": 4096, "mem_size": 288 << 20}),
    "tx: refused chains fed (case 5)": (refused_feed, {}),
    "rx: MRG buffer too small (case 1)": (rx_mrg_too_small, {}),
    "rx: avail jump, frame waiting (case 2)": (rx_avail_jump, {}),
    "inspect --desc, 1 MiB table (case 6)": (desc_huge_indirect, {}),
}


SETUP = 0.3   # the scenario plants its rings first (in this process: the probe would wait on that)


async def probe(fe, duration) -> float:
    worst = 0.0
    await trio.sleep(SETUP)
    end = trio.current_time() + duration - SETUP
    while trio.current_time() < end:
        t0 = time.perf_counter()
        with trio.move_on_after(PROBE_TIMEOUT) as scope:
            await fe.get_u64(Req.GET_FEATURES)
        worst = max(worst, time.perf_counter() - t0)
        if scope.cancelled_caught:
            return PROBE_TIMEOUT
        await trio.sleep(PROBE_EVERY)
    return worst


async def run_one(name, duration):
    fn, kw = SCENARIOS[name]
    d = tempfile.mkdtemp(prefix="vn-bench-", dir="/tmp")
    try:
        with VhostnetServe(d, log_level="warning") as backend:
            fe = Frontend(**kw)
            await fe.connect(backend.socket)
            await fe.handshake()
            backend.desc_result = None
            result = {}
            async with trio.open_nursery() as n:
                extra = {"backend": backend} if fn is desc_huge_indirect else {}
                n.start_soon(lambda: fn(fe, duration, **extra))

                async def measure():
                    result["probe"] = await probe(fe, duration)
                n.start_soon(measure)
            loop = None
            if result["probe"] < PROBE_TIMEOUT:
                try:
                    loop = (await trio.to_thread.run_sync(backend.inspect)).get("loop")
                except Exception:   # noqa: BLE001
                    loop = None
            alive = backend.proc.poll() is None
            fe.sock.close()
            return result["probe"], loop, alive, backend.desc_result
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def main(args):
    import vhostnet
    print(f"vhostnet from {os.path.dirname(os.path.dirname(vhostnet.__file__))}, "
          f"{args.duration:.1f} s per scenario\n")
    print(f"{'scenario':42} {'deaf max ms':>12} {'step max ms':>12} {'cpu max ms':>10} {'kind':>8} "
          f"{'slow >10ms':>10} {'steps':>8}  notes")
    for name in SCENARIOS:
        if args.only and args.only not in name:
            continue
        deaf, loop, alive, desc = await run_one(name, args.duration)
        deaf_s = "hung" if deaf >= PROBE_TIMEOUT else f"{deaf * 1e3:.1f}"
        notes = [] if alive else ["backend DIED"]
        if desc:
            notes.append(f"desc: {desc[0]} descriptors in {desc[1] * 1e3:.0f} ms")
        if loop:
            print(f"{name:42} {deaf_s:>12} {loop['max_step_ms']:>12.2f} {loop.get('max_step_cpu_ms', 0):>10.2f} "
                  f"{loop['max_step_kind'] or '-':>8} "
                  f"{loop['slow_steps']:>10} {loop['steps']:>8}  {', '.join(notes)}")
        else:
            print(f"{name:42} {deaf_s:>12} {'-':>12} {'-':>10} {'-':>8} {'-':>10} {'-':>8}  {', '.join(notes)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3.0, help="seconds per scenario (default %(default)s)")
    p.add_argument("--only", help="run the scenarios whose name contains this")
    trio.run(main, p.parse_args())
