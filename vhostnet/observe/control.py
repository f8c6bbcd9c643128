"""The control socket: ask a running backend what it sees, or stream its frames.

A Unix stream socket (default: the vhost-user socket path plus ".ctl",
mode 0600, since it shows guest memory) served in the backend's own trio
run, next to `Server.serve`. The protocol is JSON lines: one request object
per line, one reply object per line.

    -> {"cmd": "inspect"}                  <- {"ok": true, "result": {...}}
    -> {"cmd": "desc", "queue": 1, "head": 0}
    -> {"cmd": "stats"}
    -> {"cmd": "check"}                    (vhostnet/observe/check.py)
    -> {"cmd": "ping"}                     <- {"ok": true, "result": {"pid": ...}}
    -> {"cmd": "fault", "op": "set", "spec": "loss=5%"}   (vhostnet/link/control.py)
    -> {"cmd": "forward_add", "spec": "tcp:127.0.0.1:2222-:22"}   (and forward_remove, forward_list)
    -> {"cmd": "capture", "count": 10, "at": "guest"}   <- {"ok": true, "result": {"linktype": 1, ...}}
                                           <- {"frame": {"ts":..,"dir":"tx","len":98,..}} + 98 raw bytes
                                           <- ... then {"end": {"frames": 10, "dropped": 0, ...}}
    -> not json                            <- {"ok": false, "error": "..."}

Results are documented in docs/json.md (built by vhostnet/observe/report.py).

Robustness, since the backend must outlive any client. Every client holds
one of MAX_CLIENTS slots, and no kind of client can hold one for ever:
- a client waiting between requests is *idle*. It is closed after
  IDLE_TIMEOUT seconds, and when all slots are taken a new client evicts
  the longest-idle one (which gets a last `{"ok": false, "closed": "idle"}`
  line; ControlClient reconnects by itself). Only when no slot is idle is
  a new client refused with an error line;
- a client that has begun a request line must end it within
  REQUEST_TIMEOUT seconds (a byte a minute would otherwise hold its slot);
- a request line is at most MAX_REQUEST bytes; a longer one gets an error
  and the connection is closed (the stream cannot be resynchronised);
- a bad request gets an error reply and the connection carries on;
- at most MAX_CAPTURES captures run at once (a capture on a quiet link is
  not idle, so captures alone must never fill the slots);
- a client's output is bounded: one reply at a time (the next request is
  not read until the reply is taken), and a reply it has not taken within
  SEND_TIMEOUT seconds closes it. It blocks only its own task;
- a capture's frames wait in a queue bounded by CAPTURE_FRAMES and
  CAPTURE_BYTES, and all captures together by CAPTURE_BYTES_TOTAL; past
  that they are dropped and counted, never queued without bound nor waited
  for in the data path. The tap is removed when the count is reached or
  the client goes (EOF is watched while idle).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import time

import trio

from vhostnet.link.control import FaultRequestError, fault_request
from vhostnet.observe import report
from vhostnet.observe.check import check_doc
from vhostnet.observe.pcap import LINKTYPE_ETHERNET, snapshot, wire_bytes
from vhostnet.ratelimit import RateLimitedLog
from vhostnet.sockets import bind_unix

__all__ = ["ControlServer", "ControlClient", "ControlError", "default_control_path"]

log = logging.getLogger("vhostnet.control")

MAX_CLIENTS = 16            # slots; see the module docstring for who may hold one
MAX_CAPTURES = 4            # < MAX_CLIENTS: captures never take every slot
MAX_REQUEST = 64 * 1024     # bytes in one request line
IDLE_TIMEOUT = 300.0        # seconds a client may wait between requests (`--watch 60` fits)
REQUEST_TIMEOUT = 10.0      # seconds from a request line's first byte to its newline
SEND_TIMEOUT = 10.0         # seconds a client may take to read one reply or frame
CAPTURE_FRAMES = 4096       # frames queued for one capture client
CAPTURE_BYTES = 16 << 20    # bytes queued for one capture client
CAPTURE_BYTES_TOTAL = 32 << 20   # bytes queued for all capture clients together


def default_control_path(socket_path: str) -> str:
    return socket_path + ".ctl"


class ControlError(Exception):
    """An error reply, or no backend to talk to. The message is for the user."""


class _BadRequest(Exception):
    pass


class _Lost(ControlError):
    """The connection broke (not a timeout): a request may retry on a new one."""


class _BytePool:
    """Bytes queued for all capture clients together, against CAPTURE_BYTES_TOTAL."""

    def __init__(self):
        self.used = 0


class _Capture:
    """One client's capture: a tap filling a bounded queue the client task drains."""

    def __init__(self, count: int | None, pool: _BytePool):
        self.count = count
        self.pool = pool
        self.queue: collections.deque = collections.deque()
        self.queued_bytes = 0
        self.taken = 0      # frames accepted from the tap
        self.dropped = 0
        self.wake = trio.Event()

    def __call__(self, direction: str, frame) -> None:
        if self.count is not None and self.taken >= self.count:
            return
        n = len(frame.data)
        if (len(self.queue) >= CAPTURE_FRAMES or self.queued_bytes + n > CAPTURE_BYTES
                or self.pool.used + n > CAPTURE_BYTES_TOTAL):
            self.dropped += 1
            return
        self.queue.append(snapshot(direction, frame))
        self.queued_bytes += n
        self.pool.used += n
        self.taken += 1
        self.wake.set()

    def take(self):
        snap = self.queue.popleft()
        self.queued_bytes -= len(snap.data)
        self.pool.used -= len(snap.data)
        return snap

    def discard(self) -> None:
        """The capture ended: give its queued bytes back to the pool."""
        self.pool.used -= self.queued_bytes
        self.queued_bytes = 0
        self.queue.clear()


