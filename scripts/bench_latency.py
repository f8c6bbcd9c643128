#!/usr/bin/env python3
"""bench_latency.py: the NAT's latency paths, backend only, one op in flight.

    python3 scripts/bench_latency.py                       # this tree, 3 s per test
    python3 scripts/bench_latency.py --base /work/main     # this tree vs another, interleaved
    python3 scripts/bench_latency.py --strace --tests udp  # syscalls per round trip
    python3 scripts/bench_latency.py --pyspy u.txt --tests udp  # py-spy of the backend
    python3 scripts/bench_latency.py --path --tests udp,ping    # the backend's path, segment by segment
    python3 scripts/bench_latency.py --base-args=--no-kick-hook --gap 0.2 --tests ping
                                     # this tree with and without the kick hook, ops 0.2 s apart

No guest CPU in the way (bench_qemu.py is the real race): `vhostnet serve
--no-services --once` runs as its own process; this process plays QEMU and
the driver with the in-process frontend (vhostnet/testing/frontend.py:
shared memfd, eventfd kick and call, split rings; kicks as Linux does them
with EVENT_IDX) and a minimal guest (tests/hostnet/guest.py: our TcpLayer
for TCP; prebuilt frames for UDP and ping). The host server is
scripts/hostsrv.c on 127.0.0.1, as for bench_qemu.py.

  udp   64-byte UDP to 10.0.2.2:echo -> NAT -> host socket -> hostsrv -> back
        (round trips/s, one in flight, one flow)
  ping  ICMP echo to 10.0.2.2, answered by the backend itself (round trips/s)
  crr   TCP connect through the NAT + 1-byte echo + guest close, sequential
        (connections/s)

Columns: ops/s; the backend's CPU per op (utime+stime from /proc, µs); how
often the backend slept per op (voluntary context switches: each is a
wake-up to pay, and on a loaded machine a wait for a core); the median
time of one op as this process sees it (with --gap, ops GAP seconds apart:
each then starts from an idle backend, caches cold, as a ping at 5 a second
does; the rate is then mostly the gap); with
--strace, the backend's syscalls per op (strace -c -f, which slows the
backend: look at the counts, not the rate). With --base DIR, every test
runs on DIR's vhostnet too, alternating (base, this, base, this...) --repeat
times, and the table gives medians and the ratio this/base. --base-args
gives the base's `vhostnet serve` extra arguments (the base is this tree
unless --base says otherwise): an option's cost or gain, side by side. Prints tables;
not a test.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402
from scapy.layers.inet import ICMP, IP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from stack import NetConfig  # noqa: E402
from tests.hostnet.guest import FeGuest  # noqa: E402
import path_trace  # noqa: E402  (scripts/, beside this file)
from vhostnet.testing.frontend import Frontend  # noqa: E402
from vhostnet.testing.processes import end, start, wait_path  # noqa: E402
from vhostnet.virtio import features as F  # noqa: E402

CFG = NetConfig()
TESTS = ("udp", "ping", "crr")
CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP = 20            # ops before the clock starts (ARP, first flow)
OP_TIMEOUT = 5.0       # one op that takes longer than this is a failure
UDP_PAYLOAD = 64
GUEST_UDP_PORT = 40000


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of process PID, seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rindex(")") + 2:].split()
    return int(f[11]) / CLK_TCK, int(f[12]) / CLK_TCK


def sleeps(pid: int) -> int:
    """Voluntary context switches of every thread of PID: how often it slept."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                n += int(line.split()[1])
    return n


class Guest(FeGuest):
    """The host-network tests' guest (our TCP, ARP answers, other frames kept
    in `other`), driven here by `until` instead of its own task."""

    def pump(self) -> None:
        fe = self.fe
        fe.tx.take_used()
        old = fe.tx.avail_idx
        while self.out and fe.tx.free:
            fe.post_tx(self.out.pop(0))
        kick_if_needed(fe.tx, old)
        for _h, frame in fe.read_rx():
            self._deliver(frame)
        if fe.rx.free:
            old = fe.rx.avail_idx
            fe.post_rx()
            kick_if_needed(fe.rx, old)
        now = trio.current_time()
        self.tcp.poll(now)
        if self.out and fe.tx.free:
            self.pump()

    async def until(self, done) -> None:
        with trio.fail_after(OP_TIMEOUT):
            while True:
                self.pump()
                if done():
                    return
                dl = self.tcp.next_deadline()
                wait = 0.05 if dl is None else max(0.0, min(0.05, dl - trio.current_time()))
                await self.fe.rx.wait_call(wait)


