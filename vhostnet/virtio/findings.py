"""A driver's spec violations, each named with the virtio 1.2 section it breaks.

Every time the device refuses something a driver put in a ring (a chain, a
buffer, an index), it records a *finding*: a `Rule` (stable id, MUST or
SHOULD, the virtio 1.2 section whose normative statement was broken, one
line for people) plus, per queue, how often it happened and the first
example in detail (descriptor ids, addresses, lengths, what was expected
and what was seen). The ids are the keys of the `errors` maps in `inspect`
and `stats` (docs/json.md), so counting by reason is what it always was;
the full records are `inspect`'s `queues[].findings`.

Section numbers are those of "Virtual I/O Device (VIRTIO) Version 1.2"
(OASIS, 2022), chapter 2.7 for split rings and 5.1 for the network device,
checked against the spec's LaTeX sources (oasis-tcs/virtio-spec, split-ring.tex
and content.tex). Where a refusal follows from the structure of the ring
rather than from a sentence with MUST in it (a descriptor naming memory
outside the guest), the section is the one defining that structure.

A conformance checker (issue #10) builds on this: a Finding is the unit it
reports. Bounded: one Finding per (queue, rule), whatever the guest does.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Rule", "Finding", "Findings", "RULES", "rule", "SPEC"]

SPEC = "virtio 1.2"
MUST, SHOULD = "MUST", "SHOULD"


@dataclass(frozen=True)
class Rule:
    id: str
    level: str      # MUST or SHOULD: how hard the statement broken is
    section: str    # virtio 1.2 section number
    summary: str

    @property
    def message(self) -> str:
        return f"{SPEC} §{self.section}: {self.summary}"


RULES: dict[str, Rule] = {r.id: r for r in (
    # -- split virtqueues, virtio 1.2 §2.7 ------------------------------------------------
    Rule("desc_out_of_bounds", MUST, "2.7.5",
         "descriptor buffer is not inside guest memory"),
    Rule("next_out_of_range", MUST, "2.7.5",
         "descriptor's next field is not an index in its table"),
    Rule("chain_too_long", MUST, "2.7.5.3.1",
         "chain longer than the queue (a loop?)"),
    Rule("chain_excessive", SHOULD, "2.7.4.2",
         "chain uses an excessive number of descriptors (more than the device's limit, §2.7.4.1)"),
    Rule("read_after_write", MUST, "2.7.4.2",
         "device-readable descriptor after a device-writable one"),
    Rule("nested_indirect", MUST, "2.7.5.3.1",
         "indirect descriptor inside an indirect table"),
    Rule("indirect_with_next", MUST, "2.7.5.3.1",
         "descriptor sets both INDIRECT and NEXT"),
    Rule("bad_indirect_len", MUST, "2.7.5.3",
         "indirect table length is not a non-zero multiple of 16 or holds more entries than the queue"),
    Rule("indirect_out_of_bounds", MUST, "2.7.5.3",
         "indirect table is not inside guest memory"),
    Rule("head_out_of_range", MUST, "2.7.6",
         "avail ring entry names a descriptor outside the table"),
    Rule("avail_idx_jump", MUST, "2.7.6.1",
         "avail->idx moved by more than the queue size (or backwards): ring broken until restarted"),
    # -- packed virtqueues, virtio 1.2 §2.8 -----------------------------------------------
    Rule("packed_desc_not_avail", MUST, "2.8.17",
         "a chain's first descriptor was made available before the rest of the chain: ring broken"),
    Rule("packed_chain_too_long", MUST, "2.8.17",
         "chain longer than the queue size (no end found): ring broken"),
    Rule("packed_read_after_write", MUST, "2.8.17",
         "device-readable descriptor after a device-writable one"),
    Rule("packed_indirect_in_chain", MUST, "2.8.19",
         "INDIRECT descriptor in a chain linked by NEXT"),
    Rule("packed_nested_indirect", MUST, "2.8.19",
         "a flag other than WRITE (INDIRECT) inside an indirect table"),
    Rule("packed_bad_indirect_len", MUST, "2.8.7",
         "indirect table length is not a non-zero multiple of 16 or holds more entries than the queue"),
    Rule("packed_indirect_out_of_bounds", MUST, "2.8.7",
         "indirect table is not inside guest memory"),
    Rule("packed_desc_out_of_bounds", MUST, "2.8.4",
         "descriptor buffer is not inside guest memory"),
    Rule("packed_ring_overrun", MUST, "2.8.16",
         "the driver changed a descriptor the device still holds: ring broken"),
    Rule("packed_id_out_of_range", SHOULD, "2.8.10.1",
         "buffer id not below the queue size (at most Queue Size buffers can be queued)"),
    Rule("packed_id_in_flight", SHOULD, "2.8.21.1",
         "buffer id made available again while the device still holds it (ids are to be free)"),
    Rule("packed_chain_excessive", SHOULD, "2.7.4.2",
         "chain uses an excessive number of descriptors (more than the device's limit, 1024); "
         "in the ring itself: ring broken"),
    Rule("packed_kick_missed", MUST, "2.8.21.3.1",
         "descriptors made available with notifications enabled, and no notification sent"),
    # -- the network device, virtio 1.2 §5.1 ---------------------------------------------
    Rule("tx_runt", MUST, "5.1.6.2",
         "TX chain shorter than the virtio-net header plus an Ethernet header"),
    Rule("tx_oversize", MUST, "5.1.6.2",
         "TX frame larger than the largest IPv4 packet plus an Ethernet header"),
    Rule("tx_bad_csum_offset", MUST, "5.1.6.2.1",
         "NEEDS_CSUM with csum_start/csum_offset outside the frame"),
    Rule("tx_bad_gso", MUST, "5.1.6.2.1",
         "gso_type not allowed by the negotiated features"),
    Rule("rx_readonly_buffer", MUST, "5.1.6.3",
         "RX buffer has no device-writable part"),
    Rule("rx_buffer_below_header", MUST, "5.1.6.3.1",
         "with MRG_RXBUF, an RX buffer smaller than the virtio-net header"),
    Rule("rx_buffer_too_small", SHOULD, "5.1.6.3.1",
         "RX buffer too small for the frame (without MRG_RXBUF each buffer must hold a whole frame)"),
    Rule("rx_ring_too_small", SHOULD, "5.1.6.3.1",
         "with MRG_RXBUF, every posted RX buffer together cannot hold the frame"),
    # -- the conformance checker (issue #10): tolerated, but named ---------------------------
    # The device carries on after these (nothing it cannot handle), unless
    # `serve --strict` makes a MUST break the ring. Sections as above.
    Rule("indirect_not_negotiated", MUST, "2.7.5.3.1",
         "INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC negotiated"),
    Rule("avail_head_in_use", MUST, "2.7.13.1",
         "head made available again while the device still holds it (not yet in the used ring)"),
    Rule("avail_idx_backwards", MUST, "2.7.6.1",
         "avail->idx decremented (buffers cannot be unexposed): ring broken until restarted"),
    Rule("avail_flags_invalid", MUST, "2.7.7.1",
         "avail->flags other than 0 with EVENT_IDX, or other than 0/1 without it"),
    Rule("kick_missed", MUST, "2.7.10.1",
         "entries made available with notifications enabled and no notification (found by the safety poll)"),
    Rule("tx_num_buffers", MUST, "5.1.6.2.1",
         "TX header with num_buffers other than 0"),
    Rule("tx_csum_not_negotiated", MUST, "5.1.6.2.1",
         "TX header flags other than 0 (NEEDS_CSUM) without VIRTIO_NET_F_CSUM"),
    Rule("tx_data_valid", MUST, "5.1.6.2.1",
         "TX header sets DATA_VALID or RSC_INFO"),
    Rule("tx_gso_without_size", MUST, "5.1.6.2.1",
         "gso_type other than GSO_NONE with gso_size 0"),
    Rule("tx_gso_without_csum", MUST, "5.1.6.2.1",
         "gso_type other than GSO_NONE without NEEDS_CSUM"),
    Rule("rx_buffer_below_minimum", SHOULD, "5.1.6.3.1",
         "without MRG_RXBUF, RX buffer smaller than 1526 bytes (65562 with GUEST_TSO4/6/UFO)"),
    Rule("feature_not_offered", MUST, "2.2.1",
         "SET_FEATURES accepts a feature the device did not offer"),
    Rule("feature_dependency", MUST, "2.2.1",
         "SET_FEATURES accepts a feature without one it requires (virtio-net: §5.1.3.1)"),
)}


def rule(reason: str) -> Rule:
    """The rule for a reason id; an unregistered id still gets a record (no section)."""
    r = RULES.get(reason)
    return r if r is not None else Rule(reason, MUST, "?", reason.replace("_", " "))


class Finding:
    """One rule broken on one queue: how often, and the first time in detail."""
    __slots__ = ("rule", "queue", "count", "first")

    def __init__(self, rule_: Rule, queue: str, first: dict):
        self.rule = rule_
        self.queue = queue
        self.count = 0
        self.first = first

    def describe(self) -> dict:
        r = self.rule
        return {"id": r.id, "level": r.level, "spec": SPEC, "section": r.section,
                "message": r.message, "queue": self.queue, "count": self.count,
                "first": dict(self.first)}


class Findings:
    """The findings of one queue, by rule id (insertion order = order first seen)."""

    def __init__(self, queue: str):
        self.queue = queue
        self.by_id: dict[str, Finding] = {}

    def add(self, reason: str, detail: str, example: dict) -> Finding:
        f = self.by_id.get(reason)
        if f is None:
            f = self.by_id[reason] = Finding(rule(reason), self.queue, {"detail": detail, **example})
        f.count += 1
        return f

    def counts(self) -> dict[str, int]:
        return {k: f.count for k, f in self.by_id.items()}

    def describe(self) -> list[dict]:
        return [f.describe() for f in self.by_id.values()]

    def clear(self) -> None:
        self.by_id.clear()

    def __bool__(self) -> bool:
        return bool(self.by_id)
