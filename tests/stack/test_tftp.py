"""TFTP server (stack/services/tftp.py + vhostnet/hostnet/tftp_root.py):
option negotiation, loss and retransmission, bounds and path escapes.
scapy decodes every packet the server sends."""
from __future__ import annotations

import os
import struct

import pytest
from scapy.layers.inet import defragment
from scapy.layers.tftp import (TFTP, TFTP_ACK, TFTP_DATA, TFTP_ERROR, TFTP_OACK, TFTP_RRQ,
                               TFTP_WRQ, TFTP_Option, TFTP_Options)

from stack import Frame, NetConfig
from stack.interface import Stack
from stack.services.config import ServicesConfig
from tests.stack.conftest import GW_IP, IP, UDP, Ether, assert_checksums, eth, ip, send
from vhostnet.hostnet.tftp_root import TftpRoot

CPORT = 3000


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "tftp"
    d.mkdir()
    (d / "small").write_bytes(b"hello tftp\n")
    (d / "k").write_bytes(os.urandom(1300))
    (d / "even").write_bytes(os.urandom(1024))
    (d / "sub").mkdir()
    (d / "sub" / "f").write_bytes(b"in a subdirectory")
    (tmp_path / "secret").write_bytes(b"outside")
    os.symlink("../secret", d / "out")
    os.symlink("/etc/passwd", d / "abs")
    os.symlink("sub/f", d / "in")
    return d


def mk(root, **kw) -> Stack:
    return Stack(NetConfig(), net_services=ServicesConfig(dhcp=False, dns=False,
                                                      tftp_files=TftpRoot(str(root)), **kw))


def rrq(name, mode="octet", options=(), sport=CPORT):
    p = TFTP() / TFTP_RRQ(filename=name, mode=mode)
    if options:
        p = p / TFTP_Options(options=[TFTP_Option(oname=k, value=v) for k, v in options])
    return eth() / ip(GW_IP) / UDP(sport=sport, dport=69) / p


def to_port(port, payload, sport=CPORT):
    return eth() / ip(GW_IP) / UDP(sport=sport, dport=port) / payload


def ack(port, block, sport=CPORT):
    return to_port(port, bytes(TFTP() / TFTP_ACK(block=block)), sport)


def tftp(p):
    assert p[IP].src == GW_IP and p[IP].dst == "10.0.2.15"
    assert_checksums(p)
    return TFTP(udp_payload(p))


def udp_payload(p) -> bytes:
    """The UDP payload without the Ethernet padding of a short frame."""
    return bytes(p[UDP])[8:p[UDP].len]


def one(st, pkt, now=0.0):
    out = send(st, pkt, now)
    assert len(out) == 1, out
    return out[0], tftp(out[0])


def fetch(st, name, options=(), now=0.0):
    """The whole transfer, client side done right. Returns (data, blocks, server port)."""
    p, t = one(st, rrq(name, options=options), now)
    port = p[UDP].sport
    assert port != 69                                  # a new TID (RFC 1350 §4)
    blk = 512
    if TFTP_OACK in t:
        for o in t[TFTP_Options].options:
            if o.oname.lower() == b"blksize":
                blk = int(o.value)
        p, t = one(st, ack(port, 0), now)
    data = b""
    n = 0
    while True:
        assert TFTP_DATA in t, t.show(dump=True)
        n += 1
        assert t[TFTP_DATA].block == n & 0xFFFF
        chunk = bytes(t[TFTP_DATA].payload)
        data += chunk
        if len(chunk) < blk:
            assert send(st, ack(port, n & 0xFFFF), now) == []
            return data, n, port
        p, t = one(st, ack(port, n & 0xFFFF), now)


def err(t) -> int:
    assert TFTP_ERROR in t, t.show(dump=True)
    return t[TFTP_ERROR].errorcode


def test_plain_rrq_default_blocks(root):
    st = mk(root)
    data, n, port = fetch(st, "k")
    assert data == (root / "k").read_bytes() and n == 3
    assert st.counters["tftp_completed"] == 1 and st.counters["tftp_bytes"] == 1300
    assert all(s["port"] != port for s in st.snapshot()["udp"])     # TID closed
    assert st.snapshot()["services"]["tftp"]["transfers"] == []


def test_exact_multiple_ends_with_empty_block(root):
    data, n, _ = fetch(mk(root), "even")
    assert n == 3 and data == (root / "even").read_bytes()


def test_subdirectory_and_symlink_inside(root):
    st = mk(root)
    assert fetch(st, "sub/f")[0] == b"in a subdirectory"
    assert fetch(st, "in")[0] == b"in a subdirectory"


