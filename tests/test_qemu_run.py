"""`vhostnet run` with real guests: --shell through a pty, and --machine virt-aarch64.

--shell: the test guest boots to a shell on its console with eth0 up and the
applications on PATH; we type into the pty as a user would (the terminal is
raw, so the guest echoes), check that a command runs, that the tools are
there and that the network answers, then leave the shell: the guest powers
off and `vhostnet run` exits 0 with nothing left behind.
"""
from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time

import pytest

from vhostnet.launch import qemu

PROMPT = b"guest# "
VERSION_1 = 32      # virtio 1.2 §6: the device is not legacy


class Pty:
    """A child process on a pty; read_until waits for bytes with a deadline."""

    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execv(argv[0], argv)
        self.out = b""

    def read_until(self, pattern: bytes, timeout: float = 60) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.out)
            if m:
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} within {timeout} s; output:\n" + self.text()[-3000:]
            if select.select([self.fd], [], [], min(left, 0.2))[0]:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:       # the child closed the pty
                    data = b""
                if not data:
                    assert rx.search(self.out), f"EOF before {pattern!r}:\n" + self.text()[-3000:]
                self.out += data

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.out += os.read(self.fd, 65536)
                except OSError:
                    pass
        raise AssertionError("vhostnet run did not exit; output:\n" + self.text()[-3000:])

    def text(self) -> str:
        return self.out.decode(errors="replace")

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def needs(machine: str) -> None:
    m = qemu.machine(machine)
    if shutil.which(m.qemu) is None:
        pytest.skip(f"{m.qemu} is not installed (Debian package {m.package})")


@pytest.mark.qemu
def test_run_shell(tmp_path):
    needs("q35")
    qemu.find_image().with_apps()     # built at session start (tests/conftest.py)
    p = Pty([sys.executable, "-m", "vhostnet", "run", "--shell", "--accel", "tcg",
             "--log-level", "warning"])
    try:
        p.read_until(b"init: shell ready")
        p.read_until(PROMPT)
        p.type("echo $((6 * 7)) is the answer")
        p.read_until(rb"\n42 is the answer")
        p.type("for t in ping wget iperf3 redis-cli git; do command -v $t || echo missing $t; done")
        p.read_until(rb"/usr/bin/git\s+\S*" + PROMPT)
        assert not re.search(rb"\nmissing \S", p.out), p.text()[-1500:]
        p.type("git --version; iperf3 --version | head -n 1; redis-cli --version")
        p.read_until(rb"redis-cli \d+\.\d+")
        p.type("ping -c 1 -W 3 10.0.2.2")
        p.read_until(rb"1 packets transmitted, 1 packets received")
        p.type("exit")
        status = p.wait()
        assert b"init: done" in p.out and b"Power down" in p.out, p.text()[-1500:]
        assert status == 0, p.text()[-1500:]
    finally:
        p.close()
    assert b"Traceback" not in p.out


@pytest.mark.qemu
def test_run_machine_virt_aarch64():
    """`vhostnet run --machine virt-aarch64` boots the arm64 test guest on
    virtio-mmio (legacy, QEMU's default: VERSION_1 must stay off) through
    vhostnet, and its network checks pass."""
    needs("virt-aarch64")
    r = subprocess.run(["bash", "scripts/build-guest.sh"], env={**os.environ, "GUEST_ARCH": "arm64"},
                       cwd=qemu.REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    p = subprocess.run([sys.executable, "-m", "vhostnet", "run", "--machine", "virt-aarch64", "--accel", "tcg",
                        "--log-level", "warning", "--append",
                        "vhostnet.UDP_ECHO_TEST=0 vhostnet.NET_LOOPBACK_TEST=0"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    out = p.stdout.replace("\r", "")
    assert p.returncode == 0, out[-2000:] + p.stderr[-2000:]
    for marker in ("net: virtio-net ready", "net: ping ok", "icmp: ok", "tcp-echo: ok", "init: 0 failure(s)"):
        assert marker in out, f"no {marker!r}:\n{out[-2000:]}"
    assert "virt-aarch64 (mmio)" in p.stderr
    bits = re.search(r"net: virtio features ([01]+)", out).group(1)
    assert bits[VERSION_1] == "0", bits
