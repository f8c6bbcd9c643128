"""vhostnet.testing.processes.end: real child processes, each way one can end."""
from __future__ import annotations

import signal
import subprocess
import sys

from vhostnet.testing.processes import end


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
