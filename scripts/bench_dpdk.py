#!/usr/bin/env python3
"""bench_dpdk.py: vhostnet driven by DPDK's testpmd (virtio-user PMD) as the frontend.

    python3 scripts/bench_dpdk.py                 # 3 s per case
    python3 scripts/bench_dpdk.py --seconds 5 --window 1,4
    python3 scripts/bench_dpdk.py --queues 1,2,4   # multiqueue: the same cases on 1, 2, 4 pairs

testpmd's virtio-user port is a busy-polling virtio-net driver in C with no
guest and no QEMU in the way, so whatever rate comes out is the backend's
own: one Python process doing vhost-user rings, the virtio-net header and
the stack.

  discard  testpmd `txonly` sends UDP to 10.0.2.2:9 as fast as the ring takes
           it (the ring is full all the time: testpmd could send millions
           more; its TX-dropped counts those). "frames/s" is what vhostnet
           consumed: its device.tx_frames over the measuring window.
  echo     testpmd `start tx_first N` puts N bursts of 32 UDP datagrams to
           10.0.2.2:7 in flight, then `5tswap` mode sends every echo reply
           back as a new request (MACs, IPs and ports swapped), so the window
           stays closed at N*32. "frames/s" is round trips per second
           (vhostnet's device.rx_frames over the window).

--queues Q1,Q2...: each case once per queue-pair count Q, side by side:
`serve --queues Q` and virtio-user queues=Q with testpmd --rxq=Q --txq=Q
(its one forwarding lcore polls every queue); "x q1" is the rate against
the same case on one pair in the same run.

"testpmd/s" is the same rate as testpmd counted it (forward statistics:
TX-packets for discard, RX-packets for echo), over the same window: the two
must agree to within the frames in flight.

Frame sizes are Ethernet frames without FCS: 64 B (22 B of UDP payload) and
1514 B (1472 B of payload, a full 1500-byte MTU). "Mbit/s" is frames/s times
the frame size, one direction.

Placement: vhostnet is pinned (`taskset`) to the first CPU we may use,
testpmd's main lcore (the command line, asleep) shares it, and testpmd's
forwarding lcore spins at 100% on the last one (on a 2-core machine: CPU 0
and CPU 1). "backend CPU" is vhostnet's utime+stime over the window in % of
one core; "us CPU/frame" is that CPU time per frame (per round trip for
echo), which holds up better than frames/s when the host is busy; "others"
is what every other process used meanwhile (host busy time minus vhostnet
and testpmd), in % of one core: when it is high, the backend shared its
core and frames/s is low. --wait-quiet (default 60 s) waits for a quiet host
before each case. Each case uses a fresh backend and a fresh
testpmd; both are always stopped. Only Unix sockets; testpmd runs with
--no-pci --no-huge. Logs go to logs/bench-dpdk/<time>/. Needs root and
dpdk-testpmd (scripts/setup.sh installs it when apt has it); without them it
says so and exits 0. Prints a table; not a test.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vhostnet.testing.dpdk import (GATEWAY_IP, GATEWAY_MAC, GUEST_IP, TestPmd,
                                 VhostnetServe, parse_port_stats, skip_reason)

SPORT = 5000
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUIET = 25.0  # % of one core used by other processes: below this the host counts as quiet


def host_busy_seconds() -> float:
    """CPU seconds all cores have spent busy (not idle/iowait) since boot."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / CLK_TCK


def proc_cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_quiet(limit: float) -> float:
    """Wait (at most LIMIT s) until other processes use less than QUIET % of one core; return the last load."""
    t0 = time.monotonic()
    while True:
        a = host_busy_seconds()
        time.sleep(1.0)
        load = 100.0 * (host_busy_seconds() - a)
        if load <= QUIET or time.monotonic() - t0 >= limit:
            return load
        print(f"bench_dpdk: host busy ({load:.0f}% of one core), waiting", file=sys.stderr)


