"""Ending a child process the same way everywhere: let it go, then TERM, then KILL.

A backend started with `--once` ends by itself when its front-end hangs up, so
callers first give it LINGER seconds to do so; a process still running after
that gets SIGTERM (or the signal given), and SIGKILL if it is still there
GRACE seconds later. The process is always reaped, so no zombie outlives a
benchmark or a test.
"""
from __future__ import annotations

import signal
import subprocess

__all__ = ["end"]

TERM_GRACE = 3.0     # seconds between the polite signal and SIGKILL


def end(p: subprocess.Popen, linger: float = 0.0, grace: float = TERM_GRACE,
        sig: int = signal.SIGTERM) -> int:
    """End P (see the module doc) and return its exit status."""
    if p.poll() is not None:
        return p.returncode
    if linger > 0:
        try:
            return p.wait(linger)
        except subprocess.TimeoutExpired:
            pass
    p.send_signal(sig)
    try:
        return p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait()
