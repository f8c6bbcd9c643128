"""QEMU's backend program conventions (docs/interop/vhost-user.rst, "Backend
program conventions"; docs/interop/vhost-user.json): --socket-path (and our
--socket), --fd, --print-capabilities, SIGTERM, and the discovery file.
Real processes and real sockets; the frontend is vhostnet.testing's. (The
same --fd with a real QEMU guest: tests/test_qemu_backend.py.)"""
import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trio

from vhostnet.launch import conventions
from vhostnet.observe.control import ControlClient, ControlError
from vhostnet.testing.frontend import Frontend

from .device.test_datapath import ping
from .observe import sockdir  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# docs/interop/vhost-user.json, VHostUserBackendType
BACKEND_TYPES = {"9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net",
                 "rng", "rpmsg", "rproc-serial", "scsi", "vsock", "fs"}
# The console script as pyproject.toml declares it, run from this checkout.
BACKEND = [sys.executable, "-c", "import sys; from vhostnet.launch.cli import backend_main; "
                                 "sys.exit(backend_main())"]


def backend(*argv, **kw) -> subprocess.Popen:
    return subprocess.Popen([*BACKEND, "--log-level", "warning", *argv], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_ping(ctl: str, proc: subprocess.Popen, timeout=15.0) -> dict:
    import time
    deadline = time.monotonic() + timeout
    while True:
        try:
            with ControlClient(ctl) as c:
                return c.request("ping")
        except ControlError:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the backend never answered"
            time.sleep(0.02)


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    return proc.returncode, err


# -- --print-capabilities --------------------------------------------------------

@pytest.mark.parametrize("argv", [["--print-capabilities"],
                                  ["--socket-path", "/nonexistent/dir/x.sock", "--print-capabilities"],
                                  ["--print-capabilities", "--no-such-option", "extra", "words"]])
def test_print_capabilities_prints_json_and_ignores_the_rest(argv):
    r = subprocess.run([*BACKEND, *argv], env=ENV, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc == {"type": "net"} and doc["type"] in BACKEND_TYPES
    r2 = subprocess.run([sys.executable, "-m", "vhostnet", "serve", *argv], env=ENV,
                        capture_output=True, text=True, timeout=30)
    assert (r2.returncode, json.loads(r2.stdout)) == (0, doc)


def test_pyproject_installs_the_backend_binary():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"][conventions.BINARY_NAME] == "vhostnet.launch.cli:backend_main"


# -- --socket-path, --socket ---------------------------------------------------------

@pytest.mark.parametrize("opt", ["--socket-path={}", "--socket-path", "--socket"])
def test_socket_path_and_its_alias(sockdir, opt):
    path = sockdir / "v.sock"
    argv = [opt.format(path)] if "{}" in opt else [opt, str(path)]
    p = backend(*argv)
    try:
        assert wait_ping(str(path) + ".ctl", p)["socket"] == str(path)
        assert path.is_socket()
    finally:
        rc, err = stop(p)
    assert rc == 0, err
    assert not path.exists()            # ours: unlinked at exit


def test_socket_path_and_fd_are_incompatible(sockdir):
    r = subprocess.run([*BACKEND, "--socket-path", str(sockdir / "v.sock"), "--fd", "3"], env=ENV,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


# -- --fd -------------------------------------------------------------------------------

def _listening(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


async def test_fd_serves_a_frontend_and_leaves_the_path_alone(sockdir):
    path = sockdir / "given.sock"
    lsock = _listening(path)
    p = backend("--fd", str(lsock.fileno()), pass_fds=[lsock.fileno()])
    lsock.close()        # the backend holds its own copy now
    try:
        info = await trio.to_thread.run_sync(wait_ping, str(path) + ".ctl", p)
        assert info["socket"] == str(path) and info["connected"] is False
        fe = Frontend()
        await fe.connect(str(path))
        await fe.handshake()
        fe.post_rx()
        fe.rx.kick()
        got = await fe.exchange([ping(seq=1), ping(seq=2)], want=2)
        assert len(got) == 2
        await fe.close()
        fe.release()
        # The next frontend is served on the same socket.
        fe = Frontend()
        await fe.connect(str(path))
        await fe.handshake()
        fe.post_rx()
        fe.rx.kick()
        assert len(await fe.exchange([ping(seq=3)], want=1)) == 1
        await fe.close()
        fe.release()
    finally:
        rc, err = await trio.to_thread.run_sync(stop, p)
    assert rc == 0, err
    assert path.is_socket()                          # not ours: left in place
    assert not Path(str(path) + ".ctl").exists()     # ours: removed


def test_fd_without_a_path_serves_without_a_control_socket(sockdir):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"\0vhostnet-test-{os.getpid()}")    # abstract: no file to put a .ctl beside
    s.listen(1)
    p = backend("--fd", str(s.fileno()), pass_fds=[s.fileno()])
    name = s.getsockname()
    s.close()
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(name)           # it listens: a GET_FEATURES gets an answer
        c.sendall((1).to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
        reply = c.recv(20)
        assert len(reply) == 20 and int.from_bytes(reply[:4], "little") == 1
        c.close()
    finally:
        rc, err = stop(p)
    assert rc == 0
    assert "no path to put a control socket beside" in err


def _refusal(fd: int, keep) -> tuple[int, str]:
    r = subprocess.run([*BACKEND, "--fd", str(fd)], env=ENV, capture_output=True, text=True,
                       timeout=30, pass_fds=[fd] if keep else [])
    return r.returncode, r.stderr


@pytest.mark.parametrize("kind,message", [
    ("pipe", "is a pipe, not a listening Unix socket"),
    ("file", "is a regular file, not a listening Unix socket"),
    ("tcp", "is an AF_INET socket; vhost-user needs an AF_UNIX one"),
    ("dgram", "is a SOCK_DGRAM Unix socket; vhost-user needs SOCK_STREAM"),
    ("unlistened", "is a Unix stream socket that is not listening"),
    ("closed", "no such open file descriptor"),
])
def test_fd_that_cannot_be_served_is_a_clear_error(sockdir, kind, message):
    keep = []
    if kind == "pipe":
        r, w = os.pipe()
        keep, fd = [r, w], r
    elif kind == "file":
        fd = os.open(sockdir / "f", os.O_CREAT | os.O_RDWR)
        keep = [fd]
    elif kind == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        keep, fd = [s], s.fileno()
    elif kind == "dgram":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(sockdir / "d.sock"))
        keep, fd = [s], s.fileno()
    elif kind == "unlistened":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(sockdir / "u.sock"))
        keep, fd = [s], s.fileno()
    else:
        fd = 200           # never opened: pass_fds would fail, so it is not passed
    try:
        rc, err = _refusal(fd, kind != "closed")
    finally:
        for k in keep:
            k.close() if hasattr(k, "close") else os.close(k)
    assert rc == 2, err
    assert f"--fd {fd}" in err and message in err, err
    assert "Traceback" not in err


# -- the discovery file ------------------------------------------------------------------

def _check_backend_doc(doc: dict) -> None:
    """docs/interop/vhost-user.json, VhostUserBackend."""
    assert set(doc) <= {"description", "type", "binary", "tags"}
    assert isinstance(doc["description"], str) and doc["description"]
    assert doc["type"] in BACKEND_TYPES
    assert isinstance(doc["binary"], str) and os.path.isabs(doc["binary"])
    assert all(isinstance(t, str) for t in doc.get("tags", []))


def _wrapper(d: Path) -> Path:
    """Stands in for the installed console script (this checkout is not pip-installed here)."""
    w = d / "bin" / conventions.BINARY_NAME
    w.parent.mkdir()
    w.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {' '.join(BACKEND[:2])} '{BACKEND[2]}' \"$@\"\n")
    w.chmod(0o755)
    return w


def test_install_discovery_writes_a_net_file_a_manager_can_use(sockdir):
    binary = _wrapper(sockdir)
    prefix = sockdir / "usr"
    r = subprocess.run([sys.executable, "-m", "vhostnet", "install-discovery", "--prefix", str(prefix),
                        "--binary", str(binary)], env=ENV, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    path = prefix / "share" / "qemu" / "vhost-user" / "50-vhostnet.json"
    doc = json.loads(path.read_text())
    _check_backend_doc(doc)
    assert doc["type"] == "net" and doc["binary"] == str(binary)
    # What a manager does next: ask the binary, then start it on a socket.
    caps = json.loads(subprocess.run([doc["binary"], "--print-capabilities"], capture_output=True,
                                     text=True, timeout=30, check=True).stdout)
    assert caps["type"] == doc["type"]
    sock = sockdir / "m.sock"
    p = subprocess.Popen([doc["binary"], f"--socket-path={sock}"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert wait_ping(str(sock) + ".ctl", p)["socket"] == str(sock)
    finally:
        rc, err = stop(p)
    assert rc == 0, err
    r = subprocess.run([sys.executable, "-m", "vhostnet", "install-discovery", "--prefix", str(prefix),
                        "--remove"], env=ENV, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not path.exists()


def test_install_discovery_user_dir_and_print(sockdir):
    binary = _wrapper(sockdir)
    env = {**ENV, "XDG_CONFIG_HOME": str(sockdir / "cfg")}
    r = subprocess.run([sys.executable, "-m", "vhostnet", "install-discovery", "--user", "--binary",
                        str(binary)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads((sockdir / "cfg/qemu/vhost-user/50-vhostnet.json").read_text())["type"] == "net"
    r = subprocess.run([sys.executable, "-m", "vhostnet", "install-discovery", "--print", "--binary",
                        str(binary)], env=env, capture_output=True, text=True, timeout=30)
    _check_backend_doc(json.loads(r.stdout))


@pytest.mark.parametrize("binary,message,status", [
    ("relative/vhostnet-backend", "needs an absolute binary path", 2),
    ("/nonexistent/vhostnet-backend", "is not an executable file", 2),
])
def test_install_discovery_refuses_a_bad_binary(sockdir, binary, message, status):
    r = subprocess.run([sys.executable, "-m", "vhostnet", "install-discovery", "--prefix",
                        str(sockdir), "--binary", binary], env=ENV, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == status and message in r.stderr
    assert not (sockdir / "share").exists()


def test_install_discovery_finds_the_installed_binary(sockdir):
    """Without --binary: vhostnet-backend beside the Python, else on PATH."""
    binary = _wrapper(sockdir)
    env = {**ENV, "PATH": f"{binary.parent}:/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "vhostnet", "install-discovery", "--print"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)["binary"]
    assert os.path.basename(found) == conventions.BINARY_NAME and os.path.isabs(found)
