"""The UDP express (vhostnet/hostnet/express.py, vhostnet/native/express.c).

Two kinds of test:
- the C call against the stack itself: whatever frame the express takes,
  the stack's own path would have handed to the same flow with the same
  payload (hypothesis mutates a valid frame's headers; scapy builds them);
  and each of its checks refuses what it should, with nothing sent;
- the express in the backend, with the in-process frontend and real host
  sockets on 127.0.0.1: an established flow's datagrams take it and the
  counts are the stack path's; a refused send still becomes ICMP port
  unreachable; a local UDP bind, a flow's end and --no-express each do what
  express.py says.
"""
from __future__ import annotations

import errno
import select
import socket

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from stack import Frame, NetConfig, Stack
from stack.flows import FlowConfig, UdpDatagram
from vhostnet import native
from vhostnet.observe.render import stats_text

from ..observe import ask
from .guest import CFG
from .test_latency_paths import (GW, _ECHO, _attached_with_rx, _frame, _host_echo, _received, _step,
                                 _udp_host)
from .test_proxy import backend, fds  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=f"no UDP express: {native.REASON}")

SPORT, DPORT = 40100, 40200


class Table:
    """The C table by hand: one entry for (gateway, SPORT, DPORT) on SOCK."""

    def __init__(self, sock: socket.socket, guest_mac: bytes = CFG.guest_mac_b):
        ffi, lib = native.ffi, native.lib
        self.lib = lib
        self.mask = 15
        self.idx = ffi.new("int32_t[]", self.mask + 1)
        self.ent = ffi.new("vn_xflow[]", 4)
        for e in range(4):
            self.ent[e].fd = -1
        lib.vn_x_rebuild(self.idx, self.mask, self.ent, 4)
        self.dirty = ffi.new("uint32_t[]", 4)
        self.nd = ffi.new("uint32_t[1]")
        self.conf = ffi.new("vn_xconf *")
        self.conf.gw_mac = list(CFG.gateway_mac_b)
        self.conf.guest_mac = list(guest_mac)
        self.conf.guest_ip = list(CFG.guest_ip_b)
        self.key = int.from_bytes(CFG.gateway_ip_b, "big") << 32 | SPORT << 16 | DPORT
        self.ent[0].fd = sock.fileno()
        assert lib.vn_x_insert(self.idx, self.mask, self.ent, self.key, 0) >= 0

    def send(self, frame: bytes, csum_ok: bool = False) -> int:
        return self.lib.vn_x_send(frame, len(frame), int(csum_ok), self.conf, self.idx, self.mask,
                                  self.ent, self.dirty, self.nd)


@pytest.fixture
def pair():
    """A host receiver on 127.0.0.1 and a socket connect()ed to it (the relay's)."""
    rx, _port = _udp_host()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    yield rx, tx
    rx.close()
    tx.close()


def _valid(payload: bytes = b"express", **ip) -> bytes:
    return _frame(IP(src=CFG.guest_ip, dst=CFG.gateway_ip, **ip) / UDP(sport=SPORT, dport=DPORT) / payload)


def test_a_valid_datagram_is_sent_and_counted(pair):
    rx, tx = pair
    t = Table(tx)
    assert t.send(_valid(b"one")) == 0
    assert t.send(_valid(b"two!")) == 0
    assert _received(rx) == [b"one", b"two!"]
    x = t.ent[0]
    assert (x.sent, x.dropped, x.failed, x.bytes, x.dirty) == (2, 0, 0, 7, 1)
    assert t.nd[0] == 1 and t.dirty[0] == 0        # listed once


def _bad_ip_checksum() -> bytes:
    f = bytearray(_valid())
    f[24] ^= 0xFF
    return bytes(f)


def _bad_udp_checksum() -> bytes:
    f = bytearray(_valid())
    f[40] ^= 0xFF
    return bytes(f)


def _udp_longer_than_ip() -> bytes:
    f = bytearray(_valid())
    f[38:40] = (len(f) - 14 - 20 + 2).to_bytes(2, "big")
    return bytes(f)


