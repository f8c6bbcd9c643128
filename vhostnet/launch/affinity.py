"""`--cpu`: the CPU the backend's thread runs on.

Why pin: on a small host every operation of a request/response exchange is
a chain of wake-ups (the guest's kick wakes the backend, its call wakes
QEMU's main loop, its send wakes the host server, ...). Left to itself the
scheduler puts a woken backend on whichever CPU is idle, so it moves
between CPUs from one wake-up to the next, and a wake-up that moves costs
more than one that does not (scripts/wake_cost.py on the 2-core test VM:
about 25 µs per round trip of two wake-ups across CPUs, 9 on one CPU, and
up to 43 unpinned, migrations included). Pinned, the backend's wake-ups
land where its caches are; QEMU, the guest and the host's servers are left
to the scheduler, which places them around it. The cost: a pinned backend
waits when its CPU is busy instead of taking the idle one, so on two cores
pinning won some races and lost others (docs/benchmarks.md, "What one
wake-up costs"), and it is off by default.

The choice is made once, at start, before any thread exists, so that the
process's helper threads (trio's, the DNS resolver's) inherit it. QEMU,
when `vhostnet run` starts it, keeps the mask the backend had before.
"""
from __future__ import annotations

import os

__all__ = ["CpuChoice", "parse_cpu", "pin", "describe", "NONE", "AUTO"]

NONE = "none"
AUTO = "auto"


class CpuChoice:
    """What --cpu said: NONE, AUTO, or one CPU number."""

    def __init__(self, spec: str | int):
        self.spec = spec

    def __repr__(self) -> str:
        return f"CpuChoice({self.spec!r})"

    def __str__(self) -> str:
        return str(self.spec)

    def resolve(self, allowed: set[int]) -> int | None:
        """The CPU to pin to among ALLOWED (this process's mask), or None."""
        if self.spec == NONE:
            return None
        if self.spec != AUTO and self.spec not in allowed:
            # Refused even when one CPU is allowed: the user named another,
            # and saying nothing would let them think it ran there.
            raise ValueError(f"--cpu {self.spec}: not among this process's CPUs "
                             f"({describe(allowed)})")
        if len(allowed) < 2:
            return None         # one CPU allowed: pinned already
        if self.spec == AUTO:
            # The highest allowed: CPU 0 is where the host tends to take its
            # own interrupts and housekeeping.
            return max(allowed)
        return self.spec


def parse_cpu(text: str) -> CpuChoice:
    """argparse type of --cpu: 'none', 'auto' or a CPU number."""
    import argparse
    t = text.strip().lower()
    if t in (NONE, AUTO):
        return CpuChoice(t)
    try:
        n = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU: {text!r} (a number, 'auto' or 'none')") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"not a CPU: {text!r}")
    return CpuChoice(n)


def pin(choice: CpuChoice) -> tuple[int | None, set[int]]:
    """Pin the calling thread as CHOICE says. Returns (the CPU or None, the mask before)."""
    before = os.sched_getaffinity(0)
    cpu = choice.resolve(before)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    return cpu, before


def describe(cpus: set[int]) -> str:
    """CPUS as a list like taskset's: 0-3,6."""
    runs: list[list[int]] = []          # [first, last] of each run of consecutive CPUs
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
