"""The `vhostnet` command line: serve, run, qemu-args, and the looking-inside tools.

    serve      the backend on a vhost-user socket (+ control socket, + --pcap);
               also as `vhostnet-backend`, with QEMU's backend program
               conventions (--socket-path, --fd, --print-capabilities)
    run        the backend and a QEMU guest together, in one process
    qemu-args  the QEMU flags that attach a guest to a backend
    install-discovery  the vhost-user discovery file (type "net") for management tools
    inspect    rings, indices, features, memory; one descriptor chain with --desc
    stats      frames, drops by reason, ARP/UDP/TCP tables, live with --watch
    capture    the guest's frames as pcap (-w) or as tcpdump-like lines
    fault      link fault injection: set, clear, show (vhostnet/link/cli.py)
    forward    add, remove or list port forwards of a running backend
    check      the driver's spec violations, MUST / SHOULD (vhostnet/observe/check.py)

The looking-inside tools talk to the backend over its control socket
(vhostnet/observe/control.py); each finds it from --control, or --socket + ".ctl",
or the default socket. User mistakes get a one-line message and exit
status 2 (bad arguments) or 1 (nothing to talk to, refused); inspect and
stats exit 3 when the backend runs but no QEMU is connected.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from vhostnet import __version__
from vhostnet.launch import affinity
from vhostnet.link import cli as link_cli
from vhostnet.observe import check as check_cli
from vhostnet.virtio import features
from vhostnet.vhostuser import kick_hook
from vhostnet.vhostuser.idle_poll import DEFAULT_IDLE_POLL, MAX_IDLE_POLL

EXIT_NO_QEMU = 3

# serve --queues: one pair by default. Measured side by side (docs/multiqueue.md:
# scripts/bench_mq.py, bench_dpdk.py --queues 1,2,4, bench_qemu.py vhostnet-q2/-q4):
# one Python thread runs every ring, so more pairs bring no throughput (the CPU per
# frame stays about flat; a real guest busy on 2 vCPUs even leaves a 2-core host's
# backend less CPU); and with one pair the data path runs no steering at all.
DEFAULT_QUEUE_PAIRS = 1
QUEUES_NOTE = ("vectors=0 works with mq=on: measured under TCG with QEMU 7.2, a Linux guest runs "
               "every pair on the one INTx interrupt, while MSI-X (vectors=2N+2) segfaults QEMU")

EPILOG_SERVE = """\
Start the backend first, then QEMU with the flags of `vhostnet qemu-args`:
  -object memory-backend-memfd,id=mem,size=256M,share=on -M q35,memory-backend=mem -m 256M
  -chardev socket,id=chr0,path=SOCKET -netdev vhost-user,id=net0,chardev=chr0
  -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,vectors=0,romfile=

The guest sees a user-mode network: it is 10.0.2.15/24, the gateway 10.0.2.2
answers ARP and ping and runs echo (TCP/UDP 7), discard (9) and chargen (TCP 19),
DHCP, and TFTP with --tftp; DNS on 10.0.2.3 is relayed to the host's resolvers.
Frames the guest sends to its own address come back to it.

While it runs, look inside from another terminal:
  vhostnet inspect            rings, indices, features, memory
  vhostnet stats --watch 1    traffic, drops, ARP/UDP/TCP tables
  vhostnet capture -w g.pcap  the guest's frames, for tshark/wireshark

With -chardev socket,...,reconnect=1 (`vhostnet qemu-args --reconnect`),
QEMU survives the backend: stop or kill it, start it again on the same
socket, and the guest's link comes back within about a second.

QEMU's backend program conventions (docs/interop/vhost-user.rst): the
vhostnet-backend command is this one; --socket-path is --socket, --fd N
serves a listening Unix socket the caller opened and passed as fd N (its
path, if any, is left in place; the control socket is that path + .ctl),
and --print-capabilities prints {"type": "net"} and exits.

examples:
  vhostnet serve
  vhostnet serve --socket /tmp/v.sock --pcap all.pcap --log-level debug
  vhostnet serve --disable-feature offloads --disable-feature mrg-rxbuf
  vhostnet serve --tftp ~/tftp --bootfile u-boot.scr --dns-upstream 127.0.0.1:5353
  vhostnet serve --fault loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1,dir=both
  vhostnet serve --strict     # a driver's first MUST violation stops that ring (vhostnet check)
  vhostnet serve --queues 2   # with -netdev vhost-user,...,queues=2 and virtio-net-pci,...,mq=on
  vhostnet-backend --socket-path=/run/vm1/net0.sock
  systemd-socket-activate -l /run/vm1/net0.sock vhostnet-backend --fd 3
  vhostnet serve --print-capabilities
"""

EPILOG_DISCOVERY = """The file is QEMU's vhost-user discovery format (docs/interop/vhost-user.json,
VhostUserBackend): type "net" and the absolute path of vhostnet-backend,
which management software (libvirt, scripts) runs with --socket-path or
--fd. Directories searched by such software, most general first:
/usr/share/qemu/vhost-user (packages: the default, --prefix /usr),
/etc/qemu/vhost-user (--sysconf), $XDG_CONFIG_HOME/qemu/vhost-user (--user).

examples:
  sudo vhostnet install-discovery            # /usr/share/qemu/vhost-user/50-vhostnet.json
  vhostnet install-discovery --user
  vhostnet install-discovery --prefix /opt/vhostnet --binary /opt/vhostnet/bin/vhostnet-backend
  vhostnet install-discovery --print
  vhostnet install-discovery --user --remove
