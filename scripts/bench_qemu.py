#!/usr/bin/env python3
"""bench_qemu.py: vhostnet, slirp and passt doing the same work for a real guest.

    python3 scripts/bench_qemu.py --repeat 3              # the fair table, median of 3
    python3 scripts/bench_qemu.py --quick                 # smoke check: 1 boot, 2 s per test
    python3 scripts/bench_qemu.py --backends vhostnet,slirp --tests send,ping
    python3 scripts/bench_qemu.py --builtin               # vhostnet's built-in services
    python3 scripts/bench_qemu.py --rss                   # RSS with 1,000 NAT connections

The same work on every backend: the test guest (qemu/, Linux 6.1, its
application image) boots with BENCH= on its command line and runs the same
programs against 10.0.2.2:PORT, which every backend maps to the host's
127.0.0.1:PORT, where the same host servers listen on free ports:
scripts/hostsrv.c (discard, chargen, echo; TCP and UDP) and `iperf3 -s`.
vhostnet runs `vhostnet serve --no-services`, so nothing is answered inside
the backend except ARP and ping: every byte goes through its NAT
(stack/flows.py, vhostnet/hostnet/) and real host sockets, as for slirp
and passt.

  isend  iperf3 guest->host (Mbit/s, receiver side)
  irecv  iperf3 -R, host->guest (Mbit/s)
  send   qemu/guest/tcp_bench.c bulk TCP to discard (Mbit/s)
  recv   tcp_bench bulk TCP from chargen (Mbit/s)
  crr    tcp_bench TCP connect + 1-byte echo + close, sequential (connections/s)
  udp    tcp_bench 64-byte UDP echo, one in flight (round trips/s)
  ping   busybox ping -i 0.2 of the gateway for the test's seconds (average RTT, ms;
         lower is better; answered by the backend itself on every backend)

Rows (--backends, comma-separated):
  vhostnet             `vhostnet serve --no-services`
  vhostnet-nooffloads  the same with --disable-feature offloads (no CSUM,
                       GUEST_CSUM, HOST_TSO4, GUEST_TSO4): what the offloads buy
  slirp                QEMU's -netdev user
  passt                `passt -f -s SOCK -a 10.0.2.15 -n 24 -g 10.0.2.2`, QEMU
                       -netdev stream on that socket (passt maps the gateway to
                       the host's loopback, its default)
  vhostnet-q2, -q4     multiqueue: `serve --queues N --no-services`, QEMU
                       queues=N and mq=on (not in the default set; give --smp
                       and --streams so the guest uses the pairs: Linux runs
                       min(vCPUs, N) pairs and XPS puts each CPU's sends on its pair)
  vhostnet-nospin      `serve --nat-spin-us 0`: the NAT does not wait in the
                       step for datagram answers (not in the default set)
  vhostnet-idle100, -idle300
                       `serve --idle-poll-us 100` / `300`: the kick waiter
                       polls its eventfd that long before sleeping (not in
                       the default set)
  vhostnet-nohook      `serve --no-kick-hook`: every kick and host-socket
                       pass wakes through trio's scheduler (not in the
                       default set)
  vhostnet-noexpress   `serve --no-express`: every guest datagram through
                       the stack's whole path, none by the UDP express (not
                       in the default set)
  vhostnet-cpu0, -cpu1, -cpuauto
                       `serve --cpu 0` / `1` / `auto`: the backend pinned to
                       one CPU, QEMU and the guest left to the scheduler (not
                       in the default set)
  dpdk-floor           the floor of the udp and ping columns (not in the
                       default set; only those two): DPDK's testpmd as the
                       vhost-user back-end. For udp its `5tswap` mode sends
                       every frame straight back with MACs, IPs and ports
                       swapped, so the guest's datagram to 10.0.2.2:echo
                       returns as the echo's answer; for ping its `icmpecho`
                       mode answers. C, busy-polling, no stack, no host
                       socket: about the least a vhost-user back-end can
                       spend on a round trip. The NIC has no offloads (the
                       swapped frame keeps the guest's checksum, which must
                       be whole) and the guest a static ARP entry for the
                       gateway

  vhostnet-base        with --base-tree DIR: "vhostnet" run from DIR's code
                       (another checkout), so a change is measured before and
                       after in the same run, interleaved with the rest

--smp N gives every row's guest N vCPUs; --streams N runs iperf3 -P N.

All rows use the same NIC (virtio-net-pci, vectors=0) and guest MTU 1500.
--repeat N boots every backend N times, round-robin (vhostnet, nooffloads,
slirp, passt, then nooffloads, slirp, passt, vhostnet, ...: the order
rotates each round, so every row boots in every place of a round equally
often), so a burst of load from other tenants hits every row alike; each
cell is the median of the N boots. Every metric is
also printed as a ratio to slirp's median in the same run.

--builtin: the old comparison, kept apart and labelled as such: the vhostnet
rows talk to the backend's own discard/chargen/echo services on 10.0.2.2:
9/19/7 (no host sockets, not the work slirp and passt do), slirp and passt
to hostsrv as above. Not what a user's application sees.

CPU: utime+stime from /proc over each test, in % of one core. "backend" is
the process doing the network work: vhostnet's Python process, passt, or
for slirp QEMU's main thread (slirp runs in QEMU's main loop, together with
the virtio-net emulation that vhost-user and passt take elsewhere). The
guest's vCPU thread (TCG) is the bottleneck on this machine; it and the
other tenants' load are in the detail table.

Every boot has a deadline; QEMU, the backend and the host servers are
stopped (SIGTERM, then SIGKILL) whatever happens. Only loopback and
in-guest traffic. Logs (console, backend, vhostnet stats snapshots) go to
logs/bench-qemu/<time>/<backend>.<n>/. Prints tables; not a test.
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
sys.path.insert(0, str(ROOT))

from vhostnet.launch import qemu  # noqa: E402
from vhostnet.testing import dpdk  # noqa: E402
from vhostnet.testing.hostservers import HostServers  # noqa: E402
from vhostnet.testing.processes import wait_path  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import wake_cost  # noqa: E402

ALL_BACKENDS = ("vhostnet", "vhostnet-nooffloads", "slirp", "passt", "vhostnet-q2", "vhostnet-q4",
                "vhostnet-nospin", "vhostnet-idle100", "vhostnet-idle300", "vhostnet-nohook", "vhostnet-noexpress",
                "vhostnet-cpu0", "vhostnet-cpu1", "vhostnet-cpuauto", "dpdk-floor")
#: Rows that are not in the default set (--backends names them).
EXTRA_ROWS = ("vhostnet-q2", "vhostnet-q4", "vhostnet-nospin", "vhostnet-idle100", "vhostnet-idle300",
              "vhostnet-nohook", "vhostnet-noexpress", "vhostnet-cpu0", "vhostnet-cpu1",
              "vhostnet-cpuauto", "dpdk-floor")
#: Rows whose backend is pinned: `serve --cpu` (vhostnet/launch/affinity.py).
CPU_ROWS = {"vhostnet-cpu0": "0", "vhostnet-cpu1": "1", "vhostnet-cpuauto": "auto"}
FLOOR_ROW = "dpdk-floor"
#: The tests the floor row can run, and testpmd's forwarding mode for each: a
#: UDP datagram sent back with MACs, IPs and ports swapped is the echo's
#: answer; `icmpecho` answers ARP and ICMP echo requests. (A swapped SYN is
#: not a SYN-ACK: no crr, no bulk.) The mode is switched when the guest
#: prints the result of the test before.
FLOOR_MODES = {"udp": "5tswap", "ping": "icmpecho"}
FLOOR_TESTS = tuple(FLOOR_MODES)
#: QEMU virtio-net-pci properties that turn every offload off (the floor row).
NO_OFFLOADS = ",".join(f"{k}=off" for k in (
    "csum", "guest_csum", "gso", "host_tso4", "host_tso6", "host_ecn", "host_ufo",
    "guest_tso4", "guest_tso6", "guest_ecn", "guest_ufo"))
# Multiqueue rows: `serve --queues N`, -netdev vhost-user,queues=N, virtio-net-pci,mq=on.
QUEUE_ROWS = {"vhostnet-q2": 2, "vhostnet-q4": 4}
IDLE_POLL_ROWS = {"vhostnet-idle100": 100, "vhostnet-idle300": 300}    # serve --idle-poll-us
BASE_ROW = "vhostnet-base"      # --base-tree: the same as "vhostnet", from another tree
ALL_TESTS = ("isend", "irecv", "send", "recv", "crr", "udp", "ping")
BUILTIN_TESTS = ("send", "recv", "crr", "udp", "ping")   # the services have no iperf3
LOWER_IS_BETTER = {"ping"}
QUICK_SECONDS = 2
GUEST_IP, PREFIX, GATEWAY = "10.0.2.15", 24, "10.0.2.2"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_MODES = "|".join(ALL_TESTS)
RESULT = re.compile(rf"^bench: ({_MODES}) ([0-9.]+) (\S+)(.*)$")
START = re.compile(rf"^bench: ({_MODES}) start$")
IRQS = re.compile(rf"^bench: ({_MODES}) irqs ([0-9]+)$")     # qemu/init: the NIC's interrupts in a test
BUILTIN_PORTS = {"BENCH_DISCARD_PORT": 9, "BENCH_CHARGEN_PORT": 19, "BENCH_ECHO_PORT": 7}
RSS_CONNECTIONS = 1000
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


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads) or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        text = Path(path).read_text()
    except OSError:
        return float("nan")
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


#: Fields of /proc/stat's "cpu" line, after the word (proc(5)): idle and iowait
#: are not busy; steal is the time the hypervisor ran something else while
#: this VM's vCPUs wanted to run.
IDLE_FIELD, IOWAIT_FIELD, STEAL_FIELD = 3, 4, 7


def _cpu_ticks() -> list[int]:
    """/proc/stat's all-cores "cpu" line, in clock ticks since boot."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def host_busy_seconds() -> float:
    """CPU seconds all cores have spent busy (not idle/iowait) since boot."""
    f = _cpu_ticks()
    return (sum(f[:STEAL_FIELD + 1]) - f[IDLE_FIELD] - f[IOWAIT_FIELD]) / CLK_TCK


