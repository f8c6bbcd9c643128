#!/usr/bin/env python3
"""The network services, measured: DHCP DISCOVER-to-ACK, DNS queries relayed
per second, TFTP throughput by block size. Prints tables; not a test.

DHCP  - stack: DISCOVER -> OFFER -> REQUEST -> ACK fed straight into a Stack
        (scapy-built frames, replies parsed by the server only), per exchange;
      - backend: the same through the real server and the in-process frontend
        (kicks, rings, eventfds);
      - U-Boot: what U-Boot's `dhcp` prints ("bound ... (N ms)") on vhostnet
        and on QEMU's slirp, the peer, in the same run.
DNS   - queries/s through the backend (frontend -> stack -> relay -> a dnspython
        server on 127.0.0.1 -> back), W queries in flight; the peer is the same
        client pattern sent straight to that server over a host UDP socket.
TFTP  - stack: one transfer of a file to a client that ACKs at once (no link),
        at blksize 512 (default), 1468 (largest in one 1500-byte frame) and
        65464 (largest, RFC 2348; IP fragments);
      - U-Boot: `tftpboot` throughput as U-Boot prints it, vhostnet vs slirp,
        at 512 and 1468 (U-Boot caps its block size at 1468), and 1468 with
        windowsize 16 (RFC 7440; slirp ignores the option: lock-step).

Nothing leaves the machine: every server is on 127.0.0.1 or in QEMU.
    python scripts/bench_services.py [--quick] [--no-qemu]
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dns.message  # noqa: E402
import trio  # noqa: E402
from scapy.layers.dhcp import BOOTP, DHCP  # noqa: E402
from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.utils import mac2str  # noqa: E402

from stack import Frame, NetConfig  # noqa: E402
from stack.interface import Stack  # noqa: E402
from stack.services.config import ServicesConfig  # noqa: E402
from vhostnet.hostnet.tftp_root import TftpRoot  # noqa: E402
from vhostnet.launch.serve import make_server, serve_backend  # noqa: E402
from vhostnet.testing.dnsserver import DnsTestServer  # noqa: E402
from vhostnet.testing.frontend import Frontend  # noqa: E402
from vhostnet.testing.uboot import UBoot, missing, uboot_argv, uboot_session  # noqa: E402

GMAC, GWMAC = "52:54:00:12:34:56", "52:55:0a:00:02:02"


def dhcp_frames(xid=1):
    base = Ether(src=GMAC, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
    disc = base / BOOTP(xid=xid, chaddr=mac2str(GMAC)) / DHCP(options=[("message-type", "discover"), "end"])
    req = base / BOOTP(xid=xid, chaddr=mac2str(GMAC)) / DHCP(options=[
        ("message-type", "request"), ("server_id", "10.0.2.2"), ("requested_addr", "10.0.2.15"), "end"])
    return bytes(disc), bytes(req)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


# ------------------------------------------------------------------ DHCP
def dhcp_stack(n: int) -> list[float]:
    st = Stack(NetConfig(), net_services=ServicesConfig(dns=False))
    disc, req = dhcp_frames()
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        st.receive(Frame(disc), float(i))
        assert len(st.take_frames()) == 1
        st.receive(Frame(req), float(i))
        assert len(st.take_frames()) == 1
        out.append(time.perf_counter() - t0)
    assert st.counters["dhcp_tx_ack"] == n
    return out


async def dhcp_backend(n: int) -> list[float]:
    disc, req = dhcp_frames()
    out = []
    async with backend(ServicesConfig(dns=False)) as (srv, fe):
        for _ in range(n):
            t0 = time.perf_counter()
            a = await fe.exchange([disc], want=1)
            b = await fe.exchange([req], want=1)
            assert len(a) == len(b) == 1
            out.append(time.perf_counter() - t0)
    return out


class backend:
    def __init__(self, svc, upstreams=()):
        self.svc, self.upstreams = svc, upstreams

    async def __aenter__(self):
        self.dir = tempfile.TemporaryDirectory(prefix="vn-bench-", dir="/tmp")
        self.srv = make_server(os.path.join(self.dir.name, "v.sock"), net_services=self.svc,
                               dns_upstreams=list(self.upstreams))
        self.srv.listen()
        self._n = trio.open_nursery()
        self.nursery = await self._n.__aenter__()
        await self.nursery.start(serve_backend, self.srv)
        self.fe = Frontend()
        await self.fe.connect(self.srv.socket_path)
        await self.fe.handshake()
        self.fe.post_rx()
        self.fe.rx.kick()
        return self.srv, self.fe

    async def __aexit__(self, *exc):
        await self.fe.shutdown(self.srv)
        self.nursery.cancel_scope.cancel()
        await self._n.__aexit__(*exc)
        self.dir.cleanup()


# ------------------------------------------------------------------- DNS
def dns_query_frame(i: int) -> bytes:
    q = dns.message.make_query("host.test.", "A")
    q.id = i & 0xFFFF
    return bytes(Ether(src=GMAC, dst=GWMAC) / IP(src="10.0.2.15", dst="10.0.2.3")
                 / UDP(sport=20000 + (i % 20000), dport=53) / q.to_wire())


async def dns_backend(total: int, window: int, server: DnsTestServer) -> float:
    frames = [dns_query_frame(i) for i in range(total)]
    async with backend(ServicesConfig(dhcp=False, dns_max_inflight=max(64, window)),
                       [("127.0.0.1", server.port)]) as (srv, fe):
        await fe.exchange(frames[:window], want=window, timeout=10)    # warm up
        t0 = time.perf_counter()
        done = 0
        for i in range(0, total, window):
            batch = frames[i:i + window]
            got = await fe.exchange(batch, want=len(batch), timeout=10)
            done += len(got)
        dt = time.perf_counter() - t0
        answered = srv.current.device.stack.counters["dns_answered"]
    assert done == total and answered == total + window, (done, answered)   # + the warm-up
    return total / dt


async def dns_direct(total: int, window: int, server: DnsTestServer) -> float:
    """The peer: the same queries, W in flight, from a host UDP socket to the server."""
    wires = [dns.message.from_wire(bytes(Ether(f)[UDP].payload)).to_wire() for f in
             (dns_query_frame(i) for i in range(window))]
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await s.connect(("127.0.0.1", server.port))
    t0 = time.perf_counter()
    for _ in range(0, total, window):
        for w in wires:
            await s.send(w)
        for _ in wires:
            await s.recv(65535)
    dt = time.perf_counter() - t0
    s.close()
    return total / dt


# ------------------------------------------------------------------ TFTP
def tftp_stack(size: int, blksize: int, root: str) -> float:
    st = Stack(NetConfig(), net_services=ServicesConfig(dhcp=False, dns=False,
                                                       tftp_files=TftpRoot(root)))
    rrq = b"\0\1f.bin\0octet\0blksize\0" + str(blksize).encode() + b"\0"
    hdr = Ether(src=GMAC, dst=GWMAC) / IP(src="10.0.2.15", dst="10.0.2.2")
    st.receive(Frame(bytes(hdr / UDP(sport=3000, dport=69) / rrq)), 0.0)
    first = st.take_frames()
    port = struct.unpack_from("!H", bytes(first[0].data), 34)[0]
    ack = bytearray(bytes(hdr / UDP(sport=3000, dport=port, chksum=0) / b"\0\4\0\0"))
    got = 0
    block = 0
    t0 = time.perf_counter()
    while True:
        ack[44:46] = struct.pack("!H", block & 0xFFFF)
        st.receive(Frame(bytes(ack)), 0.0)
        frames = st.take_frames()
        if not frames:
            break
        got += sum(len(f.data) for f in frames)
        block += 1
    dt = time.perf_counter() - t0
    assert st.counters["tftp_completed"] == 1 and st.counters["tftp_bytes"] == size
    return size / dt


def uboot_run(root: str, runs: list, slirp: bool, logdir: str) -> dict:
    """U-Boot's own numbers: DHCP ms (3 runs), and MiB/s per (blksize, windowsize)."""
    res = {"dhcp_ms": [], "tftp": {}}

    def drive(u):
        u.command("setenv autoload no")
        for _ in range(3):
            out = u.command("dhcp", timeout=60)
            m = re.search(r"bound to address \S+ \((\d+) ms\)", out)
            res["dhcp_ms"].append(int(m.group(1)) if m else None)
        u.command("setenv serverip 10.0.2.2")
        for b, w in runs:
            u.command(f"setenv tftpblocksize {b}")
            u.command(f"setenv tftpwindowsize {w}")
            out = u.command("tftpboot ${loadaddr} f.bin", timeout=300)
            m = re.search(r"([\d.]+) (KiB|MiB)/s", out)
            ok = "Bytes transferred" in out
            res["tftp"][(b, w)] = (float(m.group(1)) / (1024 if m.group(2) == "KiB" else 1)
                                   if m and ok else None)
    if slirp:
        argv = uboot_argv("q35", None, legacy=None, netdev="user")
        argv = [f"user,id=net0,tftp={root}" if a == "user,id=net0" else a for a in argv]
        u = UBoot(argv, Path(logdir) / "uboot-slirp.log")
        try:
            u.stop_autoboot()
            u.command("virtio scan")
            drive(u)
        finally:
            u.close()
    else:
        with uboot_session("q35", backend_args=["--no-dns", "--tftp", root],
                           workdir=Path(logdir) / "uboot-vhostnet") as u:
            drive(u)
    return res


