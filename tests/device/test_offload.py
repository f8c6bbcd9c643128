"""Offloads across the virtio-net header: partial checksums and TSO, via loopback injection.

A frame the guest sends to its own address comes back through the device,
so what the TX header said (NEEDS_CSUM, GSO_TCPV4) must reappear in the RX
header when the guest accepts it, or be done in software when it does not.
"""
import struct

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from stack.checksum import pseudo_sum
from vhostnet.virtio import features as F

from vhostnet.testing.frontend import NET_HDR

GUEST_MAC = "52:54:00:12:34:56"


def _partial(pkt, l4_offset_in_l4: int) -> bytes:
    """Frame bytes with the L4 checksum replaced by the pseudo-header sum, as Linux sends it."""
    raw = bytearray(bytes(pkt))
    ip = pkt[IP]
    ihl = ip.ihl * 4
    l4_len = ip.len - ihl
    s = pseudo_sum(bytes(map(int, ip.src.split("."))), bytes(map(int, ip.dst.split("."))), ip.proto, l4_len)
    struct.pack_into("!H", raw, 14 + ihl + l4_offset_in_l4, s)
    return bytes(raw)


def udp_to_self(payload=b"hello loopback"):
    p = Ether(src=GUEST_MAC, dst=GUEST_MAC) / IP(src="10.0.2.15", dst="10.0.2.15") / \
        UDP(sport=5000, dport=6000) / payload
    return Ether(bytes(p))


async def test_loopback_keeps_partial_checksum_when_guest_accepts_it(ready, server):
    pkt = udp_to_self()
    frame = _partial(pkt, 6)
    hdr = ready.net_hdr(flags=1, csum_start=34, csum_offset=6)
    ready.post_tx(frame, hdr=hdr)
    ready.tx.kick()
    assert await ready.rx.wait_call()
    (rx_hdr, body), = ready.read_rx()
    assert body == frame  # byte for byte, destination MAC already the guest's
    flags, _g, _hl, _gs, cs, co, _n = NET_HDR.unpack(rx_hdr)
    assert (flags, cs, co) == (1, 34, 6)
    assert server.current.device.stack.counters["loopback_frames"] == 1


async def test_loopback_finalizes_checksum_for_guest_without_guest_csum(fe, server):
    feats = F.DEFAULT_FEATURES & ~(1 << F.GUEST_CSUM | 1 << F.GUEST_TSO4) | 1 << 30
    await fe.handshake(features=feats)
    fe.post_rx()
    fe.rx.kick()
    pkt = udp_to_self(b"x" * 333)
    frame = _partial(pkt, 6)
    fe.post_tx(frame, hdr=fe.net_hdr(flags=1, csum_start=34, csum_offset=6))
    fe.tx.kick()
    assert await fe.rx.wait_call()
    (hdr, body), = fe.read_rx()
    assert NET_HDR.unpack(hdr)[0] == 0          # no NEEDS_CSUM towards this guest
    want = Ether(bytes(pkt))[UDP].chksum         # scapy computes the real checksum
    assert Ether(body)[UDP].chksum == want


def tcp_tso_to_self(payload_len=4000):
    p = Ether(src=GUEST_MAC, dst=GUEST_MAC) / IP(src="10.0.2.15", dst="10.0.2.15", id=100) / \
        TCP(sport=40000, dport=5001, seq=1000, ack=1, flags="PA", window=500) / (bytes(range(256)) * 16)[:payload_len]
    return Ether(bytes(p))


async def test_loopback_tso_passes_through_to_tso_guest(ready):
    pkt = tcp_tso_to_self()
    frame = _partial(pkt, 16)
    ready.post_tx(frame, hdr=ready.net_hdr(flags=1, gso_type=1, hdr_len=54, gso_size=1448,
                                            csum_start=34, csum_offset=16))
    ready.tx.kick()
    assert await ready.rx.wait_call()
    got = ready.read_rx()
    assert len(got) == 1
    hdr, body = got[0]
    flags, gso_type, _hl, gso_size, cs, co, nbuf = NET_HDR.unpack(hdr)
    assert (flags, gso_type, gso_size, cs, co) == (1, 1, 1448, 34, 16)
    assert nbuf >= 1   # 4054 bytes span several 4 KiB mergeable buffers
    assert body == frame


async def test_loopback_tso_segmented_in_software_for_plain_guest(fe):
    feats = F.DEFAULT_FEATURES & ~(1 << F.GUEST_CSUM | 1 << F.GUEST_TSO4) | 1 << 30
    await fe.handshake(features=feats)
    fe.post_rx()
    fe.rx.kick()
    pkt = tcp_tso_to_self(4000)
    frame = _partial(pkt, 16)
    fe.post_tx(frame, hdr=fe.net_hdr(flags=1, gso_type=1, hdr_len=54, gso_size=1448,
                                     csum_start=34, csum_offset=16))
    fe.tx.kick()
    assert await fe.rx.wait_call()
    segs = [Ether(b) for _h, b in fe.read_rx()]
    assert [len(s[TCP].payload) for s in segs] == [1448, 1448, 1104]
    assert [s[TCP].seq for s in segs] == [1000, 2448, 3896]
    data = b"".join(bytes(s[TCP].payload) for s in segs)
    assert data == bytes(pkt[TCP].payload)
    for s in segs:   # scapy recomputes: the checksums we wrote must match
        ip_ck, tcp_ck = s[IP].chksum, s[TCP].chksum
        del s[IP].chksum, s[TCP].chksum
        again = Ether(bytes(s))
        assert (again[IP].chksum, again[TCP].chksum) == (ip_ck, tcp_ck)
    assert str(segs[-1][TCP].flags) == "PA" and str(segs[0][TCP].flags) == "A"
