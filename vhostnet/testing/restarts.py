"""The two reconnect scenarios of issue 7, as functions returning what they saw;
tests/test_qemu_backend.py asserts on them, scripts/reconnect_*.py print tables.

(a) `qemu_restarts()`: one backend stays up while QEMU comes and goes. A
    *traffic* cycle starts a guest (the Linux test image in LOOP mode, or
    U-Boot pinging, which reaches its driver in a second where Linux under
    TCG takes several), waits until the backend's control socket shows both
    rings started and frames counted both ways, then kills QEMU with
    SIGKILL in the middle of that traffic. An *early* cycle kills QEMU as
    soon as it connected (the vhost-user handshake only, no rings): a
    different path through the teardown. After each cycle, once the backend
    says no QEMU is connected, its fd count and RSS are sampled, with one
    control connection open (ours) every time.

(b) `backend_restart()`: QEMU (-chardev ...,reconnect=1) stays up while the
    backend is killed with SIGKILL during the guest's ping loop and started
    again, with --pcap. It returns the timeline, all on one monotonic clock:
    listening again -> QEMU connected (its retry timer) -> rings started
    (the handshake) -> carrier up in the guest (QEMU's link-up, the
    driver's config interrupt) -> the guest's first frame (an MLD report)
    -> its ARP request for the gateway (the entry went INCOMPLETE while the
    link was down, so this waits for the guest's 1 s ARP retry timer; the
    pings queued behind it then go at once) -> first echo reply -> first
    new TCP connection.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from vhostnet.observe.control import ControlClient
from vhostnet.testing.guest import FALLBACK, Backend, Guest, fd_count, rss_kib
from vhostnet.testing.uboot import GATEWAY, UBoot, uboot_argv

__all__ = ["Sample", "qemu_restarts", "Timeline", "backend_restart"]

POLL = 0.02                    # seconds between two looks at a counter
LOOP_SECONDS = 60              # the guest's traffic loop outlives any cycle
TRAFFIC_FRAMES = 10            # frames each way before a traffic cycle's kill
TCP_LINE = re.compile(r"tcp-echo: \d+ bytes to .* \(connect (\d+) ms\)")


@dataclass
class Sample:
    cycle: int
    kind: str          # "linux", "uboot" or "early"
    fds: int
    rss_kib: int
    tx_frames: int     # frames of that connection when QEMU was killed
    rx_frames: int
    seconds: float     # the cycle, QEMU start to sample
    fd_list: list = field(default_factory=list)   # /proc/PID/fd targets at the sample


def _ask(c: ControlClient, cmd: str) -> dict:
    return c.request(cmd)


def _until(c: ControlClient, cmd: str, pred, timeout: float, what: str, alive=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = _ask(c, cmd)
        if pred(doc):
            return doc
        if alive is not None and not alive():
            raise RuntimeError(f"gave up waiting for {what}: the process it depends on exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not seen within {timeout:g} s; last {cmd}: {str(doc)[:400]}")
        time.sleep(POLL)


def _started(doc: dict) -> bool:
    return doc.get("connected") and all(q["started"] for q in doc["queues"])


def _traffic(doc: dict) -> bool:
    return bool(doc.get("connected") and doc["device"]["tx_frames"] >= TRAFFIC_FRAMES
                and doc["device"]["rx_frames"] >= TRAFFIC_FRAMES)


def _uboot_pings(u: UBoot, c: ControlClient, timeout: float) -> None:
    """U-Boot at its prompt with the gateway's address set, then pings of the
    gateway until the backend counts TRAFFIC_FRAMES each way."""
    u.stop_autoboot(timeout)
    u.command("virtio scan")       # x86's U-Boot finds no NIC without it
    u.static_ip()
    deadline = time.monotonic() + timeout
    while not _traffic(_ask(c, "stats")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"U-Boot's pings did not reach {TRAFFIC_FRAMES} frames each way "
                               f"within {timeout:g} s; console:\n{u.tail()}")
        u.ping(GATEWAY)


def fd_targets(pid: int) -> list[str]:
    """What the process's fds are (sockets, eventfds, memfds...), for a leak report."""
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def cycle_kinds(n: int) -> list[str]:
    """N cycles, in rounds of ten: one Linux guest, six U-Boot, three early kills."""
    pattern = ["linux", "uboot", "early", "uboot", "uboot", "early", "uboot", "uboot", "early", "uboot"]
    return [pattern[k % len(pattern)] for k in range(n)]


