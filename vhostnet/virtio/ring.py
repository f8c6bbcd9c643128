"""What the device needs of a virtqueue, whatever its layout.

The device (vhostnet/net/device.py) and the inspection tools
(vhostnet/observe/) see a ring only through `Ring`. The split ring
(split.py, virtio 1.2 §2.7) implements it; a packed ring (§2.8) would be a
second implementation with the same methods, so that neither the device nor
the tools change.

Taking and returning buffers:

    chain = ring.pop(budget)    # next well-formed chain, or None (bad ones are refused and counted;
                                # None too once the Budget of descriptors is spent)
    chain = ring.pop_fast(budget)   # the same, but only a one-descriptor chain needing no
                                # finding; else None and nothing taken (no refusal either)
    ring.push(chain.head, n)    # a used element: n bytes written into the chain
    region, heads, offs, lens, room = ring.take_writable(need, min_len, budget)
                                # RX buffers for one frame (MRG_RXBUF), in one call; inside mark()
    ring.push_many(heads, used_lens)   # their used elements, in order
    n = ring.put_frame(hdr, data, min_len, budget, count_off)
                                # all three for one frame at once, if the next buffers hold it; else 0
    if ring.publish(): ...      # make them visible; True if the driver wants an interrupt
    ring.want_kick_at_next()    # ask for a kick before sleeping; True if work raced in

Read-only inspection never changes the ring and never raises on a bad one.
"""
from __future__ import annotations

from typing import Protocol

__all__ = ["Chain", "ChainError", "Ring", "Budget", "MAX_CHAIN_DESCS"]

# The longest chain we walk (virtio 1.2 §2.7.4.1: "The device MAY have a
# reasonable limit of descriptors it will allow in a chain"). QEMU's limit
# is the same (VIRTQUEUE_MAX_SIZE); Linux's virtio-net uses at most
# MAX_SKB_FRAGS + 2. A longer chain is refused as chain_excessive, so one
# chain costs at most this many descriptors of work, whatever the queue size.
MAX_CHAIN_DESCS = 1024


class Budget:
    """How much guest-controlled work one event-loop step may do, in descriptors.

    `pop()` charges every avail entry it consumes: a good chain its
    descriptors, a refused one the descriptors walked before the refusal
    (at least one), so a driver feeding nothing but bad chains is bounded
    like any other. The caller stops when `left` is 0 or less and yields.
    """
    __slots__ = ("left",)

    def __init__(self, descriptors: int):
        self.left = descriptors

    @property
    def spent(self) -> bool:
        return self.left <= 0


class ChainError(Exception):
    """A descriptor chain the device refuses.

    `reason` is the id of the rule it broke (vhostnet/virtio/findings.py),
    `example` what a finding records of it (descriptor ids, addresses,
    expected vs seen), `ndesc` the descriptors walked before the refusal:
    what it costs a work budget.
    """

    def __init__(self, reason: str, detail: str, ndesc: int = 1, **example):
        super().__init__(detail)
        self.reason = reason
        self.ndesc = max(ndesc, 1)
        self.example = example


class Chain:
    """One descriptor chain taken from the avail ring.

    `readable` / `writable` are sequences (lists, or tuples on the rings'
    one-descriptor fast path) of views straight into guest memory, in chain
    order; drop the chain before the memory is unmapped.

    The rings' pop_fast builds it with one_buffer_chain() (no __init__
    call per chain): a new slot must be set there too (tests/device:
    test_fast_path_chains_have_every_field).
    """
    __slots__ = ("head", "readable", "writable", "read_len", "write_len", "ndesc")

    def __init__(self, head, readable, writable, read_len, write_len, ndesc=1):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.read_len = read_len
        self.write_len = write_len
        self.ndesc = ndesc   # descriptors walked: what a work budget counts


_new_chain = object.__new__


def one_buffer_chain(head: int, v, length: int, writable: bool) -> Chain:
    """The Chain of one descriptor (view V, LENGTH bytes), built without
    Chain.__init__: the type call and its keyword-capable __init__ were a
    third of pop_fast's time; a plain call sets every slot."""
    c = _new_chain(Chain)
    c.head = head
    c.ndesc = 1
    if writable:
        c.readable = ()
        c.writable = (v,)
        c.read_len = 0
        c.write_len = length
    else:
        c.readable = (v,)
        c.writable = ()
        c.read_len = length
        c.write_len = 0
    return c


