"""Multiqueue with a real Linux guest and a real QEMU (VIRTIO_NET_F_MQ, issue 11).

- two pairs: qemu/smoke.py boots the guest with -netdev vhost-user,queues=2,
  virtio-net-pci,mq=on,vectors=0 (INTx: MSI-X crashes QEMU 7.2 under TCG),
  -smp 2, and `serve --queues 2`; the guest's MQ_TEST runs a TCP echo pinned
  to each CPU after `ethtool -L eth0 combined 2` and again after `combined 1`,
  and checks its per-queue counters (ethtool -S). The backend's own count of
  chains per ring must show both pairs used. Split and packed rings.
- too many pairs: QEMU with queues=4 against `serve --queues 2` gives up after
  GET_QUEUE_NUM and reconnects as fast as it can; the backend must say which
  option to change exactly once for the whole storm, and keep its log bounded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhostnet.launch import qemu

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "qemu" / "smoke.py"
MQ = 22   # virtio 1.2 §5.1.3: VIRTIO_NET_F_MQ
RING_PACKED = 34   # virtio 1.2 §6
SMOKE_ENV_VARS = ["NET", "EXPECT_NET", "BACKEND", "BACKEND_ARGS", "ACCEL", "MACHINE", "TRANSPORT",
                  "LEGACY", "QUEUE_SIZE", "PACKED", "QUEUES", "ICMP_TEST", "TCP_ECHO_TEST", "UDP_ECHO_TEST",
                  "NET_LOOPBACK_TEST", "IPERF_TEST", "REDIS_TEST", "GIT_TEST", "MQ_TEST"]
QEMU_SHORT = "you are asking more queues than supported"

needs_qemu = pytest.mark.skipif(shutil.which(qemu.QEMU) is None, reason=f"{qemu.QEMU} is not installed")


def _chains(backend_log: str) -> dict[str, int]:
    """The backend's 'chains per queue: rx N, tx N, rx1 N...' line at disconnect."""
    m = re.search(r"chains per queue: (.*)", backend_log)
    assert m, "the backend logged no chains-per-queue line at disconnect"
    return {name: int(n) for name, n in (part.split() for part in m.group(1).split(", "))}


@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("packed", ["0", "1"], ids=["split", "packed"])
def test_linux_guest_two_pairs_ethtool(tmp_path, packed):
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in SMOKE_ENV_VARS}
    env.update(NET="1", BACKEND="vhostnet", QUEUES="2", MQ_TEST="1", UDP_ECHO_TEST="0", PACKED=packed)
    proc = subprocess.run([sys.executable, str(SMOKE), "--quiet", "--result-json", str(result)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert result.exists(), f"qemu/smoke.py gave no verdict (exit {proc.returncode}):\n{report}"
    verdict = json.loads(result.read_text())
    assert verdict["passed"], f"{verdict['problems']}\n{report}"
    assert verdict["queues"] == 2
    bits = verdict["guest_features"]
    assert bits and bits[MQ] == "1", f"the guest driver did not take VIRTIO_NET_F_MQ: {bits}"
    assert bits[RING_PACKED] == packed, bits
    console = Path(verdict["console_log"]).read_text(errors="replace")
    rounds = dict(re.findall(r"mq: combined (\d) (tx0 .*)", console))
    assert set(rounds) == {"1", "2"}, console[-2000:]
    # The backend's side: every ring of both pairs carried chains.
    chains = _chains(Path(verdict["backend_log"]).read_text(errors="replace"))
    assert all(chains.get(q, 0) > 0 for q in ("rx", "tx", "rx1", "tx1")), chains


@pytest.mark.qemu
@needs_qemu
def test_qemu_asking_for_more_pairs_gets_one_line(tmp_path):
    sock = tmp_path / "v.sock"
    log_path = tmp_path / "backend.log"
    with open(log_path, "wb") as out:
        backend = subprocess.Popen([sys.executable, "-m", "vhostnet", "serve", "--socket", str(sock),
                                    "--queues", "2", "--no-dns", "--no-control"],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    qemu_proc = None
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert backend.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        argv = [qemu.QEMU, "-accel", "tcg", *qemu.memory_args(), "-nodefaults", "-nographic", "-no-reboot",
                *qemu.nic_args(sock, queue_pairs=4)]
        qemu_proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)
        # The storm: wait until QEMU has given up STORM times (it says so each time).
        storm, seen = 30, 0
        deadline = time.monotonic() + 60
        while seen < storm:
            line = qemu_proc.stdout.readline()
            assert line or qemu_proc.poll() is None, "QEMU exited"
            seen += QEMU_SHORT in line
            assert time.monotonic() < deadline, f"QEMU gave up only {seen} times in 60 s"
    finally:
        if qemu_proc is not None:
            qemu_proc.kill()
            qemu_proc.wait()
        backend.terminate()
        backend.wait(10)
    text = log_path.read_text(errors="replace")
    told = [line for line in text.splitlines() if "start vhostnet with --queues" in line]
    assert len(told) == 1, text
    assert "-netdev vhost-user,...,queues=2" in told[0]
    assert "Traceback" not in text
    # Bounded: the connect/disconnect lines are rate-limited too (2 per connection otherwise).
    assert len(text.splitlines()) < storm, text
