#!/usr/bin/env python3
"""bench_boot.py: how long each driver case takes to boot on vhostnet, under TCG.

    python3 scripts/bench_boot.py              # every case once
    python3 scripts/bench_boot.py --repeat 3   # median of 3
    python3 scripts/bench_boot.py --only uboot

U-Boot cases (vhostnet/testing/uboot.py): seconds from QEMU's start to the
first `=> ` prompt, and for the whole session (prompt, virtio scan, static
IP, `ping 10.0.2.2`, QEMU and backend stopped).

Linux cases (qemu/smoke.py, ICMP and TCP echo only, so the boot dominates):
seconds from QEMU's start to `init: start` (kernel + initramfs), to
`net: virtio-net ready` (modules loaded, eth0 up), and to power-off.

The load column is the host's 1-minute load average when the case ended:
other work on the machine slows TCG down, so compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vhostnet.testing import uboot  # noqa: E402

UBOOT_CASES = [("q35", True), ("q35", False), ("virt-aarch64", True), ("virt-aarch64", False)]
QUICK = {"UDP_ECHO_TEST": "0", "NET_LOOPBACK_TEST": "0"}
LINUX_CASES = {
    "q35 pci (transitional)": {},
    "q35 pci legacy": {"LEGACY": "1"},
    "q35 no-mrg, 1024 rings": {"QUEUE_SIZE": "1024", "BACKEND_ARGS": "--disable-feature mrg-rxbuf"},
    "q35 no offloads": {"BACKEND_ARGS": "--disable-feature offloads"},
    "virt-aarch64 mmio legacy": {"MACHINE": "virt-aarch64"},
    "virt-aarch64 mmio modern": {"MACHINE": "virt-aarch64", "LEGACY": "0"},
}


def load() -> float:
    return os.getloadavg()[0]


def uboot_case(machine: str, legacy: bool) -> list[float]:
    t0 = time.monotonic()
    with uboot.uboot_session(machine, legacy=legacy) as u:
        u.static_ip()
        alive, out = u.ping()
        if not alive:
            raise SystemExit(f"U-Boot {machine} legacy={legacy}: ping failed:\n{out}")
        prompt = u.boot_seconds
    return [prompt, time.monotonic() - t0]


def linux_case(switches: dict) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        env = {**os.environ, "NET": "1", "BACKEND": "vhostnet", **QUICK, **switches,
               "PYTHONPATH": str(ROOT)}
        p = subprocess.run([sys.executable, str(ROOT / "qemu" / "smoke.py"), "--quiet",
                            "--result-json", str(result)], env=env, cwd=ROOT,
                           capture_output=True, text=True)
        if not result.exists() or not json.loads(result.read_text())["passed"]:
            raise SystemExit(f"smoke {switches} failed:\n{p.stdout[-3000:]}")
        v = json.loads(result.read_text())
    m = v["markers"]
    return [m["init: start"], m["net: virtio-net ready"], v["guest_seconds"]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=1, help="runs per case; the median is shown")
    p.add_argument("--only", choices=["uboot", "linux"])
    args = p.parse_args()
    if args.only != "linux":
        print(f"{'U-Boot case':28} {'prompt s':>9} {'session s':>10} {'load':>5}")
        for machine, legacy in UBOOT_CASES:
            runs = [uboot_case(machine, legacy) for _ in range(args.repeat)]
            med = [statistics.median(col) for col in zip(*runs)]
            name = f"{machine} {'legacy' if legacy else 'modern'}"
            print(f"{name:28} {med[0]:9.2f} {med[1]:10.2f} {load():5.1f}", flush=True)
        print()
    if args.only != "uboot":
        print(f"{'Linux case':28} {'init s':>7} {'eth0 s':>7} {'total s':>8} {'load':>5}")
        for name, switches in LINUX_CASES.items():
            runs = [linux_case(switches) for _ in range(args.repeat)]
            med = [statistics.median(col) for col in zip(*runs)]
            print(f"{name:28} {med[0]:7.1f} {med[1]:7.1f} {med[2]:8.1f} {load():5.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