async def linux_tftp_run(root: str, slirp: bool) -> dict[int, float]:
    """The test guest's busybox tftp (TFTP_TEST=1): seconds per block size."""
    from vhostnet.launch import qemu
    gv = {"NET": 1, "DHCP": 1, "TFTP_TEST": 1, "ICMP_TEST": 0, "TCP_ECHO_TEST": 0,
          "UDP_ECHO_TEST": 0, "NET_LOOPBACK_TEST": 0}
    image = qemu.find_image()

    async def boot(sock):
        argv = qemu.qemu_argv(sock, image=image, accel="tcg", guest_vars=gv,
                              netdev="user" if sock is None else "vhost-user")
        argv = [f"user,id=net0,tftp={root}" if a == "user,id=net0" else a for a in argv]
        p = await trio.run_process(argv, stdin=b"", capture_stdout=True, stderr=-2, check=False)
        out = p.stdout.decode(errors="replace")
        return {int(b): int(cs) / 100 for b, cs in
                re.findall(r"tftp: blksize (\d+) bytes \d+ sha256 \w+ centiseconds (\d+)", out)}
    if slirp:
        return await boot(None)
    d = tempfile.mkdtemp(prefix="vn-lx-", dir="/tmp")
    srv = make_server(os.path.join(d, "v.sock"), net_services=ServicesConfig(
        dns=False, tftp_files=TftpRoot(root)))
    srv.listen()
    async with trio.open_nursery() as n:
        await n.start(serve_backend, srv)
        res = await boot(srv.socket_path)
        n.cancel_scope.cancel()
    return res


