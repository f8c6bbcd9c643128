"""The command line: help texts, qemu-args, user mistakes (a message, never a
traceback), and inspect/stats output against a live in-process backend."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import trio

from vhostnet.launch.cli import EXIT_NO_QEMU, build_parser, main

from .device.test_datapath import ping
from .observe import backend, cli, guest, sockdir  # noqa: F401 (fixtures)

COMMANDS = ["serve", "run", "qemu-args", "inspect", "stats", "capture", "forward", "check"]


def vhostnet(*argv, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "vhostnet", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"vhostnet {command}" in out


def test_serve_help_names_every_feature(capsys):
    """--disable-feature's help lists every name it accepts (packed was missing)."""
    from vhostnet.virtio.features import BY_NAME
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = "".join(capsys.readouterr().out.split())       # argparse wraps, even at hyphens
    text = out.split("--disable-featureNAME")[-1].split("--rx-pending", 1)[0]   # past the usage line
    for name in BY_NAME:
        assert name in text, name


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert c in out


def test_serve_keeps_its_options():
    args = build_parser().parse_args(["serve", "--socket", "/tmp/x.sock", "--once", "--log-level", "debug",
                                      "--disable-feature", "offloads", "--rx-pending", "8", "--mac",
                                      "52:54:00:00:00:01", "--mtu", "9000"])
    assert (args.socket, args.once, args.log_level, args.disable_feature, args.rx_pending, args.mtu) == \
        ("/tmp/x.sock", True, "debug", ["offloads"], 8, 9000)
    assert args.control is None and args.pcap is None


# -- qemu-args ---------------------------------------------------------------------

