#!/usr/bin/env python3
"""bench_nat.py: vhostnet's NAT against slirp and passt, on the same guest and host servers.

    python3 scripts/bench_nat.py                         # every backend, 5 s per test
    python3 scripts/bench_nat.py --backends vhostnet,slirp --seconds 3
    python3 scripts/bench_nat.py --rss-only              # just the 1,000-connection RSS

Every backend does the same work: the test guest (qemu/, Linux 6.1, TCG)
runs qemu/guest/tcp_bench against 10.0.2.2:PORT, and every backend maps
that to the host's 127.0.0.1:PORT, where scripts/hostsrv.c serves discard,
chargen and echo on free ports. So for vhostnet the bytes go through its
NAT (vhostnet/hostnet) and real host sockets, exactly like slirp's and
passt's, and unlike scripts/bench_qemu.py's vhostnet rows (its built-in
services, no host sockets).

  send   guest->host bulk TCP to discard (Mbit/s)
  recv   host->guest bulk TCP from chargen (Mbit/s)
  crr    TCP connect + 1-byte echo + close, sequential (connections/s)
  udp    64-byte UDP echo round trips, one in flight (round trips/s)

Backends: vhostnet (`vhostnet serve`), slirp (QEMU -netdev user), passt
(-netdev stream to `passt`). CPU: utime+stime of the backend process
during each test, in % of one core (for slirp: QEMU's main thread, where
slirp runs, together with QEMU's virtio-net emulation).

RSS: a `vhostnet serve` with an in-process frontend and guest TCP
(vhostnet/testing/frontend.py) that opens 1,000 NAT connections to a host
listener on 127.0.0.1 and keeps them open; VmRSS of the backend before
and after.

Self-contained on purpose (scripts/bench_qemu.py is rebuilt elsewhere).
Only loopback and in-guest traffic. Prints tables; not a test.
"""
from __future__ import annotations

import argparse
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vhostnet.launch import qemu  # noqa: E402

BACKENDS = ("vhostnet", "slirp", "passt")
TESTS = ("send", "recv", "crr", "udp")
GUEST_IP, PREFIX, GATEWAY = "10.0.2.15", 24, "10.0.2.2"
CLK_TCK = os.sysconf("SC_CLK_TCK")
RESULT = re.compile(r"^bench: (send|recv|crr|udp) ([0-9.]+) (\S+)(.*)$")
START = re.compile(r"^bench: (send|recv|crr|udp) start$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")
RSS_CONNECTIONS = 1000


def log(msg: str) -> None:
    print(f"bench-nat: {msg}", file=sys.stderr, flush=True)


