"""The kick hook (vhostnet/vhostuser/kick_hook.py): kicks handled where trio would sleep.

Real eventfds and socketpairs. A clock fixture makes pytest-trio run the
test under KickClock (pytest-trio takes a Clock a fixture returns). Writers
in other threads are waited for on trio Events the handlers set, never on
a sleep.
"""
from __future__ import annotations

import math
import os
import socket
import threading
import time

import pytest
import trio

from vhostnet.vhostuser import kick_hook as K
from vhostnet.vhostuser.kick_hook import KickClock

from .conftest import served
from .test_datapath import ping


@pytest.fixture
def kick_clock():
    return KickClock()


@pytest.fixture
def efd():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    yield fd
    os.close(fd)


def later(fn) -> threading.Thread:
    """FN in another thread, so that it lands while trio sleeps (or just before)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


async def test_a_kick_runs_its_handler_from_the_hook(kick_clock, efd):
    got = trio.Event()

    def handler():
        assert os.eventfd_read(efd) == 1
        got.set()
    assert kick_clock.watch(efd, handler, pytest.fail) is not None
    later(lambda: os.eventfd_write(efd, 1)).join()
    with trio.fail_after(10):
        await got.wait()      # no task waits on EFD: only the hook can have read it
    assert kick_clock.runs == 1 and kick_clock.errors == 0
    assert K.current_kick_clock() is kick_clock
    assert kick_clock.describe() == {"available": True, "watching": 1, "runs": 1,
                                     "waits": kick_clock.waits, "calls": kick_clock.calls,
                                     "timers": 0, "timer_runs": 0, "errors": 0}
    assert kick_clock.calls >= 1        # the pass that slept until the kick asked the hook


async def test_other_io_ends_the_hooks_wait(kick_clock, efd):
    """While the hook waits on a kick fd that stays quiet, a socket a task
    waits on through trio becomes readable: the task runs."""
    kick_clock.watch(efd, pytest.fail, pytest.fail)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        later(lambda: b.send(b"x"))
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(a)
        assert a.recv(1) == b"x"
    assert kick_clock.waits >= 1


async def test_a_deadline_ends_the_hooks_wait(kick_clock, efd):
    kick_clock.watch(efd, pytest.fail, pytest.fail)
    t0 = time.perf_counter()
    with trio.fail_after(10):
        await trio.sleep(0.02)
    assert time.perf_counter() - t0 >= 0.02
    assert kick_clock.waits >= 1


async def test_a_handler_that_wakes_a_task_ends_the_wait(kick_clock, efd):
    """The handler sets an Event: the task it wakes runs before the hook
    waits again (the count of waits has not moved), kick after kick."""
    woke = trio.Event()
    waits_at_handler = []

    def handler():
        os.eventfd_read(efd)
        waits_at_handler.append(kick_clock.waits)
        woke.set()
    kick_clock.watch(efd, handler, pytest.fail)
    for n in (1, 2, 3):
        woke = trio.Event()
        later(lambda: os.eventfd_write(efd, 1))
        with trio.fail_after(10):
            await woke.wait()
        assert len(waits_at_handler) == n
        assert kick_clock.waits == waits_at_handler[-1]


async def test_kicks_without_pause_give_trio_its_pass_after_max_runs(kick_clock, efd):
    """A kick fd that stays readable (a guest kicking without pause): one call
    of the hook runs MAX_RUNS handlers and returns, rather than for ever
    (the handler unwatches itself far past the bound, so a broken bound
    fails here instead of hanging)."""
    runs = []

    def handler():
        runs.append(1)
        if len(runs) > 10 * K.MAX_RUNS:
            kick_clock.unwatch(efd)
    kick_clock.watch(efd, handler, pytest.fail)
    os.eventfd_write(efd, 1)          # never read: readable at every look
    assert kick_clock.deadline_to_sleep_time(math.inf) == 0.0
    assert len(runs) == K.MAX_RUNS
    kick_clock.unwatch(efd)


async def test_a_handler_that_raises_is_unwatched_and_reported(kick_clock, efd):
    reported = []
    done = trio.Event()

    def handler():
        os.eventfd_read(efd)
        raise RuntimeError("a bug")

    def on_error(e):
        reported.append(e)
        done.set()
    kick_clock.watch(efd, handler, on_error)
    later(lambda: os.eventfd_write(efd, 1))
    with trio.fail_after(10):
        await done.wait()
    assert [str(e) for e in reported] == ["a bug"]
    assert kick_clock.errors == 1 and not kick_clock.watching(efd)
    # trio's run goes on, and the fd can still be waited on the ordinary way.
    os.eventfd_write(efd, 1)
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(efd)
    assert os.eventfd_read(efd) == 1


async def test_a_stale_token_does_not_unwatch_the_fds_next_owner(kick_clock, efd):
    old = kick_clock.watch(efd, pytest.fail, pytest.fail)
    new = kick_clock.watch(efd, lambda: None, pytest.fail)
    kick_clock.unwatch(efd, old)
    assert kick_clock.watching(efd)
    kick_clock.unwatch(efd, new)
    assert not kick_clock.watching(efd)


async def test_a_timer_runs_from_the_hook_while_trio_sleeps_on(kick_clock):
    """at(): FN runs once its time has passed, again at the time it returns,
    never after it returns None; trio's own sleep is not cut short by it."""
    seen = []

    def fn(now):
        seen.append(now)
        return now + 0.002 if len(seen) < 5 else None
    t0 = trio.current_time()
    assert kick_clock.at(t0 + 0.002, fn, pytest.fail) is not None
    calls0 = kick_clock.calls
    with trio.fail_after(10):
        await trio.sleep(0.1)               # the test's own deadline: one pass to wake it
    assert len(seen) == 5 and seen[0] >= t0 + 0.002
    assert all(b - a >= 0.002 for a, b in zip(seen, seen[1:]))
    assert kick_clock.timer_runs == 5 and kick_clock.describe()["timers"] == 0
    assert kick_clock.calls - calls0 <= 2   # five timer runs, no scheduler pass for any