def steal_seconds() -> float:
    """CPU seconds the hypervisor has taken from all of this VM's cores since boot."""
    f = _cpu_ticks()
    return f[STEAL_FIELD] / CLK_TCK if len(f) > STEAL_FIELD else 0.0


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


def ping_sockets_for(gid: int) -> bool:
    """May group GID open ICMP echo sockets (net.ipv4.ping_group_range)?"""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ping_group_range").read_text().split())
    except (OSError, ValueError):
        return True
    return lo <= gid <= hi


# --- one backend ---------------------------------------------------------------

@dataclass
class Run:
    backend: str
    results: dict = field(default_factory=dict)     # test -> (value, unit, details)
    cpu: dict = field(default_factory=dict)         # test -> {Meters.NAMES: %}
    irqs: dict = field(default_factory=dict)        # test -> interrupts the guest took for the NIC
    lat: dict = field(default_factory=dict)         # test -> {"p50": µs, "p90": µs, "p99": µs} (tcp_bench)
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


def floor_next_mode(testpmd, tests: list[str], done: str) -> None:
    """The floor row: TESTS[i] just ended; testpmd forwards for TESTS[i+1] from now on."""
    i = tests.index(done) + 1 if done in tests else len(tests)
    if i < len(tests) and FLOOR_MODES[tests[i]] != FLOOR_MODES[done]:
        for line in ("stop", f"set fwd {FLOOR_MODES[tests[i]]}", "start"):
            testpmd.cmd(line)