"""

EPILOG_RUN = """\
Without QEMU arguments, boots the project's test guest (qemu/build/, made by
`make guest`) with vhostnet.NET=1 on its command line: it configures eth0,
pings the gateway, runs the echo tests and powers off. With QEMU arguments
after `--` that boot something (-kernel, -drive, -hda, -cdrom, -bios...), only
those are used; vhostnet adds memory, console and NIC flags (`vhostnet
qemu-args` shows them). The console is on stdout; Ctrl-C stops QEMU and the
backend. Exit status: QEMU's own, 128+N after signal N, 1 if QEMU fell back
on userspace virtio.

With --reconnect the backend runs as a child process, started again
whenever it exits (crash, kill -9, or `kill PID` to pick up a new version),
and QEMU gets -chardev socket,...,reconnect=1: the guest keeps running, its
link goes down while the backend is away and comes back within about a
second of the new backend listening.

--machine virt-aarch64 boots the arm64 test guest (qemu/build-arm64/, made by
`GUEST_ARCH=arm64 scripts/build-guest.sh`) on a `virt` board, its NIC on
virtio-mmio unless --transport pci; --legacy / --modern force the device's
mode (QEMU's default: transitional on PCI, legacy on mmio).

--shell boots the test guest to a shell on the console instead, with eth0 up
(10.0.2.15, gateway 10.0.2.2) and ping, wget, iperf3, redis-cli and git on
its PATH; the terminal is raw, so Ctrl-C reaches the guest. Leaving the shell
(exit, Ctrl-D) powers the guest off; Ctrl-A x quits QEMU at once.

examples:
  vhostnet run
  vhostnet run --reconnect
  vhostnet run --shell
  vhostnet run --machine virt-aarch64 --modern
  vhostnet run --append "vhostnet.TCP_ECHO_TEST=0" --pcap guest.pcap
  vhostnet run --mem 1G -- -kernel bzImage -initrd rootfs.cpio -append "console=ttyS0"
  vhostnet run -- -drive file=disk.qcow2,if=virtio -smp 2
"""

EPILOG_QEMU_ARGS = """\
With --reconnect, QEMU keeps the guest when the backend goes away and
reconnects (every second) until it is back: restart `vhostnet serve` at will.

Machines: q35 (x86_64, virtio-pci), virt-aarch64 and virt-riscv64 (virtio-mmio
by default, or --transport pci). --legacy makes a legacy-only device (VERSION_1
never offered: disable-modern=on, virtio-mmio.force-legacy=true), --modern a
modern-only one; without either, QEMU's default (transitional PCI, legacy
mmio). A line on stderr names the QEMU binary and its Debian package.

examples:
  qemu-system-x86_64 -accel kvm -nographic -kernel bzImage \\
      $(vhostnet qemu-args --socket /tmp/v.sock --mem 1G)
  qemu-system-aarch64 -cpu cortex-a57 -nographic -kernel Image \\
      $(vhostnet qemu-args --machine virt-aarch64 --modern)
  qemu-system-riscv64 -nographic -kernel my-kernel.elf \\
      $(vhostnet qemu-args --machine virt-riscv64 --legacy)
  vhostnet qemu-args --reconnect
  vhostnet qemu-args --queues 2 --packed     # with: vhostnet serve --queues 2
  vhostnet qemu-args --queues 4 --msix       # KVM hosts: vectors=10 (MSI-X crashes QEMU 7.2 under TCG)
  vhostnet qemu-args --json
"""

EPILOG_INSPECT = """\
Fields: avail->idx is what the driver published, last_avail_idx the next
entry the device takes; pending = the difference (for rx: buffers posted).
used->idx is what the device published. in flight = taken, not yet used.
Docs: README.md, section "Looking inside"; JSON fields: docs/json.md.
Exit status: 0; 1 no backend answers; 3 the backend runs but no QEMU is connected.

examples:
  vhostnet inspect
  vhostnet inspect --queue 1 --watch 0.5
  vhostnet inspect --queue 1 --desc 0        # the chain at descriptor 0 of tx
  vhostnet inspect --json | jq '.queues[1].used_idx'
"""

EPILOG_STATS = """\
Counters belong to the current QEMU connection. Exit status: 0; 1 no backend
answers; 3 the backend runs but no QEMU is connected.

examples:
  vhostnet stats
  vhostnet stats --watch 1
  vhostnet stats --json | jq .device.drops
"""

EPILOG_CAPTURE = """\
The file is classic pcap (LINKTYPE_ETHERNET). Partial checksums (checksum
offload) are completed so tshark shows them valid; --raw-csum keeps the bytes
as the guest left them. TSO frames appear as one large segment. The file has
no direction field: tx (from the guest) frames have the guest's MAC as source.

examples:
  vhostnet capture -w guest.pcap                 # until Ctrl-C
  vhostnet capture -w guest.pcap --count 100
  vhostnet capture                               # live, one line per frame
  vhostnet capture -w - | tshark -r -
  vhostnet capture --at stack -w stack.pcap      # after the fault layer (TX), before it (RX)
