"""Child processes (backends, servers) started, waited for and ended the same way everywhere.

`start` runs ARGV with its output in a log file. `wait_path` (and the trio
`wait_path_async`) waits for a file the child creates at start-up (a
socket), failing at once if the child exits first and after a deadline if
it never comes; the file gives no event to wait on, so it is polled.
`end` ends a child: let it go, then TERM, then KILL.

A backend started with `--once` ends by itself when its front-end hangs up, so
callers first give it LINGER seconds to do so; a process still running after
that gets SIGTERM (or the signal given), and SIGKILL if it is still there
GRACE seconds later. The process is always reaped, so no zombie outlives a
benchmark or a test.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

__all__ = ["end", "start", "wait_path", "wait_path_async"]

TERM_GRACE = 3.0     # seconds between the polite signal and SIGKILL
START_TIMEOUT = 15.0  # seconds a child gets to create its socket (a loaded machine is slow)
PATH_POLL = 0.02     # seconds between looks for that file


def start(argv: list[str], log_path, **popen_kw) -> subprocess.Popen:
    """ARGV running, stdin closed, stdout and stderr into LOG_PATH."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                **popen_kw)


def _path_problem(path, proc: subprocess.Popen, what: str, deadline: float, timeout: float) -> str | None:
    if os.path.exists(path):
        return ""
    if proc.poll() is not None:
        return f"{what} exited with status {proc.returncode} before creating {path}"
    if time.monotonic() > deadline:
        return f"{what} did not create {path} within {timeout:.0f} s"
    return None


def wait_path(path, proc: subprocess.Popen, what: str, timeout: float = START_TIMEOUT) -> None:
    """Until PATH exists; RuntimeError if PROC exits first or TIMEOUT passes."""
    deadline = time.monotonic() + timeout
    while (problem := _path_problem(path, proc, what, deadline, timeout)) is None:
        time.sleep(PATH_POLL)
    if problem:
        raise RuntimeError(problem)


async def wait_path_async(path, proc: subprocess.Popen, what: str, timeout: float = START_TIMEOUT) -> None:
    """wait_path for a trio program."""
    import trio
    deadline = time.monotonic() + timeout
    while (problem := _path_problem(path, proc, what, deadline, timeout)) is None:
        await trio.sleep(PATH_POLL)
    if problem:
        raise RuntimeError(problem)


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