class Ring(Protocol):
    index: int
    name: str
    num: int
    call_fd: int | None
    broken: str | None
    checks: bool                    # the conformance checks are on (findings.py)
    avail_seen: int
    epoch: int                      # bumped by attach() and on_start(): cached views of the ring are stale
    stats: dict[str, int]
    errors: dict[str, int]          # refusals by rule id (findings.py)

    @property
    def ready(self) -> bool: ...

    # -- the data path -------------------------------------------------
    def pop(self, budget: Budget | None = None, fast: bool = True) -> Chain | None: ...
    # The common case only (a one-descriptor chain needing no finding), else
    # None with nothing taken or recorded: pop() itself starts with it.
    def pop_fast(self, budget: Budget | None = None) -> Chain | None: ...
    # MRG_RXBUF, inside mark(): pop_fast()'s writable chains, several at once, as
    # (region view, heads, offsets in it, lengths, bytes); push_many() returns them.
    def take_writable(self, need: int, min_len: int, budget: Budget) -> tuple: ...
    def push_many(self, heads: list[int], lens: list[int]) -> None: ...
    # The common case of a whole frame in one call (take, copy, used elements); 0: not done, nothing taken.
    def put_frame(self, hdr, data, min_len: int, budget: Budget, count_off: int) -> int: ...
    def unpop(self) -> None: ...
    def mark(self) -> tuple: ...
    def commit(self) -> None: ...
    def rollback(self, mark: tuple) -> None: ...
    def taken_since(self, mark: tuple) -> int: ...
    def push(self, head: int, length: int) -> None: ...
    def publish(self) -> bool: ...
    def has_unpublished(self) -> bool: ...
    def want_kick_at_next(self, seen: int | None = None) -> bool: ...

    # -- the conformance checker and the safety poll (issue #10) -------------
    strict: bool                    # a MUST finding breaks the ring (serve --strict)
    indirect_ok: bool               # VIRTIO_F_INDIRECT_DESC negotiated
    @property
    def mapped(self) -> bool: ...
    def avail_idx(self) -> int: ...
    def avail_event(self) -> int | None: ...
    def must_notify(self, old: int, new: int) -> bool: ...
    def reset_held(self) -> None: ...
    def pending(self) -> int: ...

    # -- read-only inspection -----------------------------------------
    def describe(self) -> dict: ...
    def describe_chain(self, head: int, limit: int | None = None) -> list[dict]: ...
    def chain_truncated(self, entries: list[dict]) -> bool: ...
    def chain_refusal(self, head: int) -> dict | None: ...
    def describe_findings(self) -> list[dict]: ...

    # -- refusals (findings.py) -------------------------------------------
    def count_error(self, reason: str, detail: str, **example) -> None: ...
    def record(self, reason: str, detail: str, **example): ...
    def used_entry(self, idx: int) -> tuple[int, int] | None: ...
    def avail_entry(self, idx: int) -> int | None: ...
    def posted(self) -> dict[int, list[int]]: ...
    def guest_used_idx(self) -> int: ...


def chain_truncated(entries: list[dict]) -> bool:
    """A ring's describe_chain() stopped at its bound: the chain claims more descriptors."""
    return bool(entries) and entries[-1].get("more", False)


def refusal_doc(e: ChainError) -> dict:
    """What `inspect --desc` shows of the finding a chain would be refused with."""
    from vhostnet.virtio.findings import rule
    r = rule(e.reason)
    return {"id": r.id, "level": r.level, "section": r.section, "message": r.message, "detail": str(e)}


def describe_common(ring) -> dict:
    """The part of describe() both ring formats share: identity, state, the
    three areas' addresses (user and guest) and the device's two positions."""
    mem = ring.mem
    return {
        "index": ring.index, "name": ring.name, "size": ring.num,
        "started": ring.started, "enabled": ring.enabled, "broken": ring.broken,
        "desc_user_addr": ring.desc_uva, "avail_user_addr": ring.avail_uva,
        "used_user_addr": ring.used_uva,
        "desc_guest_addr": mem.uva_to_gpa(ring.desc_uva) if mem else None,
        "avail_guest_addr": mem.uva_to_gpa(ring.avail_uva) if mem else None,
        "used_guest_addr": mem.uva_to_gpa(ring.used_uva) if mem else None,
        "last_avail_idx": ring.last_avail_idx, "used_idx": ring.used_idx,
    }