"""


def default_socket() -> str:
    env = os.environ.get("VHOSTNET_SOCKET")
    if env:
        return env
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isdir(run):
        return os.path.join(run, "vhostnet.sock")
    return f"/tmp/vhostnet-{os.getuid()}.sock"


class Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def _fdnum(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a file descriptor number (>= 0)")
    return v


def _queue_pairs(text: str) -> int:
    from vhostnet.net.device import MAX_QUEUE_PAIRS
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= v <= MAX_QUEUE_PAIRS:
        raise argparse.ArgumentTypeError(f"{v} queue pairs: give 1..{MAX_QUEUE_PAIRS}")
    return v


def _index(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return v


def _add_net_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument("--mac", default="52:54:00:12:34:56", metavar="MAC",
                   help="guest MAC: announced in the device config space and used by the stack "
                        "until the guest's own frames teach it otherwise (default %(default)s). "
                        "QEMU's virtio-net-pci takes its MAC from its own mac= option; give it the same one")
    g.add_argument("--guest-ip", default="10.0.2.15", help="guest address (default %(default)s)")
    g.add_argument("--prefix", type=int, default=24, help="guest network prefix length (default %(default)s)")
    g.add_argument("--gateway-ip", default="10.0.2.2", help="gateway address (default %(default)s)")
    g.add_argument("--dns-ip", default="10.0.2.3", help="DNS address (default %(default)s)")
    g.add_argument("--gateway-mac", default="52:55:0a:00:02:02", help="gateway MAC (default %(default)s)")
    g.add_argument("--mtu", type=int, default=1500, help="link MTU (default %(default)s)")
    from vhostnet.launch.services import add_service_options
    add_service_options(p)


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    from vhostnet.logging_setup import LEVELS
    p.add_argument("--control", metavar="PATH",
                   help="control socket for inspect/stats/capture (default: the socket path + .ctl)")
    p.add_argument("--no-control", action="store_true", help="do not open a control socket")
    p.add_argument("--pcap", metavar="FILE", help="write every frame of the link to FILE (classic pcap) from the start")
    p.add_argument("--raw-csum", action="store_true",
                   help="in pcap output, keep partial checksums as the guest/stack left them "
                        "(default: complete them, so tshark shows them valid)")
    p.add_argument("--log-level", default="info", choices=LEVELS, help="log level (default %(default)s)")
    p.add_argument("--log-file", metavar="FILE", help="append the log to FILE instead of stderr")
    p.add_argument("--disable-feature", action="append", default=[], metavar="NAME",
                   help="do not offer a virtio feature; repeatable. Names: "
                        + ", ".join(features.BY_NAME)   # the accepted names, so none goes unlisted
                        + "; 'offloads' for all four offloads. Handy to test a driver's simple paths")
    p.add_argument("--queues", type=_queue_pairs, default=DEFAULT_QUEUE_PAIRS, metavar="N",
                   help="queue pairs served (multiqueue, VIRTIO_NET_F_MQ when N > 1): QEMU's "
                        "-netdev vhost-user,queues= may ask for up to N. " + QUEUES_NOTE
                        + ". Default %(default)s: one Python thread runs every ring, so pairs add no "
                          "throughput (measured with 1, 2, 4 pairs side by side, docs/multiqueue.md: "
                          "CPU per frame about flat, and a guest busy on 2 vCPUs leaves a 2-core host's "
                          "backend less CPU); use 2 when the guest needs mq=on")
    p.add_argument("--rx-pending", type=int, default=1024, metavar="N",
                   help="frames held for the guest while it posts no RX buffers, before dropping (default %(default)s)")
    p.add_argument("--allow-unsealed-memory", action="store_true",
                   help="accept guest memory without F_SEAL_SHRINK (memory-backend-file, memfd seal=off, "
                        "DPDK); a front-end that shrinks it then kills the backend (SIGBUS): trusted front-ends only")
    p.add_argument("--idle-poll-us", type=_idle_poll_us, default=round(DEFAULT_IDLE_POLL * 1e6), metavar="US",
                   help="after a kick's work, read the kick eventfd for up to US microseconds before "
                        "sleeping, while the guest kicks again within that time (request/response "
                        "traffic); 0 always sleeps. Costs CPU only while it catches kicks "
                        f"(0..{round(MAX_IDLE_POLL * 1e6)}; default %(default)s)")
    p.add_argument("--cpu", type=affinity.parse_cpu, default=affinity.CpuChoice(affinity.NONE),
                   metavar="N|auto|none",
                   help="pin the backend to one CPU: N, or 'auto' (the highest this process may "
                        "use); QEMU and the guest stay where the scheduler puts them. A wake-up that "
                        "stays on its CPU is cheaper, but a pinned backend can wait for a busy CPU: "
                        "on the 2-core test VM it won some races and lost others (docs/benchmarks.md, "
                        "\"What one wake-up costs\"; scripts/wake_cost.py measures your host). "
                        "A CPU this process may not use is refused (exit 2). Default %(default)s")
    p.add_argument("--no-kick-hook", action="store_true",
                   help="wake for every kick through trio's scheduler, not from the kick hook "
                        "where trio would sleep (vhostnet/vhostuser/kick_hook.py; on by default: "
                        "it answers a kick sooner, most of all after an idle spell); "
                        "to measure the hook, or if it misbehaves")
    link_cli.add_fault_option(p)
    check_cli.add_strict_option(p)
    _add_net_options(p)


def _idle_poll_us(text: str) -> int:
    try:
        us = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of microseconds: {text!r}") from None
    if not 0 <= us <= MAX_IDLE_POLL * 1e6:
        raise argparse.ArgumentTypeError(f"must be 0..{round(MAX_IDLE_POLL * 1e6)} microseconds")
    return us


def _add_machine_options(p: argparse.ArgumentParser) -> None:
    from vhostnet.launch import qemu
    g = p.add_argument_group("machine and NIC")
    g.add_argument("--machine", default="q35", choices=list(qemu.MACHINES),
                   help="QEMU machine (default %(default)s)")
    g.add_argument("--transport", choices=["pci", "mmio"],
                   help="virtio transport (default: mmio on virt machines, pci on q35)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--legacy", dest="legacy", action="store_const", const=True,
                      help="legacy-only virtio device (disable-modern=on / virtio-mmio.force-legacy=true)")
    mode.add_argument("--modern", dest="legacy", action="store_const", const=False,
                      help="modern-only virtio device (disable-legacy=on / virtio-mmio.force-legacy=false)")


def _add_client_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which backend")
    g.add_argument("--control", metavar="PATH", help="the backend's control socket")
    g.add_argument("--socket", metavar="PATH",
                   help=f"the backend's vhost-user socket; its control socket is PATH.ctl "
                        f"(default {default_socket()}, or $VHOSTNET_SOCKET)")


def build_parser() -> argparse.ArgumentParser:
    from vhostnet.hostnet.options import EPILOG_HOSTNET, add_forward_command, add_hostnet_options
    from vhostnet.launch import qemu
    p = argparse.ArgumentParser(
        prog="vhostnet", formatter_class=Formatter,
        description="A virtio-net device for QEMU over vhost-user, backed by an embedded "
                    "Python TCP/IP stack you can look inside.",
        epilog="Start with `vhostnet run` (backend + test guest), or `vhostnet serve` and "
               "your own QEMU (`vhostnet qemu-args`). `vhostnet COMMAND --help` for more.")
    p.add_argument("--version", action="version", version=f"vhostnet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the backend on a vhost-user socket", formatter_class=Formatter,
                       description="Listen on a vhost-user Unix socket and serve one QEMU at a time.",
                       epilog=EPILOG_SERVE + "\n" + EPILOG_HOSTNET)
    where = s.add_mutually_exclusive_group()
    where.add_argument("--socket-path", "--socket", dest="socket", metavar="PATH",
                       help=f"vhost-user socket to listen on (default {default_socket()}, "
                            f"or $VHOSTNET_SOCKET)")
    where.add_argument("--fd", type=_fdnum, metavar="FDNUM",
                       help="serve the listening AF_UNIX stream socket the caller opened and "
                            "passed as file descriptor FDNUM, instead of binding a path")
    s.add_argument("--print-capabilities", action="store_true",
                   help='print the backend\'s vhost-user capabilities as JSON ({"type": "net"}) and exit')
    s.add_argument("--once", action="store_true", help="exit when the first QEMU disconnects")
    _add_backend_options(s)
    add_hostnet_options(s)

    r = sub.add_parser("run", help="run the backend and a QEMU guest together", formatter_class=Formatter,
                       usage="vhostnet run [options] [-- QEMU ARGS...]",
                       description="Start the backend and QEMU in one process; stop both together.",
                       epilog=EPILOG_RUN + "\n" + EPILOG_HOSTNET)
    r.add_argument("--socket", metavar="PATH",
                   help="vhost-user socket (default: in a private temporary directory, removed at exit)")
    r.add_argument("--mem", default=qemu.DEFAULT_MEMORY, metavar="SIZE", help="guest RAM (default %(default)s)")
    r.add_argument("--append", default="", metavar="WORDS",
                   help="extra kernel command-line words for the test guest, e.g. 'vhostnet.TCP_ECHO_TEST=0'")
    r.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"],
                   help="accelerator; auto uses KVM if it can really run a guest (default %(default)s)")
    r.add_argument("--image", metavar="DIR",
                   help="test guest image directory (default qemu/build/, qemu/build-arm64/ for virt-aarch64)")
    r.add_argument("--qemu", metavar="BINARY", help="QEMU binary (default: the machine's, e.g. qemu-system-x86_64)")
    r.add_argument("--shell", action="store_true",
                   help="boot the test guest to a shell on the console, network up, tools on PATH")
    _add_machine_options(r)
    r.add_argument("--reconnect", action="store_true",
                   help="run the backend as a child process that is started again whenever it exits, "
                        "and QEMU with reconnect=1 so the guest outlives it (its link goes down and "
                        "comes back); `kill` the backend's pid to restart it")
    _add_backend_options(r)
    add_hostnet_options(r)

    a = sub.add_parser("qemu-args", help="print the QEMU flags that attach a guest", formatter_class=Formatter,
                       description="Print the QEMU flags for shared guest memory and a virtio-net NIC "
                                   "served by a vhostnet backend.", epilog=EPILOG_QEMU_ARGS)
    a.add_argument("--socket", default=default_socket(), metavar="PATH",
                   help="the backend's vhost-user socket (default %(default)s)")
    a.add_argument("--mem", default=qemu.DEFAULT_MEMORY, metavar="SIZE",
                   help="guest RAM, shared with the backend (default %(default)s)")
    a.add_argument("--mac", default=qemu.DEFAULT_MAC, metavar="MAC", help="guest MAC (default %(default)s)")
    _add_machine_options(a)
    a.add_argument("--queues", type=_queue_pairs, default=1, metavar="N",
                   help="queue pairs: -netdev vhost-user,...,queues=N and virtio-net-pci,mq=on "
                        "(serve the backend with --queues N or more). " + QUEUES_NOTE + " (default %(default)s)")
    a.add_argument("--packed", action="store_true",
                   help="packed virtqueues: virtio-net-pci,packed=on (VIRTIO_F_RING_PACKED)")
    a.add_argument("--msix", action="store_true",
                   help="MSI-X: vectors=2N+2 (N = --queues) instead of vectors=0; for KVM only: "
                        "QEMU 7.2 under TCG segfaults when the guest enables MSI-X on a vhost-user NIC")
    a.add_argument("--json", action="store_true", help="print a JSON list of arguments")
    a.add_argument("--reconnect", action="store_true",
                   help=f"add reconnect={qemu.RECONNECT_SECONDS} to the chardev: QEMU keeps the guest "
                        f"when the backend goes and reconnects when it is back")

    d = sub.add_parser("install-discovery", help="write the vhost-user discovery file for management tools",
                       formatter_class=Formatter, epilog=EPILOG_DISCOVERY,
                       description="Write 50-vhostnet.json, the vhost-user backend discovery file "
                                   "(type net) naming vhostnet-backend.")
    dw = d.add_mutually_exclusive_group()
    dw.add_argument("--prefix", metavar="DIR", help="write to DIR/share/qemu/vhost-user (default prefix /usr)")
    dw.add_argument("--sysconf", action="store_true", help="write to /etc/qemu/vhost-user")
    dw.add_argument("--user", action="store_true", help="write to $XDG_CONFIG_HOME/qemu/vhost-user")
    dw.add_argument("--print", action="store_true", help="print the file on stdout; write nothing")
    d.add_argument("--binary", metavar="PATH",
                   help="the backend binary to name (default: the installed vhostnet-backend)")
    d.add_argument("--remove", action="store_true", help="remove the file instead")

    i = sub.add_parser("inspect", help="show rings, indices, features and memory of a running backend",
                       formatter_class=Formatter, epilog=EPILOG_INSPECT,
                       description="Show what the backend knows about the connected guest's virtio-net device.")
    i.add_argument("--queue", type=_index, metavar="N",
                   help="only queue N (0 = rx, 1 = tx; with --queues, pair k is 2k = rxK, 2k+1 = txK)")
    i.add_argument("--desc", type=_index, metavar="N",
                   help="dump the descriptor chain at descriptor N of --queue and decode its frame")
    i.add_argument("--json", action="store_true", help="print JSON (docs/json.md)")
    i.add_argument("--watch", type=_positive_float, metavar="SECONDS", help="repeat every SECONDS until Ctrl-C")
    _add_client_options(i)

    t = sub.add_parser("stats", help="show traffic, drops and the stack's tables", formatter_class=Formatter,
                       epilog=EPILOG_STATS,
                       description="Frames and bytes per direction, drops by reason, ARP table, "
                                   "UDP sockets and TCP connections (like ss -ti).")
    t.add_argument("--json", action="store_true", help="print JSON (docs/json.md); with --watch one document per line")
    t.add_argument("--watch", type=_positive_float, metavar="SECONDS",
                   help="repeat every SECONDS until Ctrl-C, with rates")
    _add_client_options(t)

    c = sub.add_parser("capture", help="capture the guest's frames to pcap", formatter_class=Formatter,
                       epilog=EPILOG_CAPTURE,
                       description="Stream the frames of a running backend's link: to a pcap file "
                                   "with -w, else as one decoded line per frame.")
    c.add_argument("-w", "--write", metavar="FILE", help="write classic pcap to FILE ('-' for stdout)")
    c.add_argument("-c", "--count", type=_count, metavar="N", help="stop after N frames")
    c.add_argument("--print", action="store_true", help="also print a line per frame (to stderr if -w -)")
    c.add_argument("--raw-csum", action="store_true", help="keep partial checksums as they are")
    c.add_argument("--at", choices=["guest", "stack"], default="guest",
                   help="which side of the fault layer: guest (default; as the guest sends and receives) "
                        "or stack (as the stack receives and sends)")
    _add_client_options(c)
    link_cli.add_fault_command(sub, COMMANDS, _add_client_options)
    add_forward_command(sub, _add_client_options, Formatter)
    check_cli.add_check_command(sub, COMMANDS, _add_client_options)
    return p


# -- serve and run ----------------------------------------------------------------

def _fail(msg: str, status: int = 1) -> int:
    print(f"vhostnet: {msg}", file=sys.stderr)
    return status


def cmd_serve(args) -> int:
    import functools
    import logging

    from vhostnet.launch import serve
    from vhostnet.launch.serve import serve_backend
    from vhostnet.logging_setup import setup

    from vhostnet.launch import conventions

    listener = None
    sock_path = args.socket or default_socket()
    if args.fd is not None:
        try:
            listener = conventions.adopt_listener(args.fd)
        except conventions.FdError as e:
            return _fail(str(e), 2)
        bound = conventions.listener_path(listener)
        sock_path = bound or f"fd {args.fd}"
        if bound is None and not args.control and not args.no_control:
            print(f"vhostnet: --fd {args.fd} has no path to put a control socket beside; "
                  f"none opened (give --control PATH for one)", file=sys.stderr)
            args.no_control = True
    setup(args.log_level, args.log_file)
    try:
        cpu, _ = affinity.pin(args.cpu)      # before any thread: they inherit it
    except (ValueError, OSError) as e:
        if listener is not None:
            listener.close()
        return _fail(str(e), 2)
    try:
        server, control, tap = serve.make_backend(args, sock_path, listener=listener)
    except (ValueError, OSError) as e:
        if listener is not None:
            listener.close()    # the one fd we were handed, and may close
        return _fail(str(e), 2 if isinstance(e, ValueError) else 1)
    via = f" (--fd {args.fd})" if args.fd is not None else ""
    print(f"vhostnet: vhost-user socket {sock_path}{via}", file=sys.stderr)
    if control is not None:
        print(f"vhostnet: control socket {control.path} (vhostnet inspect --control {control.path})",
              file=sys.stderr)
    if tap is not None:
        print(f"vhostnet: writing every frame to {args.pcap}", file=sys.stderr)
    if cpu is not None:
        print(f"vhostnet: pinned to CPU {cpu} (--cpu {args.cpu})", file=sys.stderr)
    sys.stderr.flush()
    try:
        kick_hook.run(functools.partial(serve_backend, server, control, tap, handle_signals=True),
                      kick_hook=not args.no_kick_hook)
    except KeyboardInterrupt:
        logging.getLogger("vhostnet").info("interrupted; exiting")
    finally:
        serve.close_listeners(server, control)
    return 0


def cmd_run(args) -> int:
    import functools
    import logging
    import shlex
    import shutil

    from vhostnet.launch import qemu, serve
    from vhostnet.launch import run as launch
    from vhostnet.logging_setup import setup

    extra = args.qemu_args
    try:
        mem = launch.parse_mem(args.mem)
        mac = launch.check_mac(args.mac)
        own = launch.uses_own_boot(extra)
        if own and args.append:
            raise launch.RunError("--append is for the test guest; with your own -kernel, "
                                  "put -append in the QEMU arguments")
        if own and args.shell:
            raise launch.RunError("--shell boots the test guest; it does not go with your own "
                                  "boot arguments")
        if args.shell and not sys.stdin.isatty():
            # Input typed before the guest's shell opens the console is lost,
            # so a pipe of commands would hang; a person at a terminal is fine.
            raise launch.RunError("--shell needs a terminal on stdin (for scripted guests, "
                                  "use vhostnet.NAME=V switches with --append)")
        machine = qemu.machine(args.machine)
        transport = qemu.transport_of(machine, args.transport)
        if not own and not machine.image_arch:
            raise launch.RunError(f"there is no test guest for {machine.name}; boot your own: "
                                  f"vhostnet run --machine {machine.name} -- -kernel ...")
        binary = args.qemu or machine.qemu
        if shutil.which(binary) is None:
            return _fail(f"{binary} not found (install Debian's {machine.package}, e.g. scripts/setup.sh)")
        image = None if own else qemu.find_image(args.image, arch=machine.image_arch)
        if image is not None and image.arch != machine.image_arch:
            raise launch.RunError(f"the {machine.name} machine boots the {machine.image_arch} image, "
                                  f"not {image.arch} ({args.image})")
        if args.shell:
            image = image.with_apps()
        accel = qemu.machine_accel(args.accel, machine) if binary == machine.qemu \
            else qemu.choose_accel(args.accel, binary)
        # Here, so that --reconnect's backend children are not started, and
        # restarted, only to refuse it one after another.
        args.cpu.resolve(os.sched_getaffinity(0))
    except qemu.ImageNotBuilt as e:
        return _fail(f"{e}; or boot your own guest: vhostnet run -- -kernel ... (see --help)")
    except (launch.RunError, ValueError) as e:
        return _fail(str(e), 2)
    setup(args.log_level, args.log_file)
    tmp = None if args.socket else launch.temp_socket_dir()
    sock = args.socket or os.path.join(tmp, "vhost.sock")
    if args.reconnect:
        try:
            return _run_reconnect(args, sock, mem, mac, image, own, accel, binary, machine, transport)
        finally:
            if tmp is not None:
                launch.remove_dir(tmp)
    try:
        try:
            cpu, qemu_cpus = affinity.pin(args.cpu)   # before any thread: they inherit it
            server, control, tap = serve.make_backend(args, sock)
        except (ValueError, OSError) as e:
            return _fail(str(e), 2 if isinstance(e, ValueError) else 1)
        guest_vars = None if own else {"NET": 1, **({"INTERACTIVE": 1} if args.shell else {})}
        argv = qemu.qemu_argv(sock, memory=mem, mac=mac, image=image,
                              guest_vars=guest_vars, append=args.append,
                              extra_args=[*extra, *_test_guest_smp(args, own)], accel=accel, qemu=binary,
                              machine=machine,
                              transport=transport, legacy=args.legacy, queue_pairs=args.queues)
        what = "your QEMU arguments" if own else f"the test guest ({image.kernel.name}, {image.kernel_version})"
        print(f"vhostnet: backend on {sock}; booting {what} on {machine.name} ({transport}) "
              f"with {accel}", file=sys.stderr)
        if control is not None:
            print(f"vhostnet: look inside: vhostnet inspect --control {control.path}", file=sys.stderr)
        if cpu is not None:
            print(f"vhostnet: backend pinned to CPU {cpu} (--cpu {args.cpu}); QEMU on CPUs "
                  f"{affinity.describe(qemu_cpus)}", file=sys.stderr)
        if args.shell:
            print("vhostnet: a shell on the guest's console; leave it (exit) to power off, "
                  "Ctrl-A x quits QEMU", file=sys.stderr)
        sys.stderr.flush()
        logging.getLogger("vhostnet.launch").info("qemu: %s", shlex.join(argv))
        try:
            with launch.raw_terminal(args.shell and sys.stdin.isatty()):
                return kick_hook.run(functools.partial(launch.run_guest, server, control, argv, pcap_tap=tap,
                                                       forward_stdin=sys.stdin.isatty(),
                                                       qemu_cpus=qemu_cpus if cpu is not None else None),
                                     kick_hook=not args.no_kick_hook)
        finally:
            serve.close_listeners(server, control)
    finally:
        if tmp is not None:
            launch.remove_dir(tmp)


def cmd_install_discovery(args) -> int:
    from vhostnet.launch import conventions as cv
    binary = args.binary or cv.find_binary()
    if binary is None and not args.remove:
        return _fail(f"no {cv.BINARY_NAME} found beside this Python or on PATH; install the package "
                     f"(pip install .), or name the binary with --binary PATH")
    try:
        if binary is not None and not args.remove:
            cv.check_binary(binary)
    except ValueError as e:
        return _fail(str(e), 2)
    if args.print:
        print(json.dumps(cv.discovery_doc(binary), indent=2))
        return 0
    directory = cv.discovery_dir(args.prefix, user=args.user, sysconf=args.sysconf)
    path = os.path.join(directory, cv.DISCOVERY_NAME)
    try:
        if args.remove:
            try:
                os.unlink(path)
            except FileNotFoundError:
                print(f"vhostnet: {path} was not there", file=sys.stderr)
                return 0
            print(f"vhostnet: removed {path}", file=sys.stderr)
            return 0
        path = cv.write_discovery(directory, binary)
    except OSError as e:
        hint = " (run as root, or use --user)" if isinstance(e, PermissionError) else ""
        return _fail(f"cannot write {path}: {e.strerror or e}{hint}")
    print(f"vhostnet: wrote {path} (type {cv.BACKEND_TYPE}, binary {binary})", file=sys.stderr)
    return 0


def _test_guest_smp(args, own: bool) -> list[str]:
    """With --queues N the test guest gets N vCPUs: Linux runs min(vCPUs, N) queue pairs.
    Your own guest's -smp is yours to give."""
    return ["-smp", str(args.queues)] if args.queues > 1 and not own else []


