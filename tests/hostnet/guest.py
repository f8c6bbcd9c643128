"""A guest for the host-network tests, over the real vhost-user path.

The in-process frontend (vhostnet/testing/frontend.py) plays QEMU and the
driver: shared memfd memory, eventfd kicks and calls, split rings. On top
of it, a TcpLayer of our own at 10.0.2.15 plays the guest's TCP, so a test
can open connections through the NAT to real host servers on 127.0.0.1
and accept connections that come through forwards.

`run()` is the guest's "interrupt handler": it moves the guest TCP's
segments into the TX ring, takes RX frames, hands TCP to the guest layer
and keeps the rest (UDP, ICMP, ARP answers) in `other` for the test to
decode with scapy. The guest answers ARP for its own address.
"""
from __future__ import annotations

import random
import struct

import trio
from scapy.layers.inet import IP
from scapy.layers.l2 import ARP, Ether

from stack import NetConfig
from stack.checksum import ones_sum, pseudo_sum
from stack.tcp.config import TcpConfig
from stack.tcp.layer import TcpLayer
from stack.wire.ipv4 import build_header
from vhostnet.testing.frontend import Frontend
from vhostnet.virtio import features as F

CFG = NetConfig()
GUEST_B = CFG.guest_ip_b
GW_B = CFG.gateway_ip_b
_ETH = CFG.gateway_mac_b + CFG.guest_mac_b + b"\x08\x00"
_ETH_HDR = struct.Struct("!6s6sH")


class FeGuest:
    def __init__(self, fe: Frontend, tcp_config: TcpConfig | None = None):
        self.fe = fe
        self.tcp = TcpLayer(self._emit, rng=random.Random(11), config=tcp_config)
        self.out: list[bytes] = []          # frames waiting for TX slots
        self.other: list[bytes] = []        # non-TCP frames from the device
        self.wake = trio.Event()

    @classmethod
    async def attach(cls, server, nursery, tcp_config: TcpConfig | None = None) -> "FeGuest":
        fe = Frontend()
        await fe.connect(server.socket_path)
        # No offloads: every frame is a plain MTU-sized frame with full checksums.
        await fe.handshake(features=F.DEFAULT_FEATURES & ~F.OFFLOAD_FEATURES)
        fe.post_rx()
        fe.rx.kick()
        g = cls(fe, tcp_config)
        nursery.start_soon(g.run)
        return g

    def _emit(self, src, dst, seg, gso) -> None:
        seg = bytearray(seg)
        seg[16] = seg[17] = 0
        cs = (~ones_sum(seg, pseudo_sum(src, dst, 6, len(seg)))) & 0xFFFF
        seg[16], seg[17] = cs >> 8, cs & 0xFF
        self.out.append(_ETH + bytes(build_header(src, dst, 6, len(seg), 0)) + bytes(seg))
        self.wake.set()

    def send_frame(self, frame: bytes) -> None:
        self.out.append(frame)
        self.wake.set()

    def send_ip(self, pkt) -> None:
        """A scapy IP packet from the guest."""
        self.send_frame(bytes(Ether(src=CFG.guest_mac, dst=CFG.gateway_mac) / pkt))

    def now(self) -> float:
        return trio.current_time()

    async def run(self) -> None:
        fe = self.fe
        while True:
            fe.tx.take_used()
            sent = False
            while self.out and fe.tx.free:
                fe.post_tx(self.out.pop(0))
                sent = True
            if sent:
                fe.tx.kick()
            for _hdr, frame in fe.read_rx():
                self._deliver(frame)
            if fe.rx.free:
                fe.post_rx()
                fe.rx.kick()
            self.tcp.poll(self.now())
            if self.out:
                await trio.sleep(0.001)        # TX ring full: the device is working on it
                continue
            self.wake = trio.Event()
            dl = self.tcp.next_deadline()
            with trio.move_on_at(dl if dl is not None else self.now() + 0.05):
                async with trio.open_nursery() as n:
                    async def call():
                        await fe.rx.wait_call(1.0)
                        n.cancel_scope.cancel()

                    async def woke():
                        await self.wake.wait()
                        n.cancel_scope.cancel()
                    n.start_soon(call)
                    n.start_soon(woke)

    def _deliver(self, frame: bytes) -> None:
        if len(frame) >= 34 and frame[12:14] == b"\x08\x00" and frame[23] == 6 \
                and frame[30:34] == GUEST_B:
            ihl = (frame[14] & 15) * 4
            tot = (frame[16] << 8) | frame[17]
            self.tcp.receive(self.now(), frame[26:30], GUEST_B, frame[14 + ihl:14 + tot])
            return
        if frame[12:14] == b"\x08\x06":
            p = Ether(frame)
            if p[ARP].op == 1 and p[ARP].pdst == CFG.guest_ip:
                self.send_frame(bytes(Ether(src=CFG.guest_mac, dst=p[ARP].hwsrc) / ARP(
                    op=2, hwsrc=CFG.guest_mac, psrc=CFG.guest_ip, hwdst=p[ARP].hwsrc,
                    pdst=p[ARP].psrc)))
            return
        self.other.append(frame)

    def other_ip(self) -> list:
        return [Ether(f) for f in self.other if IP in Ether(f)]

    async def connect(self, ip: bytes, port: int, timeout: float = 10.0):
        """Active open from the guest; returns the connection once it is done
        (ESTABLISHED, or CLOSED with its error)."""
        conn = self.tcp.connect(self.now(), GUEST_B, 0, ip, port)
        self.wake.set()
        with trio.fail_after(timeout):
            while conn.state.value in ("SYN-SENT", "SYN-RECEIVED"):
                await trio.sleep(0.005)
        return conn

    async def send_all(self, conn, data: bytes, timeout: float = 30.0) -> None:
        mv = memoryview(data)
        with trio.fail_after(timeout):
            while mv:
                n = conn.send(mv)
                mv = mv[n:]
                self.wake.set()
                if mv:
                    await trio.sleep(0.002)

    async def recv_until_eof(self, conn, timeout: float = 30.0) -> bytes:
        out = bytearray()
        with trio.fail_after(timeout):
            while True:
                out += conn.recv()
                self.wake.set()
                if conn.at_eof:
                    return bytes(out)
                await trio.sleep(0.002)
