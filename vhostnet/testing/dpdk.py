"""DPDK's testpmd as a second vhost-user frontend, for tests/test_dpdk.py and scripts/bench_dpdk.py.

testpmd's virtio-user PMD (`--vdev=net_virtio_user0,path=SOCKET`) is a
complete virtio-net *driver* that talks vhost-user itself: it maps its own
memory (memfd, so `--no-huge` works), negotiates features, posts RX
buffers and fills the TX ring, with no QEMU and no guest kernel. It is an
independent implementation of the frontend side, so it catches assumptions
the in-process frontend (vhostnet/testing/frontend.py) and QEMU happen to share.

Two context managers:

- `VhostnetServe`: `python -m vhostnet serve` as a subprocess, with a
  control-socket client (`stats()`, `inspect()`) and its CPU time.
- `TestPmd`: `dpdk-testpmd -i` driven over stdin, one command at a time
  (each `cmd()` waits for the next `testpmd> ` prompt, so its output is the
  command's own); parsers for `show port stats`.

Both always end their process (quit, then terminate, then kill, each with a
timeout) and leave no socket behind; both also get SIGTERM if the Python
process that started them dies (PR_SET_PDEATHSIG). Only Unix sockets are used; testpmd
runs with `--no-pci --no-huge --no-shconf`, so it touches no NIC, no hugepages
and no shared /var/run/dpdk config.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from vhostnet.testing.processes import end

__all__ = ["TESTPMD", "skip_reason", "pmd_available", "VhostnetServe", "TestPmd",
           "GUEST_MAC", "GATEWAY_MAC", "GUEST_IP", "GATEWAY_IP"]

ROOT = Path(__file__).resolve().parents[2]
TESTPMD = shutil.which("dpdk-testpmd")
GUEST_MAC = "52:54:00:12:34:56"
GATEWAY_MAC = "52:55:0a:00:02:02"
GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"
PROMPT = b"testpmd> "
QUIT_GRACE = 10.0       # seconds testpmd may take to quit after "quit"
TERM_GRACE = 5.0        # seconds a process may take to exit after SIGTERM (then SIGKILL)
# With `set verbose 1` the forwarding lcore prints every packet, a line at a
# time, while the command line writes its prompt and echo a character at a
# time: a dump can land in the middle of "testpmd> ". These are the dump's
# lines; they are taken out before looking for the prompt.
_ASYNC = re.compile(rb"port \d+/queue \d+: (?:received|sent) \d+ packets\n|  src=[^\n]*\n|  ol_flags:[^\n]*\n")


def pmd_available(name: str) -> bool:
    """Is DPDK's librte_net_<name> PMD installed (the Debian package loads every PMD in its plugin dir)?"""
    return bool(glob.glob(f"/usr/lib/*/dpdk/pmds-*/librte_net_{name}.so*")
                or glob.glob(f"/usr/lib/*/librte_net_{name}.so*")
                or glob.glob(f"/usr/local/lib*/**/librte_net_{name}.so*", recursive=True))


def skip_reason(pmd: str = "virtio") -> str | None:
    """Why testpmd cannot be used here with the PMD it needs (virtio: the
    virtio-user front-end; vhost: the vhost-user back-end), or None."""
    if TESTPMD is None:
        return ("dpdk-testpmd is not installed (Debian: apt-get install dpdk-dev librte-net-virtio23; "
                "scripts/setup.sh installs them when apt has them)")
    if not pmd_available(pmd):
        return f"DPDK's {pmd} PMD is missing (apt-get install librte-net-{pmd}23)"
    if os.geteuid() != 0:
        return "dpdk-testpmd needs root here (EAL memory setup)"
    if shutil.which("stdbuf") is None:
        return "stdbuf (coreutils) is needed to read testpmd's output in order"
    return None


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the process that started it dies (even by SIGKILL)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# --------------------------------------------------------------------------- vhostnet