def _backend_argv(args, sock: str, start: int) -> list[str]:
    """`vhostnet serve` with run's backend options, for the START-th backend
    of `run --reconnect` (a --pcap file per start: FILE, FILE.1, ...)."""
    argv = [sys.executable, "-m", "vhostnet", "serve", "--socket", sock, "--log-level", args.log_level,
            "--rx-pending", str(args.rx_pending), "--queues", str(args.queues), "--mac", args.mac, "--guest-ip", args.guest_ip,
            "--prefix", str(args.prefix), "--gateway-ip", args.gateway_ip, "--dns-ip", args.dns_ip,
            "--gateway-mac", args.gateway_mac, "--mtu", str(args.mtu)]
    for name in args.disable_feature:
        argv += ["--disable-feature", name]
    for spec in getattr(args, "forward", []):
        argv += ["--forward", spec]
    for flag, on in (("--restrict", "restrict"), ("--no-services", "no_services"),
                     ("--no-map-host-loopback", "no_map_host_loopback"), ("--no-kick-hook", "no_kick_hook"),
                     ("--no-express", "no_express")):
        if getattr(args, on, False):
            argv.append(flag)
    if str(args.cpu) != affinity.NONE:
        argv += ["--cpu", str(args.cpu)]
    for flag, name in (("--max-nat-tcp", "max_nat_tcp"), ("--max-nat-udp", "max_nat_udp")):
        if hasattr(args, name):
            argv += [flag, str(getattr(args, name))]
    fault = getattr(args, "fault", None)
    if fault is not None and fault.active:
        # The same seed for every start, so a restarted backend repeats the pattern.
        argv += ["--fault", str(fault)]
    for flag, value in (("--log-file", args.log_file), ("--control", args.control),
                        ("--pcap", args.pcap and (args.pcap if start == 0 else f"{args.pcap}.{start}"))):
        if value:
            argv += [flag, value]
    if args.no_control:
        argv.append("--no-control")
    if args.raw_csum:
        argv.append("--raw-csum")
    return argv


