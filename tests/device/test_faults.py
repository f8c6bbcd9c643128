"""Fault injection through the real server: the in-process frontend plays QEMU and
the driver, and (for TCP) a second stack plays the guest's TCP/IP, as
scripts/bench_device_tcp.py does. The faults come from a LinkSettings shared
by make_server and the ControlServer, as `vhostnet serve` wires them."""
import struct

import pytest
import trio
from scapy.layers.inet import ICMP
from scapy.layers.l2 import Ether

from stack import Frame, NetConfig, Stack
from vhostnet.launch.cli import build_parser
from vhostnet.launch.serve import close_listeners, make_backend, serve_backend
from vhostnet.link import LinkSettings
from vhostnet.link.faults import FaultSettings
from vhostnet.link.spec import parse
from vhostnet.observe.control import ControlClient, ControlServer
from vhostnet.testing.frontend import NET_HDR, Frontend
from vhostnet.virtio import features as F

from ..observe import ask, check_doc, cli, sockdir  # noqa: F401 (fixture)
from .conftest import make_server
from .test_datapath import ping


@pytest.fixture
async def faulty(sockdir, nursery):
    """A backend with a control socket, both given one LinkSettings; no faults yet."""
    link = LinkSettings()
    srv = make_server(sockdir / "v.sock", link=link)
    ctl = ControlServer(srv, str(sockdir / "v.sock.ctl"), link=link)
    await nursery.start(serve_backend, srv, ctl)
    yield srv, ctl, link


@pytest.fixture
async def guest(faulty):
    srv = faulty[0]
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake()
    fe.post_rx()
    fe.rx.kick()
    yield fe
    await fe.shutdown(srv)


async def replies(fe, want: int, timeout: float) -> list[bytes]:
    """RX frames until WANT of them or TIMEOUT (a bound: lost frames never come)."""
    got: list[bytes] = []
    with trio.move_on_after(timeout):
        while len(got) < want:
            got += [b for _h, b in fe.read_rx()]
            if fe.post_rx():
                fe.rx.kick()
            if len(got) < want:
                await fe.rx.wait_call(0.05)
    return got


async def test_a_delayed_frame_is_copied_before_the_guest_reuses_its_buffer(faulty, guest):
    srv, ctl, link = faulty
    link.faults.set(parse("dir=tx,delay=100ms,seed=1"))
    head = guest.post_tx(ping(seq=4242))
    guest.tx.kick()
    t0 = trio.current_time()
    with trio.fail_after(5):
        while not guest.tx.take_used():
            await trio.sleep(0.002)
    # The device returned the chain while the frame still waits in the fault
    # layer: the guest may write its buffer now, and does.
    addr = guest.tx.buf(head)
    guest.mem[addr:addr + 12 + len(ping())] = b"\xee" * (12 + len(ping()))
    got = await replies(guest, 1, 5)
    assert trio.current_time() - t0 >= 0.1
    assert len(got) == 1 and Ether(got[0])[ICMP].seq == 4242
    assert bytes(Ether(got[0])[ICMP].payload) == b"x" * 56


async def test_loss_counted_in_stats_and_fault_show(faulty, guest):
    srv, ctl, link = faulty
    doc = await ask(ctl.path, "fault", op="set", spec="dir=tx,loss=30%,seed=5")
    assert doc["spec"] == "loss=30%,dir=tx,seed=5" and doc["active"] and doc["changes"] == 1
    n = 200
    for i in range(n):
        guest.post_tx(ping(seq=i))
        if not guest.tx.free:
            guest.tx.kick()
            await trio.sleep(0.01)
            guest.tx.take_used()
    guest.tx.kick()
    stats = await ask(ctl.path, "stats")
    with trio.fail_after(5):
        while stats["faults"]["tx"]["frames"] < n:
            await trio.sleep(0.01)
            stats = await ask(ctl.path, "stats")
    lost = stats["faults"]["tx"]["lost"]
    assert 0.3 * n - 30 <= lost <= 0.3 * n + 30
    got = await replies(guest, n - lost, 5)
    assert len(got) == n - lost == stats["faults"]["tx"]["delivered"]
    check_doc(await ask(ctl.path, "stats"), "stats")
    show = await ask(ctl.path, "fault", op="show")
    check_doc(show, "fault")
    assert show["counters"]["tx"]["lost"] == lost and show["counters"]["rx"]["frames"] == 0
    cleared = await ask(ctl.path, "fault", op="clear")
    assert cleared["spec"] == "none" and not cleared["active"] and cleared["changes"] == 2
    assert len(await replies(guest, 0, 0)) == 0
    got = await guest.exchange([ping(seq=1)], want=1)
    assert len(got) == 1


