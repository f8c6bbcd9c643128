#!/usr/bin/env python3
"""The split TX ring's batched walk against the chain-by-chain one, same process.

NetDevice.drain_tx takes the run of common TX chains of a split ring in one
C call (SplitRing.take_readable) and returns them in one (push_read) when
at least TX_RUN_MIN chains are ahead; `NetDevice(tx_batch=False)` walks
chain by chain (pop_fast / pop / push per chain), which is the loop packed
rings use and the one drain_tx had before. This script times drain_tx both
ways on a real server's rings, switching `tx_batch` between rounds so a
busy moment of the (shared) machine hits both, and prints ns per chain,
best and median of the rounds, with the ratio batched / chain by chain.

Rows: ping frames (one descriptor: the case the run takes) at 1, 2, 4, 8
and 64 chains per drain (below TX_RUN_MIN the batched device goes chain by
chain too, so those rows should be ~1.00), and 64 two-descriptor chains
(header, then the frame: the layout of a TSO frame, which pop() walks
either way). The stack's work on each frame (the echo reply) is in the
numbers; the RX side is not (the replies are read and dropped between
rounds).

Prints a table; not a test.

    python3 scripts/bench_tx_walk.py                  # 4000 chains a round, 7 rounds
    python3 scripts/bench_tx_walk.py --chains 20000 --rounds 9
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import trio

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_checker import connected, ping_frame  # noqa: E402
from vhostnet.net.device import TX_RUN_MIN  # noqa: E402

TX = 1


def ns_per_chain(fe, srv, per_drain: int, descs: int, chains: int) -> float:
    """ns per chain of drain_tx over CHAINS ping chains, PER_DRAIN of them made available per drain."""
    dev = srv.current.device
    rings = srv.current.backend.queues
    r = fe.tx
    hdr = fe.net_hdr()
    frame = ping_frame()
    spent = 0
    done = 0
    while done < chains:
        for _ in range(per_drain):
            if descs == 1:
                fe.post_tx(frame)
            else:
                slot = r.free[-1]
                a = r.buf(slot)
                fe.mem[a:a + len(hdr)] = hdr
                fe.mem[a + 0x80:a + 0x80 + len(frame)] = frame
                r.add([(a, len(hdr), 0), (a + 0x80, len(frame), 0)])
        t0 = time.perf_counter_ns()
        dev.drain_tx(rings, trio.current_time())
        spent += time.perf_counter_ns() - t0
        r.take_used()
        fe.read_rx()
        fe.post_rx()
        dev.rx_pending.clear()
        done += per_drain
    return spent / done


async def bench(chains: int, rounds: int) -> None:
    async with connected(safety_poll=False) as (srv, fe):
        fe.post_rx()
        dev = srv.current.device
        print(f"drain_tx ns per chain, split ring, ping frames (+ the stack's reply); "
              f"{chains} chains a round, {rounds} rounds alternating; TX_RUN_MIN {TX_RUN_MIN}")
        print(f"{'chains per drain':26} {'per chain best':>14} {'batched best':>12} {'ratio':>6}"
              f" {'per chain med':>14} {'batched med':>12} {'ratio':>6}")
        rows = [(f"{n}, 1 descriptor", n, 1) for n in (1, 2, 4, 8, 64)] + [("64, 2 descriptors", 64, 2)]
        for name, per_drain, descs in rows:
            n = max(chains // (4 if per_drain < 8 else 1), per_drain)
            got = {True: [], False: []}
            for batch in (True, False):         # warm up: page faults of the buffers, caches
                dev.tx_batch = batch
                ns_per_chain(fe, srv, per_drain, descs, n // 4)
            for _ in range(rounds):
                for batch in (False, True):
                    dev.tx_batch = batch
                    got[batch].append(ns_per_chain(fe, srv, per_drain, descs, n))
            dev.tx_batch = True
            one, run = got[False], got[True]
            print(f"{name:26} {min(one):14.0f} {min(run):12.0f} {min(run) / min(one):6.2f}"
                  f" {statistics.median(one):14.0f} {statistics.median(run):12.0f}"
                  f" {statistics.median(run) / statistics.median(one):6.2f}")
        q = srv.current.backend.queues[TX]
        assert not q.errors, f"the benchmark's driver broke rules: {q.errors}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--chains", type=int, default=4000, help="chains per round (default 4000)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per mode (default 7)")
    a = ap.parse_args()
    if a.chains < 1 or a.rounds < 1:
        ap.error("--chains and --rounds must be at least 1")
    trio.run(bench, a.chains, a.rounds)


if __name__ == "__main__":
    main()
