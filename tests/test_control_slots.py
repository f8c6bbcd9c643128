"""The control socket's client slots (issue 7, case 10): no kind of client can
hold a slot for ever, so idle, half-sent, non-reading or capturing clients
never lock the next client out, and their output never grows without bound.
All against the real ControlServer, with real Unix sockets."""
import json
import os
import socket
import time

import pytest
import trio

from vhostnet.observe import control
from vhostnet.observe.control import ControlClient, ControlError

from .device.test_datapath import ping
from .observe import ask, backend, guest, sockdir  # noqa: F401 (fixtures)


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _read_all(s: socket.socket) -> list:
    """Every line until EOF (in a thread: blocking)."""
    f = s.makefile("rb")
    out = [json.loads(line) for line in f]
    f.close()
    return out


async def _until(pred, timeout=5.0):
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


async def test_sixteen_idle_clients_do_not_lock_others_out(backend):
    """Case 10: on the old server the 17th client got "too many" for as long
    as the idle sixteen stayed connected."""
    _, ctl = backend
    idle = [_raw(ctl.path) for _ in range(control.MAX_CLIENTS)]
    try:
        await _until(lambda: ctl.clients == control.MAX_CLIENTS)
        assert (await ask(ctl.path, "ping"))["pid"] == os.getpid()
        # The longest-idle one made room: a last line saying why, then EOF.
        lines = await trio.to_thread.run_sync(_read_all, idle[0])
        assert len(lines) == 1 and lines[0]["closed"] == "idle" and lines[0]["ok"] is False
        # And so on, for as many newcomers as come: the slots stay bounded.
        for _ in range(40):
            idle.append(_raw(ctl.path))
            assert (await ask(ctl.path, "stats"))["connected"] is False
            assert ctl.clients <= control.MAX_CLIENTS
        assert ctl.evictions >= 40 and ctl.refused == 0
    finally:
        for s in idle:
            s.close()
    await _until(lambda: ctl.clients == 0)


async def test_evicted_client_reconnects_by_itself(backend):
    _, ctl = backend
    c = await trio.to_thread.run_sync(ControlClient, ctl.path)
    try:
        assert (await trio.to_thread.run_sync(c.request, "ping"))["connected"] is False
        others = [_raw(ctl.path) for _ in range(control.MAX_CLIENTS)]   # c is the longest idle
        await _until(lambda: ctl.evictions >= 1)
        assert (await trio.to_thread.run_sync(c.request, "ping"))["pid"] == os.getpid()
        assert c.reconnects == 1
        for s in others:
            s.close()
    finally:
        c.close()


async def test_when_no_slot_is_idle_a_client_is_refused(backend, monkeypatch):
    _, ctl = backend
    monkeypatch.setattr(control, "MAX_CLIENTS", 3)
    monkeypatch.setattr(control, "MAX_CAPTURES", 3)
    caps = []
    for _ in range(3):   # captures are busy (streaming), never idle
        c = await trio.to_thread.run_sync(ControlClient, ctl.path)
        c.send({"cmd": "capture"})
        assert (await trio.to_thread.run_sync(c.read))["ok"]
        caps.append(c)
    s = _raw(ctl.path)
    lines = await trio.to_thread.run_sync(_read_all, s)
    s.close()
    assert lines[0]["ok"] is False and "too many control clients" in lines[0]["error"]
    assert ctl.refused == 1
    for c in caps:
        c.close()
    await _until(lambda: ctl.clients == 0)
    assert (await ask(ctl.path, "ping"))["pid"] == os.getpid()


async def test_captures_are_limited_so_they_never_fill_every_slot(backend):
    _, ctl = backend
    caps = []
    try:
        for _ in range(control.MAX_CAPTURES):
            c = await trio.to_thread.run_sync(ControlClient, ctl.path)
            c.send({"cmd": "capture"})
            assert (await trio.to_thread.run_sync(c.read))["ok"]
            caps.append(c)
        with pytest.raises(ControlError, match="too many captures"):
            await ask(ctl.path, "capture")
        assert (await ask(ctl.path, "ping"))["pid"] == os.getpid()
    finally:
        for c in caps:
            c.close()
    await _until(lambda: not ctl.captures)


async def test_half_sent_request_times_out(backend, monkeypatch):
    """A byte now and then must not hold a slot: the line has REQUEST_TIMEOUT to end."""
    _, ctl = backend
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.6)
    s = _raw(ctl.path)
    s.sendall(b'{"cmd": "pi')

    def trickle_then_read():
        for _ in range(2):     # still bytes, but never the newline: no new deadline
            time.sleep(0.1)
            try:
                s.sendall(b" ")
            except OSError:
                break
        return _read_all(s)

    with trio.fail_after(5):
        lines = await trio.to_thread.run_sync(trickle_then_read)
    s.close()
    assert lines == [{"ok": False, "closed": "request",
                      "error": "closed: a request line unfinished after 0.6 s"}]
    assert ctl.timeouts == 1
    await _until(lambda: ctl.clients == 0)


async def test_idle_client_times_out_and_the_cli_client_carries_on(backend, monkeypatch):
    _, ctl = backend
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.2)
    c = await trio.to_thread.run_sync(ControlClient, ctl.path)
    try:
        assert (await trio.to_thread.run_sync(c.request, "ping"))["pid"] == os.getpid()
        await _until(lambda: ctl.timeouts == 1 and ctl.clients == 0)
        assert (await trio.to_thread.run_sync(c.request, "ping"))["pid"] == os.getpid()
        assert c.reconnects == 1
    finally:
        c.close()


async def test_captures_that_never_read_share_one_bounded_budget(backend, guest, monkeypatch):
    """Two capture clients that stop reading: frames are dropped and counted,
    the bytes queued for them never pass CAPTURE_BYTES_TOTAL, the guest is
    served throughout, and the stalled clients go after SEND_TIMEOUT."""
    srv, ctl = backend
    monkeypatch.setattr(control, "CAPTURE_BYTES_TOTAL", 64 << 10)
    monkeypatch.setattr(control, "SEND_TIMEOUT", 0.5)
    stalled = []
    for _ in range(2):
        s = _raw(ctl.path)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b'{"cmd": "capture"}\n')
        stalled.append(s)
    await _until(lambda: len(ctl.captures) == 2)
    peak = 0
    for i in range(40):   # ~1 MB of frames per client: past any socket buffer
        got = await guest.exchange([ping(payload=b"x" * 1200, seq=i * 10 + k) for k in range(10)], want=10)
        assert len(got) == 10
        peak = max(peak, ctl.capture_pool.used)
        assert ctl.capture_pool.used <= control.CAPTURE_BYTES_TOTAL
    assert peak > 0 and ctl.capture_stats()["dropped"] > 0
    # A client whose frames were all dropped (its sibling held the budget)
    # is not blocked: more traffic reaches it, fills it, and it goes too.
    with trio.fail_after(15):
        i = 0
        while ctl.captures:
            await guest.exchange([ping(payload=b"x" * 1200, seq=i % 65536)], want=1)
            assert ctl.capture_pool.used <= control.CAPTURE_BYTES_TOTAL
            i += 1
    assert ctl.capture_pool.used == 0
    assert ctl.capture_stats()["dropped"] > 0
    for s in stalled:
        s.close()