async def test_bad_fault_requests_get_errors_and_the_connection_lives(faulty):
    _, ctl, _ = faulty

    def go():
        with ControlClient(ctl.path) as c:
            out = []
            for req in ({"op": "set", "spec": "loss=5"}, {"op": "set"}, {"op": "frobnicate"},
                        {"op": "set", "spec": "x" * 5000}):
                c.send({"cmd": "fault", **req})
                out.append(c.read())
            out.append(c.request("fault"))
            return out

    *errors, show = await trio.to_thread.run_sync(go)
    assert [e["ok"] for e in errors] == [False] * 4
    assert "for a percentage write 5%" in errors[0]["error"]
    assert "unknown fault op" in errors[2]["error"]
    assert show["spec"] == "none" and show["connected"] is False and show["counters"] is None
    check_doc(show, "fault", allow_missing=["counters."])


async def capture(path: str, at: str, count: int, timeout: float = 5.0):
    """Frames (dir, bytes) of a capture at AT over the control socket, in a thread."""
    def go():
        with ControlClient(path, timeout=timeout) as c:
            c.send({"cmd": "capture", "count": count, "at": at})
            assert c.read()["ok"]
            out = []
            while True:
                msg = c.read()
                if msg is None or "end" in msg:
                    return out
                out.append((msg["frame"]["dir"], c.read_bytes(msg["frame"]["len"])))
    return await trio.to_thread.run_sync(go)


async def test_capture_before_and_after_the_fault_layer(faulty, guest):
    srv, ctl, link = faulty
    link.faults.set(parse("dir=rx,loss=100%,seed=1"))   # every reply lost on its way to the guest
    results = {}

    async def cap(at, count):
        results[at] = await capture(ctl.path, at, count)

    async with trio.open_nursery() as n:
        n.start_soon(cap, "guest", 1)
        n.start_soon(cap, "stack", 2)
        with trio.fail_after(5):
            while len(srv.taps) < 1 or len(link.stack_taps) < 1:
                await trio.sleep(0.005)
        guest.post_tx(ping(seq=9))
        guest.tx.kick()
    # The guest's side saw its ping go and nothing come back; the stack's side
    # saw the ping arrive and the reply leave.
    assert [(d, Ether(b)[ICMP].type) for d, b in results["guest"]] == [("tx", 8)]
    assert [(d, Ether(b)[ICMP].type) for d, b in results["stack"]] == [("tx", 8), ("rx", 0)]
    assert srv.current.device.counters["rx_frames"] == 0


async def test_capture_at_a_bad_place_is_refused(faulty):
    _, ctl, _ = faulty

    def go():
        with ControlClient(ctl.path) as c:
            c.send({"cmd": "capture", "at": "middle"})
            return c.read()
    reply = await trio.to_thread.run_sync(go)
    assert not reply["ok"] and '"at" is "guest"' in reply["error"]


