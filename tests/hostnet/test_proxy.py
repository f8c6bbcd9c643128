"""The host proxy with real parts: the vhost-user server and device as
`vhostnet serve` builds them, the in-process frontend as QEMU, our TCP as
the guest's (tests/hostnet/guest.py), and real host servers on 127.0.0.1
reached through the gateway 10.0.2.2."""
from __future__ import annotations

import hashlib
import os
import socket

import pytest
import trio
from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Raw

from stack.flows import FlowConfig
from stack.tcp.config import TcpConfig
from vhostnet.hostnet import ForwardSpec, Forwards, HostNet, HostNetConfig
from vhostnet.launch.serve import make_server, serve_backend
from vhostnet.observe.control import ControlServer

from ..observe import ask, check_doc
from .guest import GUEST_B, GW_B, FeGuest

GUEST_IP = "10.0.2.15"


def hostnet(forwards=(), **kw) -> HostNet:
    return HostNet(HostNetConfig(**kw), Forwards([ForwardSpec.parse(f) for f in forwards],
                                                  GUEST_IP))


@pytest.fixture
async def backend(tmp_path, nursery, request):
    """(server, control, device) with the host network given by the test's
    `hostnet_kw` marker (default: everything on)."""
    m = request.node.get_closest_marker("hostnet_kw")
    hn = hostnet(**(m.kwargs if m else {}))
    srv = make_server(str(tmp_path / "v.sock"), hostnet=hn)
    srv.listen()
    ctl = ControlServer(srv, str(tmp_path / "v.sock.ctl"))
    ctl.listen()
    await nursery.start(serve_backend, srv, ctl)
    yield srv, ctl


async def attach(srv, nursery, **kw) -> FeGuest:
    g = await FeGuest.attach(srv, nursery, **kw)
    with trio.fail_after(5):
        while srv.current is None:
            await trio.sleep(0.005)
    return g


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def tcp_server(nursery, handler, rcvbuf: int | None = None):
    """A real TCP server on 127.0.0.1; returns its port. rcvbuf: SO_RCVBUF
    on the listener, so accepted sockets start with it (and a window scale to fit)."""
    ls = trio.socket.socket()
    if rcvbuf:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await ls.bind(("127.0.0.1", 0))
    ls.listen(64)

    async def loop():
        with ls:
            while True:
                s, _ = await ls.accept()
                nursery.start_soon(handler, s)
    nursery.start_soon(loop)
    return ls.getsockname()[1]


async def recv_all(s) -> bytes:
    out = bytearray()
    while True:
        d = await s.recv(65536)
        if not d:
            return bytes(out)
        out += d


# -- TCP --------------------------------------------------------------------------

async def test_tcp_through_the_gateway_to_a_host_server_both_ways(backend, nursery):
    srv, ctl = backend
    got = {}

    async def handler(s):
        with s:
            data = await recv_all(s)          # until the guest's FIN
            got["data"] = data
            await s.send(hashlib.sha256(data).digest() * 1000)   # 32 KB back, then FIN

    port = await tcp_server(nursery, handler)
    g = await attach(srv, nursery)
    conn = await g.connect(GW_B, port)
    assert conn.state.value == "ESTABLISHED"
    payload = os.urandom(1 << 20)
    await g.send_all(conn, payload)
    conn.close()
    back = await g.recv_until_eof(conn)
    assert got["data"] == payload
    assert back == hashlib.sha256(payload).digest() * 1000
    doc = await ask(ctl.path, "stats")
    assert doc["nat"]["counters"]["nat_tcp_requests"] == 1
    with trio.fail_after(5):                  # the flow ends once both FINs are through
        while srv.current.device.stack.flows.counts()["tcp"]:
            await trio.sleep(0.01)