def kick_if_needed(ring, old: int) -> None:
    """Kick as Linux does with EVENT_IDX (vring_need_event, virtio 1.2 §2.7.10)."""
    new = ring.avail_idx
    if new != old and ((new - ring.avail_event() - 1) & 0xFFFF) < ((new - old) & 0xFFFF):
        ring.kick()


def udp_frame(port: int) -> bytes:
    return bytes(Ether(src=CFG.guest_mac, dst=CFG.gateway_mac) /
                 IP(src=CFG.guest_ip, dst=CFG.gateway_ip) /
                 UDP(sport=GUEST_UDP_PORT, dport=port) / (b"u" * UDP_PAYLOAD))


def ping_frame() -> bytes:
    return bytes(Ether(src=CFG.guest_mac, dst=CFG.gateway_mac) /
                 IP(src=CFG.guest_ip, dst=CFG.gateway_ip) / ICMP(id=77, seq=1) / (b"p" * 56))


async def one_test(sock: str, test: str, echo_port: int):
    """Connect, warm up (WARMUP ops); returns (op, guest, frontend): op() does one more."""
    fe = Frontend()
    await fe.connect(sock)
    await fe.handshake(features=F.DEFAULT_FEATURES & ~F.OFFLOAD_FEATURES)
    fe.post_rx()
    fe.rx.kick()
    g = Guest(fe)
    frame = udp_frame(echo_port) if test == "udp" else ping_frame()

    async def op() -> None:
        if test == "crr":
            c = g.tcp.connect(trio.current_time(), CFG.guest_ip_b, 0, CFG.gateway_ip_b, echo_port)
            await g.until(lambda: c.state.value != "SYN-SENT")
            if c.state.value != "ESTABLISHED":
                raise RuntimeError(f"crr: connect ended {c.state.value}")
            c.send(b"x")
            got = bytearray()

            def echoed():
                got.extend(c.recv())
                return len(got) >= 1
            await g.until(echoed)
            c.close()
            await g.until(lambda: c.state.value in ("TIME-WAIT", "CLOSED"))
            return
        g.other.clear()
        g.out.append(frame)
        await g.until(lambda: g.other)

    for _ in range(WARMUP):
        await op()
    return op, g, fe


def run_backend(tree: Path, sock: str, log: Path, extra: tuple = (),
                trace: Path | None = None) -> subprocess.Popen:
    """`vhostnet serve` of TREE; with TRACE, through scripts/path_trace.py, which stamps its path there."""
    entry = ["-m", "vhostnet"] if trace is None else [str(ROOT / "scripts" / "path_trace.py")]
    argv = [sys.executable, *entry, "serve", "--socket", sock, "--once",
            "--no-services", "--log-level", "warning", *extra]
    env = dict(os.environ, PYTHONPATH=str(tree))
    if trace is not None:
        env[path_trace.ENV] = str(trace)
    return start(argv, log, cwd=tree, env=env)


