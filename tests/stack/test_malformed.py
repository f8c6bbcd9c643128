"""Property tests: nothing the guest sends makes Stack.receive raise, and
every frame leaves a trace (an output frame or a counter besides rx_frames)."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from scapy.layers.inet import TCP, fragment

from stack import Frame
from stack.interface import Stack
from tests.stack.conftest import (ARP, CFG, GUEST_IP, GUEST_MAC, ICMP, IP, UDP, Ether, eth,
                                  ip)

BCAST = "ff:ff:ff:ff:ff:ff"

VALID = [
    bytes(Ether(src=GUEST_MAC, dst=BCAST) / ARP(psrc=GUEST_IP, hwsrc=GUEST_MAC, pdst="10.0.2.2")),
    bytes(eth() / ip() / ICMP(type=8) / bytes(56)),
    bytes(eth() / ip("8.8.8.8") / ICMP(type=8) / bytes(8)),
    bytes(eth() / ip() / UDP(sport=5, dport=7) / b"echo"),
    bytes(eth() / ip("10.0.2.3") / UDP(sport=5, dport=53) / b"dns?"),
    bytes(eth(BCAST) / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)),
    bytes(eth() / ip() / TCP(sport=4000, dport=7, flags="S")),
    bytes(eth() / ip(GUEST_IP) / TCP(sport=4000, dport=7, flags="PA") / bytes(3000)),
    bytes(eth() / ip(options=[b"\x01\x01\x01\x00"]) / ICMP(type=8)),
    bytes(eth() / ip(proto=99) / b"x"),
] + [bytes(eth() / f) for f in fragment(ip() / ICMP(type=8) / bytes(2000), fragsize=1480)]

meta = hs.fixed_dictionaries({
    "csum_start": hs.sampled_from([0, 0, 34, 40, 5000]),
    "csum_offset": hs.sampled_from([0, 6, 16, 2000]),
    "gso_size": hs.sampled_from([0, 0, 1, 536, 1448, 70000]),
    "csum_valid": hs.booleans(),
})


def mutate(data: bytes, draw) -> bytes:
    b = bytearray(data)
    # Half the time leave the Ethernet and IPv4 headers intact so that
    # mutations reach ARP/ICMP/UDP/TCP parsing instead of the IP checksum.
    lo = 34 if draw(hs.booleans()) and len(b) > 34 else 0
    for _ in range(draw(hs.integers(0, 6))):
        if len(b) <= lo:
            break
        i = draw(hs.integers(lo, len(b) - 1))
        b[i] = draw(hs.integers(0, 255))
    cut = draw(hs.integers(0, len(b)))
    return bytes(b[:cut]) if draw(hs.booleans()) else bytes(b)


def check(stack: Stack, data: bytes, m: dict, now: float) -> None:
    before = sum(v for k, v in stack.counters.items() if k != "rx_frames")
    stack.receive(Frame(memoryview(bytearray(data)), **m), now)
    out = stack.take_frames()
    after = sum(v for k, v in stack.counters.items() if k != "rx_frames")
    assert out or after > before, f"frame left no trace: {data.hex()} {m}"
    for f in out:
        assert len(f.data) >= 14


_settings = settings(max_examples=400, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(hs.binary(max_size=200), meta, hs.booleans(), hs.booleans())
def test_random_bytes(data, m, csum, tso):
    st = Stack(CFG)
    st.set_offloads(csum, tso)
    check(st, data, m, 0.0)


@_settings
@given(hs.data(), meta, hs.booleans(), hs.booleans())
def test_mutated_valid_frames(data, m, csum, tso):
    st = Stack(CFG)
    st.set_offloads(csum, tso)
    for _ in range(data.draw(hs.integers(1, 4))):
        base = data.draw(hs.sampled_from(VALID))
        check(st, mutate(base, data.draw), m, 0.0)
    st.poll(100.0)
    st.take_frames()
    st.snapshot()


@_settings
@given(hs.data())
def test_ethertype_ipv4_random_payload(data):
    st = Stack(CFG)
    head = bytes(eth(type=0x0800))
    body = data.draw(hs.binary(min_size=0, max_size=120))
    check(st, head + body, {}, 0.0)


@_settings
@given(proto=hs.sampled_from([1, 6, 17, 2, 255]),
       dst=hs.sampled_from(["10.0.2.2", "10.0.2.3", GUEST_IP, "10.0.2.255", "224.0.0.1",
                            "8.8.8.8", "0.0.0.0"]),
       src=hs.sampled_from([GUEST_IP, "0.0.0.0", "10.0.2.99", "1.2.3.4"]),
       flags=hs.sampled_from([0, 1, 2]), frag=hs.integers(0, 8191), ttl=hs.integers(0, 2),
       body=hs.binary(max_size=64), m=meta, csum=hs.booleans(), tso=hs.booleans(),
       dmac=hs.sampled_from(["52:55:0a:00:02:02", BCAST]))
def test_valid_ip_header_random_payload(proto, dst, src, flags, frag, ttl, body, m, csum,
                                        tso, dmac):
    """Structure-aware: a correct IPv4 header (scapy computes length and checksum)
    around arbitrary L4 bytes, so every protocol parser sees garbage."""
    st = Stack(CFG)
    st.set_offloads(csum, tso)
    pkt = Ether(src=GUEST_MAC, dst=dmac) / IP(src=src, dst=dst, proto=proto, flags=flags,
                                              frag=frag if flags != 2 else 0, ttl=ttl) / body
    check(st, bytes(pkt), m, 0.0)
    st.poll(50.0)
    st.take_frames()
