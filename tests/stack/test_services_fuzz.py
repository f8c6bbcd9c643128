"""Hostile guests against the services: random payloads to DHCP, DNS and TFTP
(and to a running TFTP transfer's port) never raise, and every reply is a
well-formed frame scapy can decode."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

from stack import Frame, NetConfig
from stack.interface import Stack
from stack.services.config import ServicesConfig
from tests.stack.conftest import GW_IP, DNS_IP, IP, UDP, Ether, eth, ip
from vhostnet.hostnet.tftp_root import TftpRoot

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def stack_with_everything(tmp_path) -> Stack:
    d = tmp_path / "t"
    d.mkdir(exist_ok=True)
    (d / "f").write_bytes(os.urandom(3000))
    return Stack(NetConfig(), net_services=ServicesConfig(tftp_files=TftpRoot(str(d)),
                                                          bootfile="f"))


def feed(st, dst, dport, payload, src="10.0.2.15"):
    pkt = eth(dst="ff:ff:ff:ff:ff:ff" if dport == 67 else "52:55:0a:00:02:02") / IP(
        src=src, dst=dst) / UDP(sport=68 if dport == 67 else 4000, dport=dport) / payload
    st.receive(Frame(bytes(pkt)), 0.0)
    for f in st.take_frames():
        p = Ether(bytes(f.data))
        assert IP in p


DHCP_HEAD = bytes.fromhex("01010600") + bytes(232) + bytes.fromhex("63825363")


@SETTINGS
@given(st_.binary(max_size=600), st_.booleans())
def test_dhcp_garbage(tmp_path, tail, with_head):
    st = stack_with_everything(tmp_path)
    feed(st, "255.255.255.255", 67, (DHCP_HEAD if with_head else b"") + tail, src="0.0.0.0")


@SETTINGS
@given(st_.binary(max_size=600))
def test_dns_garbage(tmp_path, payload):
    st = stack_with_everything(tmp_path)
    feed(st, DNS_IP, 53, payload)
    st.poll(100.0)                       # time out whatever was queued
    assert st.net_services.dns.inflight == 0


@SETTINGS
@given(st_.binary(max_size=300), st_.binary(max_size=100))
def test_tftp_garbage_on_69_and_on_a_transfer(tmp_path, req, junk):
    st = stack_with_everything(tmp_path)
    feed(st, GW_IP, 69, b"\x00\x01f\x00octet\x00")
    port = st.net_services.tftp._next_port - 1
    feed(st, GW_IP, 69, req)
    feed(st, GW_IP, port, junk)
    for t in range(1, 40):
        st.poll(float(t))
        st.take_frames()
    assert st.net_services.tftp.next_deadline() is None    # every transfer ended