class VhostnetServe:
    """`python -m vhostnet serve --socket DIR/vhost.sock` in a subprocess."""

    def __init__(self, workdir: str | os.PathLike, *, args: tuple[str, ...] = (),
                 log_level: str = "debug", cpu: int | None = None, allow_unsealed_memory: bool = False):
        self.workdir = Path(workdir)
        self.socket = str(self.workdir / "vhost.sock")
        self.control = self.socket + ".ctl"
        self.log = self.workdir / "backend.log"
        # testpmd's --no-huge memory is a memfd without seals (vhostnet/vhostuser/memory.py)
        self.args = tuple(args) + (("--allow-unsealed-memory",) if allow_unsealed_memory else ())
        self.log_level = log_level
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "VhostnetServe":
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "vhostnet", "serve", "--socket", self.socket,
                "--log-level", self.log_level, "--log-file", str(self.log), *self.args]
        if self.cpu is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(self.cpu), *argv]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vhostnet serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                self.request({"cmd": "ping"}, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"vhostnet serve did not open {self.control}:\n{self.log_text()}")
                time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            end(self.proc, grace=TERM_GRACE)
        for path in (self.socket, self.control):
            try:
                os.unlink(path)
            except OSError:
                pass

    def log_text(self, tail: int = 200) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-tail:])
        except OSError:
            return "(no backend log)"

    def request(self, req: dict, timeout: float = 5.0) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.control)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise RuntimeError(f"control request {req} failed: {reply.get('error')}")
        return reply["result"]

    def stats(self) -> dict:
        return self.request({"cmd": "stats"})

    def inspect(self) -> dict:
        return self.request({"cmd": "inspect"})

    def wait_connected(self, timeout: float = 10.0, *, queues_started: bool = True) -> dict:
        """Wait until a frontend is connected (and both rings started and enabled)."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.inspect()
            if doc.get("connected") and (not queues_started or all(
                    q["started"] and q["enabled"] for q in doc.get("queues", []))):
                return doc
            if time.monotonic() > deadline:
                raise TimeoutError(f"no frontend with started rings after {timeout} s: "
                                   f"{json.dumps(doc)[:2000]}\n{self.log_text()}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """user + system CPU time of the backend process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- testpmd

_STAT = re.compile(rb"([A-Za-z][A-Za-z_-]*):\s+(\d+)")


def parse_port_stats(text: str | bytes) -> dict[str, int]:
    """`show port stats N` -> {"RX-packets": .., "RX-bytes": .., "TX-packets": .., ...}."""
    if isinstance(text, str):
        text = text.encode()
    out = {}
    for line in text.splitlines():
        if b"Throughput" in line or b"pps" in line or b"bps" in line:
            continue
        for k, v in _STAT.findall(line):
            out.setdefault(k.decode(), int(v))
    return out


