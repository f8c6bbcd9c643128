"""The services through the whole backend (in-process frontend, real sockets):
DHCP before the guest has an address, DNS relayed to a resolver the test runs
on 127.0.0.1 (never the host's), the stats document with services on, and the
upstream relay (vhostnet/hostnet/dns.py) on its own."""
from __future__ import annotations

import re
import socket
import struct

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rrset
import pytest
import trio
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import mac2str

from stack.checksum import checksum, ones_sum, pseudo_sum
from stack.services.config import ServicesConfig
from stack.tcp.layer import TcpLayer
from vhostnet.hostnet.dns import DnsForwarder, parse_upstream, resolv_conf_upstreams
from vhostnet.launch.serve import serve_backend
from vhostnet.observe.control import ControlServer
from vhostnet.observe.render import stats_text
from vhostnet.testing.dnsserver import BIG_COUNT, DnsTestServer
from vhostnet.testing.frontend import Frontend

from .device.conftest import make_server
from .observe import ask, check_doc, sockdir  # noqa: F401 (fixture)

GMAC = "52:54:00:12:34:56"
GWMAC = "52:55:0a:00:02:02"


@pytest.fixture
async def dns_server(nursery):
    srv = DnsTestServer()
    await nursery.start(srv.serve)
    return srv


def closed_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def start(nursery, sockdir, upstreams, **svc):
    srv = make_server(sockdir / "v.sock", net_services=ServicesConfig(**svc),
                      dns_upstreams=upstreams)
    ctl = ControlServer(srv, str(sockdir / "v.sock.ctl"))
    await nursery.start(serve_backend, srv, ctl)
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake()
    fe.post_rx()
    fe.rx.kick()
    return srv, ctl, fe


def dns_frame(q: dns.message.Message, sport=33000) -> bytes:
    return bytes(Ether(src=GMAC, dst=GWMAC) / IP(src="10.0.2.15", dst="10.0.2.3")
                 / UDP(sport=sport, dport=53) / q.to_wire())


def dns_reply(frame: bytes) -> dns.message.Message:
    p = Ether(frame)
    assert p[IP].src == "10.0.2.3" and p[UDP].sport == 53
    return dns.message.from_wire(bytes(p[UDP])[8:p[UDP].len])


async def ask_dns(fe, name, qid=0x5151, timeout=8.0):
    q = dns.message.make_query(name, "A")
    q.id = qid
    got = await fe.exchange([dns_frame(q)], want=1, timeout=timeout)
    assert len(got) == 1, f"no answer for {name}"
    r = dns_reply(got[0])
    assert r.id == qid and r.question == q.question
    return r


async def test_dns_answer_nxdomain_and_truncation_relayed(nursery, sockdir, dns_server):
    srv, ctl, fe = await start(nursery, sockdir, [("127.0.0.1", dns_server.port)], dhcp=False)
    r = await ask_dns(fe, "host.test.")
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].address == "192.0.2.7"
    assert r.flags & dns.flags.AA                          # upstream's flags, untouched
    r = await ask_dns(fe, "nx.test.", qid=2)
    assert r.rcode() == dns.rcode.NXDOMAIN
    r = await ask_dns(fe, "big.test.", qid=3)
    assert r.flags & dns.flags.TC and not r.answer          # the guest retries over TCP itself
    doc = await ask(ctl.path, "stats")
    d = doc["services"]["dns"]
    assert (d["queries"], d["answered"], d["nxdomain"], d["truncated"]) == (3, 3, 1, 1)
    assert d["upstream"]["udp"] == 3 and dns_server.queries["udp"] == 3
    await fe.close()


async def test_silent_upstream_gives_servfail_counted_as_timeout(nursery, sockdir, dns_server):
    srv, ctl, fe = await start(nursery, sockdir, [("127.0.0.1", dns_server.port)], dhcp=False,
                               dns_timeout=1.0)
    r = await ask_dns(fe, "silent.test.")
    assert r.rcode() == dns.rcode.SERVFAIL
    d = (await ask(ctl.path, "stats"))["services"]["dns"]
    assert d["timed_out"] == 1 and d["answered"] == 0 and d["inflight"] == 0
    await fe.close()


