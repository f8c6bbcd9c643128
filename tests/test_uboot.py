"""U-Boot's virtio-net driver on vhostnet: x86_64 (virtio-pci) and arm64
(virtio-mmio), each on a legacy and a modern device.

U-Boot is the smallest real driver we meet: MAC only, the 10-byte header on
legacy devices, 32 RX buffers, polling.  Each case boots Debian's
u-boot-qemu build on a fresh backend (vhostnet/testing/uboot.py), sets the
QEMU user-net address by hand and pings the gateway, then asks the backend
over its control socket what was negotiated and what went through: a legacy
device must never see VERSION_1, a modern one must, and the ping's frames
must be in the device's counters.  About a second per case under TCG.
"""
from __future__ import annotations

import pytest

from vhostnet.testing import uboot

CASES = [("q35", True), ("q35", False), ("virt-aarch64", True), ("virt-aarch64", False)]


@pytest.mark.qemu
@pytest.mark.parametrize("machine,legacy", CASES,
                         ids=[f"{m}-{'legacy' if legacy else 'modern'}" for m, legacy in CASES])
def test_uboot_pings_the_gateway(machine, legacy, tmp_path, record_property):
    why = uboot.missing(machine)
    if why:
        pytest.skip(why)
    with uboot.uboot_session(machine, legacy=legacy, workdir=tmp_path) as u:
        record_property("boot_seconds", round(u.boot_seconds, 2))
        u.static_ip()
        alive, out = u.ping(uboot.GATEWAY)
        assert alive, f"U-Boot's ping of {uboot.GATEWAY} failed:\n{out}\nconsole: {tmp_path / 'console.log'}"
        inspect = u.backend.request("inspect")
        stats = u.backend.request("stats")
        check = u.backend.request("check")
    names = inspect["features"]["negotiated"]["names"]
    assert ("VERSION_1" in names) is (not legacy), names
    assert inspect["hdr_len"] == (10 if legacy else 12)
    assert not inspect["mergeable_rx_buffers"]
    # ARP request + echo request out, ARP reply + echo reply in, at least.
    assert stats["device"]["tx_frames"] >= 2 and stats["device"]["rx_frames"] >= 2, stats["device"]
    # The conformance checker (vhostnet check) names nothing U-Boot's driver does.
    assert check["findings"] == [], check["findings"]


def test_uboot_argv_per_machine():
    """No QEMU needed: firmware, transport and legacy/modern flags."""
    if uboot.missing("q35") or uboot.missing("virt-aarch64"):
        pytest.skip("u-boot-qemu is not installed")
    x86 = uboot.uboot_argv("q35", "/tmp/v.sock", legacy=True)
    assert x86[0] == "qemu-system-x86_64" and x86[x86.index("-bios") + 1].endswith("qemu-x86_64/u-boot.rom")
    device = x86[x86.index("-device") + 1]
    assert device.startswith("virtio-net-pci,") and "disable-modern=on" in device and "addr=0x3" in device
    assert "-monitor" in x86 and x86[x86.index("-serial") + 1] == "stdio"
    arm = uboot.uboot_argv("virt-aarch64", "/tmp/v.sock", legacy=False)
    assert arm[0] == "qemu-system-aarch64" and "virt,memory-backend=mem" in arm
    assert arm[arm.index("-device") + 1].startswith("virtio-net-device,netdev=net0,")
    assert arm[arm.index("-global") + 1] == "virtio-mmio.force-legacy=false"
    assert arm[arm.index("-cpu") + 1] == "cortex-a57"
    with pytest.raises(uboot.UBootError):
        uboot.firmware("virt-riscv64")
