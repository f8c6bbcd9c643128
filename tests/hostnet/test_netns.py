"""The NAT's non-gateway path, in network namespaces the test creates.

tests/hostnet/netns_child.py runs the backend (server, device, host proxy,
an in-process frontend and guest) in a fresh namespace A (`unshare -n`,
root), with a veth pair to a second fresh namespace B that plays the far
host at 192.0.2.2. (The brief asked for a dummy interface; this kernel has
no dummy module, and a veth to a real peer is the stronger test: the bytes
cross an interface and a second stack.) Nothing leaves the namespaces.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    r = subprocess.run(["unshare", "-n", "ip", "link", "add", "t0", "type", "veth", "peer",
                        "name", "t1"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot make a network namespace with a veth pair here: {r.stderr.strip()}"
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for unshare -n and veth")
def test_nat_to_a_far_host_in_a_namespace():
    why = _can_unshare()
    if why:
        pytest.skip(why)
    r = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.hostnet.netns_child",
                        "backend"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tcp_state"] == "ESTABLISHED" and res["tcp_echo_ok"] is True
    assert res["tcp_host_side"].startswith("192.0.2.1:")            # from namespace A's veth
    assert res["tcp_host_side"].endswith("->192.0.2.2:7000")
    assert res["refused_error"] == "connection refused"
    assert res["no_route_icmp"] == [3, 0]                              # net unreachable
    assert res["udp"] == ["192.0.2.2", 7001, "FAR AWAY"]
    assert res["ping_denied"] >= 1
    assert res["ping_reply"] == ["192.0.2.2", 78, 5, "ping"]
