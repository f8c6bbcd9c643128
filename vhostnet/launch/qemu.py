"""QEMU command lines for a guest whose NIC is a vhostnet backend.

Four things live here, for the smoke runner (qemu/smoke.py), the tests,
vhostnet/testing/uboot.py and the CLI (`run`, `qemu-args`):

- `MACHINES`: the boards a driver writer's guest runs on (q35; the `virt`
  boards of aarch64 and riscv64), each with its QEMU binary and Debian
  package, its virtio transports (pci, mmio) and its console.
- `qemu_argv()` builds the argv of a QEMU whose virtio-net NIC is served over
  vhost-user (or, for checking the guest image alone, by QEMU's own
  user-mode network), on a machine and transport, legacy or modern.  Each
  group of flags is built by a small function whose docstring says why the
  flags are there: most of them work around a trap of vhost-user with QEMU
  7.2.
- `kvm_usable()` says whether KVM can really run a guest.  An openable
  /dev/kvm is not enough: some hosts expose one on which every fresh guest
  page costs a slow exit, so Linux needs minutes to boot.  We boot a tiny
  probe kernel with a deadline instead, and cache the answer.
- `find_image()` locates the test guest built by scripts/build-guest.sh
  (amd64 in qemu/build/, arm64 in qemu/build-arm64/).

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


def find_image(directory: str | os.PathLike | None = None, arch: str = "amd64") -> GuestImage:
    """Return the image built by scripts/build-guest.sh (`make guest`).

    Looks in DIRECTORY, else (for amd64) $VHOSTNET_GUEST_DIR, else
    qemu/build/ of this checkout (qemu/build-ARCH/ for another ARCH), and
    reads the image.env manifest the build writes last (so a half-finished
    build is never picked up).  Raises ImageNotBuilt otherwise.
    """
    env_dir = os.environ.get("VHOSTNET_GUEST_DIR") if arch == "amd64" else None
    d = Path(directory or env_dir or image_dir(arch))
    manifest = d / "image.env"
    if not manifest.is_file():
        build = "make guest" if arch == "amd64" else f"GUEST_ARCH={arch} scripts/build-guest.sh"
        raise ImageNotBuilt(f"no {arch} guest image in {d} (build it with `{build}`)")
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


# --- machines ----------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    """A QEMU machine that a guest's NIC can sit on, and how to drive it.

    TRANSPORTS lists the virtio transports the machine has, the default
    first: q35 only has PCI; the `virt` boards have 32 virtio-mmio slots
    (what most hobby kernels drive) and a PCIe host bridge.
    """
    name: str                   # our name: q35, virt-aarch64, virt-riscv64
    qemu: str                   # the QEMU binary
    package: str                # the Debian package that has it
    qemu_machine: str           # QEMU's -M name
    transports: tuple[str, ...]
    console: str                # the kernel's serial console device
    tcg_cpu: tuple[str, ...] = ()   # -cpu for TCG when QEMU's default does not fit
    image_arch: str = ""        # the test image (scripts/build-guest.sh GUEST_ARCH) it boots
    host_arch: str = ""         # `uname -m` of hosts where KVM can run it

    @property
    def default_transport(self) -> str:
        return self.transports[0]


MACHINES = {m.name: m for m in [
    Machine("q35", "qemu-system-x86_64", "qemu-system-x86", "q35", ("pci",), "ttyS0",
            image_arch="amd64", host_arch="x86_64"),
    # virt's default CPU is the 32-bit cortex-a15; a 64-bit kernel needs an
    # ARMv8 one.  cortex-a57 rather than max: TCG emulates fewer extensions.
    Machine("virt-aarch64", "qemu-system-aarch64", "qemu-system-arm", "virt", ("mmio", "pci"),
            "ttyAMA0", tcg_cpu=("-cpu", "cortex-a57"), image_arch="arm64", host_arch="aarch64"),
    # QEMU loads its bundled OpenSBI as the riscv virt machine's firmware.
    Machine("virt-riscv64", "qemu-system-riscv64", "qemu-system-misc", "virt", ("mmio", "pci"),
            "ttyS0", host_arch="riscv64"),
]}
DEFAULT_MACHINE = MACHINES["q35"]


def machine(name: str | Machine) -> Machine:
    """The Machine called NAME (ValueError listing the known ones)."""
    if isinstance(name, Machine):
        return name
    try:
        return MACHINES[name]
    except KeyError:
        raise ValueError(f"machine must be one of {', '.join(MACHINES)}, not {name!r}") from None


_as_machine = machine     # for functions whose `machine` parameter hides it


def transport_of(m: Machine, transport: str | None) -> str:
    """TRANSPORT checked against M (its default when None)."""
    if transport is None:
        return m.default_transport
    if transport not in m.transports:
        raise ValueError(f"the {m.name} machine has no {transport} transport "
                         f"(it has {', '.join(m.transports)})")
    return transport


def image_dir(arch: str = "amd64") -> Path:
    """Where scripts/build-guest.sh puts the image for GUEST_ARCH=ARCH."""
    return IMAGE_DIR if arch == "amd64" else IMAGE_DIR.with_name(f"build-{arch}")


# --- command-line pieces -----------------------------------------------------

def accel_args(accel: str, m: Machine = DEFAULT_MACHINE) -> list[str]:
    """CPU and accelerator.

    KVM passes the host CPU through (-cpu host).  TCG keeps QEMU's default
    model where it fits (qemu64 on x86: `-cpu max` would make TCG emulate
    extra features for no gain), else the machine's TCG_CPU.  One vCPU: the
    tests are about the NIC, and single-threaded TCG is the most
    deterministic.
    """
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg", *m.tcg_cpu]


def machine_accel(accel: str, m: Machine) -> str:
    """choose_accel() for machine M: a guest of another architecture than
    the host's always runs under TCG; "kvm" for it is refused."""
    if m.host_arch == os.uname().machine:
        return choose_accel(accel, m.qemu)
    if accel == "kvm":
        raise ValueError(f"KVM cannot run a {m.name} guest on this {os.uname().machine} host")
    return "tcg"