def _run_reconnect(args, sock, mem, mac, image, own, accel, binary, machine, transport) -> int:
    import functools
    import logging
    import shlex

    import trio

    from vhostnet.launch import qemu
    from vhostnet.launch import run as launch
    from vhostnet.observe.control import default_control_path

    argv = qemu.qemu_argv(sock, memory=mem, mac=mac, image=image,
                          guest_vars=None if own else {"NET": 1}, append=args.append,
                          extra_args=[*args.qemu_args, *_test_guest_smp(args, own)], accel=accel, qemu=binary,
                          machine=machine,
                          transport=transport, legacy=args.legacy, reconnect=qemu.RECONNECT_SECONDS,
                          queue_pairs=args.queues)
    what = "your QEMU arguments" if own else f"the test guest ({image.kernel.name}, {image.kernel_version})"
    print(f"vhostnet: backend on {sock} (restarted whenever it exits); booting {what} with {accel}, "
          f"reconnect={qemu.RECONNECT_SECONDS}", file=sys.stderr)
    if not args.no_control:
        print(f"vhostnet: look inside: vhostnet inspect --control {args.control or default_control_path(sock)}",
              file=sys.stderr)
    sys.stderr.flush()
    logging.getLogger("vhostnet.launch").info("qemu: %s", shlex.join(argv))
    return trio.run(functools.partial(launch.run_guest_reconnect, functools.partial(_backend_argv, args, sock),
                                      sock, argv, forward_stdin=sys.stdin.isatty()))


