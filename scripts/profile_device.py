#!/usr/bin/env python3
"""Where the device's time goes, per side: backend vs the in-process guest.

    python3 scripts/profile_device.py tcp-send          # 64 KiB TSO frames guest -> backend
    python3 scripts/profile_device.py tcp-recv --no-offloads
    python3 scripts/profile_device.py echo              # 64-byte ICMP echo round trips
    python3 scripts/profile_device.py echo --packed     # the same on packed rings
    python3 scripts/profile_device.py tcp-send --profile 25   # + cProfile top 25, per side

Everything runs in this process on one core, with no event loop and no
wake-ups: the real server does the vhost-user handshake over a Unix socket
(as in scripts/bench_device.py's "direct" row), then its kick tasks are
stopped and the loop calls NetDevice.process itself, alternating with the
guest (the frontend of tests/device/frontend.py plus a guest stack, as in
scripts/bench_device_tcp.py). Time is split by side with
time.process_time(), so another process on the core inflates neither side
much. With --profile, one cProfile.Profile per side is switched on only
around that side's calls.

Prints a table; not a test. This is the tool the profiles in
docs/benchmarks.md ("native hot paths") came from.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import trio  # noqa: E402

import bench_device  # noqa: E402
import bench_device_tcp as bdt  # noqa: E402
try:
    from stack.native import IMPLEMENTATION  # noqa: E402
except ImportError:   # a tree from before stack/native (for before/after runs)
    IMPLEMENTATION = "python (no stack/native)"
from vhostnet.virtio import features as F  # noqa: E402


class Side:
    """Time (and optionally a profile) for one side's calls."""

    def __init__(self, profile: bool):
        self.cpu = 0.0
        self.prof = cProfile.Profile() if profile else None

    def run(self, fn, *a):
        t = time.process_time()
        if self.prof:
            self.prof.enable()
        try:
            return fn(*a)
        finally:
            if self.prof:
                self.prof.disable()
            self.cpu += time.process_time() - t

    def top(self, n: int) -> str:
        s = io.StringIO()
        pstats.Stats(self.prof, stream=s).sort_stats("tottime").print_stats(n)
        return "\n".join(line[:150] for line in s.getvalue().splitlines() if line.strip())


async def tcp(direction: str, offloads: bool, seconds: float, profile: bool, bufsize: int,
              packed: bool = False) -> dict:
    async with bench_device.connected(0 if offloads else F.OFFLOAD_FEATURES, packed) as (srv, fe):
        conn = srv.current
        dev = conn.device
        rings = conn.backend.queues
        for q in rings:
            conn._queue_stop(q)
        g = bdt.Guest(fe, bufsize)
        st = g.st
        be, gu = Side(profile), Side(profile)
        now = 0.0
        c = st.tcp.connect(now, bdt.GUEST_IP, 0, bdt.GATEWAY_IP, bdt.DISCARD if direction == "send" else bdt.CHARGEN)
        block = memoryview(bytes(range(256)) * 256)

        def fill(c):
            while c.send_space and c.send(block[:min(c.send_space, len(block))]):
                pass
        if direction == "send":
            c.on_established = c.on_writable = fill
        else:
            c.on_readable = lambda c: c.recv()
        progress = (lambda: c.snd_una - c.iss - 1) if direction == "send" else (lambda: c.bytes_in)
        frames = (lambda: g.tx_frames) if direction == "send" else (lambda: g.rx_frames)
        t0 = time.perf_counter()
        b0 = f0 = None
        while True:
            # virtual time: 10 us per step keeps timers (delayed ACK, RTO) sane
            now += 1e-5
            el = time.perf_counter() - t0
            if b0 is None and el > 0.3:
                b0, f0, w0 = progress(), frames(), time.perf_counter()
                be.cpu = gu.cpu = 0.0
                if be.prof:
                    be.prof, gu.prof = cProfile.Profile(), cProfile.Profile()
            if el > seconds + 0.3:
                break
            gu.run(g.step, now)
            be.run(dev.process, rings, 1, now)
            be.run(dev.poll, rings, now)
        wall = time.perf_counter() - w0
        nbytes, nframes = progress() - b0, frames() - f0
        return {"wall": wall, "bytes": nbytes, "frames": nframes, "be": be, "gu": gu}


