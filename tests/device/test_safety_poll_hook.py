"""The safety poll's looks run by the kick hook (safety_poll.py, kick_hook.py).

The server runs under KickClock here (the fixture makes pytest-trio use
it), as `vhostnet serve` does: the looks every INTERVAL run where trio
would sleep, so they must still find what a driver made available without
a kick, cost no scheduler pass each, and still happen while trio never
sleeps.
"""
from __future__ import annotations

import pytest
import trio
from scapy.layers.inet import ICMP
from scapy.layers.l2 import Ether

from vhostnet.vhostuser.kick_hook import KickClock

from .test_checker import RX, TX, named, still_works
from .test_datapath import ping


@pytest.fixture
def kick_clock():
    return KickClock()


def polls(server):
    return server.current._polls


async def test_a_look_from_the_hook_finds_a_missed_kick(kick_clock, ready, server):
    await still_works(ready, seq=1)
    assert all(p.hook is kick_clock for p in polls(server).values())
    q = server.current.backend.queues[TX]
    ready.post_tx(ping(seq=2))                      # notifications enabled, and no kick
    with trio.fail_after(5):
        while not (got := ready.read_rx()):
            await ready.rx.wait_call(0.05)
    assert Ether(got[0][1])[ICMP].seq == 2
    f = await named(server, TX, "kick_missed", "2.7.10.1", "MUST")
    assert f["example"]["entries"] == 1
    assert q.stats["unkicked"] == 1
    assert kick_clock.timer_runs > 0 and kick_clock.errors == 0


async def test_looks_from_the_hook_take_no_scheduler_pass_each(kick_clock, ready, server):
    """With the looks in a task, each is a trio pass that reaches the hook
    (calls); from the hook, trio sleeps through them."""
    await still_works(ready)
    assert all(p.looking for p in polls(server).values())
    runs0, calls0 = kick_clock.timer_runs, kick_clock.calls
    with trio.fail_after(5):
        while kick_clock.timer_runs < runs0 + 20:
            await trio.sleep(0.05)
    looks, passes = kick_clock.timer_runs - runs0, kick_clock.calls - calls0
    assert passes < looks / 2, (looks, passes)


async def test_while_trio_never_sleeps_the_task_looks_itself(kick_clock, ready, server):
    """A task always runnable: the hook is never asked, so no look runs
    there; after FALLBACK (safety_poll.py) the poll's own task looks and
    finds the entry."""
    await still_works(ready, seq=1)
    q = server.current.backend.queues[TX]
    runs0 = kick_clock.timer_runs
    ready.post_tx(ping(seq=2))
    with trio.fail_after(5):
        while q.stats["unkicked"] < 1:
            await trio.lowlevel.checkpoint()        # runnable at every pass: trio never sleeps
    assert kick_clock.timer_runs == runs0           # no look came from the hook
    with trio.fail_after(5):
        while not (got := ready.read_rx()):
            await ready.rx.wait_call(0.05)
    assert Ether(got[0][1])[ICMP].seq == 2


async def test_the_looks_stop_when_quiet_and_a_kick_resumes_them(kick_clock, ready, server):
    await still_works(ready)
    poll = polls(server)[RX]
    with trio.fail_after(5):
        while any(p.looking for p in polls(server).values()):   # QUIET_AFTER of nothing: parked
            await trio.sleep(0.05)
    assert kick_clock.describe()["timers"] == 0    # no look left behind in the hook
    await still_works(ready, seq=7)                # the kick wakes every poll of the connection
    with trio.fail_after(5):
        while not poll.looking:
            await trio.sleep(0.01)
    with trio.fail_after(5):
        while kick_clock.describe()["timers"] == 0:
            await trio.sleep(0.01)                  # and its looks are the hook's again


async def test_a_look_that_raises_in_the_hook_stops_that_poll_alone(kick_clock, ready, server):
    """A bug in a look run by the hook reaches the poll's task and the
    server's usual handling: counted once, that ring's poll stops, the
    traffic and trio's run go on."""
    await still_works(ready, seq=1)
    poll = polls(server)[TX]

    def broken(now):
        raise RuntimeError("look bug")
    poll.look = broken
    with trio.fail_after(5):
        while not poll.failed:
            await trio.sleep(0.01)
    assert server.current.backend.errors["safety_poll_error"] == 1
    assert kick_clock.errors == 1
    for seq in (2, 3):
        await still_works(ready, seq=seq)
