#!/usr/bin/env python3
"""What the fault layer costs per frame, against the stack it wraps.

    python3 scripts/bench_faults.py            # 20000 pings per row, best of 5

Each row feeds the same ICMP echo requests (98-byte frames, views of a
buffer as guest frames are) through `LinkSettings.compose(Stack())`, the
layers `vhostnet serve` builds, and takes the replies back out
(receive + take_frames, then poll through the deadlines for the delayed
rows), timed in CPU seconds of this process, rows interleaved, best of N. The peer row is the bare Stack: the ratio column is each row's
time over it (the corrupt row costs the stack less: it answers nothing). "layer" is the row's time minus the bare stack's: what the
fault layer and the stack-side taps add per echo (one frame each way).

Prints a table; not a test.
"""
from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scapy.layers.inet import ICMP, IP           # noqa: E402
from scapy.layers.l2 import Ether                # noqa: E402

from stack import Frame, Stack                   # noqa: E402
from stack.checksum import checksum              # noqa: E402
from vhostnet.link import LinkSettings           # noqa: E402
from vhostnet.link.faults import FaultSettings   # noqa: E402
from vhostnet.link.spec import parse             # noqa: E402

ICMP_AT = 14 + 20
ROWS = [
    ("stack alone (peer)", None),
    ("layers, no faults", "none"),
    ("loss=5%", "loss=5%,seed=1"),
    ("loss=5%,reorder=2%,delay=20ms", "loss=5%,reorder=2%,delay=20ms,seed=1"),
    ("+ jitter=5ms,dup=1%,rate=1gbit", "loss=5%,reorder=2%,delay=20ms,jitter=5ms,dup=1%,rate=1gbit,seed=1"),
    ("corrupt=100%", "corrupt=100%,seed=1"),
]


def pings(n: int) -> list[Frame]:
    base = bytearray(bytes(Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") /
                           IP(src="10.0.2.15", dst="10.0.2.2") / ICMP(type=8, id=1, seq=0) / (b"x" * 56)))
    out = []
    for i in range(n):
        b = bytearray(base)
        struct.pack_into("!H", b, ICMP_AT + 6, i & 0xFFFF)
        b[ICMP_AT + 2:ICMP_AT + 4] = b"\0\0"
        struct.pack_into("!H", b, ICMP_AT + 2, checksum(b[ICMP_AT:]))
        out.append(Frame(memoryview(b)))
    return out


def one(spec: str | None, frames: list[Frame]) -> float:
    stack = Stack()
    link = stack if spec is None else LinkSettings(FaultSettings(parse(spec))).compose(stack)
    now = 1000.0
    t = time.process_time()   # CPU time: other processes on a shared machine count less
    for f in frames:
        link.receive(f, now)
        link.take_frames()
        now += 1e-4                   # 10,000 frames/s of simulated time: 200 in flight at 20 ms
    while True:                       # what waits (delay) leaves at its deadline
        d = link.next_deadline()
        if d is None or d > now + 1:
            break
        now = max(now, d)
        link.poll(now)
        link.take_frames()
    return (time.process_time() - t) / len(frames)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    frames = pings(args.frames)
    best = {name: float("inf") for name, _spec in ROWS}
    for _ in range(args.repeat):            # rows interleaved, so load changes hit them alike
        for name, spec in ROWS:
            best[name] = min(best[name], one(spec, frames))
    peer = best[ROWS[0][0]]
    print(f"# bench_faults: {time.strftime('%Y-%m-%d %H:%M')}, {args.frames} echoes per row, best of {args.repeat}")
    head = f"{'row':<36} {'us/echo':>8} {'ratio':>6} {'layer us':>9}"
    print(head)
    print("-" * len(head))
    for name, _spec in ROWS:
        print(f"{name:<36} {best[name] * 1e6:>8.2f} {best[name] / peer:>6.2f} {(best[name] - peer) * 1e6:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