def memory_args(size: str = DEFAULT_MEMORY, m: Machine = DEFAULT_MACHINE) -> list[str]:
    """Guest RAM as a shared memfd.

    vhost-user backends map guest RAM from file descriptors QEMU sends them
    (SET_MEM_TABLE), so the RAM must live in an fd-backed, MAP_SHARED object:
    memory-backend-memfd with share=on.  The machine's memory-backend= (q35
    and virt alike) makes it the machine's main RAM.  Without share=on the
    backend would map a private copy and never see the rings move.
    """
    return ["-object", f"memory-backend-memfd,id=mem,size={size},share=on",
            "-M", f"{m.qemu_machine},memory-backend=mem", "-m", size]


#: QEMU's -chardev socket reconnect=SECONDS for `--reconnect`: QEMU retries
#: that often while the backend is away (1 s is the smallest it takes).
RECONNECT_SECONDS = 1


def nic_args(socket: str | os.PathLike | None, mac: str = DEFAULT_MAC,
             netdev: str = "vhost-user", transport: str = "pci",
             legacy: bool | None = None, pci_slot: int | None = None,
             queue_size: int | None = None, reconnect: int | None = None,
             packed: bool = False, queue_pairs: int = 1, msix: bool = False) -> list[str]:
    """The virtio-net NIC and what serves it.

    netdev "vhost-user": the NIC's queues are served by the backend listening
    on SOCKET (we are the server, QEMU connects as the client).
    netdev "user": QEMU's slirp instead; used to check the guest image on its
    own, as it answers ARP and ping for 10.0.2.2 like our backend does.

    TRANSPORT "pci" is virtio-net-pci; "mmio" is virtio-net-device, which
    QEMU puts in the first free virtio-mmio slot of a `virt` board.

    LEGACY: None keeps QEMU 7.2's default (a transitional PCI device, which
    Linux drives as modern and U-Boot as legacy; a legacy virtio-mmio
    device); True makes a legacy-only device (VERSION_1 is never offered):
    disable-modern=on, or virtio-mmio.force-legacy=true; False a modern-only
    one: disable-legacy=on, or virtio-mmio.force-legacy=false.

    PCI device options:
    - vectors=0: no MSI-X.  QEMU 7.2 under TCG segfaults when the guest
      driver enables MSI-X on a vhost-user virtio-net device; with no vectors
      the driver falls back to a legacy INTx interrupt, which works.
    - romfile=: no iPXE option ROM; we boot a kernel directly, and the ROM
      would only slow SeaBIOS down.
    - addr=PCI_SLOT: a fixed slot on the root bus, when a firmware needs one.
    mac=: pinned so the guest's MAC is known to the backend and the logs.
    QUEUE_SIZE sets rx_queue_size and tx_queue_size (QEMU's default is 256;
    a TX ring above 256 needs a vhost-user backend, and 1024 is the most).

    QUEUE_PAIRS > 1: multiqueue. -netdev vhost-user,queues=N opens N queue
    pairs on the one socket (the backend must serve at least N: `serve
    --queues`), and virtio-net-pci,mq=on offers VIRTIO_NET_F_MQ to the
    guest. vectors= stays 0: measured on QEMU 7.2 under TCG (tests/
    test_qemu_mq.py, docs/multiqueue.md), a Linux guest runs every pair on
    the one INTx interrupt, while vectors=2N+2 (one per queue, one for the
    control queue, one for config changes: what QEMU picks with mq=on)
    segfaults QEMU 7.2 under TCG as soon as the driver enables MSI-X, as
    with one pair. MSIX: vectors=2N+2 anyway, for KVM hosts.

    RECONNECT (seconds): the chardev's reconnect=. QEMU then outlives the
    backend: when it goes, QEMU takes the guest's link down and tries the
    socket again every RECONNECT seconds; when it is back, QEMU redoes the
    whole handshake (the same features as before) and the link comes up.
    For split rings QEMU 7.2 cannot ask a dead backend where it was, so it
    restarts each ring at the guest's used index: the backend completes
    chains in order, so nothing is lost or used twice.
    """
    if netdev == "vhost-user":
        if socket is None:
            raise ValueError("a vhost-user NIC needs the backend's socket path")
        chardev = f"socket,id=chr0,path={os.fspath(socket)}"
        if reconnect is not None:
            if reconnect < 1:
                raise ValueError(f"reconnect must be at least 1 second, not {reconnect}")
            chardev += f",reconnect={reconnect}"
        netdev_opt = "vhost-user,id=net0,chardev=chr0"
        if queue_pairs > 1:
            netdev_opt += f",queues={queue_pairs}"
        backend = ["-chardev", chardev, "-netdev", netdev_opt]
    elif netdev == "user":
        backend = ["-netdev", "user,id=net0"]
    else:
        raise ValueError(f"netdev must be vhost-user or user, not {netdev!r}")
    queues = "" if queue_size is None else f",rx_queue_size={queue_size},tx_queue_size={queue_size}"
    if queue_pairs < 1:
        raise ValueError(f"queue pairs must be at least 1, not {queue_pairs}")
    if packed:
        queues += ",packed=on"     # PACKED: the device offers VIRTIO_F_RING_PACKED (virtio 1.2 §2.8)
    if queue_pairs > 1:
        queues += ",mq=on"         # the device offers VIRTIO_NET_F_MQ (virtio 1.2 §5.1.3)
    if transport == "pci":
        device = f"virtio-net-pci,netdev=net0,mac={mac},vectors={msix_vectors(queue_pairs) if msix else 0},romfile={queues}"
        if legacy is not None:
            device += ",disable-modern=on" if legacy else ",disable-legacy=on"
        if pci_slot is not None:
            device += f",addr={pci_slot:#x}"
        return backend + ["-device", device]
    if transport == "mmio":
        mode = [] if legacy is None else [
            "-global", f"virtio-mmio.force-legacy={'true' if legacy else 'false'}"]
        return backend + mode + ["-device", f"virtio-net-device,netdev=net0,mac={mac}{queues}"]
    raise ValueError(f"transport must be pci or mmio, not {transport!r}")


