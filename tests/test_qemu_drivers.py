"""Linux's virtio-net driver in the shapes hobby and legacy drivers take.

Each case boots the test guest once through qemu/smoke.py with NET=1 (ARP,
ping, ICMP sizes, 1 MiB TCP echo, TCP loopback through eth0; the UDP echo of
every size, which costs 2-25 s under TCG, only where checksums change: no
offloads) on a device made to look like one driver writers meet:

    q35-pci-legacy      virtio-pci with disable-modern=on: VERSION_1 never acked
    q35-no-mrg-1024     no MRG_RXBUF (one frame per RX chain), 1024-entry rings
    q35-no-offloads     no checksum or TSO offloads either way
    virt-aarch64-mmio-modern   the arm64 guest on virtio-mmio with
                        virtio-mmio.force-legacy=false
    q35-packed          packed virtqueues (packed=on): RING_PACKED negotiated

The arm64 guest on legacy virtio-mmio (QEMU's default) boots through
`vhostnet run --machine virt-aarch64` in tests/test_qemu_run.py.

Besides every marker, each case checks that the variant really happened:
the feature bits the guest's driver took (it prints them from sysfs) and,
for the ring size, the backend's own log of the rings it started.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vhostnet.launch import qemu

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "qemu" / "smoke.py"

# virtio 1.2 §5.1.3 (device feature bits) and §6 (reserved feature bits).
CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4, MRG_RXBUF, VERSION_1, RING_PACKED = 0, 1, 7, 11, 15, 32, 34
OFFLOADS = (CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4)

# name -> (smoke switches, bits that must be on, bits that must be off)
NO_UDP = {"UDP_ECHO_TEST": "0"}
CASES = {
    "q35-pci-legacy": ({"LEGACY": "1", **NO_UDP}, (MRG_RXBUF,), (VERSION_1,)),
    "q35-no-mrg-1024": ({"QUEUE_SIZE": "1024", **NO_UDP,
                         "BACKEND_ARGS": "--disable-feature mrg-rxbuf --log-level debug"},
                        (VERSION_1,), (MRG_RXBUF,)),
    "q35-no-offloads": ({"BACKEND_ARGS": "--disable-feature offloads"}, (VERSION_1,), OFFLOADS),
    "virt-aarch64-mmio-modern": ({"MACHINE": "virt-aarch64", "LEGACY": "0", **NO_UDP},
                                 (VERSION_1,), ()),
    "q35-packed": ({"PACKED": "1", **NO_UDP}, (VERSION_1, RING_PACKED, MRG_RXBUF), ()),
}
SMOKE_ENV_VARS = ["NET", "EXPECT_NET", "BACKEND", "BACKEND_ARGS", "ACCEL", "MACHINE", "TRANSPORT",
                  "LEGACY", "QUEUE_SIZE", "PACKED", "ICMP_TEST", "TCP_ECHO_TEST", "UDP_ECHO_TEST",
                  "NET_LOOPBACK_TEST", "IPERF_TEST", "REDIS_TEST", "GIT_TEST"]


def run_case(switches: dict, result: Path) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in SMOKE_ENV_VARS}
    env.update(NET="1", BACKEND="vhostnet", **switches)
    proc = subprocess.run([sys.executable, str(SMOKE), "--quiet", "--result-json", str(result)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    if not result.exists():
        pytest.fail(f"qemu/smoke.py gave no verdict (exit {proc.returncode}):\n{report}")
    return json.loads(result.read_text()), report


@pytest.mark.qemu
@pytest.mark.parametrize("name", list(CASES))
def test_linux_driver_variant(name, tmp_path, record_property):
    switches, on, off = CASES[name]
    m = qemu.machine(switches.get("MACHINE", "q35"))
    if shutil.which(m.qemu) is None:
        pytest.skip(f"{m.qemu} is not installed (Debian package {m.package}; scripts/setup.sh)")
    verdict, report = run_case(switches, tmp_path / "result.json")
    where = f"\nconsole log: {verdict['console_log']}\nbackend log: {verdict['backend_log']}\n\n{report}"
    record_property("guest_seconds", round(verdict["guest_seconds"], 1))
    record_property("init_start_seconds", verdict["markers"].get("init: start"))
    assert verdict["passed"], f"{name}:\n  " + "\n  ".join(verdict["problems"]) + where
    bits = verdict["guest_features"]
    assert bits and set(bits) <= {"0", "1"}, f"the guest printed no feature bits{where}"
    assert all(bits[b] == "1" for b in on), f"bits {on} should be on in {bits}"
    assert all(bits[b] == "0" for b in off), f"bits {off} should be off in {bits}"
    # Linux's driver in this variant breaks no rule the conformance checker knows
    # (the backend logs one "finding ..." line per rule broken when QEMU disconnects).
    log = Path(verdict["backend_log"]).read_text(errors="replace")
    findings = [line for line in log.splitlines() if ": finding MUST " in line or ": finding SHOULD " in line]
    assert findings == [], "\n".join(findings) + where
    if "QUEUE_SIZE" in switches:
        log = Path(verdict["backend_log"]).read_text()
        size = switches["QUEUE_SIZE"]
        for ring in ("rx", "tx"):
            assert f"{ring} started (size {size}," in log, f"the backend never started a {size}-entry {ring} ring{where}"
