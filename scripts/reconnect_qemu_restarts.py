#!/usr/bin/env python3
"""reconnect_qemu_restarts.py: QEMU killed with SIGKILL under one live backend,
N times (default 100), and the backend's fd count and RSS after each cycle.

    python3 scripts/reconnect_qemu_restarts.py            # 100 cycles
    python3 scripts/reconnect_qemu_restarts.py -n 20 --every 5

Cycles come in rounds of ten: one Linux test guest (LOOP mode: pings and
TCP), six U-Boot guests pinging the gateway (a second driver, and at its
prompt in about a second under TCG), three killed right after the
vhost-user handshake. Traffic cycles are killed once the backend's control
socket shows both rings started and at least 10 frames each way. The
scenario is vhostnet/testing/restarts.py (also run, shorter, by
tests/test_qemu_backend.py). Needs qemu-system-x86, u-boot-qemu and the
test image (make guest).

Prints one row per cycle (or every --every cycles), then a summary: fd
count and RSS after cycle 5 and after the last, and the largest of each.
Exit status 1 if the fd count at the end differs from that after cycle 5.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vhostnet.testing.restarts import cycle_kinds, qemu_restarts  # noqa: E402

REFERENCE_CYCLE = 5      # after warm-up: what the end is compared with


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--cycles", type=int, default=100)
    p.add_argument("--every", type=int, default=1, metavar="K", help="print every K-th cycle (default 1)")
    args = p.parse_args()
    if args.cycles < REFERENCE_CYCLE:
        p.error(f"--cycles must be at least {REFERENCE_CYCLE}")
    work = Path(tempfile.mkdtemp(prefix="vnq-", dir="/tmp"))
    t0 = time.monotonic()
    print(f"{'cycle':>5} {'kind':6} {'fds':>4} {'RSS KiB':>8} {'tx':>5} {'rx':>5} {'secs':>5}")

    def row(s) -> None:
        if s.cycle % args.every == 0 or s.cycle in (1, REFERENCE_CYCLE, args.cycles):
            print(f"{s.cycle:5d} {s.kind:6} {s.fds:4d} {s.rss_kib:8d} {s.tx_frames:5d} {s.rx_frames:5d} "
                  f"{s.seconds:5.1f}", flush=True)
    try:
        samples, _ = qemu_restarts(work, cycle_kinds(args.cycles), on_sample=row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref, last = samples[REFERENCE_CYCLE - 1], samples[-1]
    kinds = {k: sum(s.kind == k for s in samples) for k in ("linux", "uboot", "early")}
    print(f"\n{len(samples)} cycles ({kinds['linux']} Linux, {kinds['uboot']} U-Boot, {kinds['early']} early) "
          f"in {time.monotonic() - t0:.0f} s")
    print(f"fds: {samples[0].fds} after cycle 1, {ref.fds} after cycle {REFERENCE_CYCLE}, {last.fds} after "
          f"cycle {last.cycle}, at most {max(s.fds for s in samples)}")
    print(f"RSS: {samples[0].rss_kib} KiB after cycle 1, {ref.rss_kib} after cycle {REFERENCE_CYCLE}, "
          f"{last.rss_kib} after cycle {last.cycle} ({last.rss_kib - ref.rss_kib:+d} KiB), "
          f"at most {max(s.rss_kib for s in samples)}")
    if last.fds != ref.fds:
        print(f"fd leak: {ref.fd_list} -> {last.fd_list}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