def testpmd_args(mode: str, port: int, frame: int) -> tuple[str, ...]:
    return (f"--forward-mode={mode}", f"--tx-ip={GUEST_IP},{GATEWAY_IP}", f"--tx-udp={SPORT},{port}",
            f"--eth-peer=0,{GATEWAY_MAC}", f"--txpkts={frame}", "--burst=32")


def fwd_counts(tp: TestPmd) -> dict[str, int]:
    """testpmd's forward statistics for port 0 so far (RX-packets, TX-packets, TX-dropped, ...)."""
    text = tp.cmd("show fwd stats all").split("+++")[0]
    # With several queues, per-stream sections come first: the port's totals follow this header.
    if "Forward statistics for port" in text:
        text = text.split("Forward statistics for port", 1)[1]
    return parse_port_stats(text)


def run_case(workdir: Path, kind: str, frame: int, seconds: float, window: int, queue_size: int,
             queues: int = 1) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    mode, port, counter, tp_counter = (("txonly", 9, "tx_frames", "TX-packets") if kind == "discard"
                                       else ("5tswap", 7, "rx_frames", "RX-packets"))
    cpus = sorted(os.sched_getaffinity(0))
    mq = ("--rxq", str(queues), "--txq", str(queues)) if queues > 1 else ()
    with VhostnetServe(workdir, log_level="info", cpu=cpus[0], allow_unsealed_memory=True,
                       args=("--queues", str(queues))) as be:
        with TestPmd(be.socket, app_args=testpmd_args(mode, port, frame) + mq, lcores=f"0@{cpus[0]},1@{cpus[-1]}",
                     queue_size=queue_size, log=workdir / "testpmd.log", vdev_args=f"queues={queues}") as tp:
            be.wait_connected()
            tp.cmd("start" if kind == "discard" else f"start tx_first {window}")
            time.sleep(0.5)  # warm-up
            f0, s0, c0, t0 = fwd_counts(tp), be.stats(), be.cpu_seconds(), time.monotonic()
            h0, p0 = host_busy_seconds(), proc_cpu_seconds(tp.proc.pid)
            time.sleep(seconds)
            f1, s1, c1, t1 = fwd_counts(tp), be.stats(), be.cpu_seconds(), time.monotonic()
            h1, p1 = host_busy_seconds(), proc_cpu_seconds(tp.proc.pid)
            tp.cmd("stop")
            st = tp.port_stats()
            deadline = time.monotonic() + 5
            while True:  # let vhostnet finish what is still on the rings
                s_end = be.stats()
                d = s_end["device"]
                if (d["tx_frames"] >= st["TX-packets"] and (kind == "discard" or d["rx_frames"] >= d["tx_frames"])
                        or time.monotonic() > deadline):
                    break
                time.sleep(0.05)
    dt = t1 - t0
    udp = {u["port"]: u for u in s_end["stack"]["udp"]}
    return {
        "kind": kind, "frame": frame, "window": window, "queues": queues,
        "rate": (s1["device"][counter] - s0["device"][counter]) / dt,
        "tp_rate": (f1[tp_counter] - f0[tp_counter]) / dt,
        "cpu": 100.0 * (c1 - c0) / dt,
        "testpmd_cpu": 100.0 * (p1 - p0) / dt,
        # Everything else on the host meanwhile (other users' work competes for the same 2 cores).
        "others": max(0.0, 100.0 * ((h1 - h0) - (c1 - c0) - (p1 - p0)) / dt),
        "tp_tx": st.get("TX-packets"), "tp_rx": st.get("RX-packets"),
        "vn_tx": s_end["device"]["tx_frames"], "vn_rx": s_end["device"]["rx_frames"],
        "udp_rx": udp.get(port, {}).get("rx"),
        "drops": {**s_end["device"]["drops"], **s_end["stack"]["drops"]},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring window per case (default %(default)s)")
    ap.add_argument("--frames", default="64,1514", help="Ethernet frame sizes (default %(default)s)")
    ap.add_argument("--window", default="1,8",
                    help="echo: bursts of 32 in flight, comma-separated (default %(default)s)")
    ap.add_argument("--queues", default="1", help="queue pairs, comma-separated: each case on each (default %(default)s)")
    ap.add_argument("--queue-size", type=int, default=256, help="virtio-user ring size (default %(default)s)")
    ap.add_argument("--wait-quiet", type=float, default=60, metavar="SECONDS",
                    help=f"before each case, wait up to SECONDS for other processes to go below {QUIET:.0f}%% "
                         "of one core (shared machines; 0: do not wait; default %(default)s)")
    ap.add_argument("--logs", default=str(ROOT / "logs" / "bench-dpdk" / time.strftime("%Y%m%d-%H%M%S")))
    args = ap.parse_args()
    why = skip_reason()
    if why:
        print(f"bench_dpdk: skipped: {why}")
        return 0
    frames = [int(x) for x in args.frames.split(",")]
    windows = [int(x) for x in args.window.split(",")]
    logs = Path(args.logs)
    qs = [int(x) for x in args.queues.split(",")]
    cases = [(f"discard-{frame}-q{q}", "discard", frame, 0, q) for frame in frames for q in qs]
    cases += [(f"echo-{frame}-w{w}-q{q}", "echo", frame, w, q) for frame in frames for w in windows for q in qs]
    rows = []
    for name, kind, frame, w, q in cases:
        if args.wait_quiet:
            wait_quiet(args.wait_quiet)
        rows.append(run_case(logs / name, kind, frame, args.seconds, w, args.queue_size, q))
    base = {(r["kind"], r["frame"], r["window"]): r["rate"] for r in rows if r["queues"] == qs[0]}
    print(f"vhostnet <- dpdk-testpmd virtio-user (queue {args.queue_size}, {args.seconds:g} s per case); "
          f"logs in {logs}")
    print(f"{'case':28} {'pairs':>5} {'frame':>6} {'payload':>8} {'frames/s':>10} {'x q' + str(qs[0]):>6} "
          f"{'Mbit/s':>8} {'testpmd/s':>10} {'backend CPU':>11} {'us CPU/frame':>12} {'others':>7}")
    for r in rows:
        name = "UDP -> discard (9)" if r["kind"] == "discard" else f"UDP echo (7), {32 * r['window']} in flight"
        mbit = r["rate"] * r["frame"] * 8 / 1e6
        per = 1e4 * r["cpu"] / r["rate"] if r["rate"] else float("nan")
        b = base.get((r["kind"], r["frame"], r["window"]))
        ratio = f"{r['rate'] / b:.2f}" if b else "-"
        print(f"{name:28} {r['queues']:>5} {r['frame']:>5}B {r['frame'] - 42:>7}B {r['rate']:>10,.0f} {ratio:>6} "
              f"{mbit:>8,.1f} "
              f"{r['tp_rate']:>10,.0f} {r['cpu']:>10.0f}% {per:>12.1f} {r['others']:>6.0f}%")
    print()
    print("totals after stop (testpmd TX/RX packets; vhostnet tx_frames/rx_frames; drops; "
          "check: every frame testpmd sent reached the UDP service, every echo came back):")
    for (name, *_), r in zip(cases, rows):  # noqa: B007
        drops = ", ".join(f"{k} {v}" for k, v in r["drops"].items()) or "none"
        ok = r["vn_tx"] == r["tp_tx"] == r["udp_rx"] and (r["kind"] == "discard" or r["vn_rx"] == r["vn_tx"])
        print(f"  {name:16} testpmd {r['tp_tx']}/{r['tp_rx']}  vhostnet {r['vn_tx']}/{r['vn_rx']}  "
              f"drops: {drops}  {'ok' if ok else 'MISMATCH'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
