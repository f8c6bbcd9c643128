"""`vhostnet run` supervision with a stand-in QEMU: exit statuses, the fallback
warning, signals, and that no process, socket or directory is left behind.
(The same with a real QEMU guest: tests/test_qemu_observe.py.)"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vhostnet.launch.run import uses_own_boot

from .observe import sockdir  # noqa: F401 (fixture)

FAKE = textwrap.dedent('''\
    #!{python}
    """Plays QEMU: connects to the vhost-user socket, prints, then does what $FAKE_QEMU says."""
    import os, signal, socket, sys, time
    argv = sys.argv[1:]
    path = next(a.split("path=", 1)[1] for a in argv if a.startswith("socket,id=chr0,path="))
    with open(os.environ["FAKE_QEMU_INFO"], "w") as f:
        f.write(f"{{os.getpid()}}\\n{{path}}\\n" + "\\n".join(argv))
    with open(os.environ["FAKE_QEMU_INFO"] + ".cpus", "w") as f:
        f.write(" ".join(map(str, sorted(os.sched_getaffinity(0)))))
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)                       # the backend listens before QEMU starts
    print("console: hello from the guest", flush=True)
    mode = os.environ.get("FAKE_QEMU", "poweroff")
    if mode == "poweroff":
        print("reboot: Power down", flush=True)
        sys.exit(0)
    if mode == "exit3":
        print("qemu-system-x86_64: -device foo: not found", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if mode == "fallback":
        print("qemu-system-x86_64: warning: vhost-user: falling back on userspace virtio",
              file=sys.stderr, flush=True)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(60)
    ''')


@pytest.fixture
def fake_qemu(sockdir):
    p = sockdir / "fake-qemu"
    p.write_text(FAKE.format(python=sys.executable))
    p.chmod(0o755)
    return p


def start(fake, info, mode, *extra, socket=None, run_args=()):
    argv = [sys.executable, "-m", "vhostnet", "run", "--qemu", str(fake), "--accel", "tcg",
            "--log-level", "warning", *run_args]
    if socket:
        argv += ["--socket", str(socket)]
    argv += ["--", "-kernel", "bzImage", *extra]
    env = {**os.environ, "FAKE_QEMU": mode, "FAKE_QEMU_INFO": str(info)}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(pred, timeout=15):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def info_of(info: Path) -> tuple[int, str, list[str]]:
    pid, path, *argv = info.read_text().splitlines()
    return int(pid), path, argv


def test_own_boot_detection():
    assert uses_own_boot(["-kernel", "bzImage"])
    assert uses_own_boot(["-drive", "file=x.qcow2,if=virtio"])
    assert not uses_own_boot(["-smp", "2", "-device", "virtio-rng-pci"])


def test_poweroff_exits_0_and_cleans_up(fake_qemu, sockdir):
    info = sockdir / "info"
    p = start(fake_qemu, info, "poweroff")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "console: hello from the guest" in out and "reboot: Power down" in out
    pid, path, argv = info_of(info)
    assert gone(pid)
    assert path.startswith("/tmp/vhostnet-run-") and not os.path.exists(os.path.dirname(path))
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in argv and "-kernel" in argv
    assert "Traceback" not in err


@pytest.mark.parametrize("mode,status", [("exit3", 3), ("segv", 128 + signal.SIGSEGV)])
def test_qemu_failure_status_is_passed_on(fake_qemu, sockdir, mode, status):
    info = sockdir / "info"
    sock = sockdir / "v.sock"
    p = start(fake_qemu, info, mode, socket=sock)
    out, err = p.communicate(timeout=30)
    assert p.returncode == status, err
    assert f"QEMU exited with status {status}" in err
    if mode == "exit3":
        assert "-device foo: not found" in err      # QEMU's stderr is forwarded
    assert not sock.exists() and not Path(str(sock) + ".ctl").exists()
    assert gone(info_of(info)[0])


def test_fallback_warning_is_an_error(fake_qemu, sockdir):
    info = sockdir / "info"
    p = start(fake_qemu, info, "fallback")
    t0 = time.monotonic()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert time.monotonic() - t0 < 15            # QEMU was stopped, not waited for
    assert 'QEMU said it is "falling back on userspace virtio"' in err
    assert gone(info_of(info)[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_qemu_and_backend(fake_qemu, sockdir, sig):
    info = sockdir / "info"
    sock = sockdir / "v.sock"
    p = start(fake_qemu, info, "hang", socket=sock)
    wait_for(lambda: info.exists() and Path(str(sock) + ".ctl").exists())
    line = p.stdout.readline()
    while "ready" not in line:
        line = p.stdout.readline()
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 128 + sig, err
    assert f"{signal.Signals(sig).name}: stopping QEMU" in err
    assert gone(info_of(info)[0])
    assert not sock.exists() and not Path(str(sock) + ".ctl").exists()
    assert "Traceback" not in err


def test_qemu_ignoring_sigterm_is_killed(fake_qemu, sockdir):
    info = sockdir / "info"
    p = start(fake_qemu, info, "stubborn")
    wait_for(info.exists)
    while "ready" not in p.stdout.readline():
        pass
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130
    assert 4 < time.monotonic() - t0 < 15         # SIGTERM ignored, SIGKILL after 5 s
    assert gone(info_of(info)[0])


ECHO_QEMU = '''#!{python}
import os, socket, sys
argv = sys.argv[1:]
path = next(a.split("path=", 1)[1] for a in argv if a.startswith("socket,id=chr0,path="))
open(os.environ["FAKE_QEMU_INFO"], "w").write(f"{{os.getpid()}}\\n{{path}}\\n")
print("guest login prompt", flush=True)
for line in sys.stdin:
    print("guest got:", line.strip(), flush=True)
'''


def test_terminal_input_and_ctrl_c(sockdir):
    """On a terminal: typed lines reach QEMU's console, Ctrl-C stops everything (130)."""
    import pty
    import select
    fake = sockdir / "echo-qemu"
    fake.write_text(ECHO_QEMU.format(python=sys.executable))
    fake.chmod(0o755)
    info = sockdir / "info"
    pid, fd = pty.fork()
    if pid == 0:   # the child: vhostnet run with the pty as its terminal
        os.environ["FAKE_QEMU_INFO"] = str(info)
        os.execv(sys.executable, [sys.executable, "-m", "vhostnet", "run", "--qemu", str(fake), "--accel",
                                  "tcg", "--log-level", "warning", "--", "-kernel", "x"])
    out = b""

    def read_until(text: bytes, timeout=15):
        nonlocal out
        deadline = time.monotonic() + timeout
        while text not in out:
            assert time.monotonic() < deadline, out.decode(errors="replace")
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
    try:
        read_until(b"guest login prompt")
        os.write(fd, b"hello there\n")
        read_until(b"guest got: hello there")
        os.write(fd, b"\x03")     # Ctrl-C typed at the terminal
        read_until(b"SIGINT: stopping QEMU")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130, out.decode(errors="replace")
    qpid, path, *_ = info.read_text().splitlines()
    assert gone(int(qpid)) and not os.path.exists(os.path.dirname(path))
    assert b"Traceback" not in out and b"Fatal Python error" not in out