def cmd_qemu_args(args) -> int:
    import shlex

    from vhostnet.launch import qemu
    from vhostnet.launch.run import RunError, attach_flags, machine_note
    try:
        flags = attach_flags(args.socket, args.mem, args.mac, args.machine, args.transport, args.legacy,
                             reconnect=qemu.RECONNECT_SECONDS if args.reconnect else None,
                             queue_pairs=args.queues, packed=args.packed, msix=args.msix)
    except RunError as e:
        return _fail(str(e), 2)
    print(machine_note(args.machine), file=sys.stderr)
    print(json.dumps(flags) if args.json else shlex.join(flags))
    return 0


# -- the looking-inside tools --------------------------------------------------------

def _control_path(args) -> str:
    from vhostnet.observe.control import default_control_path
    if args.control:
        return args.control
    return default_control_path(args.socket or default_socket())


def _watch(interval: float | None, once, header: bool = True) -> int:
    """Call ONCE() (it prints, returns a status); with INTERVAL, again until Ctrl-C.

    On a terminal the screen is redrawn; otherwise each round starts with a
    header line (unless HEADER is false: JSON, one document per line)."""
    if interval is None:
        return once()
    clear = sys.stdout.isatty()
    try:
        while True:
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            if header:
                print(f"--- {time.strftime('%H:%M:%S')}, every {interval:g} s (Ctrl-C to stop)")
            status = once()
            sys.stdout.flush()
            if status not in (0, EXIT_NO_QEMU):
                return status
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def _print_json(doc, watch: bool) -> None:
    print(json.dumps(doc, separators=(",", ":")) if watch else json.dumps(doc, indent=2))


