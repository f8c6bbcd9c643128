import pytest

from stack.wire.ethernet import (BROADCAST, HEADER, EthernetRepr, header, is_multicast, pad)
from tests.stack.conftest import GUEST_MAC, GW_MAC, Ether, send


def test_repr_against_scapy():
    raw = bytes(Ether(src=GUEST_MAC, dst=GW_MAC, type=0x0806) / b"xx")
    r = EthernetRepr.parse(raw)
    assert r.ethertype == 0x0806 and r.src == bytes.fromhex(GUEST_MAC.replace(":", ""))
    assert bytes(r.emit(b"xx")) == raw
    p = Ether(bytes(header(r.dst, r.src, 0x86DD)))
    assert p.type == 0x86DD and p.dst == GW_MAC
    with pytest.raises(ValueError):
        EthernetRepr.parse(raw[:13])
    assert HEADER.size == 14


def test_multicast_and_pad():
    assert is_multicast(BROADCAST) and is_multicast(b"\x01\x00\x5e\0\0\1")
    assert not is_multicast(bytes.fromhex("525400123456"))
    assert len(pad(bytearray(10))) == 60 and len(pad(bytearray(100))) == 100


def test_runt_and_unknown_types_counted(st):
    assert send(st, b"\x00" * 13) == []
    assert send(st, bytes(Ether(src=GUEST_MAC, dst=GW_MAC, type=0x8035) / bytes(40))) == []  # RARP
    assert st.counters["drop_eth_truncated"] == 1
    assert st.counters["drop_eth_unknown_type"] == 1
    assert st.counters["rx_frames"] == 2