def measure(tree: Path, test: str, seconds: float, echo_port: int, tmp: Path, *,
            strace: bool = False, pyspy: Path | None = None, extra: tuple = (),
            gap: float = 0.0, path: bool = False) -> dict:
    """One backend process, one test: warm up, then SECONDS of ops. STRACE / PYSPY
    attach to the backend for the measured window only (not start-up)."""
    sock = str(tmp / "lat.sock")
    st = tmp / "strace.txt" if strace else None
    trace = tmp / "path.trace" if path else None
    if trace is not None and trace.exists():
        trace.unlink()
    proc = run_backend(tree, sock, tmp / "backend.log", extra, trace)
    res: dict = {}
    try:
        try:
            wait_path(sock + ".ctl", proc, "vhostnet serve")
        except RuntimeError as e:
            raise RuntimeError(f"{e}: " + (tmp / "backend.log").read_text()[-500:]) from None
        pid = proc.pid
        tools: list[subprocess.Popen] = []

        async def main():
            op, g, fe = await one_test(sock, test, echo_port)
            if st is not None:
                tools.append(subprocess.Popen(["strace", "-c", "-f", "-o", str(st), "-p", str(pid)],
                                              stderr=subprocess.DEVNULL))
            if pyspy is not None:
                tools.append(subprocess.Popen(["py-spy", "record", "-p", str(pid), "-r", "500",
                                               "-f", "raw", "-o", str(pyspy), "--nonblocking"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if tools:
                await trio.sleep(1.0)           # attached
            c0, t0, z0 = cpu_seconds(pid), time.monotonic(), sleeps(pid)
            n = 0
            lat = []
            while time.monotonic() - t0 < seconds:
                if gap:
                    await trio.sleep(gap)
                s0 = time.perf_counter()
                await op()
                lat.append(time.perf_counter() - s0)
                n += 1
            t1, c1, z1 = time.monotonic(), cpu_seconds(pid), sleeps(pid)
            for t in tools:
                t.send_signal(signal.SIGINT)
                t.wait(20)
            user, sys_ = c1[0] - c0[0], c1[1] - c0[1]
            res.update(ops=n, rate=n / (t1 - t0), cpu_us=1e6 * (user + sys_) / max(n, 1),
                       sys_us=1e6 * sys_ / max(n, 1), cpu_pct=100 * (user + sys_) / (t1 - t0),
                       sleeps=(z1 - z0) / max(n, 1), lat_us=1e6 * median(lat))
            await fe.close()
        trio.run(main)
    finally:
        end(proc, linger=5, grace=10, sig=signal.SIGINT)   # --once: it ends when the frontend goes
        if os.path.exists(sock):
            os.unlink(sock)
    if trace is not None:
        if not trace.exists():
            raise RuntimeError("the traced backend wrote no trace: " + (tmp / "backend.log").read_text()[-500:])
        res["path"] = path_trace.summarize(*path_trace.load(trace))
    if st is not None and st.exists():
        res["syscalls"] = parse_strace(st.read_text(), res.get("ops", 0))
        res["strace"] = st.read_text()
    return res


def parse_strace(text: str, ops: int) -> dict:
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if m and m[2] != "total":
            out[m[2]] = int(m[1]) / max(ops, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def median(v: list[float]) -> float:
    v = sorted(v)
    n = len(v)
    return float("nan") if not n else v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def start_hostsrv(tmp: Path) -> tuple[subprocess.Popen, int]:
    exe = tmp / "hostsrv"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "scripts" / "hostsrv.c")], check=True)
    hs = subprocess.Popen([str(exe), "-t", "3600"], stdout=subprocess.PIPE, text=True)
    m = re.match(r"hostsrv: discard=(\d+) chargen=(\d+) echo=(\d+)", hs.stdout.readline())
    if not m:
        hs.kill()
        raise RuntimeError("hostsrv did not start")
    return hs, int(m[3])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tests", default=",".join(TESTS), help="comma-separated: " + ", ".join(TESTS))
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--base", type=Path, default=None, metavar="DIR",
                   help="another vhostnet tree to race against, interleaved")
    p.add_argument("--base-args", default="", metavar="ARGS",
                   help="extra `vhostnet serve` arguments for the base (space-separated; the base "
                        "is this tree unless --base names another), e.g. --base-args=--no-kick-hook")
    p.add_argument("--gap", type=float, default=0.0, metavar="SECONDS",
                   help="idle time before each op (0..1; default 0: back to back)")
    p.add_argument("--strace", action="store_true", help="count the backend's syscalls per op")
    p.add_argument("--path", action="store_true",
                   help="also time the backend's path per op, segment by segment "
                        "(scripts/path_trace.py: kick, send, answer, call, sleep)")
    p.add_argument("--pyspy", type=Path, default=None, metavar="FILE",
                   help="py-spy (collapsed stacks) of the backend during the first test, into FILE")
    args = p.parse_args(argv)
    tests = [t for t in args.tests.split(",") if t]
    for t in tests:
        if t not in TESTS:
            p.error(f"unknown test {t!r}")
    if not 1 <= args.repeat <= 20 or not 0.5 <= args.seconds <= 60 or not 0 <= args.gap <= 1:
        p.error("--repeat 1..20, --seconds 0.5..60, --gap 0..1")
    if args.path and (args.strace or args.pyspy):
        p.error("--path times the table's runs; it does not go with --strace or --pyspy, "
                "which slow the backend they attach to")
    if args.base is not None and not (args.base / "vhostnet").is_dir():
        p.error(f"--base {args.base}: not a vhostnet tree")
    base_extra = tuple(args.base_args.split())
    trees = [("this", ROOT, ())]
    if args.base is not None or base_extra:
        trees.append(("base", (args.base or ROOT).resolve(), base_extra))
    tmp = Path(tempfile.mkdtemp(prefix="vhostnet-lat-"))
    hs, echo = start_hostsrv(tmp)
    results: dict = {}
    try:
        if args.pyspy or args.strace:
            runs = [(name, tree, extra, t) for t in tests for name, tree, extra in trees]
            for name, tree, extra, t in runs[:1] if args.pyspy else runs:
                r = measure(tree, t, args.seconds, echo, tmp, strace=args.strace,
                            pyspy=args.pyspy, extra=extra, gap=args.gap)
                print(f"{name} {t}: {r['rate']:.0f}/s, {r['cpu_us']:.0f} µs backend CPU per op "
                      f"({r['sys_us']:.0f} in the kernel), {r['sleeps']:.2f} sleeps per op")
                if args.strace:
                    print("  syscalls per op: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in r["syscalls"].items() if v >= 0.05))
            return 0
        for rep in range(args.repeat):
            for t in tests:
                for name, tree, extra in (trees if rep % 2 == 0 else trees[::-1]):
                    r = measure(tree, t, args.seconds, echo, tmp, extra=extra, gap=args.gap,
                                path=args.path)
                    results.setdefault((name, t), []).append(r)
                    print(f"bench: {name} {t}: {r['rate']:.0f}/s, {r['cpu_us']:.0f} µs/op "
                          f"({r['sys_us']:.0f} kernel), {r['sleeps']:.2f} sleeps/op, "
                          f"{r['lat_us']:.0f} µs latency",
                          file=sys.stderr, flush=True)
    finally:
        hs.terminate()
        hs.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# bench_latency: {time.strftime('%Y-%m-%d %H:%M')}, median of {args.repeat}, "
          f"{args.seconds:g} s per test, gap {args.gap:g} s, load average {os.getloadavg()[0]:.2f}"
          + (f"; base: {trees[1][1]} {' '.join(trees[1][2])}" if len(trees) > 1 else ""))
    head = f"{'test':6} " + "".join(f"{n + ' ops/s':>14}{n + ' µs/op':>14}{n + ' sleeps/op':>17}"
                                    f"{n + ' latency µs':>18}" for n, _, _ in trees)
    if len(trees) > 1:
        head += f"{'rate this/base':>16}{'cpu this/base':>15}{'lat this/base':>15}"
    print(head)
    for t in tests:
        cells = []
        meds = {}
        for n, _, _ in trees:
            rs = results[(n, t)]
            meds[n] = (median([r["rate"] for r in rs]), median([r["cpu_us"] for r in rs]),
                       median([r["sleeps"] for r in rs]), median([r["lat_us"] for r in rs]))
            cells.append(f"{meds[n][0]:14,.0f}{meds[n][1]:14,.0f}{meds[n][2]:17.2f}{meds[n][3]:18,.0f}")
        line = f"{t:6} " + "".join(cells)
        if len(trees) > 1:
            line += (f"{meds['this'][0] / meds['base'][0]:15.2f}x{meds['this'][1] / meds['base'][1]:14.2f}x"
                     f"{meds['this'][3] / meds['base'][3]:14.2f}x")
        print(line)
    if args.path:
        print()
        print(path_table(tests, trees, results))
    return 0