async def test_stats_list_a_live_flow_like_ss(backend, nursery):
    srv, ctl = backend
    release = trio.Event()

    async def handler(s):
        with s:
            await s.recv(100)
            await s.send(b"12345")
            await release.wait()

    port = await tcp_server(nursery, handler)
    g = await attach(srv, nursery)
    conn = await g.connect(GW_B, port)
    await g.send_all(conn, b"abc")
    with trio.fail_after(5):
        while conn.readable < 5:
            await trio.sleep(0.005)
    doc = await ask(ctl.path, "stats")
    check_doc(doc, "stats", allow_missing=["stack.reassembly", "stack.arp[].pending",
                                           "forwards[]"])
    (f,) = doc["nat"]["flows"]
    assert f["proto"] == "tcp" and f["direction"] == "out" and f["state"] == "ESTABLISHED"
    assert f["guest"] == f"{GUEST_IP}:{conn.local_port}" and f["remote"] == f"10.0.2.2:{port}"
    assert f["host"].endswith(f"->127.0.0.1:{port}")
    assert (f["bytes_from_guest"], f["bytes_to_guest"]) == (3, 5)
    from vhostnet.observe.render import stats_text
    text = stats_text(doc)
    assert f"10.0.2.2:{port}" in text and "ESTABLISHED" in text
    release.set()


async def test_refused_connect_is_a_reset_and_no_fd_leaks(backend, nursery):
    srv, _ = backend
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                 # nobody listens there now
    g = await attach(srv, nursery)
    before = fds()
    for _ in range(20):
        conn = await g.connect(GW_B, port)
        assert conn.state.value == "CLOSED" and conn.error == "connection refused"
    assert fds() <= before
    proxy = srv.current.device.proxy
    assert proxy.counters["tcp_connect_refused"] == 20