def test_run_machine_virt_aarch64_boots_the_arm64_image(fake_qemu, sockdir):
    """--machine virt-aarch64: the arm64 image, a virt board, the NIC on virtio-mmio."""
    image = sockdir / "arm64"
    image.mkdir()
    (image / "Image").write_bytes(b"kernel")
    (image / "initramfs.cpio.gz").write_bytes(b"")
    (image / "image.env").write_text(f"ARCH=arm64\nKERNEL={image / 'Image'}\n"
                                     f"INITRD={image / 'initramfs.cpio.gz'}\nKERNEL_VERSION=6.1.0-x-arm64\n")
    info = sockdir / "info"
    argv = [sys.executable, "-m", "vhostnet", "run", "--qemu", str(fake_qemu), "--accel", "tcg",
            "--log-level", "warning", "--machine", "virt-aarch64", "--modern", "--image", str(image)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                       env={**os.environ, "FAKE_QEMU": "poweroff", "FAKE_QEMU_INFO": str(info)})
    assert p.returncode == 0, p.stderr
    _, _, qargv = info_of(info)
    line = " ".join(qargv)
    assert "-M virt,memory-backend=mem" in line and "-cpu cortex-a57" in line
    assert "-global virtio-mmio.force-legacy=false -device virtio-net-device,netdev=net0," in line
    assert qargv[qargv.index("-kernel") + 1] == str(image / "Image")
    assert "console=ttyAMA0" in qargv[qargv.index("-append") + 1]
    assert "virt-aarch64 (mmio)" in p.stderr


def test_run_refuses_an_image_of_another_architecture(fake_qemu, sockdir):
    image = sockdir / "amd64"
    image.mkdir()
    for name in ("vmlinux", "initramfs.cpio.gz"):
        (image / name).write_bytes(b"")
    (image / "image.env").write_text(f"KERNEL={image / 'vmlinux'}\nINITRD={image / 'initramfs.cpio.gz'}\n")
    p = subprocess.run([sys.executable, "-m", "vhostnet", "run", "--qemu", str(fake_qemu), "--accel", "tcg",
                        "--machine", "virt-aarch64", "--image", str(image)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "boots the arm64 image, not amd64" in p.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs to choose from")
def test_cpu_auto_pins_the_backend_and_leaves_qemu_its_mask(fake_qemu, sockdir):
    mask = os.sched_getaffinity(0)
    info = sockdir / "info"
    p = start(fake_qemu, info, "hang", run_args=("--cpu", "auto"))
    try:
        while "ready" not in p.stdout.readline():
            assert p.poll() is None, p.stderr.read()
        assert os.sched_getaffinity(p.pid) == {max(mask)}     # the backend: run's own process
        qemu_cpus = {int(c) for c in Path(str(info) + ".cpus").read_text().split()}
        assert qemu_cpus == mask
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    assert f"backend pinned to CPU {max(mask)} (--cpu auto)" in err
    assert gone(info_of(info)[0]) and "Traceback" not in err


def test_cpu_not_allowed_is_refused_before_qemu_starts(fake_qemu, sockdir):
    mask = os.sched_getaffinity(0)
    info = sockdir / "info"
    bad = max(mask) + 1
    p = start(fake_qemu, info, "poweroff", run_args=("--cpu", str(bad)))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2, err              # with one CPU allowed too: another was named
    assert f"--cpu {bad}: not among this process's CPUs" in err
    assert not info.exists() and "Traceback" not in err
    # --reconnect: refused as early, not by backend children started over and over.
    p = start(fake_qemu, info, "poweroff", run_args=("--reconnect", "--cpu", str(bad)))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2, err
    assert err.count("not among this process's CPUs") == 1
    assert not info.exists() and "Traceback" not in err
