"""Real application servers on the host, for a guest to reach through NAT.

The application tests of the test guest (qemu/init: IPERF_TEST, REDIS_TEST,
GIT_TEST) talk to real servers: `iperf3 -s`, `redis-server` and `git daemon
--enable=receive-pack` over a bare repository made here.  Each is bound to
127.0.0.1 on a free port; the guest reaches them as 10.0.2.2:PORT, which
slirp (and vhostnet's NAT) map to the host's 127.0.0.1:PORT.

`HostServers` is a context manager: entering starts the servers asked for
and waits until each really answers (iperf3 says it listens, redis answers
PING, `git ls-remote` lists the repository), leaving stops them (SIGTERM,
then SIGKILL) and nothing outlives it.  `guest_vars()` gives the ports for
the guest's command line; `verify()` checks, from the host side, what the
guest did (the value it left in redis, the commit it pushed), so a guest
that only prints its markers cannot pass.

Each server's output goes to a log file in the work directory.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 15.0        # seconds for a server to start answering
STOP_GRACE = 5.0            # seconds between SIGTERM and SIGKILL
POLL = 0.05                 # seconds between readiness checks

# What the guest's tests leave behind (qemu/init), checked by verify().
REDIS_GREETING_KEY = "vhostnet:smoke:greeting"
REDIS_GREETING = b"hello from the guest"
GIT_REPO = "repo.git"
GIT_BRANCH = "main"
GIT_GUEST_SUBJECT = "guest commit"

# The Debian package of each server, for the error when one is missing.
PACKAGES = {"iperf3": "iperf3", "redis-server": "redis-server", "git": "git"}


class ServerError(RuntimeError):
    """A server could not be started (missing, or it never answered)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise ServerError(f"{binary} is not installed (Debian package {PACKAGES[binary]}; "
                          f"scripts/setup.sh installs it)")
    return path


