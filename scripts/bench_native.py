#!/usr/bin/env python3
"""The native hot paths (stack/native) against their Python twins, and before/after.

    python3 scripts/bench_native.py                    # micro-benchmarks of each routine
    python3 scripts/bench_native.py --ab               # + the data paths, Python vs C, interleaved
    python3 scripts/bench_native.py --ab --before DIR  # + a third column: an older tree (PYTHONPATH=DIR)

Micro (in this process; ns per call, median of --repeat runs):
- ones_sum: the RFC 1071 sum at 20 B (an IPv4 header), 64 B, 1480 B (a full
  UDP datagram) and 64 KiB;
- gather (TX): a virtio-net header plus a frame in 1, 2 or 17 guest views
  into one frame: b"".join (what the device does) vs the Python copy loop
  vs vn_copy (C, called directly);
- scatter (RX): header + frame into 1, 17 or 64 guest buffers: the device's
  former per-view loop vs the Python copy loop vs vn_copy;
- segment: software TSO of a 64 KiB TCP frame at MSS 1448, full checksums
  and partial.

A/B (--ab; subprocesses, each variant in turn, --runs times, medians):
- scripts/bench_stack_udp.py --cpu: us of CPU per echo (ICMP, UDP; 64 and
  1472 B) with and without checksum offload; for UDP 1472 B the difference
  is what checksums cost per datagram;
- scripts/profile_device.py: backend CPU per frame through the device (TCP
  with 64 KiB TSO frames both ways, TCP without offloads, 64 B ICMP echo),
  measured with process_time so that other processes on the machine inflate
  it less than wall time.
Variants: VHOSTNET_NATIVE=0 (the fallback), the C build, and with --before
an older tree. Prints tables; not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import stack.native as native
from stack.native import fallback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def per_call(fn, repeat: int, min_time: float = 0.05) -> float:
    """Median ns per call of fn() over REPEAT timed batches."""
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t >= min_time / 5:
            break
        n *= 2
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e9)
    return statistics.median(runs)


def old_scatter(views, hdr, data) -> int:
    """The device's RX copy before stack/native (vhostnet/net/header.py at ea981a5)."""
    written = 0
    src = hdr
    spos = 0
    second = data
    for v in views:
        vpos = 0
        vlen = len(v)
        while vpos < vlen:
            left = len(src) - spos
            if left == 0:
                if second is None:
                    return written
                src, spos, second = second, 0, None
                continue
            n = min(left, vlen - vpos)
            v[vpos:vpos + n] = src[spos:spos + n]
            vpos += n
            spos += n
            written += n
    return written


def tcp_frame(plen: int) -> bytearray:
    import struct
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 32 + plen, 1, 0x4000, 64, 6, 0,
                     bytes([10, 0, 2, 2]), bytes([10, 0, 2, 15]))
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, 1, 1, 8 << 4, 0x18, 500, 0, 0) + \
        b"\x01\x01\x08\x0a" + bytes(8)
    return bytearray(bytes(12) + b"\x08\x00" + ip + tcp + bytes((i * 7) & 0xFF for i in range(plen)))


def micro(repeat: int) -> None:
    print(f"hot paths: {native.IMPLEMENTATION}{' (' + native.REASON + ')' if native.REASON else ''}")
    if not native.NATIVE:
        print("the C build is not in use: the rows below would compare Python with itself")
        return
    rows = []
    for n in (20, 64, 1480, 65535):
        data = (bytes(range(256)) * 257)[:n]
        mv = memoryview(bytearray(3) + data)[3:]
        rows.append((f"ones_sum {n} B (bytes)", per_call(lambda: fallback.ones_sum(data), repeat),
                     per_call(lambda: native.ones_sum(data), repeat)))
        rows.append((f"ones_sum {n} B (misaligned view)", per_call(lambda: fallback.ones_sum(mv), repeat),
                     per_call(lambda: native.ones_sum(mv), repeat)))
    print(f"\n{'routine':40} {'Python ns':>11} {'C ns':>9} {'speed-up':>9}")
    for name, py, c in rows:
        print(f"{name:40} {py:>11,.0f} {c:>9,.0f} {py / c:>8.1f}x")

    guest = memoryview(bytearray(1 << 20))
    from stack.native._native import ffi, lib

    def vn_copy(dst, src):
        fb = ffi.from_buffer
        return lib.vn_copy(ffi.new("char *[]", [fb(d) for d in dst]), ffi.new("size_t[]", [len(d) for d in dst]),
                           len(dst), ffi.new("char *[]", [fb(x) for x in src]),
                           ffi.new("size_t[]", [len(x) for x in src]), len(src))
    print(f"\nnative.copy uses the Python loop below {native.COPY_C_MIN_VIEWS} views, vn_copy (C) from there")
    print(f"{'gather (TX: views -> one frame)':40} {'join ns':>11} {'Python':>9} {'vn_copy':>9}")
    for nviews, size in ((1, 1514), (2, 1514), (17, 65536)):
        per = -(-(12 + size) // nviews)
        views = [guest[i * 8192:i * 8192 + per] for i in range(nviews)]
        out = bytearray(per * nviews)
        j = per_call(lambda: b"".join(views), repeat)
        p = per_call(lambda: fallback.copy([out], views), repeat)
        c = per_call(lambda: vn_copy([out], views), repeat)
        print(f"{f'{nviews} view(s), {12 + size} B':40} {j:>11,.0f} {p:>9,.0f} {c:>9,.0f}")

    print(f"\n{'scatter (RX: hdr + frame -> buffers)':40} {'old loop':>11} {'Python':>9} {'vn_copy':>9} {'old/Py':>7}")
    hdr = bytes(12)
    for nbuf, bsize, size in ((1, 4096, 1514), (17, 4096, 65536), (64, 1024, 65536)):
        data = bytearray(size)          # frames from the stack are bytearrays
        views = [guest[i * 8192:i * 8192 + bsize] for i in range(nbuf)]
        o = per_call(lambda: old_scatter(views, hdr, data), repeat)
        p = per_call(lambda: fallback.copy(views, (hdr, data)), repeat)
        c = per_call(lambda: vn_copy(views, (hdr, data)), repeat)
        print(f"{f'{size} B into {nbuf} x {bsize} B':40} {o:>11,.0f} {p:>9,.0f} {c:>9,.0f} {o / p:>6.1f}x")

    print(f"\n{'segment (software TSO, 64 KiB at 1448)':40} {'Python us':>11} {'C us':>9} {'speed-up':>9}")
    f = tcp_frame(65483 - 12)
    ihl, doff, tot = 20, 32, len(f) - 14
    count = -(-(tot - 52) // 1448)
    for partial in (False, True):
        p = per_call(lambda: fallback.segment(f, ihl, doff, tot, 1448, count, partial), repeat) / 1e3
        c = per_call(lambda: native.segment(f, ihl, doff, tot, 1448, count, partial), repeat) / 1e3
        print(f"{'partial checksums' if partial else 'full checksums':40} {p:>11,.1f} {c:>9,.1f} {p / c:>8.1f}x")


# ---------------------------------------------------------------- A/B runs
CASES = [
    # name, argv (relative to scripts/), metric picker
    ("udp", ["bench_stack_udp.py", "1", "--cpu"], None),
    ("tcp-send TSO", ["profile_device.py", "tcp-send", "--seconds", "2", "--json"], "backend_us_per_frame"),
    ("tcp-recv TSO", ["profile_device.py", "tcp-recv", "--seconds", "2", "--json"], "backend_us_per_frame"),
    ("tcp-send no offl", ["profile_device.py", "tcp-send", "--no-offloads", "--seconds", "2", "--json"],
     "backend_us_per_frame"),
    ("tcp-recv no offl", ["profile_device.py", "tcp-recv", "--no-offloads", "--seconds", "2", "--json"],
     "backend_us_per_frame"),
    ("echo 64 B", ["profile_device.py", "echo", "--seconds", "2", "--json"], "backend_us_per_frame"),
]


def run_case(argv, pythonpath: str, native_env: str | None) -> str:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    env.pop("VHOSTNET_NATIVE", None)
    if native_env is not None:
        env["VHOSTNET_NATIVE"] = native_env
    return subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], env=env,
                          capture_output=True, text=True, check=True, timeout=300).stdout


