#!/usr/bin/env python3
"""bench_mq.py: what serving more queue pairs costs one Python process (serve --queues N).

    python3 scripts/bench_mq.py                   # pairs 1,2,4,8; 3 s per case
    python3 scripts/bench_mq.py --pairs 1,2 --seconds 5

The real server over a Unix socket and the in-process frontend (kicks and
calls through eventfds), in one process on one core, as bench_device.py
does; every pair count side by side in the same run:

  idle     CPU of the process with every ring started and RX buffers posted,
           no traffic (the safety polls and timers of every ring), in % of one core
  pair0    UDP echo round trips/s (64-byte datagrams to 10.0.2.2:7, a window
           in flight) all on pair 0: what a 1-vCPU guest, or QEMU queues=1,
           costs a backend serving N pairs (MQ offered but one pair used)
  spread   the same window split over every pair, one flow per pair: RX goes
           back on each flow's pair (vhostnet/net/steering.py)
  RSS      the process's resident memory with the connection up

"us/rt" is the process's CPU time per round trip (frontend and backend
together), which a busy host disturbs much less than the rate; "x1" is that
cost against one pair in the same run (above 1: dearer). The rings are all in one
trio thread: more pairs add rings to poll and no CPU, so the rate cannot
grow with N; the question is how little it falls, which sets
`serve --queues`' default (docs/multiqueue.md). Prints a table; not a test.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402
from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from vhostnet.launch.serve import make_server  # noqa: E402
from vhostnet.testing.frontend import Frontend  # noqa: E402

ECHO_PORT = 7   # RFC 862


def udp_frame(sport: int) -> bytes:
    return bytes(Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") / IP(src="10.0.2.15", dst="10.0.2.2")
                 / UDP(sport=sport, dport=ECHO_PORT) / (b"u" * 22))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.asynccontextmanager
async def connected(pairs: int, queue_size: int):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vhost.sock")
        srv = make_server(path, queue_pairs=pairs)
        srv.listen()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(srv.serve)
            await srv.ready.wait()
            fe = Frontend(pairs=pairs, queue_size=queue_size)
            await fe.connect(path)
            await fe.handshake()
            for k, (rx, _tx) in enumerate(fe.pair_rings):
                fe.post_rx(pair=k)
                rx.kick()
            yield srv, fe
            await fe.shutdown(srv)
            nursery.cancel_scope.cancel()


async def echo_rate(fe, use: list[int], seconds: float, window: int) -> tuple[float, float]:
    """(round trips/s, CPU µs per round trip) with WINDOW datagrams in flight, split over the pairs in USE."""
    frames = {k: udp_frame(20000 + k) for k in use}
    per = max(1, window // len(use))
    in_flight = dict.fromkeys(use, 0)
    done = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        for k in use:
            tx = fe.pair_rings[k][1]
            while in_flight[k] < per and tx.free:
                fe.post_tx(frames[k], pair=k)
                in_flight[k] += 1
            tx.kick()
        await fe.pair_rings[use[-1]][0].wait_call(0.2)
        for k in use:
            rx, tx = fe.pair_rings[k]
            got = len(fe.read_rx(pair=k))
            done += got
            in_flight[k] -= got
            tx.take_used()
            fe.post_rx(pair=k)
            rx.kick()
        await trio.sleep(0)
    cpu = time.process_time() - c0
    return done / (time.perf_counter() - t0), 1e6 * cpu / max(done, 1)


async def measure(pairs: int, seconds: float, window: int, queue_size: int) -> dict:
    async with connected(pairs, queue_size) as (_srv, fe):
        await trio.sleep(0.3)    # settle: the safety polls park after their quiet time
        c0, t0 = time.process_time(), time.perf_counter()
        await trio.sleep(min(seconds, 2.0))
        idle = 100.0 * (time.process_time() - c0) / (time.perf_counter() - t0)
        pair0, pair0_us = await echo_rate(fe, [0], seconds, window)
        spread, spread_us = await echo_rate(fe, list(range(pairs)), seconds, window)
        return {"pairs": pairs, "idle": idle, "pair0": pair0, "spread": spread, "rss": rss_mib(),
                "pair0_us": pair0_us, "spread_us": spread_us}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="1,2,4,8", help="queue pair counts (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per rate (default %(default)s)")
    ap.add_argument("--window", type=int, default=32, help="datagrams in flight (default %(default)s)")
    ap.add_argument("--queue-size", type=int, default=256, help="ring size (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds over every pair count (round-robin, so load hits each alike); "
                         "each cell is the median (default %(default)s)")
    args = ap.parse_args()
    counts = [int(p) for p in args.pairs.split(",")]
    runs: dict[int, list[dict]] = {p: [] for p in counts}
    for _ in range(args.repeat):
        for p in counts:
            runs[p].append(trio.run(measure, p, args.seconds, args.window, args.queue_size))
    rows = [{k: statistics.median(r[k] for r in runs[p]) for k in runs[p][0]} for p in counts]
    base = rows[0]
    print(f"# bench_mq: {time.strftime('%Y-%m-%d %H:%M')}, one process (server + in-process frontend), "
          f"UDP echo, {args.window} in flight, ring {args.queue_size}, {args.seconds:g} s per rate, "
          f"median of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'pairs':>5} {'idle CPU':>9} {'pair0 rt/s':>11} {'us/rt':>6} {'x1':>5} "
          f"{'spread rt/s':>12} {'us/rt':>6} {'x1':>5} {'RSS MiB':>8}")
    for r in rows:
        print(f"{int(r['pairs']):>5} {r['idle']:>8.1f}% {r['pair0']:>11,.0f} {r['pair0_us']:>6.0f} "
              f"{r['pair0_us'] / base['pair0_us']:>5.2f} {r['spread']:>12,.0f} {r['spread_us']:>6.0f} "
              f"{r['spread_us'] / base['spread_us']:>5.2f} {r['rss']:>8.1f}")
    print(f"(max RSS of the run {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB; "
          f"guest memory is a memfd of 32 MiB per pair, mapped by both sides)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
