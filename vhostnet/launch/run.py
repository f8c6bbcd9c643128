"""Running the backend, alone (`serve`) or with a QEMU guest (`run`), and QEMU's flags.

`serve_backend()` is the backend as one trio task group: the vhost-user
server, the control socket, and (with --pcap) a flush loop for the capture
file. `vhostnet serve` runs just that; `vhostnet run` runs it in the same
process and trio run as QEMU's supervision:

    temp dir (vhost.sock, vhost.sock.ctl) -> backend listening -> QEMU
    started (own session, so a terminal's Ctrl-C reaches only us) -> its
    stdout/stderr copied to ours, stderr scanned for the vhost-user fallback
    warning -> QEMU exits (guest poweroff or crash), or Ctrl-C / SIGTERM /
    the fallback warning makes us end it (SIGTERM, then SIGKILL after
    KILL_AFTER s) -> the backend's nursery is cancelled: sockets unlinked,
    guest memory unmapped -> temp dir removed.

Exit status: QEMU's own (128 + N if a signal N killed it), 128 + N if
signal N made us stop it, 1 if QEMU fell back on userspace virtio (the NIC
silently stopped using the backend: never a success).

QEMU flags come from vhostnet/qemu.py; this module only adds the choice
between our test image and the user's own boot arguments.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile

import trio

from vhostnet.launch import qemu
from vhostnet.launch.serve import serve_backend

__all__ = ["attach_flags", "run_guest", "RunError", "uses_own_boot",
           "FALLBACK", "parse_mem"]

FALLBACK = "falling back on userspace virtio"
KILL_AFTER = 5.0
# QEMU options that mean "I boot my own guest": then our image is not added.
OWN_BOOT = {"-kernel", "-drive", "-hda", "-hdb", "-cdrom", "-blockdev", "-bios", "-pflash",
            "-boot", "-fda", "-device-tree"}
_MEM = re.compile(r"^[1-9][0-9]*[KMGT]?$", re.I)
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.I)


class RunError(Exception):
    """A user-facing problem before anything started (message says what to do)."""


def parse_mem(size: str) -> str:
    if not _MEM.match(size):
        raise RunError(f"memory size {size!r} is not like 256M, 1G or 536870912")
    return size.upper()


def check_mac(mac: str) -> str:
    if not _MAC.match(mac):
        raise RunError(f"MAC {mac!r} is not like 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise RunError(f"MAC {mac} is a multicast address; a NIC needs a unicast one")
    return mac.lower()


def attach_flags(socket: str, mem: str = qemu.DEFAULT_MEMORY, mac: str = qemu.DEFAULT_MAC,
                 machine: str = "q35", transport: str | None = None,
                 legacy: bool | None = None) -> list[str]:
    """The QEMU flags that attach a guest's NIC to a backend on SOCKET: the
    machine's shared-memory RAM and the NIC on TRANSPORT (see qemu.nic_args
    for LEGACY)."""
    try:
        m = qemu.machine(machine)
        transport = qemu.transport_of(m, transport)
    except ValueError as e:
        raise RunError(str(e)) from None
    return qemu.memory_args(parse_mem(mem), m) + qemu.nic_args(socket, check_mac(mac), "vhost-user",
                                                              transport, legacy)


def machine_note(machine: str) -> str:
    """One line: the QEMU binary MACHINE needs, and its Debian package."""
    m = qemu.machine(machine)
    cpu = f"; under TCG add {' '.join(m.tcg_cpu)}" if m.tcg_cpu else ""
    return f"# {m.name}: run {m.qemu} (Debian package {m.package}) with these flags{cpu}"


@contextlib.contextmanager
def raw_terminal(on: bool):
    """Our terminal (stdin) in raw mode while ON: every key, Ctrl-C included,
    goes to the guest's console, and the guest does the echoing.  Restored
    on the way out, whatever happens."""
    if not on:
        yield
        return
    import termios
    import tty
    saved = termios.tcgetattr(0)
    try:
        tty.setraw(0)
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def uses_own_boot(extra: list[str]) -> bool:
    return any(a.split("=", 1)[0] in OWN_BOOT for a in extra)


# -- run: backend + QEMU ---------------------------------------------------------

def _write(f, data: bytes) -> None:
    try:
        f.write(data)
        f.flush()
    except (BrokenPipeError, ValueError):
        pass


class _Guest:
    """One QEMU process under supervision."""

    def __init__(self, argv: list[str], err, out):
        self.argv = argv
        self.out, self.err = out, err
        self.proc: trio.Process | None = None
        self.stop_reason: str | None = None
        self.stop_status: int | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, forward_stdin: bool) -> int:
        import subprocess
        if self.stop_reason is not None:   # interrupted before QEMU started
            return self.stop_status
        self.proc = await trio.lowlevel.open_process(
            self.argv, stdin=subprocess.PIPE if forward_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if forward_stdin:
                    nursery.start_soon(self._stdin)
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._pump, self.proc.stdout, self.out, False)
                    pumps.start_soon(self._pump, self.proc.stderr, self.err, True)
                    await self.proc.wait()
                    # Copy what QEMU wrote last, but never hang on a process
                    # that inherited its pipes.
                    pumps.cancel_scope.deadline = trio.current_time() + 1
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self.stop()
        if self.stop_status is not None:
            return self.stop_status
        rc = self.proc.returncode
        return 128 - rc if rc < 0 else rc

    def request_stop(self, reason: str, status: int) -> None:
        """Note why we end QEMU, and end it (in the background)."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_status = reason, status
        if self._nursery is not None:
            self._nursery.start_soon(self.stop)

    async def _pump(self, stream, out, scan: bool) -> None:
        tail = b""
        needle = FALLBACK.encode()
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            _write(out, chunk)
            if scan:
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()[-4096:]
                if any(needle in line for line in lines):
                    self.request_stop("fallback", 1)

    async def _stdin(self) -> None:
        """Our terminal's input to QEMU's console. Waits with epoll and reads
        only when data is there: no thread stuck in read() at exit, and the
        terminal's file status flags (O_NONBLOCK) stay as they were."""
        try:
            while True:
                await trio.lowlevel.wait_readable(0)
                data = os.read(0, 4096)
                if not data:
                    await self.proc.stdin.aclose()
                    return
                await self.proc.stdin.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return

    async def stop(self) -> None:
        """End QEMU if it still runs: SIGTERM, then SIGKILL after KILL_AFTER s."""
        p = self.proc
        if p is None or p.returncode is not None:
            return
        p.terminate()
        with trio.move_on_after(KILL_AFTER):
            await p.wait()
            return
        p.kill()
        await p.wait()


