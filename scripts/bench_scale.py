#!/usr/bin/env python3
"""Memory and scale of the backend: RSS idle and with 1,000 NAT connections,
and the per-packet cost with 1, 100 and 1,000 concurrent connections.

    nice python3 scripts/bench_scale.py                      # 1, 100, 1000 connections, 3 runs
    nice python3 scripts/bench_scale.py --conns 1,100 --runs 1 --seconds 5
    nice python3 scripts/bench_scale.py --rate 1000          # messages/s offered (all connections)
    nice python3 scripts/bench_scale.py --peers ''           # vhostnet only, not passt

What runs (the setup of scripts/bench_device_tcp.py, imported from there):
- the backend is the real `python -m vhostnet serve --once` in its own
  process, so its RSS (/proc/PID/status) and CPU (/proc/PID/stat) are its
  own, with its NAT on (the default) and `--max-nat-tcp` set to the largest
  connection count (default cap 1000 = exactly enough for 1,000);
- this process plays QEMU and the guest driver (vhostnet/testing/frontend.py,
  guest RAM a memfd of --mem-mb, default 256 MiB, mapped by the backend) and
  the guest's TCP/IP with a second `stack.Stack` (bench_device_tcp.Guest);
- the host server is a real `redis-server` on 127.0.0.1 (vhostnet/testing/
  hostservers.py); the guest connects to 10.0.2.2:PORT, which the NAT
  (vhostnet/hostnet) maps to 127.0.0.1:PORT, one host socket per flow.

Rows, all in one backend process, connections accumulating:
- idle: after the vhost-user handshake, with the RX ring posted, no flows;
- N connections open: RSS once N are ESTABLISHED (opened at most --batch
  at a time: the NAT holds at most 128 half-open SYNs), and the backend's
  CPU while they sit idle (no timers run for idle connections);
- N carrying traffic: --rate redis ECHO commands/s (32 B, unique per
  message, every reply checked) offered round-robin over the N
  connections for --seconds; the backend's CPU time divided by the frames
  through the device both ways (us/frame) and by the messages (us/msg).
  The offered load is the same for every N, so the batching of wake-ups
  is too; a cost that grows with N is a per-flow cost (a scan, a timer
  list...). frames/msg changes with N for a reason of its own: with one
  connection the guest's ACK of a reply rides on its next request, with
  many each ACK is a frame of its own after the delayed-ACK timeout.
- closed: after the guest closes every connection, the flows the backend
  still has (stats `nat.counts.tcp`) and its open fds, against idle.

Targets (issue 12 §6): RSS idle <= 80 MB, RSS with 1,000 connections
<= 200 MB; the ratio to each target is printed. Each run is one backend;
the table gives the median over --runs.

Peer: passt (when installed), a process of its own too, driven by the same
guest stack over its `-netdev stream` socket (length-prefixed frames, no
offloads), against the same redis, its runs interleaved with vhostnet's; the
last table gives vhostnet / passt. slirp is not compared: it runs inside
QEMU, whose RSS is the guest's RAM and TCG's code cache.

The rate: the default 300 msg/s is one this shared 2-core machine keeps up
with at 1,000 connections (p50 latency of a few ms). Offer more than the
backend, the guest stack (Python too) and redis get of the CPU, and latency
passes the 200 ms minimum RTO: both TCPs retransmit (the retx column), the
frames per message climb, and the row measures the overload, not the flows.

Prints a table; not a test.
"""
from __future__ import annotations

import argparse
import os
import pwd
import select
import shutil
import socket
import struct
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import trio

from bench_device_tcp import GATEWAY_IP, GUEST_IP, Guest, guest_stack, host_busy, proc_cpu
from stack import Frame
from vhostnet.testing.frontend import Frontend
from vhostnet.testing.hostservers import HostServers
from vhostnet.testing.processes import end, start, wait_path_async