def test_qemu_args(capsys):
    assert main(["qemu-args", "--socket", "/tmp/v.sock", "--mem", "1G", "--mac", "52:54:00:AB:CD:EF"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == ("-object memory-backend-memfd,id=mem,size=1G,share=on -M q35,memory-backend=mem -m 1G "
                   "-chardev socket,id=chr0,path=/tmp/v.sock -netdev vhost-user,id=net0,chardev=chr0 "
                   "-device virtio-net-pci,netdev=net0,mac=52:54:00:ab:cd:ef,vectors=0,romfile=")
    assert main(["qemu-args", "--json", "--socket", "/tmp/my dir/v.sock"]) == 0
    flags = json.loads(capsys.readouterr().out)
    assert "socket,id=chr0,path=/tmp/my dir/v.sock" in flags


@pytest.mark.parametrize("extra,netdev,device", [
    (["--queues", "2", "--packed"], "vhost-user,id=net0,chardev=chr0,queues=2",
     "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,vectors=0,romfile=,packed=on,mq=on"),
    (["--queues", "4", "--msix"], "vhost-user,id=net0,chardev=chr0,queues=4",
     "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,vectors=10,romfile=,mq=on"),
    (["--msix"], "vhost-user,id=net0,chardev=chr0",
     "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,vectors=4,romfile="),
])
def test_qemu_args_multiqueue(extra, netdev, device, capsys):
    """queues=N on the netdev and mq=on on the NIC; vectors=0 unless --msix (2N+2: a vector per
    queue, the control queue and config changes); tests/test_qemu_mq.py boots the first."""
    assert main(["qemu-args", "--json", "--socket", "/tmp/v.sock", *extra]) == 0
    flags = json.loads(capsys.readouterr().out)
    assert flags[flags.index("-netdev") + 1] == netdev
    assert flags[flags.index("-device") + 1] == device


def test_serve_queues_out_of_range_is_a_usage_error(capsys):
    for bad in ("0", "65", "two"):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--queues", bad])
        assert e.value.code == 2
        assert "--queues" in capsys.readouterr().err


def test_run_shell_needs_a_terminal():
    p = subprocess.run([sys.executable, "-m", "vhostnet", "run", "--shell"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--shell needs a terminal on stdin" in p.stderr, p.stderr


@pytest.mark.parametrize("machine,extra,binary,package,want", [
    ("q35", ["--legacy"], "qemu-system-x86_64", "qemu-system-x86",
     ["-M q35,memory-backend=mem",
      "-device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,vectors=0,romfile=,disable-modern=on"]),
    ("q35", ["--modern"], "qemu-system-x86_64", "qemu-system-x86",
     ["-device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,vectors=0,romfile=,disable-legacy=on"]),
    ("virt-aarch64", [], "qemu-system-aarch64", "qemu-system-arm",
     ["-M virt,memory-backend=mem", "-device virtio-net-device,netdev=net0,mac=52:54:00:12:34:56"]),
    ("virt-aarch64", ["--modern"], "qemu-system-aarch64", "qemu-system-arm",
     ["-global virtio-mmio.force-legacy=false -device virtio-net-device,"]),
    ("virt-riscv64", ["--legacy"], "qemu-system-riscv64", "qemu-system-misc",
     ["-M virt,memory-backend=mem", "-global virtio-mmio.force-legacy=true -device virtio-net-device,"]),
    ("virt-riscv64", ["--transport", "pci"], "qemu-system-riscv64", "qemu-system-misc",
     ["-M virt,memory-backend=mem", "-device virtio-net-pci,netdev=net0,"]),
])
def test_qemu_args_per_machine(machine, extra, binary, package, want, capsys):
    assert main(["qemu-args", "--socket", "/tmp/v.sock", "--machine", machine, *extra]) == 0
    out, err = capsys.readouterr()
    for piece in want:
        assert piece in out, out
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in out
    assert ("virtio-net-device" in out) is ("pci" not in extra and machine != "q35")
    assert f"{binary} (Debian package {package})" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv,message", [
    (["qemu-args", "--machine", "q35", "--transport", "mmio"], "the q35 machine has no mmio transport"),
    (["run", "--machine", "virt-riscv64"], "there is no test guest for virt-riscv64"),
    (["run", "--shell", "--", "-kernel", "bzImage"], "--shell boots the test guest"),
    (["qemu-args", "--mem", "12Q"], "memory size '12Q' is not like 256M"),
    (["qemu-args", "--mac", "52:54:00"], "MAC '52:54:00' is not like"),
    (["qemu-args", "--mac", "01:00:5e:00:00:01"], "multicast"),
    (["run", "--mem", "lots"], "memory size 'lots'"),
    (["run", "--append", "x", "--", "-kernel", "bzImage"], "--append is for the test guest"),
    (["inspect", "--desc", "3"], "--desc needs --queue"),
])
def test_user_mistakes_get_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["inspect", "--watch", "0"], ["stats", "--watch", "soon"],
                                  ["capture", "--count", "0"], ["inspect", "--queue", "-1"],
                                  ["stats", "--", "-kernel", "x"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_run_without_image_says_how_to_build_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VHOSTNET_GUEST_DIR", str(tmp_path))
    assert main(["run", "--accel", "tcg"]) == 1
    err = capsys.readouterr().err
    assert "make guest" in err and "vhostnet run -- -kernel" in err


def test_serve_mistakes(sockdir):
    r = vhostnet("serve", "--socket", str(sockdir / "v.sock"), "--disable-feature", "turbo")
    assert r.returncode == 2 and "unknown feature 'turbo'" in r.stderr and "Traceback" not in r.stderr
    r = vhostnet("serve", "--socket", str(sockdir / "missing" / "v.sock"))
    assert r.returncode == 1 and "cannot listen on" in r.stderr and "Traceback" not in r.stderr
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(sockdir / "busy.sock"))
    live.listen()
    r = vhostnet("serve", "--socket", str(sockdir / "busy.sock"))
    live.close()
    assert r.returncode == 1 and "in use by another running process" in r.stderr
    assert not os.path.exists(str(sockdir / "busy.sock") + ".ctl")
    r = vhostnet("serve", "--socket", str(sockdir / "v.sock"), "--pcap", str(sockdir / "no" / "x.pcap"))
    assert r.returncode == 1 and "cannot write" in r.stderr
    assert not os.path.exists(sockdir / "v.sock") and not os.path.exists(str(sockdir / "v.sock") + ".ctl")


def test_serve_cpu(sockdir):
    """--cpu: a CPU this process may not use is refused; auto pins, and inspect says where."""
    mask = os.sched_getaffinity(0)
    sock = sockdir / "v.sock"
    if len(mask) >= 2:
        r = vhostnet("serve", "--socket", str(sock), "--cpu", str(max(mask) + 1))
        assert r.returncode == 2 and "not among this process's CPUs" in r.stderr
        assert not sock.exists() and "Traceback" not in r.stderr
    r = vhostnet("serve", "--cpu", "first")
    assert r.returncode == 2 and "not a CPU: 'first'" in r.stderr
    proc = subprocess.Popen([sys.executable, "-m", "vhostnet", "serve", "--socket", str(sock),
                             "--cpu", "auto", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ctl = str(sock) + ".ctl"
        deadline = time.monotonic() + 15
        while not os.path.exists(ctl):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.02)
        r = vhostnet("inspect", "--control", ctl, "--json")
        assert r.returncode == EXIT_NO_QEMU, r.stderr     # no QEMU: the backend alone
        want = [max(mask)] if len(mask) >= 2 else sorted(mask)
        assert json.loads(r.stdout)["backend"]["cpus"] == want
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (f"pinned to CPU {max(mask)} (--cpu auto)" in err) == (len(mask) >= 2)


def test_client_without_backend(sockdir, capsys):
    assert main(["inspect", "--socket", str(sockdir / "v.sock")]) == 1
    assert f"no control socket at {sockdir}/v.sock.ctl" in capsys.readouterr().err
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sockdir / "stale.ctl"))
    stale.close()   # a socket file nobody listens on
    assert main(["stats", "--control", str(sockdir / "stale.ctl")]) == 1
    assert "nothing answers" in capsys.readouterr().err


# -- against a live backend ---------------------------------------------------------

async def test_inspect_and_stats_without_qemu(backend, capsys):
    srv, ctl = backend
    assert await cli("inspect", "--control", ctl.path) == EXIT_NO_QEMU
    out = capsys.readouterr().out
    assert f"listens on {srv.socket_path}, but no QEMU is connected" in out
    assert "vhostnet qemu-args --socket" in out
    assert await cli("stats", "--socket", srv.socket_path, "--json") == EXIT_NO_QEMU
    assert json.loads(capsys.readouterr().out)["connected"] is False


async def test_inspect_text(backend, guest, capsys):
    srv, ctl = backend
    await guest.exchange([ping(seq=1)], want=1)
    assert await cli("inspect", "--socket", srv.socket_path) == 0
    out = capsys.readouterr().out
    for text in ["virtio features: 0x", "RING_EVENT_IDX", "vhost-user protocol: 0x", "REPLY_ACK",
                 "memory: 1 region(s)", "guest 0x0000000000-0x0001ffffff (32 MiB)  qemu 0x7f0000000000",
                 "queue 0 (rx): size 256, started, enabled", "queue 1 (tx): size 256, started, enabled",
                 "avail->idx 1  used->idx 1  last_avail_idx 1", "RX buffers posted 255", "errors: none"]:
        assert text in out, text
    assert await cli("inspect", "--control", ctl.path, "--queue", "1", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert [q["name"] for q in doc["queues"]] == ["tx"]
    assert await cli("inspect", "--control", ctl.path, "--queue", "7") == 1
    assert "no queue 7; queues: 0=rx, 1=tx" in capsys.readouterr().err


async def test_inspect_desc_text(backend, guest, capsys):
    _, ctl = backend
    head = guest.post_tx(ping(seq=42))
    assert await cli("inspect", "--control", ctl.path, "--queue", "1", "--desc", str(head)) == 0
    out = capsys.readouterr().out
    assert f"queue 1 (tx), chain at descriptor {head}; pending in the avail ring at idx 0" in out
    assert "flags 0              next 0     in guest memory" in out
    assert "virtio-net header: flags 0, gso NONE, num_buffers 0" in out
    assert "ICMP echo request, id 4660, seq 42, length 64" in out
    assert await cli("inspect", "--control", ctl.path, "--queue", "1", "--desc", "999") == 1
    assert "out of range" in capsys.readouterr().err


async def test_stats_text(backend, guest, capsys):
    _, ctl = backend
    await guest.exchange([ping(seq=1), ping(seq=2)], want=2)
    assert await cli("stats", "--control", ctl.path) == 0
    out = capsys.readouterr().out
    assert "tx (guest->stack)          2  bytes            196" in out
    assert "rx (stack->guest)          2" in out
    assert "drops      device: none" in out
    assert "10.0.2.15       52:54:00:12:34:56" in out
    assert "10.0.2.2:7" in out


async def test_stats_watch_until_ctrl_c(backend, guest, tmp_path):
    _, ctl = backend
    err = open(tmp_path / "stderr", "w+")
    # Ctrl-C as on a terminal: a suite started in the background (`... &`)
    # ignores SIGINT, and a child inherits that, so it would never stop.
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vhostnet", "stats", "--control", ctl.path, "--watch", "0.1", "--json"],
        stdout=subprocess.PIPE, stderr=err,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    got = b""
    with trio.fail_after(20):
        while got.count(b"\n") < 3:
            got += await proc.stdout.receive_some(65536)
            await guest.exchange([ping(seq=1)], want=1, timeout=0.5)
    proc.send_signal(signal.SIGINT)
    # Read on to EOF, as a real reader does, and stderr goes to a file: no
    # pipe can fill and hold the watcher back from exiting; a failure says
    # what it printed.
    try:
        with trio.move_on_after(10):
            while chunk := await proc.stdout.receive_some(65536):
                got += chunk
            await proc.wait()
        err.seek(0)
        assert proc.returncode == 0, (f"stats --watch after SIGINT: returncode {proc.returncode}, "
                                      f"stderr: {err.read()[-2000:]!r}")
    finally:
        if proc.returncode is None:
            proc.kill()
        err.close()
    docs = [json.loads(line) for line in got.split(b"\n")[:-1] if line.strip()]
    assert len(docs) >= 3
    assert docs[-1]["device"]["tx_frames"] >= docs[0]["device"]["tx_frames"]


def test_serve_strict_reaches_the_rings(sockdir):
    from vhostnet.launch import serve
    args = build_parser().parse_args(["serve", "--strict", "--socket", str(sockdir / "s.sock"), "--no-control"])
    assert args.strict is True
    server, control, tap = serve.make_backend(args, args.socket)
    try:
        assert server.strict is True and control is None
    finally:
        serve.close_listeners(server, control)
    args = build_parser().parse_args(["serve", "--socket", str(sockdir / "t.sock")])
    assert args.strict is False
