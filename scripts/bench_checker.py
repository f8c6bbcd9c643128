#!/usr/bin/env python3
"""What the driver-conformance checker and the safety poll cost (issue #10).

1. The checker, per chain, in ns: the device side of a split ring
   (pop + push, one publish per batch) with the checks on and off
   (`SplitRing.checks`: held heads, INDIRECT without the feature, avail
   flags), for 1- and 2-descriptor chains; and the whole TX path
   (NetDevice.drain_tx: ring, virtio-net header checks, the stack) on ping
   frames, on and off. Driven directly in the trio thread on a real
   server's rings, so the event loop is not in the numbers.
2. The safety poll, in CPU % of one core (process time / wall time; the
   in-process frontend is idle or nearly so): idle (the guest stopped
   sending), a paced load (pings at a fixed rate) and a flood (round trips
   per second), with the poll on and off.

Prints tables; not a test. Run: PYTHONPATH=. python3 scripts/bench_checker.py
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

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vhostnet.launch.serve import make_server
from vhostnet.testing.frontend import Frontend

TX = 1
BATCH = 64


def ping_frame(size: int = 56, seq: int = 1) -> bytes:
    return bytes(Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") /
                 IP(src="10.0.2.15", dst="10.0.2.2") / ICMP(type=8, id=1, seq=seq) / (b"p" * size))


@contextlib.asynccontextmanager
async def connected(**server_kw):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vhost.sock")
        srv = make_server(path, **server_kw)
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


# -- 1. the checker per chain ---------------------------------------------------------------

def ring_ns_per_chain(fe, q, descs: int, checks: bool, chains: int) -> float:
    """Device-side ns per chain: pop + push per chain, publish per BATCH."""
    r = fe.tx
    q.checks = checks
    hdr = fe.net_hdr()
    spent = 0.0
    done = 0
    while done < chains:
        for _ in range(BATCH):
            slot = r.free[-1]
            a = r.buf(slot)
            r.add([(a, len(hdr), 0), (a + 0x80, 98, 0)] if descs == 2 else [(a, len(hdr) + 98, 0)])
        t0 = time.perf_counter_ns()
        for _ in range(BATCH):
            c = q.pop()
            q.push(c.head, 0)
        q.publish()
        spent += time.perf_counter_ns() - t0
        r.take_used()
        done += BATCH
    q.checks = True
    return spent / done


def tx_ns_per_chain(fe, srv, checks: bool, chains: int) -> float:
    """ns per chain of NetDevice.drain_tx on ping frames (the stack's work included)."""
    dev = srv.current.device
    rings = srv.current.backend.queues
    q = rings[TX]
    q.checks = checks
    frame = ping_frame()
    spent = 0.0
    done = 0
    while done < chains:
        for _ in range(BATCH):
            fe.post_tx(frame)
        t0 = time.perf_counter_ns()
        dev.drain_tx(rings, trio.current_time())
        spent += time.perf_counter_ns() - t0
        fe.tx.take_used()
        fe.read_rx()
        fe.post_rx()
        done += BATCH
    q.checks = True
    return spent / done


async def bench_checker(chains: int, rounds: int) -> None:
    # No safety poll here: the driver side never kicks, and nothing must run beside us.
    async with connected(safety_poll=False) as (srv, fe):
        fe.post_rx()
        q = srv.current.backend.queues[TX]
        print(f"checker cost per chain ({chains} chains x {rounds} rounds, best round; ns)")
        print(f"{'path':34} {'checks off':>11} {'checks on':>10} {'delta':>8} {'ratio':>6}")
        rows = [("ring pop+push, 1 descriptor", lambda c: ring_ns_per_chain(fe, q, 1, c, chains)),
                ("ring pop+push, 2 descriptors", lambda c: ring_ns_per_chain(fe, q, 2, c, chains)),
                ("drain_tx, ping frames (+stack)", lambda c: tx_ns_per_chain(fe, srv, c, chains // 4))]
        for name, fn in rows:
            fn(True)   # warm up: page faults of the buffers, caches
            off = on = float("inf")
            for _ in range(rounds):   # interleaved, so a busy moment of the machine hits both
                off = min(off, fn(False))
                on = min(on, fn(True))
            print(f"{name:34} {off:11.0f} {on:10.0f} {on - off:8.0f} {on / off:6.2f}")
        f = [x for x in srv.current.backend.queues[TX].findings.by_id]
        assert not f, f"the benchmark's driver broke rules: {f}"


# -- 2. the safety poll's CPU ------------------------------------------------------------------

async def cpu_window(seconds: float, work=None) -> tuple[float, int]:
    """CPU % of this process over SECONDS while WORK (async, returns a count) runs, and the count."""
    c0, t0 = time.process_time(), time.perf_counter()
    n = 0
    if work is None:
        await trio.sleep(seconds)
    else:
        n = await work(t0 + seconds)
    return 100.0 * (time.process_time() - c0) / (time.perf_counter() - t0), n


async def paced(fe, rate: float, deadline: float) -> int:
    n = 0
    frame = ping_frame()
    while time.perf_counter() < deadline:
        fe.post_tx(frame)
        fe.tx.kick()
        await fe.rx.wait_call(1.0)
        n += len(fe.read_rx())
        fe.tx.take_used()
        fe.post_rx()
        fe.rx.kick()
        await trio.sleep(1.0 / rate)
    return n


async def flood(fe, deadline: float, window: int = 32) -> int:
    return await fe.flood(ping_frame(), deadline, window)


async def bench_poll(seconds: float, rate: float) -> None:
    print(f"\nsafety poll cost (CPU % of one core, process time / wall time, {seconds:.0f} s windows)")
    print(f"{'load':40} {'poll off':>10} {'poll on':>10}")
    results = {}
    for on in (False, True, False, True):   # twice each, interleaved; the better run kept
        async with connected(safety_poll=on) as (srv, fe):
            fe.post_rx()
            fe.rx.kick()
            await fe.exchange([ping_frame()], want=1)
            await trio.sleep(0.5)     # past the poll's QUIET_AFTER: it has stopped
            idle, _ = await cpu_window(seconds)
            pcpu, pn = await cpu_window(seconds, lambda dl: paced(fe, rate, dl))
            fcpu, fn = await cpu_window(seconds, lambda dl: flood(fe, dl))
            run = (idle, pcpu, pn / seconds, fcpu, fn / seconds,
                   sum(q.stats["unkicked"] for q in srv.current.backend.queues))
            if on not in results or run[4] > results[on][4]:
                results[on] = run
    async with connected(safety_poll=True) as (srv, fe):
        fe.post_rx()
        fe.rx.kick()
        await fe.exchange([ping_frame()], want=1)
        poll = srv.current._polls[TX]
        n = 20000
        t0 = time.perf_counter_ns()
        for _ in range(n):
            await poll.tick(trio.current_time())
        tick_ns = (time.perf_counter_ns() - t0) / n
    from vhostnet.vhostuser.safety_poll import INTERVAL
    off, on = results[False], results[True]
    print(f"{'idle (guest sends nothing)':40} {off[0]:9.2f}% {on[0]:9.2f}%")
    print(f"{f'paced pings, {rate:.0f}/s (got {on[2]:.0f}/s)':40} {off[1]:9.2f}% {on[1]:9.2f}%")
    print(f"{'flood, 32 in flight: CPU %':40} {off[3]:9.2f}% {on[3]:9.2f}%")
    print(f"{'flood: round trips per second':40} {off[4]:10.0f} {on[4]:10.0f}   (on/off {on[4] / off[4]:.2f})")
    print(f"{'entries found without a kick (should be 0)':40} {off[5]:10d} {on[5]:10d}")
    per_queue = 100.0 * tick_ns * 1e-9 / INTERVAL
    print(f"one look at a ring: {tick_ns:.0f} ns; every {INTERVAL * 1e3:.0f} ms on both queues of an "
          f"active guest: {2 * per_queue:.3f}% of a core (plus trio's wake-up per look)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, default=20000, help="chains per measurement (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, best kept (default %(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each CPU window (default %(default)s)")
    p.add_argument("--rate", type=float, default=200.0, help="paced pings per second (default %(default)s)")
    args = p.parse_args()
    trio.run(bench_checker, args.chains, args.rounds)
    trio.run(bench_poll, args.seconds, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
