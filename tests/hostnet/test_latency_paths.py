"""The NAT's latency paths take no extra scheduler pass (issue 12).

Each test hands the device one TX frame by calling `process` directly, as
the kick handler does, with no await in between, and then looks at the
host side (or the RX ring) at once: what must have happened in that one
step has, or the test fails. Real parts: the server and device as `vhostnet
serve` builds them, the in-process frontend, host sockets on 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys

import pytest
import trio
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from .guest import CFG, FeGuest
from .test_proxy import attach, backend  # noqa: F401  (the fixture)
from vhostnet.hostnet.proxy import SPIN_MISSES
from vhostnet.testing.frontend import Frontend
from vhostnet.virtio import features as F

TX = 1


def _frame(pkt) -> bytes:
    return bytes(Ether(src=CFG.guest_mac, dst=CFG.gateway_mac) / pkt)


def _step(srv) -> None:
    """Run the device's TX work now, in this task, as the kick handler would."""
    conn = srv.current
    conn.device.process(conn.backend.queues, TX, trio.current_time())


GW = IP(src=CFG.guest_ip, dst=CFG.gateway_ip)


async def _attached_with_rx(srv, nursery):
    """The guest, attached, once its loop has posted RX buffers (the ring's pending count)."""
    g = await attach(srv, nursery)
    rx = srv.current.backend.queues[0]
    with trio.fail_after(5):
        while not rx.pending():
            await trio.sleep(0.01)
    return g


async def _quiet_guest(srv):
    """A guest whose frames only the test reads (no loop of its own, whose TCP
    would answer the test's hand-made segments), once it has posted RX buffers."""
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake(features=F.DEFAULT_FEATURES & ~F.OFFLOAD_FEATURES)
    fe.post_rx()
    fe.rx.kick()
    with trio.fail_after(5):
        while srv.current is None or not srv.current.backend.queues[0].pending():
            await trio.sleep(0.01)
    return FeGuest(fe)


def _tcp_to_guest(g, sport: int) -> list:
    """TCP segments in the RX ring for the guest's port SPORT."""
    return [p for p in (Ether(f) for _h, f in g.fe.read_rx()) if TCP in p and p[TCP].dport == sport]


def _syn(srv, g, sport: int, port: int, seq: int):
    """The guest's SYN to the gateway's PORT, in one step; the SYN-ACK segments it got."""
    g.fe.post_tx(_frame(GW / TCP(sport=sport, dport=port, flags="S", seq=seq)))
    _step(srv)
    return _tcp_to_guest(g, sport)


async def _reset(srv, g, sport: int, port: int, seq: int) -> None:
    """The guest resets its connection; wait until the NAT flow is gone."""
    g.fe.post_tx(_frame(GW / TCP(sport=sport, dport=port, flags="R", seq=seq)))
    g.fe.tx.kick()
    stack = srv.current.device.stack
    with trio.fail_after(5):
        while stack.flows.counts()["tcp"]:
            await trio.sleep(0.01)


def _listener():
    """A host TCP listener on 127.0.0.1 and its port."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    return ls, ls.getsockname()[1]


def _udp_host():
    """A non-blocking UDP socket on 127.0.0.1 (a host server the test reads) and its port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s, s.getsockname()[1]


def _received(sock) -> list[bytes]:
    """Every datagram waiting on SOCK now."""
    out = []
    while True:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            return out


@contextlib.contextmanager
def _host_echo(program: str):
    """A host echo server in its own process, as a real one is; yields its port."""
    echo = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        yield int(echo.stdout.readline())
    finally:
        echo.kill()
        echo.wait()


async def test_udp_datagram_is_on_the_host_socket_in_the_kick_step(backend, nursery):  # noqa: F811
    srv, _ = backend
    host, port = _udp_host()
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
    ls, port = _listener()
    g = await _attached_with_rx(srv, nursery)
    # A loopback connect has completed when connect() returns: the SYN-ACK
    # is in the RX ring before any other task ran.
    synacks = _syn(srv, g, 42000, port, 1000)
    assert synacks and synacks[0][TCP].flags == "SA" and synacks[0][TCP].ack == 1001
    conn, _ = ls.accept()                # and the host side has the connection
    conn.close()
    await _reset(srv, g, 42000, port, 1001)   # the guest never had that socket
    ls.close()


async def test_guest_bytes_are_on_the_host_socket_in_the_kick_step(backend, nursery):  # noqa: F811
    """An established NAT'd connection: the guest's data segment is sent on
    the host socket in the step that saw it (the relay is called from the
    flow event, reactor.py; it used to wait in a task of its own)."""
    srv, _ = backend
    ls, port = _listener()
    g = await _attached_with_rx(srv, nursery)
    isn = _syn(srv, g, 42001, port, 5000)[0][TCP].seq
    conn, _ = ls.accept()
    conn.setblocking(False)
    for i in range(3):
        data = b"bytes %d" % i
        g.fe.post_tx(_frame(GW / TCP(sport=42001, dport=port, flags="PA", seq=5001 + 7 * i,
                                     ack=isn + 1) / data))
        _step(srv)
        assert conn.recv(100) == data       # no await since the step
        await trio.sleep(0)
    await _reset(srv, g, 42001, port, 5022)
    conn.close()
    ls.close()


