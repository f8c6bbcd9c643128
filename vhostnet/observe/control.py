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
    -> {"cmd": "capture", "count": 10, "at": "guest"}   <- {"ok": true, "result": {"linktype": 1, ...}}
                                           <- {"frame": {"ts":..,"dir":"tx","len":98,..}} + 98 raw bytes
                                           <- ... then {"end": {"frames": 10, "dropped": 0, ...}}
    -> not json                            <- {"ok": false, "error": "..."}

Results are documented in docs/json.md (built by vhostnet/observe/report.py).

Robustness, since the backend must outlive any client:
- at most MAX_CLIENTS at once; one more gets an error line and is closed;
- a request line is at most MAX_REQUEST bytes; a longer one gets an error
  and the connection is closed (the stream cannot be resynchronised);
- a bad request gets an error reply and the connection carries on;
- a client that stops reading blocks only its own task; a reply it has
  not taken within SEND_TIMEOUT seconds closes it;
- a capture's frames wait in a queue bounded by CAPTURE_FRAMES and
  CAPTURE_BYTES; past that they are dropped and counted, never queued
  without bound nor waited for in the data path. The tap is removed when
  the count is reached or the client goes (EOF is watched while idle).
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

MAX_CLIENTS = 16
MAX_REQUEST = 64 * 1024
SEND_TIMEOUT = 10.0
CAPTURE_FRAMES = 4096
CAPTURE_BYTES = 16 << 20


def default_control_path(socket_path: str) -> str:
    return socket_path + ".ctl"


class ControlError(Exception):
    """An error reply, or no backend to talk to. The message is for the user."""


class _BadRequest(Exception):
    pass


class _Capture:
    """One client's capture: a tap filling a bounded queue the client task drains."""

    def __init__(self, count: int | None):
        self.count = count
        self.queue: collections.deque = collections.deque()
        self.queued_bytes = 0
        self.taken = 0      # frames accepted from the tap
        self.dropped = 0
        self.wake = trio.Event()

    def __call__(self, direction: str, frame) -> None:
        if self.count is not None and self.taken >= self.count:
            return
        n = len(frame.data)
        if len(self.queue) >= CAPTURE_FRAMES or self.queued_bytes + n > CAPTURE_BYTES:
            self.dropped += 1
            return
        self.queue.append(snapshot(direction, frame))
        self.queued_bytes += n
        self.taken += 1
        self.wake.set()


class ControlServer:
    def __init__(self, server, path: str, *, complete_csum: bool = True, link=None):
        self.server = server
        self.link = link    # vhostnet.link.LinkSettings, as given to make_server: faults, stack-side taps
        self.path = path
        self.complete_csum = complete_csum
        self.started = time.monotonic()
        self.clients = 0
        self.captures: list[_Capture] = []
        self.capture_frames = 0
        self.capture_dropped = 0
        self.rlog = RateLimitedLog(log)
        self.listener: socket.socket | None = None

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
                    if self.clients >= MAX_CLIENTS:
                        nursery.start_soon(self._refuse, stream)
                        continue
                    self.clients += 1
                    nursery.start_soon(self._client, stream)
        finally:
            lsock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _refuse(self, stream) -> None:
        with trio.move_on_after(1):
            await self._send(stream, {"ok": False, "error": f"too many control clients (at most {MAX_CLIENTS})"})
        await stream.aclose()

    async def _send(self, stream, obj) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(data)

    async def _client(self, stream) -> None:
        buf = bytearray()
        try:
            async with stream:
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) > MAX_REQUEST:
                            await self._send(stream, {"ok": False, "error":
                                             f"request longer than {MAX_REQUEST} bytes; closing"})
                            return
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        buf += chunk
                        continue
                    line = bytes(buf[:nl])
                    del buf[:nl + 1]
                    if len(line) > MAX_REQUEST:
                        await self._send(stream, {"ok": False, "error":
                                         f"request longer than {MAX_REQUEST} bytes; closing"})
                        return
                    if not line.strip():
                        continue
                    try:
                        req = self._parse(line)
                        if req["cmd"] == "capture":
                            await self._capture(stream, req)
                            return
                        reply = {"ok": True, "result": self._answer(req)}
                    except (_BadRequest, report.ReportError) as e:
                        self.rlog.info("bad_request", "control client: %s", e)
                        reply = {"ok": False, "error": str(e)}
                    await self._send(stream, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass
        finally:
            self.clients -= 1

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
        raise _BadRequest(f"unknown command {cmd!r}; known: ping, inspect, desc, stats, check, fault, capture")

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
        cap = _Capture(count)
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
                    snap = cap.queue.popleft()
                    cap.queued_bytes -= len(snap.data)
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
    """Blocking client for the CLI: one connection, request/reply or a stream."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
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
        except OSError as e:
            raise ControlError(f"lost the backend at {self.path}: {e}") from None

    def read(self) -> dict | None:
        try:
            line = self.file.readline()
        except socket.timeout:
            raise ControlError(f"the backend at {self.path} did not answer in time") from None
        except OSError as e:
            raise ControlError(f"lost the backend at {self.path}: {e}") from None
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
        self.send({"cmd": cmd, **kw})
        reply = self.read()
        if reply is None:
            raise ControlError(f"the backend at {self.path} closed the connection")
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