def path_table(tests, trees, results) -> str:
    """--path: each segment's median µs (the median over runs of each run's
    median), per test and tree; with a base, the ratio this/base."""
    names = [n for n, _ in path_trace.SEGMENTS]
    lines = ["the backend's path per op, µs (median; scripts/path_trace.py: each stamp is a "
             "Python call more, so compare trees, not absolutes):"]
    head = f"{'test':6} {'tree':5} " + "".join(f"{n:>14}" for n in names)
    lines.append(head)
    for t in tests:
        meds = {}
        for n, _, _ in trees:
            runs = [r["path"] for r in results[(n, t)]]
            meds[n] = {seg: median([p[seg]["p50_us"] for p in runs if seg in p]) for seg in names}
            lines.append(f"{t:6} {n:5} " + "".join(
                f"{'-':>14}" if meds[n][seg] != meds[n][seg] else f"{meds[n][seg]:14.1f}" for seg in names))
        if len(trees) > 1:
            cells = []
            for seg in names:
                a, b = meds["this"][seg], meds["base"][seg]
                cells.append(f"{a / b:13.2f}x" if a == a and b == b and b > 0 else f"{'-':>14}")
            lines.append(f"{t:6} {'ratio':5} " + "".join(cells))
    lines.append("segments: " + "; ".join(f"{n}: {d}" for n, d in path_trace.SEGMENTS))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