async def test_fault_cli(faulty, guest, capsys):
    _, ctl, link = faulty
    assert await cli("fault", "set", "loss=5", "--control", ctl.path) == 2
    assert "for a percentage write 5%" in capsys.readouterr().err
    assert await cli("fault", "show", "extra", "--control", ctl.path) == 2
    assert await cli("fault", "set", "--control", ctl.path) == 2
    capsys.readouterr()
    assert await cli("fault", "set", "loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1,dir=both",
                     "--control", ctl.path) == 0
    out = capsys.readouterr().out
    assert "faults: loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1" in out
    assert link.faults.spec == parse("loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1")
    await guest.exchange([ping(seq=i) for i in range(20)], want=20, timeout=1)
    assert await cli("fault", "show", "--control", ctl.path) == 0
    out = capsys.readouterr().out
    assert "counters of this connection" in out and "frames" in out
    assert await cli("stats", "--control", ctl.path) == 0
    assert "faults     loss=5%" in capsys.readouterr().out
    assert await cli("fault", "clear", "--json", "--control", ctl.path) == 0
    assert '"spec": "none"' in capsys.readouterr().out


async def test_serve_fault_option_reaches_the_devices(sockdir):
    args = build_parser().parse_args(["serve", "--socket", str(sockdir / "s.sock"),
                                      "--fault", "loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1,dir=both"])
    server, control, _tap = make_backend(args, args.socket)
    try:
        assert control.link.faults.spec == parse("loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1")
        dev = server.make_device()
        assert dev.link.settings is control.link.faults
    finally:
        close_listeners(server, control)


# -- TCP through a bad link: a second stack plays the guest ------------------------------

GUEST_IP, GATEWAY_IP, ECHO = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2]), 7
NEEDS_CSUM, DATA_VALID, GSO_TCPV4 = 1, 2, 1


class GuestStack:
    """Guest TCP/IP over the frontend's rings, with the offloads the handshake negotiated
    (partial checksums and TSO both ways, as Linux's virtio_net driver uses them)."""

    def __init__(self, fe: Frontend):
        self.fe = fe
        cfg = NetConfig(guest_ip="10.0.2.2", gateway_ip="10.0.2.15", dns_ip="10.0.2.4",
                        guest_mac="52:55:0a:00:02:02", gateway_mac="52:54:00:12:34:56")
        self.st = Stack(cfg)      # roles swapped: it answers for 10.0.2.15
        csum = bool(fe.features >> F.CSUM & 1)
        self.st.set_offloads(csum=csum, tso=csum and bool(fe.features >> F.HOST_TSO4 & 1))
        self.pending: list[Frame] = []

    def _hdr(self, f: Frame) -> bytes:
        if not f.csum_start:
            return self.fe.net_hdr()
        hdr_len = f.csum_start + ((f.data[f.csum_start + 12] >> 4) << 2) if f.gso_size else 0
        return self.fe.net_hdr(flags=NEEDS_CSUM, gso_type=GSO_TCPV4 if f.gso_size else 0,
                               hdr_len=hdr_len, gso_size=f.gso_size, csum_start=f.csum_start,
                               csum_offset=f.csum_offset)

    def step(self, now: float) -> bool:
        fe, st = self.fe, self.st
        moved = False
        for hdr, body in fe.read_rx():
            flags, gso_type, _hl, gso_size, cs, co, _n = NET_HDR.unpack(hdr.ljust(12, b"\0"))
            partial = bool(flags & NEEDS_CSUM)
            st.receive(Frame(body, cs if partial else 0, co if partial else 0,
                             gso_size if gso_type else 0, bool(flags & DATA_VALID)), now)
            moved = True
        if moved and fe.post_rx():
            fe.rx.kick()
        st.poll(now)
        fe.tx.take_used()
        self.pending += st.take_frames()
        posted = 0
        while self.pending and fe.tx.free:
            f = self.pending.pop(0)
            fe.post_tx(bytes(f.data), self._hdr(f))
            posted += 1
        if posted:
            fe.tx.kick()
        return moved or bool(posted)


