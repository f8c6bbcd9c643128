"""The host network's command line: --forward and friends on serve/run, and
`vhostnet forward`, with their user mistakes (a message and exit 2, or 1
when there is nothing to talk to), against a real `vhostnet serve`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhostnet.launch.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent.parent


def vhostnet(*argv, timeout=30):
    return subprocess.run([sys.executable, "-m", "vhostnet", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_serve_and_run_take_the_hostnet_options():
    p = build_parser()
    for cmd in ("serve", "run"):
        a = p.parse_args([cmd, "--forward", "tcp:127.0.0.1:2222-:22", "--forward",
                          "udp::53-:53", "--restrict", "--no-services", "--no-map-host-loopback"])
        assert a.forward == ["tcp:127.0.0.1:2222-:22", "udp::53-:53"]
        assert a.restrict and a.no_services and a.no_map_host_loopback


def test_help_documents_the_rule_for_gateway_ports(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--forward" in out and "7, 9" in out and "--no-services" in out


def test_bad_forward_is_exit_2(tmp_path):
    r = vhostnet("serve", "--socket", str(tmp_path / "v.sock"), "--forward", "tcp:22")
    assert r.returncode == 2 and "hostfwd" in r.stderr and "Traceback" not in r.stderr


def test_forward_port_in_use_is_exit_1(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        r = vhostnet("serve", "--socket", str(tmp_path / "v.sock"), "--forward",
                     f"tcp:127.0.0.1:{port}-:22")
    finally:
        s.close()
    assert r.returncode == 1 and "in use" in r.stderr and str(port) in r.stderr
    assert not (tmp_path / "v.sock").exists()


def test_forward_command_mistakes():
    assert vhostnet("forward", "add", "--control", "/nonexistent.ctl").returncode == 2
    assert vhostnet("forward", "add", "bogus", "--control", "/nonexistent.ctl").returncode == 2
    r = vhostnet("forward", "list", "--control", "/nonexistent.ctl")
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_forward_add_list_remove_on_a_running_backend(tmp_path):
    sock = tmp_path / "v.sock"
    ctl = str(sock) + ".ctl"
    proc = subprocess.Popen([sys.executable, "-m", "vhostnet", "serve", "--socket", str(sock)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(ctl):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        r = vhostnet("forward", "add", "tcp:127.0.0.1:0-:22", "--control", ctl, "--json")
        assert r.returncode == 0, r.stderr
        host = json.loads(r.stdout)["host"]
        port = int(host.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass                               # it listens (no guest: closed at once)
        r = vhostnet("forward", "add", f"tcp:127.0.0.1:{port}-:23", "--control", ctl)
        assert r.returncode == 1 and "exists" in r.stderr
        r = vhostnet("forward", "list", "--control", ctl)
        assert host in r.stdout and "10.0.2.15:22" in r.stdout
        assert "refused" in r.stdout.lower()
        r = vhostnet("forward", "list", "--control", ctl, "--json")
        (f,) = json.loads(r.stdout)
        assert f["refused"] == 1 and f["accepted"] == 0
        r = vhostnet("forward", "remove", f"tcp:127.0.0.1:{port}-:22", "--control", ctl)
        assert r.returncode == 0 and "removed" in r.stdout
        assert json.loads(vhostnet("forward", "list", "--control", ctl, "--json").stdout) == []
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
