"""The "no IPv6 router here" answer (stack/wire/ndp.py), with scapy as the
independent encoder of solicitations and decoder of advertisements."""
from __future__ import annotations

import pytest
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6MLReport2, ICMPv6ND_NS, ICMPv6ND_RA,
                                ICMPv6ND_RS, ICMPv6NDOptSrcLLAddr, IPv6)
from scapy.layers.l2 import Ether

from stack.wire import ndp
from tests.stack.conftest import GUEST_MAC, GW_MAC, send

GUEST_LL = "fe80::5054:ff:fe12:3456"       # modified EUI-64 of 52:54:00:12:34:56
ALL_ROUTERS = "ff02::2"                     # RFC 4291 §2.7.1
ALL_ROUTERS_MAC = "33:33:00:00:00:02"


def rs(src: str = GUEST_LL, hlim: int = 255, opts=True, **icmp) -> bytes:
    p = Ether(src=GUEST_MAC, dst=ALL_ROUTERS_MAC) / IPv6(src=src, dst=ALL_ROUTERS, hlim=hlim) \
        / ICMPv6ND_RS(**icmp)
    if opts:
        p = p / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC)
    return bytes(p)


def test_a_solicitation_gets_an_advertisement_of_no_router(st):
    out = send(st, rs())
    assert len(out) == 1
    p = out[0]
    assert p.dst == "33:33:00:00:00:01" and p.src == GW_MAC
    ip6 = p[IPv6]
    # RFC 4861 §6.1.2: link-local source, hop limit 255; to all nodes.
    assert ip6.src == "fe80::5055:aff:fe00:202" and ip6.dst == "ff02::1" and ip6.hlim == 255
    ra = p[ICMPv6ND_RA]
    assert (ra.routerlifetime, ra.M, ra.O, ra.chlim, ra.reachabletime, ra.retranstimer) == (0, 0, 0, 0, 0, 0)
    assert ra[ICMPv6NDOptSrcLLAddr].lladdr == GW_MAC
    assert ICMPv6NDOptSrcLLAddr in ra and len(bytes(ra)) == 16 + 8    # no prefix, MTU... options
    # scapy recomputes the checksum over the RFC 8200 §8.1 pseudo-header.
    got = ra.cksum
    again = IPv6(bytes(ip6))
    del again[ICMPv6ND_RA].cksum
    assert IPv6(bytes(again))[ICMPv6ND_RA].cksum == got
    assert (st.counters["ndp_rs_rx"], st.counters["ndp_ra_tx"]) == (1, 1)


def test_from_the_unspecified_address_without_options(st):
    assert len(send(st, rs(src="::", opts=False))) == 1


def test_answers_are_rate_limited(st):
    assert len(send(st, rs(), now=10.0)) == 1
    assert send(st, rs(), now=10.0 + ndp.MIN_DELAY_BETWEEN_RAS - 0.01) == []
    assert st.counters["ndp_rs_rate_limited"] == 1
    assert len(send(st, rs(), now=10.0 + ndp.MIN_DELAY_BETWEEN_RAS)) == 1
    assert (st.counters["ndp_rs_rx"], st.counters["ndp_ra_tx"]) == (3, 2)


def _corrupt_checksum(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[14 + 40 + 2] ^= 0x01                  # the ICMPv6 checksum's first byte
    return bytes(b)


@pytest.mark.parametrize("frame,reason", [
    (_corrupt_checksum(rs()), "ndp_rs_bad_checksum"),
    (rs(hlim=64), "ndp_rs_bad_hop_limit"),
    (rs(code=1), "ndp_rs_bad_code"),
    (rs(src="::"), "ndp_rs_source_option_from_unspecified"),
    (rs()[:14 + 40 + 4], "ipv6_truncated"),                 # payload length says more
    (rs()[:14 + 20], "ipv6_truncated"),
], ids=["checksum", "hop-limit", "code", "sllao-from-unspecified", "short-payload", "short-header"])
def test_invalid_solicitations_are_counted_never_answered(st, frame, reason):
    assert send(st, frame) == []
    assert st.counters["drop_" + reason] == 1
    assert st.counters["ndp_ra_tx"] == 0


def test_zero_length_option_is_invalid(st):
    # scapy computes the payload length and checksum: only the option's
    # length (0, RFC 4861 §4.6: "MUST silently discard") is wrong.
    p = Ether(src=GUEST_MAC, dst=ALL_ROUTERS_MAC) / IPv6(src=GUEST_LL, dst=ALL_ROUTERS) \
        / ICMPv6ND_RS() / ICMPv6NDOptSrcLLAddr(len=0, lladdr=GUEST_MAC)
    assert send(st, bytes(p)) == []
    assert st.counters["drop_ndp_rs_bad_option"] == 1


def test_other_ipv6_is_ignored(st):
    base = Ether(src=GUEST_MAC, dst="33:33:00:00:00:16") / IPv6(src=GUEST_LL, dst="ff02::16")
    for p in (base / ICMPv6MLReport2(),
              Ether(src=GUEST_MAC) / IPv6(src="::", dst="ff02::1:ff12:3456") / ICMPv6ND_NS(tgt=GUEST_LL),
              base / ICMPv6EchoRequest()):
        assert send(st, bytes(p)) == []
    assert st.counters["drop_ipv6_unsupported"] == 3 and st.counters["ndp_ra_tx"] == 0


def test_link_local_is_modified_eui64():
    assert ndp.link_local(bytes.fromhex("525400123456")) == bytes.fromhex("fe80000000000000505400fffe123456")