def parse_udp(out: str) -> dict:
    """us/reply per (size, offload) row of bench_stack_udp.py."""
    got = {}
    for line in out.splitlines():
        p = line.split()
        if len(p) >= 6 and p[0] in ("UDP", "ICMP") and p[2].isdigit():
            got[(p[0], int(p[2]), p[3])] = float(p[-1])
    return got


def ab(runs: int, before: str | None) -> None:
    variants = []
    if before:
        variants.append(("before", before, None))
    variants += [("python", ROOT, "0"), ("C", ROOT, None)]
    results: dict = {}
    for rep in range(runs):
        for cname, argv, key in CASES:
            for vname, path, env in variants:
                out = run_case(argv, path, env)
                if cname == "udp":
                    for k, us in parse_udp(out).items():
                        results.setdefault((f"{k[0]} {k[1]} B offload={k[2]}", "us/reply"), {}) \
                            .setdefault(vname, []).append(us)
                    u = parse_udp(out)
                    cost = u[("UDP", 1472, "no")] - u[("UDP", 1472, "yes")]
                    results.setdefault(("UDP 1472 B: checksum cost", "us/datagram"), {}) \
                        .setdefault(vname, []).append(cost)
                else:
                    d = json.loads(out.strip().splitlines()[-1])
                    results.setdefault((cname + ": backend CPU", "us/frame"), {}) \
                        .setdefault(vname, []).append(d[key])
                    if cname.startswith("tcp") and "TSO" in cname:
                        results.setdefault((cname + ": backend alone", "Gbit/s"), {}) \
                            .setdefault(vname, []).append(d["backend_gbit"])
                    if cname.startswith("echo"):
                        results.setdefault((cname + ": backend alone", "round trips/s"), {}) \
                            .setdefault(vname, []).append(d["backend_frames_per_s"])
        print(f"  run {rep + 1}/{runs} done", file=sys.stderr)
    names = [v[0] for v in variants]
    print(f"\n{runs} interleaved runs, medians (spread min..max in the last column for C)")
    print(f"{'metric':44} {'unit':>13} " + " ".join(f"{n:>10}" for n in names) + f" {'C/python':>9} {'C spread':>17}")
    for (metric, unit), by in results.items():
        med = {n: statistics.median(by[n]) for n in names}
        ratio = med["C"] / med["python"] if med["python"] else float("nan")
        spread = f"{min(by['C']):.2f}..{max(by['C']):.2f}"
        print(f"{metric:44} {unit:>13} " + " ".join(f"{med[n]:>10,.2f}" for n in names)
              + f" {ratio:>9.2f} {spread:>17}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--repeat", type=int, default=7, help="micro: timed batches per routine (default 7)")
    ap.add_argument("--ab", action="store_true", help="also run the data paths with each implementation")
    ap.add_argument("--runs", type=int, default=3, help="A/B: rounds over every variant (default 3)")
    ap.add_argument("--before", metavar="DIR", help="A/B: an older source tree to compare with")
    ap.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    a = ap.parse_args()
    if not a.no_micro:
        micro(a.repeat)
    if a.ab:
        ab(a.runs, a.before)


if __name__ == "__main__":
    main()
