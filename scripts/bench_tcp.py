#!/usr/bin/env python3
"""TCP bulk throughput, stack to stack, in one process, on a clean link.

Two TcpLayers are wired back to back through a FIFO (a loopback link with no
loss; virtual time advances 1 us per delivered segment so timestamps and
timers behave). One side sends N bytes from a preallocated buffer, the other
reads and discards. Reports wall-clock throughput of the Python stack itself
(both ends' work counted in the same wall time) and segments per second.

    python scripts/bench_tcp.py            # 64 MiB per run
    python scripts/bench_tcp.py --mib 256
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import deque
from pathlib import Path

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stack.tcp.config import TcpConfig
from stack.tcp.layer import TcpLayer

A_IP = bytes([10, 0, 2, 15])
B_IP = bytes([10, 0, 2, 2])


def run(total: int, tso: int | None, bufsize: int) -> dict:
    q: deque = deque()
    cfg = TcpConfig(sndbuf=bufsize, rcvbuf=bufsize)
    stats = {"segs": 0, "data_segs": 0}
    layers = {}

    def emitter(dst):
        def emit(src, dst_ip, seg, gso):
            q.append((dst, src, dst_ip, seg))
            stats["segs"] += 1
            if len(seg) > 60:
                stats["data_segs"] += 1
        return emit

    layers["a"] = A = TcpLayer(emitter("b"), rng=random.Random(1), config=cfg)
    layers["b"] = B = TcpLayer(emitter("a"), rng=random.Random(2), config=cfg)
    A.set_tso(tso)
    B.set_tso(tso)
    received = [0]
    src = memoryview(bytes(1 << 20))
    sent = [0]

    def on_accept(conn):
        def readable(c):
            received[0] += len(c.recv())
        conn.on_readable = readable

    def writable(c):
        while sent[0] < total:
            n = c.send(src[:min(len(src), total - sent[0])])
            if not n:
                break
            sent[0] += n

    B.listen(B_IP, 5001, on_accept)
    now = 0.0
    t0 = time.perf_counter()
    conn = A.connect(now, A_IP, 40000, B_IP, 5001)
    conn.on_established = conn.on_writable = writable
    while received[0] < total:
        if q:
            dst, s, d, seg = q.popleft()
            now += 1e-6
            layers[dst].receive(now, s, d, memoryview(seg))
        else:
            dl = [x for x in (A.next_deadline(), B.next_deadline()) if x is not None]
            if not dl:
                raise RuntimeError("benchmark stalled")
            now = max(now, min(dl))
            A.poll(now)
            B.poll(now)
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "gbps": total * 8 / wall / 1e9,
        "segs_per_s": stats["segs"] / wall,
        "segs": stats["segs"],
        "data_segs": stats["data_segs"],
        "retx": conn.retransmits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB per run (default 64)")
    ap.add_argument("--buf", type=int, default=256, help="socket buffers in KiB (default 256)")
    args = ap.parse_args()
    total = args.mib << 20
    rows = [("MSS 1460 (no TSO)", None), ("TSO 64 KiB segments", 65536)]
    print(f"TCP bulk, stack to stack in process, clean link, {args.mib} MiB, "
          f"{args.buf} KiB buffers, Python {sys.version.split()[0]}")
    print(f"{'mode':<22} {'Gbit/s':>8} {'seg/s':>10} {'segments':>9} {'data segs':>9} "
          f"{'retx':>5} {'wall s':>7}")
    for name, tso in rows:
        r = run(total, tso, args.buf << 10)
        print(f"{name:<22} {r['gbps']:>8.2f} {r['segs_per_s']:>10.0f} {r['segs']:>9} "
              f"{r['data_segs']:>9} {r['retx']:>5} {r['wall']:>7.2f}")


if __name__ == "__main__":
    main()