def wait_until(what: str, ready, proc: subprocess.Popen, log: Path,
               timeout: float = READY_TIMEOUT) -> None:
    """Poll READY() until true; fail if PROC exits or TIMEOUT passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with status {proc.returncode} before answering; "
                              f"its log: {log}\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise ServerError(f"{what} did not answer within {timeout:.0f} s; its log: {log}\n"
                              f"{_tail(log)}")
        time.sleep(POLL)


def _tail(log: Path, n: int = 10) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def redis_command(port: int, *args: bytes, timeout: float = 5.0) -> bytes:
    """Send one RESP command to 127.0.0.1:PORT and return its raw reply: a
    simple line (+OK, -ERR, :1) or one bulk string ($N, data)."""
    out = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(out)
        reply = b""
        while not _resp_complete(reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def _resp_complete(reply: bytes) -> bool:
    head, sep, rest = reply.partition(b"\r\n")
    if not sep:
        return False
    if not head.startswith(b"$") or head == b"$-1":
        return True
    return len(rest) >= int(head[1:]) + 2


@dataclass
class HostServers:
    """Start the servers asked for on 127.0.0.1; stop them on exit."""
    workdir: Path
    iperf: bool = False
    redis: bool = False
    git: bool = False
    ports: dict[str, int] = field(default_factory=dict, init=False)
    procs: list[subprocess.Popen] = field(default_factory=list, init=False)
    git_dir: Path | None = field(default=None, init=False)   # what git daemon serves

    def __enter__(self) -> "HostServers":
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if self.iperf:
                self._start_iperf()
            if self.redis:
                self._start_redis()
            if self.git:
                self._start_git()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def guest_vars(self) -> dict[str, int]:
        """IPERF_PORT=..., REDIS_PORT=..., GIT_PORT=... for qemu/init."""
        return {f"{name.upper()}_PORT": port for name, port in self.ports.items()}

    # --- the servers

    def _spawn(self, name: str, argv: list[str], cwd: Path | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=cwd or self.workdir, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def _start_iperf(self) -> None:
        port = free_port()
        # --forceflush: the "Server listening" line reaches the log at once.
        proc, log = self._spawn("iperf3", [need("iperf3"), "-s", "-B", LOOPBACK, "-p", str(port),
                                           "--forceflush"])
        wait_until("iperf3 -s", lambda: b"Server listening" in log.read_bytes(), proc, log)
        self.ports["iperf"] = port

    def _start_redis(self) -> None:
        port = free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        # No persistence, no protected mode surprises: loopback only, in a
        # directory of our own.
        proc, log = self._spawn("redis-server", [
            need("redis-server"), "--bind", LOOPBACK, "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(data), "--daemonize", "no"])

        def answers() -> bool:
            try:
                return redis_command(port, b"PING", timeout=1) == b"+PONG\r\n"
            except OSError:
                return False
        wait_until("redis-server", answers, proc, log)
        self.ports["redis"] = port

    def _start_git(self) -> None:
        git = need("git")
        base = self.workdir / "git"
        self.make_repo(base / GIT_REPO)
        port = free_port()
        proc, log = self._spawn("git-daemon", [
            git, "daemon", "--reuseaddr", f"--listen={LOOPBACK}", f"--port={port}",
            f"--base-path={base}", "--export-all", "--enable=receive-pack",
            "--informative-errors", str(base)])
        url = f"git://{LOOPBACK}:{port}/{GIT_REPO}"

        def answers() -> bool:
            r = subprocess.run([git, "ls-remote", url], capture_output=True, timeout=10)
            return r.returncode == 0 and f"refs/heads/{GIT_BRANCH}".encode() in r.stdout
        wait_until("git daemon", answers, proc, log)
        self.ports["git"] = port
        self.git_dir = base / GIT_REPO

    @staticmethod
    def make_repo(bare: Path) -> None:
        """A bare repository with one commit on GIT_BRANCH."""
        seed = bare.parent / "seed"
        env = {"GIT_AUTHOR_NAME": "host", "GIT_AUTHOR_EMAIL": "host@127.0.0.1",
               "GIT_COMMITTER_NAME": "host", "GIT_COMMITTER_EMAIL": "host@127.0.0.1",
               "HOME": str(bare.parent), "GIT_CONFIG_NOSYSTEM": "1", "PATH": "/usr/bin:/bin"}

        def git(*args: str, cwd: Path | None = None) -> None:
            subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)
        bare.parent.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "--bare", "-b", GIT_BRANCH, str(bare))
        git("init", "-q", "-b", GIT_BRANCH, str(seed))
        (seed / "README").write_text("made by vhostnet/testing/hostservers.py\n")
        git("add", "README", cwd=seed)
        git("commit", "-q", "-m", "initial commit", cwd=seed)
        git("push", "-q", str(bare), GIT_BRANCH, cwd=seed)
        shutil.rmtree(seed)

    # --- after the guest ran

    def verify(self) -> list[str]:
        """What the guest's tests should have left on the host; problems found."""
        problems = []
        if "redis" in self.ports:
            try:
                reply = redis_command(self.ports["redis"], b"GET", REDIS_GREETING_KEY.encode())
            except OSError as e:
                reply = f"({e})".encode()
            if reply != b"$%d\r\n%s\r\n" % (len(REDIS_GREETING), REDIS_GREETING):
                problems.append(f"host redis: {REDIS_GREETING_KEY} is {reply[:80]!r}, "
                                f"not the guest's {REDIS_GREETING!r}")
        if "git" in self.ports:
            r = subprocess.run(["git", "--git-dir", str(self.git_dir), "log", "-1", "--format=%s",
                                GIT_BRANCH], capture_output=True, text=True)
            if r.stdout.strip() != GIT_GUEST_SUBJECT:
                problems.append(f"host git: {GIT_BRANCH} ends in {r.stdout.strip()!r}, not the "
                                f"guest's {GIT_GUEST_SUBJECT!r} ({r.stderr.strip()})")
        return problems

    def stop(self) -> None:
        """SIGTERM every server's process group (`git daemon` runs git-daemon
        as a child), SIGKILL what is still there after STOP_GRACE."""
        for p in self.procs:
            _signal_group(p, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
        self.procs.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal PROC's own process group (it was started in a new session)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
