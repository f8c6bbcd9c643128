"""Capture to pcap: `vhostnet capture -w` over the control socket and `vhostnet serve
--pcap` from the start, read back by tshark (skipped only if tshark is missing)."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import trio
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from stack.checksum import pseudo_sum
from vhostnet.observe.control import ControlClient
from vhostnet.observe.pcap import PcapWriter

from vhostnet.testing.frontend import Frontend
from .device.test_datapath import GUEST_MAC, GW_MAC, arp_request, ping
from .observe import backend, cli, guest, sockdir  # noqa: F401 (fixtures)

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")


def tshark(path, *fields, opts=()) -> list[list[str]]:
    argv = ["tshark", "-n", "-r", str(path), *opts, "-T", "fields"]
    for f in fields:
        argv += ["-e", f]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


CHECK = ("-o", "udp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE")


def udp_partial(payload=b"hello", sport=5555):
    """A UDP datagram to the echo port whose checksum the guest left to the device
    (NEEDS_CSUM): the field holds the pseudo-header sum."""
    n = 8 + len(payload)
    ps = pseudo_sum(bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2]), 17, n)
    frame = bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.2") /
                  UDP(sport=sport, dport=7, chksum=ps) / payload)
    return frame


async def _wait_taps(srv, n=1):
    with trio.fail_after(5):
        while len(srv.taps) < n:
            await trio.sleep(0.005)


def test_pcap_writer_format(tmp_path):
    p = tmp_path / "a.pcap"
    with open(p, "wb") as f:
        w = PcapWriter(f)
        w.write(ping(seq=1), ts=1700000000.25)
        w.write(arp_request(), ts=1700000001.0)
    raw = p.read_bytes()
    assert raw[:4] == bytes.fromhex("d4c3b2a1")          # little-endian classic pcap, microseconds
    assert int.from_bytes(raw[20:24], "little") == 1     # LINKTYPE_ETHERNET
    pkts = rdpcap(str(p))
    assert [bytes(x) for x in pkts] == [ping(seq=1), arp_request()]
    assert float(pkts[0].time) == 1700000000.25


@needs_tshark
async def test_cli_capture_read_by_tshark(backend, guest, sockdir, capsys):
    srv, ctl = backend
    out = sockdir / "c.pcap"
    async with trio.open_nursery() as n:
        async def capture():
            assert await cli("capture", "--control", ctl.path, "-w", str(out), "--count", "4") == 0
        n.start_soon(capture)
        await _wait_taps(srv)
        await guest.exchange([arp_request(), ping(seq=1)], want=2)
    err = capsys.readouterr().err
    assert f"4 frame(s) to {out}" in err
    rows = tshark(out, "frame.protocols", "eth.src", "icmp.type")
    # One kick's TX frames all reach the stack before the replies go out.
    assert rows == [["eth:ethertype:arp", GUEST_MAC, ""], ["eth:ethertype:ip:icmp:data", GUEST_MAC, "8"],
                    ["eth:ethertype:arp", GW_MAC, ""], ["eth:ethertype:ip:icmp:data", GW_MAC, "0"]]
    with trio.fail_after(5):
        while srv.taps:
            await trio.sleep(0.005)


@needs_tshark
async def test_partial_checksums_are_completed(backend, guest, sockdir, capsys):
    srv, ctl = backend
    done, raw = sockdir / "done.pcap", sockdir / "raw.pcap"
    async with trio.open_nursery() as n:
        async def capture(path, *extra):
            assert await cli("capture", "--control", ctl.path, "-w", str(path), "--count", "2", *extra) == 0
        n.start_soon(capture, done)
        n.start_soon(capture, raw, "--raw-csum")
        await _wait_taps(srv, 2)
        guest.post_tx(udp_partial(), hdr=guest.net_hdr(flags=1, csum_start=34, csum_offset=6))
        got = await guest.exchange([], want=1)
    assert UDP in Ether(got[0])   # the echo came back
    assert srv.current.device.counters["tx_frames"] == 1
    rows = tshark(done, "frame.protocols", "udp.checksum.status", opts=CHECK)
    assert [r[1] for r in rows] == ["1", "1"], rows        # 1 = Good
    rows = tshark(raw, "udp.checksum.status", opts=CHECK)
    assert rows[0] == ["0"]                                 # the guest's partial sum: Bad as it stands


def test_capture_without_a_backend_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vhostnet", "capture", "--control", str(tmp_path / "x"),
                        "-w", "-"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "no control socket at" in r.stderr and "Traceback" not in r.stderr


@needs_tshark
async def test_serve_pcap_from_the_start(sockdir):
    """The real `vhostnet serve --pcap` process, a frontend from this test, SIGTERM at the end."""
    sock, pcap = sockdir / "v.sock", sockdir / "all.pcap"
    proc = subprocess.Popen([sys.executable, "-m", "vhostnet", "serve", "--socket", str(sock),
                             "--pcap", str(pcap), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(15):
            while not os.path.exists(str(sock) + ".ctl"):
                assert proc.poll() is None, proc.stderr.read()
                await trio.sleep(0.02)
        # Two more captures: pcap on stdout (-w -), and live decoded lines.
        cap = [sys.executable, "-m", "vhostnet", "capture", "--socket", str(sock), "--count", "6"]
        to_stdout = subprocess.Popen(cap + ["-w", "-"], stdout=open(sockdir / "stdout.pcap", "wb"),
                                     stderr=subprocess.PIPE)
        lines = subprocess.Popen(cap, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with ControlClient(str(sock) + ".ctl") as c:
            with trio.fail_after(15):
                while c.request("stats")["backend"]["taps"] < 3:
                    await trio.sleep(0.02)
        fe = Frontend()
        await fe.connect(str(sock))
        await fe.handshake()
        fe.post_rx()
        fe.rx.kick()
        got = await fe.exchange([arp_request(), ping(seq=1), ping(seq=2)], want=3)
        assert len(got) == 3
        assert to_stdout.wait(15) == 0 and lines.wait(15) == 0
        live = lines.stdout.read().splitlines()
        assert len(live) == 6
        assert " tx 52:54:00:12:34:56 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: ARP, " \
               "Request who-has 10.0.2.2 tell 10.0.2.15" in live[0]
        assert live[5].endswith("IP 10.0.2.2 > 10.0.2.15: ICMP echo reply, id 4660, seq 2, length 64")
        assert " rx " in live[5]
        assert len(tshark(sockdir / "stdout.pcap", "frame.protocols")) == 6
        # Live lines from a second client, while the file keeps being written.
        r = await trio.run_process([sys.executable, "-m", "vhostnet", "stats", "--socket", str(sock)],
                                   capture_stdout=True, capture_stderr=True)
        assert b"tx (guest->stack)          3" in r.stdout
        await fe.close()
        await trio.sleep(0.1)
        fe.release()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "control socket" in err and "Traceback" not in err
    assert not os.path.exists(sock) and not os.path.exists(str(sock) + ".ctl")
    if shutil.which("tcpdump"):
        r = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "link-type EN10MB (Ethernet)" in r.stderr
        assert len(r.stdout.splitlines()) == 6 and "ICMP echo reply, id 4660, seq 2" in r.stdout
    rows = tshark(pcap, "frame.protocols", "eth.src", "icmp.seq", opts=CHECK)
    arp, icmp = "eth:ethertype:arp", "eth:ethertype:ip:icmp:data"
    assert rows == [[arp, GUEST_MAC, ""], [icmp, GUEST_MAC, "1"], [icmp, GUEST_MAC, "2"],
                    [arp, GW_MAC, ""], [icmp, GW_MAC, "1"], [icmp, GW_MAC, "2"]]


async def test_taps_cost_nothing_without_a_capture(backend, guest):
    srv, _ = backend
    dev = srv.current.device
    assert dev.taps is srv.taps and dev.taps == []
    await guest.exchange([ping(seq=1)], want=1)
    assert dev.taps == []