async def test_refused_upstream_falls_back_to_the_next(nursery, sockdir, dns_server):
    ups = [("127.0.0.1", closed_udp_port()), ("127.0.0.1", dns_server.port)]
    srv, ctl, fe = await start(nursery, sockdir, ups, dhcp=False)
    r = await ask_dns(fe, "www.test.")
    assert r.answer[0][0].address == "192.0.2.8"
    up = (await ask(ctl.path, "stats"))["services"]["dns"]["upstream"]
    assert up["errors"] == 1 and up["udp"] == 2
    await fe.close()


async def test_no_upstream_is_servfail_at_once(nursery, sockdir):
    srv, ctl, fe = await start(nursery, sockdir, [], dhcp=False)
    with trio.fail_after(2):                                # not the 5 s timeout
        r = await ask_dns(fe, "host.test.")
    assert r.rcode() == dns.rcode.SERVFAIL
    assert (await ask(ctl.path, "stats"))["services"]["dns"]["failed"] == 1
    await fe.close()


async def test_dhcp_through_the_device_and_stats_document(nursery, sockdir, dns_server):
    srv, ctl, fe = await start(nursery, sockdir, [("127.0.0.1", dns_server.port)])
    disc = (Ether(src=GMAC, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
            / UDP(sport=68, dport=67) / BOOTP(xid=7, chaddr=mac2str(GMAC))
            / DHCP(options=[("message-type", "discover"), "end"]))
    (offer,) = await fe.exchange([bytes(disc)], want=1)
    o = Ether(offer)
    assert o.dst == GMAC and o[BOOTP].yiaddr == "10.0.2.15"
    req = (Ether(src=GMAC, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
           / UDP(sport=68, dport=67) / BOOTP(xid=7, chaddr=mac2str(GMAC))
           / DHCP(options=[("message-type", "request"), ("server_id", "10.0.2.2"),
                           ("requested_addr", "10.0.2.15"), "end"]))
    (ack,) = await fe.exchange([bytes(req)], want=1)
    assert dict(x for x in Ether(ack)[DHCP].options if isinstance(x, tuple))["message-type"] == 5
    await ask_dns(fe, "guest.test.")
    doc = await ask(ctl.path, "stats")
    check_doc(doc, "stats", allow_missing=["stack.tcp", "stack.reassembly", "stack.arp[].pending",
                                             "services.tftp.transfers[]", "nat.", "forwards[]"])
    assert doc["services"]["dhcp"]["leases"][0]["state"] == "bound"
    assert doc["services"]["tftp"]["enabled"] is False
    text = stats_text(doc)
    assert re.search(r"\n  10\.0\.2\.15 +52:54:00:12:34:56  bound, expires in 86[34]\d\d s\n", text), text
    assert "DNS  queries 1  answered 1 (nxdomain 0, truncated 0)  failed 0  timed out 0" in text
    assert f"upstreams 127.0.0.1:{dns_server.port}  udp 1 tcp 0" in text
    assert "TFTP (off)" in text
    await fe.close()


# ------------------------------------------------------- the relay on its own
async def test_forwarder_udp_and_tcp(dns_server):
    fwd = DnsForwarder([("127.0.0.1", dns_server.port)])
    q = dns.message.make_query("big.test.", "A")
    wire, why = await fwd.resolve(q.to_wire(), "udp")
    assert why is None and dns.message.from_wire(wire).flags & dns.flags.TC
    wire, why = await fwd.resolve(q.to_wire(), "tcp")
    r = dns.message.from_wire(wire)
    assert why is None and len(r.answer[0]) == BIG_COUNT and not r.flags & dns.flags.TC
    assert dns_server.queries == {"udp": 1, "tcp": 1}


async def test_forwarder_ignores_answers_with_another_id():
    """A datagram with the wrong ID (spoofed or stale) is skipped, the right one taken."""
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await s.bind(("127.0.0.1", 0))
    q = dns.message.make_query("x.test.", "A")

    async def upstream():
        data, peer = await s.recvfrom(4096)
        r = dns.message.make_response(dns.message.from_wire(data))
        wrong = bytearray(r.to_wire())
        wrong[0] ^= 0xFF
        await s.sendto(bytes(wrong), peer)
        await s.sendto(r.to_wire(), peer)

    async with trio.open_nursery() as n:
        n.start_soon(upstream)
        wire, why = await DnsForwarder([s.getsockname()]).resolve(q.to_wire(), "udp")
    assert wire[:2] == q.to_wire()[:2]
    s.close()


async def test_forwarder_silent_and_refused():
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await s.bind(("127.0.0.1", 0))                          # bound, never answers
    q = dns.message.make_query("x.test.", "A").to_wire()
    fwd = DnsForwarder([s.getsockname()], per_upstream=0.3, budget=1.0)
    assert await fwd.resolve(q, "udp") == (None, "timed_out")
    fwd = DnsForwarder([("127.0.0.1", closed_udp_port())], budget=1.0)
    assert await fwd.resolve(q, "udp") == (None, "failed")
    assert await fwd.resolve(q, "tcp") == (None, "failed")   # nothing listens: refused
    s.close()


@pytest.mark.parametrize("text,want", [("127.0.0.1", ("127.0.0.1", 53)),
                                       ("127.0.0.1:5353", ("127.0.0.1", 5353)),
                                       ("::1", ("::1", 53)), ("[::1]:5300", ("::1", 5300))])
def test_parse_upstream(text, want):
    assert parse_upstream(text) == want


@pytest.mark.parametrize("text", ["dns.google", "1.2.3.4:0", "1.2.3.4:x", "[::1", "[::1]x"])
def test_parse_upstream_refuses(text):
    with pytest.raises(ValueError):
        parse_upstream(text)


def test_resolv_conf(tmp_path):
    p = tmp_path / "resolv.conf"
    p.write_text("# c\nsearch x\nnameserver 10.1.2.3\nnameserver fe80::1%eth0\nnameserver bogus\n")
    assert resolv_conf_upstreams(str(p)) == [("10.1.2.3", 53), ("fe80::1", 53)]
    assert resolv_conf_upstreams(str(tmp_path / "missing")) == []


# ----------------------------------------- DNS over TCP, guest to upstream
async def test_tcp_query_relayed_over_tcp_end_to_end(nursery, sockdir, dns_server):
    """The guest got TC over UDP and retries over TCP: a TCP stack as the guest
    (stack/tcp, frames through the real rings) asks for big.test over TCP port
    53, the relay asks upstream over TCP, the 40 records come back whole."""
    srv, ctl, fe = await start(nursery, sockdir, [("127.0.0.1", dns_server.port)], dhcp=False)
    eth_ip = bytes(Ether(src=GMAC, dst=GWMAC, type=0x0800))

    def emit(src, dst, seg, gso):
        h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 0, 0, 64, 6, 0, src, dst))
        h[10:12] = struct.pack("!H", checksum(bytes(h)))
        seg = bytearray(seg)
        seg[16:18] = b"\0\0"
        seg[16:18] = struct.pack("!H", ~ones_sum(seg, pseudo_sum(src, dst, 6, len(seg))) & 0xFFFF)
        fe.post_tx(eth_ip + bytes(h) + bytes(seg))

    guest = TcpLayer(emit)
    got = bytearray()
    conn = guest.connect(trio.current_time(), bytes([10, 0, 2, 15]), 41000, bytes([10, 0, 2, 3]), 53)
    conn.on_readable = lambda c: got.extend(c.recv())
    q = dns.message.make_query("big.test.", "A")
    q.id = 0x7777
    sent = False
    with trio.fail_after(10):
        while True:
            fe.tx.kick()
            for _h, frame in fe.read_rx():
                if frame[12:14] == b"\x08\x00" and frame[23] == 6:
                    tot = struct.unpack_from("!H", frame, 16)[0]
                    guest.receive(trio.current_time(), frame[26:30], frame[30:34],
                                  memoryview(frame)[34:14 + tot])
            if fe.rx.free:
                fe.post_rx()
                fe.rx.kick()
            if conn.state.value == "ESTABLISHED" and not sent:
                w = q.to_wire()
                conn.send(len(w).to_bytes(2, "big") + w)
                sent = True
            if len(got) >= 2 and len(got) >= 2 + int.from_bytes(got[:2], "big"):
                break
            await fe.rx.wait_call(0.02)
    r = dns.message.from_wire(bytes(got[2:]))
    assert r.id == 0x7777 and len(r.answer[0]) == 40 and not r.flags & dns.flags.TC
    assert dns_server.queries["tcp"] == 1 and dns_server.queries["udp"] == 0
    d = (await ask(ctl.path, "stats"))["services"]["dns"]
    assert d["upstream"]["tcp"] == 1 and d["answered"] == 1
    await fe.close()


