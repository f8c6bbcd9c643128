"""A real guest's TCP through a bad link (marker `qemu`): `vhostnet run --fault` boots
the test image, whose tcp_echo sends 16 MiB to the gateway's echo service
(10.0.2.2:7) and checks every byte that comes back, through 5% loss, 2%
reordering and 20 ms delay each way. From outside we read the fault layer's
counters over the control socket while it runs.

Under TCG this takes about two minutes: TCP over 5% loss and a 40 ms round
trip moves ~150 KB/s each way (the Mathis bound, MSS/RTT * 1.22/sqrt(p), is
~175 KB/s), whatever the backend does. Everything else the guest would test
is switched off.
"""
import subprocess
import sys
import time

import pytest

from vhostnet.observe.control import ControlError

from .test_qemu_observe import finish, pytestmark, rundir, wait_connected  # noqa: F401 (marks, fixture)

SPEC = "loss=5%,reorder=2%,delay=20ms,seed=1,dir=both"
ECHO_BYTES = 16 << 20
ONLY_ECHO = (f"vhostnet.ICMP_TEST=0 vhostnet.UDP_ECHO_TEST=0 vhostnet.NET_LOOPBACK_TEST=0 "
             f"vhostnet.TCP_ECHO_BYTES={ECHO_BYTES}")


def test_tcp_echo_of_16_mib_through_loss_reordering_and_delay(rundir):
    argv = [sys.executable, "-m", "vhostnet", "run", "--socket", str(rundir / "v.sock"),
            "--fault", SPEC, "--append", ONLY_ECHO]
    p = subprocess.Popen(argv, stdout=open(rundir / "console.log", "w"),
                         stderr=open(rundir / "stderr.log", "w"), start_new_session=True)
    last = stats = None
    try:
        c = wait_connected(str(rundir / "v.sock.ctl"))
        while p.poll() is None:
            try:
                doc = c.request("fault")
                s = c.request("stats")
            except ControlError:
                break    # the backend went away with the guest
            if doc["counters"] is not None:
                last, stats = doc, s
            time.sleep(0.5)
        c.close()
    finally:
        console, err = finish(p, rundir, timeout=600)
    assert p.returncode == 0, err[-2000:] + console[-3000:]
    assert f"tcp-echo: {ECHO_BYTES} bytes" in console and "tcp-echo: ok" in console, console[-3000:]
    # 16 MiB of Linux TCP with TSO and checksum offload: the conformance checker finds nothing
    # (the backend logs one "finding ..." line per rule broken when QEMU disconnects).
    assert [line for line in err.splitlines() if ": finding MUST " in line or ": finding SHOULD " in line] == []
    print(next(line for line in console.splitlines() if line.startswith(f"tcp-echo: {ECHO_BYTES}")))
    print({d: {k: v for k, v in last["counters"][d].items() if v} for d in ("tx", "rx")})
    assert last["spec"] == "loss=5%,reorder=2%,delay=20ms,seed=1"
    assert stats["faults"]["spec"] == last["spec"]
    for d in ("tx", "rx"):
        c = last["counters"][d]
        frames = c["frames"]
        assert frames > 3000, (d, c)
        assert 0.03 * frames <= c["lost"] <= 0.07 * frames, (d, c)
        held = c["reordered"] + c["reorder_timeouts"]     # held back; most were passed
        assert 0.01 * frames <= held <= 0.035 * frames, (d, c)
        assert c["reordered"] >= 0.5 * held, (d, c)
        assert c["delayed"] >= 0.95 * c["delivered"] - c["queued"], (d, c)
        assert c["overflow"] == c["corrupted"] == c["duplicated"] == 0, (d, c)
