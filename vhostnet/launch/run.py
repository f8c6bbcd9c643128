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

`run --reconnect` (`run_guest_reconnect()`) runs the backend as a child
process instead (`python -m vhostnet serve` with the same options) and QEMU
with -chardev socket,...,reconnect=1: when the backend exits, however it
exits (a crash, SIGKILL, `kill PID` to upgrade it), it is started again on
the same socket and QEMU reconnects within about a second; the guest sees
its link go down and come back. A backend that exits more than
RESTART_LIMIT times within RESTART_WINDOW seconds stops the run (status 1).

QEMU flags come from vhostnet/qemu.py; this module only adds the choice
between our test image and the user's own boot arguments.
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

import trio

from vhostnet.launch import qemu
from vhostnet.launch.serve import serve_backend

__all__ = ["attach_flags", "run_guest", "run_guest_reconnect", "RunError", "uses_own_boot",
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
                 legacy: bool | None = None, reconnect: int | None = None,
                 queue_pairs: int = 1, packed: bool = False, msix: bool = False) -> list[str]:
    """The QEMU flags that attach a guest's NIC to a backend on SOCKET: the
    machine's shared-memory RAM and the NIC on TRANSPORT (see qemu.nic_args
    for LEGACY; RECONNECT: QEMU retries a lost backend every that many seconds)."""
    try:
        m = qemu.machine(machine)
        transport = qemu.transport_of(m, transport)
    except ValueError as e:
        raise RunError(str(e)) from None
    return qemu.memory_args(parse_mem(mem), m) + qemu.nic_args(socket, check_mac(mac), "vhost-user",
                                                              transport, legacy, reconnect=reconnect,
                                                              queue_pairs=queue_pairs, packed=packed,
                                                              msix=msix)


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

    def __init__(self, argv: list[str], err, out, cpus: set[int] | None = None):
        self.argv = argv
        self.cpus = cpus        # QEMU's CPU mask when the backend is pinned (--cpu)
        self.out, self.err = out, err
        self.proc: trio.Process | None = None
        self.stop_reason: str | None = None
        self.stop_status: int | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, forward_stdin: bool) -> int:
        import subprocess
        if self.stop_reason is not None:   # interrupted before QEMU started
            return self.stop_status
        cpus = self.cpus
        # A child inherits its parent's CPU mask: QEMU gets the one the
        # backend had before --cpu pinned it (a sched_setaffinity in the
        # child, between fork and exec).
        extra = {} if cpus is None else {"preexec_fn": lambda: os.sched_setaffinity(0, cpus)}
        self.proc = await trio.lowlevel.open_process(
            self.argv, **extra, stdin=subprocess.PIPE if forward_stdin else subprocess.DEVNULL,
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
        await _end_process(self.proc)


async def _end_process(p: trio.Process | None) -> None:
    """End P if it still runs: SIGTERM, then SIGKILL after KILL_AFTER s."""
    if p is None or p.returncode is not None:
        return
    p.terminate()
    with trio.move_on_after(KILL_AFTER):
        await p.wait()
        return
    p.kill()
    await p.wait()


async def _stop_on_signals(sigs, guest: "_Guest", say) -> None:
    """A first SIGINT/SIGTERM/SIGHUP stops QEMU gently (status 128+N); another kills it."""
    async for sig in sigs:
        name = signal.Signals(sig).name
        if guest.stop_reason is None:
            say(f"vhostnet: {name}: stopping QEMU")
            guest.request_stop(name, 128 + sig)
        elif guest.proc is not None and guest.proc.returncode is None:
            say(f"vhostnet: {name} again: killing QEMU")
            guest.proc.kill()


def _say_how_it_ended(guest: "_Guest", status: int, say) -> None:
    if guest.stop_reason == "fallback":
        say("vhostnet: QEMU said it is \"falling back on userspace virtio\": the NIC no longer "
            "goes through vhostnet, so this run is an error. Look for the reason on the lines "
            "above (often the backend refused a request, or memory is not shared: "
            "memory-backend-memfd with share=on).")
    elif guest.stop_reason is None and status != 0:
        say(f"vhostnet: QEMU exited with status {status}")


async def run_guest(server, control, argv: list[str], *, pcap_tap=None, forward_stdin: bool = False,
                    say=lambda msg: print(msg, file=sys.stderr, flush=True),
                    err=None, out=None, qemu_cpus: set[int] | None = None) -> int:
    """The backend and one QEMU together; returns the exit status (see module doc).
    QEMU_CPUS: QEMU's CPU mask, when this process (the backend) is pinned."""
    guest = _Guest(argv, err or sys.stderr.buffer, out or sys.stdout.buffer, qemu_cpus)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_backend, server, control, pcap_tap)
            nursery.start_soon(_stop_on_signals, sigs, guest, say)
            status = await guest.run(forward_stdin)
            nursery.cancel_scope.cancel()
    _say_how_it_ended(guest, status, say)
    return status