@pytest.mark.parametrize("frame", [
    pytest.param(bytes(Ether(src=CFG.guest_mac, dst="ff:ff:ff:ff:ff:ff") / IP(src=CFG.guest_ip, dst=CFG.gateway_ip)
                       / UDP(sport=SPORT, dport=DPORT) / b"x"), id="broadcast-mac"),
    pytest.param(bytes(Ether(src="02:00:00:00:00:99", dst=CFG.gateway_mac) / IP(src=CFG.guest_ip, dst=CFG.gateway_ip)
                       / UDP(sport=SPORT, dport=DPORT) / b"x"), id="other-source-mac"),
    pytest.param(_frame(IP(src="10.0.2.16", dst=CFG.gateway_ip) / UDP(sport=SPORT, dport=DPORT) / b"x"),
                 id="other-source-ip"),
    pytest.param(_valid(options=b"\x01\x01\x01\x00"), id="ip-options"),
    pytest.param(_valid(flags="MF"), id="first-fragment"),
    pytest.param(_valid(frag=8), id="later-fragment"),
    pytest.param(_valid(ttl=1), id="ttl-1"),
    pytest.param(_bad_ip_checksum(), id="ip-checksum"),
    pytest.param(_bad_udp_checksum(), id="udp-checksum"),
    pytest.param(_udp_longer_than_ip(), id="udp-length"),
    pytest.param(_valid()[:41], id="truncated"),
    pytest.param(_frame(IP(src=CFG.guest_ip, dst=CFG.gateway_ip) / UDP(sport=SPORT, dport=DPORT + 1) / b"x"),
                 id="no-such-flow"),
    pytest.param(_frame(IP(src=CFG.guest_ip, dst="10.0.2.3") / UDP(sport=SPORT, dport=DPORT) / b"x"),
                 id="other-destination"),
])
def test_what_the_express_leaves_to_the_stack(pair, frame):
    rx, tx = pair
    t = Table(tx)
    assert t.send(frame) == -1
    assert _received(rx) == []
    assert t.nd[0] == 0 and t.ent[0].sent == 0


def test_a_driver_vouching_for_the_checksum_is_believed(pair):
    """NEEDS_CSUM or DATA_VALID (csum_ok): the UDP checksum is not the express's to check, as in the stack."""
    rx, tx = pair
    t = Table(tx)
    assert t.send(_bad_udp_checksum(), csum_ok=True) == 0
    assert _received(rx) == [b"express"]


def test_a_refused_send_is_counted_with_its_errno():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    rx.close()                              # now nobody listens: ICMP port unreachable
    tx.send(b"first")                       # loopback: the error is pending when send returns
    po = select.poll()
    po.register(tx, select.POLLERR)
    assert po.poll(5000), "no ICMP error pending"      # POLLERR: seen, not consumed
    t = Table(tx)
    assert t.send(_valid()) == 0
    x = t.ent[0]
    assert (x.sent, x.failed, x.err) == (0, 1, errno.ECONNREFUSED)
    tx.close()


def _stack() -> Stack:
    s = Stack(NetConfig(), flows=FlowConfig(), services=False)
    # The flow exists (its first datagram went the stack's way), and the stack knows the guest's MAC.
    s.receive(Frame(_valid(b"first")), 0.0)
    ev = s.flows.next_event()
    assert type(ev) is UdpDatagram and ev.payload == b"first"
    return s


_VALID = _valid(b"property payload")
# Header bytes: Ethernet (0-13), IPv4 (14-33), UDP (34-41).
_positions = st.integers(min_value=0, max_value=41)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(_positions, st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.integers(min_value=0, max_value=len(_VALID)), csum_ok=st.booleans())
def test_what_the_express_takes_the_stack_would_have_handed_to_the_flow(pair, edits, cut, csum_ok):
    rx, tx = pair
    f = bytearray(_VALID)
    for pos, value in edits:
        f[pos] = value
    frame = bytes(f[:cut] if cut >= 14 else f)
    t = Table(tx)
    took = t.send(frame, csum_ok) >= 0
    sent = _received(rx)
    s = _stack()
    s.receive(Frame(frame, csum_valid=csum_ok), 1.0)
    handed = []
    while (ev := s.flows.next_event()) is not None:
        if type(ev) is UdpDatagram and (ev.guest_ip, ev.guest_port, ev.dst_ip, ev.dst_port) \
                == (CFG.guest_ip_b, SPORT, CFG.gateway_ip_b, DPORT):
            handed.append(ev.payload)
    if took:
        assert handed == sent and len(sent) == 1
    else:
        assert sent == []