async def main_async(args) -> None:
    n_dhcp = 200 if args.quick else 2000
    print("DHCP DISCOVER -> ACK (one full exchange: DISCOVER/OFFER + REQUEST/ACK)")
    s = dhcp_stack(n_dhcp)
    b = await dhcp_backend(n_dhcp // 10)
    print(f"  {'path':<34}{'n':>6}{'median':>12}{'p99':>12}")
    print(f"  {'stack (in-process)':<34}{len(s):>6}{statistics.median(s) * 1e6:>10.0f}us{pct(s, 99) * 1e6:>10.0f}us")
    print(f"  {'backend (frontend, rings, fds)':<34}{len(b):>6}{statistics.median(b) * 1e6:>10.0f}us{pct(b, 99) * 1e6:>10.0f}us")

    total = 1000 if args.quick else 5000
    print(f"\nDNS relayed, {total} queries, A host.test. against a dnspython server on 127.0.0.1")
    print(f"  {'window':>6}{'backend q/s':>14}{'direct q/s':>14}{'ratio':>8}")
    # The server runs in its own process, so that it does not share this
    # process's interpreter with the backend or the direct client.
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vhostnet.testing.dnsserver"], stdout=-1,
        env={**os.environ, "PYTHONPATH": ROOT})
    try:
        line = b""
        while not line.endswith(b"\n"):
            line += await proc.stdout.receive_some(100)
        server = DnsTestServer(port=int(line.split()[1]))       # just the address
        for w in (1, 16, 64):
            qb = await dns_backend(total, w, server)
            qd = await dns_direct(total, w, server)
            print(f"  {w:>6}{qb:>14,.0f}{qd:>14,.0f}{qb / qd:>8.2f}")
    finally:
        proc.kill()
        await proc.wait()

    size = (2 if args.quick else 8) << 20
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "f.bin"), "wb") as f:
            f.write(os.urandom(size))
        print(f"\nTFTP, stack only (client ACKs at once, no link), {size >> 20} MiB file")
        print(f"  {'blksize':>8}{'MB/s':>10}")
        for blk in (512, 1468, 8192, 65464):
            print(f"  {blk:>8}{tftp_stack(size, blk, root) / 1e6:>10.1f}")
        if args.no_qemu or missing() is not None:
            print(f"\n(U-Boot runs skipped: {'--no-qemu' if args.no_qemu else missing()})")
            return
        lx_size = 1 << 20
        with open(os.path.join(root, "tftp.bin"), "wb") as f:
            f.write(os.urandom(lx_size))
        print(f"\nLinux test guest (TCG), busybox tftp of {lx_size >> 20} MiB: MiB/s (seconds)")
        v = await linux_tftp_run(root, slirp=False)
        p = await linux_tftp_run(root, slirp=True)
        print(f"  {'blksize':>8}{'vhostnet':>18}{'slirp':>18}{'ratio':>8}")
        for blk in (512, 1468, 65464):
            a, c = v.get(blk), p.get(blk)
            fa = f"{lx_size / a / 2**20:.2f} ({a:.2f}s)" if a else "fail"
            fc = f"{lx_size / c / 2**20:.2f} ({c:.2f}s)" if c else "fail"
            print(f"  {blk:>8}{fa:>18}{fc:>18}{(c / a if a and c else 0):>8.2f}")
        ub_size = 4 << 20
        with open(os.path.join(root, "f.bin"), "wb") as f:
            f.write(os.urandom(ub_size))
        print(f"\nU-Boot (TCG), its own numbers: dhcp 'bound (N ms)' x3 and tftpboot of {ub_size >> 20} MiB")
        runs = [(512, 1), (1468, 1), (1468, 16)]
        logdir = tempfile.mkdtemp(prefix="vn-bench-ub-")
        v = uboot_run(root, runs, slirp=False, logdir=logdir)
        p = uboot_run(root, runs, slirp=True, logdir=logdir)
        print(f"  {'':<26}{'vhostnet':>10}{'slirp':>10}{'ratio':>8}")
        print(f"  {'dhcp ms (3 runs)':<26}{str(v['dhcp_ms']):>10}{str(p['dhcp_ms']):>10}")
        for key in ((512, 1), (1468, 1), (1468, 16)):
            a, c = v["tftp"][key], p["tftp"][key]
            r = f"{a / c:.2f}" if a and c else "-"
            name = f"tftp MiB/s blk {key[0]}" + (f" win {key[1]}" if key[1] > 1 else "")
            print(f"  {name:<26}{f'{a:.2f}' if a else 'fail':>10}{f'{c:.2f}' if c else 'fail':>10}{r:>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--no-qemu", action="store_true", help="skip the U-Boot runs")
    trio.run(main_async, ap.parse_args())


if __name__ == "__main__":
    main()
