"""The vhost-user server: one QEMU at a time, one trio nursery per connection.

The nursery owns every task of a connection: the message loop, a kick
waiter per started queue, the stack's timer, and the device's own tasks
(`Device.run`: vhostnet's host proxy and its host sockets). A server-level
nursery runs the host network's port-forward listeners (`hostnet`), which
outlive a reconnect. When QEMU goes away the
nursery is cancelled, the backend unmaps guest memory and closes every fd it
was given, and the server listens for the next QEMU (or exits with --once).

Work runs in the trio thread between awaits; a kick handler processes at
most a budget of descriptors before yielding so the message loop stays
responsive even when the guest floods a queue. Every step that runs
guest- or front-end-controlled work (a kick's ring work, a timer poll, one
vhost-user message) is timed: `Connection.steps` keeps the count, the
longest and how many took more than SLOW_STEP, shown by `inspect`/`stats`
as `loop` (docs/json.md).

A front-end that wants more queue pairs than served (QEMU's
-netdev vhost-user,queues=N past `serve --queues`) gives up after
GET_QUEUE_NUM and reconnects at once, up to a thousand times a second:
the server, not the connection, holds the limiter of the one line that
says which option to change (QUEUE_NUM_LOG_INTERVAL), and of the
connect/disconnect lines.

Next to each kick waiter runs the queue's safety poll (safety_poll.py),
which finds entries a driver made available without kicking. At
disconnect the log has one line per finding (rule, section, count, first
example), at most SUMMARY_LINES.
"""
from __future__ import annotations

import errno
import gc
import logging
import math
import os
import socket
import time

import trio

from vhostnet.logging_setup import one_line_traceback
from vhostnet.vhostuser.backend import Backend
from vhostnet.vhostuser.channel import FramingError, close_all, read_message
from vhostnet.vhostuser import protocol as P
from vhostnet.vhostuser.protocol import request_name
from vhostnet.vhostuser.idle_poll import DEFAULT_IDLE_POLL, IdlePoll
from vhostnet.vhostuser.kick_hook import current_kick_clock
from vhostnet.vhostuser.safety_poll import SafetyPoll, safety_poll_for
from vhostnet.ratelimit import RateLimitedLog
from vhostnet.sockets import SocketInUse, bind_unix

__all__ = ["Server", "SocketInUse"]

log = logging.getLogger("vhostnet.server")

# While a polled ("no fd") kick is in use we look at the ring this often.
POLL_INTERVAL = 0.001
# After an unexpected exception in a timer poll, wait this long before the next.
INTERNAL_ERROR_BACKOFF = 0.1
# At disconnect, at most this many findings are logged one per line.
SUMMARY_LINES = 32
# An event-loop step longer than this is counted as slow (issue 7: about 10 ms).
SLOW_STEP = 0.010
# The "asked for more queue pairs than served" line: once, then at most once a minute
# (with the count of those held back), however fast the front-end reconnects.
QUEUE_NUM_LOG_INTERVAL = 60.0
# QEMU gives up within a few messages of GET_QUEUE_NUM (net/vhost-user.c checks the
# count after pair 0's vhost_dev is set up); a connection that ends later without
# SET_FEATURES is something else (a guest that never loaded its driver, a crash).
QUEUE_NUM_GIVE_UP = 2.0


class StepStats:
    """How long the event loop's steps of work take: count, longest, slow ones, by kind.

    Wall-clock time is what the other tasks wait; the thread's CPU time
    (time.thread_time) is the step's own work, without the time the kernel
    gave other processes meanwhile (on a loaded machine the two differ a lot).
    """

    def __init__(self) -> None:
        self.steps = 0
        self.slow = 0
        self.max = 0.0
        self.max_cpu = 0.0
        self.max_kind: str | None = None
        self.max_by_kind: dict[str, float] = {}

    @staticmethod
    def start() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    def stop(self, kind: str, t0: tuple[float, float]) -> None:
        cpu = time.thread_time() - t0[1]
        if cpu > self.max_cpu:
            self.max_cpu = cpu
        self.add(kind, time.perf_counter() - t0[0])

    def add(self, kind: str, seconds: float) -> None:
        self.steps += 1
        if seconds > SLOW_STEP:
            self.slow += 1
        if seconds > self.max_by_kind.get(kind, 0.0):
            self.max_by_kind[kind] = seconds
            if seconds > self.max:
                self.max, self.max_kind = seconds, kind

    def describe(self) -> dict:
        return {"steps": self.steps, "max_step_ms": round(self.max * 1e3, 3), "max_step_kind": self.max_kind,
                "max_step_cpu_ms": round(self.max_cpu * 1e3, 3),
                "slow_steps": self.slow, "slow_step_ms": SLOW_STEP * 1e3,
                "max_step_ms_by_kind": {k: round(v * 1e3, 3) for k, v in sorted(self.max_by_kind.items())}}