def test_oack_blksize_tsize_timeout(root):
    st = mk(root)
    p, t = one(st, rrq("k", options=[(b"blksize", b"1428"), (b"tsize", b"0"),
                                     (b"timeout", b"3"), (b"rollover", b"0")]))
    got = {o.oname.lower(): o.value for o in t[TFTP_OACK][TFTP_Options].options}
    assert got == {b"blksize": b"1428", b"tsize": b"1300", b"timeout": b"3"}   # rollover unknown
    port = p[UDP].sport
    p, t = one(st, ack(port, 0))
    assert t[TFTP_DATA].block == 1 and len(t[TFTP_DATA].payload) == 1300
    # The negotiated timeout is fixed (no backoff): resend at +3, +6 ...
    assert st.next_deadline() == 3.0
    st.poll(3.0)
    st.poll(st.next_deadline())
    assert st.next_deadline() == 9.0 and st.counters["tftp_retransmits"] == 2


def test_oack_then_full_transfer(root):
    data, n, _ = fetch(mk(root), "k", options=[(b"blksize", b"1024"), (b"tsize", b"0")])
    assert data == (root / "k").read_bytes() and n == 2


def test_largest_blksize_goes_fragmented_and_clamped(root):
    (root / "big").write_bytes(os.urandom(70000))
    st = mk(root)
    p, t = one(st, rrq("big", options=[(b"blksize", b"99999")]))
    assert {o.oname: o.value for o in t[TFTP_Options].options} == {b"blksize": b"65464"}
    port = p[UDP].sport
    out = send(st, ack(port, 0))
    assert len(out) > 1 and st.counters["tx_fragmented"] == 1
    whole = defragment(out)
    assert len(whole) == 1
    d = TFTP(bytes(whole[0][UDP].payload))
    assert d[TFTP_DATA].block == 1 and bytes(d[TFTP_DATA].payload) == (root / "big").read_bytes()[:65464]


def test_tiny_blksize_refused_option_uses_default(root):
    st = mk(root)
    p, t = one(st, rrq("k", options=[(b"blksize", b"4")]))
    assert TFTP_DATA in t and len(t[TFTP_DATA].payload) == 512


def test_loss_retransmit_with_backoff_then_give_up(root):
    st = mk(root, tftp_retries=3)
    p, t = one(st, rrq("k"))
    first = udp_payload(p)
    times = []
    for _ in range(3):
        d = st.next_deadline()
        times.append(d)
        st.poll(d)
        out = [Ether(bytes(f.data)) for f in st.take_frames()]
        assert len(out) == 1 and udp_payload(out[0]) == first
    assert times == [1.0, 3.0, 7.0]                     # 1 s, then doubled
    st.poll(st.next_deadline())
    assert st.take_frames() == []
    assert st.counters["tftp_timeouts"] == 1 and st.counters["tftp_failed"] == 1
    assert st.net_services.next_deadline() is None


def test_lost_ack_then_resume(root):
    st = mk(root)
    p, t = one(st, rrq("k"))
    port = p[UDP].sport
    p, t = one(st, ack(port, 1))                        # DATA 2
    st.poll(st.next_deadline())                         # our DATA 2 "was lost": resent
    again = [Ether(bytes(f.data)) for f in st.take_frames()]
    assert tftp(again[0])[TFTP_DATA].block == 2
    p, t = one(st, ack(port, 2))
    assert t[TFTP_DATA].block == 3


def test_duplicate_ack_is_not_answered(root):
    st = mk(root)
    p, t = one(st, rrq("k"))
    port = p[UDP].sport
    one(st, ack(port, 1))
    assert send(st, ack(port, 1)) == []                 # Sorcerer's Apprentice
    assert st.counters["tftp_duplicate_ack"] == 1


def test_unknown_tid_gets_error_5_and_transfer_goes_on(root):
    st = mk(root)
    p, t = one(st, rrq("k"))
    port = p[UDP].sport
    q, e = one(st, ack(port, 1, sport=CPORT + 1))
    assert err(e) == 5 and q[UDP].dport == CPORT + 1
    p, t = one(st, ack(port, 1))
    assert t[TFTP_DATA].block == 2


def test_client_error_aborts(root):
    st = mk(root)
    p, t = one(st, rrq("k", options=[(b"blksize", b"1024")]))
    port = p[UDP].sport
    assert send(st, to_port(port, bytes(TFTP() / TFTP_ERROR(errorcode=8, errormsg="no")))) == []
    assert st.counters["tftp_failed"] == 1 and st.net_services.next_deadline() is None


def test_duplicate_rrq_ignored(root):
    st = mk(root)
    one(st, rrq("k"))
    assert send(st, rrq("k")) == []
    assert st.counters["tftp_duplicate_rrq"] == 1 and st.counters["tftp_started"] == 1


@pytest.mark.parametrize("name,code", [
    ("../secret", 2), ("sub/../../secret", 2), ("/etc/passwd", 2), ("\\secret", 2),
    ("sub\\..\\..\\secret", 2), ("out", 2), ("abs", 2), ("sub", 2), ("missing", 1),
    ("..", 2), ("", 2), ("C:secret", 2),
])
def test_path_escapes_refused(root, name, code):
    st = mk(root)
    p, t = one(st, rrq(name))
    assert err(t) == code
    assert p[UDP].sport == 69 and st.counters["tftp_started"] == 0


