#!/usr/bin/env python3
"""smoke.py: boot the test guest on a vhostnet backend and check its markers.

    python3 qemu/smoke.py                  # NET=1: every network test
    NET=1 TCP_ECHO_TEST=1 python3 qemu/smoke.py
    BACKEND=slirp python3 qemu/smoke.py    # check the image on QEMU's own slirp

Steps: build the guest image if its inputs changed (scripts/build-guest.sh),
start `python -m vhostnet serve --socket SOCK --once` with its log in a file,
wait for the socket, boot QEMU (vhostnet/launch/qemu.py builds the argv) with the
NIC on that socket, read the serial console until the guest powers off or the
timeout, then check the markers the guest init prints.

It fails (exit 1, log paths printed) when an expected marker is missing, a
"FAIL:" line appears, QEMU says it is "falling back on userspace virtio" (the
NIC silently stopped using the backend), QEMU or the backend exits non-zero,
or the backend logs a traceback.

Switches, from the environment or the matching --options (1 on, 0 off):
  NET=1                 bring up the network in the guest (default 1)
  EXPECT_NET            expect ready / ARP reply / ping ok (default: NET)
  ICMP_TEST, TCP_ECHO_TEST, UDP_ECHO_TEST, NET_LOOPBACK_TEST
                        run and expect that test (default: NET; with
                        BACKEND=slirp only ICMP_TEST, as slirp has no echo
                        service and does not reflect frames to the guest)
  IPERF_TEST, REDIS_TEST, GIT_TEST
                        application tests (default 0): the guest boots the
                        image with iperf3, redis-cli and git, and runs them
                        against real servers this runner starts on 127.0.0.1
                        (iperf3 -s, redis-server, git daemon over a bare repo
                        it makes; vhostnet/testing/hostservers.py) and stops
                        afterwards; the guest reaches them as 10.0.2.2:PORT,
                        so they need NAT (slirp has it)
  MQ_TEST               multiqueue (default 0; with QUEUES=2): the guest, with
                        the applications archive, runs TCP echo pinned to each
                        CPU after `ethtool -L eth0 combined 2`, then after
                        `combined 1`, and checks `ethtool -S` per-queue counts
  BACKEND               vhostnet (default) or slirp
  MACHINE               q35 (default) or virt-aarch64 (boots the arm64 image,
                        GUEST_ARCH=arm64 scripts/build-guest.sh)
  TRANSPORT             pci or mmio (default: the machine's; q35 has pci only)
  LEGACY                1: a legacy-only device (disable-modern=on,
                        virtio-mmio.force-legacy=true); 0: modern-only;
                        unset: QEMU's default (transitional PCI, legacy mmio)
  QUEUE_SIZE            rx_queue_size and tx_queue_size of the NIC (e.g. 1024)
  PACKED=1              packed virtqueues (the NIC's packed=on; virtio 1.2 §2.8)
  QUEUES=N              N queue pairs (multiqueue): -netdev vhost-user,queues=N,
                        virtio-net-pci,mq=on, `serve --queues N` and -smp N
  SMOKE_TIMEOUT         seconds for the whole guest run (default 120)
  ACCEL                 auto (default), kvm or tcg
  BACKEND_ARGS          extra arguments for `vhostnet serve`
  SMOKE_LOG_DIR         where run directories go (default logs/qemu-smoke)
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shlex
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
from vhostnet.testing.hostservers import HostServers, ServerError

GATEWAY = "10.0.2.2"
FALLBACK = "falling back on userspace virtio"
KEEP_RUNS = 20
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")

# (switch, marker the guest prints when that test passes)
NET_MARKERS = ["net: virtio-net ready", f"net: arp reply from {GATEWAY}", "net: ping ok"]
TEST_MARKERS = [
    ("ICMP_TEST", "icmp: ok"),
    ("TCP_ECHO_TEST", "tcp-echo: ok"),
    ("UDP_ECHO_TEST", "udp-echo: ok"),
    ("NET_LOOPBACK_TEST", "net: tcp loopback ok"),
    ("IPERF_TEST", "iperf3: ok"),
    ("REDIS_TEST", "redis: ok"),
    ("GIT_TEST", "git: ok"),
    ("MQ_TEST", "mq: ok"),
]
# Tests that QEMU's slirp can serve, on by default with BACKEND=slirp.
SLIRP_TESTS = {"ICMP_TEST"}
# The guest prints the virtio feature bits its driver took (sysfs: a string
# of 0/1, bit 0 first) after this.
FEATURES_LINE = "net: virtio features "
# Application tests: off unless asked for; they need host servers.
APP_TESTS = {"IPERF_TEST": "iperf", "REDIS_TEST": "redis", "GIT_TEST": "git"}
# Off unless asked for too: they need the applications archive, not a host server
# (MQ_TEST: ethtool -L and ethtool -S in the guest; give it QUEUES=2).
APP_ONLY_TESTS = {"MQ_TEST"}


# --- configuration -----------------------------------------------------------

def _flag(value: str | None, default: bool, name: str) -> bool:
    if value is None or value == "":
        return default
    if value not in ("0", "1"):
        raise SystemExit(f"smoke: {name} must be 0 or 1, not {value!r}")
    return value == "1"


@dataclass
class Plan:
    backend: str = "vhostnet"
    net: bool = True
    expect_net: bool = True
    tests: dict[str, bool] = field(default_factory=dict)
    timeout: float = 120.0
    accel: str = "auto"
    backend_args: list[str] = field(default_factory=list)
    append: str = ""
    memory: str = qemu.DEFAULT_MEMORY
    machine: str = "q35"
    transport: str | None = None
    legacy: bool | None = None
    queue_size: int | None = None
    packed: bool = False
    queues: int = 1

    def guest_vars(self, ports: dict[str, int] | None = None) -> dict[str, int]:
        """Switches for the guest's command line, plus the host servers' PORTS."""
        v = {"NET": int(self.net)}
        if self.net:
            v.update({name: int(on) for name, on in self.tests.items()})
            v.update(ports or {})
        return v

    def apps(self) -> dict[str, bool]:
        """Which host servers the application tests need."""
        return {server: self.net and self.tests.get(name, False)
                for name, server in APP_TESTS.items()}

    def expected(self) -> list[str]:
        out = ["init: start"]
        if self.net and self.expect_net:
            out += NET_MARKERS
        if self.net:
            out += [marker for name, marker in TEST_MARKERS if self.tests[name]]
        out.append("init: done")
        return out


def make_plan(args: argparse.Namespace) -> Plan:
    env = os.environ
    backend = args.backend or env.get("BACKEND") or "vhostnet"
    if backend not in ("vhostnet", "slirp"):
        raise SystemExit(f"smoke: BACKEND must be vhostnet or slirp, not {backend!r}")
    net = _flag(args.net or env.get("NET"), True, "NET")
    tests = {}
    for name, _ in TEST_MARKERS:
        default = net and name not in APP_TESTS and name not in APP_ONLY_TESTS and (backend != "slirp" or name in SLIRP_TESTS)
        tests[name] = _flag(getattr(args, name.lower()) or env.get(name), default, name)
    machine = args.machine or env.get("MACHINE") or "q35"
    transport = args.transport or env.get("TRANSPORT") or None
    try:
        if not qemu.machine(machine).image_arch:
            raise ValueError(f"there is no test image for the {machine} machine")
        qemu.transport_of(qemu.machine(machine), transport)
    except ValueError as e:
        raise SystemExit(f"smoke: {e}") from None
    legacy = args.legacy or env.get("LEGACY")
    if legacy not in (None, "", "0", "1"):
        raise SystemExit(f"smoke: LEGACY must be 0 or 1, not {legacy!r}")
    queue_size = args.queue_size or env.get("QUEUE_SIZE")
    if queue_size is not None and not str(queue_size).isdigit():
        raise SystemExit(f"smoke: QUEUE_SIZE must be a number, not {queue_size!r}")
    queues = args.queues or env.get("QUEUES") or "1"
    if not str(queues).isdigit() or int(queues) < 1:
        raise SystemExit(f"smoke: QUEUES must be a number >= 1, not {queues!r}")
    return Plan(
        queues=int(queues),
        machine=machine, transport=transport,
        legacy=None if legacy in (None, "") else legacy == "1",
        queue_size=int(queue_size) if queue_size else None,
        packed=_flag(args.packed or env.get("PACKED"), False, "PACKED"),
        backend=backend, net=net, tests=tests,
        expect_net=_flag(args.expect_net or env.get("EXPECT_NET"), net, "EXPECT_NET"),
        timeout=float(args.timeout or env.get("SMOKE_TIMEOUT") or 120),
        accel=args.accel or env.get("ACCEL") or "auto",
        backend_args=shlex.split(args.backend_args or env.get("BACKEND_ARGS") or ""),
        append=args.append or "", memory=args.memory or qemu.DEFAULT_MEMORY)


# --- the run -----------------------------------------------------------------

class Failure(Exception):
    pass


def log(msg: str) -> None:
    print(f"smoke: {msg}", flush=True)


def build_image(skip: bool, arch: str = "amd64") -> qemu.GuestImage:
    if not skip:
        t0 = time.monotonic()
        r = subprocess.run(["bash", str(ROOT / "scripts" / "build-guest.sh")], cwd=ROOT,
                           env={**os.environ, "GUEST_ARCH": arch})
        if r.returncode != 0:
            raise Failure(f"GUEST_ARCH={arch} scripts/build-guest.sh failed (exit {r.returncode})")
        log(f"{arch} guest image ready in {time.monotonic() - t0:.1f} s")
    return qemu.find_image(arch=arch)


def new_run_dir() -> Path:
    base = Path(os.environ.get("SMOKE_LOG_DIR") or ROOT / "logs" / "qemu-smoke")
    base.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in base.iterdir() if p.is_dir())
    for p in old[:max(0, len(old) - KEEP_RUNS + 1)]:
        shutil.rmtree(p, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base))


def start_backend(plan: Plan, sock: Path, logfile: Path) -> subprocess.Popen:
    # No test traffic leaves the machine: the DNS relay's default upstreams are
    # the host's resolvers (off-machine here), so DNS is off unless the run
    # names its own upstream (a server it started on 127.0.0.1).
    dns = [] if any(a.startswith("--dns-upstream") or a == "--no-dns" for a in plan.backend_args) \
        else ["--no-dns"]
    queues = [] if plan.queues == 1 or any(a.startswith("--queues") for a in plan.backend_args) \
        else ["--queues", str(plan.queues)]
    argv = [sys.executable, "-m", "vhostnet", "serve", "--socket", str(sock), "--once",
            *dns, *queues, *plan.backend_args]
    log(f"backend: {shlex.join(argv)}")
    out = open(logfile, "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None:
            raise Failure(f"the backend exited with status {proc.returncode} before "
                          f"listening on {sock}")
        if time.monotonic() > deadline:
            raise Failure(f"the backend did not create {sock} within 15 s")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen | None, grace: float) -> int | None:
    """Wait up to GRACE s for PROC to exit, then SIGTERM it, then SIGKILL it."""
    if proc is None:
        return None
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


@dataclass
class Console:
    lines: list[str] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)   # marker -> seconds
    said: dict[str, str] = field(default_factory=dict)     # marker -> its whole line
    fails: list[str] = field(default_factory=list)
    fallback: str | None = None
    qemu_said: list[str] = field(default_factory=list)     # QEMU's own warnings/errors
    timed_out: bool = False


def watch_console(proc: subprocess.Popen, plan: Plan, console_log: Path,
                  echo: bool) -> Console:
    """Read QEMU's stdout (serial console + QEMU's own stderr) until it exits
    or the timeout, noting markers, FAIL lines and the fallback warning."""
    lines: queue.Queue = queue.Queue()

    def reader():
        with open(console_log, "w") as f:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                f.write(line + "\n")
                f.flush()
                lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    markers = plan.expected()
    c = Console()
    t0 = time.monotonic()
    deadline = t0 + plan.timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            c.timed_out = True
            break
        if line is None:
            break
        text = ANSI.sub("", line).replace("\r", "")
        c.lines.append(text)
        if echo:
            print(f"  | {text}", flush=True)
        now = time.monotonic() - t0
        for m in markers:
            if m in text and m not in c.seen:
                c.seen[m] = now
                c.said[m] = text.strip()
        if "FAIL:" in text:
            c.fails.append(text.strip())
        if FALLBACK in text and c.fallback is None:
            c.fallback = text.strip()
        if text.startswith("qemu-system-") and len(c.qemu_said) < 50:
            c.qemu_said.append(f"{now:6.1f} s  {text}")
    return c


@dataclass
class Excerpt:
    range: range
    lines: list[str]

    def __bool__(self) -> bool:
        return bool(self.lines)


def context(lines: list[str], needle: str, n: int = 3) -> Excerpt:
    """The lines around the first one containing NEEDLE."""
    for i, line in enumerate(lines):
        if needle in line:
            r = range(max(0, i - n), min(len(lines), i + n + 1))
            return Excerpt(r, lines[r.start:r.stop])
    return Excerpt(range(0), [])


def run(plan: Plan, args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    machine = qemu.machine(plan.machine)
    image = build_image(args.no_build, machine.image_arch)
    run_dir = new_run_dir()
    console_log, backend_log = run_dir / "console.log", run_dir / "backend.log"
    sock_dir = Path(tempfile.mkdtemp(prefix="vhostnet-smoke-"))   # short path for AF_UNIX
    sock = sock_dir / "vhost.sock"
    backend = qemu_proc = None
    problems: list[str] = []
    c = Console()
    boot_secs = 0.0
    accel = qemu.machine_accel(plan.accel, machine)
    if plan.accel == "auto" and accel == "tcg" and machine.name == "q35" and os.path.exists("/dev/kvm"):
        log(f"accel tcg: {qemu.kvm_verdict().reason}")
    servers = HostServers(run_dir / "servers", **plan.apps())
    try:
        if any(plan.apps().values()) or any(plan.tests.get(t) for t in APP_ONLY_TESTS):
            image = image.with_apps()
            servers.__enter__()
            log(f"host servers on 127.0.0.1: "
                f"{', '.join(f'{k} {v}' for k, v in servers.ports.items())}")
        if plan.backend == "vhostnet":
            backend = start_backend(plan, sock, backend_log)
        else:
            backend_log.write_text("BACKEND=slirp: QEMU's user-mode network, no vhostnet backend\n")
        guest_vars = plan.guest_vars(servers.guest_vars())
        argv = qemu.qemu_argv(sock, netdev="vhost-user" if plan.backend == "vhostnet" else "user",
                              image=image, guest_vars=guest_vars, append=plan.append,
                              memory=plan.memory, accel=accel, machine=machine,
                              transport=plan.transport, legacy=plan.legacy,
                              queue_size=plan.queue_size, packed=plan.packed,
                              queue_pairs=plan.queues,
                              extra_args=["-smp", str(plan.queues)] if plan.queues > 1 else [])
        (run_dir / "qemu.cmd").write_text(qemu.format_argv(argv) + "\n")
        log(f"guest: {', '.join(f'{k}={v}' for k, v in guest_vars.items())}; "
            f"backend {plan.backend}; {machine.name} {qemu.transport_of(machine, plan.transport)}"
            f"{'' if plan.legacy is None else (' legacy' if plan.legacy else ' modern')}; "
            f"accel {accel}; timeout {plan.timeout:.0f} s")
        log(f"qemu: {shlex.join(argv)}")
        t_boot = time.monotonic()
        qemu_proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        c = watch_console(qemu_proc, plan, console_log, echo=not args.quiet)
        boot_secs = time.monotonic() - t_boot
        if c.timed_out:
            problems.append(f"timeout: the guest did not power off within {plan.timeout:.0f} s")
        qemu_rc = stop(qemu_proc, 0 if c.timed_out else 5)
        if not c.timed_out and qemu_rc != 0:
            problems.append(f"QEMU exited with status {qemu_rc}")
        backend_rc = stop(backend, 10)
        if backend is not None and backend_rc not in (0, None) and not c.timed_out:
            problems.append(f"the backend exited with status {backend_rc}")
        problems += servers.verify()
    except (Failure, ServerError, qemu.ImageNotBuilt) as e:
        problems.append(str(e))
    finally:
        stop(qemu_proc, 0)
        stop(backend, 0)
        servers.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)

    # --- verdict
    backend_text = backend_log.read_text(errors="replace") if backend_log.exists() else ""
    if "Traceback (most recent call last)" in backend_text:
        problems.append("the backend logged a traceback")
    if c.fallback:
        problems.append(f"QEMU fell back on userspace virtio: {c.fallback!r}")
    problems += [f"guest: {line}" for line in c.fails]
    if qemu_proc is not None:   # else the run failed before the guest started
        problems += [f"missing marker: {m!r}" for m in plan.expected() if m not in c.seen]

    if args.result_json:
        Path(args.result_json).write_text(json.dumps({
            "passed": not problems, "problems": problems,
            "markers": {m: c.seen.get(m) for m in plan.expected()},
            "marker_lines": {m: c.said.get(m) for m in plan.expected()},
            "guest_vars": plan.guest_vars(servers.ports and servers.guest_vars()),
            "machine": machine.name, "transport": qemu.transport_of(machine, plan.transport),
            "legacy": plan.legacy, "queue_size": plan.queue_size, "packed": plan.packed,
            "queues": plan.queues,
            "guest_features": next((line.split()[-1] for line in c.lines
                                    if line.startswith(FEATURES_LINE)), None),
            "backend": plan.backend, "accel": accel,
            "guest_seconds": boot_secs, "run_dir": str(run_dir),
            "console_log": str(console_log), "backend_log": str(backend_log)}, indent=2))

    if c.qemu_said:
        print("\n  QEMU said:\n" + "\n".join(f"    {line}" for line in c.qemu_said))
    if qemu_proc is not None:
        print()
        for m in plan.expected():
            print(f"  {'ok  ' if m in c.seen else 'MISS'} {c.said.get(m, m)}"
                  + (f"  ({c.seen[m]:.1f} s)" if m in c.seen else ""))
        print()
    if not problems:
        log(f"PASS in {time.monotonic() - t_start:.1f} s (guest {boot_secs:.1f} s, "
            f"init: start at {c.seen.get('init: start', 0):.1f} s); logs in {run_dir}")
        return 0
    for p in problems:
        log(f"FAIL: {p}")
    shown: set[int] = set()
    for needle in [*c.fails, *([c.fallback] if c.fallback else [])]:
        around = context(c.lines, needle, 4)
        if around and not shown.intersection(around.range):
            shown.update(around.range)
            print("  console around it:\n" + "\n".join(f"    {line}" for line in around.lines))
    if not shown and c.lines:
        print("  console (last lines):\n" + "\n".join(f"    {line}" for line in c.lines[-12:]))
    tail = backend_text.strip().splitlines()[-15:]
    if tail and plan.backend == "vhostnet":
        print("  backend log (last lines):\n" + "\n".join(f"    {line}" for line in tail))
    log(f"console log: {console_log}")
    log(f"backend log: {backend_log}")
    if qemu_proc is not None:
        log(f"qemu command: {run_dir / 'qemu.cmd'}")
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Each option overrides the environment variable of "
                                       "the same name (see the module docstring).")
    p.add_argument("--backend", choices=["vhostnet", "slirp"])
    p.add_argument("--machine", choices=[n for n, m in qemu.MACHINES.items() if m.image_arch])
    p.add_argument("--transport", choices=["pci", "mmio"])
    p.add_argument("--legacy", choices=["0", "1"])
    p.add_argument("--queue-size", help="rx_queue_size and tx_queue_size of the NIC")
    p.add_argument("--packed", choices=["0", "1"], help="packed virtqueues (packed=on)")
    p.add_argument("--queues", help="queue pairs (multiqueue: queues=N, mq=on, -smp N)")
    p.add_argument("--net", choices=["0", "1"])
    p.add_argument("--expect-net", choices=["0", "1"])
    for name, _ in TEST_MARKERS:
        p.add_argument(f"--{name.lower().replace('_', '-')}", dest=name.lower(), choices=["0", "1"])
    p.add_argument("--timeout", type=float, help="seconds for the guest run (default 120)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"])
    p.add_argument("--backend-args", help="extra arguments for `vhostnet serve`")
    p.add_argument("--append", help="extra kernel command-line words")
    p.add_argument("--memory", help=f"guest RAM (default {qemu.DEFAULT_MEMORY})")
    p.add_argument("--no-build", action="store_true", help="use the image as built")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the console")
    p.add_argument("--result-json", metavar="PATH", help="also write the verdict as JSON to PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    m = qemu.machine(plan.machine)
    if shutil.which(m.qemu) is None:
        log(f"{m.qemu} not found (install {m.package}: make setup)")
        return 2
    try:
        return run(plan, args)
    except (qemu.ImageNotBuilt, Failure) as e:
        log(f"FAIL: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
