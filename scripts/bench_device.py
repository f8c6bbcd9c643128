#!/usr/bin/env python3
"""ICMP echo round trips per second through the backend, with the in-process frontend.

    python3 scripts/bench_device.py                    # split and packed, 64 B and 1472 B
    python3 scripts/bench_device.py --repeat 5 --seconds 2 --rings split,packed

Two ways, both on one core (frontend and backend share the process):
- server: the real trio server over a Unix socket, kicks and calls through
  eventfds; the frontend keeps a window of pings in flight.
- direct: the same NetDevice and rings, but the kick is a direct call, which
  shows the data path's own cost without the event loop.

Each row is run on split rings (virtio 1.2 §2.7) and on packed rings
(§2.8, RING_PACKED negotiated; the frontend drives them through
vhostnet/testing/packed_driver.py), interleaved split, packed, split, ...
so a burst of load from other processes hits both columns alike; each cell
is the median of --repeat runs, and "packed/split" is the ratio of the
medians. Wall-clock rates: on a shared machine compare the ratio, not the
absolute numbers (scripts/profile_device.py gives CPU time per round trip).

Prints a table; not a test.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time


import trio
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vhostnet.testing.frontend import Frontend
from vhostnet.launch.serve import make_server
from vhostnet.virtio import features as F


def ping_frame(size: int, seq: int = 1) -> bytes:
    return bytes(Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") /
                 IP(src="10.0.2.15", dst="10.0.2.2") / ICMP(type=8, id=1, seq=seq) / (b"p" * size))


@contextlib.asynccontextmanager
async def connected(disable: int = 0, packed: bool = False):
    """A real server on a temporary socket and a frontend that has done QEMU's handshake.
    DISABLE: feature bits the device does not offer; PACKED: packed rings."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vhost.sock")
        srv = make_server(path, features=F.DEFAULT_FEATURES & ~disable)
        srv.listen()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(srv.serve)
            await srv.ready.wait()
            fe = Frontend(packed=packed)
            await fe.connect(path)
            await fe.handshake()
            yield srv, fe
            await fe.shutdown(srv)
            nursery.cancel_scope.cancel()


async def run_server(size: int, seconds: float, window: int, packed: bool = False) -> float:
    async with connected(packed=packed) as (_srv, fe):
        fe.post_rx()
        fe.rx.kick()
        t0 = time.perf_counter()
        done = await fe.flood(ping_frame(size), t0 + seconds, window)
        elapsed = time.perf_counter() - t0
    return done / elapsed


async def run_direct(size: int, seconds: float, window: int, packed: bool = False) -> float:
    async with connected(packed=packed) as (srv, fe):
        conn = srv.current
        dev = conn.device
        rings = conn.backend.queues
        # Take the rings away from the server's kick tasks: we call the device ourselves.
        for q in rings:
            conn._queue_stop(q)
        fe.post_rx()
        frame = ping_frame(size)
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(window):
                if not fe.tx.free:
                    break
                fe.post_tx(frame)
            dev.process(rings, 1, 0.0)
            done += len(fe.read_rx())
            fe.tx.take_used()
            fe.post_rx()
            dev.process(rings, 0, 0.0)
        elapsed = time.perf_counter() - t0
    return done / elapsed


RINGS = ("split", "packed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--seconds", type=float, default=3.0, help="per run (default %(default)s)")
    ap.add_argument("--window", type=int, default=64, help="pings in flight (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell, interleaved; the median is shown")
    ap.add_argument("--rings", default="split,packed", help="split, packed or split,packed (default)")
    ap.add_argument("--sizes", default="64,1472", help="ICMP payload sizes (default %(default)s)")
    ap.add_argument("--paths", default="server,direct", help="server, direct or both (default)")
    args = ap.parse_args()
    rings = args.rings.split(",")
    paths = {"server": ("server (trio + eventfds)", run_server),
             "direct": ("direct (no event loop)", run_direct)}
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
        chosen = [paths[p] for p in args.paths.split(",")]
        if not rings or any(r not in RINGS for r in rings) or args.repeat < 1:
            raise ValueError(args.rings)
    except (ValueError, KeyError) as e:
        ap.error(f"bad --rings/--sizes/--paths/--repeat: {e}")
    runs: dict[tuple, list[float]] = {}
    for _ in range(args.repeat):
        for size in sizes:
            for name, fn in chosen:
                for ring in rings:
                    rate = trio.run(fn, size, args.seconds, args.window, ring == "packed")
                    runs.setdefault((name, size, ring), []).append(rate)
    print(f"# bench_device: {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}, "
          f"{args.seconds:g} s per run, median of {args.repeat}, window {args.window}")
    head = f"{'path':28} {'payload':>8}" + "".join(f" {r + ' rt/s':>13}" for r in rings)
    if len(rings) == 2:
        head += f" {'packed/split':>13}"
    head += f" {rings[0] + ' Mbit/s each way':>23}"
    print(head)
    print("-" * len(head))
    for size in sizes:
        for name, _fn in chosen:
            med = [statistics.median(runs[(name, size, r)]) for r in rings]
            line = f"{name:28} {size:>7}B" + "".join(f" {m:>13,.0f}" for m in med)
            if len(rings) == 2:
                line += f" {med[1] / max(med[0], 1e-9):>13.2f}"
            line += f" {med[0] * (size + 42) * 8 / 1e6:>23,.1f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