RSS_IDLE_TARGET_MB = 80         # issue 12 §6
RSS_1000_TARGET_MB = 200        # issue 12 §6, with 1,000 NAT TCP connections
TARGET_CONNS = 1000
MSG_BYTES = 32                  # payload of each ECHO
HALF_OPEN_CAP = 128             # stack.flows.FlowConfig.max_half_open (the NAT's SYN backlog)
GUEST_BUF = 16 * 1024           # the guest stack's TCP buffers: messages are tiny
OPEN_TIMEOUT = 60.0
CLOSE_TIMEOUT = 60.0
MB = 1e6
# --profile-backend: `vhostnet` under cProfile with a CPU-time clock, so time
# blocked in epoll or preempted by other tenants does not count.
CPU_PROFILE = """
import atexit, cProfile, runpy, sys, time
out = sys.argv.pop(1)
pr = cProfile.Profile(time.process_time)
atexit.register(lambda: (pr.disable(), pr.dump_stats(out)))
sys.argv = ["vhostnet"] + sys.argv[1:]
pr.enable()
runpy.run_module("vhostnet", run_name="__main__")
"""
SETTLE = 0.3                    # s: past the guest's delayed ACKs (40 ms) before a stats request
STREAM_LEN = struct.Struct("!I")   # QEMU -netdev stream: each frame after its length


def rss(pid: int) -> dict:
    """VmRSS and its parts (anon, file, shmem = guest RAM pages touched), bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stats(ctl: str) -> dict:
    from vhostnet.observe.control import ControlClient
    with ControlClient(ctl, timeout=10) as c:
        return c.request("stats")


LOSS_COUNTERS = ("tcp_rto_timeouts", "tcp_syn_retransmits", "tcp_listen_overflow")


def losses(ctl: str | None, guest_counters: dict) -> dict:
    """Frames the device dropped, and timeouts on either side (what makes frames/msg grow)."""
    doc = stats(ctl) if ctl is not None else {}
    sc = doc.get("stack", {}).get("counters", {})
    return {"device_drops": sum(doc.get("device", {}).get("drops", {}).values()),
            "backend": {k: sc.get(k, 0) for k in LOSS_COUNTERS},
            "guest": {k: guest_counters.get(k, 0) for k in LOSS_COUNTERS}}


def nat_counts(ctl: str | None) -> dict:
    """The backend's NAT flow counts and host sockets, from its control socket."""
    if ctl is None:
        return {"tcp": None, "relays": None, "limit": None, "tcp_conns": None}
    doc = stats(ctl)
    nat = doc.get("nat") or {}
    return {"tcp": nat.get("counts", {}).get("tcp"),
            "relays": (nat.get("proxy") or {}).get("relays"),
            "limit": nat.get("limits", {}).get("tcp"),
            "tcp_conns": sum(1 for c in doc.get("stack", {}).get("tcp", [])
                             if c.get("state") != "LISTEN")}


def echo_cmd(payload: bytes) -> tuple[bytes, bytes]:
    """A RESP ECHO and the reply redis gives."""
    n = len(payload)
    return (b"*2\r\n$4\r\nECHO\r\n$%d\r\n%s\r\n" % (n, payload), b"$%d\r\n%s\r\n" % (n, payload))


class Conns:
    """The guest's connections to the host's redis, with every reply checked."""

    def __init__(self, g: Guest, port: int):
        self.g = g
        self.port = port
        self.conns: list = []
        self.expect: dict = {}          # conn -> bytearray of reply bytes still due
        self.sent_at: dict = {}         # conn -> deque of send times of replies still due
        self.latencies: list[float] = []
        self.ready: set = set()         # conns with bytes to read
        self.replies = 0
        self.errors: list[str] = []
        self.seq = 0

    def _on_readable(self, c) -> None:
        self.ready.add(c)

    def open(self, now: float):
        c = self.g.st.tcp.connect(now, GUEST_IP, 0, GATEWAY_IP, self.port)
        c.on_readable = self._on_readable
        self.conns.append(c)
        self.expect[c] = bytearray()
        self.sent_at[c] = deque()
        return c

    def send(self, c, now: float) -> None:
        self.seq += 1
        cmd, reply = echo_cmd(b"%08d:%023d" % (c.local_port, self.seq))
        if c.send(cmd) != len(cmd):
            self.errors.append(f"port {c.local_port}: send buffer full")
        self.expect[c] += reply
        self.sent_at[c].append(now)

    def check(self, now: float) -> None:
        for c in self.ready:
            data = c.recv()
            if not data:
                continue
            want = self.expect[c]
            if want[:len(data)] != data:
                self.errors.append(f"port {c.local_port}: got {bytes(data[:40])!r}, "
                                   f"want {bytes(want[:40])!r}")
            del want[:len(data)]
            k = data.count(b"$")               # one bulk string per reply; payloads hold no '$'
            self.replies += k
            sent = self.sent_at[c]
            for _ in range(min(k, len(sent))):
                self.latencies.append(now - sent.popleft())
        self.ready.clear()

    def outstanding(self) -> int:
        return sum(len(v) for v in self.expect.values())


