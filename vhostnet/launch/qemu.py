"""QEMU command lines for a guest whose NIC is a vhostnet backend.

Three things live here, for the smoke runner (qemu/smoke.py), the tests and
later the CLI:

- `qemu_argv()` builds the argv of a qemu-system-x86_64 whose virtio-net NIC
  is served over vhost-user (or, for checking the guest image alone, by
  QEMU's own user-mode network).  Each group of flags is built by a small
  function whose docstring says why the flags are there: most of them work
  around a trap of vhost-user with QEMU 7.2.
- `kvm_usable()` says whether KVM can really run a guest.  An openable
  /dev/kvm is not enough: some hosts expose one on which every fresh guest
  page costs a slow exit, so Linux needs minutes to boot.  We boot a tiny
  probe kernel with a deadline instead, and cache the answer.
- `find_image()` locates the test guest built by scripts/build-guest.sh.

Nothing here starts QEMU for the caller; this module only knows flags.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

QEMU = "qemu-system-x86_64"
DEFAULT_MAC = "52:54:00:12:34:56"   # QEMU's own default; the backend's default too
DEFAULT_MEMORY = "256M"
REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO_ROOT / "qemu" / "build"

# Kernel command line for our image: serial console; a panic (e.g. init dying)
# powers off at once rather than hanging until the runner's timeout;
# loglevel=4 keeps the kernel's chatter to warnings and worse.
BASE_APPEND = "console=ttyS0 panic=-1 loglevel=4"


# --- the guest image ---------------------------------------------------------

class ImageNotBuilt(FileNotFoundError):
    pass


@dataclass(frozen=True)
class GuestImage:
    """The test guest: kernel (ELF vmlinux, or bzImage) and initramfs.

    INITRD_APPS is the initramfs with the applications (iperf3, redis-cli,
    git) appended, when the build made one (see with_apps())."""
    kernel: Path
    initrd: Path
    kernel_version: str = ""
    inputs: str = ""        # hash of the build inputs, from image.env
    initrd_apps: Path | None = None
    arch: str = "amd64"

    def with_apps(self) -> "GuestImage":
        """This image booting the initramfs that carries the applications."""
        if self.initrd_apps is None:
            raise ImageNotBuilt(f"the {self.arch} guest image has no applications archive "
                                f"(initramfs-apps.cpio; rebuild: make guest)")
        return dataclasses.replace(self, initrd=self.initrd_apps)


def find_image(directory: str | os.PathLike | None = None) -> GuestImage:
    """Return the image built by scripts/build-guest.sh (`make guest`).

    Looks in DIRECTORY, else $VHOSTNET_GUEST_DIR, else qemu/build/ of this
    checkout, and reads the image.env manifest the build writes last (so a
    half-finished build is never picked up).  Raises ImageNotBuilt otherwise.
    """
    d = Path(directory or os.environ.get("VHOSTNET_GUEST_DIR") or IMAGE_DIR)
    manifest = d / "image.env"
    if not manifest.is_file():
        raise ImageNotBuilt(f"no guest image in {d} (build it with `make guest` "
                            f"or scripts/build-guest.sh)")
    env = dict(line.split("=", 1) for line in manifest.read_text().splitlines() if "=" in line)
    image = GuestImage(kernel=Path(env["KERNEL"]), initrd=Path(env["INITRD"]),
                       kernel_version=env.get("KERNEL_VERSION", ""), inputs=env.get("INPUTS", ""),
                       initrd_apps=Path(env["INITRD_APPS"]) if env.get("INITRD_APPS") else None,
                       arch=env.get("ARCH", "amd64"))
    for p in (image.kernel, image.initrd, *filter(None, [image.initrd_apps])):
        if not p.is_file():
            raise ImageNotBuilt(f"{manifest} names {p}, which is missing (rebuild: make guest)")
    return image


# --- KVM detection -----------------------------------------------------------

# qemu/kvm-probe.S assembled (gcc -c + objcopy -O binary): a multiboot kernel
# that enters long mode, writes 64 MiB of fresh memory, prints "kvm-probe: ok"
# on COM1 and exits QEMU with status 33 through isa-debug-exit.
KVM_PROBE = bytes.fromhex(
    "02b0ad1b00000100fe4f51e40000100000001000000000000000000020001000"
    "bf0000010031c0b9000c0000f3abc7050000010003100100c705001001000320"
    "0100bf00200100b883000000b9000200008907050000200083c708e2f40f20e0"
    "83c8200f22e0b8000001000f22d8b9800000c00f320d000100000f300f20c00d"
    "010000800f22c00f0115e8001000ea95001000080048c7c70000400048c7c100"
    "000004b05af3aa488d351600000066baf803ac84c07403eeebf866baf400b010"
    "eef4ebfd6b766d2d70726f62653a206f6b0a000f1f4400000000000000000000"
    "ffff0000009aaf000f00d8001000")
KVM_PROBE_EXIT = 33
KVM_PROBE_DEADLINE = 5.0    # seconds; real KVM needs < 1, a slow-exit KVM ~20


@dataclass(frozen=True)
class KvmVerdict:
    usable: bool
    reason: str
    seconds: float = 0.0


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vhostnet" / "kvm-probe.json"


def _cache_key(qemu_path: str) -> str:
    """What the verdict depends on: this boot of the host, the QEMU binary,
    the /dev/kvm device node and the probe itself."""
    parts = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        parts.append("?")
    st = os.stat(qemu_path)
    parts += [qemu_path, str(st.st_size), str(st.st_mtime_ns)]
    try:
        parts.append(str(os.stat("/dev/kvm").st_rdev))
    except OSError:
        parts.append("no-kvm")
    parts.append(hashlib.sha256(KVM_PROBE).hexdigest()[:16])
    return "|".join(parts)


def probe_kvm(qemu: str = QEMU, deadline: float = KVM_PROBE_DEADLINE) -> KvmVerdict:
    """Boot the KVM probe under -accel kvm and see whether it finishes in time.

    Uncached; use kvm_usable().  Costs at most DEADLINE seconds.
    """
    qemu_path = shutil.which(qemu)
    if qemu_path is None:
        return KvmVerdict(False, f"{qemu} not found")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmVerdict(False, "/dev/kvm is missing or not accessible")
    with tempfile.TemporaryDirectory(prefix="vhostnet-kvm-") as tmp:
        probe = Path(tmp) / "kvm-probe.bin"
        probe.write_bytes(KVM_PROBE)
        argv = [qemu_path, "-accel", "kvm", "-M", "q35", "-m", "128M", "-nodefaults",
                "-display", "none", "-no-reboot", "-serial", "stdio",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(probe)]
        t0 = time.monotonic()
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=deadline)
        except subprocess.TimeoutExpired:
            return KvmVerdict(False, f"the KVM probe did not finish within {deadline:.0f} s "
                                     f"(KVM is present but too slow to boot a kernel)", deadline)
        secs = time.monotonic() - t0
    out = r.stdout.decode(errors="replace")
    if r.returncode == KVM_PROBE_EXIT and "kvm-probe: ok" in out:
        return KvmVerdict(True, f"the KVM probe ran in {secs:.2f} s", secs)
    err = r.stderr.decode(errors="replace").strip().splitlines()
    return KvmVerdict(False, f"the KVM probe failed (exit {r.returncode}): "
                             f"{err[-1] if err else out.strip()[-200:]}", secs)


@functools.cache
def kvm_verdict(qemu: str = QEMU) -> KvmVerdict:
    """probe_kvm(), cached in this process and on disk (~/.cache/vhostnet/)
    until the host reboots or QEMU changes."""
    qemu_path = shutil.which(qemu)
    if qemu_path is None:
        return KvmVerdict(False, f"{qemu} not found")
    key = _cache_key(qemu_path)
    cache = _cache_file()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return KvmVerdict(cached["usable"], cached["reason"] + " (cached)", cached["seconds"])
    except (OSError, ValueError, KeyError):
        pass
    verdict = probe_kvm(qemu)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "usable": verdict.usable,
                                   "reason": verdict.reason, "seconds": verdict.seconds}))
        tmp.replace(cache)
    except OSError:
        pass    # no writable cache: probe again next time
    return verdict


def kvm_usable(qemu: str = QEMU) -> bool:
    """True if QEMU can run a guest with KVM at a useful speed (cached)."""
    return kvm_verdict(qemu).usable


def choose_accel(accel: str = "auto", qemu: str = QEMU) -> str:
    """"kvm" or "tcg".  ACCEL "auto" (or $VHOSTNET_ACCEL, if set) probes."""
    accel = os.environ.get("VHOSTNET_ACCEL", accel) if accel == "auto" else accel
    if accel not in ("auto", "kvm", "tcg"):
        raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
    if accel == "auto":
        return "kvm" if kvm_usable(qemu) else "tcg"
    return accel


# --- command-line pieces -----------------------------------------------------

def accel_args(accel: str) -> list[str]:
    """CPU and accelerator.

    KVM passes the host CPU through (-cpu host).  TCG keeps QEMU's default
    qemu64 model: `-cpu max` would make TCG emulate extra features for no
    gain.  One vCPU: the tests are about the NIC, and single-threaded TCG is
    the most deterministic.
    """
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg"]


def memory_args(size: str = DEFAULT_MEMORY) -> list[str]:
    """Guest RAM as a shared memfd.

    vhost-user backends map guest RAM from file descriptors QEMU sends them
    (SET_MEM_TABLE), so the RAM must live in an fd-backed, MAP_SHARED object:
    memory-backend-memfd with share=on.  q35's memory-backend= makes it the
    machine's main RAM.  Without share=on the backend would map a private
    copy and never see the rings move.
    """
    return ["-object", f"memory-backend-memfd,id=mem,size={size},share=on",
            "-M", "q35,memory-backend=mem", "-m", size]


def nic_args(socket: str | os.PathLike | None, mac: str = DEFAULT_MAC,
             netdev: str = "vhost-user") -> list[str]:
    """The virtio-net NIC and what serves it.

    netdev "vhost-user": the NIC's queues are served by the backend listening
    on SOCKET (we are the server, QEMU connects as the client).
    netdev "user": QEMU's slirp instead; used to check the guest image on its
    own, as it answers ARP and ping for 10.0.2.2 like our backend does.

    Device options:
    - vectors=0: no MSI-X.  QEMU 7.2 under TCG segfaults when the guest
      driver enables MSI-X on a vhost-user virtio-net device; with no vectors
      the driver falls back to a legacy INTx interrupt, which works.
    - romfile=: no iPXE option ROM; we boot a kernel directly, and the ROM
      would only slow SeaBIOS down.
    - mac=: pinned so the guest's MAC is known to the backend and the logs.
    """
    if netdev == "vhost-user":
        if socket is None:
            raise ValueError("a vhost-user NIC needs the backend's socket path")
        backend = ["-chardev", f"socket,id=chr0,path={os.fspath(socket)}",
                   "-netdev", "vhost-user,id=net0,chardev=chr0"]
    elif netdev == "user":
        backend = ["-netdev", "user,id=net0"]
    else:
        raise ValueError(f"netdev must be vhost-user or user, not {netdev!r}")
    return backend + ["-device", f"virtio-net-pci,netdev=net0,mac={mac},vectors=0,romfile="]


def console_args() -> list[str]:
    """Serial console on stdio, nothing else.

    -nodefaults drops QEMU's default devices (VGA, floppy, CD-ROM and, above
    all, the default NIC, which would become eth0 instead of ours).
    -nographic: no window; -serial mon:stdio puts the guest's ttyS0 on
    QEMU's stdout (what the smoke runner reads) with the monitor one Ctrl-A c
    away for a person at a terminal.  -no-reboot turns a guest reboot or
    triple fault into QEMU exiting, so a crash cannot loop.
    """
    return ["-nodefaults", "-nographic", "-serial", "mon:stdio", "-no-reboot"]


def kernel_append(guest_vars: Mapping[str, object] | None = None, append: str = "") -> str:
    """The kernel command line: BASE_APPEND, then each guest variable as
    vhostnet.NAME=VALUE (qemu/init reads them from /proc/cmdline), then APPEND."""
    words = [BASE_APPEND]
    words += [f"vhostnet.{k}={v}" for k, v in (guest_vars or {}).items()]
    if append:
        words.append(append)
    return " ".join(words)


def boot_args(image: GuestImage, append: str) -> list[str]:
    """Direct kernel boot.  An ELF vmlinux boots through its PVH note, which
    skips both the firmware's disk boot and the bzImage decompressor."""
    return ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append]


