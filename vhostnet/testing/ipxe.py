"""iPXE in QEMU with its NIC on a vhostnet backend, watched from the backend.

iPXE's virtio-net driver is the boot-loader case of the device: 8 RX chains
sharing one header buffer, polling with interrupts off, a device reset on
close (FACTS.md).  Debian's `ipxe` package ships /usr/lib/ipxe/ipxe.lkrn, an
iPXE with every driver built in, in Linux kernel format: QEMU boots it with
-kernel (SeaBIOS's linuxboot ROM), and the -initrd is registered as an image
that iPXE runs first, so a file starting with `#!ipxe` is its script.  The
NIC keeps `romfile=` (qemu.nic_args): the iPXE we test is the lkrn's, not the
option ROM's.

That build's console is VGA only: nothing reaches -serial.  So the script
proves what it did through the backend instead:

    #!ipxe
    dhcp
    chain tftp://10.0.2.2/lease-${net0/ip}-${net0/netmask}-${net0/gateway}-${net0/dns}.ipxe

iPXE expands the settings its DHCP client stored from our lease into the
file name, then fetches it over TFTP from the backend's own server (--tftp,
a directory holding only that one name).  The backend counting one completed
transfer and no refusal means iPXE held exactly the lease's address,
netmask, router and DNS server, and sent from that address.  The served
script runs `shell`, so iPXE sits at its prompt (polling the NIC) while the
test reads the backend's stats; `ipxe_session()` then ends QEMU and the
backend.

iPXE's `dhcp` returns only when every configurator of the NIC is done, and
its IPv6 one starts with it: a router solicitation, which the stack answers
with an advertisement that there is no IPv6 router (stack/wire/ndp.py), so
`dhcp` returns as soon as the lease is bound (about 3 s under TCG; without
the answer iPXE retransmits for about 16 s).

    with ipxe_session(script, tftp_files) as q:
        stats = q.wait_stats(lambda s: s["services"]["tftp"]["completed"] >= 1)

QEMU's process and the backend are uboot.py's (`UBoot` is only used as the
QEMU process holder here, its console buffer collects QEMU's own messages,
e.g. a fallback on userspace virtio; `Backend` is `vhostnet serve --once`).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from vhostnet.launch import qemu
from vhostnet.testing.uboot import (GATEWAY, Backend, UBoot, UBootError, check_fallback,
                                    end_session)

IPXE_LKRN = Path("/usr/lib/ipxe/ipxe.lkrn")
IPXE_PACKAGE = "ipxe"
SCRIPT_MAGIC = "#!ipxe"            # iPXE's script image signature (first line)
STATS_POLL = 0.1                   # seconds between stats requests while waiting
WAIT_TIMEOUT = 90.0                # seconds: boot + DHCP under a loaded TCG host

# The lease as iPXE's settings spell it, in the name the script asks for.
LEASE_FILE_TEMPLATE = ("lease-${net0/ip}-${net0/netmask}-${net0/gateway}-${net0/dns}.ipxe")


class IpxeError(UBootError):
    """iPXE (or the backend under it) did not do what the script asked."""


def lkrn() -> Path:
    """Debian's ipxe.lkrn, or IpxeError naming the package."""
    if not IPXE_LKRN.is_file():
        raise IpxeError(f"{IPXE_LKRN} is missing (install Debian's {IPXE_PACKAGE}; scripts/setup.sh)")
    return IPXE_LKRN


def script(*lines: str) -> str:
    """An iPXE script image: the signature line, then LINES."""
    return "\n".join((SCRIPT_MAGIC, *lines)) + "\n"


def dhcp_then_tftp_script(server: str = GATEWAY) -> str:
    """`dhcp`, then fetch and run the lease-named file from SERVER's TFTP."""
    return script("dhcp", f"chain tftp://{server}/{LEASE_FILE_TEMPLATE}")