def msix_vectors(queue_pairs: int) -> int:
    """MSI-X vectors for a virtio-net-pci with QUEUE_PAIRS: one per virtqueue (2 per pair),
    one for the control queue, one for configuration changes (virtio 1.2 §4.1.4.3)."""
    return 2 * queue_pairs + 2


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


def kernel_append(guest_vars: Mapping[str, object] | None = None, append: str = "",
                  m: Machine = DEFAULT_MACHINE) -> str:
    """The kernel command line: BASE_APPEND (with M's console), then each
    guest variable as vhostnet.NAME=VALUE (qemu/init reads them from
    /proc/cmdline), then APPEND."""
    words = [BASE_APPEND.replace("console=ttyS0", f"console={m.console}")]
    words += [f"vhostnet.{k}={v}" for k, v in (guest_vars or {}).items()]
    if append:
        words.append(append)
    return " ".join(words)


def boot_args(image: GuestImage, append: str) -> list[str]:
    """Direct kernel boot.  An ELF vmlinux boots through its PVH note, which
    skips both the firmware's disk boot and the bzImage decompressor; an
    arm64 Image boots straight from QEMU's loader."""
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
              qemu: str | None = None,
              machine: str | Machine = "q35",
              transport: str | None = None,
              legacy: bool | None = None,
              queue_size: int | None = None,
              reconnect: int | None = None,
              packed: bool = False, queue_pairs: int = 1) -> list[str]:
    """The full argv of a QEMU guest whose NIC is served on SOCKET.

    With IMAGE (see find_image) QEMU boots our test kernel and initramfs,
    with GUEST_VARS (e.g. {"NET": 1}) and APPEND on the kernel command line.
    Without it, EXTRA_ARGS must say what to boot (e.g. a disk image).
    EXTRA_ARGS are appended last either way.  ACCEL is "kvm", "tcg" or
    "auto" (KVM when kvm_usable()).  MACHINE (see MACHINES), TRANSPORT,
    LEGACY and QUEUE_SIZE choose the board and the NIC (see nic_args); QEMU
    defaults to the machine's binary. RECONNECT: see nic_args().
    """
    m = _as_machine(machine)
    transport = transport_of(m, transport)
    if image is not None and m.image_arch and image.arch != m.image_arch:
        raise ValueError(f"the {m.name} machine boots the {m.image_arch} image, not {image.arch}")
    qemu = qemu or m.qemu
    accel = machine_accel(accel, m) if qemu == m.qemu else choose_accel(accel, qemu)
    argv = [qemu, *accel_args(accel, m), *memory_args(memory, m),
            *console_args(), *nic_args(socket, mac, netdev, transport, legacy,
                                       queue_size=queue_size, reconnect=reconnect, packed=packed,
                                       queue_pairs=queue_pairs)]
    if image is not None:
        argv += boot_args(image, kernel_append(guest_vars, append, m))
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