class Bench:
    def __init__(self, args, image: qemu.GuestImage, accel: str, out_dir: Path):
        self.args = args
        self.image = image
        self.accel = accel
        self.out_dir = out_dir
        self.hostsrv_bin: Path | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="vhostnet-bench-"))   # short: AF_UNIX paths
        self.extra_dirs: list[Path] = []
        self.servers: list[HostServers] = []

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
        return 90 + len(self.args.tests) * (self.args.seconds + 25)

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
        tests = self.row_tests(name)
        if name == FLOOR_ROW:
            why = dpdk.skip_reason(pmd="vhost")
            if why or not tests:
                run.skipped = why or f"runs only {', '.join(FLOOR_TESTS)}"
                return run
        run.log_dir = self.out_dir / (name if rep == 0 else f"{name}.{rep + 1}")
        run.log_dir.mkdir(parents=True, exist_ok=True)
        sock = self.tmp / f"{name}.sock"
        procs: list[subprocess.Popen] = []
        testpmd = None
        qemu_proc = None
        try:
            builtin = self.args.builtin and name.startswith("vhostnet")
            if builtin or name == FLOOR_ROW:
                ports = dict(BUILTIN_PORTS)
            else:
                ports = self._host_servers(run, procs)
            backend_pid = None
            if name.startswith("vhostnet"):
                argv = [sys.executable, "-m", "vhostnet", "serve", "--socket", str(sock),
                        "--once", "--log-level", "warning"]
                if not builtin:
                    argv.append("--no-services")     # 10.0.2.2:7/9/19 go to the host too
                if name == "vhostnet-nooffloads":
                    argv += ["--disable-feature", "offloads"]
                if name == "vhostnet-nospin":
                    argv += ["--nat-spin-us", "0"]
                if name == "vhostnet-nohook":
                    argv.append("--no-kick-hook")
                if name == "vhostnet-noexpress":
                    argv.append("--no-express")
                if name in CPU_ROWS:
                    argv += ["--cpu", CPU_ROWS[name]]
                if name in IDLE_POLL_ROWS:
                    argv += ["--idle-poll-us", str(IDLE_POLL_ROWS[name])]
                pairs = QUEUE_ROWS.get(name, 1)
                if pairs > 1:
                    argv += ["--queues", str(pairs)]
                tree = self.args.base_tree if name == BASE_ROW else None
                backend = self._spawn(argv, run.log_dir / "backend.log", tree)
                procs.append(backend)
                wait_path(sock, backend, "vhostnet serve")
                wait_path(Path(str(sock) + ".ctl"), backend, "vhostnet serve (control socket)")
                backend_pid = backend.pid
                netdev = qemu.nic_args(sock, queue_pairs=pairs)
            elif name == "slirp":
                netdev = qemu.nic_args(None, netdev="user")
            elif name == FLOOR_ROW:
                testpmd = dpdk.TestPmd(str(sock), vdev=f"net_vhost0,iface={sock},queues=1",
                                       log=run.log_dir / "backend.log").__enter__()
                testpmd.cmd(f"set fwd {FLOOR_MODES[tests[0]]}")
                testpmd.cmd("start")
                backend_pid = testpmd.proc.pid
                netdev = qemu.nic_args(sock)
                netdev[-1] += "," + NO_OFFLOADS
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
                if "ping" in self.args.tests and not ping_sockets_for(nobody.pw_gid):
                    run.notes.append("passt answers ping through ICMP echo sockets, which "
                                     "net.ipv4.ping_group_range forbids its user nobody here: "
                                     "no ping column (the host's sysctl is left alone)")
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
            guest_vars = {"BENCH": ",".join(tests),
                          "BENCH_SECONDS": self.args.seconds, **ports}
            if name == FLOOR_ROW:
                guest_vars["BENCH_STATIC_ARP"] = 1
            if self.args.streams > 1:
                guest_vars["BENCH_IPERF_STREAMS"] = self.args.streams
            # debug-threads: the vCPU thread is called "CPU 0/TCG", so its CPU time can be told apart
            argv = [qemu.QEMU, "-name", f"bench-{name},debug-threads=on",
                    *qemu.accel_args(self.accel), *qemu.memory_args(),
                    *qemu.console_args(), *netdev,
                    *(["-smp", str(self.args.smp)] if self.args.smp > 1 else []),
                    *qemu.boot_args(self.image, qemu.kernel_append(guest_vars))]
            run.notes.append("backend: " + {"slirp": "QEMU's main thread (slirp + virtio-net "
                                            "emulation)", "passt": "the passt process",
                                            FLOOR_ROW: "dpdk-testpmd (net_vhost, 5tswap / icmpecho; its "
                                            "forwarding lcore busy-polls a core)"}.get(
                name, "the vhostnet Python process, " + ("built-in services" if builtin
                                                         else "--no-services (NAT)")))
            (run.log_dir / "qemu.cmd").write_text(qemu.format_argv(argv) + "\n")
            log(f"{name}: booting the guest ({', '.join(tests)}, "
                f"{self.args.seconds:g} s each)")
            qemu_proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            meters = Meters(qemu_proc.pid, backend_pid, name == "slirp",
                            [qemu_proc.pid, *(p.pid for p in procs)])
            ctl = str(sock) + ".ctl" if name.startswith("vhostnet") else None
            self._watch(run, qemu_proc, meters, ctl, tests,
                        (lambda t: floor_next_mode(testpmd, tests, t)) if testpmd else None)
        except (RuntimeError, dpdk.TestPmdError) as e:
            run.problems.append(str(e))
        finally:
            stop(qemu_proc, 0.5)
            if testpmd is not None:
                testpmd.__exit__(None, None, None)
            for p in reversed(procs):
                stop(p)
                if p.stdout:
                    p.stdout.close()
            while self.servers:
                self.servers.pop().stop()
        return run

    def _host_servers(self, run: Run, procs: list) -> dict:
        """hostsrv (discard/chargen/echo) and, for the iperf3 modes, `iperf3 -s`,
        on free ports of 127.0.0.1; their BENCH_*_PORT guest variables."""
        hs = subprocess.Popen([str(self.hostsrv()), "-t", str(int(self.timeout()) + 30)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=open(run.log_dir / "hostsrv.log", "wb"), text=True)
        procs.append(hs)
        line = hs.stdout.readline()
        m = re.match(r"hostsrv: discard=(\d+) chargen=(\d+) echo=(\d+)", line)
        if not m:
            raise RuntimeError(f"hostsrv did not start: {line!r}")
        ports = dict(zip(BUILTIN_PORTS, map(int, m.groups())))
        if {"isend", "irecv"} & set(self.args.tests):
            servers = HostServers(run.log_dir / "servers", iperf=True)
            self.servers.append(servers)
            try:
                servers.__enter__()
            except Exception as e:        # ServerError, a missing iperf3
                raise RuntimeError(f"iperf3 -s: {e}") from e
            ports["BENCH_IPERF_PORT"] = servers.ports["iperf"]
        return ports

    @staticmethod
    def _spawn(argv: list[str], logfile: Path, tree: Path | None = None) -> subprocess.Popen:
        """Start ARGV with TREE's code (default: this one) on PYTHONPATH, run from TREE,
        so that every vhostnet row runs the code of a named tree (not whatever
        an editable install elsewhere points at) in the same environment."""
        tree = tree or ROOT
        env = dict(os.environ, PYTHONPATH=str(tree))
        with open(logfile, "wb") as out:
            return subprocess.Popen(argv, cwd=tree, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env)

    def row_tests(self, name: str) -> list[str]:
        """The tests row NAME runs: all asked for, or for the floor row those it can."""
        if name == FLOOR_ROW:
            return [t for t in self.args.tests if t in FLOOR_TESTS]
        return list(self.args.tests)

    def _watch(self, run: Run, proc: subprocess.Popen, meters: Meters, ctl: str | None,
               tests: list[str], on_result=None) -> None:
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
                        if pct := percentiles(m[4]):
                            run.lat[m[1]] = pct
                        log(f"{run.backend}: {m[1]} {m[2]} {m[3]}  ({m[4].strip()})")
                        if stats:
                            self._stats(ctl, m[1], stats)
                        if on_result is not None:
                            on_result(m[1])
                    elif m := IRQS.match(line):
                        run.irqs[m[1]] = int(m[2])
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
        for t in tests:
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

COLS = {"isend": "iperf3 g->h Mbit/s", "irecv": "iperf3 h->g Mbit/s",
        "send": "bulk send Mbit/s", "recv": "bulk recv Mbit/s", "crr": "TCP conn/s",
        "udp": "UDP rt/s", "ping": "ping RTT ms"}
BASE = "slirp"          # every ratio is to this row of the same run


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    if n == 0:
        return float("nan")
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def operations(test: str, value: float, seconds: float) -> float:
    """How many operations a test's result stands for: round trips or
    connections (rate x seconds), pings (5 a second), or MB for the bulk tests."""
    if test == "ping":
        return seconds * 5
    if test in ("crr", "udp"):
        return value * seconds
    return value * seconds / 8       # Mbit/s -> MB


def round_order(backends: list[str], rep: int) -> list[str]:
    """The rows' boot order in round REP: rotated by one each round, so that
    every row boots in every place of a round equally often, and a place
    that is slower (after a given row, or first after a pause) costs every
    row alike."""
    k = rep % len(backends)
    return backends[k:] + backends[:k]


def median_of(runs: list[Run], seconds: float = 0.0) -> Run:
    """One row from a backend's repeated boots: per test the median of the
    boots that gave a result (and how many did), the median of each CPU
    figure over the same boots; every boot's problems, numbered."""
    out = Run(runs[0].backend, skipped=runs[0].skipped, log_dir=runs[0].log_dir)
    tests = [t for t in ALL_TESTS if any(t in r.results for r in runs)]
    for t in tests:
        got = [r for r in runs if t in r.results]
        unit = got[0].results[t][1]
        out.results[t] = (median([r.results[t][0] for r in got]), unit,
                          f"median of {len(got)}/{len(runs)}: "
                          + " ".join(f"{r.results[t][0]:g}" for r in got))
        cpus = [r.cpu[t] for r in got if r.cpu.get(t)]
        if cpus:
            out.cpu[t] = {n: median([c[n] for c in cpus]) for n in Meters.NAMES}
        per_op = [r.irqs[t] / ops for r in got if t in r.irqs and (ops := operations(t, r.results[t][0], seconds))]
        if per_op:
            out.irqs[t] = median(per_op)
        lats = [r.lat[t] for r in got if t in r.lat]
        if lats:
            out.lat[t] = {k: median([x[k] for x in lats]) for k in PERCENTILES}
    for i, r in enumerate(runs):
        out.problems += [f"boot {i + 1}: {p}" if len(runs) > 1 else p for p in r.problems]
        out.notes += [n for n in r.notes if n not in out.notes]
    return out


def ratios(rows: list[Run], base: str = BASE) -> dict[str, dict[str, float]]:
    """backend -> test -> value / the base row's value (nan where either is missing)."""
    ref = next((r for r in rows if r.backend == base and not r.skipped), None)
    out = {}
    for r in rows:
        if r.skipped:
            continue
        out[r.backend] = {}
        for t, v in r.results.items():
            b = ref.results.get(t) if ref else None
            out[r.backend][t] = v[0] / b[0] if b and b[0] else float("nan")
    return out


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i])  # noqa: E731
                                   for i, c in enumerate(cells))
    return [line(head), "-" * len(line(head)), *(line(r) for r in rows)]