def qemu_restarts(workdir: Path, kinds: list[str], echo=None,
                  on_sample=None, boot_timeout: float = 180.0) -> tuple[list[Sample], str]:
    """One cycle per entry of KINDS under one backend:
      "linux"  the test image in LOOP mode; killed once both rings run and
               TRAFFIC_FRAMES frames went each way (pings, TCP);
      "uboot"  U-Boot pinging the gateway; killed the same way;
      "early"  killed as soon as QEMU connected (the handshake only).
    Returns the samples and the backend's log; raises if the backend dies
    or QEMU falls back on userspace virtio."""
    sock = workdir / "v.sock"
    backend = Backend(sock, log_level="info", echo=echo)
    samples: list[Sample] = []
    try:
        backend.listening()
        c = ControlClient(backend.ctl)
        for n, kind in enumerate(kinds, 1):
            t0 = time.monotonic()
            guest = (UBoot(uboot_argv("q35", sock, legacy=None)) if kind == "uboot"
                     else Guest(sock, {"LOOP": LOOP_SECONDS}))
            alive = (lambda g: lambda: g.proc.poll() is None)(guest)
            try:
                if kind == "early":
                    _until(c, "ping", lambda d: d["connected"], boot_timeout, "QEMU connected", alive)
                    tx = rx = 0
                else:
                    if kind == "uboot":
                        _uboot_pings(guest, c, boot_timeout)
                    _until(c, "inspect", _started, boot_timeout, "both rings started", alive)
                    doc = _until(c, "stats", _traffic, boot_timeout, "frames both ways", alive)
                    tx, rx = doc["device"]["tx_frames"], doc["device"]["rx_frames"]
                    if kind == "uboot":
                        guest.start(f"ping {GATEWAY}")   # killed with a ping in flight
            finally:
                killed = time.monotonic()
                guest.kill()            # SIGKILL: no goodbye to the backend
            if guest.fallback:
                raise RuntimeError(f"QEMU fell back on userspace virtio:\n{guest.tail(40)}")
            # The server logs this once the connection's socket is closed too
            # ("connected": false comes a moment earlier, while its tasks end).
            backend.log.wait(r"frontend disconnected", killed, 30)
            _until(c, "ping", lambda d: not d["connected"], 30, "the backend noticing QEMU gone")
            if backend.proc.poll() is not None:
                raise RuntimeError(f"the backend exited ({backend.proc.returncode}):\n{backend.log.text()}")
            s = Sample(n, kind, fd_count(backend.pid), rss_kib(backend.pid), tx, rx,
                       time.monotonic() - t0, fd_targets(backend.pid))
            samples.append(s)
            if on_sample is not None:
                on_sample(s)
        c.close()
    finally:
        backend.stop()
    return samples, backend.log.text()


@dataclass
class Timeline:
    """Seconds on one monotonic clock; None when not seen."""
    killed: float = 0.0
    spawned: float = 0.0                   # the second backend's process started
    carrier_down: float | None = None
    refused: list[float] = field(default_factory=list)   # QEMU's failed connection attempts
    listening: float = 0.0
    connected: float = 0.0
    rings: float = 0.0
    carrier_up: float | None = None
    first_guest_frame: float | None = None
    arp_request: float | None = None
    arp_reply: float | None = None
    first_echo_request: float | None = None
    first_echo_reply_sent: float | None = None
    first_ping_reply: float = 0.0          # the guest printed it
    first_tcp_start: float | None = None
    first_tcp_ok: float = 0.0
    seq_before: int = 0                    # the guest's last ping seq answered before the kill
    seq_after: int = 0                     # its first answered after
    errors: dict = field(default_factory=dict)

    def breakdown(self) -> list[tuple[str, float | None]]:
        """(step, seconds since the previous step) from listening again."""
        def d(a, b):
            return None if a is None or b is None else b - a
        frame = self.first_guest_frame
        return [
            ("(before) kill -> QEMU's first refused retry", d(self.killed, self.refused[0] if self.refused else None)),
            ("(before) backend spawned -> listening (Python start-up)", d(self.spawned, self.listening)),
            ("listening -> QEMU connected (QEMU's 1 s reconnect timer)", d(self.listening, self.connected)),
            ("connected -> both rings started (vhost-user handshake)", d(self.connected, self.rings)),
            ("rings -> guest's first frame (link-up: MLD report)", d(self.rings, frame)),
            ("  (rings -> guest sees carrier 1, 50 ms polling)", d(self.rings, self.carrier_up)),
            ("first frame -> ARP request (guest's 1 s ARP retry timer)", d(frame, self.arp_request)),
            ("ARP request -> reply (backend)", d(self.arp_request, self.arp_reply)),
            ("ARP reply -> first echo request (queued ones flushed)", d(self.arp_reply, self.first_echo_request)),
            ("echo request -> reply sent (backend)", d(self.first_echo_request, self.first_echo_reply_sent)),
            ("reply sent -> guest prints it", d(self.first_echo_reply_sent, self.first_ping_reply)),
            ("TOTAL listening -> first ping reply", d(self.listening, self.first_ping_reply)),
            ("TOTAL listening -> first new TCP echo ok", d(self.listening, self.first_tcp_ok)),
        ]