def test_the_unmutated_frame_is_taken(pair):
    """The property above is not vacuous: the frame it starts from is the express's."""
    rx, tx = pair
    assert Table(tx).send(_VALID) == 0
    assert _received(rx) == [b"property payload"]


# ------------------------------------------------------------------ in the backend

def _express(srv):
    return srv.current.device.express


@pytest.mark.parametrize("on", [
    pytest.param(True, marks=pytest.mark.hostnet_kw(answer_spin=0.5), id="express"),
    pytest.param(False, marks=pytest.mark.hostnet_kw(answer_spin=0.5, express=False), id="no-express")])
async def test_an_established_flow_takes_the_express_and_counts_alike(backend, nursery, on):  # noqa: F811
    """The same datagrams with and without the express: the same answers,
    the same stack counters and flow bytes; only the express's own count differs."""
    srv, ctl = backend
    n = 5
    with _host_echo(_ECHO) as port:
        g = await _attached_with_rx(srv, nursery)
        device = srv.current.device
        answers = []
        for i in range(n):
            payload = b"datagram %d" % i
            g.fe.post_tx(_frame(GW / UDP(sport=41500, dport=port) / payload))
            _step(srv)
            answers += [p[UDP].load for p in (Ether(f) for _h, f in g.fe.read_rx())
                        if UDP in p and p[UDP].dport == 41500]
            await trio.sleep(0)
        assert answers == [b"datagram %d" % i for i in range(n)]
        c = device.stack.counters
        assert c["udp_rx"] == n and c["udp_tx"] == n
        [flow] = [f for f in device.stack.flows.snapshot(trio.current_time()) if f["proto"] == "udp"]
        assert flow["bytes_from_guest"] == sum(len(b"datagram %d" % i) for i in range(n))
        assert flow["bytes_to_guest"] == flow["bytes_from_guest"]
        doc = await ask(ctl.path, "stats")
        if on:
            xp = device.express
            assert xp is not None and len(xp) == 1
            assert xp.snapshot()["datagrams"] == n - 1      # all but the flow's first
            assert doc["nat"]["proxy"]["express"]["datagrams"] == n - 1
            assert f"UDP express: 1/512 flows, {n - 1} datagrams" in stats_text(doc)
        else:
            assert device.express is None
            assert "express" not in doc["nat"]["proxy"] and "UDP express" not in stats_text(doc)


@pytest.mark.hostnet_kw(answer_spin=0.0)
async def test_a_send_refused_in_the_express_still_answers_port_unreachable(backend, nursery):  # noqa: F811
    srv, _ = backend
    host, port = _udp_host()
    g = await _attached_with_rx(srv, nursery)
    g.fe.post_tx(_frame(GW / UDP(sport=41600, dport=port) / b"hello"))
    _step(srv)
    assert host.recv(100) == b"hello"
    assert len(_express(srv)) == 1
    host.close()
    # Two in one kick: the first's ICMP error is pending when the second is
    # sent, whose send() reports it (ECONNREFUSED); the guest must hear of it.
    g.fe.post_tx(_frame(GW / UDP(sport=41600, dport=port) / b"a"))
    g.fe.post_tx(_frame(GW / UDP(sport=41600, dport=port) / b"b"))
    _step(srv)
    got = [Ether(f) for _h, f in g.fe.read_rx()]
    unreach = [p for p in got if ICMP in p and p[ICMP].type == 3 and p[ICMP].code == 3]
    assert unreach, [p.summary() for p in got]
    assert _express(srv).snapshot()["datagrams"] == 2
    assert srv.current.device.proxy.counters["udp_port_unreachable"] >= 1