def cmd_inspect(args) -> int:
    from vhostnet.observe.control import ControlClient, ControlError
    from vhostnet.observe.render import desc_text, inspect_text
    if args.desc is not None and args.queue is None:
        return _fail("--desc needs --queue (0 = rx, 1 = tx)", 2)
    try:
        with ControlClient(_control_path(args)) as c:
            def once() -> int:
                if args.desc is not None:
                    try:
                        doc = c.request("desc", queue=args.queue, head=args.desc)
                    except ControlError as e:
                        if str(e).startswith("no QEMU"):
                            print(f"vhostnet: {e}")
                            return EXIT_NO_QEMU
                        raise
                    _print_json(doc, args.watch) if args.json else print(desc_text(doc))
                    return 0
                doc = c.request("inspect")
                if doc["connected"] and args.queue is not None:
                    names = [f"{q['index']}={q['name']}" for q in doc["queues"]]
                    doc["queues"] = [q for q in doc["queues"] if q["index"] == args.queue]
                    if not doc["queues"]:
                        raise ControlError(f"no queue {args.queue}; queues: {', '.join(names)}")
                _print_json(doc, args.watch) if args.json else print(inspect_text(doc))
                return 0 if doc["connected"] else EXIT_NO_QEMU
            return _watch(args.watch, once, header=not args.json)
    except ControlError as e:
        return _fail(str(e))


