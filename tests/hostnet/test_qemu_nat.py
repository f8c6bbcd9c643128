"""The host network with a real Linux guest (QEMU, TCG) on `vhostnet serve`.

The guest's init runs NAT_TEST=1 (qemu/init): busybox wget fetches a blob
from an HTTP server this test runs on the host's 127.0.0.1, reached as
10.0.2.2 (host -> guest TCP), posts it back (guest -> host TCP), runs the
image's tcp_echo and udp_echo against host echo servers, then serves HTTP
on guest ports 8080 and 8081. The host comes in through a forward given at
start (--forward, to 8081) and one added live (`vhostnet forward add`, to
8080). Everything the guest reaches is on 127.0.0.1.

The guest image of this branch has no iperf3; the bulk transfers here are
busybox wget both ways (2 MiB of hex text each) and tcp_echo (1 MiB each way).
"""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vhostnet.launch import qemu

ROOT = Path(__file__).resolve().parent.parent.parent
# Text: busybox wget --post-file sends strlen() bytes, so no NULs.
BLOB = os.urandom(1 << 20).hex().encode()
TOKEN = 4242
BOOT_DEADLINE = 240         # TCG boot + 2 x 2 MiB + echo tests, on a shared 2-core host

needs_qemu = pytest.mark.skipif(shutil.which(qemu.QEMU) is None,
                                reason=f"{qemu.QEMU} is not installed (make setup installs it)")


class _Handler(http.server.BaseHTTPRequestHandler):
    finished = threading.Event()
    uploads: list = []

    def do_GET(self):
        if self.path == "/blob":
            body = BLOB
        elif self.path == "/finished":
            body = b"yes" if self.finished.is_set() else b"no"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        data = self.rfile.read(n)
        self.uploads.append(data)
        body = hashlib.sha256(data).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def _tcp_echo_server() -> socket.socket:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)

    def serve():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=_echo_conn, args=(c,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return ls


def _echo_conn(c: socket.socket) -> None:
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)


def _udp_echo_server() -> socket.socket:
    us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    us.bind(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                d, a = us.recvfrom(65536)
                us.sendto(d, a)
            except OSError:
                return
    threading.Thread(target=serve, daemon=True).start()
    return us


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _http_get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
        out = b""
        while True:
            d = s.recv(65536)
            if not d:
                return out
            out += d


def _ctl(path: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhostnet", *argv, "--control", path],
                          cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.qemu
@needs_qemu
def test_linux_guest_through_nat_and_forwards(tmp_path):
    image = qemu.find_image()
    _Handler.finished.clear()
    _Handler.uploads.clear()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    echo, uecho = _tcp_echo_server(), _udp_echo_server()
    sock = tmp_path / "v.sock"
    ctl = str(sock) + ".ctl"
    fwd_static = _free_port()
    backend = qemu_proc = None
    console: list[str] = []
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        backend = subprocess.Popen(
            [sys.executable, "-m", "vhostnet", "serve", "--socket", str(sock), "--once",
             "--forward", f"tcp:127.0.0.1:{fwd_static}-:8081", "--log-level", "info",
             "--log-file", str(tmp_path / "backend.log")],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "backend.err", "wb"))
        deadline = time.monotonic() + 20
        while not os.path.exists(ctl):
            assert backend.poll() is None, (tmp_path / "backend.err").read_text()
            assert time.monotonic() < deadline, "the backend never opened its control socket"
            time.sleep(0.05)
        guest_vars = {"NAT_TEST": 1, "NAT_HTTP_PORT": httpd.server_address[1],
                      "NAT_ECHO_PORT": echo.getsockname()[1],
                      "NAT_UDP_PORT": uecho.getsockname()[1], "NAT_TOKEN": TOKEN}
        argv = qemu.qemu_argv(sock, image=image, guest_vars=guest_vars)
        qemu_proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = threading.Thread(target=_read_console, args=(qemu_proc, console), daemon=True)
        reader.start()
        _wait_line(console, "nat: guest httpd up", qemu_proc, BOOT_DEADLINE, tmp_path)
        # In through the forward given at start...
        page = _http_get(fwd_static)
        assert f"nat-token-{TOKEN}-8081".encode() in page, page[:300]
        # ...and through one added live.
        r = _ctl(ctl, "forward", "add", "tcp:127.0.0.1:0-:8080", "--json")
        assert r.returncode == 0, r.stderr
        import json
        live = int(json.loads(r.stdout)["host"].rsplit(":", 1)[1])
        page = _http_get(live)
        assert f"nat-token-{TOKEN}-8080".encode() in page, page[:300]
        listed = _ctl(ctl, "forward", "list")
        assert str(live) in listed.stdout and str(fwd_static) in listed.stdout
        stats = _ctl(ctl, "stats")
        assert stats.returncode == 0 and "NAT" in stats.stdout
        (tmp_path / "stats.txt").write_text(stats.stdout)
        _Handler.finished.set()
        _wait_line(console, "init: done", qemu_proc, 60, tmp_path)
        qemu_proc.wait(timeout=30)
    finally:
        for p in (qemu_proc, backend):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        httpd.shutdown()
        echo.close()
        uecho.close()
        (tmp_path / "console.log").write_text("\n".join(console))
    text = "\n".join(console)
    assert "FAIL:" not in text, text[-3000:]
    sha = hashlib.sha256(BLOB).hexdigest()
    assert f"nat: got sha256 {sha} bytes {len(BLOB)}" in text            # host -> guest
    assert f"nat: upload answer {sha}" in text and _Handler.uploads == [BLOB]   # guest -> host
    assert "tcp-echo: ok" in text and "udp-echo: ok" in text
    assert "init: 0 failure(s)" in text
    log = (tmp_path / "backend.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def _read_console(proc, lines: list) -> None:
    ansi = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")
    for raw in proc.stdout:
        lines.append(ansi.sub("", raw.decode(errors="replace")).rstrip("\r\n"))


def _wait_line(console: list, marker: str, proc, timeout: float, tmp_path) -> None:
    deadline = time.monotonic() + timeout
    while not any(marker in line for line in console):
        if proc.poll() is not None or time.monotonic() > deadline:
            (tmp_path / "console.log").write_text("\n".join(console))
            pytest.fail(f"no {marker!r} from the guest; console:\n" + "\n".join(console[-60:]))
        time.sleep(0.1)