def test_write_request_refused(root):
    st = mk(root)
    pkt = eth() / ip(GW_IP) / UDP(sport=CPORT, dport=69) / TFTP() / TFTP_WRQ(filename="x", mode="octet")
    p, t = one(st, pkt)
    assert err(t) == 2 and st.counters["tftp_refused_write"] == 1


def test_netascii_refused(root):
    p, t = one(mk(root), rrq("small", mode="netascii"))
    assert err(t) == 4


def test_transfer_cap(root):
    st = mk(root, tftp_max_transfers=2)
    one(st, rrq("k", sport=4000))
    one(st, rrq("k", sport=4001))
    p, t = one(st, rrq("k", sport=4002))
    assert err(t) == 0 and st.counters["tftp_refused_busy"] == 1
    assert len(st.snapshot()["services"]["tftp"]["transfers"]) == 2


def test_file_size_cap(root):
    p, t = one(mk(root, tftp_max_file=1000), rrq("k"))
    assert err(t) == 0


def test_malformed_request(root):
    st = mk(root)
    p, t = one(st, to_port(69, b"\x00\x01noterminator"))
    assert err(t) == 4
    assert send(st, to_port(69, b"\x00")) == []
    assert st.counters["drop_tftp_truncated"] == 1


def test_block_number_wraps(root):
    """blksize 8 and 65,540 blocks: the block number rolls over 65535 -> 0."""
    n_blocks = 65540
    body = os.urandom(8 * (n_blocks - 1) + 3)
    (root / "wrap").write_bytes(body)
    st = mk(root)
    p, t = one(st, rrq("wrap", options=[(b"blksize", b"8")]))
    port = p[UDP].sport
    tmpl = bytearray(bytes(ack(port, 0)))
    tmpl[40:42] = b"\0\0"                              # no UDP checksum: patch the block freely
    got = bytearray()
    for n in range(n_blocks):
        tmpl[44:46] = struct.pack("!H", n & 0xFFFF)
        st.receive(Frame(bytes(tmpl)), 0.0)
        out = st.take_frames()
        assert len(out) == 1
        f = bytes(out[0].data)
        ulen = struct.unpack_from("!H", f, 38)[0]
        assert struct.unpack_from("!HH", f, 42) == (3, (n + 1) & 0xFFFF)
        got += f[46:34 + ulen]
    assert bytes(got) == body


# ------------------------------------------------------- windowsize (RFC 7440)
def blocks_of(out) -> list[int]:
    return [tftp(p)[TFTP_DATA].block for p in out]


def test_windowsize_sends_a_window_per_ack(root):
    (root / "w").write_bytes(os.urandom(512 * 10 + 5))            # 11 blocks
    st = mk(root)
    p, t = one(st, rrq("w", options=[(b"windowsize", b"4")]))
    assert {o.oname: o.value for o in t[TFTP_Options].options} == {b"windowsize": b"4"}
    port = p[UDP].sport
    assert blocks_of(send(st, ack(port, 0))) == [1, 2, 3, 4]
    assert blocks_of(send(st, ack(port, 4))) == [5, 6, 7, 8]
    assert blocks_of(send(st, ack(port, 8))) == [9, 10, 11]       # the last one is short
    assert send(st, ack(port, 11)) == []
    assert st.counters["tftp_completed"] == 1 and st.counters["tftp_bytes"] == 512 * 10 + 5


def test_windowsize_loss_rewinds_to_the_clients_ack(root):
    (root / "w").write_bytes(os.urandom(512 * 10 + 5))
    st = mk(root)
    p, t = one(st, rrq("w", options=[(b"windowsize", b"4")]))
    port = p[UDP].sport
    send(st, ack(port, 0))                                        # 1..4 out; 3 "lost"
    assert blocks_of(send(st, ack(port, 2))) == [3, 4, 5, 6]
    assert st.counters["tftp_window_rewinds"] == 1
    assert send(st, ack(port, 1)) == []                           # old ACK: ignored
    st.poll(st.net_services.next_deadline())                      # silence: the window again
    assert blocks_of([Ether(bytes(f.data)) for f in st.take_frames()]) == [3, 4, 5, 6]
    assert st.counters["tftp_bytes"] == 512 * 6                   # resends are not counted


def test_windowsize_full_transfer_and_clamp(root):
    st = mk(root)
    p, t = one(st, rrq("k", options=[(b"windowsize", b"1000")]))
    assert {o.oname: o.value for o in t[TFTP_Options].options} == {b"windowsize": b"64"}
    port = p[UDP].sport
    out = send(st, ack(port, 0))
    data = b"".join(udp_payload(q)[4:] for q in out)
    assert blocks_of(out) == [1, 2, 3] and data == (root / "k").read_bytes()
    assert send(st, ack(port, 3)) == [] and st.counters["tftp_completed"] == 1