def _num(v: float) -> str:
    if v != v:
        return "-"
    return f"{v:,.2f}" if v < 10 else f"{v:,.0f}"


def table(rows: list[Run], tests: list[str], base: str = BASE) -> str:
    """The values (medians), the ratios to BASE, the backend's CPU, and the CPU detail."""
    tests = [t for t in ALL_TESTS if t in tests]
    lines = []
    body = []
    for r in rows:
        if r.skipped:
            body.append([r.backend, f"skipped: {r.skipped}"] + [""] * (len(tests) - 1))
            continue
        body.append([r.backend] + [_num(r.results[t][0]) if t in r.results else "-" for t in tests])
    lines += _grid(["backend"] + [COLS[t] for t in tests], body)
    rat = ratios(rows, base)
    if any(r.backend == base and not r.skipped for r in rows):
        lines += ["", f"ratio to {base} (same run; ping: lower is better, every other column "
                      "higher is better):"]
        body = [[b] + [f"{v[t]:.2f}x" if v.get(t, float('nan')) == v.get(t, float('nan'))
                       and t in v else "-" for t in tests] for b, v in rat.items()]
        lines += _grid(["backend"] + tests, body)
    lines += ["", "backend CPU during each test, % of one core (median):"]
    body = [[r.backend] + [f"{r.cpu[t]['backend']:.0f}" if r.cpu.get(t) else "-" for t in tests]
            for r in rows if not r.skipped]
    lines += _grid(["backend"] + tests, body)
    lines += ["", "CPU detail, % of one core: backend / QEMU main thread / guest vCPU / other "
                  "processes on the host (contention):"]
    body = [[r.backend] + [f"{c['backend']:.0f}/{c['qemu_main']:.0f}/{c['vcpu']:.0f}/"
                           f"{c['others']:.0f}" if (c := r.cpu.get(t)) else "-" for t in tests]
            for r in rows if not r.skipped]
    lines += _grid(["backend"] + tests, body)
    lat = [t for t in tests if t in PER_OP_TESTS]
    if lat:
        lines += ["", "CPU per operation, µs: backend / QEMU main thread / guest vCPU (their sum) "
                      "against the operation's time (1 s / rate). One operation is "
                      "in flight, so the three mostly take turns: the sum is about the least the "
                      "operation can take with them (median):"]
        body = [[r.backend] + [per_op(r, t) for t in lat] for r in rows if not r.skipped]
        lines += _grid(["backend"] + lat, body)
    lat = [t for t in tests if any(t in r.lat for r in rows)]
    if lat:
        lines += ["", "one operation's time in the guest, µs: median / 90th / 99th percentile, and the "
                      "mean (1 s / rate; the rate is what the mean makes, so a slow tail costs it "
                      "as much as a slow median; median over boots):"]
        body = [[r.backend] + [(f"{x['p50']:.0f} / {x['p90']:.0f} / {x['p99']:.0f} ({1e6 / r.results[t][0]:.0f})"
                                if (x := r.lat.get(t)) and r.results.get(t, (0,))[0] else "-") for t in lat]
                for r in rows if not r.skipped]
        lines += _grid(["backend"] + lat, body)
    if any(r.irqs for r in rows):
        lines += ["", "interrupts the guest took for its NIC, per operation (round trip, connection, "
                      "ping; per MB for bulk; median):"]
        body = [[r.backend] + [f"{r.irqs[t]:.2f}" if t in r.irqs else "-" for t in tests]
                for r in rows if not r.skipped]
        lines += _grid(["backend"] + tests, body)
    return "\n".join(lines)


