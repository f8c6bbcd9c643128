#!/usr/bin/env python3
"""TCP bulk throughput through the device, with a second stack playing the guest.

    python3 scripts/bench_device_tcp.py                 # both directions, with and without offloads
    python3 scripts/bench_device_tcp.py --seconds 10 --directions send
    python3 scripts/bench_device_tcp.py --rings split,packed --repeat 3 --offloads on

What runs:
- the backend is the real `python -m vhostnet serve --once` in its own
  process (so on its own core), with `--disable-feature offloads` for the
  rows without offloads;
- this process plays QEMU and the guest driver with the in-process frontend
  (vhostnet/testing/frontend.py: memfd guest RAM, eventfd kicks and calls, the
  QEMU 7.2 handshake, split rings of 256 entries, RX buffers of 4 KiB) and
  the guest's TCP/IP with a second `stack.Stack` whose roles are swapped:
  its own address is 10.0.2.15 (it "serves" that address) and 10.0.2.2 is
  an on-link neighbour it reaches by ARP through the device;
- send: the guest stack connects to the backend's discard (10.0.2.2:9) and
  keeps its send buffer full; recv: it reads from chargen (10.0.2.2:19).

Offloads: with them, the guest stack is told the backend takes partial
checksums and TSO (CSUM + HOST_TSO4 negotiated), so it hands the device
64 KiB TCP frames with the pseudo-header sum in the checksum field; they
travel with a virtio-net header saying NEEDS_CSUM / GSO_TCPV4, exactly
like Linux's virtio_net driver. The backend's frames come back the same way
(GUEST_CSUM + GUEST_TSO4, mergeable RX buffers). Without them, every frame
is at most 1514 bytes and every checksum is computed and verified in Python
on both sides.

Reported per row: goodput (bytes acknowledged by the backend for send,
bytes read for recv, after a 0.5 s warm-up), frames/s through the TX or RX
ring in the data direction (with TSO a frame is up to 64 KiB), the same
data in MSS-sized segments/s (what a real wire would carry), and CPU in %
of one core for the backend process and for this process (frontend + guest
stack, which is Python too: it often is the limit, see the CPU columns),
and "others%": the rest of the host's busy time, i.e. other processes
competing for the two cores (much above zero, the row is low).

Rings: each row runs on split rings (virtio 1.2 §2.7) and on packed rings
(§2.8: the frontend negotiates RING_PACKED and drives them through
vhostnet/testing/packed_driver.py), interleaved split, packed, split, ...;
with --repeat N each cell is the median of N runs, and a second table puts
packed and split side by side with their ratio.

Prints a table; not a test.
"""
from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import trio

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stack import Frame, NetConfig, Stack
from stack.tcp.config import TcpConfig
from vhostnet.testing.frontend import NET_HDR, Frontend
from vhostnet.testing.processes import end, start, wait_path_async
from vhostnet.virtio import features as F

GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY_IP = bytes([10, 0, 2, 2])
DISCARD, CHARGEN = 9, 19
NEEDS_CSUM, DATA_VALID, GSO_TCPV4 = 1, 2, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP = 0.5
WIRE_MSS = 1448          # MSS 1460 less the 12-byte timestamp option


def guest_stack(bufsize: int) -> Stack:
    """A Stack that owns 10.0.2.15 and sees 10.0.2.2 as a neighbour: NetConfig
    with guest and gateway swapped (its 'gateway' is the address it answers for).
    BUFSIZE: its TCP send and receive buffers."""
    cfg = NetConfig(guest_ip="10.0.2.2", gateway_ip="10.0.2.15", dns_ip="10.0.2.4",
                    guest_mac="52:55:0a:00:02:02", gateway_mac="52:54:00:12:34:56")
    st = Stack(cfg)
    st.tcp.config = TcpConfig(sndbuf=bufsize, rcvbuf=bufsize)   # read by each new connection
    return st