async def echo(size: int, seconds: float, profile: bool, window: int = 64, packed: bool = False) -> dict:
    """ICMP echo, WINDOW pings per round, as bench_device.py's direct row."""
    async with bench_device.connected(packed=packed) as (srv, fe):
        conn = srv.current
        dev = conn.device
        rings = conn.backend.queues
        for q in rings:
            conn._queue_stop(q)
        be, gu = Side(profile), Side(profile)
        frame = bench_device.ping_frame(size)
        fe.post_rx()

        def guest_round():
            n = len(fe.read_rx())
            fe.tx.take_used()
            fe.post_rx()
            for _ in range(window):
                if not fe.tx.free:
                    break
                fe.post_tx(frame)
            return n

        def backend_round():
            dev.process(rings, 1, 0.0)
            dev.process(rings, 0, 0.0)
        done = 0
        t0 = time.perf_counter()
        w0 = None
        while True:
            el = time.perf_counter() - t0
            if w0 is None and el > 0.3:
                w0, done = time.perf_counter(), 0
                be.cpu = gu.cpu = 0.0
                if be.prof:
                    be.prof, gu.prof = cProfile.Profile(), cProfile.Profile()
            if el > seconds + 0.3:
                break
            done += gu.run(guest_round)
            be.run(backend_round)
        wall = time.perf_counter() - w0
        return {"wall": wall, "bytes": done * (size + 42), "frames": done, "be": be, "gu": gu}


def summary(r: dict) -> dict:
    """The numbers of one run, JSON-able (for scripts/bench_native.py)."""
    n = max(r["frames"], 1)
    be, gu = r["be"], r["gu"]
    return {"native": IMPLEMENTATION, "frames": r["frames"], "bytes": r["bytes"],
            "wall_s": r["wall"], "backend_us_per_frame": be.cpu / n * 1e6,
            "guest_us_per_frame": gu.cpu / n * 1e6,
            "backend_gbit": r["bytes"] * 8 / max(be.cpu, 1e-9) / 1e9,
            "backend_frames_per_s": r["frames"] / max(be.cpu, 1e-9)}


def report(name: str, r: dict, top: int) -> None:
    n = max(r["frames"], 1)
    be, gu = r["be"], r["gu"]
    print(f"{name}: {r['bytes'] * 8 / r['wall'] / 1e9:.2f} Gbit/s wall, {r['frames'] / r['wall']:,.0f} frames/s, "
          f"{r['bytes'] / n:,.0f} B/frame; hot paths: {IMPLEMENTATION}")
    print(f"  CPU per frame: backend {be.cpu / n * 1e6:7.1f} us   guest {gu.cpu / n * 1e6:7.1f} us"
          f"   -> backend alone could do {r['bytes'] * 8 / max(be.cpu, 1e-9) / 1e9:.2f} Gbit/s")
    if top:
        print("--- backend profile"), print(be.top(top))
        print("--- guest profile"), print(gu.top(top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("case", choices=["tcp-send", "tcp-recv", "echo"])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--no-offloads", action="store_true")
    ap.add_argument("--guest-buf", type=int, default=256 * 1024)
    ap.add_argument("--size", type=int, default=64, help="echo: ICMP payload bytes (default 64)")
    ap.add_argument("--packed", action="store_true", help="packed rings (default: split)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N functions per side")
    a = ap.parse_args()
    if a.case == "echo":
        r = trio.run(echo, a.size, a.seconds, bool(a.profile), 64, a.packed)
        if a.json:
            print(json.dumps(summary(r)))
            return
        report(f"echo {a.size} B", r, a.profile)
        print(f"  round trips/s the backend alone could do: {r['frames'] / max(r['be'].cpu, 1e-9):,.0f}")
        return
    r = trio.run(tcp, a.case.split("-")[1], not a.no_offloads, a.seconds, bool(a.profile), a.guest_buf,
               a.packed)
    if a.json:
        print(json.dumps(summary(r)))
        return
    report(f"{a.case} offloads={'off' if a.no_offloads else 'on'}", r, a.profile)


if __name__ == "__main__":
    main()