async def run_guest(server, control, argv: list[str], *, pcap_tap=None, forward_stdin: bool = False,
                    say=lambda msg: print(msg, file=sys.stderr, flush=True),
                    err=None, out=None) -> int:
    """The backend and one QEMU together; returns the exit status (see module doc)."""
    guest = _Guest(argv, err or sys.stderr.buffer, out or sys.stdout.buffer)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_backend, server, control, pcap_tap)

            async def on_signal():
                async for sig in sigs:
                    name = signal.Signals(sig).name
                    if guest.stop_reason is None:
                        say(f"vhostnet: {name}: stopping QEMU")
                        guest.request_stop(name, 128 + sig)
                    else:
                        say(f"vhostnet: {name} again: killing QEMU")
                        if guest.proc is not None and guest.proc.returncode is None:
                            guest.proc.kill()
            nursery.start_soon(on_signal)
            status = await guest.run(forward_stdin)
            nursery.cancel_scope.cancel()
    if guest.stop_reason == "fallback":
        say("vhostnet: QEMU said it is \"falling back on userspace virtio\": the NIC no longer "
            "goes through vhostnet, so this run is an error. Look for the reason on the lines "
            "above (often the backend refused a request, or memory is not shared: "
            "memory-backend-memfd with share=on).")
    elif guest.stop_reason is None and status != 0:
        say(f"vhostnet: QEMU exited with status {status}")
    return status


def temp_socket_dir() -> str:
    # Short and private: AF_UNIX paths are limited to 107 bytes.
    return tempfile.mkdtemp(prefix="vhostnet-run-", dir="/tmp" if os.path.isdir("/tmp") else None)


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