async def test_a_timer_that_raises_is_dropped_and_reported_and_cancel_stops_one(kick_clock):
    reported, ran = [], []

    def bad(now):
        raise RuntimeError("a bug")
    kick_clock.at(trio.current_time(), bad, reported.append)
    gone = kick_clock.at(trio.current_time() + 0.001, ran.append, pytest.fail)
    kick_clock.cancel(gone)
    kick_clock.cancel(gone)                 # twice: no error
    with trio.fail_after(10):
        await trio.sleep(0.02)
    assert [str(e) for e in reported] == ["a bug"] and kick_clock.errors == 1
    assert ran == [] and kick_clock.describe()["timers"] == 0


async def test_a_timer_that_makes_a_task_runnable_ends_the_wait(kick_clock):
    ev = trio.Event()
    kick_clock.at(trio.current_time() + 0.005, lambda now: ev.set(), pytest.fail)
    waits0 = kick_clock.waits
    with trio.fail_after(10):
        await ev.wait()                     # trio's only deadline is 10 s away: the timer ends this
    assert kick_clock.timer_runs == 1
    assert kick_clock.waits - waits0 == 1   # the wait for the timer; none after it set the event


async def test_off_or_without_trios_internals_nothing_is_watched(efd, monkeypatch):
    off = KickClock(enabled=False)
    assert off.watch(efd, pytest.fail, pytest.fail) is None
    assert off.at(0.0, pytest.fail, pytest.fail) is None
    monkeypatch.setattr(K, "_runner", lambda: None)
    c = KickClock()
    assert c.watch(efd, pytest.fail, pytest.fail) is None
    assert c.describe()["available"] is False


def kick_in_the_hook(clock: KickClock, kick) -> threading.Thread:
    """KICK from another thread once the hook is in its wait (its count of
    waits moved: nothing else runs in trio's thread until the wait ends)."""
    w0 = clock.waits

    def run():
        while clock.waits == w0:
            time.sleep(1e-4)
        kick()
    return later(run)


# -- the server with the hook: the in-process frontend kicks from this thread,
# so every kick is there when the hook next waits.

async def test_pings_are_answered_from_the_hook(kick_clock, tmp_path, nursery):
    async with served(tmp_path, nursery) as (srv, fe):
        done = await fe.flood(ping(), time.perf_counter() + 0.3, window=1)
        doc = srv.current.describe_loop()["kick_hook"]
    assert done > 10
    assert doc["available"] and doc["watching"] >= 2
    # Most kicks come through the hook; the rest through trio's wait (when a
    # task was runnable as the kick landed). Both are the device's kicks.
    assert doc["runs"] >= done // 2
    assert doc["errors"] == 0


async def test_a_step_that_leaves_work_hands_the_rest_to_a_task(kick_clock, tmp_path, nursery):
    """More bytes than one step takes (TX_STEP_BYTES), posted with one kick:
    the hook's step takes the first part, a task the rest; every frame answered."""
    from vhostnet.net.device import TX_STEP_BYTES
    payload = b"y" * 1400
    n = 2 * TX_STEP_BYTES // len(payload) + 10
    async with served(tmp_path, nursery) as (srv, fe):
        fe.post_rx(n + 8)
        ring_kick = fe.tx.kick
        fe.tx.kick = lambda: kick_in_the_hook(kick_clock, ring_kick)
        got = await fe.exchange([ping(payload, seq=i) for i in range(n)], want=n)
        tx = srv.current.backend.queues[1]
        kicks, steps = tx.stats["kicks"], srv.current.describe_loop()["steps"]
    assert len(got) == n
    assert kicks == 1 and kick_clock.runs >= 1      # one kick, taken by the hook ...
    assert steps >= 3                                # ... and more than one step on it


async def test_no_kick_hook_is_the_plain_wait(tmp_path, nursery):
    """Under trio's own clock (pytest-trio's default here) no hook: no stats for it."""
    async with served(tmp_path, nursery) as (srv, fe):
        assert await fe.flood(ping(), time.perf_counter() + 0.05, window=1) > 0
        assert "kick_hook" not in srv.current.describe_loop()


def test_the_option_turns_the_hook_off():
    from vhostnet.launch.cli import build_parser
    assert build_parser().parse_args(["serve", "--no-kick-hook"]).no_kick_hook
    assert not build_parser().parse_args(["serve"]).no_kick_hook