#: What tcp_bench's crr and udp lines give of one operation's time, in µs.
PERCENTILES = ("p50", "p90", "p99")
_PCT = re.compile(r"\b(p50|p90|p99)_us=([0-9]+)")


def percentiles(details: str) -> dict[str, float]:
    """{"p50": µs, ...} from a result line's details; {} when it has none
    (a guest image built before tcp_bench gave them)."""
    got = {k: float(v) for k, v in _PCT.findall(details)}
    return got if len(got) == len(PERCENTILES) else {}


#: The request/response tests, one operation in flight: their CPU per operation.
#: (Not ping: at 5 a second, a backend's background work, timers and safety
#: polls, would outweigh the ping's own.)
PER_OP_TESTS = ("crr", "udp")


def per_op(r: Run, test: str) -> str:
    """'b/m/v (sum) of T': each party's CPU per operation of TEST in µs, and the operation's time."""
    c = r.cpu.get(test)
    value = r.results.get(test, (0,))[0]
    if not c or not value:
        return "-"
    us = {k: c[k] * 1e4 / value for k in ("backend", "qemu_main", "vcpu")}   # % of a core -> µs per op
    if r.backend == "slirp":
        us["qemu_main"] = 0.0          # slirp's "backend" is QEMU's main thread: count it once
    total = sum(us.values())
    return f"{us['backend']:.0f}/{us['qemu_main']:.0f}/{us['vcpu']:.0f} ({total:.0f}) of {1e6 / value:.0f}"


