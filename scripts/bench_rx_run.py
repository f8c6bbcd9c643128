#!/usr/bin/env python3
"""The RX ring's run of small frames against the frame-by-frame fill, same process.

With MRG_RXBUF, NetDevice._fill writes the frames waiting that fit one
posted buffer each as a run in one call (_rx_run -> SplitRing.put_frames
or, with --packed, PackedRing.put_frames, C) when at least RX_RUN_MIN are
waiting; `NetDevice(rx_batch=False)` writes them one by one through _rx_one
(pop_fast, the header, the copy, push per frame), which is what _fill did
before. This script times flush_rx both ways on
a real server's RX ring, switching `rx_batch` between rounds so a busy
moment of the (shared) machine hits both, and prints ns per frame, best
and median of the rounds, with the ratio batched / frame by frame.

Rows: 98-byte ping replies (what the echo benchmark's backend writes) at
1, 2, 3, 4, 8 and 64 frames per fill. Below RX_RUN_MIN the batched device
goes frame by frame too, so those rows should be ~1.00; --run-min 1 makes
every fill a run, which is how RX_RUN_MIN was chosen. Only the device's
RX side is timed: the frames are put in rx_pending as the stack's output
would be, the guest reads and reposts between fills, untimed.

Prints a table; not a test.

    python3 scripts/bench_rx_run.py                   # 4000 frames a round, 7 rounds
    python3 scripts/bench_rx_run.py --run-min 1       # runs from one frame on
    python3 scripts/bench_rx_run.py --packed          # the same on packed rings
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

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_checker import ping_frame  # noqa: E402
from stack import Frame  # noqa: E402
from vhostnet.launch.serve import make_server  # noqa: E402
from vhostnet.net import device  # noqa: E402
from vhostnet.testing.frontend import Frontend  # noqa: E402

RX = 0


def ns_per_frame(fe, srv, per_fill: int, frames: int) -> float:
    """ns per frame of flush_rx over FRAMES frames, PER_FILL of them waiting per fill."""
    dev = srv.current.device
    rings = srv.current.backend.queues
    data = ping_frame()
    spent = 0
    done = 0
    while done < frames:
        dev.rx_pending.extend(Frame(data) for _ in range(per_fill))
        t0 = time.perf_counter_ns()
        dev.flush_rx(rings)
        spent += time.perf_counter_ns() - t0
        if dev.rx_pending:
            raise RuntimeError("frames left waiting: the guest posted too few buffers")
        fe.read_rx()
        fe.post_rx()
        done += per_fill
    return spent / done


@contextlib.asynccontextmanager
async def connected(packed: bool):
    """A real server (no safety poll) and a frontend (PACKED: packed rings) after QEMU's handshake."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vhost.sock")
        srv = make_server(path, safety_poll=False)
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


async def bench(frames: int, rounds: int, packed: bool) -> None:
    async with connected(packed) as (srv, fe):
        fe.post_rx()
        dev = srv.current.device
        for q in srv.current.backend.queues:
            srv.current._queue_stop(q)
        assert srv.current.backend.queues[RX].packed is packed
        print(f"flush_rx ns per frame, {'packed' if packed else 'split'} ring, MRG_RXBUF, 98-byte frames into "
              f"4 KiB buffers; "
              f"{frames} frames a round, {rounds} rounds alternating; RX_RUN_MIN {device.RX_RUN_MIN}")
        print(f"{'frames per fill':16} {'per frame best':>14} {'batched best':>12} {'ratio':>6}"
              f" {'per frame med':>14} {'batched med':>12} {'ratio':>6}")
        for per_fill in (1, 2, 3, 4, 8, 64):
            n = max(frames // (4 if per_fill < 8 else 1), per_fill)
            got = {True: [], False: []}
            for batch in (True, False):         # warm up: page faults of the buffers, caches
                dev.rx_batch = batch
                ns_per_frame(fe, srv, per_fill, n // 4)
            for _ in range(rounds):
                for batch in (False, True):
                    dev.rx_batch = batch
                    got[batch].append(ns_per_frame(fe, srv, per_fill, n))
            dev.rx_batch = True
            one, run = got[False], got[True]
            print(f"{per_fill:<16} {min(one):14.0f} {min(run):12.0f} {min(run) / min(one):6.2f}"
                  f" {statistics.median(one):14.0f} {statistics.median(run):12.0f}"
                  f" {statistics.median(run) / statistics.median(one):6.2f}")
        q = srv.current.backend.queues[RX]
        assert not q.errors, f"the benchmark's driver broke rules: {q.errors}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--frames", type=int, default=4000, help="frames per round (default 4000)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per mode (default 7)")
    ap.add_argument("--packed", action="store_true", help="packed rings (default: split)")
    ap.add_argument("--run-min", type=int, default=None, metavar="N",
                    help=f"RX_RUN_MIN for this run (default the device's, {device.RX_RUN_MIN})")
    a = ap.parse_args()
    if a.frames < 1 or a.rounds < 1:
        ap.error("--frames and --rounds must be at least 1")
    if a.run_min is not None:
        device.RX_RUN_MIN = a.run_min
    trio.run(bench, a.frames, a.rounds, a.packed)


if __name__ == "__main__":
    main()
