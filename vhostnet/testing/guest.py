"""A backend process and a real QEMU guest, for the tests and scripts that
kill one under the other (tests/test_qemu_backend.py, scripts/reconnect_*.py).

    Lines        a pipe read by a thread; every line kept with its arrival
                 time, and `wait()` blocks on a condition until a line
                 matches (never sleep-and-hope)
    Backend      `python -m vhostnet serve` as a child process, its log in Lines
    Guest        qemu-system-x86_64 booting the test image (qemu/build/), its
                 console and stderr in Lines
    fd_count(), rss_kib()   what /proc says about a process

U-Boot guests (at their prompt within a second or two under TCG, where
Linux needs several) are vhostnet/testing/uboot.py's `UBoot`, which has the
same kill() and fallback.

The guest runs qemu/init's modes; LOOP=N is the one made for this: steady
pings (0.1 s) and TCP connections (0.5 s) to the gateway for N seconds.
Times are time.monotonic() at arrival: a line reaches us within a
millisecond or so of being written, which is far below what is measured.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from vhostnet.launch import qemu

__all__ = ["Lines", "Backend", "Guest", "fd_count", "rss_kib"]

ROOT = Path(__file__).resolve().parents[2]
FALLBACK = "falling back on userspace virtio"
PING_REPLY = re.compile(r"bytes from 10\.0\.2\.2: seq=(\d+)")


class Lines:
    """Lines of a pipe, with their arrival times, filled by a daemon thread."""

    def __init__(self, stream, echo=None):
        self.lines: list[tuple[float, str]] = []
        self.raw = ""           # everything, partial last line included (prompts have no newline)
        self.cond = threading.Condition()
        self.closed = False
        self._echo = echo
        self._thread = threading.Thread(target=self._read, args=(stream.fileno(),), daemon=True)
        self._thread.start()

    def _read(self, fd: int) -> None:
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            now = time.monotonic()
            parts = (tail + chunk).split(b"\n")
            tail = parts.pop()
            with self.cond:
                self.raw += chunk.decode(errors="replace")
                for raw in parts:
                    self.lines.append((now, raw.decode(errors="replace").rstrip("\r")))
                self.cond.notify_all()
            if self._echo is not None:
                for raw in parts:
                    print(raw.decode(errors="replace").rstrip("\r"), file=self._echo, flush=True)
        with self.cond:
            if tail:
                self.lines.append((time.monotonic(), tail.decode(errors="replace")))
            self.closed = True
            self.cond.notify_all()

    def wait_raw(self, text: str, start: int = 0, timeout: float = 30.0) -> int:
        """Wait until TEXT appears in the raw stream at or after offset START
        (for prompts, which end no line); the offset just past it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                k = self.raw.find(text, start)
                if k >= 0:
                    return k + len(text)
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise TimeoutError(f"no {text!r} in the output; last:\n{self.raw[-1500:]}")
                self.cond.wait(left)

    def find(self, pattern: str | re.Pattern, after: float = 0.0) -> tuple[float, str] | None:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        with self.cond:
            for t, line in self.lines:
                if t >= after and rx.search(line):
                    return t, line
        return None

    def wait(self, pattern: str | re.Pattern, after: float = 0.0, timeout: float = 30.0) -> tuple[float, str]:
        """The first line at or after AFTER matching PATTERN; TimeoutError if none comes."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for t, line in self.lines[seen:]:
                    if t >= after and rx.search(line):
                        return t, line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise TimeoutError(f"no line matching {rx.pattern!r} "
                                       f"({'stream closed' if self.closed else f'{timeout:g} s'}); "
                                       f"last lines:\n" + "\n".join(l for _, l in self.lines[-15:]))
                self.cond.wait(left)

    def text(self) -> str:
        with self.cond:
            return "\n".join(line for _, line in self.lines)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Backend:
    """`python -m vhostnet serve --socket SOCK` as a child; log lines in .log."""

    def __init__(self, sock: str | os.PathLike, *extra: str, log_level: str = "debug",
                 pass_fds=(), echo=None):
        self.sock = str(sock)
        self.ctl = self.sock + ".ctl"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "vhostnet", "serve", "--socket", self.sock,
                                      "--log-level", log_level, *extra], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=pass_fds)
        self.log = Lines(self.proc.stderr, echo)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def listening(self, timeout: float = 30.0) -> float:
        return self.log.wait(r"vhostnet\.server: listening on", self.started, timeout)[0]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Guest:
    """QEMU booting the test image with GUEST_VARS, NIC on SOCK; console in .console."""

    def __init__(self, sock: str | os.PathLike, guest_vars: dict, *, reconnect: int | None = None,
                 append: str = "", echo=None, accel: str = "tcg"):
        image = qemu.find_image()
        self.argv = qemu.qemu_argv(sock, image=image, guest_vars=guest_vars, append=append,
                                   accel=accel, reconnect=reconnect)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.console = Lines(self.proc.stdout, echo)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    @property
    def fallback(self) -> bool:
        """QEMU said it fell back on userspace virtio (the NIC skipped us)."""
        return self.console.find(FALLBACK) is not None

    def tail(self, n: int = 15) -> str:
        with self.console.cond:
            return "\n".join("    " + line for _, line in self.console.lines[-n:])

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def ping_replies(self, after: float = 0.0) -> list[tuple[float, int]]:
        out = []
        with self.console.cond:
            for t, line in self.console.lines:
                m = PING_REPLY.search(line)
                if m and t >= after:
                    out.append((t, int(m.group(1))))
        return out

