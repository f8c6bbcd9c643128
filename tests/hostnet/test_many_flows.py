"""Many NAT connections at once: the backend holds them all, keeps their bytes
apart, and lets go of every flow and host socket when they close.

Real parts, as in test_proxy.py: the vhost-user server and device as `vhostnet
serve` builds them, the in-process frontend as QEMU, our TCP as the guest's
(tests/hostnet/guest.py), and a real echo server on 127.0.0.1 reached through
the gateway 10.0.2.2. Not timed: scripts/bench_scale.py measures RSS and the
per-packet cost with 1,000 connections.
"""
from __future__ import annotations

import hashlib

import pytest
import trio

from vhostnet.launch.serve import make_server, serve_backend
from vhostnet.observe.control import ControlServer
from vhostnet.observe.report import STATS_LISTED_MAX

from ..observe import ask
from .guest import GUEST_B, GW_B
from .test_proxy import attach, fds, hostnet, tcp_server

N_CONNS = 200
BATCH = 50                  # under the NAT's 128 held SYNs (FlowConfig.max_half_open)
PAYLOAD = 3000              # more than one MSS: each echo is several segments both ways
TIMEOUT = 60.0


def payload(i: int) -> bytes:
    """Bytes of connection I's own (a mix-up between flows shows as a mismatch)."""
    seed = hashlib.sha256(b"flow %d" % i).digest()
    return (b"%05d:" % i + seed * (PAYLOAD // len(seed) + 1))[:PAYLOAD]


@pytest.fixture
async def backend(tmp_path, nursery):
    """(server, control): the backend with its default host network (caps included)."""
    srv = make_server(str(tmp_path / "v.sock"), hostnet=hostnet())
    srv.listen()
    ctl = ControlServer(srv, str(tmp_path / "v.sock.ctl"))
    ctl.listen()
    await nursery.start(serve_backend, srv, ctl)
    yield srv, ctl


async def echo(s) -> None:
    with s:
        while True:
            data = await s.recv(65536)
            if not data:
                return                      # the guest's FIN: close our side too
            await s.send(data)


async def nat_now(ctl) -> tuple[int, int]:
    """(TCP flows, host sockets held by the proxy), from the stats document."""
    doc = await ask(ctl.path, "stats")
    return doc["nat"]["counts"]["tcp"], doc["nat"]["proxy"]["relays"]


async def test_backend_holds_many_flows_keeps_them_apart_and_releases_them(backend, nursery):
    srv, ctl = backend
    port = await tcp_server(nursery, echo)
    g = await attach(srv, nursery)
    before = fds()

    conns = []
    with trio.fail_after(TIMEOUT):
        for k in range(0, N_CONNS, BATCH):
            new = [g.tcp.connect(g.now(), GUEST_B, 0, GW_B, port) for _ in range(BATCH)]
            g.wake.set()
            while any(c.state.value in ("SYN-SENT", "SYN-RECEIVED") for c in new):
                await trio.sleep(0.01)
            conns += new
    assert [c.state.value for c in conns] == ["ESTABLISHED"] * N_CONNS, \
        {c.error for c in conns if c.error}
    assert await nat_now(ctl) == (N_CONNS, N_CONNS)
    assert fds() >= before + N_CONNS         # one host socket per flow, at least
    # stats lists a bounded number of flows and connections, and says how many there are.
    doc = await ask(ctl.path, "stats")
    assert (doc["nat"]["flows_total"], len(doc["nat"]["flows"])) == (N_CONNS, STATS_LISTED_MAX)
    listed = [t for t in doc["stack"]["tcp"] if t["state"] != "LISTEN"]
    assert (doc["stack"]["tcp_total"], len(listed)) == (N_CONNS, STATS_LISTED_MAX)

    # Every connection sends its own bytes, round-robin, and must get exactly them back.
    want = [payload(i) for i in range(N_CONNS)]
    left = [memoryview(w) for w in want]
    got = [bytearray() for _ in range(N_CONNS)]
    with trio.fail_after(TIMEOUT):
        while any(len(b) < PAYLOAD for b in got):
            for i, c in enumerate(conns):
                if left[i]:
                    left[i] = left[i][c.send(left[i]):]
                got[i] += c.recv()
            g.wake.set()
            await trio.sleep(0.005)
    bad = [i for i in range(N_CONNS) if bytes(got[i]) != want[i]]
    assert not bad, f"{len(bad)} connections got other bytes, first #{bad[0]}: {bytes(got[bad[0]][:12])!r}"

    # Close them all: no flow, no host socket and no fd may outlive them.
    for c in conns:
        c.close()
    g.wake.set()
    open_conns = nat = None
    with trio.move_on_after(TIMEOUT):
        while True:
            open_conns = sum(c.state.value not in ("CLOSED", "TIME-WAIT") for c in conns)
            nat = await nat_now(ctl)
            if not open_conns and nat == (0, 0) and fds() <= before:
                break
            g.wake.set()
            await trio.sleep(0.05)
    assert (open_conns, nat, fds() - before) == (0, (0, 0), 0), \
        "guest connections still open, (NAT flows, host sockets), fds above the start"
    assert all(c.error is None for c in conns), {c.error for c in conns}
    counters = (await ask(ctl.path, "stats"))["nat"]["counters"]
    assert counters["nat_tcp_requests"] == N_CONNS
    assert counters.get("nat_tcp_flow_limit", 0) == 0
    assert srv.current.device.proxy.relays == {}
