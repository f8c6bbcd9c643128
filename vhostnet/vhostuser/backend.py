"""The vhost-user backend: one connection's protocol state, no I/O.

`Backend.handle()` takes one request (already read off the socket, with its
fds) and returns the reply bytes to send, if any. It owns guest memory and
the virtqueues; the device (vhostnet/net/device.py, through the Device protocol of device.py) sees only started queues and
kicks. The server (server.py) does the socket and eventfd I/O and
is told through `on_queue_start` / `on_queue_stop` when to wait on a kick fd.

Multiqueue (PROTOCOL_F_MQ): one connection carries every queue pair.
QEMU's vhost-user net opens one vhost_dev per pair on the same socket;
each sends its own SET_FEATURES and vring messages (ring 2k, 2k+1), the
one-time requests (SET_OWNER, SET_MEM_TABLE, GET_QUEUE_NUM...) come from
pair 0 only, and SET_VRING_ENABLE switches a pair's rings when the guest
changes the number of pairs. A repeated SET_FEATURES with the same bits
changes nothing. GET_QUEUE_NUM answers the device's `vhost_queue_num`
(queue pairs for virtio-net). `on_queue_num_short(pair)` is told when the
front-end asks for a ring of a pair we do not serve, so the server can say
so once, whatever the reconnect rate.

Ring rules (docs/interop/vhost-user.rst): a ring is *started* by
SET_VRING_KICK and *stopped* by GET_VRING_BASE. If PROTOCOL_FEATURES was not
negotiated a started ring is enabled at once; otherwise it starts disabled
and SET_VRING_ENABLE switches it.

A bad request never raises out of handle(): it is logged (rate-limited),
counted, and answered with failure where a reply is owed. That includes a
handler that fails in a way nobody foresaw (TypeError, KeyError...): it is
counted as `internal_error` and the connection carries on.

File descriptors: every fd that arrives with a request is owned by
handle() until a handler *takes* it, by removing it from the list it was
given (`_keep`), which it does only once nothing can fail any more. What is
left in the list when the handler returns or raises is closed, exactly
once. A ring's kick/call/err fd is closed by the ring's owner (here) when it
is replaced or the connection ends, and set to None in the same step, so no
stale fd number is ever closed again (it may by then belong to someone
else). Kick, call and err fds must be eventfds (fdkind.py): anything else
(a pipe, a socket, an O_PATH fd) is refused.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import Callable

from vhostnet.logging_setup import one_line_traceback
from vhostnet.vhostuser import protocol as P
from vhostnet.vhostuser.fdkind import require_eventfd
from vhostnet.vhostuser.memory import GuestMemory, MemoryError_
from vhostnet.vhostuser.protocol import Req, BadMessage
from vhostnet.ratelimit import RateLimitedLog
from vhostnet.virtio import features as F
from vhostnet.virtio.packed import PackedRing
from vhostnet.virtio.findings import Findings
from vhostnet.virtio.split import MAX_QUEUE_SIZE, SplitRing
from vhostnet.vhostuser.device import Device

__all__ = ["Backend"]

log = logging.getLogger("vhostnet.backend")

_HDR = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")

# Requests whose answer is a reply message of their own (not a REPLY_ACK).
_HAS_REPLY = {Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_QUEUE_NUM,
              Req.GET_VRING_BASE, Req.GET_CONFIG, Req.GET_MAX_MEM_SLOTS, Req.GET_STATUS}
# How many fds each request may carry.
_FDS = {Req.SET_MEM_TABLE: P.MAX_MEM_REGIONS, Req.SET_VRING_KICK: 1, Req.SET_VRING_CALL: 1,
        Req.SET_VRING_ERR: 1, Req.SET_LOG_FD: 1, Req.SET_LOG_BASE: 1, Req.SET_BACKEND_REQ_FD: 1,
        Req.ADD_MEM_REG: 1, Req.SET_INFLIGHT_FD: 1}


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _no_op(q) -> None:
    pass


def _keep(fds: list[int], fd: int) -> int:
    """Take FD out of a request's list: from now on the caller owns it and must close it."""
    fds.remove(fd)
    return fd