class _Client:
    """One connected client's slot. `idle_since` is set while it waits for a
    request with nothing half-received (evictable), None while it is busy."""

    def __init__(self, stream, number: int):
        self.stream = stream
        self.number = number
        self.scope = trio.CancelScope()
        self.idle_since: float | None = None
        self.line_started = 0.0     # trio time of the first byte of the current request line
        self.evicted = False


class ControlServer:
    def __init__(self, server, path: str, *, complete_csum: bool = True, link=None):
        self.server = server
        self.link = link    # vhostnet.link.LinkSettings, as given to make_server: faults, stack-side taps
        self.path = path
        self.complete_csum = complete_csum
        self.started = time.monotonic()
        self.slots: dict[int, _Client] = {}
        self.accepted = 0
        self.evictions = 0      # idle clients closed to make room
        self.refused = 0        # clients refused: every slot busy
        self.timeouts = 0       # clients closed for idling or a request left unfinished
        self.captures: list[_Capture] = []
        self.capture_pool = _BytePool()
        self.capture_frames = 0
        self.capture_dropped = 0
        self.rlog = RateLimitedLog(log)
        self.listener: socket.socket | None = None

    @property
    def clients(self) -> int:
        return len(self.slots)

    def listen(self) -> None:
        if self.listener is None:
            # Born private (umask at bind time), not chmod-ed after: no window
            # in which another user could connect and read guest memory.
            old = os.umask(0o177)
            try:
                self.listener = bind_unix(self.path, backlog=MAX_CLIENTS)
            finally:
                os.umask(old)

    def capture_stats(self) -> dict:
        return {"clients": len(self.captures), "frames": self.capture_frames,
                "dropped": self.capture_dropped + sum(c.dropped for c in self.captures)}

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.listen()
        lsock = trio.socket.from_stdlib_socket(self.listener)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await lsock.accept()
                    stream = trio.SocketStream(sock)
                    if len(self.slots) >= MAX_CLIENTS and not self._evict_one():
                        self.refused += 1
                        self.rlog.info("refused", "control socket: all %d slots busy; refusing a client",
                                       MAX_CLIENTS)
                        nursery.start_soon(self._refuse, stream)
                        continue
                    self.accepted += 1
                    client = _Client(stream, self.accepted)
                    self.slots[client.number] = client
                    nursery.start_soon(self._client, client)
        finally:
            lsock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _evict_one(self) -> bool:
        """Close the longest-idle client, if any is idle, to free its slot now."""
        idle = [c for c in self.slots.values() if c.idle_since is not None and not c.evicted]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since)
        victim.evicted = True
        victim.scope.cancel()
        del self.slots[victim.number]   # the slot is free at once; its task ends soon
        self.evictions += 1
        self.rlog.info("evicted", "control socket full: closed a client idle for %.1f s",
                       time.monotonic() - victim.idle_since)
        return True

    async def _refuse(self, stream) -> None:
        with trio.move_on_after(1):
            try:
                await self._send(stream, {"ok": False, "error": f"too many control clients "
                                          f"(at most {MAX_CLIENTS}, none idle)"})
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
                pass
        await stream.aclose()

    async def _send(self, stream, obj) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(data)

    async def _goodbye(self, stream, reason: str, error: str) -> None:
        """A last line for a client we close (not an answer to a request), briefly."""
        with trio.move_on_after(0.2):
            try:
                await self._send(stream, {"ok": False, "closed": reason, "error": error})
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
                pass

    async def _client(self, client: _Client) -> None:
        stream = client.stream
        try:
            async with stream:
                with client.scope:
                    await self._requests(client)
                if client.evicted:
                    with trio.CancelScope(shield=True):
                        await self._goodbye(stream, "idle", "closed while idle: the control socket "
                                            f"was full ({MAX_CLIENTS} clients); reconnect")
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass
        finally:
            self.slots.pop(client.number, None)

    async def _receive(self, client: _Client, buf: bytearray) -> bool:
        """More bytes of a request into BUF; False when the client left or timed out."""
        if buf:
            client.idle_since = None
            deadline, why = client.line_started + REQUEST_TIMEOUT, "request"
        else:
            client.idle_since = time.monotonic()
            deadline, why = trio.current_time() + IDLE_TIMEOUT, "idle"
        with trio.move_on_at(deadline) as scope:
            chunk = await client.stream.receive_some(65536)
        client.idle_since = None
        if scope.cancelled_caught:
            self.timeouts += 1
            await self._goodbye(client.stream, why, f"closed: no request for {IDLE_TIMEOUT:g} s"
                                if why == "idle" else
                                f"closed: a request line unfinished after {REQUEST_TIMEOUT:g} s")
            return False
        if not chunk:
            return False
        if not buf:
            client.line_started = trio.current_time()
        buf += chunk
        return True

    async def _requests(self, client: _Client) -> None:
        stream = client.stream
        buf = bytearray()
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_REQUEST:
                    await self._send(stream, {"ok": False, "error":
                                     f"request longer than {MAX_REQUEST} bytes; closing"})
                    return
                if not await self._receive(client, buf):
                    return
                continue
            line = bytes(buf[:nl])
            del buf[:nl + 1]
            if buf:   # the rest is the start of the next request line
                client.line_started = trio.current_time()
            if len(line) > MAX_REQUEST:
                await self._send(stream, {"ok": False, "error":
                                 f"request longer than {MAX_REQUEST} bytes; closing"})
                return
            if not line.strip():
                continue
            req = None
            try:
                req = self._parse(line)
                if req["cmd"] == "capture":
                    await self._capture(stream, req)
                    return
                reply = {"ok": True, "result": self._answer(req)}
            except (_BadRequest, report.ReportError) as e:
                self.rlog.info("bad_request", "control client: %s", e)
                reply = {"ok": False, "error": str(e)}
            except Exception as e:
                # A bug in a report (a ring state it did not expect) must not
                # end the process, and with it the guest's network: the client
                # gets an error, the log the traceback (rate-limited).
                import traceback
                self.rlog.log(logging.ERROR, "control_internal_error", "control request %s: internal error: %s",
                              req.get("cmd") if isinstance(req, dict) else "?",
                              " | ".join(line.strip() for line in traceback.format_exception(e) if line.strip()))
                reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
            await self._send(stream, reply)

    @staticmethod
    def _parse(line: bytes) -> dict:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise _BadRequest(f"not a JSON object: {e}") from None
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            raise _BadRequest('a request is a JSON object with a "cmd" string, e.g. {"cmd": "inspect"}')
        return req

    def _answer(self, req: dict) -> dict:
        cmd = req["cmd"]
        if cmd == "ping":
            return {"pid": os.getpid(), "socket": self.server.socket_path,
                    "connected": self.server.current is not None}
        if cmd == "inspect":
            return report.inspect_doc(self.server, self)
        if cmd == "stats":
            return report.stats_doc(self.server, self)
        if cmd == "desc":
            return report.desc_doc(self.server, _int(req, "queue"), _int(req, "head"))
        if cmd == "check":
            return check_doc(self.server)
        if cmd == "fault":
            try:
                return fault_request(self.link, self.server, req)
            except FaultRequestError as e:
                raise _BadRequest(str(e)) from None
        if cmd in ("forward_add", "forward_remove", "forward_list"):
            return self._forward(cmd, req)
        raise _BadRequest(f"unknown command {cmd!r}; known: ping, inspect, desc, stats, check, fault, capture, "
                          f"forward_add, forward_remove, forward_list")

    def _forward(self, cmd: str, req: dict):
        from vhostnet.hostnet.forwards import ForwardError, ForwardSpec
        hostnet = getattr(self.server, "hostnet", None)
        if hostnet is None:
            raise _BadRequest("this backend has no host network (no NAT, no forwards)")
        fwd = hostnet.forwards
        if cmd == "forward_list":
            return fwd.list()
        spec = req.get("spec")
        if not isinstance(spec, str):
            raise _BadRequest(f'{cmd} needs "spec": a string like "tcp:127.0.0.1:2222-:22"')
        try:
            parsed = ForwardSpec.parse(spec)
            return fwd.add(parsed) if cmd == "forward_add" else fwd.remove(parsed)
        except (ForwardError, OSError) as e:
            raise _BadRequest(str(e)) from None

    async def _capture(self, stream, req: dict) -> None:
        count = req.get("count")
        if count is not None:
            count = _int(req, "count")
            if count < 1:
                raise _BadRequest("count must be at least 1")
        complete = self.complete_csum and not req.get("raw_csum")
        at = req.get("at", "guest")   # which side of the fault layer (vhostnet/link/taps.py)
        if at not in ("guest", "stack") or (at == "stack" and self.link is None):
            raise _BadRequest('"at" is "guest" (as the guest sends and receives) or "stack" '
                              '(as the stack does, on the other side of the fault layer)')
        if len(self.captures) >= MAX_CAPTURES:
            raise _BadRequest(f"too many captures at once (at most {MAX_CAPTURES})")
        cap = _Capture(count, self.capture_pool)
        taps = self.server.taps if at == "guest" else self.link.stack_taps
        taps.append(cap)
        self.captures.append(cap)
        sent = 0
        ended = False
        try:
            await self._send(stream, {"ok": True, "result": {"linktype": LINKTYPE_ETHERNET, "count": count,
                                                             "complete_csum": complete, "at": at}})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_eof, stream, nursery.cancel_scope)
                while count is None or sent < count:
                    if not cap.queue:
                        cap.wake = trio.Event()
                        await cap.wake.wait()
                        continue
                    snap = cap.take()
                    data = wire_bytes(snap, complete)
                    # A JSON header line, then the frame's bytes as they are:
                    # no base64 or escaping of 64 KiB frames in the backend.
                    head = json.dumps({"frame": {
                        "ts": snap.ts, "dir": snap.direction, "len": len(data),
                        "csum_partial": bool(snap.csum_start), "gso_size": snap.gso_size}},
                        separators=(",", ":")).encode()
                    with trio.fail_after(SEND_TIMEOUT):
                        await stream.send_all(head + b"\n" + data)
                    sent += 1
                    self.capture_frames += 1
                await self._send(stream, {"end": {"frames": sent, "dropped": cap.dropped, "reason": "count"}})
                ended = True
                nursery.cancel_scope.cancel()
        finally:
            if cap in taps:
                taps.remove(cap)
            self.captures.remove(cap)   # its drops move from the running ones to the total
            cap.discard()
            self.capture_dropped += cap.dropped
            if not ended:   # the backend is stopping (or the client left): say so, briefly
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(0.5):
                        try:
                            await self._send(stream, {"end": {"frames": sent, "dropped": cap.dropped,
                                                              "reason": "backend stopping"}})
                        except (trio.BrokenResourceError, trio.ClosedResourceError,
                                trio.TooSlowError, OSError):
                            pass

    @staticmethod
    async def _watch_eof(stream, scope: trio.CancelScope) -> None:
        """During a capture the client only listens: anything it sends, or EOF, ends it."""
        try:
            await stream.receive_some(1)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()