def host_busy() -> float:
    """CPU seconds all cores have spent busy since boot (from /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / CLK_TCK


def wait_quiet(limit: float, quiet: float = 25.0) -> float:
    """Wait up to LIMIT s until other processes use less than QUIET % of one core."""
    t0 = time.monotonic()
    while True:
        a = host_busy()
        time.sleep(1.0)
        load = 100 * (host_busy() - a)
        if load <= quiet or time.monotonic() - t0 >= limit:
            return load
        print(f"bench_device_tcp: host busy ({load:.0f}% of one core), waiting",
              file=sys.stderr, flush=True)


def proc_cpu(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


class Guest:
    """The guest driver + guest TCP/IP on top of the frontend's rings."""

    def __init__(self, fe: Frontend, bufsize: int):
        self.fe = fe
        self.st = guest_stack(bufsize)
        feats = fe.features
        self.tx_csum = bool(feats >> F.CSUM & 1)
        self.tx_tso = bool(feats >> F.HOST_TSO4 & 1) and self.tx_csum
        # What the *backend* accepts is what this stack may send.
        self.st.set_offloads(csum=self.tx_csum, tso=self.tx_tso)
        self.pending: list[Frame] = []
        self.tx_frames = self.rx_frames = 0
        self.tx_bytes = self.rx_bytes = 0
        fe.post_rx()
        fe.rx.kick()

    def _hdr(self, f: Frame) -> bytes:
        if not f.csum_start:
            return self.fe.net_hdr()
        gso_type = hdr_len = 0
        if f.gso_size:
            d = f.data
            hdr_len = f.csum_start + ((d[f.csum_start + 12] >> 4) << 2)
            gso_type = GSO_TCPV4
        return self.fe.net_hdr(flags=NEEDS_CSUM, gso_type=gso_type, hdr_len=hdr_len,
                               gso_size=f.gso_size, csum_start=f.csum_start,
                               csum_offset=f.csum_offset)

    def step(self, now: float) -> bool:
        """Move frames both ways once. True if anything moved."""
        fe, st = self.fe, self.st
        moved = False
        # RX: the backend's frames into the guest stack, buffers re-posted.
        got = fe.read_rx()
        if got:
            moved = True
            for hdr, body in got:
                flags, gso_type, _hl, gso_size, cs, co, _n = NET_HDR.unpack(hdr.ljust(12, b"\0"))
                f = Frame(body, cs if flags & NEEDS_CSUM else 0, co if flags & NEEDS_CSUM else 0,
                          gso_size if gso_type else 0, bool(flags & DATA_VALID))
                self.rx_frames += 1
                self.rx_bytes += len(body)
                st.receive(f, now)
            if fe.post_rx():
                fe.rx.kick()
        st.poll(now)
        # TX: the guest stack's frames into the TX ring, completed ones reclaimed.
        fe.tx.take_used()
        self.pending.extend(st.take_frames())
        posted = 0
        while self.pending and fe.tx.free:
            f = self.pending.pop(0)
            fe.post_tx(bytes(f.data), self._hdr(f))
            self.tx_frames += 1
            self.tx_bytes += len(f.data)
            posted += 1
        if posted:
            fe.tx.kick()
            moved = True
        return moved

    def wait(self, timeout: float) -> None:
        """Sleep until the backend calls on either queue (or TIMEOUT)."""
        p = select.poll()
        for r in (self.fe.rx, self.fe.tx):
            p.register(r.call_fd, select.POLLIN)
        if p.poll(max(0, int(timeout * 1000))):
            for r in (self.fe.rx, self.fe.tx):
                r.calls()


def backend_retransmits(ctl: str) -> int | None:
    """Retransmits of the backend's TCP connections, from its control socket."""
    from vhostnet.observe.control import ControlClient, ControlError
    try:
        with ControlClient(ctl, timeout=5) as c:
            doc = c.request("stats")
    except (ControlError, OSError, ValueError):
        return None
    conns = doc.get("stack", {}).get("tcp", [])
    return sum(c.get("retransmits", 0) for c in conns if isinstance(c, dict))


