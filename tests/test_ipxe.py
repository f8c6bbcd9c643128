"""iPXE's `dhcp` on vhostnet: a real iPXE (Debian's ipxe.lkrn, every driver
built in) drives the virtio-net NIC and takes its lease from the backend's
DHCP server (stack/services/dhcp.py).

Debian's build prints to VGA only, so the test reads the result off the
backend (vhostnet/testing/ipxe.py): the script runs `dhcp`, then fetches,
over the backend's TFTP, a file whose name iPXE builds from the settings
the lease gave it (address, netmask, router, DNS).  Only that one name is
served: one completed transfer and no refused request mean iPXE configured
exactly 10.0.2.15/255.255.255.0 via 10.0.2.2 with DNS 10.0.2.3, and sent
from it.  The backend's lease table must hold the guest's MAC as bound.

Each case runs on a transitional device (iPXE picks its modern driver:
VERSION_1, 12-byte header) and on a legacy-only one (its legacy driver,
10-byte header).  About 6 s each under TCG: DHCP itself is done in 3 s
(iPXE re-DISCOVERs once while it waits for a ProxyDHCP offer, as on
slirp), and iPXE's `dhcp` returns once all of the NIC's configurators are
done: its IPv6 one ends on the stack's answer to its router solicitation,
an advertisement that there is no IPv6 router (stack/wire/ndp.py).  Without
that answer it retransmits for about 16 s (20 s per case before).
"""
from __future__ import annotations

import shutil

import pytest

from vhostnet.launch import qemu
from vhostnet.testing import ipxe, uboot

DNS = "10.0.2.3"


def _missing() -> str | None:
    m = qemu.machine("q35")
    if shutil.which(m.qemu) is None:
        return f"{m.qemu} is not installed (Debian package {m.package}; scripts/setup.sh)"
    try:
        ipxe.lkrn()
    except ipxe.IpxeError as e:
        return str(e)
    return None


def _fetched_or_refused(stats: dict) -> bool:
    """iPXE's TFTP request was served, or refused (a wrong name); False
    until QEMU has connected (no `services` yet)."""
    if not stats.get("connected"):
        return False
    return (stats["services"]["tftp"]["completed"] >= 1
            or any(k.startswith("tftp_refused") and v for k, v in stats["stack"]["counters"].items()))


@pytest.mark.qemu
@pytest.mark.parametrize("legacy", [None, True], ids=["transitional", "legacy"])
def test_ipxe_dhcp_gets_the_lease(legacy, tmp_path, record_property):
    why = _missing()
    if why:
        pytest.skip(why)
    name = ipxe.lease_file_name(uboot.GUEST_IP, uboot.NETMASK, uboot.GATEWAY, DNS)
    served = {name: ipxe.script("shell")}        # iPXE then waits at its prompt
    with ipxe.ipxe_session(ipxe.dhcp_then_tftp_script(), served, legacy=legacy,
                           workdir=tmp_path) as q:
        stats = q.wait_stats(_fetched_or_refused)
        record_property("seconds_to_tftp", round(q.elapsed(), 1))
        inspect = q.backend.request("inspect")
    counters = stats["stack"]["counters"]
    refused = {k: v for k, v in counters.items() if k.startswith("tftp_refused") and v}
    assert not refused, (f"iPXE asked for a file other than {name} (its lease differs): {refused}; "
                         f"log: {tmp_path / 'backend.log'}")
    tftp = stats["services"]["tftp"]
    assert tftp["completed"] == 1 and tftp["failed"] == 0, tftp
    leases = stats["services"]["dhcp"]["leases"]
    assert [(l["mac"], l["ip"], l["state"]) for l in leases] == \
        [(qemu.DEFAULT_MAC, uboot.GUEST_IP, "bound")], leases
    # iPXE's router solicitation was valid (RFC 4861 §6.1.1) and answered:
    # that is what ends its IPv6 configurator, hence `dhcp`, at once.
    assert counters["ndp_rs_rx"] >= 1 and counters["ndp_ra_tx"] >= 1, counters
    assert not {k: v for k, v in counters.items() if k.startswith("drop_ndp_") and v}, counters
    # iPXE drove the device itself: both queues moved, with its 8 RX chains.
    assert stats["device"]["tx_frames"] >= 4 and stats["device"]["rx_frames"] >= 4, stats["device"]
    names = inspect["features"]["negotiated"]["names"]
    record_property("negotiated", names)
    # iPXE 1.0.0+git-20190125 binds a transitional device with its modern driver.
    assert ("VERSION_1" in names) is (legacy is None), names
    assert inspect["hdr_len"] == (10 if legacy else 12), inspect["hdr_len"]


def test_ipxe_argv_and_names():
    """No QEMU needed: the kernel/initrd flags and the lease file name."""
    why = _missing()
    if why:
        pytest.skip(why)
    argv = ipxe.ipxe_argv("/tmp/v.sock", ipxe.IPXE_LKRN)
    assert argv[argv.index("-kernel") + 1] == str(ipxe.IPXE_LKRN)
    device = argv[argv.index("-device") + 1]
    assert "vectors=0" in device and device.endswith(",romfile=")
    s = ipxe.dhcp_then_tftp_script()
    assert s.startswith("#!ipxe\ndhcp\nchain tftp://10.0.2.2/lease-${net0/ip}-")
    assert ipxe.lease_file_name("10.0.2.15", "255.255.255.0", "10.0.2.2", "10.0.2.3") == \
        "lease-10.0.2.15-255.255.255.0-10.0.2.2-10.0.2.3.ipxe"
