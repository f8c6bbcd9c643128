"""vhostnet.testing.processes: start, wait_path and end on real child processes."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from vhostnet.testing.processes import end, start, wait_path


def child(code: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"     # its handlers are in place
    return p


def test_a_process_that_ends_by_itself_in_the_linger_gets_no_signal():
    p = child("import sys; print('ready', flush=True); sys.stdin.close(); sys.exit(7)")
    assert end(p, linger=10) == 7


def test_a_process_that_keeps_running_gets_the_signal_given():
    p = child("import signal, sys, time\n"
              "signal.signal(signal.SIGINT, lambda *a: sys.exit(3))\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)")
    assert end(p, sig=signal.SIGINT) == 3


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace():
    p = child("import signal, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)")
    assert end(p, grace=0.2) == -signal.SIGKILL


def test_wait_path_returns_once_the_child_made_it_and_its_output_is_logged(tmp_path):
    made = tmp_path / "made.sock"
    p = start([sys.executable, "-c", f"import time; print('up'); open({str(made)!r}, 'w'); time.sleep(30)"],
              tmp_path / "child.log")
    try:
        wait_path(made, p, "the child")
        assert made.exists() and p.poll() is None
    finally:
        end(p)
    assert (tmp_path / "child.log").read_text() == "up\n"


def test_wait_path_names_a_child_that_exits_first(tmp_path):
    p = start([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "child.log")
    with pytest.raises(RuntimeError, match="the child exited with status 3"):
        wait_path(tmp_path / "never", p, "the child")


def test_wait_path_gives_up_after_its_timeout(tmp_path):
    p = start([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "child.log")
    try:
        with pytest.raises(RuntimeError, match="did not create"):
            wait_path(tmp_path / "never", p, "the child", timeout=0.2)
    finally:
        end(p)
