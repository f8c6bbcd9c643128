"""DHCP server (stack/services/dhcp.py): every message type, decoded by scapy."""
from __future__ import annotations

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.utils import mac2str

from stack import NetConfig
from stack.interface import Stack
from stack.services.config import ServicesConfig
from stack.services.tftp import TftpFileError
from tests.stack.conftest import GUEST_MAC, GW_IP, GW_MAC, IP, UDP, Ether, assert_checksums, send

MAC2 = "52:54:00:aa:bb:02"
BCAST_MAC = "ff:ff:ff:ff:ff:ff"


class NoFiles:
    def open(self, name):
        raise TftpFileError(1, "file not found")


def mk(cfg: ServicesConfig | None = None) -> Stack:
    return Stack(NetConfig(), net_services=cfg or ServicesConfig(dns=False))


def client(mtype, mac=GUEST_MAC, xid=0x1234, flags=0, ciaddr="0.0.0.0", src="0.0.0.0",
           dst="255.255.255.255", dmac=BCAST_MAC, opts=()):
    return (Ether(src=mac, dst=dmac) / IP(src=src, dst=dst) / UDP(sport=68, dport=67)
            / BOOTP(op=1, xid=xid, flags=flags, ciaddr=ciaddr, chaddr=mac2str(mac))
            / DHCP(options=[("message-type", mtype), *opts, "end"]))


def opts(p) -> dict:
    return {o[0]: (o[1] if len(o) == 2 else o[1:]) for o in p[DHCP].options if isinstance(o, tuple)}


def one(st, pkt, now=0.0):
    out = send(st, pkt, now)
    assert len(out) == 1, out
    p = out[0]
    assert BOOTP in p and p[BOOTP].op == 2
    assert p[IP].src == GW_IP and p[UDP].sport == 67 and p[UDP].dport == 68
    assert_checksums(p)
    return p


def lease(st, mac=GUEST_MAC, now=0.0):
    o = one(st, client("discover", mac, flags=0x8000), now)
    ip = o[BOOTP].yiaddr
    a = one(st, client("request", mac, flags=0x8000,
                       opts=[("server_id", GW_IP), ("requested_addr", ip)]), now)
    assert opts(a)["message-type"] == 5
    return ip


def test_discover_broadcast_offer_has_every_option():
    st = mk()
    p = one(st, client("discover", flags=0x8000))
    assert p.dst == BCAST_MAC and p.src == GW_MAC and p[IP].dst == "255.255.255.255"
    assert p[BOOTP].yiaddr == "10.0.2.15" and p[BOOTP].xid == 0x1234
    assert p[BOOTP].chaddr[:6] == mac2str(GUEST_MAC)
    o = opts(p)
    assert o["message-type"] == 2 and o["server_id"] == GW_IP
    assert o["subnet_mask"] == "255.255.255.0" and o["router"] == GW_IP
    assert o["name_server"] == "10.0.2.3" and o["broadcast_address"] == "10.0.2.255"
    assert o["interface-mtu"] == 1500 and o["lease_time"] == 86400
    assert o["renewal_time"] == 43200 and o["rebinding_time"] == 75600
    assert "boot-file-name" not in o and p[BOOTP].siaddr == "0.0.0.0"
    assert len(p[UDP].payload) >= 300          # BOOTP minimum (RFC 1542)
    assert st.counters["dhcp_rx_discover"] == 1 and st.counters["dhcp_tx_offer"] == 1


def test_discover_unicast_offer_goes_to_chaddr_and_yiaddr():
    p = one(mk(), client("discover"))
    assert p.dst == GUEST_MAC and p[IP].dst == "10.0.2.15"


def test_request_selecting_ack_and_lease_listed():
    st = mk()
    assert lease(st) == "10.0.2.15"
    assert st.snapshot()["services"]["dhcp"]["leases"] == [
        {"mac": GUEST_MAC, "ip": "10.0.2.15", "state": "bound", "expires_in": 86400}]
    assert st.counters["dhcp_tx_ack"] == 1


def test_request_for_another_server_drops_the_offer():
    st = mk()
    one(st, client("discover", flags=0x8000))
    assert send(st, client("request", flags=0x8000, opts=[("server_id", "10.0.2.99"),
                                                          ("requested_addr", "10.0.2.15")])) == []
    assert st.counters["dhcp_other_server"] == 1
    assert st.snapshot()["services"]["dhcp"]["leases"] == []


def test_request_selecting_wrong_address_is_nakked_by_broadcast():
    st = mk()
    one(st, client("discover"))
    p = one(st, client("request", opts=[("server_id", GW_IP), ("requested_addr", "10.0.2.20")]))
    assert opts(p)["message-type"] == 6 and p.dst == BCAST_MAC and p[IP].dst == "255.255.255.255"
    assert p[BOOTP].yiaddr == "0.0.0.0"


def test_init_reboot_ack_and_nak():
    st = mk()
    p = one(st, client("request", opts=[("requested_addr", "10.0.2.15")]))
    assert opts(p)["message-type"] == 5 and p[BOOTP].yiaddr == "10.0.2.15"
    p = one(st, client("request", opts=[("requested_addr", "192.168.1.7")]))
    assert opts(p)["message-type"] == 6
    assert st.counters["dhcp_tx_nak"] == 1