async def test_forwarder_keeps_udp_sockets_and_drops_stale_answers(dns_server):
    """A kept socket serves the next query; a late datagram waiting on it (an
    answer to an earlier query) is drained, not taken for the new answer."""
    fwd = DnsForwarder([("127.0.0.1", dns_server.port)])
    q1 = dns.message.make_query("host.test.", "A")
    wire, _ = await fwd.resolve(q1.to_wire(), "udp")
    (raw, _s), = fwd._idle[("127.0.0.1", dns_server.port)]
    port = raw.getsockname()[1]
    # A stale answer with the next query's ID arrives on the kept socket.
    q2 = dns.message.make_query("www.test.", "A")
    stale = dns.message.make_response(q2)
    stale.answer.append(dns.rrset.from_text("www.test.", 1, "IN", "A", "203.0.113.66"))
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    raw.connect(u.getsockname())          # let the stale datagram in, as if from the upstream
    u.sendto(stale.to_wire(), ("127.0.0.1", port))
    await trio.sleep(0.05)
    raw.connect(("127.0.0.1", dns_server.port))
    wire, why = await fwd.resolve(q2.to_wire(), "udp")
    assert dns.message.from_wire(wire).answer[0][0].address == "192.0.2.8"
    assert raw.getsockname()[1] == port   # the same socket served it
    u.close()
    fwd.close()


