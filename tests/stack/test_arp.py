import pytest

from stack.wire.arp import ArpError, ArpRepr
from tests.stack.conftest import (ARP, DNS_IP, GUEST_IP, GUEST_MAC, GW_IP, GW_MAC, Ether,
                                  send)


def arp_req(target, sender_ip=GUEST_IP, op=1):
    return Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=op, hwsrc=GUEST_MAC, psrc=sender_ip, hwdst="00:00:00:00:00:00", pdst=target)


@pytest.mark.parametrize("target", [GW_IP, DNS_IP])
def test_reply_for_gateway_and_dns(st, target):
    out = send(st, arp_req(target))
    assert len(out) == 1
    p = out[0]
    assert p.dst == GUEST_MAC and p.src == GW_MAC
    a = p[ARP]
    assert a.op == 2
    assert a.hwsrc == GW_MAC and a.psrc == target
    assert a.hwdst == GUEST_MAC and a.pdst == GUEST_IP
    assert len(bytes(p)) == 60
    assert st.counters["arp_replies"] == 1


@pytest.mark.parametrize("target", ["10.0.2.4", "10.0.2.1", "8.8.8.8", GUEST_IP])
def test_other_addresses_unanswered(st, target):
    assert send(st, arp_req(target)) == []
    assert st.counters["arp_ignored"] == 1


def test_duplicate_address_probe_for_guest_unanswered(st):
    assert send(st, arp_req(GUEST_IP, sender_ip="0.0.0.0")) == []
    assert st.snapshot()["arp"] == []  # 0.0.0.0 is never learned


def test_gratuitous_unanswered_but_learned(st):
    assert send(st, arp_req(GUEST_IP, sender_ip=GUEST_IP)) == []
    assert [e["mac"] for e in st.snapshot()["arp"]] == [GUEST_MAC]


def test_gratuitous_for_our_address_is_a_conflict(st):
    assert send(st, arp_req(GW_IP, sender_ip=GW_IP)) == []
    assert st.counters["arp_conflict"] == 1
    assert st.snapshot()["arp"] == []


def test_learns_guest_mac_from_request(st):
    send(st, arp_req(GW_IP), now=5.0)
    arp = st.snapshot()["arp"]
    assert arp == [{"ip": GUEST_IP, "mac": GUEST_MAC, "expires": 5.0 + st.arp.ttl}]


def test_arp_reply_from_guest_not_answered(st):
    assert send(st, arp_req(GW_IP, op=2)) == []


@pytest.mark.parametrize("mutate,reason", [
    (lambda b: b[:14 + 20], "drop_arp_truncated"),
    (lambda b: b[:14] + b"\x00\x06" + b[16:], "drop_arp_unsupported"),
    (lambda b: b[:20] + b"\x00\x09" + b[22:], "drop_arp_bad_op"),
])
def test_malformed_counted(st, mutate, reason):
    raw = bytes(arp_req(GW_IP))
    assert send(st, mutate(raw)) == []
    assert st.counters[reason] == 1


def test_repr_roundtrip_against_scapy():
    raw = bytes(ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST_IP, pdst=GW_IP))
    r = ArpRepr.parse(raw)
    assert r.op == 1 and r.sender_ip == bytes([10, 0, 2, 15]) and r.target_ip == bytes([10, 0, 2, 2])
    assert r.emit() == raw
    with pytest.raises(ArpError):
        ArpRepr.parse(raw[:27])


def test_arp_aging_and_resolution(st):
    # Learn, then let the entry expire.
    send(st, arp_req(GW_IP), now=0.0)
    assert st.next_deadline() == st.arp.ttl
    st.poll(st.arp.ttl + 1)
    assert st.snapshot()["arp"] == []
    assert st.counters["arp_expired"] == 1
    # A service now sends to the guest: the stack must ARP for it.
    sock = st.udp_services[0]
    sock.send(b"hello", bytes([10, 0, 2, 15]), 5555)
    out = [Ether(bytes(f.data)) for f in st.take_frames()]
    assert len(out) == 1 and out[0][ARP].op == 1 and out[0][ARP].pdst == GUEST_IP
    assert out[0].dst == "ff:ff:ff:ff:ff:ff" and out[0][ARP].psrc == GW_IP
    # Retry after a second, give up after three tries.
    st.poll(st.arp.ttl + 2.5)
    assert len(st.take_frames()) == 1
    # The guest answers: the queued datagram goes out with its MAC.
    ans = Ether(src=GUEST_MAC, dst=GW_MAC) / ARP(op=2, hwsrc=GUEST_MAC, psrc=GUEST_IP,
                                                hwdst=GW_MAC, pdst=GW_IP)
    out = send(st, ans, now=st.arp.ttl + 2.6)
    assert len(out) == 1 and out[0].dst == GUEST_MAC and bytes(out[0]["Raw"].load) == b"hello"


def test_arp_unresolved_gives_up(st):
    sock = st.udp_services[0]
    sock.send(b"x", bytes([10, 0, 2, 15]), 5555)
    assert len(st.take_frames()) == 1
    for t in (1.0, 2.0, 3.0, 4.0):
        st.poll(t)
    assert len(st.take_frames()) == 2
    assert st.counters["drop_arp_unresolved"] == 1
    assert st.next_deadline() is None