def pump(g: Guest, cs: Conns, until, timeout: float, what: str) -> None:
    """Run the guest until UNTIL() is true (or fail after TIMEOUT s)."""
    deadline = time.monotonic() + timeout
    while not until():
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"{what}: not done within {timeout:.0f} s")
        step(g, cs, now)


def run_for(g: Guest, cs: Conns, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        step(g, cs, time.monotonic(), 0.05)


def step(g: Guest, cs: Conns, now: float, max_wait: float = 0.01) -> None:
    if not g.step(now):
        nd = g.st.next_deadline()
        g.wait(min(max_wait, max(0.0, nd - now)) if nd is not None else max_wait)
    cs.check(time.monotonic())


def open_to(g: Guest, cs: Conns, n: int, batch: int) -> None:
    """Open connections until N are ESTABLISHED, BATCH at a time."""
    while len(cs.conns) < n:
        now = time.monotonic()
        new = [cs.open(now) for _ in range(min(batch, n - len(cs.conns)))]
        pump(g, cs, lambda: all(c.state.value != "SYN-SENT" for c in new), OPEN_TIMEOUT,
             f"opening connection {len(cs.conns)}")
        bad = [c for c in new if c.state.value != "ESTABLISHED"]
        if bad:
            raise RuntimeError(f"{len(bad)} connections failed: {bad[0].state.value} "
                               f"{bad[0].error}")


def measure_idle(g: Guest, cs: Conns, pid: int, seconds: float) -> float:
    """Backend CPU (% of one core) while the guest sends nothing, after a
    second for the timers the opening left (delayed ACKs) to run out."""
    run_for(g, cs, 1.0)
    t0, c0 = time.monotonic(), proc_cpu(pid)
    end = t0 + seconds
    while time.monotonic() < end:
        step(g, cs, time.monotonic(), 0.05)
    return 100 * (proc_cpu(pid) - c0) / (time.monotonic() - t0)


def warm_up(g: Guest, cs: Conns, batch: int) -> None:
    """One message on every connection, all replies back, BATCH at a time
    (1,000 at once is a burst that measures a retransmission storm)."""
    for k in range(0, len(cs.conns), batch):
        for c in cs.conns[k:k + batch]:
            cs.send(c, time.monotonic())
        pump(g, cs, lambda: cs.outstanding() == 0, OPEN_TIMEOUT, "warm-up")


def measure_traffic(g: Guest, cs: Conns, pid: int, n: int, rate: float, seconds: float) -> dict:
    """RATE messages/s round-robin over the first N connections for SECONDS."""
    conns = cs.conns[:n]
    sent, r0 = 0, cs.replies
    cs.latencies.clear()
    f0 = g.tx_frames + g.rx_frames
    t0, c0, h0, s0 = time.monotonic(), proc_cpu(pid), host_busy(), proc_cpu(os.getpid())
    end = t0 + seconds
    i = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - t0) * rate) - sent
        for _ in range(due):
            cs.send(conns[i], now)
            i = (i + 1) % n
            sent += 1
        step(g, cs, now, 0.002)
    # Drain what is in flight; the measurement covers its frames too.
    pump(g, cs, lambda: cs.outstanding() == 0, OPEN_TIMEOUT, "drain")
    dt = time.monotonic() - t0
    cpu = proc_cpu(pid) - c0
    me = proc_cpu(os.getpid()) - s0
    frames = g.tx_frames + g.rx_frames - f0
    msgs = cs.replies - r0
    lat = sorted(cs.latencies) or [float("nan")]
    return {"lat_p50": lat[len(lat) // 2], "lat_p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "msgs": msgs, "msgs_s": msgs / dt, "frames": frames, "frames_per_msg": frames / max(msgs, 1),
            "us_per_frame": 1e6 * cpu / max(frames, 1), "us_per_msg": 1e6 * cpu / max(msgs, 1),
            "backend_cpu": 100 * cpu / dt, "guest_cpu": 100 * me / dt,
            "others_cpu": max(0.0, 100 * (host_busy() - h0 - cpu - me) / dt)}


class PasstGuest:
    """The guest stack on passt's socket instead of vhost-user rings: QEMU's
    `-netdev stream` framing, each Ethernet frame after its length as a
    32-bit big-endian integer. No offloads: passt's stream mode has no
    virtio-net header, so every checksum is complete both ways. The same
    interface as bench_device_tcp.Guest: st, step(now), wait(timeout),
    tx_frames, rx_frames."""

    def __init__(self, path: str, bufsize: int):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.st = guest_stack(bufsize)
        self.st.set_offloads(csum=False, tso=False)
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.tx_frames = self.rx_frames = 0

    def step(self, now: float) -> bool:
        st, moved = self.st, False
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                raise RuntimeError("passt closed the socket")
            self.inbuf += data
        buf, off = self.inbuf, 0
        while len(buf) - off >= STREAM_LEN.size:
            (n,) = STREAM_LEN.unpack_from(buf, off)
            if len(buf) - off - STREAM_LEN.size < n:
                break
            st.receive(Frame(bytes(buf[off + 4:off + 4 + n])), now)
            off += 4 + n
            self.rx_frames += 1
            moved = True
        del buf[:off]
        st.poll(now)
        for f in st.take_frames():
            self.outbuf += STREAM_LEN.pack(len(f.data)) + bytes(f.data)
            self.tx_frames += 1
            moved = True
        if self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
                del self.outbuf[:sent]
            except BlockingIOError:
                pass
        return moved

    def wait(self, timeout: float) -> None:
        p = select.poll()
        p.register(self.sock, select.POLLIN | (select.POLLOUT if self.outbuf else 0))
        p.poll(max(0, int(timeout * 1000)))

    def close(self) -> None:
        self.sock.close()


async def passt_run(args, port: int, log_dir: Path, run: int) -> dict:
    """The same rows with passt (its stream socket) as the backend."""
    counts = [int(x) for x in args.conns.split(",")]
    # passt drops root for nobody before it binds: a directory nobody may write to.
    pdir = Path(tempfile.mkdtemp(prefix="vhostnet-scale-passt-"))
    g = None
    try:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(pdir, nobody.pw_uid, nobody.pw_gid)
        sock = str(pdir / "passt.sock")
        argv = ["passt", "-f", "-e", "-s", sock, "-a", "10.0.2.15", "-n", "24",
                "-g", "10.0.2.2", "-4"]
        logf = open(log_dir / f"passt-{run}.log", "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT)
        logf.close()
        try:
            deadline = time.monotonic() + 15
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"passt did not start (status {proc.poll()})")
                try:
                    g = PasstGuest(sock, GUEST_BUF)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await trio.sleep(0.02)
            return drive(args, g, proc.pid, None, port, counts)
        finally:
            if g is not None:
                g.close()
            end(proc, grace=5)
    finally:
        shutil.rmtree(pdir, ignore_errors=True)


async def one_run(args, port: int, log_dir: Path, run: int) -> dict:
    counts = [int(x) for x in args.conns.split(",")]
    with tempfile.TemporaryDirectory(prefix="vhostnet-scale-") as d:
        sock = os.path.join(d, "vhost.sock")
        head = ["-c", CPU_PROFILE, f"{args.profile_backend}-{run}.prof"] \
            if args.profile_backend else ["-m", "vhostnet"]
        argv = [sys.executable, *head, "serve", "--socket", sock, "--once",
                "--log-level", "warning", "--max-nat-tcp", str(max(max(counts), 1000))]
        if args.pcap:
            argv += ["--pcap", f"{args.pcap}-{run}.pcap"]
        backend = start(argv, log_dir / f"backend-{run}.log", cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
        fe = None
        try:
            await wait_path_async(sock, backend, "vhostnet serve")
            pid = backend.pid
            fe = Frontend(mem_size=args.mem_mb << 20, queue_size=256)
            await fe.connect(sock)
            await fe.handshake()
            return drive(args, Guest(fe, GUEST_BUF), pid, sock + ".ctl", port, counts)
        finally:
            if fe is not None:
                await fe.close()
            end(backend, linger=10)
            if fe is not None:
                fe.release()


def drive(args, g, pid: int, ctl: str | None, port: int, counts: list[int]) -> dict:
    """G: the guest (a Guest on the vhost-user rings, or a PasstGuest); CTL:
    vhostnet's control socket (None for passt: no flow counts, only fds)."""
    cs = Conns(g, port)
    # The guest stack's own cap (TcpConfig.max_connections, 1,024) must not be the limit.
    g.st.tcp.config.max_connections = max(g.st.tcp.config.max_connections, max(counts) + 64)
    # Idle: the handshake is done and the RX ring posted; let the backend settle.
    run_for(g, cs, 1.0)
    out = {"idle": rss(pid), "idle_fds": nfds(pid), "idle_nat": nat_counts(ctl), "rows": []}
    for n in counts:
        open_to(g, cs, n, args.batch)
        row = {"n": n, "open_rss": rss(pid), "open_fds": nfds(pid)}
        t = time.monotonic()
        row["nat"] = nat_counts(ctl)
        row["stats_ms"] = 1e3 * (time.monotonic() - t)   # one `stats` request, all flows listed
        row["idle_cpu"] = measure_idle(g, cs, pid, args.idle_seconds)
        warm_up(g, cs, args.batch)
        # A `stats` request blocks this process, the guest too: let its delayed
        # ACKs go out first, or the backend's RTO fires for them meanwhile.
        run_for(g, cs, SETTLE)
        lo = losses(ctl, g.st.all_counters())
        prev = (lo["backend"]["tcp_rto_timeouts"], lo["guest"]["tcp_rto_timeouts"])
        row.update(measure_traffic(g, cs, pid, n, args.rate, args.seconds))
        row["after_rss"] = rss(pid)
        run_for(g, cs, SETTLE)
        lo = losses(ctl, g.st.all_counters())
        row["retx"] = (lo["backend"]["tcp_rto_timeouts"] - prev[0],
                       lo["guest"]["tcp_rto_timeouts"] - prev[1])
        if lo["device_drops"]:
            print(f"bench_scale: the device dropped {lo['device_drops']} frames",
                  file=sys.stderr, flush=True)
        out["rows"].append(row)
        print(f"bench_scale: {n} conns: "
              f"RSS {row['open_rss']['VmRSS'] / MB:.1f} MB, {row['us_per_frame']:.1f} us/frame, "
              f"{row['msgs_s']:.0f} msg/s", file=sys.stderr, flush=True)
    if cs.errors:
        raise RuntimeError(f"{len(cs.errors)} bad replies, first: {cs.errors[0]}")
    # Close everything; the backend must let go of every flow and host socket.
    for c in cs.conns:
        c.close()

    def released() -> bool:
        # fds first: the control connection of the last look may not be closed yet.
        out["closed_fds"] = nfds(pid)
        if any(c.state.value not in ("CLOSED", "TIME-WAIT") for c in cs.conns) \
                or out["closed_fds"] > out["idle_fds"]:
            return False
        n = nat_counts(ctl)
        return ctl is None or (n["tcp"] == 0 and n["relays"] == 0)

    deadline = time.monotonic() + CLOSE_TIMEOUT
    while not released() and time.monotonic() < deadline:
        run_for(g, cs, 0.2)            # stats are a control request: ask every 0.2 s
    out["closed_nat"] = nat_counts(ctl)
    out["closed_rss"] = rss(pid)
    out["hwm"] = rss(pid)["VmHWM"]
    return out


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def retx(rows) -> str:
    """RTO timeouts during the row, backend/guest (median over runs)."""
    b = med([x["retx"][0] for x in rows])
    g = med([x["retx"][1] for x in rows])
    return f"{b:.0f}/{g:.0f}"


def table(runs: list[dict], name: str) -> str:
    L = [f"## {name}", ""]
    head = (f"{'row':<28} {'RSS MB':>7} {'anon':>6} {'shmem':>6} {'fds':>5} {'flows':>6} "
            f"{'target':>7} {'ratio':>6}")
    L.append(head)
    L.append("-" * len(head))

    def rssrow(name, docs, fds, flows, target):
        r = med([d["VmRSS"] for d in docs]) / MB
        a = med([d["RssAnon"] for d in docs]) / MB
        s = med([d["RssShmem"] for d in docs]) / MB
        tgt = f"{target}" if target else ""
        ratio = f"{r / target:.2f}" if target else ""
        flows = "-" if flows is None else flows
        L.append(f"{name:<28} {r:>7.1f} {a:>6.1f} {s:>6.1f} {fds:>5} {flows:>6} {tgt:>7} {ratio:>6}")

    rssrow("idle (connected, no flows)", [r["idle"] for r in runs], med([r["idle_fds"] for r in runs]),
           runs[0]["idle_nat"]["tcp"], RSS_IDLE_TARGET_MB)
    for k in range(len(runs[0]["rows"])):
        rows = [r["rows"][k] for r in runs]
        n = rows[0]["n"]
        rssrow(f"{n} connections open", [x["open_rss"] for x in rows],
               med([x["open_fds"] for x in rows]), rows[0]["nat"]["tcp"],
               RSS_1000_TARGET_MB if n == TARGET_CONNS else None)
        rssrow(f"{n} connections after traffic", [x["after_rss"] for x in rows], "", "",
               RSS_1000_TARGET_MB if n == TARGET_CONNS else None)
    rssrow("all closed", [r["closed_rss"] for r in runs], med([r["closed_fds"] for r in runs]),
           runs[0]["closed_nat"]["tcp"], None)
    per = [(r["rows"][-1]["open_rss"]["VmRSS"] - r["idle"]["VmRSS"]) / max(r["rows"][-1]["n"], 1)
           for r in runs]
    L.append(f"per connection: {med(per) / 1e3:.1f} kB "
             f"(RSS with {runs[0]['rows'][-1]['n']} open minus idle, divided); "
             f"peak RSS (VmHWM) {med([r['hwm'] for r in runs]) / MB:.1f} MB")
    if runs[0]["idle_nat"]["tcp"] is not None:
        L.append("a `stats` request, every flow listed (the loop serves no frames meanwhile): " +
                 ", ".join(f"{runs[0]['rows'][k]['n']} conns "
                           f"{med([r['rows'][k]['stats_ms'] for r in runs]):.0f} ms"
                           for k in range(len(runs[0]["rows"]))))
    L.append("")
    head = (f"{'connections':>11} {'msg/s':>7} {'frames/msg':>10} {'us/frame':>9} {'us/msg':>7} "
            f"{'vs first':>8} {'p50 ms':>7} {'p99 ms':>7} {'retx b/g':>9} "
            f"{'backend%':>8} {'idle%':>6} {'guest%':>7} {'others%':>7}")
    L.append(head)
    L.append("-" * len(head))
    base = None
    for k in range(len(runs[0]["rows"])):
        rows = [r["rows"][k] for r in runs]
        upf = med([x["us_per_frame"] for x in rows])
        base = upf if base is None else base
        L.append(f"{rows[0]['n']:>11} {med([x['msgs_s'] for x in rows]):>7.0f} "
                 f"{med([x['frames_per_msg'] for x in rows]):>10.2f} {upf:>9.1f} "
                 f"{med([x['us_per_msg'] for x in rows]):>7.1f} {upf / base:>8.2f} "
                 f"{1e3 * med([x['lat_p50'] for x in rows]):>7.1f} "
                 f"{1e3 * med([x['lat_p99'] for x in rows]):>7.1f} "
                 f"{retx(rows):>9} "
                 f"{med([x['backend_cpu'] for x in rows]):>8.1f} "
                 f"{med([x['idle_cpu'] for x in rows]):>6.1f} "
                 f"{med([x['guest_cpu'] for x in rows]):>7.0f} {med([x['others_cpu'] for x in rows]):>7.0f}")
    return "\n".join(L)


def comparison(ours: list[dict], peer: list[dict], name: str) -> str:
    """vhostnet against PEER on the same machine, interleaved runs."""
    L = [f"## vhostnet / {name} (same runs, interleaved; < 1 is vhostnet smaller or cheaper)", ""]
    head = f"{'metric':<36} {'vhostnet':>9} {name:>9} {'ratio':>6}"
    L += [head, "-" * len(head)]

    def row(what, a, b, fmt="{:.1f}"):
        L.append(f"{what:<36} {fmt.format(a):>9} {fmt.format(b):>9} {a / b if b else float('nan'):>6.2f}")
    row("RSS idle, MB", med([r["idle"]["VmRSS"] for r in ours]) / MB,
        med([r["idle"]["VmRSS"] for r in peer]) / MB)
    for k in range(len(ours[0]["rows"])):
        n = ours[0]["rows"][k]["n"]
        a = [r["rows"][k] for r in ours]
        b = [r["rows"][k] for r in peer]
        row(f"RSS with {n} open, MB", med([x["open_rss"]["VmRSS"] for x in a]) / MB,
            med([x["open_rss"]["VmRSS"] for x in b]) / MB)
        row(f"backend us/frame, {n} conns", med([x["us_per_frame"] for x in a]),
            med([x["us_per_frame"] for x in b]))
        row(f"backend us/msg, {n} conns", med([x["us_per_msg"] for x in a]),
            med([x["us_per_msg"] for x in b]))
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--conns", default="1,100,1000",
                    help="connection counts, increasing (default 1,100,1000)")
    ap.add_argument("--rate", type=float, default=300.0,
                    help="ECHO messages/s offered, round-robin over the connections (default 300)")
    ap.add_argument("--seconds", type=float, default=8.0, help="traffic per row (default 8)")
    ap.add_argument("--idle-seconds", type=float, default=2.0,
                    help="idle CPU measured per row (default 2)")
    ap.add_argument("--runs", type=int, default=3, help="backends, one after another (default 3)")
    ap.add_argument("--batch", type=int, default=64,
                    help=f"connections opened at once (default 64; the NAT holds at most "
                         f"{HALF_OPEN_CAP} half-open)")
    ap.add_argument("--mem-mb", type=int, default=256, help="guest RAM in MiB (default 256)")
    ap.add_argument("--peers", default="passt" if shutil.which("passt") else "",
                    help="also measure these backends, interleaved with vhostnet's runs: passt "
                         "(default when installed; '' for none)")
    ap.add_argument("--pcap", metavar="PREFIX",
                    help="the backend writes every frame to PREFIX-RUN.pcap (costs CPU: for "
                         "looking at the frames, not for the numbers)")
    ap.add_argument("--profile-backend", metavar="PREFIX",
                    help="run the backend under cProfile (CPU time), writing PREFIX-RUN.prof "
                         "(slows it down: for finding hot spots, not for the numbers)")
    args = ap.parse_args()
    counts = [int(x) for x in args.conns.split(",")]
    if counts != sorted(counts) or counts[0] < 1:
        ap.error("--conns must be increasing positive counts")
    if not 1 <= args.batch <= HALF_OPEN_CAP:
        ap.error(f"--batch must be 1..{HALF_OPEN_CAP}")
    log_dir = ROOT / "logs" / "bench-scale"
    log_dir.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p != "passt":
            ap.error(f"unknown peer {p!r} (passt is the only one: slirp lives inside QEMU, "
                     f"whose RSS is the guest's RAM and TCG's)")
        if shutil.which("passt") is None:
            ap.error("passt is not installed (Debian package passt; scripts/setup.sh)")
    runs, peer_runs = [], []
    with HostServers(log_dir / "servers", redis=True) as hs:
        port = hs.ports["redis"]
        for run in range(args.runs):       # interleaved, so load bursts hit both alike
            runs.append(trio.run(one_run, args, port, log_dir, run))
            if peers:
                peer_runs.append(trio.run(passt_run, args, port, log_dir, run))
    load1 = os.getloadavg()
    print()
    print(f"# bench_scale: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"median of {len(runs)} run(s), {args.rate:g} msg/s offered for {args.seconds:g} s "
          f"per row, guest RAM {args.mem_mb} MiB; load average {load0[0]:.2f} before, "
          f"{load1[0]:.2f} after\n")
    print(table(runs, "vhostnet serve (NAT to redis-server on 127.0.0.1)"))
    if peer_runs:
        print()
        print(table(peer_runs, "passt (stream socket, no offloads; same guest stack and redis)"))
        print()
        print(comparison(runs, peer_runs, "passt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
