"""The NAT's latency paths take no extra scheduler pass (issue 12).

Each test hands the device one TX frame by calling `process` directly, as
the kick handler does, with no await in between, and then looks at the
host side (or the RX ring) at once: what must have happened in that one
step has, or the test fails. Real parts: the server and device as `vhostnet
serve` builds them, the in-process frontend, host sockets on 127.0.0.1.
"""
from __future__ import annotations

import socket

import trio
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from .guest import CFG
from .test_proxy import attach, backend  # noqa: F401  (the fixture)

TX = 1


def _frame(pkt) -> bytes:
    return bytes(Ether(src=CFG.guest_mac, dst=CFG.gateway_mac) / pkt)


def _step(srv) -> None:
    """Run the device's TX work now, in this task, as the kick handler would."""
    conn = srv.current
    conn.device.process(conn.backend.queues, TX, trio.current_time())


async def test_udp_datagram_is_on_the_host_socket_in_the_kick_step(backend, nursery):  # noqa: F811
    srv, _ = backend
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.bind(("127.0.0.1", 0))
    host.setblocking(False)
    port = host.getsockname()[1]
    g = await attach(srv, nursery)
    for i in range(3):                   # the flow's first datagram and later ones
        payload = b"latency %d" % i
        g.fe.post_tx(_frame(IP(src=CFG.guest_ip, dst=CFG.gateway_ip) /
                            UDP(sport=41000, dport=port) / payload))
        _step(srv)
        # No await since the step: the proxy must have sent it already.
        data, _peer = host.recvfrom(2048)
        assert data == payload
        await trio.sleep(0)
    host.close()


async def test_syn_ack_leaves_in_the_step_that_saw_the_syn(backend, nursery):  # noqa: F811
    srv, _ = backend
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    port = ls.getsockname()[1]
    g = await attach(srv, nursery)
    rx = srv.current.backend.queues[0]
    with trio.fail_after(5):             # the guest loop has posted its RX buffers
        while not rx.pending():
            await trio.sleep(0.01)
    g.fe.post_tx(_frame(IP(src=CFG.guest_ip, dst=CFG.gateway_ip) /
                        TCP(sport=42000, dport=port, flags="S", seq=1000)))
    _step(srv)
    # A loopback connect has completed when connect() returns: the SYN-ACK
    # is in the RX ring before any other task ran.
    got = [Ether(f) for _h, f in g.fe.read_rx()]
    synacks = [p for p in got if TCP in p and p[TCP].dport == 42000]
    assert synacks and synacks[0][TCP].flags == "SA" and synacks[0][TCP].ack == 1001
    conn, _ = ls.accept()                # and the host side has the connection
    conn.close()
    # The guest never had that socket: reset it so the flow goes away.
    g.fe.post_tx(_frame(IP(src=CFG.guest_ip, dst=CFG.gateway_ip) /
                        TCP(sport=42000, dport=port, flags="R", seq=1001)))
    g.fe.tx.kick()
    stack = srv.current.device.stack
    with trio.fail_after(5):
        while stack.flows.counts()["tcp"]:
            await trio.sleep(0.01)
    ls.close()


async def test_guest_bytes_are_on_the_host_socket_in_the_kick_step(backend, nursery):  # noqa: F811
    """An established NAT'd connection: the guest's data segment is sent on
    the host socket in the step that saw it (the relay is called from the
    flow event, reactor.py; it used to wait in a task of its own)."""
    srv, _ = backend
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    port = ls.getsockname()[1]
    g = await attach(srv, nursery)
    rx = srv.current.backend.queues[0]
    with trio.fail_after(5):
        while not rx.pending():
            await trio.sleep(0.01)
    ip = IP(src=CFG.guest_ip, dst=CFG.gateway_ip)
    g.fe.post_tx(_frame(ip / TCP(sport=42001, dport=port, flags="S", seq=5000)))
    _step(srv)
    synack = [p for p in (Ether(f) for _h, f in g.fe.read_rx()) if TCP in p and p[TCP].dport == 42001][0]
    conn, _ = ls.accept()
    conn.setblocking(False)
    isn = synack[TCP].seq
    for i in range(3):
        data = b"bytes %d" % i
        g.fe.post_tx(_frame(ip / TCP(sport=42001, dport=port, flags="PA", seq=5001 + 7 * i,
                                     ack=isn + 1) / data))
        _step(srv)
        assert conn.recv(100) == data       # no await since the step
        await trio.sleep(0)
    g.fe.post_tx(_frame(ip / TCP(sport=42001, dport=port, flags="R", seq=5022)))
    g.fe.tx.kick()
    stack = srv.current.device.stack
    with trio.fail_after(5):
        while stack.flows.counts()["tcp"]:
            await trio.sleep(0.01)
    conn.close()
    ls.close()