# A UDP echo server in its own process (as a real host server is): prints its port.
_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
"""


@pytest.mark.hostnet_kw(answer_spin=0.5)   # generous: the echo process may wait for a core
async def test_udp_answer_reaches_the_guest_in_the_kick_step(backend, nursery):  # noqa: F811
    """HostProxy.spin: the host's answer to a datagram is in the RX ring when
    the step that sent the datagram returns (no wake-up of the backend)."""
    srv, _ = backend
    with _host_echo(_ECHO) as port:
        g = await _attached_with_rx(srv, nursery)
        device = srv.current.device
        calls = []                       # ring index of each call eventfd write, in order
        signal = device._signal
        device._signal = lambda q: calls.append(q.index) or signal(q)
        for i in range(3):
            payload = b"answer %d" % i
            calls.clear()
            g.fe.tx.set_used_event(g.fe.tx.used_idx())   # as Linux does: interrupt at the next completion
            g.fe.post_tx(_frame(GW / UDP(sport=41001, dport=port) / payload))
            _step(srv)
            got = [Ether(f) for _h, f in g.fe.read_rx()]   # no await since the step
            answers = [p for p in got if UDP in p and p[UDP].dport == 41001]
            assert answers and answers[0][UDP].load == payload
            # The TX call after the RX one, so QEMU raises one interrupt for both.
            assert calls == [0, 1]
            await trio.sleep(0)
        assert device.proxy.counters["spin_answered"] == 3


@pytest.mark.hostnet_kw(answer_spin=0.001)
async def test_udp_spin_backs_off_from_a_silent_host(backend, nursery):  # noqa: F811
    """A host that never answers: SPIN_MISSES spins, then none for SPIN_BACKOFF."""
    srv, _ = backend
    silent, port = _udp_host()
    g = await attach(srv, nursery)
    proxy = srv.current.device.proxy
    calls = []
    real = proxy.spin
    proxy.spin = lambda: calls.append(proxy._spin_resume) or real()
    for i in range(SPIN_MISSES + 4):
        g.fe.post_tx(_frame(IP(src=CFG.guest_ip, dst=CFG.gateway_ip) /
                            UDP(sport=41002, dport=port) / b"x"))
        _step(srv)
        assert silent.recv(100) == b"x"
    assert proxy.counters["spin_backoff"] == 1
    assert "spin_answered" not in proxy.counters
    # Spins after the backoff began return at once (resume time in the future).
    assert all(r > 0 for r in calls[SPIN_MISSES + 1:]) and len(calls) == SPIN_MISSES + 4
    silent.close()


def _tcp_echo(after_eof: str = "") -> str:
    """A TCP echo server program (for _host_echo): prints its port, echoes one
    connection until the guest's FIN, then runs AFTER_EOF (Python lines)."""
    return """
import socket, time
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
while True:
    d = c.recv(2048)
    if not d:
        break
    c.sendall(d)
""" + after_eof


_TCP_ECHO = _tcp_echo()


@pytest.mark.hostnet_kw(answer_spin=0.5)
async def test_tcp_answer_reaches_the_guest_in_the_kick_step(backend, nursery):  # noqa: F811
    """HostProxy.spin on a TCP relay: the host's echo of the guest's bytes is
    in the RX ring when the step that sent them returns."""
    srv, _ = backend
    with _host_echo(_TCP_ECHO) as port:
        g = await _attached_with_rx(srv, nursery)
        isn = _syn(srv, g, 42002, port, 7000)[0][TCP].seq
        g.fe.post_tx(_frame(GW / TCP(sport=42002, dport=port, flags="PA", seq=7001, ack=isn + 1) / b"ping"))
        _step(srv)
        got = _tcp_to_guest(g, 42002)
        assert any(p[TCP].load == b"ping" for p in got if p[TCP].payload), got
        await _reset(srv, g, 42002, port, 7005)


@pytest.mark.hostnet_kw(answer_spin=0.5)
async def test_a_kick_step_leaves_the_flush_to_the_device(backend, nursery):  # noqa: F811
    """The relay calls flush() after each call into the stack; inside the
    device's TX drain neither the pump nor the spin flushes (the drain
    flushes RX after the spin, the server re-arms the timer after the step):
    here the pump's consume and the spin's echo, no proxy flush, and the
    echo still in the RX ring."""
    srv, _ = backend
    with _host_echo(_TCP_ECHO) as port:
        g = await _attached_with_rx(srv, nursery)
        isn = _syn(srv, g, 42005, port, 8000)[0][TCP].seq
        proxy = srv.current.device.proxy
        flushes = []
        real = proxy._flush
        proxy._flush = lambda: flushes.append(1) or real()
        g.fe.post_tx(_frame(GW / TCP(sport=42005, dport=port, flags="PA", seq=8001, ack=isn + 1) / b"ping"))
        _step(srv)
        got = _tcp_to_guest(g, 42005)
        assert any(p[TCP].load == b"ping" for p in got if p[TCP].payload), got
        assert flushes == []
        await _reset(srv, g, 42005, port, 8005)


