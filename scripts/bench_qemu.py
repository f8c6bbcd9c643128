#!/usr/bin/env python3
"""bench_qemu.py: TCP and UDP through a real guest, on vhostnet and its peers.

    python3 scripts/bench_qemu.py                          # every backend, 5 s per test
    python3 scripts/bench_qemu.py --backends vhostnet,slirp --seconds 3
    python3 scripts/bench_qemu.py --tests send,recv        # bulk only

Boots the test guest (qemu/, Linux 6.1) once per backend with BENCH= on its
command line; its init runs the same guest program, qemu/guest/tcp_bench.c,
on every backend:

  send   guest->host bulk TCP to a discard service (Mbit/s, until the server
         has read every byte)
  recv   host->guest bulk TCP from a chargen service (Mbit/s)
  crr    TCP connect + 1-byte echo + close, sequential (connections/s)
  udp    64-byte UDP echo, one in flight (round trips/s)

Backends (--backends, comma-separated):
  vhostnet             `vhostnet serve`; the services are its own, on 10.0.2.2
  vhostnet-nooffloads  the same with --disable-feature offloads (no CSUM,
                       GUEST_CSUM, HOST_TSO4, GUEST_TSO4): what the offloads buy
  slirp                QEMU's -netdev user; 10.0.2.2:PORT is the host's
                       127.0.0.1:PORT, served by scripts/hostsrv.c
  passt                `passt -f -s SOCK -a 10.0.2.15 -n 24 -g 10.0.2.2`, QEMU
                       -netdev stream on that socket; passt maps the gateway
                       address to the host's loopback (its default, see
                       --no-map-gw in passt(1)), so hostsrv serves it too

All backends use the same NIC (virtio-net-pci, vectors=0) and the same guest
MTU (1500; the guest's addresses are static, so passt's DHCP MTU of 65520
is never applied).

CPU: utime+stime from /proc over each test, in % of one core. "backend" is
the process that does the network work: vhostnet's Python process, passt,
or for slirp QEMU's main thread (slirp runs in QEMU's main loop, together
with the virtio-net emulation that vhost-user and passt take elsewhere).
"vcpu" is QEMU's TCG vCPU thread, i.e. the guest, which is the bottleneck
on TCG.

Every run has a deadline; QEMU, the backend and hostsrv are stopped
(SIGTERM, then SIGKILL) whatever happens. Only loopback and in-guest traffic.
Logs (console, backend, vhostnet stats snapshots) go to
logs/bench-qemu/<time>/<backend>/. Prints tables; not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from vhostnet.launch import qemu

ALL_BACKENDS = ("vhostnet", "vhostnet-nooffloads", "slirp", "passt")
ALL_TESTS = ("send", "recv", "crr", "udp")
GUEST_IP, PREFIX, GATEWAY = "10.0.2.15", 24, "10.0.2.2"
CLK_TCK = os.sysconf("SC_CLK_TCK")
RESULT = re.compile(r"^bench: (send|recv|crr|udp) ([0-9.]+) (\S+)(.*)$")
START = re.compile(r"^bench: (send|recv|crr|udp) start$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- processes -----------------------------------------------------------------

def stop(proc: subprocess.Popen | None, grace: float = 3.0) -> None:
    """SIGTERM PROC (by its pid), then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_path(path: Path, proc: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not create {path} within {timeout:.0f} s")
        time.sleep(0.02)


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads) or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        text = Path(path).read_text()
    except OSError:
        return float("nan")
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def host_busy_seconds() -> float:
    """CPU seconds all cores have spent busy (not idle/iowait) since boot."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / CLK_TCK


def host_load(seconds: float = 1.0) -> float:
    """Host-wide busy CPU over SECONDS, in % of one core."""
    a = host_busy_seconds()
    time.sleep(seconds)
    return 100.0 * (host_busy_seconds() - a) / seconds


QUIET = 25.0     # % of one core used by others: below this the host counts as quiet


def wait_quiet(limit: float) -> tuple[float, float]:
    """Wait (at most LIMIT s) until the host is quiet; returns (seconds waited, last load)."""
    t0 = time.monotonic()
    while True:
        load = host_load(1.0)
        if load <= QUIET or time.monotonic() - t0 >= limit:
            return time.monotonic() - t0, load
        log(f"host busy ({load:.0f}% of one core), waiting")


def vcpu_tid(pid: int) -> int | None:
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            if Path(f"/proc/{pid}/task/{tid}/comm").read_text().startswith("CPU "):
                return int(tid)
    except OSError:
        pass
    return None


# --- one backend ---------------------------------------------------------------

@dataclass
class Run:
    backend: str
    results: dict = field(default_factory=dict)     # test -> (value, unit, details)
    cpu: dict = field(default_factory=dict)         # test -> {Meters.NAMES: %}
    problems: list = field(default_factory=list)
    skipped: str | None = None
    notes: list = field(default_factory=list)
    log_dir: Path | None = None


class Meters:
    """CPU counters sampled when the guest says a test starts and ends.

    "others" is the host's busy time not spent in our processes (QEMU, the
    backend, hostsrv; kernel work on their behalf is charged to them): the
    other tenants of a shared machine. Much above zero, the numbers are low."""

    NAMES = ("backend", "qemu_main", "vcpu", "others")

    def __init__(self, qemu_pid: int, backend_pid: int | None, backend_is_qemu_main: bool,
                 our_pids: list[int]):
        self.qemu_pid = qemu_pid
        self.backend_pid = backend_pid
        self.backend_is_qemu_main = backend_is_qemu_main
        self.our_pids = sorted(set(our_pids))
        self.vcpu = None
        self.marks: dict[str, tuple] = {}

    def sample(self) -> tuple:
        if self.vcpu is None:
            self.vcpu = vcpu_tid(self.qemu_pid)
        main = cpu_seconds(self.qemu_pid, self.qemu_pid)
        backend = main if self.backend_is_qemu_main else (
            cpu_seconds(self.backend_pid) if self.backend_pid else float("nan"))
        vcpu = cpu_seconds(self.qemu_pid, self.vcpu) if self.vcpu else float("nan")
        ours = sum(cpu_seconds(p) for p in self.our_pids)
        return time.monotonic(), backend, main, vcpu, host_busy_seconds() - ours

    def start(self, test: str) -> None:
        self.marks[test] = self.sample()

    def end(self, test: str) -> dict:
        if test not in self.marks:
            return {}
        t1, *b = self.sample()
        t0, *a = self.marks.pop(test)
        dt = t1 - t0
        return {n: max(0.0, 100.0 * (y - x) / dt) for n, x, y in zip(self.NAMES, a, b)} \
            if dt > 0 else {}


class Bench:
    def __init__(self, args, image: qemu.GuestImage, accel: str, out_dir: Path):
        self.args = args
        self.image = image
        self.accel = accel
        self.out_dir = out_dir
        self.hostsrv_bin: Path | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="vhostnet-bench-"))   # short: AF_UNIX paths
        self.extra_dirs: list[Path] = []

    def close(self) -> None:
        for d in [self.tmp, *self.extra_dirs]:
            shutil.rmtree(d, ignore_errors=True)

    def hostsrv(self) -> Path:
        if self.hostsrv_bin is None:
            out = self.tmp / "hostsrv"
            r = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out),
                                str(ROOT / "scripts" / "hostsrv.c")],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"gcc hostsrv.c failed: {r.stderr.strip()}")
            self.hostsrv_bin = out
        return self.hostsrv_bin

    def timeout(self) -> float:
        # boot + per test: its seconds, connect/drain slack, and tcp_bench's own stall limits
        return 60 + len(self.args.tests) * (self.args.seconds + 25)

    def run(self, name: str, rep: int = 0) -> Run:
        run = Run(name)
        if self.args.wait_quiet:
            waited, load = wait_quiet(self.args.wait_quiet)
            if load > QUIET:
                run.notes.append(f"host still busy ({load:.0f}% of one core) after waiting "
                                 f"{waited:.0f} s")
        tool = {"slirp": None, "passt": "passt"}.get(name)
        if tool and shutil.which(tool) is None:
            run.skipped = f"{tool} not found (apt-get install {tool})"
            return run
        run.log_dir = self.out_dir / (name if rep == 0 else f"{name}.{rep + 1}")
        run.log_dir.mkdir(parents=True, exist_ok=True)
        sock = self.tmp / f"{name}.sock"
        procs: list[subprocess.Popen] = []
        qemu_proc = None
        try:
            ports = {"BENCH_DISCARD_PORT": 9, "BENCH_CHARGEN_PORT": 19, "BENCH_ECHO_PORT": 7}
            backend_pid = None
            if name.startswith("vhostnet"):
                argv = [sys.executable, "-m", "vhostnet", "serve", "--socket", str(sock),
                        "--once", "--log-level", "warning"]
                if name == "vhostnet-nooffloads":
                    argv += ["--disable-feature", "offloads"]
                backend = self._spawn(argv, run.log_dir / "backend.log")
                procs.append(backend)
                wait_path(sock, backend, "vhostnet serve")
                wait_path(Path(str(sock) + ".ctl"), backend, "vhostnet serve (control socket)")
                backend_pid = backend.pid
                netdev = qemu.nic_args(sock)
                run.notes.append("backend CPU = the vhostnet Python process")
            else:
                hs = subprocess.Popen([str(self.hostsrv()), "-t", str(int(self.timeout()) + 30)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=open(run.log_dir / "hostsrv.log", "wb"), text=True)
                procs.append(hs)
                line = hs.stdout.readline()
                m = re.match(r"hostsrv: discard=(\d+) chargen=(\d+) echo=(\d+)", line)
                if not m:
                    raise RuntimeError(f"hostsrv did not start: {line!r}")
                ports = dict(zip(ports, map(int, m.groups())))
                if name == "slirp":
                    netdev = qemu.nic_args(None, netdev="user")
                    run.notes.append("backend CPU = QEMU's main thread (slirp + virtio-net emulation)")
                else:
                    # passt drops root for nobody before it binds the socket (and this
                    # 2023 version says "bound" even when that bind fails): give it a
                    # directory of its own that nobody may write.
                    pdir = Path(tempfile.mkdtemp(prefix="vhostnet-passt-"))
                    self.extra_dirs.append(pdir)
                    nobody = pwd.getpwnam("nobody")
                    if os.geteuid() == 0:
                        os.chown(pdir, nobody.pw_uid, nobody.pw_gid)
                    sock = pdir / "passt.sock"
                    argv = ["passt", "-f", "-e", "-s", str(sock), "-a", GUEST_IP,
                            "-n", str(PREFIX), "-g", GATEWAY, "-4"]
                    backend = self._spawn(argv, run.log_dir / "backend.log")
                    procs.append(backend)
                    wait_path(sock, backend, "passt")
                    backend_pid = backend.pid
                    netdev = ["-netdev", f"stream,id=net0,server=off,addr.type=unix,"
                                         f"addr.path={sock}",
                              "-device", f"virtio-net-pci,netdev=net0,mac={qemu.DEFAULT_MAC},"
                                         f"vectors=0,romfile="]
                    run.notes.append("backend CPU = the passt process: "
                                     + " ".join(argv).replace(str(sock), "SOCKET"))
            guest_vars = {"BENCH": ",".join(self.args.tests),
                          "BENCH_SECONDS": self.args.seconds, **ports}
            # debug-threads: the vCPU thread is called "CPU 0/TCG", so its CPU time can be told apart
            argv = [qemu.QEMU, "-name", f"bench-{name},debug-threads=on",
                    *qemu.accel_args(self.accel), *qemu.memory_args(),
                    *qemu.console_args(), *netdev,
                    *qemu.boot_args(self.image, qemu.kernel_append(guest_vars))]
            (run.log_dir / "qemu.cmd").write_text(qemu.format_argv(argv) + "\n")
            log(f"{name}: booting the guest ({', '.join(self.args.tests)}, "
                f"{self.args.seconds:g} s each)")
            qemu_proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            meters = Meters(qemu_proc.pid, backend_pid, name == "slirp",
                            [qemu_proc.pid, *(p.pid for p in procs)])
            ctl = str(sock) + ".ctl" if name.startswith("vhostnet") else None
            self._watch(run, qemu_proc, meters, ctl)
        except RuntimeError as e:
            run.problems.append(str(e))
        finally:
            stop(qemu_proc, 0.5)
            for p in reversed(procs):
                stop(p)
                if p.stdout:
                    p.stdout.close()
        return run

    @staticmethod
    def _spawn(argv: list[str], logfile: Path) -> subprocess.Popen:
        with open(logfile, "wb") as out:
            return subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)

    def _watch(self, run: Run, proc: subprocess.Popen, meters: Meters, ctl: str | None) -> None:
        """Read the console until QEMU exits or the deadline; sample CPU at the marks."""
        deadline = time.monotonic() + self.timeout()
        timer = threading.Timer(self.timeout(), lambda: stop(proc, 0.5))
        timer.daemon = True
        timer.start()
        stats = open(run.log_dir / "stats.jsonl", "w") if ctl else None
        try:
            with open(run.log_dir / "console.log", "w") as console:
                for raw in iter(proc.stdout.readline, b""):
                    line = ANSI.sub("", raw.decode(errors="replace")).strip("\r\n")
                    console.write(line + "\n")
                    if self.args.verbose:
                        print(f"  | {line}", file=sys.stderr, flush=True)
                    if m := START.match(line):
                        meters.start(m[1])
                    elif m := RESULT.match(line):
                        run.cpu[m[1]] = meters.end(m[1])
                        run.results[m[1]] = (float(m[2]), m[3], m[4].strip())
                        log(f"{run.backend}: {m[1]} {m[2]} {m[3]}  ({m[4].strip()})")
                        if stats:
                            self._stats(ctl, m[1], stats)
                    elif "FAIL:" in line:
                        run.problems.append(line.strip())
                        log(f"{run.backend}: {line.strip()}")
                proc.wait()
        finally:
            timer.cancel()
            if stats:
                stats.close()
        if time.monotonic() > deadline:
            run.problems.append(f"timeout: the guest did not finish within {self.timeout():.0f} s")
        elif proc.returncode != 0:
            run.problems.append(f"QEMU exited with status {proc.returncode}")
        for t in self.args.tests:
            if t not in run.results and not any(t in p for p in run.problems):
                run.problems.append(f"no result for {t}")

    @staticmethod
    def _stats(ctl: str, test: str, out) -> None:
        """One `vhostnet stats` document after each test (retransmits, drops)."""
        from vhostnet.observe.control import ControlClient, ControlError
        try:
            with ControlClient(ctl, timeout=5) as c:
                doc = c.request("stats")
            out.write(json.dumps({"after": test, "stats": doc}) + "\n")
            out.flush()
        except (ControlError, OSError, ValueError) as e:
            out.write(json.dumps({"after": test, "error": str(e)}) + "\n")


# --- report --------------------------------------------------------------------

COLS = [("send", "guest->host Mbit/s"), ("recv", "host->guest Mbit/s"),
        ("crr", "TCP conn/s"), ("udp", "UDP rt/s")]


def table(runs: list[Run], tests: list[str]) -> str:
    cols = [(t, h) for t, h in COLS if t in tests]
    w0 = max(len("backend"), *(len(r.backend) for r in runs))
    head = f"{'backend':<{w0}}" + "".join(f"  {h:>18}" for _, h in cols)
    lines = [head, "-" * len(head)]
    for r in runs:
        if r.skipped:
            lines.append(f"{r.backend:<{w0}}  skipped: {r.skipped}")
            continue
        cells = []
        for t, _ in cols:
            v = r.results.get(t)
            cells.append(f"{v[0]:>18,.1f}" if v else f"{'-':>18}")
        lines.append(f"{r.backend:<{w0}}" + "".join(f"  {c}" for c in cells))
    lines.append("")
    lines.append("CPU during each test, % of one core: backend / QEMU main thread / guest vCPU "
                 "/ other processes on the host (contention):")
    head = f"{'backend':<{w0}}" + "".join(f"  {t:>20}" for t, _ in cols)
    lines += [head, "-" * len(head)]
    for r in runs:
        if r.skipped:
            continue
        cells = []
        for t, _ in cols:
            c = r.cpu.get(t)
            cells.append(f"{c['backend']:>4.0f}/{c['qemu_main']:>3.0f}/{c['vcpu']:>3.0f}"
                         f"/{c['others']:>4.0f}" if c else "-")
        lines.append(f"{r.backend:<{w0}}" + "".join(f"  {c:>20}" for c in cells))
    return "\n".join(lines)


def best_of(runs: list[Run]) -> Run:
    """One row from repeated runs: per test the best value (contention only ever
    lowers them), with the CPU figures of the run that gave it."""
    if len(runs) == 1:
        return runs[0]
    out = Run(runs[0].backend, skipped=runs[0].skipped, log_dir=runs[0].log_dir)
    for i, r in enumerate(runs):
        for t, v in r.results.items():
            if t not in out.results or v[0] > out.results[t][0]:
                out.results[t] = v
                out.cpu[t] = r.cpu.get(t, {})
        out.problems += [f"boot {i + 1}: {p}" for p in r.problems]
        out.notes += [n for n in r.notes if n not in out.notes]
    return out


WATCH = ("tcp_rx_segments", "tcp_tx_segments", "tcp_retransmitted_segments", "tcp_rto_timeouts",
         "tcp_fast_retransmits", "tcp_rx_ooo_segments", "tcp_rx_out_of_window",
         "tcp_rx_zero_window_drops", "tcp_zero_window_probes")


def retransmit_summary(run: Run) -> str | None:
    """What vhostnet's stack counted during each test (from its stats snapshots):
    segments, retransmissions, out-of-order; plus any device-level drop."""
    path = run.log_dir / "stats.jsonl" if run.log_dir else None
    if path is None or not path.exists():
        return None
    prev: dict = {}
    parts = []
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        st = doc.get("stats") or {}
        if not st.get("connected"):
            continue
        now = {k: v for k, v in st["stack"]["counters"].items() if k in WATCH}
        now.update({f"device_{k}": v for k, v in st["device"]["drops"].items()})
        delta = {k: v - prev.get(k, 0) for k, v in now.items() if v - prev.get(k, 0)}
        prev = now
        parts.append(f"  {doc['after']:>5}: " + (", ".join(
            f"{k.removeprefix('tcp_')}={v}" for k, v in delta.items()) or "nothing"))
    return "\n".join(parts) if parts else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backends", default=",".join(ALL_BACKENDS),
                   help="comma-separated, from: " + ", ".join(ALL_BACKENDS))
    p.add_argument("--tests", default=",".join(ALL_TESTS),
                   help="comma-separated, from: " + ", ".join(ALL_TESTS))
    p.add_argument("--seconds", type=int, default=5, help="per test, whole seconds (default 5)")
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="boot each backend N times; the table shows the best of N per test")
    p.add_argument("--no-build", action="store_true", help="use the guest image as built")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each backend, wait up to SECONDS for other processes to go "
                        f"below {QUIET:.0f}%% of one core (for shared machines)")
    p.add_argument("-v", "--verbose", action="store_true", help="echo the guest console")
    args = p.parse_args(argv)
    # Ctrl-C or SIGTERM (even when started in the background, where SIGINT may
    # come in ignored) unwinds through the finally blocks that stop QEMU,
    # the backend and hostsrv.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    backends = [b for b in args.backends.split(",") if b]
    args.tests = [t for t in args.tests.split(",") if t]
    for b in backends:
        if b not in ALL_BACKENDS:
            p.error(f"unknown backend {b!r} (choose from {', '.join(ALL_BACKENDS)})")
    for t in args.tests:
        if t not in ALL_TESTS:
            p.error(f"unknown test {t!r} (choose from {', '.join(ALL_TESTS)})")
    if not 1 <= args.repeat <= 20:
        p.error("--repeat must be 1..20")
    if not 1 <= args.seconds <= 120:
        p.error("--seconds must be 1..120")
    if shutil.which(qemu.QEMU) is None:
        log(f"{qemu.QEMU} not found (make setup)")
        return 2
    if not args.no_build:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "build-guest.sh")], cwd=ROOT)
        if r.returncode != 0:
            log("scripts/build-guest.sh failed")
            return 1
    image = qemu.find_image()
    accel = qemu.choose_accel(args.accel)
    idle_load = host_load(1.0)
    if idle_load > 20:
        log(f"warning: the host is busy before the benchmark ({idle_load:.0f}% of one core in "
            f"use by other processes); the numbers will be low and noisy")
    out_dir = ROOT / "logs" / "bench-qemu" / time.strftime("%Y%m%d-%H%M%S")
    bench = Bench(args, image, accel, out_dir)
    all_runs: list[Run] = []
    try:
        for rep in range(args.repeat):
            for b in backends:
                all_runs.append(bench.run(b, rep))
    finally:
        bench.close()
    runs = [best_of([r for r in all_runs if r.backend == b]) for b in backends]
    print()
    print(f"# bench_qemu: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"accel {accel}, guest {image.kernel_version}, {args.seconds:g} s per test, MTU 1500, "
          + (f"best of {args.repeat} boots, " if args.repeat > 1 else "") +
          f"host busy before start {idle_load:.0f}% of one core")
    print(table(runs, args.tests))
    bad = 0
    for r in runs:
        for n in r.notes:
            print(f"\n{r.backend}: {n}")
        s = retransmit_summary(r)
        if s:
            print(f"\n{r.backend}: the backend's counters during each test:\n{s}")
        for prob in r.problems:
            print(f"\n{r.backend}: PROBLEM: {prob}")
            bad += 1
    print(f"\nlogs: {out_dir}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