def cmd_stats(args) -> int:
    from vhostnet.observe.control import ControlClient, ControlError
    from vhostnet.observe.render import stats_text
    prev = {}
    try:
        with ControlClient(_control_path(args)) as c:
            def once() -> int:
                doc = c.request("stats")
                _print_json(doc, args.watch) if args.json else print(stats_text(doc, prev.get("doc")))
                prev["doc"] = doc
                return 0 if doc["connected"] else EXIT_NO_QEMU
            return _watch(args.watch, once, header=not args.json)
    except ControlError as e:
        return _fail(str(e))


def cmd_capture(args) -> int:
    from vhostnet.observe.control import ControlClient, ControlError
    from vhostnet.observe.decode import summarize
    from vhostnet.observe.pcap import PcapWriter

    to_stdout = args.write == "-"
    lines = sys.stderr if to_stdout else sys.stdout
    show = args.print or not args.write
    writer = None
    frames = dropped = 0
    ended = "interrupted"
    try:
        with ControlClient(_control_path(args)) as c:
            c.send({"cmd": "capture", "count": args.count, "raw_csum": args.raw_csum, "at": args.at})
            reply = c.read()
            if reply is None or not reply.get("ok"):
                raise ControlError(reply.get("error", "capture refused") if reply else
                                   "the backend closed the connection")
            if args.write:
                try:
                    f = sys.stdout.buffer if to_stdout else open(args.write, "wb")
                except OSError as e:
                    return _fail(f"cannot write {args.write}: {e.strerror or e}")
                writer = PcapWriter(f)
                writer.flush()
            if not to_stdout:
                print(f"vhostnet: capturing on {c.path}" + (f" to {args.write}" if args.write else "")
                      + (f", {args.count} frames" if args.count else ", Ctrl-C to stop"), file=sys.stderr)
            c.sock.settimeout(None)
            try:
                while True:
                    msg = c.read()
                    if msg is None:
                        ended = "the backend went away"
                        break
                    if "end" in msg:
                        dropped = msg["end"].get("dropped", 0)
                        ended = "done" if msg["end"].get("reason") == "count" else "the backend stopped"
                        break
                    fr = msg.get("frame")
                    if fr is None:
                        continue
                    data = c.read_bytes(fr["len"])
                    frames += 1
                    if writer is not None:
                        writer.write(data, fr["ts"])
                        writer.flush()
                    if show:
                        stamp = time.strftime("%H:%M:%S", time.localtime(fr["ts"]))
                        usec = int((fr["ts"] % 1) * 1e6)
                        print(f"{stamp}.{usec:06d} {fr['dir']} {summarize(data)}", file=lines, flush=True)
            except KeyboardInterrupt:
                pass
    except ControlError as e:
        return _fail(str(e))
    except BrokenPipeError:
        return 0
    finally:
        if writer is not None and not to_stdout:
            writer.close()
    where = f" to {args.write}" if args.write and not to_stdout else ""
    print(f"vhostnet: {frames} frame(s){where}"
          + (f", {dropped} dropped by the backend (this client was too slow)" if dropped else "")
          + ("" if ended in ("done", "interrupted") else f"; {ended}"), file=sys.stderr)
    return 0   # the backend ending (e.g. `vhostnet run` finished) ends a capture normally


def cmd_forward(args) -> int:
    from vhostnet.hostnet.options import cmd_forward as run
    return run(args, _control_path(args))


COMMANDS = {"serve": cmd_serve, "run": cmd_run, "qemu-args": cmd_qemu_args,
            "install-discovery": cmd_install_discovery,
            "inspect": cmd_inspect, "stats": cmd_stats, "capture": cmd_capture,
            "forward": cmd_forward}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    if argv[:1] == ["serve"] and "--print-capabilities" in argv:
        # The convention: print them and exit 0, whatever else is on the line.
        from vhostnet.launch.conventions import capabilities
        print(json.dumps(capabilities()))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and args.command != "run":
        parser.error(f"only `vhostnet run` takes QEMU arguments after --, not `{args.command}`")
    args.qemu_args = extra
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130


def backend_main(argv=None) -> int:
    """`vhostnet-backend`: `vhostnet serve` under the name management tools run
    (the discovery file's "binary"), so `vhostnet-backend --fd 3` just works."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["serve", *argv])