# A TCP echo server that closes its side as soon as the guest's FIN arrives, as most do.
_TCP_ECHO_CLOSE = _tcp_echo("c.close()\ntime.sleep(60)\n")


@pytest.mark.hostnet_kw(answer_spin=0.5)
async def test_host_fin_rides_with_the_ack_of_the_guests_fin(backend, nursery):  # noqa: F811
    """The guest's FIN goes to the host as SHUT_WR and the spin catches the
    host's EOF: the guest gets the host's FIN in the same step, one segment
    that also ACKs its FIN, not a bare ACK now and the FIN a wake-up later."""
    srv, _ = backend
    with _host_echo(_TCP_ECHO_CLOSE) as port:
        g = await _attached_with_rx(srv, nursery)
        isn = _syn(srv, g, 42003, port, 9000)[0][TCP].seq
        g.fe.post_tx(_frame(GW / TCP(sport=42003, dport=port, flags="FA", seq=9001, ack=isn + 1)))
        _step(srv)
        got = _tcp_to_guest(g, 42003)      # no await since the step
        assert [(p[TCP].flags, p[TCP].seq, p[TCP].ack) for p in got] == [("FA", isn + 1, 9002)]
        g.fe.post_tx(_frame(GW / TCP(sport=42003, dport=port, flags="A", seq=9002, ack=isn + 2)))
        _step(srv)
        assert srv.current.device.stack.flows.counts()["tcp"] == 0


def _epoll_targets(epfd: int) -> dict[int, int]:
    """fd -> registered event mask of the epoll EPFD, as the kernel lists it (proc(5) fdinfo)."""
    out = {}
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        for line in f:
            if line.startswith("tfd:"):
                w = line.split()
                out[int(w[1])] = int(w[3], 16)
    return out


async def test_relay_socket_leaves_epollout_out_and_the_epoll_when_done(backend, nursery):  # noqa: F811
    """A relay's host socket is registered without EPOLLOUT (a socket with
    room would report it at every ACK from its peer: a reactor pass for
    nothing), and leaves the epoll once both directions are closed (it
    would report EPOLLIN and EPOLLHUP until the flow ends). A send that
    blocks adds EPOLLOUT: tests/hostnet/test_proxy.py's slow host reader."""
    import select
    srv, _ = backend
    ls, port = _listener()
    g = await _quiet_guest(srv)
    isn = _syn(srv, g, 42004, port, 3000)[0][TCP].seq
    host, _ = ls.accept()
    epfd = srv.current.device.proxy.reactor.fileno()
    (mask,) = _epoll_targets(epfd).values()
    assert mask & select.EPOLLIN and mask & select.EPOLLET and not mask & select.EPOLLOUT
    g.fe.post_tx(_frame(GW / TCP(sport=42004, dport=port, flags="FA", seq=3001, ack=isn + 1)))
    _step(srv)
    assert host.recv(10) == b""            # SHUT_WR: the guest's FIN is on the host
    assert len(_epoll_targets(epfd)) == 1  # the host's side is still open
    host.close()
    with trio.fail_after(5):               # the reactor reads the host's EOF: FIN to the guest
        while not any(p[TCP].flags.F for p in _tcp_to_guest(g, 42004)):
            await trio.sleep(0.005)
    assert _epoll_targets(epfd) == {}
    assert srv.current.device.stack.flows.counts()["tcp"] == 1   # the flow waits for the guest's ACK
    ls.close()


@pytest.mark.parametrize("posts", [2, None], ids=["taken-in-the-step", "bounded"])
async def test_chains_posted_while_a_step_runs_are_taken_in_that_step(backend, nursery, posts):  # noqa: F811
    """The driver posts another chain while the step is at the NAT (here: from
    inside the proxy's pump, after the step's ring loop ended): the same
    step takes it (drain_tx's rounds), up to TX_ROUNDS; past them the step
    says "more" and leaves the rest for the next one."""
    from vhostnet.net.device import TX_ROUNDS
    srv, _ = backend
    host, port = _udp_host()
    g = await _quiet_guest(srv)
    device = srv.current.device
    sports = iter(range(43000, 43100))      # a new flow each: each is a NAT event, so pump() runs
    pump = device.proxy.pump
    extra = []

    def pump_and_post(*a, **kw):
        pump(*a, **kw)
        if posts is None or len(extra) < posts:
            extra.append(next(sports))
            g.fe.post_tx(_frame(GW / UDP(sport=extra[-1], dport=port) / b"posted"))
    device.proxy.pump = pump_and_post
    g.fe.post_tx(_frame(GW / UDP(sport=next(sports), dport=port) / b"first"))
    more = device.process(srv.current.backend.queues, TX, trio.current_time())
    got = _received(host)
    if posts is None:
        assert more is True and len(got) == TX_ROUNDS
    else:
        assert more is False and got == [b"first"] + [b"posted"] * posts
    device.proxy.pump = pump
    host.close()
