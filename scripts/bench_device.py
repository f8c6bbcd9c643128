#!/usr/bin/env python3
"""ICMP echo round trips per second through the backend, with the in-process frontend.

Two ways, both on one core (frontend and backend share the process):
- server: the real trio server over a Unix socket, kicks and calls through
  eventfds; the frontend keeps a window of pings in flight.
- direct: the same NetDevice and rings, but the kick is a direct call, which
  shows the data path's own cost without the event loop.

Prints a table; not a test.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time


import trio
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from vhostnet.testing.frontend import Frontend
from vhostnet.launch.serve import make_server
from vhostnet.virtio import features as F


def ping_frame(size: int, seq: int = 1) -> bytes:
    return bytes(Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") /
                 IP(src="10.0.2.15", dst="10.0.2.2") / ICMP(type=8, id=1, seq=seq) / (b"p" * size))


@contextlib.asynccontextmanager
async def connected(disable: int = 0):
    """A real server on a temporary socket and a frontend that has done QEMU's handshake.
    DISABLE: feature bits the device does not offer."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vhost.sock")
        srv = make_server(path, features=F.DEFAULT_FEATURES & ~disable)
        srv.listen()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(srv.serve)
            await srv.ready.wait()
            fe = Frontend()
            await fe.connect(path)
            await fe.handshake()
            yield srv, fe
            await fe.shutdown(srv)
            nursery.cancel_scope.cancel()


async def run_server(size: int, seconds: float, window: int) -> float:
    async with connected() as (_srv, fe):
        fe.post_rx()
        fe.rx.kick()
        frame = ping_frame(size)
        done = in_flight = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            while in_flight < window and fe.tx.free:
                fe.post_tx(frame)
                in_flight += 1
            fe.tx.kick()
            await fe.rx.wait_call(1.0)
            got = fe.read_rx()
            done += len(got)
            in_flight -= len(got)
            fe.tx.take_used()
            fe.post_rx()
            fe.rx.kick()
        elapsed = time.perf_counter() - t0
    return done / elapsed


async def run_direct(size: int, seconds: float, window: int) -> float:
    async with connected() as (srv, fe):
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=64, help="pings in flight (default %(default)s)")
    args = ap.parse_args()
    rows = []
    for size in (64, 1472):
        for name, fn in (("server (trio + eventfds)", run_server), ("direct (no event loop)", run_direct)):
            rate = trio.run(fn, size, args.seconds, args.window)
            rows.append((name, size, rate))
    print(f"{'path':28} {'payload':>8} {'round trips/s':>14} {'Mbit/s each way':>16}")
    for name, size, rate in rows:
        mbit = rate * (size + 42) * 8 / 1e6
        print(f"{name:28} {size:>7}B {rate:>14,.0f} {mbit:>16,.1f}")


if __name__ == "__main__":
    main()