def _pcap_times(path: Path, offset: float) -> dict:
    """First ARP request/reply and ICMP echo request/reply in a --pcap file,
    on the monotonic clock (OFFSET = time.time() - time.monotonic())."""
    from scapy.layers.inet import ICMP
    from scapy.layers.l2 import ARP
    from scapy.utils import PcapReader
    out: dict = {}
    with PcapReader(str(path)) as r:
        for pkt in r:
            t = float(pkt.time) - offset
            from_guest = pkt.src.lower() == "52:54:00:12:34:56"
            if from_guest:
                out.setdefault("first_guest_frame", t)
            if ARP in pkt:
                key = "arp_request" if pkt[ARP].op == 1 and from_guest else "arp_reply" if pkt[ARP].op == 2 else None
                if key:
                    out.setdefault(key, t)
            elif ICMP in pkt:
                key = ("first_echo_request" if pkt[ICMP].type == 8 and from_guest else
                       "first_echo_reply_sent" if pkt[ICMP].type == 0 else None)
                if key:
                    out.setdefault(key, t)
    return out


def backend_restart(workdir: Path, echo=None, boot_timeout: float = 120.0,
                    recover_timeout: float = 15.0) -> tuple[Timeline, str, str]:
    """Scenario (b). Returns the timeline, the console, and the second backend's log."""
    sock = workdir / "v.sock"
    pcap = workdir / "after.pcap"
    offset = time.time() - time.monotonic()
    first = Backend(sock, log_level="info", echo=echo)
    first.listening()
    guest = Guest(sock, {"LOOP": LOOP_SECONDS}, reconnect=1, echo=echo)
    second = None
    tl = Timeline()
    try:
        # Steady traffic first: five replies in a row.
        t = guest.console.wait(r"loop: running", timeout=boot_timeout)[0]
        for _ in range(5):
            t = guest.console.wait(r"bytes from 10\.0\.2\.2: seq=", after=t + 1e-6, timeout=30)[0]
        tl.killed = time.monotonic()
        first.kill()
        replies = guest.ping_replies()
        tl.seq_before = replies[-1][1] if replies else 0
        # QEMU noticed: the guest's link went down, and it has tried once (refused).
        tl.carrier_down = guest.console.wait(r"loop: carrier 0", after=tl.killed, timeout=10)[0]
        guest.console.wait(r"Unable to connect character device chr0", after=tl.killed, timeout=10)
        second = Backend(sock, "--pcap", str(pcap), log_level="debug", echo=echo)
        tl.spawned = second.started
        tl.listening = second.listening()
        tl.connected = second.log.wait(r"frontend connected", tl.listening, recover_timeout)[0]
        rx = second.log.wait(r"rx started", tl.connected, recover_timeout)[0]
        tx = second.log.wait(r"tx started", tl.connected, recover_timeout)[0]
        tl.rings = max(rx, tx)
        tl.first_ping_reply, line = guest.console.wait(r"bytes from 10\.0\.2\.2: seq=", tl.listening,
                                                       recover_timeout)
        tl.seq_after = int(re.search(r"seq=(\d+)", line).group(1))
        found = guest.console.find(r"loop: carrier 1", tl.listening)
        tl.carrier_up = found[0] if found else None
        # A *new* connection: one whose connect() began after the backend was back
        # (its line says how long connect took; the echo itself is ~10 ms).
        t = tl.listening
        while True:
            t, line = guest.console.wait(TCP_LINE, t + 1e-6, recover_timeout)
            start = t - int(TCP_LINE.search(line).group(1)) / 1000
            if start >= tl.listening:
                tl.first_tcp_ok, tl.first_tcp_start = t, start
                break
        with guest.console.cond:
            tl.refused = [t for t, line in guest.console.lines
                          if "Unable to connect character device chr0" in line]
        with ControlClient(second.ctl) as c:
            doc = c.request("stats")
        tl.errors = {q["name"]: q["errors"] for q in doc["queues"] if q["errors"]}
        if doc["device"]["drops"]:
            tl.errors["device"] = doc["device"]["drops"]
    finally:
        guest.kill()
        if second is not None:
            second.stop()
        if first.proc.poll() is None:
            first.stop()
    if guest.console.find(FALLBACK) or guest.console.find("lacks feature"):
        raise RuntimeError(f"QEMU refused the restarted backend:\n{guest.console.text()[-3000:]}")
    if pcap.exists():
        for k, v in _pcap_times(pcap, offset).items():
            setattr(tl, k, v)
    return tl, guest.console.text(), second.log.text() if second else ""
