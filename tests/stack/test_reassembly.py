import random
from collections import Counter

import pytest
from scapy.layers.inet import fragment

from stack.reassembly import Reassembler
from stack.wire.ipv4 import build_header
from tests.stack.conftest import GW_IP, ICMP, IP, UDP, assert_checksums, eth, ip, send

SRC = bytes([10, 0, 2, 15])
DST = bytes([10, 0, 2, 2])


def frag(off, data, more, ident=1, proto=253):
    h = build_header(SRC, DST, proto, len(data), ident, (off >> 3) | (0x2000 if more else 0))
    return bytes(h), data


def test_in_order_and_reversed():
    payload = bytes(random.Random(1).randbytes(4000))
    pieces = [(o, payload[o:o + 1000], o + 1000 < 4000) for o in range(0, 4000, 1000)]
    for order in (pieces, pieces[::-1]):
        r = Reassembler(Counter())
        results = [r.add(0.0, *frag(o, d, m)) for o, d, m in order]
        assert results[:-1] == [None] * 3
        whole = results[-1]
        p = IP(whole)
        assert p.len == 4020 and p.flags == 0 and p.frag == 0 and bytes(p.payload) == payload
        assert_checksums(p)
        assert len(r) == 0 and r.total == 0


def test_identical_overlap_and_duplicate_accepted():
    payload = bytes(range(256)) * 8
    c = Counter()
    r = Reassembler(c)
    assert r.add(0, *frag(0, payload[:1024], True)) is None
    assert r.add(0, *frag(0, payload[:1024], True)) is None      # duplicate
    assert r.add(0, *frag(512, payload[512:1536], True)) is None  # identical overlap
    whole = r.add(0, *frag(1536, payload[1536:], False))
    assert IP(whole).load == payload
    assert c["reasm_duplicate"] == 1 and c["reasm_ok"] == 1


def test_conflicting_overlap_poisons_datagram():
    payload = bytes(2048)
    c = Counter()
    r = Reassembler(c)
    r.add(0, *frag(0, payload[:1024], True))
    assert r.add(0, *frag(512, b"\x01" * 1024, True)) is None
    assert c["drop_reasm_overlap_conflict"] == 1
    # Even the fragment that would complete it is refused until the timeout.
    assert r.add(1, *frag(1024, payload[1024:], False)) is None
    assert c["drop_reasm_poisoned"] == 1
    assert r.total == 0
    r.poll(31.0)
    assert len(r) == 0
    # After the timeout the same id may be used afresh.
    r.add(40, *frag(0, payload[:1024], True))
    assert r.add(40, *frag(1024, payload[1024:], False)) is not None


def test_conflicting_last_fragment():
    c = Counter()
    r = Reassembler(c)
    r.add(0, *frag(1000, bytes(8), False))
    r.add(0, *frag(2000, bytes(8), False))
    assert c["drop_reasm_overlap_conflict"] == 1


def test_data_beyond_end():
    c = Counter()
    r = Reassembler(c)
    r.add(0, *frag(800, bytes(8), False))
    r.add(0, *frag(800, bytes(16), True))
    assert c["drop_reasm_overlap_conflict"] == 1


def test_non_multiple_of_8_middle_fragment():
    c = Counter()
    r = Reassembler(c)
    assert r.add(0, *frag(0, bytes(13), True)) is None
    assert c["drop_reasm_bad_length"] == 1 and len(r) == 0


def test_timeout_virtual_time_and_deadline():
    c = Counter()
    r = Reassembler(c)
    r.add(5.0, *frag(0, bytes(16), True))
    assert r.next_deadline() == 35.0
    assert r.poll(34.9) == [] and len(r) == 1
    quotes = r.poll(35.0)
    assert len(quotes) == 1 and IP(quotes[0]).src == "10.0.2.15" and len(quotes[0]) == 28
    assert len(r) == 0 and c["reasm_timeout"] == 1 and r.next_deadline() is None


def test_memory_bound_evicts_oldest():
    c = Counter()
    r = Reassembler(c, max_total=200_000, max_datagrams=1000)
    for ident in range(100):
        r.add(float(ident), *frag(60000, bytes(8), True, ident=ident))
        assert r.total <= 200_000
    assert c["reasm_evicted"] >= 96
    assert len(r) <= 4


def test_max_datagrams():
    c = Counter()
    r = Reassembler(c, max_datagrams=8)
    for ident in range(20):
        r.add(0.0, *frag(0, bytes(8), True, ident=ident))
    assert len(r) == 8 and c["reasm_evicted"] == 12


def test_too_many_fragments():
    c = Counter()
    r = Reassembler(c, max_frags=10)
    for i in range(12):
        r.add(0.0, *frag(i * 16, bytes(8), True))  # gaps: nothing merges
    assert c["drop_reasm_too_many_frags"] == 1


def test_interface_reassembles_udp_echo_any_order(st):
    data = bytes(random.Random(2).randbytes(20000))
    req = ip(id=4242) / UDP(sport=3333, dport=7) / data
    frags = fragment(req, fragsize=1480)
    random.Random(3).shuffle(frags)
    out = []
    for f in frags:
        out += send(st, eth() / f)
    assert st.counters["reasm_ok"] == 1
    assert all(p[IP].src == GW_IP for p in out) and len(out) == len(frags)
    from scapy.layers.inet import defragment
    whole = defragment([IP(bytes(p[IP])[:p[IP].len]) for p in out])
    rep = IP(bytes(whole[0]))
    assert rep[UDP].sport == 7 and rep[UDP].dport == 3333 and bytes(rep[UDP].payload) == data
    q = rep.copy()
    q[UDP].chksum = None
    assert IP(bytes(q))[UDP].chksum == rep[UDP].chksum


def test_interface_timeout_sends_time_exceeded(st):
    req = ip() / ICMP(type=8) / bytes(3000)
    frags = fragment(req, fragsize=1480)
    assert send(st, eth() / frags[0], now=1.0) == []
    assert st.next_deadline() == pytest.approx(31.0)
    st.poll(31.0)
    out = [f for f in st.take_frames()]
    from scapy.layers.l2 import Ether
    p = Ether(bytes(out[0].data))
    assert p[ICMP].type == 11 and p[ICMP].code == 1
    assert bytes(p[ICMP].payload)[:20] == bytes(frags[0])[:20]


def test_interface_no_time_exceeded_without_first_fragment(st):
    req = ip() / ICMP(type=8) / bytes(3000)
    frags = fragment(req, fragsize=1480)
    send(st, eth() / frags[1], now=0.0)
    st.poll(100.0)
    assert st.take_frames() == []
    assert st.counters["reasm_timeout"] == 1
