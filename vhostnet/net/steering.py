"""Which RX queue pair a frame for the guest goes to (multiqueue, VIRTIO_NET_F_MQ).

virtio 1.2 §5.1.6.5.5 leaves the choice to the device once the driver has
set the number of pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, handled by QEMU,
which then enables or disables our rings). Linux's virtio_net expects what
a real NIC with flow steering does: the packets of a flow come back on the
queue pair the flow was sent from, so one CPU handles both directions.

Theory of operation: every TX frame teaches a small bounded map its flow
key -> the pair it came from; the flow key is symmetric (the two endpoints
sorted), so the RX frame of the same flow, with source and destination
swapped, finds the same entry. A frame whose flow was never seen (a
connection the host opened, ARP, a flow whose pair was disabled) is spread
by a hash of the same (symmetric) key over the pairs whose RX ring is ready.
Only IPv4/IPv6 with TCP or UDP ports (not a later fragment) has ports; any
other IP frame is keyed by its addresses; non-IP frames (ARP) go to the
first ready pair.

Bounded: at most `capacity` flows; a new flow past that evicts the oldest
entry (insertion order), so a guest opening flows without end costs a
fixed amount of memory. Per frame: a few slices and one dict lookup; with
one pair the device does not call this module at all.
"""
from __future__ import annotations

import struct
from typing import Sequence

__all__ = ["Steering", "FLOW_MAP_SIZE", "flow_key"]

# Flows remembered; a few per guest CPU's worth of busy connections and then some.
FLOW_MAP_SIZE = 4096

ETH_TYPE_OFFSET = 12                 # IEEE 802.3: destination, source MAC, then the EtherType
ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800              # IEEE 802 numbers (RFC 9542 §3)
ETHERTYPE_IPV6 = 0x86DD
IPPROTO_TCP = 6                      # IANA protocol numbers (RFC 790)
IPPROTO_UDP = 17
IPV4_MIN_HLEN = 20                   # RFC 791 §3.1
IPV4_PROTO_OFFSET = 9                # RFC 791 §3.1: protocol
IPV4_FRAG_OFFSET = 6                 # RFC 791 §3.1: flags + fragment offset
IPV4_FRAG_MASK = 0x1FFF              # fragment offset bits: non-zero = not the first fragment
IPV4_ADDRS_OFFSET = 12               # source then destination, 4 bytes each
IPV6_HLEN = 40                       # RFC 8200 §3
IPV6_NEXT_OFFSET = 6                 # RFC 8200 §3: next header
IPV6_ADDRS_OFFSET = 8                # source then destination, 16 bytes each
PORTS_LEN = 4                        # TCP (RFC 9293 §3.1) and UDP (RFC 768): source, destination port

# One unpack for what IPv4 steering needs (RFC 791 §3.1, after the 14-byte Ethernet header):
# EtherType, version/IHL, flags + fragment offset, protocol, source, destination.
_V4 = struct.Struct("!12xHB5xHxB2xII")
assert _V4.size == ETH_HLEN + IPV4_ADDRS_OFFSET + 8, "_V4 encodes the offsets above"
_U16 = struct.Struct("!H")
_PORTS = struct.Struct("!HH")
_PORTED = (IPPROTO_TCP, IPPROTO_UDP)


def flow_key(data) -> tuple | None:
    """The symmetric flow key of an Ethernet frame, or None for a frame with no flow (ARP, runts).

    (protocol, lower endpoint, higher endpoint), each endpoint address << 16 | port
    (port 0 without ports): the same for both directions, ints only, so hash() of
    it is the same in every process (no PYTHONHASHSEED in it)."""
    n = len(data)
    if n < ETH_HLEN + IPV4_MIN_HLEN:
        return None
    etype, vihl, frag, proto, src, dst = _V4.unpack_from(data)
    if etype == ETHERTYPE_IPV4:
        ihl = (vihl & 0x0F) * 4
        l4 = ETH_HLEN + ihl
        ported = proto in _PORTED and ihl >= IPV4_MIN_HLEN and not frag & IPV4_FRAG_MASK
    elif etype == ETHERTYPE_IPV6:
        if n < ETH_HLEN + IPV6_HLEN:
            return None
        proto = data[ETH_HLEN + IPV6_NEXT_OFFSET]
        a0 = ETH_HLEN + IPV6_ADDRS_OFFSET
        src = int.from_bytes(data[a0:a0 + 16], "big")
        dst = int.from_bytes(data[a0 + 16:a0 + 32], "big")
        l4 = ETH_HLEN + IPV6_HLEN
        ported = proto in _PORTED
    else:
        return None
    if ported and l4 + PORTS_LEN <= n:
        sport, dport = _PORTS.unpack_from(data, l4)
        a, b = src << 16 | sport, dst << 16 | dport
    else:
        a, b = src << 16, dst << 16
    return (proto, a, b) if a <= b else (proto, b, a)


class Steering:
    """The flow -> queue pair map of one device, learned on TX, asked on RX."""

    def __init__(self, pairs: int, capacity: int = FLOW_MAP_SIZE):
        if pairs < 1 or capacity < 1:
            raise ValueError(f"need at least one pair and one flow slot (pairs {pairs}, capacity {capacity})")
        self.pairs = pairs
        self.capacity = capacity
        self.flows: dict[tuple, int] = {}
        # Counters for stats: RX frames placed by the map, by the hash, with no flow; TX flows learned
        # and moved (the guest sent an old flow from another pair), entries evicted.
        self.counters = {"rx_by_flow": 0, "rx_by_hash": 0, "rx_no_flow": 0,
                         "learned": 0, "moved": 0, "evicted": 0}

    def learn(self, data, pair: int) -> None:
        """A TX frame from PAIR: its flow's RX goes back there."""
        key = flow_key(data)
        if key is None:
            return
        flows = self.flows
        old = flows.get(key)
        if old == pair:
            return
        if old is None:
            if len(flows) >= self.capacity:
                del flows[next(iter(flows))]
                self.counters["evicted"] += 1
            self.counters["learned"] += 1
        else:
            self.counters["moved"] += 1
        flows[key] = pair

    def choose(self, data, ready: Sequence[int]) -> int:
        """The pair for an RX frame, among READY (pairs whose RX ring is ready; not empty)."""
        key = flow_key(data)
        if key is None:
            self.counters["rx_no_flow"] += 1
            return ready[0]
        pair = self.flows.get(key)
        if pair is not None and pair in ready:
            self.counters["rx_by_flow"] += 1
            return pair
        self.counters["rx_by_hash"] += 1
        return ready[hash(key) % len(ready)]

    def describe(self) -> dict:
        return {"pairs": self.pairs, "flows": len(self.flows), "capacity": self.capacity, **self.counters}
