"""Looking inside a real QEMU guest (marker `qemu`): `vhostnet run` boots the test
image (scripts/build-guest.sh -> qemu/build/), and from outside we watch the
rings move with `inspect`, record the guest's frames with `capture`, and
check that `run` leaves no process or socket behind however it ends.

Each test boots one guest (TCG: ~3 s to init, a few more for the network
tests it asks for) and stays well under a minute.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vhostnet.launch import qemu
from vhostnet.observe.control import ControlClient, ControlError

pytestmark = pytest.mark.qemu

try:
    IMAGE = qemu.find_image()
except qemu.ImageNotBuilt as e:
    IMAGE = None
    NO_IMAGE = str(e)

if shutil.which(qemu.QEMU) is None:
    pytestmark = [pytest.mark.qemu, pytest.mark.skip(reason=f"{qemu.QEMU} is not installed")]
elif IMAGE is None:
    pytestmark = [pytest.mark.qemu, pytest.mark.skip(reason=NO_IMAGE)]

# Only what these tests need from the guest: the link, ARP, pings.
QUICK = "vhostnet.TCP_ECHO_TEST=0 vhostnet.UDP_ECHO_TEST=0 vhostnet.NET_LOOPBACK_TEST=0"
GUEST_MAC, GW_MAC = "52:54:00:12:34:56", "52:55:0a:00:02:02"


@pytest.fixture
def rundir():
    d = Path(tempfile.mkdtemp(prefix="vnq-", dir="/tmp"))   # unique: pgrep -f finds only our processes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run(rundir: Path, *extra: str, append: str = QUICK) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vhostnet", "run", "--socket", str(rundir / "v.sock"),
            "--append", append, *extra]
    return subprocess.Popen(argv, stdout=open(rundir / "console.log", "w"),
                            stderr=open(rundir / "stderr.log", "w"), start_new_session=True)


def finish(p: subprocess.Popen, rundir: Path, timeout=60) -> tuple[str, str]:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail("vhostnet run did not finish:\n" + (rundir / "console.log").read_text()[-3000:])
    return (rundir / "console.log").read_text(), (rundir / "stderr.log").read_text()


def leftovers(rundir: Path) -> list[str]:
    """Processes whose command line names our unique directory, and sockets in it."""
    r = subprocess.run(["pgrep", "-af", str(rundir)], capture_output=True, text=True)
    procs = [line for line in r.stdout.splitlines() if "pgrep" not in line]
    socks = [p.name for p in rundir.glob("*.sock*")]
    return procs + socks


def wait_connected(ctl: str, timeout=30.0) -> ControlClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = ControlClient(ctl)
            if c.request("ping")["connected"]:
                return c
            c.close()
        except ControlError:
            pass
        assert time.monotonic() < deadline, "QEMU did not connect"
        time.sleep(0.05)


def tshark(path: Path, *fields: str) -> list[list[str]]:
    argv = ["tshark", "-n", "-r", str(path), "-T", "fields"]
    for f in fields:
        argv += ["-e", f]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


def test_inspect_shows_the_rings_advance_while_the_guest_pings(rundir):
    p = run(rundir)
    try:
        c = wait_connected(str(rundir / "v.sock.ctl"))
        samples = []
        texts: list[str] = []
        cli = None

        def text_inspect():
            r = subprocess.run([sys.executable, "-m", "vhostnet", "inspect", "--socket",
                                str(rundir / "v.sock")], capture_output=True, text=True, timeout=20)
            texts.append(r.stdout)
        checked = None
        while p.poll() is None:
            try:
                doc = c.request("inspect")
            except ControlError:
                break   # the backend went away with the guest
            if doc["connected"] and doc["queues"][1]["avail_idx"] is not None:
                samples.append(doc)
                if cli is None:
                    # The CLI in a thread, so that sampling goes on meanwhile, and
                    # as soon as the rings run: a Python start-up can outlast the
                    # guest's few pings (CI once saw it start after poweroff).
                    cli = threading.Thread(target=text_inspect)
                    cli.start()
                try:
                    # Linux's driver: the conformance checker finds nothing, up to poweroff.
                    report = c.request("check")
                    if report["connected"]:
                        checked = report
                except ControlError:
                    break
            time.sleep(0.02)
        c.close()
        if cli is not None:
            cli.join(30)
        text = texts[0] if texts else None
    finally:
        console, err = finish(p, rundir)
    assert p.returncode == 0, err + console[-2000:]
    assert "net: ping ok" in console and "icmp: ok" in console
    assert len(samples) > 10
    tx = [(d["queues"][1]["avail_idx"], d["queues"][1]["used_idx"]) for d in samples]
    rx = [d["queues"][0]["used_idx"] for d in samples]
    used = [u for _a, u in tx]
    assert used == sorted(used), "tx used->idx went backwards"
    assert len(set(used)) >= 3 and len(set(rx)) >= 3, (tx, rx)
    # At least the ARP request and three pings were seen going out, and answers
    # coming back, while we watched. (How far the last sample got depends on
    # when the guest powered off relative to our polling: not asserted.)
    assert used[-1] >= 4 and rx[-1] >= 3, (tx, rx)
    assert all(a - u in (0, 1, 2) for a, u in tx)   # the device keeps up with the guest
    last = samples[-1]
    assert "VERSION_1" in last["features"]["negotiated"]["names"]
    assert last["memory"][0]["size"] == 256 << 20
    assert last["queues"][0]["rx_buffers_posted"] > 0
    assert text and "queue 1 (tx): size 256, started, enabled" in text and "RING_EVENT_IDX" in text
    assert checked is not None and checked["findings"] == [] and checked["must"] == 0, checked
    assert leftovers(rundir) == []


def test_capture_holds_the_guests_arp_and_icmp(rundir):
    p = run(rundir, "--pcap", str(rundir / "run.pcap"))
    try:
        ctl = str(rundir / "v.sock.ctl")
        deadline = time.monotonic() + 15
        while not os.path.exists(ctl):
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        # Started before the guest has even loaded its driver; it ends when the backend goes.
        cap = subprocess.run([sys.executable, "-m", "vhostnet", "capture", "--control", ctl,
                              "-w", str(rundir / "capture.pcap")], capture_output=True, text=True, timeout=60)
    finally:
        console, err = finish(p, rundir)
    assert p.returncode == 0, err
    assert cap.returncode == 0, cap.stderr
    assert "the backend stopped" in cap.stderr
    for name in ("capture.pcap", "run.pcap"):
        rows = tshark(rundir / name, "frame.protocols", "eth.src", "arp.opcode", "icmp.type")
        protos = [r[0] for r in rows]
        assert ["eth:ethertype:arp", GUEST_MAC, "1", ""] in rows, name        # who-has 10.0.2.2
        assert ["eth:ethertype:arp", GW_MAC, "2", ""] in rows, name           # 10.0.2.2 is-at
        assert ["eth:ethertype:ip:icmp:data", GUEST_MAC, "", "8"] in rows, name
        assert ["eth:ethertype:ip:icmp:data", GW_MAC, "", "0"] in rows, name
        assert protos.count("eth:ethertype:ip:icmp:data") >= 12, name
    # Checksums as the wire would carry them, partial ones completed.
    r = subprocess.run(["tshark", "-n", "-r", str(rundir / "capture.pcap"), "-o", "ip.check_checksum:TRUE",
                        "-o", "udp.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE",
                        "-Y", "ip.checksum.status == 0 || udp.checksum.status == 0 || "
                              "tcp.checksum.status == 0 || icmp.checksum.status == 0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout[:2000]
    assert leftovers(rundir) == []


def test_run_teardown_on_poweroff_leaves_nothing(rundir):
    p = run(rundir, append="vhostnet.NET=0")
    console, err = finish(p, rundir)
    assert p.returncode == 0, err
    assert "init: done" in console and "reboot: Power down" in console
    assert leftovers(rundir) == []


def test_run_teardown_on_ctrl_c_leaves_nothing(rundir):
    p = run(rundir)
    c = wait_connected(str(rundir / "v.sock.ctl"))
    c.close()
    assert any("qemu-system" in line for line in leftovers(rundir))   # QEMU runs
    os.kill(p.pid, signal.SIGINT)
    console, err = finish(p, rundir, timeout=30)
    assert p.returncode == 130, err
    assert "SIGINT: stopping QEMU" in err
    assert leftovers(rundir) == []


def test_run_teardown_on_qemu_crash_leaves_nothing(rundir):
    p = run(rundir)
    c = wait_connected(str(rundir / "v.sock.ctl"))
    c.close()
    qemu_pids = [int(line.split()[0]) for line in leftovers(rundir) if "qemu-system" in line]
    assert len(qemu_pids) == 1
    os.kill(qemu_pids[0], signal.SIGKILL)     # QEMU dies mid-run
    console, err = finish(p, rundir, timeout=30)
    assert p.returncode == 128 + signal.SIGKILL, err
    assert "QEMU exited with status 137" in err
    assert leftovers(rundir) == []
