#!/usr/bin/env python3
"""wake_cost.py: what one process waking another costs on this machine.

    python3 scripts/wake_cost.py              # the table, 2,000 round trips per row
    python3 scripts/wake_cost.py --json

Two processes bounce a count through two eventfds, each blocked in epoll
between its turns: one round trip is two wake-ups, as a UDP round trip
through a vhost-user back-end is several (the guest's kick wakes the
back-end, its call wakes QEMU's main loop, QEMU wakes the vCPU; hostsrv is
woken and wakes us back). Rows:

  unpinned       where the scheduler puts the two (on an idle machine it
                 spreads them over idle CPUs: the "across CPUs" case)
  across CPUs    each pinned to a CPU of its own: the woken one is on a CPU
                 that went idle, so the wake-up is an inter-processor
                 interrupt and, in a VM, the idle vCPU's exit from HLT
  one CPU        both pinned to one CPU: a wake-up is a context switch, no IPI

On a machine where "across CPUs" is far above "one CPU", every extra party
on an operation's path costs that difference (docs/benchmarks.md, "What
one wake-up costs"). bench_qemu.py prints all three rows at the start and
end of every race, since they move with the hour on a shared host.

Python's own cost is in every row (about 4 µs per round trip here: the same
writes, polls and reads on one eventfd that is always ready, no wake-up), so
compare rows, not absolute numbers with a C program's.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time

#: Round trips per measurement; the first WARMUP are not timed.
ROUND_TRIPS = 2000
WARMUP = 100


def _bounce(rd: int, wr: int, n: int) -> None:
    ep = select.epoll()
    ep.register(rd, select.EPOLLIN)
    for _ in range(n):
        ep.poll()
        os.eventfd_read(rd)
        os.eventfd_write(wr, 1)


def _child(fn, cpu: int | None) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def round_trip_us(pin: tuple[int, int] | None = None, n: int = ROUND_TRIPS) -> float:
    """The mean time of one eventfd round trip (two wake-ups), µs, over N.
    PIN: (this process's CPU, the peer's); None: the scheduler's choice."""
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    old = os.sched_getaffinity(0)
    peer = None
    try:
        peer = _child(lambda: _bounce(a, b, n + WARMUP), pin[1] if pin else None)
        if pin:
            os.sched_setaffinity(0, {pin[0]})
        ep = select.epoll()
        ep.register(b, select.EPOLLIN)
        # The peer's pidfd too: a peer that dies ends the wait (no hang).
        dead = os.pidfd_open(peer)
        ep.register(dead, select.EPOLLIN)
        t0 = 0.0
        try:
            for i in range(n + WARMUP):
                if i == WARMUP:
                    t0 = time.perf_counter()
                os.eventfd_write(a, 1)
                while True:
                    ready = ep.poll()
                    if any(fd == b for fd, _ in ready):
                        break
                    if ready:
                        raise RuntimeError("the peer process ended early")
                os.eventfd_read(b)
            elapsed = time.perf_counter() - t0
        finally:
            ep.close()
            os.close(dead)
        _, status = os.waitpid(peer, 0)
        peer = None
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("the peer process failed")
        return elapsed / n * 1e6
    finally:
        os.sched_setaffinity(0, old)
        if peer is not None:
            os.kill(peer, 9)
            os.waitpid(peer, 0)
        os.close(a)
        os.close(b)


def measure(n: int = ROUND_TRIPS) -> dict[str, float]:
    """The rows of the table, µs per round trip ("across CPUs" only with two
    CPUs allowed)."""
    cpus = sorted(os.sched_getaffinity(0))
    out = {"unpinned": round_trip_us(None, n=n)}
    if len(cpus) >= 2:
        out["across CPUs"] = round_trip_us((cpus[0], cpus[1]), n=n)
    out["one CPU"] = round_trip_us((cpus[0], cpus[0]), n=n)
    return out


def summary(rows: dict[str, float]) -> str:
    """One line for a benchmark's header."""
    return "wake-up round trip, µs: " + " / ".join(f"{v:.0f} {k}" for k, v in rows.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--round-trips", type=int, default=ROUND_TRIPS, metavar="N",
                   help="timed round trips per row, 10..1000000 (default %(default)s; "
                        f"{WARMUP} more are run first, untimed)")
    p.add_argument("--json", action="store_true", help="the rows as a JSON object, µs per round trip")
    args = p.parse_args(argv)
    if not 10 <= args.round_trips <= 1_000_000:
        p.error("--round-trips must be 10..1000000")
    rows = measure(args.round_trips)
    if args.json:
        print(json.dumps({"unit": "us_per_round_trip", "rows": rows}))
        return 0
    print(f"# wake_cost: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"{args.round_trips} round trips (two wake-ups each) per row, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'placement':<14} {'µs per round trip':>18}")
    for k, v in rows.items():
        print(f"{k:<14} {v:>18.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