def lease_file_name(ip: str, netmask: str, gateway: str, dns: str) -> str:
    """The name LEASE_FILE_TEMPLATE expands to for that lease."""
    return f"lease-{ip}-{netmask}-{gateway}-{dns}.ipxe"


def ipxe_argv(socket: str, initrd: Path, *, legacy: bool | None = None,
              memory: str = qemu.DEFAULT_MEMORY, mac: str = qemu.DEFAULT_MAC) -> list[str]:
    """QEMU (q35, TCG) booting ipxe.lkrn with INITRD as its script.

    No display, no monitor, -serial stdio (empty with Debian's build, kept
    so a build with a serial console shows up in the log), -no-reboot so a
    `reboot` or a triple fault ends QEMU.
    """
    m = qemu.machine("q35")
    return [m.qemu, *qemu.accel_args("tcg", m), *qemu.memory_args(memory, m),
            "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-no-reboot", *qemu.nic_args(socket, mac, "vhost-user", "pci", legacy),
            "-kernel", str(lkrn()), "-initrd", str(initrd)]


class Ipxe:
    """One QEMU running iPXE on one backend; what the backend saw."""

    def __init__(self, proc: UBoot, backend: Backend):
        self.proc = proc                # QEMU (uboot.UBoot as a process holder)
        self.backend = backend
        self.t0 = time.monotonic()

    def wait_stats(self, done: Callable[[dict], bool], timeout: float = WAIT_TIMEOUT) -> dict:
        """Poll the backend's `stats` until DONE(stats); the stats.

        Raises IpxeError when QEMU exits first or TIMEOUT passes, with the
        last stats' services and the backend log's tail.
        """
        deadline = time.monotonic() + timeout
        last: dict = {}
        while True:
            with contextlib.suppress(OSError):     # the control socket is up once QEMU connects
                last = self.backend.request("stats")
                if done(last):
                    return last
            if self.proc.proc.poll() is not None or time.monotonic() > deadline:
                why = ("QEMU exited" if self.proc.proc.poll() is not None
                       else f"{timeout:.0f} s passed")
                raise IpxeError(f"{why} before the backend saw iPXE finish; services: "
                                f"{last.get('services')}\nQEMU: {self.proc.tail()}\n"
                                f"backend log:\n{self.backend.text()[-2000:]}")
            time.sleep(STATS_POLL)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


@contextlib.contextmanager
def ipxe_session(script_text: str, tftp_files: Mapping[str, str] | None = None, *,
                 legacy: bool | None = None, backend_args: Sequence[str] = (),
                 workdir: Path | None = None) -> Iterator[Ipxe]:
    """A backend (serving TFTP_FILES from a fresh --tftp directory) and QEMU
    running ipxe.lkrn with SCRIPT_TEXT as its initrd.  Logs (qemu.cmd,
    console.log, backend.log, script.ipxe) go to WORKDIR when given."""
    tmp = Path(tempfile.mkdtemp(prefix="vhostnet-ipxe-"))      # short path for AF_UNIX
    logs = workdir or tmp
    logs.mkdir(parents=True, exist_ok=True)
    sock = tmp / "vhost.sock"
    tftp = tmp / "tftp"
    tftp.mkdir()
    for name, text in (tftp_files or {}).items():
        (tftp / name).write_text(text)
    initrd = logs / "script.ipxe"
    initrd.write_text(script_text)
    backend = proc = None
    try:
        argv = ipxe_argv(str(sock), initrd, legacy=legacy)
        if shutil.which(argv[0]) is None:
            raise IpxeError(f"{argv[0]} not found (Debian package {qemu.machine('q35').package})")
        (logs / "qemu.cmd").write_text(qemu.format_argv(argv) + "\n")
        backend = Backend(sock, logs / "backend.log", ["--tftp", str(tftp), *backend_args])
        proc = UBoot(argv, logs / "console.log", backend)
        yield Ipxe(proc, backend)
        check_fallback(proc, IpxeError)
    finally:
        end_session(proc, backend, tmp, IpxeError)