def test_renewing_unicast_ack_to_ciaddr():
    st = mk()
    lease(st)
    p = one(st, client("request", ciaddr="10.0.2.15", src="10.0.2.15", dst=GW_IP, dmac=GW_MAC),
            now=100.0)
    assert opts(p)["message-type"] == 5
    assert p[IP].dst == "10.0.2.15" and p.dst == GUEST_MAC and p[BOOTP].ciaddr == "10.0.2.15"
    assert st.snapshot()["services"]["dhcp"]["leases"][0]["expires_in"] == 86400


def test_renewing_someone_elses_address_is_nakked():
    st = mk()
    lease(st)
    lease(st, MAC2)
    p = one(st, client("request", MAC2, ciaddr="10.0.2.15", src="10.0.2.15", dst=GW_IP,
                       dmac=GW_MAC))
    assert opts(p)["message-type"] == 6


def test_release_frees_the_address():
    st = mk()
    lease(st)
    assert send(st, client("release", ciaddr="10.0.2.15", src="10.0.2.15", dst=GW_IP,
                           dmac=GW_MAC, opts=[("server_id", GW_IP)])) == []
    assert st.counters["dhcp_rx_release"] == 1
    assert st.snapshot()["services"]["dhcp"]["leases"] == []
    assert lease(st, MAC2) == "10.0.2.15"     # reusable at once


def test_inform_gets_configuration_without_a_lease():
    st = mk()
    p = one(st, client("inform", ciaddr="10.0.2.40", src="10.0.2.40", dst=GW_IP, dmac=GW_MAC))
    o = opts(p)
    assert o["message-type"] == 5 and "lease_time" not in o and o["router"] == GW_IP
    assert p[BOOTP].yiaddr == "0.0.0.0" and p[IP].dst == "10.0.2.40"
    assert st.snapshot()["services"]["dhcp"]["leases"] == []


def test_decline_takes_the_address_out_of_the_pool():
    st = mk()
    lease(st)
    assert send(st, client("decline", opts=[("server_id", GW_IP),
                                            ("requested_addr", "10.0.2.15")])) == []
    assert st.counters["dhcp_declined"] == 1
    p = one(st, client("discover"))
    assert p[BOOTP].yiaddr == "10.0.2.16"


def test_same_mac_same_address_other_mac_next_address():
    st = mk()
    assert lease(st) == "10.0.2.15"
    assert lease(st, MAC2) == "10.0.2.16"
    assert lease(st) == "10.0.2.15"


def test_pool_exhaustion_is_counted():
    st = mk(ServicesConfig(dns=False, pool_size=1))
    lease(st)
    assert send(st, client("discover", MAC2)) == []
    assert st.counters["dhcp_pool_exhausted"] == 1


def test_offer_expires():
    st = mk(ServicesConfig(dns=False, pool_size=1))
    one(st, client("discover"))
    assert send(st, client("discover", MAC2), now=10.0) == []
    assert one(st, client("discover", MAC2), now=61.0)[BOOTP].yiaddr == "10.0.2.15"


def test_restrict_leaves_out_router_and_dns():
    o = opts(one(mk(ServicesConfig(dns=False, restrict=True)), client("discover")))
    assert "router" not in o and "name_server" not in o and o["subnet_mask"] == "255.255.255.0"


def test_boot_file_and_next_server_with_tftp():
    st = mk(ServicesConfig(dns=False, tftp_files=NoFiles(), bootfile="pxelinux.0"))
    p = one(st, client("discover"))
    o = opts(p)
    assert p[BOOTP].siaddr == GW_IP and p[BOOTP].file.rstrip(b"\0") == b"pxelinux.0"
    assert o["tftp_server_name"] == GW_IP.encode() and o["boot-file-name"] == b"pxelinux.0"


@pytest.mark.parametrize("mutate,reason", [
    (lambda b: b[:42 + 100], "dhcp_truncated"),
    (lambda b: b[:42 + 236] + b"\x00\x00\x00\x00" + b[42 + 240:], "dhcp_bad_cookie"),
    (lambda b: b[:42 + 240] + b"\x35\x09\x01", "dhcp_bad_options"),
])
def test_malformed_is_counted_not_answered(mutate, reason):
    st = mk()
    raw = bytearray(mutate(bytes(client("discover"))))
    # Fix the IP and UDP lengths for the new size; UDP checksum 0 (none).
    n = len(raw) - 14
    raw[16:18] = n.to_bytes(2, "big")
    raw[24:26] = b"\0\0"
    from stack.checksum import checksum
    cs = checksum(bytes(raw[14:34]))
    raw[24:26] = cs.to_bytes(2, "big")
    raw[38:40] = (n - 20).to_bytes(2, "big")
    raw[40:42] = b"\0\0"
    assert send(st, bytes(raw)) == []
    assert st.counters["drop_" + reason] == 1


def test_reply_type_from_a_client_is_dropped():
    st = mk()
    assert send(st, client("offer")) == []
    assert st.counters["drop_dhcp_bad_type"] == 1


def test_no_dhcp_without_services():
    st = Stack(NetConfig())
    assert send(st, client("discover")) == []
    assert st.counters["drop_udp_no_socket"] == 1
