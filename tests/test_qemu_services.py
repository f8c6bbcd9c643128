"""The services with real clients in real QEMU guests:

* the Linux test guest gets its address by busybox udhcpc (DHCP=1),
  resolves names through 10.0.2.3 (DNS_TEST=1; the backend's upstream is
  a DNS server this test runs on 127.0.0.1, vhostnet/testing/dnsserver.py,
  never the host's resolver), and fetches a file by busybox tftp at block
  sizes 512, 1468 and 65464 (TFTP_TEST=1; the last one IP-fragmented);
* U-Boot (Debian's u-boot-qemu) gets a lease with `dhcp`, which also loads
  the DHCP boot file by TFTP from the next server, then `tftpboot`s a file
  with the largest block size U-Boot takes, and again with 16 blocks per
  ACK (RFC 7440 windowsize), and `crc32` in guest memory matches the files'
  CRC-32 here each time.

The Linux test runs the backend in this process (what `vhostnet serve`
builds) and reads its counters directly; the U-Boot test goes through
`vhostnet serve` itself (vhostnet/testing/uboot.py) and its stats.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import zlib

import pytest
import trio

from stack.services.config import ServicesConfig
from vhostnet.hostnet.tftp_root import TftpRoot
from vhostnet.launch import qemu
from vhostnet.launch.serve import serve_backend
from vhostnet.testing.dnsserver import DnsTestServer
from vhostnet.testing.uboot import missing, uboot_session

from .device.conftest import make_server
from .observe import sockdir  # noqa: F401 (fixture)

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which(qemu.QEMU) is None, reason=f"{qemu.QEMU} missing")]

GUEST_TIMEOUT = 240        # seconds: TCG on a shared 2-core machine


def _image():
    try:
        return qemu.find_image()
    except qemu.ImageNotBuilt as e:
        pytest.skip(f"guest image not built ({e}); run `make guest`")


async def _device(srv):
    with trio.fail_after(60):
        while srv.current is None:
            await trio.sleep(0.05)
    return srv.current.device


async def test_linux_guest_udhcpc_dns_and_tftp(nursery, sockdir, tmp_path):
    image = _image()
    dns_srv = DnsTestServer()
    await nursery.start(dns_srv.serve)
    root = tmp_path / "tftp"
    root.mkdir()
    body = os.urandom((1 << 20) + 7)
    (root / "tftp.bin").write_bytes(body)
    srv = make_server(sockdir / "v.sock", net_services=ServicesConfig(tftp_files=TftpRoot(str(root))),
                      dns_upstreams=[("127.0.0.1", dns_srv.port)])
    await nursery.start(serve_backend, srv)
    argv = qemu.qemu_argv(srv.socket_path, image=image, accel="tcg",
                          guest_vars={"NET": 1, "DHCP": 1, "DNS_TEST": 1, "TFTP_TEST": 1,
                                      "ICMP_TEST": 0,
                                      "TCP_ECHO_TEST": 0, "UDP_ECHO_TEST": 0,
                                      "NET_LOOPBACK_TEST": 0})
    log = tmp_path / "console.log"
    with trio.fail_after(GUEST_TIMEOUT):
        proc = await trio.run_process(argv, stdin=b"", capture_stdout=True, stderr=-2, check=False)
    out = proc.stdout.decode(errors="replace")
    log.write_text(out)
    assert "init: done" in out, out[-3000:]
    m = re.search(r"dhcp: bound (\S+) mask (\S+) router (\S+) dns (\S+) mtu (\S+) lease (\d+) "
                  r"server (\S+)", out)
    assert m, out[-3000:]
    assert m.groups() == ("10.0.2.15", "255.255.255.0", "10.0.2.2", "10.0.2.3", "1500", "86400",
                          "10.0.2.2")
    assert "net: ping ok" in out, out[-3000:]
    assert "dns: host.test is 192.0.2.7" in out and "dns: nx.test is NXDOMAIN" in out
    assert "dns: ok" in out and "FAIL" not in out, out[-3000:]
    assert "init: 0 failure(s)" in out
    assert dns_srv.queries["udp"] >= 2                    # they reached our 127.0.0.1 server
    got = dict(re.findall(r"tftp: blksize (\d+) bytes (\d+ sha256 \w+)", out))
    want = f"{len(body)} sha256 {hashlib.sha256(body).hexdigest()}"
    assert got == {"512": want, "1468": want, "65464": want}, out[-3000:]
    assert "tftp: ok" in out


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_uboot_dhcp_and_tftp(tmp_path):
    """Through `vhostnet serve --tftp DIR --bootfile boot.bin` (the CLI wiring too)."""
    root = tmp_path / "tftp"
    root.mkdir()
    boot = os.urandom(300_000 + 123)
    big = os.urandom(3 << 20)
    (root / "boot.bin").write_bytes(boot)
    (root / "big.bin").write_bytes(big)
    args = ["--no-dns", "--tftp", str(root), "--bootfile", "boot.bin"]
    with uboot_session("q35", backend_args=args, workdir=tmp_path / "logs") as u:
        # `dhcp` with autoload (the default) loads the boot file from siaddr.
        out = u.command("dhcp ${loadaddr}", timeout=120)
        assert re.search(r"DHCP client bound to address 10\.0\.2\.15", out), out
        assert f"Bytes transferred = {len(boot)}" in out and "boot.bin" in out, out
        out = u.command("crc32 ${loadaddr} ${filesize}")
        assert f"==> {zlib.crc32(boot):08x}" in out, out
        env = u.command("printenv serverip bootfile ipaddr netmask gatewayip")
        assert "serverip=10.0.2.2" in env and "bootfile=boot.bin" in env
        assert "ipaddr=10.0.2.15" in env and "netmask=255.255.255.0" in env
        # The largest block that fits one frame at MTU 1500 (U-Boot's own cap).
        u.command("setenv tftpblocksize 1468")
        out = u.command("tftpboot ${loadaddr} big.bin", timeout=300)
        assert f"Bytes transferred = {len(big)}" in out, out
        out = u.command("crc32 ${loadaddr} ${filesize}")
        assert f"==> {zlib.crc32(big):08x}" in out, out
        # RFC 7440: 16 blocks per ACK.
        u.command("setenv tftpwindowsize 16")
        u.command("mw.b ${loadaddr} 0 ${filesize}")
        out = u.command("tftpboot ${loadaddr} big.bin", timeout=300)
        assert f"Bytes transferred = {len(big)}" in out, out
        out = u.command("crc32 ${loadaddr} ${filesize}")
        assert f"==> {zlib.crc32(big):08x}" in out, out
        out = u.command("tftpboot ${loadaddr} ../etc/passwd", timeout=60)
        assert "TFTP error" in out and "refused" in out, out
        svc = u.backend.request("stats")["services"]
    assert svc["dhcp"]["leases"][0]["ip"] == "10.0.2.15"
    assert svc["tftp"]["completed"] == 3 and svc["tftp"]["failed"] == 0
    assert svc["tftp"]["bytes"] == len(boot) + 2 * len(big)