# ------------------------------------------------------------------ the CLI
def _args(*argv):
    from vhostnet.launch.cli import build_parser
    return build_parser().parse_args(["serve", "--socket", "/tmp/x.sock", *argv])


def test_cli_service_options(tmp_path):
    from vhostnet.launch.services import services_from_args
    cfg, ups = services_from_args(_args("--dns-upstream", "127.0.0.1:5353",
                                        "--dns-upstream", "[::1]", "--tftp", str(tmp_path),
                                        "--bootfile", "k.itb"))
    assert cfg.dhcp and cfg.dns and cfg.tftp and cfg.bootfile == "k.itb"
    assert ups == [("127.0.0.1", 5353), ("::1", 53)]
    cfg, ups = services_from_args(_args("--no-dhcp", "--no-dns"))
    assert not cfg.dhcp and not cfg.dns and not cfg.tftp and ups == []


def test_cli_service_mistakes_exit_2(tmp_path, capsys):
    from vhostnet.launch.cli import main
    for argv, msg in [(["--bootfile", "x"], "--bootfile needs --tftp DIR"),
                      (["--tftp", str(tmp_path / "nope")], "is not a directory"),
                      (["--tftp", str(tmp_path), "--bootfile", "x" * 200], "1..127 bytes")]:
        assert main(["serve", "--socket", str(tmp_path / "v.sock"), *argv]) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--dns-upstream", "resolver.example"])
    assert e.value.code == 2 and "not an IP address" in capsys.readouterr().err


async def test_dns_test_server_takes_a_port_free_for_both_transports():
    """Port 0: the UDP and TCP sockets share one number, free for both (a
    TCP listener elsewhere on the UDP port chosen is skipped, not fatal).
    A port the caller names is used as it is: taken, it is an error."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        busy = taken.getsockname()[1]
        with pytest.raises(OSError):
            async with DnsTestServer(port=busy):
                pass
        async with DnsTestServer() as srv:
            q = dns.message.make_query("host.test.", "A")
            r = await trio.to_thread.run_sync(lambda: dns.query.tcp(q, "127.0.0.1", port=srv.port, timeout=5))
            u = await trio.to_thread.run_sync(lambda: dns.query.udp(q, "127.0.0.1", port=srv.port, timeout=5))
        assert r.answer and u.answer and srv.queries == {"udp": 1, "tcp": 1}
    finally:
        taken.close()
