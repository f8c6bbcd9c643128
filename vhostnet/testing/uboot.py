"""Drive Debian's U-Boot (package u-boot-qemu) in QEMU over its serial console, for tests.

U-Boot is a second, very different virtio-net driver (FACTS.md: it negotiates
only MAC, uses the legacy 10-byte header, and polls) and a real DHCP and TFTP
client, so it checks the services the way a bootloader developer uses them.

    async with UBoot(socket_path) as ub:       # QEMU started, autoboot stopped, virtio scanned
        out = await ub.command("dhcp")         # text up to the next prompt
        ub.console                             # everything read so far

The console is QEMU's stdio serial; `command` writes a line and reads until
U-Boot's prompt comes back (or `timeout`). On exit QEMU is killed. The ROM
is x86_64's by default (virtio-pci, as our vhost-user NIC is).
"""
from __future__ import annotations

import os
import re
import shutil
import signal

import trio

from vhostnet.launch import qemu

__all__ = ["UBoot", "UBootError", "find_rom", "ROM_CANDIDATES"]

ROM_CANDIDATES = ("/usr/lib/u-boot/qemu-x86_64/u-boot.rom", "/usr/lib/u-boot/qemu-x86/u-boot.rom")
PROMPT = re.compile(rb"(?m)^=> ")   # at a line start: crc32 prints "==> " mid-line
AUTOBOOT = re.compile(rb"Hit any key to stop autoboot")
BOOT_TIMEOUT = 60.0          # seconds from QEMU start to the prompt (TCG, shared CPU)


class UBootError(RuntimeError):
    pass


def find_rom() -> str | None:
    return next((p for p in ROM_CANDIDATES if os.path.exists(p)), None)


class UBoot:
    def __init__(self, socket_path: str | None, *, rom: str | None = None, memory: str = "256M",
                 mac: str = qemu.DEFAULT_MAC, log_path: str | None = None,
                 slirp: str | None = None):
        """socket_path: the vhostnet backend's; or None and SLIRP, extra options
        of QEMU's own `-netdev user` (e.g. "tftp=DIR,bootfile=NAME"), to run
        the same client against slirp as a peer."""
        self.rom = rom or find_rom()
        if self.rom is None:
            raise UBootError("no U-Boot ROM: apt-get install u-boot-qemu (scripts/setup.sh)")
        if shutil.which(qemu.QEMU) is None:
            raise UBootError(f"{qemu.QEMU} is not installed")
        argv = qemu.qemu_argv(socket_path, memory=memory, mac=mac, accel="tcg",
                              netdev="vhost-user" if slirp is None else "user",
                              extra_args=["-bios", self.rom])
        if slirp is not None:
            argv = [f"user,id=net0,{slirp}" if a == "user,id=net0" else a for a in argv]
        # Debian's qemu-x86_64 U-Boot is built for the i440fx machine (its
        # device tree); on q35 it lists the PCI devices but binds no virtio.
        self.argv = [a.replace("q35,", "pc,") if a.startswith("q35,") else a for a in argv]
        self.console = b""
        self._seen = 0
        self._log = open(log_path, "wb") if log_path else None
        self.proc = None

    async def __aenter__(self) -> "UBoot":
        self.proc = await trio.lowlevel.open_process(
            self.argv, stdin=-1, stdout=-1, stderr=-2, start_new_session=True)
        try:
            await self.expect(AUTOBOOT, BOOT_TIMEOUT)
            await self.proc.stdin.send_all(b"\n")
            await self.expect(PROMPT, 10)
            # U-Boot binds virtio devices only when asked: without this the
            # NIC is "No ethernet found".
            await self.command("virtio scan", 30)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            with trio.move_on_after(5):
                await self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def expect(self, pattern: re.Pattern, timeout: float) -> re.Match:
        """Read the console until PATTERN matches text not matched before."""
        with trio.move_on_after(timeout):
            while True:
                m = pattern.search(self.console, self._seen)
                if m:
                    self._seen = m.end()
                    return m
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    raise UBootError(f"QEMU exited; console:\n{self.console.decode(errors='replace')[-3000:]}")
                self.console += chunk
                if self._log is not None:
                    self._log.write(chunk)
                    self._log.flush()
        raise UBootError(f"timeout after {timeout:.0f} s waiting for {pattern.pattern!r}; console:\n"
                         f"{self.console.decode(errors='replace')[-3000:]}")

    async def command(self, line: str, timeout: float = 60.0) -> str:
        """Run one command; its output (without the echo) up to the next prompt."""
        start = self._seen
        await self.proc.stdin.send_all(line.encode() + b"\n")
        m = await self.expect(PROMPT, timeout)
        out = self.console[start:m.start()].decode(errors="replace").replace("\r", "")
        first, _, rest = out.partition("\n")
        return rest if line in first else out