def stop(p: subprocess.Popen | None, grace: float = 3.0) -> None:
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def cpu(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    try:
        fields = open(path).read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_path(path: Path, proc: subprocess.Popen, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not create {path}")
        time.sleep(0.05)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="vhostnet-nat-"))
        self.image = qemu.find_image()
        self.hostsrv = self.tmp / "hostsrv"
        r = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(self.hostsrv),
                            str(ROOT / "scripts" / "hostsrv.c")], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"gcc hostsrv.c failed: {r.stderr}")
        self.logs = ROOT / "logs" / "bench-nat" / time.strftime("%Y%m%d-%H%M%S")
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, name: str) -> dict:
        out = {"results": {}, "cpu": {}, "problems": []}
        if name in ("passt",) and shutil.which("passt") is None:
            out["skipped"] = "passt not installed"
            return out
        d = self.logs / name
        d.mkdir()
        procs: list[subprocess.Popen] = []
        q = None
        try:
            timeout = 60 + len(self.args.tests) * (self.args.seconds + 25)
            hs = subprocess.Popen([str(self.hostsrv), "-t", str(int(timeout) + 30)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=open(d / "hostsrv.log", "wb"), text=True)
            procs.append(hs)
            m = re.match(r"hostsrv: discard=(\d+) chargen=(\d+) echo=(\d+)", hs.stdout.readline())
            if not m:
                raise RuntimeError("hostsrv did not start")
            ports = dict(zip(("BENCH_DISCARD_PORT", "BENCH_CHARGEN_PORT", "BENCH_ECHO_PORT"),
                             map(int, m.groups())))
            sock = self.tmp / f"{name}.sock"
            backend_pid = None
            if name == "vhostnet":
                b = subprocess.Popen([sys.executable, "-m", "vhostnet", "serve", "--socket",
                                      str(sock), "--once", "--log-level", "warning"],
                                     cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=open(d / "backend.log", "wb"), stderr=subprocess.STDOUT)
                procs.append(b)
                wait_path(Path(str(sock) + ".ctl"), b, "vhostnet serve")
                backend_pid = b.pid
                netdev = qemu.nic_args(sock)
            elif name == "slirp":
                netdev = qemu.nic_args(None, netdev="user")
            else:
                pdir = Path(tempfile.mkdtemp(prefix="vhostnet-passt-"))
                if os.geteuid() == 0:       # passt drops to nobody before binding
                    nobody = pwd.getpwnam("nobody")
                    os.chown(pdir, nobody.pw_uid, nobody.pw_gid)
                sock = pdir / "passt.sock"
                b = subprocess.Popen(["passt", "-f", "-e", "-s", str(sock), "-a", GUEST_IP,
                                      "-n", str(PREFIX), "-g", GATEWAY, "-4"],
                                     stdin=subprocess.DEVNULL, stdout=open(d / "backend.log", "wb"),
                                     stderr=subprocess.STDOUT)
                procs.append(b)
                wait_path(sock, b, "passt")
                backend_pid = b.pid
                netdev = ["-netdev", f"stream,id=net0,server=off,addr.type=unix,addr.path={sock}",
                          "-device", f"virtio-net-pci,netdev=net0,mac={qemu.DEFAULT_MAC},"
                                     f"vectors=0,romfile="]
            gv = {"BENCH": ",".join(self.args.tests), "BENCH_SECONDS": self.args.seconds, **ports}
            argv = [qemu.QEMU, "-name", f"nat-{name},debug-threads=on",
                    *qemu.accel_args(qemu.choose_accel("auto")), *qemu.memory_args(),
                    *qemu.console_args(), *netdev,
                    *qemu.boot_args(self.image, qemu.kernel_append(gv))]
            q = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            pid, tid = (q.pid, q.pid) if name == "slirp" else (backend_pid, None)
            log(f"{name}: booting ({', '.join(self.args.tests)}, {self.args.seconds} s each)")
            timer = threading.Timer(timeout, lambda: stop(q, 0.5))
            timer.start()
            marks = {}
            with open(d / "console.log", "w") as con:
                for raw in iter(q.stdout.readline, b""):
                    line = ANSI.sub("", raw.decode(errors="replace")).strip("\r\n")
                    con.write(line + "\n")
                    if mm := START.match(line):
                        marks[mm[1]] = (time.monotonic(), cpu(pid, tid))
                    elif mm := RESULT.match(line):
                        t0, c0 = marks.pop(mm[1], (None, 0.0))
                        if t0 is not None:
                            out["cpu"][mm[1]] = 100 * (cpu(pid, tid) - c0) / (time.monotonic() - t0)
                        out["results"][mm[1]] = float(mm[2])
                        log(f"{name}: {mm[1]} {mm[2]} {mm[3]}")
                    elif "FAIL:" in line:
                        out["problems"].append(line.strip())
            timer.cancel()
            q.wait()
        except RuntimeError as e:
            out["problems"].append(str(e))
        finally:
            stop(q, 0.5)
            for p in reversed(procs):
                stop(p)
        return out


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
            sys.path.insert(0, str(ROOT))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--tests", default=",".join(TESTS))
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rss-only", action="store_true")
    p.add_argument("--no-rss", action="store_true")
    a = p.parse_args(argv)
    a.tests = [t for t in a.tests.split(",") if t]
    rows = {}
    if not a.rss_only:
        bench = Bench(a)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            for name in a.backends.split(","):
                rows[name] = bench.run(name)
        finally:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        heads = {"send": "guest->host Mbit/s", "recv": "host->guest Mbit/s",
                 "crr": "TCP conn/s", "udp": "UDP rt/s"}
        print(f"{'backend':<10}" + "".join(f"  {heads[t]:>18}" for t in a.tests))
        for name, r in rows.items():
            if r.get("skipped"):
                print(f"{name:<10}  skipped: {r['skipped']}")
                continue
            print(f"{name:<10}" + "".join(f"  {r['results'].get(t, float('nan')):>18,.1f}"
                                          for t in a.tests))
        print("\nbackend CPU during each test, % of one core")
        print(f"{'backend':<10}" + "".join(f"  {t:>8}" for t in a.tests))
        for name, r in rows.items():
            if not r.get("skipped"):
                print(f"{name:<10}" + "".join(f"  {r['cpu'].get(t, float('nan')):>8.0f}"
                                              for t in a.tests))
        if "vhostnet" in rows and not rows["vhostnet"].get("skipped"):
            v = rows["vhostnet"]["results"]
            for peer in ("slirp", "passt"):
                pr = rows.get(peer, {}).get("results", {})
                if pr:
                    print(f"vhostnet / {peer}: " + "  ".join(
                        f"{t} {v[t] / pr[t]:.2f}x" for t in a.tests if t in v and pr.get(t)))
        for name, r in rows.items():
            for prob in r.get("problems", []):
                print(f"problem ({name}): {prob}")
    if not a.no_rss:
        r = rss_bench()
        print(f"\nvhostnet RSS: {r.get('rss_before_kib', 0) / 1024:.1f} MiB idle, "
              f"{r.get('rss_with_kib', 0) / 1024:.1f} MiB with {r.get('established')} open NAT "
              f"connections ({r.get('host_accepted')} accepted by the host listener); "
              f"{(r.get('rss_with_kib', 0) - r.get('rss_before_kib', 0)) / max(r.get('established') or 1, 1):.1f}"
              f" KiB per connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