def _int(req: dict, key: str) -> int:
    v = req.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _BadRequest(f'"{key}" must be an integer, got {v!r}')
    return v


# -- client --------------------------------------------------------------------

class ControlClient:
    """Blocking client for the CLI: one connection, request/reply or a stream.

    The backend may close a client that sat idle (IDLE_TIMEOUT, or evicted
    to make room); `request()` then reconnects once and asks again, which
    is safe because every request/reply command only reads."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self.reconnects = 0
        self._connect()

    def _connect(self) -> None:
        path = self.path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise ControlError(f"no control socket at {path}; is `vhostnet serve` running "
                               f"(it prints the path it listens on)?") from None
        except (ConnectionRefusedError, socket.timeout):
            self.sock.close()
            raise ControlError(f"nothing answers on {path} (a backend that exited without "
                               f"cleaning up?)") from None
        except PermissionError:
            self.sock.close()
            raise ControlError(f"permission denied on {path}; the control socket is "
                               f"readable by the backend's user only") from None
        except OSError as e:
            self.sock.close()
            raise ControlError(f"cannot connect to {path}: {e}") from None
        self.file = self.sock.makefile("rb")

    def send(self, obj: dict) -> None:
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except socket.timeout:
            raise ControlError(f"the backend at {self.path} did not take a request in time") from None
        except OSError as e:
            raise _Lost(f"lost the backend at {self.path}: {e}") from None

    def read(self) -> dict | None:
        try:
            line = self.file.readline()
        except socket.timeout:
            raise ControlError(f"the backend at {self.path} did not answer in time") from None
        except OSError as e:
            raise _Lost(f"lost the backend at {self.path}: {e}") from None
        if not line:
            return None
        return json.loads(line)

    def read_bytes(self, n: int) -> bytes:
        """The raw bytes that follow a capture's frame line."""
        try:
            data = self.file.read(n)
        except OSError as e:
            raise ControlError(f"lost the backend at {self.path}: {e}") from None
        if len(data) != n:
            raise ControlError(f"the backend at {self.path} closed the connection mid-frame")
        return data

    def request(self, cmd: str, **kw) -> dict:
        for attempt in (0, 1):
            try:
                self.send({"cmd": cmd, **kw})
                reply = self.read()
            except _Lost:
                if attempt:
                    raise
                reply = None
            if reply is not None and "closed" not in reply:
                break
            if attempt:   # closed again, at once: not an idle timeout
                raise ControlError(reply.get("error") if reply else
                                   f"the backend at {self.path} closed the connection")
            self.close()          # closed while we were idle: once more, on a new connection
            self._connect()
            self.reconnects += 1
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "error"))
        return reply["result"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