@pytest.mark.hostnet_kw(answer_spin=0.0)
async def test_a_port_bound_in_the_stack_empties_the_express(backend, nursery):  # noqa: F811
    """A flow to a gateway port that a stack service binds later: the service gets
    the guest's next datagram, not the host."""
    srv, _ = backend
    host, port = _udp_host()
    g = await _attached_with_rx(srv, nursery)
    for payload in (b"one", b"two"):
        g.fe.post_tx(_frame(GW / UDP(sport=41700, dport=port) / payload))
        _step(srv)
    assert _received(host) == [b"one", b"two"]
    xp = _express(srv)
    assert len(xp) == 1 and xp.snapshot()["datagrams"] == 1
    local = []
    srv.current.device.stack.udp.bind(port, lambda s, data, *_: local.append(bytes(data)))
    g.fe.post_tx(_frame(GW / UDP(sport=41700, dport=port) / b"three"))
    _step(srv)
    assert local == [b"three"] and _received(host) == []
    assert len(xp) == 0 and xp.snapshot()["flushes"] == 1
    host.close()


@pytest.mark.hostnet_kw(answer_spin=0.0, flows=FlowConfig(udp_idle=0.2))
async def test_a_flow_that_ends_leaves_the_express_before_its_socket_closes(backend, nursery):  # noqa: F811
    srv, _ = backend
    host, port = _udp_host()
    g = await _attached_with_rx(srv, nursery)
    before = fds()
    for payload in (b"one", b"two"):
        g.fe.post_tx(_frame(GW / UDP(sport=41800, dport=port) / payload))
        _step(srv)
    xp = _express(srv)
    assert len(xp) == 1
    flows = srv.current.device.stack.flows
    with trio.fail_after(5):
        while flows.counts()["udp"]:
            await trio.sleep(0.02)
    assert len(xp) == 0 and fds() == before
    # The next datagram makes the flow again, through the stack, and enters it again.
    for payload in (b"three", b"four"):
        g.fe.post_tx(_frame(GW / UDP(sport=41800, dport=port) / payload))
        _step(srv)
    assert _received(host) == [b"one", b"two", b"three", b"four"]
    assert len(xp) == 1 and xp.snapshot()["datagrams"] == 2
    host.close()


async def test_a_stack_side_tap_sees_every_frame_the_express_would_take(tmp_path, nursery):
    """`capture --at stack` (a tap between the link layers and the stack): while it
    is installed the frames go through the link layers, so the tap sees them all."""
    from vhostnet.launch.serve import make_server, serve_backend
    from vhostnet.link import LinkSettings
    from vhostnet.observe.control import ControlServer
    from .test_proxy import hostnet
    link = LinkSettings()
    srv = make_server(str(tmp_path / "v.sock"), hostnet=hostnet(answer_spin=0.0), link=link)
    srv.listen()
    ctl = ControlServer(srv, str(tmp_path / "v.sock.ctl"), link=link)
    ctl.listen()
    await nursery.start(serve_backend, srv, ctl)
    host, port = _udp_host()
    g = await _attached_with_rx(srv, nursery)
    for payload in (b"one", b"two"):
        g.fe.post_tx(_frame(GW / UDP(sport=41900, dport=port) / payload))
        _step(srv)
    xp = _express(srv)
    assert len(xp) == 1 and xp.snapshot()["datagrams"] == 1
    seen = []
    link.stack_taps.append(lambda d, f: seen.append((d, bytes(f.data))))
    for payload in (b"three", b"four"):
        g.fe.post_tx(_frame(GW / UDP(sport=41900, dport=port) / payload))
        _step(srv)
    assert [Ether(b)[UDP].load for d, b in seen if d == "tx"] == [b"three", b"four"]
    assert _received(host) == [b"one", b"two", b"three", b"four"]
    assert xp.snapshot()["datagrams"] == 1        # the stack's path took them
    link.stack_taps.clear()
    host.close()