class Backend:
    """One connection's vhost-user state.

    `on_queue_start(q)` / `on_queue_stop(q)` are the server's: it waits on a
    started queue's kick fd, and stops waiting before the fd is closed.
    """

    def __init__(self, device: Device, *, rlog: RateLimitedLog | None = None,
                 on_queue_start: Callable[[SplitRing], None] = _no_op,
                 on_queue_stop: Callable[[SplitRing], None] = _no_op,
                 on_queue_num_short: Callable[[int], None] = _no_op,
                 allow_unsealed_memory: bool = False, strict: bool = False, checks: bool = True):
        self.device = device
        # memory.py: accept guest memory a front-end could shrink under us (SIGBUS)?
        self.allow_unsealed_memory = allow_unsealed_memory
        self.rlog = rlog or RateLimitedLog(log)
        self.queues = [SplitRing(i, device.queue_names[i], on_error=self._queue_error,
                                 strict=strict, checks=checks)
                       for i in range(device.num_queues)]
        # Findings that belong to no queue: the features the driver took (§2.2.1).
        self.findings = Findings("device")
        self.mem: GuestMemory | None = None
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.mtu: int | None = None
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.on_queue_start = on_queue_start
        self.on_queue_stop = on_queue_stop
        self.on_queue_num_short = on_queue_num_short
        # For the server's "asked for more pairs than served" line: what the front-end did.
        self.queue_num_asked = False
        self.features_set = False
        self.wanted_pair: int | None = None   # a ring of a pair past queue_num was asked for

    # -- what we offer ---------------------------------------------------

    @property
    def offered_features(self) -> int:
        return self.device.device_features | (1 << P.VHOST_USER_F_PROTOCOL_FEATURES)

    @property
    def offered_protocol_features(self) -> int:
        # CONFIG is left out: QEMU's virtio-net keeps its own config space
        # and warns about a backend offering it. GET_CONFIG is still answered.
        # MQ always: with it QEMU asks GET_QUEUE_NUM and, with one pair
        # served and queues=2 asked, says so instead of failing on a ring index.
        return ((1 << P.ProtoFeat.MQ) | (1 << P.ProtoFeat.REPLY_ACK) | (1 << P.ProtoFeat.MTU)
                | (1 << P.ProtoFeat.RESET_DEVICE))

    @property
    def queue_num(self) -> int:
        """GET_QUEUE_NUM's answer: the device's (queue pairs for virtio-net), else its queue count."""
        return getattr(self.device, "vhost_queue_num", len(self.queues))

    def proto(self, feat: P.ProtoFeat) -> bool:
        return bool(self.protocol_features >> feat & 1)

    # -- entry point -----------------------------------------------------

    def handle(self, request: int, flags: int, payload: bytes, fds: list[int]) -> bytes | None:
        name = P.request_name(request)
        self.requests[name] = self.requests.get(name, 0) + 1
        need_reply = bool(flags & P.FLAG_NEED_REPLY) and self.proto(P.ProtoFeat.REPLY_ACK)
        # Ours until a handler takes one (_keep); whatever is left is closed below.
        fds = list(fds)
        try:
            if flags & P.VERSION_MASK != P.FLAG_VERSION:
                raise BadMessage(f"{name}: protocol version {flags & P.VERSION_MASK}, expected 1")
            allowed = _FDS.get(request, 0)
            if len(fds) > allowed:
                raise BadMessage(f"{name}: carried {len(fds)} fds, at most {allowed} expected")
            handler = getattr(self, "_" + name.lower(), None) if request in P.Req._value2member_map_ else None
            if handler is None:
                raise BadMessage(f"unsupported request {name}")
            body = P.parse_payload(request, payload)
            result = handler(body, fds, payload)
        except BadMessage as e:
            return self._fail(request, name, str(e), need_reply, payload)
        except (MemoryError_, ValueError, OverflowError, OSError) as e:
            return self._fail(request, name, f"{name}: {e}", need_reply, payload)
        except Exception as e:  # a handler bug must not end the connection, nor the process
            self.errors["internal_error"] = self.errors.get("internal_error", 0) + 1
            self.rlog.log(logging.ERROR, "internal_error", "internal error handling %s: %s", name,
                          one_line_traceback(e))
            return self._fail(request, name, f"{name}: internal error: {e!r}", need_reply, payload)
        finally:
            for fd in fds:
                _close(fd)
        if request in _HAS_REPLY:
            return self._reply(request, result)
        if need_reply:
            return self._reply(request, _U64.pack(0))
        return None

    def refuse(self, request: int, flags: int, detail: str) -> bytes | None:
        """Answer a request that could not even be parsed (e.g. oversized)."""
        name = P.request_name(request)
        need_reply = bool(flags & P.FLAG_NEED_REPLY) and self.proto(P.ProtoFeat.REPLY_ACK)
        return self._fail(request, name, f"{name}: {detail}", need_reply)

    def _fail(self, request, name, detail, need_reply, payload: bytes = b"") -> bytes | None:
        reason = "bad_" + name.lower() if not name.startswith("UNKNOWN") else "unknown_request"
        self.errors[reason] = self.errors.get(reason, 0) + 1
        self.rlog.warning(reason, "refused vhost-user request: %s", detail)
        if request in _HAS_REPLY:
            # The frontend waits for a reply of this type; a zero value with
            # the right header is the least surprising answer.
            if request == Req.GET_VRING_BASE:
                # Echo the ring asked about: frontends (DPDK) check it.
                index = int.from_bytes(payload[:4], "little") if len(payload) >= 4 else 0
                return self._reply(request, _STATE.pack(index, 0))
            return self._reply(request, _U64.pack(0))
        if need_reply:
            return self._reply(request, _U64.pack(1))
        return None

    @staticmethod
    def _reply(request: int, payload: bytes) -> bytes:
        return _HDR.pack(request, P.FLAG_VERSION | P.FLAG_REPLY, len(payload)) + payload

    def _queue(self, index: int) -> SplitRing:
        if not 0 <= index < len(self.queues):
            if index >= len(self.queues) and self.queue_num < len(self.queues):
                # A queue pair past the ones served (virtio-net: rings 2k, 2k+1 are pair k).
                self.wanted_pair = index * self.queue_num // len(self.queues)
                self.on_queue_num_short(self.wanted_pair)
            raise BadMessage(f"queue index {index} out of range 0..{len(self.queues) - 1}")
        return self.queues[index]

    def _queue_error(self, q: SplitRing, finding, detail: str) -> None:
        r = finding.rule
        self.rlog.warning(f"{q.name}:{r.id}", "%s: guest driver error %s (%s %s): %s", q.name, r.id,
                          r.message, r.level, detail)
        if q.broken is not None and q.err_fd is not None:
            try:
                os.write(q.err_fd, _U64.pack(1))
            except OSError:
                pass

    # -- features and ownership ------------------------------------------

    def _get_features(self, body, fds, raw):
        return _U64.pack(self.offered_features)

    def _set_features(self, body, fds, raw):
        want = body.value
        extra = want & ~self.offered_features
        if extra:
            self.findings.add("feature_not_offered", f"SET_FEATURES {want:#x} takes {extra:#x}, not offered",
                              {"expected": f"bits of {self.offered_features:#x}", "seen": f"{want:#x}",
                               "extra": F.names(extra)})
            raise BadMessage(f"SET_FEATURES asks for bits we did not offer: {extra:#x}")
        # MQ requires CTRL_VQ (§5.1.3.1), but the control queue is the front-end's
        # (QEMU, DPDK virtio-user keep it) and its bit is never sent to a vhost-user backend.
        missing = F.missing_requirements(want | 1 << F.CTRL_VQ if want >> F.MQ & 1 else want)
        if missing:
            # Tolerated: the device only uses an offload together with what it needs.
            self.findings.add("feature_dependency", f"SET_FEATURES {want:#x}: " + "; ".join(missing),
                              {"expected": "each feature with the ones it requires (§5.1.3.1)",
                               "seen": missing})
        packed = bool(want >> F.RING_PACKED & 1)
        if any(q.packed != packed for q in self.queues):
            if any(q.started for q in self.queues):
                raise BadMessage("SET_FEATURES changes the ring format (RING_PACKED) while a ring is started")
            self.queues = [self._reformat(q, PackedRing if packed else SplitRing) for q in self.queues]
        self.features = want
        self.features_set = True
        for q in self.queues:
            q.event_idx = bool(want >> F.EVENT_IDX & 1)
            q.indirect_ok = bool(want >> F.INDIRECT_DESC & 1)
        self.device.set_features(want)

    def _reformat(self, q, cls):
        """The same ring as CLS (split <-> packed): its set-up so far carries over.

        QEMU sends SET_VRING_ENABLE before SET_FEATURES, so a ring may be
        enabled, and have call/err fds, before its format is known."""
        q.detach()
        new = cls(q.index, q.name, on_error=self._queue_error, strict=q.strict, checks=q.checks)
        for name in ("num", "desc_uva", "avail_uva", "used_uva", "log_gpa", "addr_flags", "enabled",
                     "kick_fd", "call_fd", "err_fd", "kick_polled", "call_none"):
            setattr(new, name, getattr(q, name))
        if new.num and new.desc_uva and self.mem is not None:
            try:
                new.attach(self.mem)
            except (MemoryError_, ValueError):
                new.detach()   # SET_VRING_ADDR / SET_VRING_KICK will say why
        return new

    def _get_protocol_features(self, body, fds, raw):
        return _U64.pack(self.offered_protocol_features)

    def _set_protocol_features(self, body, fds, raw):
        want = body.value
        extra = want & ~self.offered_protocol_features
        if extra:
            raise BadMessage(f"SET_PROTOCOL_FEATURES asks for bits we did not offer: {extra:#x}")
        self.protocol_features = want

    def _get_queue_num(self, body, fds, raw):
        self.queue_num_asked = True
        return _U64.pack(self.queue_num)

    def _get_max_mem_slots(self, body, fds, raw):
        return _U64.pack(P.MAX_MEM_REGIONS)

    def _set_owner(self, body, fds, raw):
        self.owner = True

    def _reset_owner(self, body, fds, raw):
        self.reset()

    def _reset_device(self, body, fds, raw):
        self.reset()

    def reset(self) -> None:
        """Back to the state of a fresh connection (rings stopped, memory kept)."""
        for q in self.queues:
            self._stop(q)
            q.enabled = False
            q.last_avail_idx = q.used_idx = 0
            q.broken = None
        if any(q.packed for q in self.queues):
            self.queues = [self._reformat(q, SplitRing) for q in self.queues]
        self.features = 0
        self.device.set_features(0)

    # -- memory ----------------------------------------------------------

    def _set_mem_table(self, body, fds, raw):
        # The mappings keep the memory; handle() closes the fds afterwards.
        warnings: list[str] = []
        new = GuestMemory.from_fds(body, fds, allow_unsealed=self.allow_unsealed_memory, warnings=warnings)
        for w in warnings:
            log.warning("%s", w)
        old = self.mem
        for q in self.queues:
            q.detach()
        self.mem = new
        if old is not None:
            old.close()
        for q in self.queues:
            if q.num and q.desc_uva:
                try:
                    q.attach(new)
                except (MemoryError_, ValueError) as e:
                    self._stop(q)
                    raise BadMessage(f"{q.name}: rings are not inside the new memory table: {e}") from None
        log.info("memory table: %d region(s), %d MiB", len(new.regions), new.total_size >> 20)

    def _set_log_base(self, body, fds, raw):
        raise BadMessage("dirty logging (migration) is not supported")

    _set_log_fd = _set_log_base

    # -- rings -----------------------------------------------------------

    def _set_vring_num(self, body, fds, raw):
        q = self._queue(body.index)
        n = body.num
        if not 0 < n <= MAX_QUEUE_SIZE or (not q.packed and n & (n - 1)):
            # virtio 1.2 §2.7: a split ring's size is a power of two; §2.8: a packed one's need not be.
            kind = "in" if q.packed else "a power of two in"
            raise BadMessage(f"{q.name}: size {n} is not {kind} 1..{MAX_QUEUE_SIZE}")
        if q.started:
            raise BadMessage(f"{q.name}: size changed while the ring is started")
        if n != q.num:
            # Views sized for the old queue would be read past their end:
            # unmap them; SET_VRING_KICK (or the next SET_VRING_ADDR) maps the ring anew.
            q.detach()
        q.num = n

    def _set_vring_addr(self, body, fds, raw):
        q = self._queue(body.index)
        if q.started:
            raise BadMessage(f"{q.name}: addresses changed while the ring is started")
        q.detach()
        q.addr_flags = body.flags
        q.desc_uva, q.used_uva, q.avail_uva = body.desc_user_addr, body.used_user_addr, body.avail_user_addr
        q.log_gpa = body.log_guest_addr
        if self.mem is not None:
            try:
                q.attach(self.mem)
            except (MemoryError_, ValueError) as e:
                q.detach()
                raise BadMessage(f"{q.name}: {e}") from None

    def _set_vring_base(self, body, fds, raw):
        q = self._queue(body.index)
        if q.started:
            raise BadMessage(f"{q.name}: base changed while the ring is started")
        try:
            q.set_base(body.num)
        except ValueError as e:
            raise BadMessage(str(e)) from None

    def _get_vring_base(self, body, fds, raw):
        q = self._queue(body.index)
        self._stop(q)
        return _STATE.pack(q.index, q.base())

    def _ring_fd(self, body, fds, what):
        """(queue, fd or None) of a SET_VRING_KICK/CALL/ERR, checked; the fd is not taken yet."""
        q = self._queue(body.value & P.VRING_IDX_MASK)
        nofd = bool(body.value & P.VRING_NOFD_MASK)
        if body.value & ~(P.VRING_IDX_MASK | P.VRING_NOFD_MASK):
            raise BadMessage(f"{what}: unknown bits in {body.value:#x}")
        if nofd:
            return q, None   # an fd sent anyway is closed by handle()
        if len(fds) != 1:
            raise BadMessage(f"{what} for {q.name}: expected one fd, got {len(fds)}")
        fd = fds[0]
        require_eventfd(fd, f"{what} for {q.name}")
        try:
            os.set_blocking(fd, False)
        except OSError as e:
            raise BadMessage(f"{what} for {q.name}: cannot make the eventfd non-blocking: {e}") from None
        return q, fd

    def _set_vring_kick(self, body, fds, raw):
        q, fd = self._ring_fd(body, fds, "SET_VRING_KICK")
        if self.mem is None:
            raise BadMessage(f"{q.name}: cannot start: no memory table yet")
        if not q.mapped:
            try:
                q.attach(self.mem)
            except (MemoryError_, ValueError) as e:
                raise BadMessage(f"{q.name}: cannot start: {e}") from None
        # Nothing below can fail: the ring takes the fd.
        self._stop(q)
        q.kick_fd = None if fd is None else _keep(fds, fd)
        q.kick_polled = fd is None
        q.on_start()
        q.started = True
        if not self.features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            q.enabled = True
        log.debug("%s started (size %d, base %d, kick %s)", q.name, q.num, q.last_avail_idx,
                  "polled" if fd is None else f"fd {fd}")
        self.on_queue_start(q)

    def _set_vring_call(self, body, fds, raw):
        q, fd = self._ring_fd(body, fds, "SET_VRING_CALL")
        _close(q.call_fd)
        q.call_fd = None if fd is None else _keep(fds, fd)
        q.call_none = fd is None

    def _set_vring_err(self, body, fds, raw):
        q, fd = self._ring_fd(body, fds, "SET_VRING_ERR")
        _close(q.err_fd)
        q.err_fd = None if fd is None else _keep(fds, fd)

    def _set_vring_enable(self, body, fds, raw):
        q = self._queue(body.index)
        # QEMU sends this before SET_FEATURES: like QEMU, we only require
        # that PROTOCOL_FEATURES was offered (it always is).
        if body.num not in (0, 1):
            raise BadMessage(f"SET_VRING_ENABLE: value {body.num} (expected 0 or 1)")
        q.enabled = bool(body.num)
        if q.started and q.enabled:
            self.on_queue_start(q)

    def _stop(self, q: SplitRing) -> None:
        was = q.started
        q.started = False
        self.on_queue_stop(q)
        if was:
            log.debug("%s stopped at avail %d used %d", q.name, q.last_avail_idx, q.used_idx)
        _close(q.kick_fd)
        q.kick_fd = None

    # -- net-specific and misc ------------------------------------------

    def _send_rarp(self, body, fds, raw):
        # Only used after migration, which we do not support; harmless to accept.
        pass

    def _net_set_mtu(self, body, fds, raw):
        if not 68 <= body.value <= 65535:
            raise BadMessage(f"NET_SET_MTU {body.value} out of range 68..65535")
        self.mtu = body.value
        self.device.set_mtu(body.value)

    def _get_config(self, body, fds, raw):
        data = self.device.get_config(body.offset, body.size)
        return _HDR.pack(body.offset, len(data), body.flags) + data

    def _set_config(self, body, fds, raw):
        # virtio-net config is read-only for the driver except through
        # control commands; accept and ignore, as QEMU does.
        pass

    # -- teardown --------------------------------------------------------

    def close(self) -> None:
        """Stop every ring, close every fd we were given, unmap guest memory."""
        for q in self.queues:
            self._stop(q)
            _close(q.call_fd)
            _close(q.err_fd)
            q.call_fd = q.err_fd = None
            q.detach()
        if self.mem is not None:
            self.mem.close()
            self.mem = None

    # -- introspection ---------------------------------------------------

    def describe(self) -> dict:
        return {
            "features": self.features,
            "protocol_features": self.protocol_features,
            "owner": self.owner,
            "mtu": self.mtu,
            "memory": self.mem.describe() if self.mem else [],
            "queues": [q.describe() for q in self.queues],
            "requests": dict(self.requests),
            "errors": dict(self.errors),
        }
