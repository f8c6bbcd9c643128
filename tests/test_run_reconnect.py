"""`vhostnet run --reconnect` and `qemu-args --reconnect`, with a stand-in QEMU:
the backend is a child process started again whenever it exits, QEMU gets
reconnect=1, and nothing is left behind. (With a real QEMU guest and the
timings: tests/test_qemu_backend.py.)"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vhostnet.observe.control import ControlClient, ControlError

from .observe import sockdir  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

FAKE = textwrap.dedent('''\
    #!{python}
    """Plays QEMU with reconnect=1: notes its argv, then waits to be stopped."""
    import os, sys, time
    argv = sys.argv[1:]
    chardev = next(a for a in argv if a.startswith("socket,id=chr0,"))
    opts = dict(kv.split("=", 1) for kv in chardev.split(",")[1:])
    # Written aside, then renamed: the file exists only once it is whole.
    info = os.environ["FAKE_QEMU_INFO"]
    with open(info + ".tmp", "w") as f:
        f.write(f"{{os.getpid()}}\\n{{opts['path']}}\\n{{opts.get('reconnect', '')}}\\n")
    os.replace(info + ".tmp", info)
    print("ready", flush=True)
    time.sleep(120)
    ''')


@pytest.fixture
def fake_qemu(sockdir):
    p = sockdir / "fake-qemu"
    p.write_text(FAKE.format(python=sys.executable))
    p.chmod(0o755)
    return p


def start(fake, info, *extra):
    argv = [sys.executable, "-m", "vhostnet", "run", "--reconnect", "--qemu", str(fake), "--accel", "tcg",
            "--log-level", "warning", *extra, "--", "-kernel", "bzImage"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "FAKE_QEMU_INFO": str(info)})


def backend_pid(ctl: str, proc, not_pid: int | None = None, timeout=60.0) -> int:
    """The pid answering on the control socket (other than NOT_PID)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            with ControlClient(ctl) as c:
                pid = c.request("ping")["pid"]
            if pid != not_pid:
                return pid
        except ControlError:
            pass
        assert time.monotonic() < deadline, "no backend answered"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def test_qemu_args_reconnect():
    r = subprocess.run([sys.executable, "-m", "vhostnet", "qemu-args", "--reconnect", "--socket", "/tmp/x.sock"],
                       env=ENV, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "socket,id=chr0,path=/tmp/x.sock,reconnect=1" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vhostnet", "qemu-args", "--socket", "/tmp/x.sock"],
                       env=ENV, capture_output=True, text=True, timeout=30)
    assert "reconnect" not in r.stdout


def test_backend_killed_is_started_again_and_everything_stops_cleanly(fake_qemu, sockdir):
    info = sockdir / "info"
    sock = sockdir / "v.sock"
    p = start(fake_qemu, info, "--socket", str(sock))
    try:
        first = backend_pid(str(sock) + ".ctl", p)
        deadline = time.monotonic() + 60
        while not info.exists():
            assert p.poll() is None and time.monotonic() < deadline, "the stand-in QEMU never started"
            time.sleep(0.02)
        qpid, path, reconnect = info.read_text().splitlines()
        assert (path, reconnect) == (str(sock), "1")
        os.kill(first, signal.SIGKILL)                 # as a crash would
        second = backend_pid(str(sock) + ".ctl", p, not_pid=first)
        assert second != first and gone(first)
        os.kill(second, signal.SIGTERM)                # as a user restarting it would
        third = backend_pid(str(sock) + ".ctl", p, not_pid=second)
        assert not gone(int(qpid))                     # QEMU kept running throughout
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert err.count("starting it again, QEMU will reconnect") == 2, err
    assert f"backend pid {first}" in err
    assert gone(third) and gone(int(qpid))
    assert not sock.exists() and not Path(str(sock) + ".ctl").exists()
    assert "Traceback" not in err


def test_a_backend_that_cannot_start_is_an_error(fake_qemu, sockdir):
    info = sockdir / "info"
    p = start(fake_qemu, info, "--disable-feature", "no-such-feature")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    assert "unknown feature 'no-such-feature'" in err and "the backend exited at once" in err
    assert not info.exists()                         # QEMU was never started
