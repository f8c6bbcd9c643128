"""vhostnet/observe/decode.py: tcpdump-like summaries of frames built by scapy, and
never an exception on junk (hypothesis)."""
import struct

from hypothesis import given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from vhostnet.observe.decode import MAX_TEXT, desc_flags, hexdump, summarize, vnet_hdr, vnet_hdr_text

G, GW = "52:54:00:12:34:56", "52:55:0a:00:02:02"


def s(pkt, link=False):
    return summarize(bytes(pkt), link=link)


def test_arp():
    req = Ether(src=G, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=G, psrc="10.0.2.15", pdst="10.0.2.2")
    assert s(req, link=True) == ("52:54:00:12:34:56 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: "
                                 "ARP, Request who-has 10.0.2.2 tell 10.0.2.15, length 28")
    rep = Ether() / ARP(op=2, hwsrc=GW, psrc="10.0.2.2", pdst="10.0.2.15")
    assert s(rep) == "ARP, Reply 10.0.2.2 is-at 52:55:0a:00:02:02, length 28"


def test_icmp_echo_and_errors():
    assert s(Ether() / IP(src="10.0.2.15", dst="10.0.2.2") / ICMP(id=5, seq=3) / (b"x" * 56)) == \
        "IP 10.0.2.15 > 10.0.2.2: ICMP echo request, id 5, seq 3, length 64"
    unreach = Ether() / IP(src="10.0.2.2", dst="10.0.2.15") / ICMP(type=3, code=3) / \
        IP(src="10.0.2.15", dst="10.0.2.2") / UDP(sport=1, dport=9999)
    assert s(unreach) == "IP 10.0.2.2 > 10.0.2.15: ICMP 10.0.2.2 udp port 9999 unreachable, length 36"
    assert s(Ether() / IP() / ICMP(type=11)) == "IP 127.0.0.1 > 127.0.0.1: ICMP time exceeded, length 8"


def test_udp_and_tcp():
    assert s(Ether() / IP(src="10.0.2.15", dst="10.0.2.3") / UDP(sport=4000, dport=53) / b"abcd") == \
        "IP 10.0.2.15.4000 > 10.0.2.3.53: UDP, length 4"
    syn = Ether() / IP(src="10.0.2.15", dst="10.0.2.2") / TCP(
        sport=40000, dport=7, flags="S", seq=1000, window=64240,
        options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)])
    assert s(syn) == ("IP 10.0.2.15.40000 > 10.0.2.2.7: Flags [S], seq 1000, win 64240, "
                      "options [mss 1460,sackOK,TS val 1 ecr 0,nop,wscale 7], length 0")
    data = Ether() / IP(src="10.0.2.2", dst="10.0.2.15") / TCP(sport=7, dport=40000, flags="PA",
                                                                seq=5, ack=1001, window=512) / b"hello"
    assert s(data) == "IP 10.0.2.2.7 > 10.0.2.15.40000: Flags [P.], seq 5:10, ack 1001, win 512, length 5"


def test_fragments_vlan_ipv6():
    frags = fragment(Ether() / IP(src="10.0.2.15", dst="10.0.2.2", id=7) / ICMP() / (b"y" * 3000), fragsize=1480)
    assert [s(f) for f in frags] == [
        "IP 10.0.2.15 > 10.0.2.2: ICMP echo request, id 0, seq 0, length 1480 (frag 7:1480@0+)",
        "IP 10.0.2.15 > 10.0.2.2: ICMP (frag 7:1480@1480+)",
        "IP 10.0.2.15 > 10.0.2.2: ICMP (frag 7:48@2960)"]
    assert s(Ether() / Dot1Q(vlan=5) / IP(src="1.2.3.4", dst="5.6.7.8") / UDP(sport=1, dport=2), link=True) \
        .endswith("802.1Q vlan 5 p 0, ethertype IPv4 (0x0800), length 46: IP 1.2.3.4.1 > 5.6.7.8.2: UDP, length 0")
    assert s(Ether() / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6EchoRequest()) == \
        "IP6 fe80::1 > ff02::1: ICMP6, payload length 8, hlim 64"


def test_truncated_and_odd():
    ping = bytes(Ether() / IP() / ICMP())
    assert summarize(b"") == "[|ether] 0 bytes"
    assert summarize(ping[:20], link=False) == "IP [|ip]"
    assert summarize(ping[:36], link=False) == \
        "IP 127.0.0.1 > 127.0.0.1: ICMP [|icmp] (truncated: total length 28, 22 captured)"
    assert summarize(b"\x00" * 12 + b"\x00\x40" + b"\x00" * 50, link=False) == "802.3, length 64"
    assert "bad version 6" in summarize(ping[:14] + b"\x65" + ping[15:])
    assert "ethertype 0x88b5" in summarize(b"\x00" * 12 + b"\x88\xb5" + b"\x00" * 10)
    assert "truncated" in summarize(bytes(Ether() / IP(len=500) / UDP()))


def test_desc_flags_and_vnet_hdr():
    assert desc_flags(0) == "0"
    assert desc_flags(1 | 2) == "NEXT|WRITE"
    assert desc_flags(4 | 8) == "INDIRECT|0x8"
    h = vnet_hdr(struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 1))
    assert h["flag_names"] == ["NEEDS_CSUM"] and h["gso_type_name"] == "TCPV4" and h["num_buffers"] == 1
    assert vnet_hdr_text(h) == ("flags NEEDS_CSUM, csum_start 34 csum_offset 16, gso TCPV4, "
                                "gso_size 1448 hdr_len 54, num_buffers 1")
    assert vnet_hdr(b"\x00" * 10, 10)["num_buffers"] is None
    assert vnet_hdr(b"\x00" * 5) is None
    assert vnet_hdr_text(None) == "[|virtio-net header]"


def test_hexdump():
    assert hexdump(b"AB\x00" * 7, 16) == ["0000: 4142 0041 4200 4142 0041 4200 4142 0041  AB.AB.AB.AB.AB.A"]


def test_memoryview_input():
    mv = memoryview(bytearray(bytes(Ether() / IP() / UDP(sport=1, dport=2))))
    assert summarize(mv, link=False) == "IP 127.0.0.1.1 > 127.0.0.1.2: UDP, length 0"


# -- junk never raises ----------------------------------------------------------------

@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_junk_never_raises(data):
    out = summarize(data)
    assert isinstance(out, str) and len(out) <= MAX_TEXT
    assert "decode error" not in out


_HEADS = [b"\x08\x00", b"\x08\x06", b"\x86\xdd", b"\x81\x00"]


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(_HEADS), st.sampled_from([0x45, 0x46, 0x4F, 0x44, 0x65]),
       st.sampled_from([1, 6, 17, 99]), st.binary(max_size=120))
def test_plausible_junk_never_raises(ethertype, vihl, proto, rest):
    """Junk behind valid-looking Ethernet and IPv4 headers reaches the deeper decoders."""
    ip = bytes([vihl]) + rest[:8] + bytes([proto]) + rest[8:]
    out = summarize(b"\x02" * 12 + ethertype + ip)
    assert isinstance(out, str) and len(out) <= MAX_TEXT
    assert "decode error" not in out


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=20), st.sampled_from([10, 12, 7]))
def test_vnet_hdr_junk(data, n):
    vnet_hdr_text(vnet_hdr(data, n))