async def send_all(sock, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


class Connection:
    """Tasks and state for one connected frontend."""

    def __init__(self, server: "Server", sock, nursery: trio.Nursery):
        self.server = server
        self.sock = sock
        self.nursery = nursery
        self.device = server.make_device()
        self.backend = Backend(self.device, rlog=server.rlog,
                               on_queue_start=self._queue_start, on_queue_stop=self._queue_stop,
                               on_queue_num_short=server.queue_num_short,
                               allow_unsealed_memory=server.allow_unsealed_memory,
                               strict=server.strict, checks=server.checks)
        self._kick_scopes: dict[int, trio.CancelScope] = {}
        self._polls: dict[int, SafetyPoll] = {}
        self._idle: dict[int, IdlePoll] = {}
        # The kick hook (kick_hook.py) when trio runs with its clock, else None.
        self._hook = current_kick_clock()
        self._hook_draining: set[int] = set()   # rings whose hook-started drain has a task now
        # The timer task sleeps in this scope until its deadline: the stack's next deadline.
        self._timer_scope = trio.CancelScope()
        self.messages = 0
        self.steps = StepStats()
        self.opened = time.monotonic()

    def describe_loop(self) -> dict:
        """The event loop's steps, and each kick waiter's idle poll (serve --idle-poll-us)."""
        doc = self.steps.describe()
        if self.server.idle_poll > 0:
            doc["idle_poll"] = {self.backend.queues[i].name: p.describe() for i, p in sorted(self._idle.items())}
        if self._hook is not None:
            doc["kick_hook"] = self._hook.describe()
        return doc

    # -- queues ----------------------------------------------------------

    def _queue_start(self, q) -> None:
        if not q.ready or q.index in self._kick_scopes:
            return
        scope = trio.CancelScope()
        self._kick_scopes[q.index] = scope
        if q.kick_fd is None:
            self.nursery.start_soon(self._poll_loop, q, scope)
        else:
            # With the kick hook, it runs the poll's looks where trio would
            # sleep (not with --idle-poll-us, whose waiter keeps trio busy).
            hook = self._hook if self._hook is not None and not self.server.idle_poll else None
            poll = self._polls[q.index] = safety_poll_for(q, self._drain, hook=hook)
            self.nursery.start_soon(self._queue_tasks, q, q.kick_fd, scope, poll)

    def _wake_polls(self) -> None:
        for poll in self._polls.values():
            poll.wake()

    async def _queue_tasks(self, q, fd: int, scope: trio.CancelScope, poll: SafetyPoll) -> None:
        """The kick waiter and the safety poll of one started queue, under its scope."""
        with scope:
            async with trio.open_nursery() as nursery:
                if self.server.safety_poll:
                    nursery.start_soon(self._run_poll, q, poll)
                await self._kick_loop(q, fd, poll, nursery)
                nursery.cancel_scope.cancel()

    def _queue_stop(self, q) -> None:
        poll = self._polls.pop(q.index, None)
        if poll is not None:
            poll.close()
        idle = self._idle.pop(q.index, None)
        if idle is not None:
            idle.close()
        scope = self._kick_scopes.pop(q.index, None)
        if scope is not None:
            scope.cancel()
        if q.kick_fd is not None:
            if self._hook is not None:
                self._hook.unwatch(q.kick_fd)
            # Wake any task waiting on the fd before the backend closes it.
            trio.lowlevel.notify_closing(q.kick_fd)

    def _work(self, q) -> bool:
        t0 = self.steps.start()
        try:
            more = self.device.process(self.backend.queues, q.index, trio.current_time())
        except Exception as e:
            # A bug, not the guest's doing (the device refuses what the guest
            # gets wrong): stop work on this ring until the driver restarts it,
            # keep the connection and the process.
            self._internal_error(q, e)
            return False
        finally:
            self.steps.stop(q.name, t0)
        self._rearm()
        return more

    def _internal_error(self, q, e: Exception) -> None:
        if q is not None:
            q.broken = "internal_error"
        self.backend.errors["internal_error"] = self.backend.errors.get("internal_error", 0) + 1
        self.server.rlog.log(logging.ERROR, "internal_error", "%s: internal error, ring stopped: %s",
                             q.name if q is not None else "device", one_line_traceback(e))

    async def _run_poll(self, q, poll: SafetyPoll) -> None:
        try:
            await poll.run()
        except Exception as e:
            self._poll_failed(q, poll, e)

    def _poll_failed(self, q, poll: SafetyPoll, e: Exception) -> None:
        # A bug in the poll (it only looks; the device refuses what the guest
        # gets wrong): the ring goes on without its poll, kicks still work.
        poll.failed = True
        self.backend.errors["safety_poll_error"] = self.backend.errors.get("safety_poll_error", 0) + 1
        self.server.rlog.log(logging.ERROR, "safety_poll_error",
                             "%s: internal error in the safety poll, which stops for this ring: %s",
                             q.name, one_line_traceback(e))

    async def _drain(self, q) -> None:
        while self._work(q):
            await trio.sleep(0)

    def _kicked(self, q, fd: int, poll: SafetyPoll) -> bool | None:
        """A kick's work once its eventfd is readable: read it, count it, one
        drain step. True: more work waits (drain again after a checkpoint);
        False: done (or a spurious wake-up); None: FD is not an eventfd, stop
        waiting on it. Sync: the kick task runs it after trio's wait, and the
        kick hook (kick_hook.py) from where trio would sleep."""
        try:
            got = os.read(fd, 8)
        except BlockingIOError:
            return False
        if len(got) != 8:
            # Not an eventfd after all (the backend checks, this is the last line):
            # readable for ever, so stop waiting rather than spin.
            self.server.rlog.warning("kick_eof", "%s: kick fd gave %d bytes, not an eventfd "
                                     "counter; no longer waiting on it", q.name, len(got))
            return None
        q.stats["kicks"] += 1
        if not poll.failed:
            try:
                poll.kicked()
            except Exception as e:
                self._poll_failed(q, poll, e)
        self._wake_polls()
        if not q.ready:
            return False
        poll.busy += 1
        try:
            return self._work(q)
        finally:
            poll.busy -= 1

    async def _drain_more(self, q, poll: SafetyPoll) -> None:
        """After a step that left work: the rest, a checkpoint between steps."""
        poll.busy += 1
        try:
            await trio.sleep(0)
            await self._drain(q)
        finally:
            poll.busy -= 1

    def _hook_kick(self, q, fd: int, poll: SafetyPoll, nursery: trio.Nursery) -> None:
        """The kick hook's handler for ring Q: the kick's first step here, the rest in a task."""
        res = self._kicked(q, fd, poll)
        if res is None:
            self._hook.unwatch(fd)        # the kick task stops on the same answer
        elif res and q.index not in self._hook_draining:
            self._hook_draining.add(q.index)
            nursery.start_soon(self._hook_drain, q, poll)

    async def _hook_drain(self, q, poll: SafetyPoll) -> None:
        try:
            await self._drain_more(q, poll)
        finally:
            self._hook_draining.discard(q.index)

    def _hook_failed(self, q, e: BaseException) -> None:
        # A bug: _kicked and _work catch what a driver can cause. The ring
        # goes on through trio's wait; the process and connection stay.
        self.backend.errors["kick_hook_error"] = self.backend.errors.get("kick_hook_error", 0) + 1
        self.server.rlog.log(logging.ERROR, "kick_hook_error", "%s: internal error in the kick hook, "
                             "which stops for this ring: %s", q.name, one_line_traceback(e))

    async def _kick_loop(self, q, fd: int, poll: SafetyPoll, nursery: trio.Nursery) -> None:
        hook = self._hook
        token = None
        try:
            await self._drain(q)  # chains posted before the kick fd arrived
            idle = self._idle[q.index] = IdlePoll(fd, self.server.idle_poll,
                                                  getattr(self.device, "idle_watch_fds", tuple))
            looking = idle.window > 0        # off (the default): the plain wait, nothing timed
            if hook is not None and not looking:
                token = hook.watch(fd, lambda: self._hook_kick(q, fd, poll, nursery),
                                   lambda e: self._hook_failed(q, e))
            while True:
                if not looking:
                    await trio.lowlevel.wait_readable(fd)
                elif idle.look():
                    if idle.must_checkpoint():
                        await trio.lowlevel.checkpoint()
                else:
                    slept = time.perf_counter()
                    await trio.lowlevel.wait_readable(fd)
                    idle.slept(time.perf_counter() - slept)
                res = self._kicked(q, fd, poll)
                if res is None:
                    return
                if res:
                    await self._drain_more(q, poll)
        except (trio.ClosedResourceError, OSError) as e:
            if getattr(e, "errno", None) not in (None, errno.EBADF):
                log.warning("%s: kick fd error: %s", q.name, e)
        finally:
            if token is not None:
                hook.unwatch(fd, token)

    async def _poll_loop(self, q, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                if q.ready:
                    await self._drain(q)
                await trio.sleep(POLL_INTERVAL)

    # -- stack timers ----------------------------------------------------

    def _rearm(self) -> None:
        # Moving the sleeping scope's deadline, rather than waking the timer
        # task to sleep again, saves a task step and a new cancel scope each
        # time a TCP timer comes nearer (issue 12: 1.5 timer wakes per NATed
        # connection, about 6 % of the backend's CPU in a connect/close race).
        dl = self.device.next_deadline()
        if dl is not None and dl < self._timer_scope.deadline:
            self._timer_scope.deadline = dl

    async def timer_loop(self) -> None:
        while True:
            dl = self.device.next_deadline()
            with trio.CancelScope(deadline=math.inf if dl is None else dl) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            now = trio.current_time()
            if now >= scope.deadline:
                self._wake_polls()
                t0 = self.steps.start()
                try:
                    self.device.poll(self.backend.queues, now)
                    self.steps.stop("timer", t0)
                except Exception as e:
                    self._internal_error(None, e)
                    await trio.sleep(INTERNAL_ERROR_BACKOFF)  # the deadline has not moved: do not spin

    # -- messages --------------------------------------------------------

    async def message_loop(self) -> None:
        while True:
            try:
                msg = await read_message(self.sock)
            except FramingError as e:
                self.server.rlog.warning("framing", "vhost-user framing lost, closing connection: %s", e)
                self.backend.errors["framing"] = self.backend.errors.get("framing", 0) + 1
                return
            except OSError as e:
                log.info("connection error: %s", e)
                return
            if msg is None:
                return
            request, flags, payload, fds, oversize = msg
            self.messages += 1
            log.debug("request %s flags %#x size %d fds %d", request_name(request), flags, len(payload), len(fds))
            t0 = self.steps.start()
            if oversize:
                close_all(fds)
                reply = self.backend.refuse(request, flags, f"payload of {len(payload)} bytes is larger than any request")
            else:
                reply = self.backend.handle(request, flags, payload, fds)
            self.steps.stop("message", t0)
            if reply is not None:
                try:
                    await send_all(self.sock, reply)
                except OSError as e:
                    log.info("cannot reply: %s", e)
                    return

    def close(self) -> None:
        for index in list(self._kick_scopes):
            self._queue_stop(self.backend.queues[index])
        self.backend.close()


class Server:
    """Serves one frontend at a time on SOCKET_PATH, or on LISTENER: an
    already-listening socket handed over by the caller (`serve --fd`). Then
    SOCKET_PATH only names it in logs and reports, and is never unlinked:
    the path, if any, belongs to whoever bound it. The listener itself is
    closed at the end either way (it was handed to us)."""

    def __init__(self, socket_path: str, make_device, *, once: bool = False,
                 rlog: RateLimitedLog | None = None, taps: list | None = None,
                 listener: socket.socket | None = None, hostnet=None,
                 allow_unsealed_memory: bool = False,
                 strict: bool = False, checks: bool = True, safety_poll: bool = True,
                 idle_poll: float = DEFAULT_IDLE_POLL):
        self.socket_path = socket_path
        self.owns_path = listener is None
        self.allow_unsealed_memory = allow_unsealed_memory
        self.strict = strict            # a MUST finding breaks the ring (serve --strict)
        self.checks = checks            # the conformance checks (off only to measure their cost)
        self.safety_poll = safety_poll  # look for unkicked entries (off only to measure its cost)
        self.idle_poll = idle_poll      # seconds a kick waiter reads its eventfd before sleeping (idle_poll.py)
        # The host network's server-level part (port forwards), served next to
        # the accept loop so its listeners outlive a QEMU reconnect; or None.
        self.hostnet = hostnet
        self.make_device = make_device
        self.once = once
        self.rlog = rlog or RateLimitedLog(log)
        # Server-level, so a reconnect storm shares them (see the module docstring).
        self.queue_num_log = RateLimitedLog(log, burst=1, per_second=1 / QUEUE_NUM_LOG_INTERVAL)
        self.connect_log = RateLimitedLog(log, burst=5, per_second=0.2)
        self.queue_num_short_seen = 0
        self.current: Connection | None = None
        # Link taps, callables tap(direction, frame): the same list the
        # composition root gave each device (vhostnet/launch/serve.py), so a
        # capture outlives a reconnect. Empty means no cost.
        self.taps: list = taps if taps is not None else []
        self.connections = 0
        self.listener: socket.socket | None = listener
        self.ready = trio.Event()

    def listen(self) -> None:
        if self.listener is None:
            self.listener = bind_unix(self.socket_path)

    async def serve(self) -> None:
        self.listen()
        lsock = trio.socket.from_stdlib_socket(self.listener)
        log.info("listening on %s", self.socket_path)
        # A full (generation 2) collection walks every tracked object: 11-22 ms
        # here with the program's ~34,000, inside whatever step triggered it.
        # Frozen once, before the first connection, the program is left out of
        # every collection for good, so one walks only what connections and
        # clients allocated since (0.04 ms for a fresh device and stack), and
        # the collection at each disconnect is as cheap.
        gc.collect()
        gc.freeze()
        try:
            async with trio.open_nursery() as nursery:
                if self.hostnet is not None:
                    await nursery.start(self.hostnet.serve)
                self.ready.set()
                await self._accept_loop(lsock)
                nursery.cancel_scope.cancel()
        finally:
            lsock.close()
            self.listener = None
            if self.owns_path:
                try:
                    os.unlink(self.socket_path)
                except OSError:
                    pass

    async def _accept_loop(self, lsock) -> None:
        while True:
            sock, _ = await lsock.accept()
            self.connections += 1
            self.connect_log.info("connect", "frontend connected (connection %d)", self.connections)
            session = await self._serve_connection(sock)
            # A front-end that set features had a session: its end is always
            # told (tools and tests wait for it). Only the short visits of a
            # reconnect storm (QEMU leaving after GET_QUEUE_NUM) are rate-limited.
            if session:
                log.info("frontend disconnected; guest memory unmapped, fds closed")
            else:
                self.connect_log.info("disconnect", "frontend disconnected; guest memory unmapped, fds closed")
            if self.once:
                return

    async def _serve_connection(self, sock) -> bool:
        """Serve one front-end until it goes; True if it set features (a session, not a visit)."""
        async with trio.open_nursery() as nursery:
            try:
                conn = Connection(self, sock, nursery)
            except BaseException:
                sock.close()
                raise
            self.current = conn
            try:
                nursery.start_soon(conn.timer_loop)
                nursery.start_soon(conn.device.run, conn.backend.queues, conn._rearm)
                await conn.message_loop()
            finally:
                nursery.cancel_scope.cancel()
                for poll in list(conn._polls.values()):
                    poll.close()   # pending kick_missed suspects become findings
                self._check_queue_num(conn)
                self._log_queues(conn)
                self._log_errors(conn)
                self._log_findings(conn)
                conn.close()
                # The socket goes before `current` is cleared: whoever waits
                # for current to be None sees every fd of the connection closed.
                sock.close()
                self.current = None
                # Nothing cyclic from the connection outlives it; the program
                # is frozen (serve), so this walks only what came since.
                gc.collect()
        return conn.backend.features_set

    def queue_num_short(self, pair: int | None) -> None:
        """The front-end wants queue pair PAIR (None: more than GET_QUEUE_NUM said) and we serve fewer."""
        self.queue_num_short_seen += 1
        served = self.current.backend.queue_num if self.current is not None else None
        if pair is None:
            asked = (f"the front-end left right after GET_QUEUE_NUM answered {served} queue pair(s), as QEMU "
                     f"does when asked for more (\"you are asking more queues than supported: {served}\")")
            want = "N"
        else:
            asked = f"the front-end asked for queue pair {pair + 1} but vhostnet serves {served}"
            want = str(pair + 1)
        self.queue_num_log.warning(
            "queue_num", "%s: start vhostnet with --queues %s (QEMU's -netdev vhost-user,queues=%s), "
            "or give -netdev vhost-user,...,queues=%s", asked, want, want, served)

    def _check_queue_num(self, conn: Connection) -> None:
        # The signs of QEMU's "you are asking more queues than supported": it asked
        # GET_QUEUE_NUM, set up pair 0 only (each pair's vhost_dev says GET_PROTOCOL_FEATURES),
        # never sent SET_FEATURES, and left at once.
        b = conn.backend
        if (b.queue_num_asked and not b.features_set and b.proto(P.ProtoFeat.MQ) and b.wanted_pair is None
                and b.requests.get("GET_PROTOCOL_FEATURES", 0) == 1
                and time.monotonic() - conn.opened < QUEUE_NUM_GIVE_UP
                and not any(q.started for q in b.queues)):
            self.queue_num_short(None)

    def _log_queues(self, conn: Connection) -> None:
        """One line: the chains each ring that ran moved (with several pairs, how traffic spread)."""
        used = [f"{q.name} {q.stats['chains']}" for q in conn.backend.queues if q.stats["chains"]]
        if used:
            self.connect_log.info("queues", "chains per queue: %s", ", ".join(used))

    def _log_findings(self, conn: Connection) -> None:
        """One line per finding of the connection (bounded), MUST before SHOULD."""
        from vhostnet.observe.check import connection_findings
        found = connection_findings(conn.backend)
        if not found:
            return
        for f in found[:SUMMARY_LINES]:
            log.warning("finding %s %s §%s on %s: %d time(s), first: %s", f["level"], f["rule"], f["section"],
                        f["queue_name"], f["count"], f["example"].get("detail", ""))
        if len(found) > SUMMARY_LINES:
            log.warning("... and %d more finding(s) (vhostnet check)", len(found) - SUMMARY_LINES)

    def _log_errors(self, conn: Connection) -> None:
        """One line per connection with every error count, so what rate limiting held back is told."""
        errors = {f"{q.name}:{k}": v for q in conn.backend.queues for k, v in q.errors.items()}
        errors.update(conn.backend.errors)
        findings = {k for q in conn.backend.queues for k in q.errors}
        errors.update({k: v for k, v in getattr(conn.device, "counters", {}).items()
                       if not k.endswith(("_frames", "_bytes")) and k not in findings})
        suppressed = self.rlog.suppressed_total + getattr(getattr(conn.device, "rlog", None),
                                                          "suppressed_total", 0)
        if errors:
            log.warning("connection %d errors: %s; %d log line(s) suppressed so far", self.connections,
                        ", ".join(f"{k} {v}" for k, v in sorted(errors.items())), suppressed)
