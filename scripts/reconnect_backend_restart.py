#!/usr/bin/env python3
"""reconnect_backend_restart.py: the backend killed with SIGKILL under a live
QEMU (-chardev socket,...,reconnect=1) during the guest's ping loop, and
started again; where the time from "listening again" to traffic goes.

    python3 scripts/reconnect_backend_restart.py          # 3 runs
    python3 scripts/reconnect_backend_restart.py -n 5

Each run boots the Linux test image in LOOP mode (pings every 0.1 s, a new
TCP echo connection every 0.5 s), waits for five replies, kills the
backend, waits until the guest saw its carrier go and QEMU's first retry
was refused, then starts a new backend with --pcap. The steps come from
the new backend's log (listening, connected, rings started), the guest's
console (carrier, ping replies, tcp-echo lines) and the pcap (ARP, ICMP),
all on one clock (vhostnet/testing/restarts.py; the same as
tests/test_qemu_backend.py). Needs qemu-system-x86 and the test image.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vhostnet.testing.restarts import backend_restart  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--runs", type=int, default=3)
    args = p.parse_args()
    runs = []
    for k in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="vnb-", dir="/tmp"))
        try:
            tl, _, _ = backend_restart(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs.append(tl.breakdown())
        print(f"run {k + 1}: ping seq {tl.seq_before} -> {tl.seq_after}, ring errors {tl.errors or 'none'}",
              flush=True)
    names = [name for name, _ in runs[0]]
    print(f"\n{'step (ms)':64s}" + "".join(f"{'run ' + str(k + 1):>9s}" for k in range(len(runs)))
          + f"{'median':>9s}")
    for i, name in enumerate(names):
        vals = [r[i][1] for r in runs]
        cells = "".join(f"{'-' if v is None else f'{v * 1000:.0f}':>9s}" for v in vals)
        known = [v for v in vals if v is not None]
        med = f"{statistics.median(known) * 1000:.0f}" if known else "-"
        print(f"{name:64s}{cells}{med:>9s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