async def tcp_echo(fe: Frontend, nbytes: int, timeout: float, g: GuestStack | None = None):
    """(data sent, data echoed, the guest's connection info) of an echo through the backend."""
    g = g or GuestStack(fe)
    now = trio.current_time()
    conn = g.st.tcp.connect(now, GUEST_IP, 0, GATEWAY_IP, ECHO)
    data = bytes((i * 7 + i // 251) & 0xFF for i in range(nbytes))
    sent = bytearray()
    back = bytearray()

    def pump(c):
        while len(sent) < nbytes and c.send_space:
            k = c.send(data[len(sent):len(sent) + min(c.send_space, 16384)])
            if not k:
                break
            sent.extend(data[len(sent):len(sent) + k])

    def read(c):
        back.extend(c.recv())

    conn.on_established = conn.on_writable = pump
    conn.on_readable = read
    with trio.fail_after(timeout):
        while len(back) < nbytes:
            assert not conn.error, conn.error
            now = trio.current_time()
            if not g.step(now):
                nd = g.st.next_deadline()
                await fe.rx.wait_call(min(0.005, max(0.0, nd - now)) if nd is not None else 0.005)
    return data, bytes(back), conn.info()


async def test_tcp_echo_through_loss_reordering_and_delay_arrives_intact(faulty, sockdir):
    srv, ctl, link = faulty
    link.faults.set(parse("loss=5%,reorder=2%,delay=20ms,seed=1,dir=both"))
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake(features=F.DEFAULT_FEATURES & ~F.OFFLOAD_FEATURES | 1 << 30)
    fe.post_rx()
    fe.rx.kick()
    try:
        data, back, info = await tcp_echo(fe, 256 * 1024, timeout=60)
        assert back == data
        stats = await ask(ctl.path, "stats")
        for d in ("tx", "rx"):
            c = stats["faults"][d]
            assert c["frames"] > 150
            assert 0.02 * c["frames"] <= c["lost"] <= 0.09 * c["frames"], (d, c)
            assert c["reordered"] + c["reorder_timeouts"] <= 0.05 * c["frames"], (d, c)
            assert c["delayed"] >= c["delivered"] - c["reordered"]   # every frame waited 20 ms
        assert info["retransmits"] > 0
    finally:
        await fe.shutdown(srv)


def refused(stack: Stack) -> int:
    return sum(v for k, v in stack.all_counters().items() if k.startswith("drop_") and "checksum" in k)


async def test_corruption_with_offloads_is_caught_by_the_checksums_both_ways(faulty):
    """Partial checksums and TSO both ways: a corrupted frame has its checksum completed
    (a TSO frame is cut into segments) before its bit flips, so each stack refuses it."""
    srv, ctl, link = faulty
    link.faults.set(parse("corrupt=3%,seed=2"))
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake()                  # offloads on: CSUM, HOST_TSO4, GUEST_CSUM, GUEST_TSO4
    fe.post_rx()
    fe.rx.kick()
    try:
        g = GuestStack(fe)
        data, back, _info = await tcp_echo(fe, 1 << 20, timeout=60, g=g)
        assert back == data
        backend_stack = srv.current.device.stack
        faults = (await ask(ctl.path, "stats"))["faults"]
        tx, rx = faults["tx"], faults["rx"]
        assert tx["corrupted"] > 0 and rx["corrupted"] > 0, faults
        assert tx["corrupt_segmented"] > 0 and rx["corrupt_segmented"] > 0, faults   # TSO frames were hit
        # Every corrupted frame was refused by a checksum check on the other side.
        assert refused(backend_stack) == tx["corrupted"] - _length_drops(backend_stack), faults
        assert refused(g.st) == rx["corrupted"] - _length_drops(g.st), faults
    finally:
        await fe.shutdown(srv)


def _length_drops(stack: Stack) -> int:
    """Corrupted frames refused by a check that comes before the checksum (a flip in a length field)."""
    return sum(v for k, v in stack.all_counters().items()
               if k.startswith("drop_") and ("truncated" in k or "length" in k or "ihl" in k
                                             or "version" in k))
