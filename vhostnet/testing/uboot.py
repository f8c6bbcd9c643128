"""U-Boot in QEMU with its NIC on a vhostnet backend, driven over the serial console.

U-Boot's virtio-net driver is the small-driver case of the device: it
negotiates only MAC, uses the 10-byte header on legacy devices, posts 32 RX
buffers of 1526 bytes and polls.  Debian's `u-boot-qemu` ships the builds
(/usr/lib/u-boot/): qemu-x86_64 (u-boot.rom as -bios; virtio-pci) and
qemu_arm64 (u-boot.bin as -bios of a `virt` board; virtio-mmio).

    with uboot_session("q35", legacy=True, backend_args=["--log-level", "debug"]) as u:
        u.static_ip()
        alive, out = u.ping("10.0.2.2")
        assert alive, out
        print(u.command("dhcp", timeout=20))    # once the backend serves DHCP

`uboot_session()` starts `python -m vhostnet serve --socket S --once` (this
checkout's code, its log in the work directory), waits for its socket,
starts QEMU with the flags of vhostnet/launch/qemu.py (shared memfd RAM, the
NIC on the chosen transport, legacy or modern), stops U-Boot's autoboot,
runs `virtio scan` (x86's U-Boot finds no NIC without it) and hands over a
`UBoot` at the `=> ` prompt.  Leaving it ends QEMU, then the
backend, and raises `UBootError` if QEMU fell back on userspace virtio or the
backend logged a traceback.

`u.backend.request("inspect")` (or "stats") asks the backend, over its
control socket, what the driver negotiated and what went through.

Without `uboot_session()`, `UBoot(uboot_argv(...))` is the QEMU alone, for
callers that keep their own backend (vhostnet/testing/restarts.py kills it
with kill(), SIGKILL, mid-ping).

`UBoot` talks to the console through QEMU's stdin/stdout (`-serial stdio`,
no monitor).  A reader thread appends everything to a buffer (and a log
file) and wakes waiters; `expect()` waits for a regex past the current
position with a deadline.  Commands are typed in short chunks, each
waited for in U-Boot's echo: U-Boot polls a 16-byte UART FIFO, so a whole
line written at once can lose characters.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from vhostnet.launch import qemu
from vhostnet.observe.control import ControlClient

UBOOT_DIR = Path("/usr/lib/u-boot")
UBOOT_PACKAGE = "u-boot-qemu"
# Our machine name -> (directory under UBOOT_DIR, file given as -bios).
FIRMWARE = {
    "q35": ("qemu-x86_64", "u-boot.rom"),
    "virt-aarch64": ("qemu_arm64", "u-boot.bin"),
}
# Debian's qemu-x86_64 U-Boot carries the i440fx device tree, whose PCH node
# sits at 00:01.0; on q35 a NIC in slot 1 is taken for it and never probed.
X86_NIC_SLOT = 3
PROMPT = "=> "
# The prompt at a line start: crc32 prints "... ==> 1a2b3c4d" mid-line.
PROMPT_AT_LINE_START = r"(?m)^" + re.escape(PROMPT)
AUTOBOOT = "Hit any key to stop autoboot"
ECHO_CHUNK = 8              # characters typed before waiting for their echo
BOOT_TIMEOUT = 60.0         # seconds from QEMU's start to the first prompt
COMMAND_TIMEOUT = 10.0
SOCKET_TIMEOUT = 15.0       # seconds for the backend to listen
STOP_GRACE = 5.0
FALLBACK = "falling back on userspace virtio"

# The QEMU user-net addressing the backend serves (README: 10.0.2.15/24).
GUEST_IP = "10.0.2.15"
NETMASK = "255.255.255.0"
GATEWAY = "10.0.2.2"

REPO_ROOT = Path(__file__).resolve().parents[2]


class UBootError(RuntimeError):
    """U-Boot did not answer as expected; the message holds the console tail."""


def firmware(machine: str) -> Path:
    """The U-Boot image for MACHINE, or UBootError naming the package."""
    try:
        sub, name = FIRMWARE[machine]
    except KeyError:
        raise UBootError(f"no U-Boot build for the {machine} machine here "
                         f"(have: {', '.join(FIRMWARE)})") from None
    path = UBOOT_DIR / sub / name
    if not path.is_file():
        raise UBootError(f"{path} is missing (install Debian's {UBOOT_PACKAGE})")
    return path


def missing(machine: str = "q35") -> str | None:
    """Why U-Boot on MACHINE cannot run here (no QEMU, no firmware), or None:
    the skip reason of the tests and scripts that boot it."""
    m = qemu.machine(machine)
    if shutil.which(m.qemu) is None:
        return f"{m.qemu} is not installed (Debian package {m.package}; scripts/setup.sh)"
    try:
        firmware(machine)
    except UBootError as e:
        return str(e)
    return None


def uboot_argv(machine: str, socket: str | os.PathLike | None, *, legacy: bool | None,
               transport: str | None = None, netdev: str = "vhost-user",
               memory: str = qemu.DEFAULT_MEMORY, mac: str = qemu.DEFAULT_MAC) -> list[str]:
    """QEMU running U-Boot as its firmware with one virtio-net NIC.

    The console is QEMU's stdio without a monitor (-serial stdio -monitor
    none), so every byte we write reaches U-Boot.  LEGACY as in
    qemu.nic_args: on PCI, U-Boot binds a transitional device with its
    legacy driver, so the modern case needs LEGACY=False (disable-legacy=on).
    """
    m = qemu.machine(machine)
    transport = qemu.transport_of(m, transport)
    slot = X86_NIC_SLOT if m.name == "q35" else None
    return [m.qemu, *qemu.accel_args("tcg", m), *qemu.memory_args(memory, m),
            "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-no-reboot", *qemu.nic_args(socket, mac, netdev, transport, legacy, slot),
            "-bios", str(firmware(machine))]


class UBoot:
    """One QEMU running U-Boot; the console as expect/command."""

    def __init__(self, argv: Sequence[str], log: Path | None = None,
                 backend: "Backend | None" = None):
        self.argv = list(argv)
        self.log_path = log
        self.backend = backend          # the vhostnet serving the NIC, if any
        self.buf = ""
        self.pos = 0                    # expect() searches from here
        self.eof = False
        self.fallback = False
        self.boot_seconds: float | None = None
        self._cond = threading.Condition()
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        log = open(self.log_path, "w") if self.log_path else None
        try:
            while True:
                data = os.read(self.proc.stdout.fileno(), 65536)
                if not data:
                    break
                text = data.decode(errors="replace").replace("\r", "")
                if log:
                    log.write(text)
                    log.flush()
                with self._cond:
                    self.buf += text
                    if FALLBACK in self.buf[-len(text) - len(FALLBACK):]:
                        self.fallback = True
                    self._cond.notify_all()
        finally:
            if log:
                log.close()
            with self._cond:
                self.eof = True
                self._cond.notify_all()

    # --- the console

    def expect(self, pattern: str, timeout: float = COMMAND_TIMEOUT) -> re.Match:
        """Wait for regex PATTERN in the output past the last match; move past it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self.buf, self.pos)
                if m:
                    self.pos = m.end()
                    return m
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    why = "QEMU exited" if self.eof else f"{timeout:.0f} s passed"
                    raise UBootError(f"{why} before U-Boot printed /{pattern}/; console tail:\n"
                                     + self.tail())
                self._cond.wait(left)

    def tail(self, n: int = 15) -> str:
        return "\n".join("    " + line for line in self.buf.splitlines()[-n:])

    def write(self, text: str) -> None:
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise UBootError("QEMU's console is closed; console tail:\n" + self.tail()) from None

    def type(self, text: str) -> None:
        """Type TEXT in chunks, waiting for U-Boot to echo each one."""
        for i in range(0, len(text), ECHO_CHUNK):
            chunk = text[i:i + ECHO_CHUNK]
            self.write(chunk)
            self.expect(re.escape(chunk))

    def stop_autoboot(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for the autoboot countdown (or a prompt), stop it with a key,
        and wait for the prompt.  Returns seconds from QEMU's start."""
        self.expect(f"{re.escape(AUTOBOOT)}|{re.escape(PROMPT)}", timeout)
        self.write("\r")
        self.expect(re.escape(PROMPT), COMMAND_TIMEOUT)
        self.boot_seconds = time.monotonic() - self._t0
        return self.boot_seconds

    def command(self, cmd: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run CMD at the prompt; its output, up to the next prompt."""
        self.type(cmd)
        self.write("\r")
        start = self.expect("\n").end()
        end = self.expect(PROMPT_AT_LINE_START, timeout)
        return self.buf[start:end.start()]

    def start(self, cmd: str) -> None:
        """Type CMD and Enter without waiting for its prompt: for a command
        the caller interrupts (kill() in the middle of a ping)."""
        self.type(cmd)
        self.write("\r")

    # --- network helpers

    def static_ip(self, ip: str = GUEST_IP, netmask: str = NETMASK, gateway: str = GATEWAY,
                  server: str = GATEWAY) -> None:
        """The QEMU user-net addressing, without DHCP."""
        self.command(f"setenv ipaddr {ip}; setenv netmask {netmask}; "
                     f"setenv gatewayip {gateway}; setenv serverip {server}")

    def ping(self, host: str = GATEWAY, timeout: float = 20.0) -> tuple[bool, str]:
        """`ping HOST`: (alive?, U-Boot's output)."""
        out = self.command(f"ping {host}", timeout)
        return f"host {host} is alive" in out, out

    # --- the end

    def kill(self) -> None:
        """SIGKILL QEMU at once, as a crash would: no goodbye to the backend."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(STOP_GRACE)
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()

    def close(self) -> int | None:
        """End QEMU: `poweroff` is not in every build, so SIGTERM, then SIGKILL."""
        p = self.proc
        with contextlib.suppress(OSError, ValueError):
            p.stdin.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if p.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(STOP_GRACE)
        self._reader.join(STOP_GRACE)
        return p.poll()


@dataclass
class Backend:
    """`vhostnet serve --once` on SOCKET, this checkout's code, log in LOG."""
    socket: Path
    log: Path
    args: Sequence[str] = ()

    def __post_init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "vhostnet", "serve", "--socket", str(self.socket), "--once",
                *self.args]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise UBootError(f"the backend exited with status {self.proc.returncode}:\n"
                                 + self.log.read_text(errors="replace")[-2000:])
            if time.monotonic() > deadline:
                self.stop()
                raise UBootError(f"the backend did not listen on {self.socket} "
                                 f"within {SOCKET_TIMEOUT:.0f} s")
            time.sleep(0.02)

    def stop(self) -> int | None:
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.proc.wait(STOP_GRACE)
        return self.proc.poll()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def request(self, cmd: str, **kw) -> dict:
        """A control-socket request (`inspect`, `stats`; docs/json.md)."""
        with ControlClient(str(self.socket) + ".ctl") as c:
            return c.request(cmd, **kw)


def check_fallback(u: UBoot, error: type[UBootError] = UBootError) -> None:
    """ERROR if QEMU said it fell back on userspace virtio."""
    if u.fallback:
        raise error("QEMU fell back on userspace virtio: the NIC did not use vhostnet")


def end_session(u: UBoot | None, backend: Backend | None, tmp: Path,
                error: type[UBootError] = UBootError) -> None:
    """End a session's QEMU, then its backend, and remove TMP; ERROR if the
    backend logged a traceback (uboot_session, ipxe.ipxe_session)."""
    try:
        if u is not None:
            u.close()
        if backend is not None:
            backend.stop()
            if "Traceback (most recent call last)" in backend.text():
                raise error(f"the backend logged a traceback:\n{backend.text()[-3000:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def uboot_session(machine: str = "q35", *, legacy: bool | None = None,
                  transport: str | None = None, backend_args: Sequence[str] = (),
                  netdev: str = "vhost-user", workdir: Path | None = None,
                  boot_timeout: float = BOOT_TIMEOUT) -> Iterator[UBoot]:
    """A vhostnet backend and U-Boot on MACHINE, at the prompt (see module doc).

    BACKEND_ARGS go to `vhostnet serve` (e.g. --disable-feature ...).
    NETDEV "user" boots on QEMU's slirp instead, without a backend.  Logs
    (console.log, backend.log, qemu.cmd) go to WORKDIR when given.
    """
    tmp = Path(tempfile.mkdtemp(prefix="vhostnet-uboot-"))     # short path for AF_UNIX
    logs = workdir or tmp
    logs.mkdir(parents=True, exist_ok=True)
    sock = tmp / "vhost.sock"
    backend = u = None
    try:
        argv = uboot_argv(machine, sock, legacy=legacy, transport=transport, netdev=netdev)
        if shutil.which(argv[0]) is None:
            raise UBootError(f"{argv[0]} not found (Debian package {qemu.machine(machine).package})")
        (logs / "qemu.cmd").write_text(qemu.format_argv(argv) + "\n")
        if netdev == "vhost-user":
            backend = Backend(sock, logs / "backend.log", backend_args)
        u = UBoot(argv, logs / "console.log", backend)
        u.stop_autoboot(boot_timeout)
        # x86's U-Boot probes PCI virtio devices only when asked: without
        # this its net commands say "No ethernet found".
        u.command("virtio scan")
        yield u
        check_fallback(u)
    finally:
        end_session(u, backend, tmp)