def qemu_argv(socket: str | os.PathLike | None = None, *,
              netdev: str = "vhost-user",
              memory: str = DEFAULT_MEMORY,
              mac: str = DEFAULT_MAC,
              image: GuestImage | None = None,
              guest_vars: Mapping[str, object] | None = None,
              append: str = "",
              extra_args: Iterable[str] = (),
              accel: str = "auto",
              qemu: str = QEMU) -> list[str]:
    """The full argv of a QEMU guest whose NIC is served on SOCKET.

    With IMAGE (see find_image) QEMU boots our test kernel and initramfs,
    with GUEST_VARS (e.g. {"NET": 1}) and APPEND on the kernel command line.
    Without it, EXTRA_ARGS must say what to boot (e.g. a disk image).
    EXTRA_ARGS are appended last either way.  ACCEL is "kvm", "tcg" or
    "auto" (KVM when kvm_usable()).
    """
    argv = [qemu, *accel_args(choose_accel(accel, qemu)), *memory_args(memory),
            *console_args(), *nic_args(socket, mac, netdev)]
    if image is not None:
        argv += boot_args(image, kernel_append(guest_vars, append))
    elif guest_vars or append:
        raise ValueError("guest_vars and append need an image to boot")
    argv += list(extra_args)
    return argv


def format_argv(argv: Sequence[str]) -> str:
    """ARGV as a shell command line, one option per line, for logs and docs."""
    out, line = [], [shlex.quote(argv[0])]
    for a in argv[1:]:
        if a.startswith("-") and line:
            out.append(" ".join(line))
            line = []
        line.append(shlex.quote(a))
    out.append(" ".join(line))
    return " \\\n    ".join(out)