async def test_host_reset_reaches_the_guest_as_rst(backend, nursery):
    srv, _ = backend

    async def handler(s):
        await s.recv(10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.close()                             # RST

    port = await tcp_server(nursery, handler)
    g = await attach(srv, nursery)
    conn = await g.connect(GW_B, port)
    await g.send_all(conn, b"hello")
    with trio.fail_after(5):
        while conn.state.value != "CLOSED":
            await trio.sleep(0.005)
    assert "reset" in conn.error


async def test_guest_reset_reaches_the_host_as_rst(backend, nursery):
    srv, _ = backend
    result = {}
    done = trio.Event()

    async def handler(s):
        with s:
            try:
                result["data"] = await recv_all(s)
            except ConnectionResetError:
                result["reset"] = True
            done.set()

    port = await tcp_server(nursery, handler)
    g = await attach(srv, nursery)
    conn = await g.connect(GW_B, port)
    await g.send_all(conn, b"x")
    await trio.sleep(0)
    conn.abort()
    g.wake.set()
    with trio.fail_after(5):
        await done.wait()
    assert result.get("reset") is True


async def test_slow_host_reader_closes_the_guests_window(backend, nursery):
    srv, _ = backend
    go = trio.Event()
    got = {}

    async def handler(s):
        await go.wait()                       # read nothing until told
        with s:
            got["data"] = await recv_all(s)

    port = await tcp_server(nursery, handler, rcvbuf=65536)
    g = await attach(srv, nursery)
    conn = await g.connect(GW_B, port)
    payload = os.urandom(8 << 20)
    sent = 0
    flows = srv.current.device.stack.flows
    fid = flows.snapshot(0)[0]["id"]
    cap = srv.current.device.stack.tcp.config.rcvbuf
    mss = conn.mss
    with trio.fail_after(30):
        # The guest writes as fast as it may, until nothing moves for half a
        # second (the host kernel's buffers grow while it autotunes).
        while True:
            before = sent
            for _ in range(50):
                sent += conn.send(memoryview(payload)[sent:])
                g.wake.set()
                await trio.sleep(0.01)
            if sent == before:
                break
    # The host kernel took what its buffers hold, the stack one receive
    # buffer (its window is shut, up to a sliver under one segment that
    # sender SWS avoidance leaves), and the guest holds the rest.
    assert sent < len(payload)
    assert cap - mss < flows.readable(fid) <= cap
    assert conn.snd_wnd < mss
    go.set()
    with trio.fail_after(60):
        while sent < len(payload):
            sent += conn.send(memoryview(payload)[sent:])
            g.wake.set()
            await trio.sleep(0.002)
    conn.close()
    with trio.fail_after(60):
        while "data" not in got:
            await trio.sleep(0.01)
    assert got["data"] == payload


async def test_slow_guest_closes_the_host_side(backend, nursery):
    srv, _ = backend
    state = {"sent": 0}
    blob = os.urandom(16 << 20)
    done = trio.Event()

    async def handler(s):
        with s:
            mv = memoryview(blob)
            while mv:
                n = await s.send(mv[:65536])
                state["sent"] += n
                mv = mv[n:]
            done.set()

    port = await tcp_server(nursery, handler)
    g = await attach(srv, nursery, tcp_config=TcpConfig(rcvbuf=16384))
    conn = await g.connect(GW_B, port)
    flows = srv.current.device.stack.flows
    fid = flows.snapshot(0)[0]["id"]
    # The guest reads nothing: the host sender stalls once the guest's
    # window, the stack's send buffer and the host kernel's buffers are full.
    with trio.fail_after(20):
        while True:
            before = state["sent"]
            await trio.sleep(0.5)
            if state["sent"] == before and flows.guest_window(fid) == 0:
                break
    sndbuf = srv.current.device.stack.tcp.config.sndbuf
    # The proxy stopped reading the host socket with the stack's send buffer
    # at least half full (the writer wakes at half, like Linux's sk_stream_wspace).
    assert flows.send_space(fid) < sndbuf // 2
    assert conn.readable <= 16384
    assert state["sent"] < 8 << 20, "the host side never felt the back-pressure"
    assert len(srv.current.device.stack.tcp.connections[0].sndbuf) <= sndbuf
    assert not done.is_set()
    data = await g.recv_until_eof(conn, timeout=120)
    assert data == blob


# -- UDP and ICMP ---------------------------------------------------------------------

async def test_udp_round_trip_and_port_unreachable(backend, nursery):
    srv, _ = backend
    us = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await us.bind(("127.0.0.1", 0))
    port = us.getsockname()[1]

    async def echo():
        while True:
            d, a = await us.recvfrom(65536)
            await us.sendto(d.upper(), a)
    nursery.start_soon(echo)
    g = await attach(srv, nursery)
    g.send_ip(IP(src=GUEST_IP, dst="10.0.2.2") / UDP(sport=40000, dport=port) / Raw(b"hello"))
    with trio.fail_after(5):
        while not any(UDP in p for p in g.other_ip()):
            await trio.sleep(0.005)
    p = [p for p in g.other_ip() if UDP in p][0]
    assert p[IP].src == "10.0.2.2" and p[UDP].sport == port and p[UDP].dport == 40000
    assert p[Raw].load == b"HELLO"
    # A port nobody has: the host's ICMP port unreachable comes back as ours.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
    s.close()
    g.other.clear()
    for _ in range(3):                        # the first send may beat the error
        g.send_ip(IP(src=GUEST_IP, dst="10.0.2.2") / UDP(sport=40001, dport=closed) / Raw(b"?"))
        await trio.sleep(0.05)
    with trio.fail_after(5):
        while not any(ICMP in p for p in g.other_ip()):
            await trio.sleep(0.01)
    icmp = [p for p in g.other_ip() if ICMP in p][0]
    assert (icmp[ICMP].type, icmp[ICMP].code) == (3, 3)
    assert bytes(icmp[ICMP].payload)[22:24] == closed.to_bytes(2, "big")


def task_count() -> int:
    """Every task in this trio run."""
    n, todo = 0, [trio.lowlevel.current_root_task()]
    while todo:
        t = todo.pop()
        n += 1
        for nursery in t.child_nurseries:
            todo.extend(nursery.child_tasks)
    return n


async def test_udp_flows_cost_no_task_and_a_burst_past_the_budget_all_arrives(backend, nursery):
    """Datagram flows' sockets are the reactor's (level-triggered), so a flow
    adds no task, and a host burst longer than one pass's DATAGRAM_BUDGET is
    still delivered whole (an edge-triggered socket would stop after 16)."""
    from vhostnet.hostnet.datagram import DATAGRAM_BUDGET
    srv, _ = backend
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.bind(("127.0.0.1", 0))
    us = trio.socket.from_stdlib_socket(host)
    port = us.getsockname()[1]
    g = await attach(srv, nursery)
    burst = 3 * DATAGRAM_BUDGET + 1

    def udp_in() -> list:
        return [p for p in g.other_ip() if UDP in p and p[UDP].sport == port]

    g.send_ip(IP(src=GUEST_IP, dst="10.0.2.2") / UDP(sport=41000, dport=port) / Raw(b"first"))
    with trio.fail_after(5):
        _d, peer = await us.recvfrom(100)
    tasks = task_count()
    for sport in range(41001, 41011):         # ten more flows
        g.send_ip(IP(src=GUEST_IP, dst="10.0.2.2") / UDP(sport=sport, dport=port) / Raw(b"more"))
    with trio.fail_after(5):
        for _ in range(10):
            await us.recvfrom(100)
    assert srv.current.device.stack.flows.counts()["udp"] == 11
    assert task_count() == tasks
    for i in range(burst):                    # all at once, before the backend looks
        host.sendto(b"b%03d" % i, peer)
    with trio.fail_after(10):
        while len(udp_in()) < burst:
            await trio.sleep(0.005)
    assert sorted(p[Raw].load for p in udp_in()) == [b"b%03d" % i for i in range(burst)]


@pytest.mark.hostnet_kw(flows=FlowConfig(max_udp=40, udp_idle=60.0))
async def test_udp_spray_is_capped_and_fds_stay_bounded(backend, nursery):
    srv, _ = backend
    g = await attach(srv, nursery)
    before = fds()
    for sport in range(20000, 20500):
        g.send_ip(IP(src=GUEST_IP, dst="10.0.2.2") / UDP(sport=sport, dport=9999) / Raw(b"s"))
    flows = srv.current.device.stack.flows
    with trio.fail_after(10):
        while srv.current.device.stack.counters["nat_udp_flow_limit"] < 460:
            await trio.sleep(0.01)
    assert flows.counts()["udp"] == 40
    assert fds() - before <= 40


@pytest.mark.hostnet_kw(flows=FlowConfig(max_half_open=16, max_tcp=64))
async def test_syn_flood_is_capped(backend, nursery):
    srv, _ = backend
    from scapy.layers.inet import TCP
    # A host listener that never accepts, with the smallest backlog: once its
    # queue is full, Linux drops further SYNs on loopback, so the proxy's
    # connects hang half-open. Nothing leaves the machine.
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    port = ls.getsockname()[1]
    g = await attach(srv, nursery)
    before = fds()
    for sport in range(30000, 30400):
        g.send_ip(IP(src=GUEST_IP, dst="10.0.2.2") / TCP(sport=sport, dport=port, flags="S"))
    c = srv.current.device.stack
    # The listener's queue takes one or two connections, which leave the
    # half-open count (a loopback connect that completes is accepted in the
    # step that saw its SYN, and the guest, which never sent that SYN from a
    # socket, resets it): allow for them both ways.
    slack = 2
    with trio.fail_after(10):
        while c.all_counters().get("tcp_listen_overflow", 0) < 400 - 16 - slack:
            await trio.sleep(0.01)
    assert 16 - slack <= c.flows.counts()["tcp"] <= 16 + slack
    assert fds() - before <= 16 + slack
    ls.close()


@pytest.mark.hostnet_kw(restrict=True)
async def test_restrict_allows_nothing_outbound(backend, nursery):
    srv, _ = backend
    accepted = []

    async def handler(s):
        accepted.append(s)

    port = await tcp_server(nursery, handler)
    g = await attach(srv, nursery)
    conn = await g.connect(GW_B, port)
    assert conn.state.value == "CLOSED" and accepted == []
    echo = await g.connect(GW_B, 7)           # the built-in services still answer
    assert echo.state.value == "ESTABLISHED"


@pytest.mark.hostnet_kw(map_host_loopback=False)
async def test_no_map_host_loopback_refuses_the_gateway(backend, nursery):
    srv, _ = backend
    accepted = []

    async def handler(s):
        accepted.append(s)

    port = await tcp_server(nursery, handler)
    g = await attach(srv, nursery)
    conn = await g.connect(GW_B, port)
    assert conn.state.value == "CLOSED" and conn.error == "connection refused"
    assert accepted == []


# -- forwards ------------------------------------------------------------------------

async def _guest_echo_server(g, port: int):
    accepted = []

    def on_accept(conn):
        accepted.append(conn)

        def pump(c):
            while c.readable and c.send_space:
                c.send(c.recv(c.send_space))
            if c.at_eof and c.state.value == "CLOSE-WAIT":
                c.close()
            g.wake.set()
        conn.on_readable = conn.on_writable = pump
        pump(conn)
    g.tcp.listen(GUEST_B, port, on_accept)
    return accepted


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


async def _echo_through(port: int, data: bytes) -> bytes:
    s = trio.socket.socket()
    with s:
        await s.connect(("127.0.0.1", port))
        await s.send(data)
        s.shutdown(socket.SHUT_WR)
        return await recv_all(s)


async def test_forward_reaches_a_guest_server_and_one_added_live(tmp_path, nursery):
    p1 = _free_port()
    hn = hostnet(forwards=[f"tcp:127.0.0.1:{p1}-:2222"])
    srv = make_server(str(tmp_path / "v.sock"), hostnet=hn)
    srv.listen()
    ctl = ControlServer(srv, str(tmp_path / "v.sock.ctl"))
    ctl.listen()
    await nursery.start(serve_backend, srv, ctl)
    g = await attach(srv, nursery)
    accepted = await _guest_echo_server(g, 2222)
    data = os.urandom(300_000)
    with trio.fail_after(30):
        back = await _echo_through(p1, data)
    assert back == data and len(accepted) == 1
    assert accepted[0].remote_ip == GW_B
    # Live: add a second forward to another guest port, use it, remove it.
    await _guest_echo_server(g, 8080)
    info = await ask(ctl.path, "forward_add", spec="tcp:127.0.0.1:0-:8080")
    p2 = int(info["host"].rsplit(":", 1)[1])
    assert info["guest"] == f"{GUEST_IP}:8080"
    with trio.fail_after(30):
        assert await _echo_through(p2, b"live forward") == b"live forward"
    listed = await ask(ctl.path, "forward_list")
    assert {f["host"] for f in listed} == {f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"}
    assert [f["accepted"] for f in listed if f["host"].endswith(str(p2))] == [1]
    doc = await ask(ctl.path, "stats")
    check_doc(doc, "stats", allow_missing=["stack.reassembly", "stack.arp[].pending",
                                           "nat.proxy.counters", "nat.flows[]"])
    await ask(ctl.path, "forward_remove", spec=f"tcp:127.0.0.1:{p2}-:8080")
    with pytest.raises(OSError):
        with socket.create_connection(("127.0.0.1", p2), timeout=2):
            pass


async def test_udp_forward(tmp_path, nursery):
    p1 = _free_port()
    hn = hostnet(forwards=[f"udp:127.0.0.1:{p1}-:5353"])
    srv = make_server(str(tmp_path / "v.sock"), hostnet=hn)
    srv.listen()
    await nursery.start(serve_backend, srv)
    g = await attach(srv, nursery)
    c = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await c.bind(("127.0.0.1", 0))
    await c.sendto(b"question", ("127.0.0.1", p1))
    with trio.fail_after(5):
        while not any(UDP in p for p in g.other_ip()):
            await trio.sleep(0.005)
    q = [p for p in g.other_ip() if UDP in p][0]
    assert q[IP].src == "10.0.2.2" and q[UDP].dport == 5353 and q[Raw].load == b"question"
    g.send_ip(IP(src=GUEST_IP, dst="10.0.2.2") / UDP(sport=5353, dport=q[UDP].sport)
              / Raw(b"answer"))
    with trio.fail_after(5):
        data, addr = await c.recvfrom(100)
    assert data == b"answer" and addr == ("127.0.0.1", p1)


def test_forward_spec_syntax():
    s = ForwardSpec.parse("tcp:127.0.0.1:2222-:22")
    assert (s.proto, s.host_addr, s.host_port, s.guest_addr, s.guest_port) == \
        ("tcp", "127.0.0.1", 2222, "", 22)
    assert ForwardSpec.parse("udp::53-10.0.2.15:5353").guest_addr == "10.0.2.15"
    assert ForwardSpec.parse(":8080-:80").proto == "tcp"           # QEMU: tcp by default
    assert str(ForwardSpec.parse("tcp:127.0.0.1:2222-:22")) == "tcp:127.0.0.1:2222-:22"
    for bad in ("tcp:1.2.3.4:22", "sctp::1-:2", "tcp:1.2.3:22-:22", "tcp::99999-:22",
                "tcp::22-:0", "tcp:host:22-:22"):
        with pytest.raises(ValueError):
            ForwardSpec.parse(bad)