async def one_run(direction: str, offloads: bool, seconds: float, log_dir: Path,
                  bufsize: int, profile: str | None = None, packed: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="vhostnet-devtcp-") as d:
        sock = os.path.join(d, "vhost.sock")
        prof = [] if not profile else \
            ["-m", "cProfile", "-o", f"{profile}-{direction}-{'on' if offloads else 'off'}.prof"]
        argv = [sys.executable, *prof, "-m", "vhostnet", "serve", "--socket", sock, "--once",
                "--log-level", "warning"]
        if not offloads:
            argv += ["--disable-feature", "offloads"]
        backend = start(argv, log_dir / f"backend-{direction}-{'offloads' if offloads else 'none'}.log",
                        cwd=ROOT)
        fe = None
        try:
            await wait_path_async(sock, backend, "vhostnet serve")
            fe = Frontend(mem_size=32 << 20, queue_size=256, packed=packed)
            await fe.connect(sock)
            await fe.handshake()
            r = drive(fe, backend.pid, direction, offloads, seconds, bufsize)
            r["backend_retransmits"] = backend_retransmits(sock + ".ctl")
            r["ring"] = "packed" if packed else "split"
            return r
        finally:
            if fe is not None:
                await fe.close()
            end(backend, linger=5)      # --once: it exits when we hang up
            if fe is not None:
                fe.release()