def parse_xstats(text: str | bytes) -> dict[str, int]:
    """`show port xstats N` -> {"rx_good_packets": .., "tx_q0_packets": .., ...}."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*(\w+):\s+(\d+)\s*$", text, re.M)}


class TestPmdError(RuntimeError):
    pass


class TestPmd:
    """dpdk-testpmd with one virtio-user port on `socket`, driven over stdin.

    `vdev_args` are added to the virtio-user devargs (e.g. `mrg_rxbuf=0`;
    they override our path/queues/queue_size/mac); `vdev`, if given,
    replaces that port altogether (bench_qemu.py's floor row:
    `net_vhost0,iface=SOCK`, testpmd as the vhost-user back-end, `socket_path`
    then unused),
    `extra_vdevs` are more --vdev values (a net_pcap port becomes port 1),
    `app_args` go after `--` (e.g. `--forward-mode=txonly`, `--tx-udp=...`).
    lcores: EAL --lcores, the main lcore (reads stdin) and one forwarding
    lcore; by default on the first and last CPU this process may use.
    """

    __test__ = False  # not a pytest class
    _count = 0

    def __init__(self, socket_path: str, *, app_args: tuple[str, ...] = (),
                 vdev_args: str = "", extra_vdevs: tuple[str, ...] = (),
                 lcores: str | None = None, mem_mb: int = 256, mbufs: int = 8192,
                 queue_size: int = 256, log: str | os.PathLike | None = None,
                 vdev: str | None = None):
        TestPmd._count += 1
        self.prefix = f"vhostnet-dpdk-{os.getpid()}-{TestPmd._count}"
        opts = {"path": socket_path, "queues": "1", "queue_size": str(queue_size), "mac": GUEST_MAC}
        # vdev_args override these (virtio-user ignores a key given twice).
        opts.update(kv.split("=", 1) for kv in vdev_args.split(",") if kv)
        devargs = vdev or "net_virtio_user0," + ",".join(f"{k}={v}" for k, v in opts.items())
        if lcores is None:
            cpus = sorted(os.sched_getaffinity(0))
            # main lcore (command line, mostly asleep) on the first CPU, the
            # busy-polling forwarding lcore on the last (the same one if only one).
            lcores = f"0@{cpus[0]},1@{cpus[-1]}"
        self.argv = ["stdbuf", "-oL", "-eL", TESTPMD, f"--lcores={lcores}", "--no-huge", "--no-pci",
                     "--no-shconf", f"--file-prefix={self.prefix}", "-m", str(mem_mb), "--log-level=lib.eal:warning",
                     f"--vdev={devargs}", *(f"--vdev={v}" for v in extra_vdevs),
                     "--", "-i", f"--total-num-mbufs={mbufs}", *app_args]
        self.log = Path(log) if log else None
        self.proc: subprocess.Popen | None = None
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._closed = False

    # -- process ---------------------------------------------------------

    @staticmethod
    def _remove_stale_runtime_dirs() -> None:
        """Runtime dirs of ours whose process is gone (killed before it could clean up)."""
        for d in glob.glob("/var/run/dpdk/vhostnet-dpdk-*-*"):
            m = re.fullmatch(r"vhostnet-dpdk-(\d+)-\d+", os.path.basename(d))
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> "TestPmd":
        self._remove_stale_runtime_dirs()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._wait_prompt(0, timeout=30)
            # testpmd carries on to its prompt even when a port failed to start.
            for bad in ("Fail to configure port", "Fail to start port", "Start ports failed",
                        "Fail to setup", "Cannot init"):
                if bad in self.output:
                    raise TestPmdError(f"testpmd: {bad!r} at startup:\n{self.output[-4000:]}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if chunk:
                    self._buf += chunk
                self._cond.notify_all()
            if not chunk:
                return

    def __exit__(self, *exc) -> None:
        p = self.proc
        if p is None or self._closed:
            return
        self._closed = True
        if p.poll() is None:
            try:
                p.stdin.write(b"quit\n")
                p.stdin.flush()
            except OSError:
                pass
            try:
                p.wait(QUIT_GRACE)
            except subprocess.TimeoutExpired:
                end(p, grace=TERM_GRACE)
        try:
            p.stdin.close()
        except OSError:
            pass
        if self._reader is not None:
            self._reader.join(5)
        p.stdout.close()
        if self.log is not None:
            self.log.write_bytes(bytes(self._buf))
        # --no-shconf still makes an (empty) runtime dir for the prefix.
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)

    @property
    def output(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def _wait_prompt(self, start: int, timeout: float) -> bytes:
        """Wait for a prompt at or after byte `start`; return what came before it (without `set verbose` dumps)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = _ASYNC.sub(b"", bytes(self._buf[start:]))
                i = text.find(PROMPT)
                if i >= 0:
                    return text[:i]
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise TestPmdError(f"testpmd exited with {self.proc.returncode}:\n"
                                       f"{self._buf.decode(errors='replace')[-4000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestPmdError(f"testpmd gave no prompt within {timeout} s:\n"
                                       f"{self._buf.decode(errors='replace')[-4000:]}")
                self._cond.wait(min(left, 0.2))

    def cmd(self, line: str, timeout: float = 15.0) -> str:
        """Send one command; return what testpmd printed before its next prompt."""
        with self._cond:
            start = len(self._buf)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        # Our own line comes back first (the cmdline library echoes it).
        text = self._wait_prompt(start, timeout).decode(errors="replace")
        echo = text.find(line)
        return text[echo + len(line):] if echo >= 0 else text

    # -- conveniences ----------------------------------------------------

    def port_stats(self, port: int = 0) -> dict[str, int]:
        return parse_port_stats(self.cmd(f"show port stats {port}"))

    def xstats(self, port: int = 0) -> dict[str, int]:
        return parse_xstats(self.cmd(f"show port xstats {port}"))