# Issue 12, part 4: each as a ratio to slirp in the same run (and bulk to passt).
TARGETS = (("send", ">=", 1.5, BASE), ("recv", ">=", 1.5, BASE), ("send", ">=", 1.0, "passt"),
           ("recv", ">=", 1.0, "passt"), ("crr", ">=", 1.0, BASE), ("udp", ">=", 1.0, BASE),
           ("ping", "<=", 1.0, BASE))


def targets(rows: list[Run], who: str = "vhostnet") -> list[str]:
    """One line per target: met or not, with the ratio."""
    out = []
    for t, op, want, peer in TARGETS:
        r = ratios(rows, peer).get(who, {}).get(t)
        if r is None or r != r:
            continue
        ok = r >= want if op == ">=" else r <= want
        out.append(f"{'met' if ok else 'MISSED'}: {who} {t} {r:.2f}x {peer} (target {op} {want:g}x)")
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


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def rss_bench(n: int = RSS_CONNECTIONS) -> dict:
    """VmRSS of a `vhostnet serve` before and with N open NAT connections."""
    import trio
    tmp = Path(tempfile.mkdtemp(prefix="vhostnet-rss-"))
    sock = tmp / "v.sock"
    b = subprocess.Popen([sys.executable, "-m", "vhostnet", "serve", "--socket", str(sock),
                          "--once", "--log-level", "warning", "--max-nat-tcp", str(n + 24)],
                         cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    res = {}
    try:
        wait_path(Path(str(sock) + ".ctl"), b, "vhostnet serve")

        async def main():
            from stack.tcp.config import TcpConfig
            from vhostnet.testing.frontend import Frontend
            from tests.hostnet.guest import GW_B, FeGuest
            held = []
            ls = trio.socket.socket()
            await ls.bind(("127.0.0.1", 0))
            ls.listen(2048)
            port = ls.getsockname()[1]
            async with trio.open_nursery() as nur:
                async def acceptor():
                    while True:
                        s, _ = await ls.accept()
                        held.append(s)
                nur.start_soon(acceptor)
                fe = Frontend()
                await fe.connect(str(sock))
                from vhostnet.virtio import features as F
                await fe.handshake(features=F.DEFAULT_FEATURES & ~F.OFFLOAD_FEATURES)
                fe.post_rx()
                fe.rx.kick()
                g = FeGuest(fe, TcpConfig(max_connections=n + 24, rcvbuf=65536, sndbuf=65536))
                nur.start_soon(g.run)
                await trio.sleep(0.5)
                res["rss_before_kib"] = rss_kib(b.pid)
                conns = []
                for i in range(n):
                    conns.append(await g.connect(GW_B, port, timeout=30))
                res["established"] = sum(c.state.value == "ESTABLISHED" for c in conns)
                with trio.fail_after(30):
                    while len(held) < n:
                        await trio.sleep(0.05)
                await trio.sleep(1.0)
                res["rss_with_kib"] = rss_kib(b.pid)
                res["host_accepted"] = len(held)
                nur.cancel_scope.cancel()
        trio.run(main)
    finally:
        stop(b)
        shutil.rmtree(tmp, ignore_errors=True)
    return res



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backends", default=",".join(b for b in ALL_BACKENDS if b not in EXTRA_ROWS),
                   help="comma-separated, from: " + ", ".join(ALL_BACKENDS))
    p.add_argument("--tests", default=None,
                   help="comma-separated, from: " + ", ".join(ALL_TESTS)
                        + f" (default all; with --builtin {','.join(BUILTIN_TESTS)})")
    p.add_argument("--seconds", type=int, default=5, help="per test, whole seconds (default 5)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="boot each backend N times, round-robin; each cell is the median")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke check: 1 boot per backend, {QUICK_SECONDS} s per test")
    p.add_argument("--builtin", action="store_true",
                   help="vhostnet rows on its built-in services (not the same work; a "
                        "separate, labelled table)")
    p.add_argument("--rss", action="store_true",
                   help=f"only the RSS of vhostnet serve idle and with {RSS_CONNECTIONS} NAT "
                        "connections (no guest)")
    p.add_argument("--smp", type=int, default=1, metavar="N", help="guest vCPUs, every row (default 1)")
    p.add_argument("--streams", type=int, default=1, metavar="N",
                   help="iperf3 parallel streams (-P N) for isend/irecv (default 1)")
    p.add_argument("--base-tree", type=Path, default=None, metavar="DIR",
                   help=f"another vhostnet checkout; adds the row {BASE_ROW} (its code), for "
                        "before/after in the same run")
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    p.add_argument("--no-build", action="store_true", help="use the guest image as built")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each boot, wait up to SECONDS for other processes to go "
                        f"below {QUIET:.0f}%% of one core (for shared machines)")
    p.add_argument("-v", "--verbose", action="store_true", help="echo the guest console")
    args = p.parse_args(argv)
    # Ctrl-C or SIGTERM (even when started in the background, where SIGINT may
    # come in ignored) unwinds through the finally blocks that stop QEMU,
    # the backend and the host servers.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.rss:
        r = rss_bench()
        print(f"vhostnet RSS: {r.get('rss_before_kib', 0) / 1024:.1f} MiB idle, "
              f"{r.get('rss_with_kib', 0) / 1024:.1f} MiB with {r.get('established')} open NAT "
              f"connections ({r.get('host_accepted')} accepted by the host listener)")
        return 0
    if args.quick:
        args.repeat, args.seconds = 1, QUICK_SECONDS
    backends = [b for b in args.backends.split(",") if b]
    default = BUILTIN_TESTS if args.builtin else ALL_TESTS
    args.tests = [t for t in (args.tests.split(",") if args.tests else default) if t]
    if args.base_tree is not None:
        if not (args.base_tree / "vhostnet" / "__init__.py").is_file():
            p.error(f"--base-tree {args.base_tree}: not a vhostnet checkout")
        args.base_tree = args.base_tree.resolve()
        if BASE_ROW not in backends:
            backends.insert(0, BASE_ROW)
    for b in backends:
        if b not in ALL_BACKENDS and not (b == BASE_ROW and args.base_tree is not None):
            p.error(f"unknown backend {b!r} (choose from {', '.join(ALL_BACKENDS)}"
                    f"; {BASE_ROW} with --base-tree)")
    for t in args.tests:
        if t not in ALL_TESTS:
            p.error(f"unknown test {t!r} (choose from {', '.join(ALL_TESTS)})")
    if args.builtin and {"isend", "irecv"} & set(args.tests):
        p.error("--builtin: the built-in services have no iperf3 (tests: "
                + ",".join(BUILTIN_TESTS) + ")")
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
    if {"isend", "irecv"} & set(args.tests):
        image = image.with_apps()         # iperf3; the same image for every backend
    accel = qemu.choose_accel(args.accel)
    idle_load = host_load(1.0)
    load_avg = os.getloadavg()
    # What a wake-up costs now: on a shared VM it moves by 3x within a day,
    # and every latency column is a chain of them (docs/benchmarks.md, "What
    # one wake-up costs").
    wake_start = wake_cost.measure()
    steal_start, t_start = steal_seconds(), time.monotonic()
    if idle_load > 20:
        log(f"warning: the host is busy before the benchmark ({idle_load:.0f}% of one core in "
            f"use by other processes); the numbers will be low and noisy")
    out_dir = ROOT / "logs" / "bench-qemu" / time.strftime("%Y%m%d-%H%M%S")
    bench = Bench(args, image, accel, out_dir)
    all_runs: list[Run] = []
    try:
        for rep in range(args.repeat):          # round-robin: noise hits every row alike
            for b in round_order(backends, rep):
                all_runs.append(bench.run(b, rep))
    finally:
        bench.close()
    rows = [median_of([r for r in all_runs if r.backend == b], args.seconds) for b in backends]
    end_avg = os.getloadavg()
    print()
    if args.builtin:
        print("# BUILT-IN SERVICES: the vhostnet rows talk to the backend's own discard/chargen/"
              "echo on 10.0.2.2 (no host sockets);\n# slirp and passt talk to host servers. "
              "Not the same work: not what an application through the NAT sees.")
    else:
        print("# SAME WORK: every backend NATs the guest to the same host servers on 127.0.0.1 "
              "(hostsrv, iperf3 -s); vhostnet with --no-services")
    print(f"# bench_qemu: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"accel {accel}, guest {image.kernel_version}, {args.seconds:g} s per test, MTU 1500, "
          f"median of {args.repeat} boot(s) per backend, round-robin; host busy before start "
          f"{idle_load:.0f}% of one core; load average {load_avg[0]:.2f} at start, "
          f"{end_avg[0]:.2f} at end")
    steal = 100.0 * (steal_seconds() - steal_start) / max(time.monotonic() - t_start, 1e-9)
    print(f"# hypervisor steal during the run: {steal:.0f}% of one core (time the VM's "
          f"vCPUs wanted and did not get; on a shared VM the races' rates fall with it)")
    print(f"# {wake_cost.summary(wake_start)} at start; {wake_cost.summary(wake_cost.measure())} at end "
          f"(scripts/wake_cost.py)")
    print(table(rows, args.tests))
    if not args.builtin:
        t = targets(rows)
        if any(r.backend == BASE_ROW for r in rows):
            t += targets(rows, BASE_ROW)
        if t:
            print("\nissue 12 targets (ratios of medians):\n  " + "\n  ".join(t))
    bad = 0
    for r in rows:
        for n in r.notes:
            print(f"\n{r.backend}: {n}")
        if args.repeat > 1:
            for t, v in r.results.items():
                print(f"{r.backend}: {t}: {v[2]}")
        for run in (x for x in all_runs if x.backend == r.backend):
            s = retransmit_summary(run)
            if s:
                print(f"\n{r.backend} ({run.log_dir.name}): the backend's counters during each "
                      f"test:\n{s}")
        for prob in r.problems:
            print(f"\n{r.backend}: PROBLEM: {prob}")
            bad += 1
    print(f"\nlogs: {out_dir}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