def drive(fe: Frontend, backend_pid: int, direction: str, offloads: bool, seconds: float,
          bufsize: int) -> dict:
    g = Guest(fe, bufsize)
    st = g.st
    now = time.monotonic()
    port = DISCARD if direction == "send" else CHARGEN
    conn = st.tcp.connect(now, GUEST_IP, 0, GATEWAY_IP, port)
    block = memoryview(bytes(range(256)) * 256)

    def fill(c):
        while c.send_space:
            if not c.send(block[:min(c.send_space, len(block))]):
                break

    def drain(c):
        c.recv()

    if direction == "send":
        conn.on_established = conn.on_writable = fill
    else:
        conn.on_readable = drain

    def progress() -> int:
        return conn.snd_una - conn.iss - 1 if direction == "send" else conn.bytes_in

    t_start = time.monotonic()
    hard_stop = t_start + seconds + WARMUP + 10
    mark = None
    while True:
        now = time.monotonic()
        if mark is None and now >= t_start + WARMUP:
            if conn.state.value != "ESTABLISHED":
                raise RuntimeError(f"not connected after {WARMUP} s: {conn.state.value}")
            mark = (now, progress(), g.tx_frames, g.rx_frames, proc_cpu(backend_pid),
                    proc_cpu(os.getpid()), host_busy())
        if mark is not None and now >= mark[0] + seconds:
            break
        if now > hard_stop:
            raise RuntimeError("no end in sight")
        if conn.error:
            raise RuntimeError(f"connection failed: {conn.error}")
        if not g.step(now):
            nd = st.next_deadline()
            g.wait(min(0.05, max(0.0, nd - now)) if nd is not None else 0.05)
    t1 = time.monotonic()
    t0, b0, tx0, rx0, cpu0, self0, host0 = mark
    backend_cpu = proc_cpu(backend_pid) - cpu0
    self_cpu = proc_cpu(os.getpid()) - self0
    others = host_busy() - host0 - backend_cpu - self_cpu
    dt = t1 - t0
    nbytes = progress() - b0
    frames = (g.tx_frames - tx0) if direction == "send" else (g.rx_frames - rx0)
    info = conn.info()
    return {
        "direction": direction, "offloads": offloads, "seconds": dt, "bytes": nbytes,
        "gbit": nbytes * 8 / dt / 1e9, "frames_s": frames / dt, "bytes_per_frame": nbytes / max(frames, 1),
        "segs_s": nbytes / WIRE_MSS / dt,
        "backend_cpu": 100 * backend_cpu / dt, "self_cpu": 100 * self_cpu / dt,
        "others_cpu": max(0.0, 100 * others / dt),
        "retransmits": info["retransmits"], "guest_counters": dict(st.all_counters()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per row (default 5)")
    ap.add_argument("--directions", default="send,recv",
                    help="send (guest->backend discard), recv (backend chargen->guest)")
    ap.add_argument("--offloads", default="on,off", help="on, off or on,off")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each row, wait up to SECONDS for other processes to go "
                         "below 25%% of one core (for shared machines)")
    ap.add_argument("--guest-buf", type=int, default=256 * 1024, metavar="BYTES",
                    help="the guest stack's TCP send/receive buffers (default 256 KiB, as the "
                         "backend's: with recv, the receive window)")
    ap.add_argument("--profile-backend", metavar="PREFIX",
                    help="run the backend under cProfile, writing PREFIX-DIRECTION-on|off.prof "
                         "(slows it down: for finding hot spots, not for the numbers)")
    ap.add_argument("--rings", default="split,packed", help="split, packed or split,packed (default)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell, interleaved; medians shown")
    args = ap.parse_args()
    rings = args.rings.split(",")
    if not rings or any(r not in ("split", "packed") for r in rings) or args.repeat < 1:
        ap.error(f"bad --rings {args.rings!r} or --repeat {args.repeat}")
    log_dir = ROOT / "logs" / "bench-device-tcp"
    log_dir.mkdir(parents=True, exist_ok=True)
    cells: dict[tuple, list[dict]] = {}
    for _ in range(args.repeat):
        for offl in [o == "on" for o in args.offloads.split(",")]:
            for direction in args.directions.split(","):
                for ring in rings:
                    if args.wait_quiet:
                        wait_quiet(args.wait_quiet)
                    r = trio.run(one_run, direction, offl, args.seconds, log_dir, args.guest_buf,
                                 args.profile_backend, ring == "packed")
                    cells.setdefault((direction, offl, ring), []).append(r)
                    print(f"bench_device_tcp: {direction} offloads={'on' if offl else 'off'} {ring}: "
                          f"{r['gbit']:.3f} Gbit/s", file=sys.stderr, flush=True)
    # Each cell: its median run by goodput (the other columns are that run's).
    rows = [sorted(runs, key=lambda r: r["gbit"])[len(runs) // 2] for runs in cells.values()]
    print(f"\n# bench_device_tcp: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"{args.seconds:g} s per row, median of {args.repeat}, backend in its own process")
    head = (f"{'direction':<22} {'offloads':>8} {'ring':>6} {'Gbit/s':>8} {'frames/s':>10} {'B/frame':>8} "
            f"{'MSS segs/s':>11} {'backend CPU%':>12} {'guest CPU%':>10} {'others%':>7} {'retx g/b':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        name = "guest->backend (send)" if r["direction"] == "send" else "backend->guest (recv)"
        print(f"{name:<22} {'on' if r['offloads'] else 'off':>8} {r['ring']:>6} {r['gbit']:>8.3f} "
              f"{r['frames_s']:>10,.0f} {r['bytes_per_frame']:>8,.0f} {r['segs_s']:>11,.0f} "
              f"{r['backend_cpu']:>12.0f} {r['self_cpu']:>10.0f} {r['others_cpu']:>7.0f} "
              f"{str(r['retransmits']) + '/' + str(r['backend_retransmits']):>9}")
    if len(rings) == 2:
        # Side by side; "per backend core" divides goodput by the backend's CPU share,
        # which is what a starved backend on a shared machine would do with a core.
        print(f"\n{'direction':<22} {'offloads':>8} {'split Gbit/s':>13} {'packed Gbit/s':>14} "
              f"{'packed/split':>13} {'split /core':>12} {'packed /core':>13}")
        for (direction, offl, ring), runs in cells.items():
            if ring != "split":
                continue
            med = {}
            for rg in ("split", "packed"):
                rs = cells[(direction, offl, rg)]
                med[rg] = (statistics.median(r["gbit"] for r in rs),
                           statistics.median(r["gbit"] * 100 / max(r["backend_cpu"], 1e-9) for r in rs))
            name = "guest->backend (send)" if direction == "send" else "backend->guest (recv)"
            print(f"{name:<22} {'on' if offl else 'off':>8} {med['split'][0]:>13.3f} {med['packed'][0]:>14.3f} "
                  f"{med['packed'][0] / max(med['split'][0], 1e-9):>13.2f} {med['split'][1]:>12.2f} "
                  f"{med['packed'][1]:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