# -- run --reconnect: the backend as a child process QEMU can outlive ---------------

#: A backend that keeps dying is not restarted for ever: more than
#: RESTART_LIMIT exits within RESTART_WINDOW seconds stop QEMU too (status 1).
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
#: How long a started backend may take to listen (Python start-up, imports).
LISTEN_TIMEOUT = 60.0
LISTEN_POLL = 0.02


def _connectable(path: str) -> bool:
    import socket as _socket
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class _BackendChild:
    """`vhostnet serve` as a child process, started again whenever it exits
    while QEMU runs. QEMU (-chardev ...,reconnect=1) takes the guest's link
    down meanwhile and reconnects within a second of the new one listening."""

    def __init__(self, argv_for, socket_path: str, say):
        self.argv_for = argv_for        # start number (0, 1, ...) -> argv
        self.socket_path = socket_path
        self.say = say
        self.proc: trio.Process | None = None
        self.starts = 0
        self.exits: list[float] = []

    async def _start(self) -> None:
        # A backend killed with SIGKILL leaves its socket file behind: the new
        # one replaces it (vhostnet/sockets.py), so "connectable" means the new one.
        # Its own session, like QEMU: a terminal's Ctrl-C reaches only us, and we stop it.
        self.proc = await trio.lowlevel.open_process(self.argv_for(self.starts), stdin=subprocess.DEVNULL,
                                                     start_new_session=True)
        self.starts += 1
        with trio.move_on_after(LISTEN_TIMEOUT):
            while self.proc.poll() is None:
                if await trio.to_thread.run_sync(_connectable, self.socket_path):
                    return
                await trio.sleep(LISTEN_POLL)
        if self.proc.poll() is None:
            raise RunError(f"the backend did not listen on {self.socket_path} within {LISTEN_TIMEOUT:g} s")

    async def supervise(self, guest: "_Guest", task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._start()
            if self.proc.returncode is not None:
                raise RunError(f"the backend exited at once (status {self.proc.returncode}); "
                               f"see its messages above")
            self.say(f"vhostnet: backend pid {self.proc.pid} (restartable: QEMU reconnects; "
                     f"`kill {self.proc.pid}` restarts it)")
            task_status.started()
            while True:
                status = await self.proc.wait()
                now = trio.current_time()
                self.exits = [t for t in self.exits if now - t < RESTART_WINDOW] + [now]
                if len(self.exits) > RESTART_LIMIT:
                    self.say(f"vhostnet: the backend exited {len(self.exits)} times within "
                             f"{RESTART_WINDOW:g} s; giving up and stopping QEMU")
                    guest.request_stop("backend", 1)
                    return
                how = f"signal {-status}" if status < 0 else f"status {status}"
                self.say(f"vhostnet: the backend exited ({how}); starting it again, QEMU will reconnect")
                await self._start()
                if self.proc.returncode is None:
                    self.say(f"vhostnet: backend pid {self.proc.pid} listening again")
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()

    async def stop(self) -> None:
        await _end_process(self.proc)


async def run_guest_reconnect(backend_argv, socket_path: str, argv: list[str], *,
                              forward_stdin: bool = False,
                              say=lambda msg: print(msg, file=sys.stderr, flush=True),
                              err=None, out=None) -> int:
    """`run --reconnect`: the backend in a child process, restarted whenever it
    exits, and QEMU (started with reconnect=) outliving it. Returns QEMU's
    status as run_guest() does; 1 if the backend could not be kept up.
    BACKEND_ARGV(n) is the argv of the backend's n-th start (0 first)."""
    guest = _Guest(argv, err or sys.stderr.buffer, out or sys.stdout.buffer)
    child = _BackendChild(backend_argv, socket_path, say)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(child.supervise, guest)
            except RunError as e:
                say(f"vhostnet: {e}")
                nursery.cancel_scope.cancel()
                return 1
            nursery.start_soon(_stop_on_signals, sigs, guest, say)
            status = await guest.run(forward_stdin)
            nursery.cancel_scope.cancel()
    _say_how_it_ended(guest, status, say)
    return status


def temp_socket_dir() -> str:
    # Short and private: AF_UNIX paths are limited to 107 bytes.
    return tempfile.mkdtemp(prefix="vhostnet-run-", dir="/tmp" if os.path.isdir("/tmp") else None)


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
