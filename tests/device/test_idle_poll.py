"""serve --idle-poll-us: the kick waiter's look before it sleeps (vhostnet/vhostuser/idle_poll.py).

Real eventfds. The look is synchronous, so every kick here is written
before the look that must find it: no thread, no timing to hope for.
"""
from __future__ import annotations

import os
import time

import pytest

from vhostnet.launch.cli import build_parser
from vhostnet.vhostuser import idle_poll as I
from vhostnet.vhostuser.idle_poll import IdlePoll

from .conftest import served
from .test_datapath import ping

WINDOW = 1e-3


@pytest.fixture
def efd():
    fds = []

    def make() -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        fds.append(fd)
        return fd
    yield make
    for fd in fds:
        os.close(fd)


def kick(fd: int) -> None:
    os.eventfd_write(fd, 1)


def test_a_kick_already_there_is_a_hit_and_left_for_the_caller_to_read(efd):
    fd = efd()
    p = IdlePoll(fd, WINDOW)
    kick(fd)
    assert p.look()
    assert (p.hits, p.misses) == (1, 0)
    assert os.eventfd_read(fd) == 1      # the look only watched: the counter is the caller's


def test_a_miss_turns_looking_off_until_a_short_sleep(efd):
    fd = efd()
    p = IdlePoll(fd, WINDOW)
    assert not p.look()
    assert (p.hits, p.misses, p.armed) == (0, 1, False)
    kick(fd)
    assert not p.look()                  # off: a kick now waits for trio's wait
    assert p.misses == 1
    os.eventfd_read(fd)
    p.slept(10 * WINDOW)                 # a slow guest: stays off, no back-off
    assert (p.armed, p.backoffs) == (False, 0)
    p.slept(WINDOW / 2)                  # a quick one, after a sleep with no look before it
    assert p.armed
    kick(fd)
    assert p.look()


def test_a_miss_then_a_quick_kick_backs_off(efd):
    """The look missed and the kick came right after it: the look was in the
    guest's way (one free core). No look for BACKOFF, however quick the guest."""
    fd = efd()
    p = IdlePoll(fd, WINDOW)
    assert not p.look()
    p.slept(WINDOW / 10)
    assert (p.armed, p.backoffs) == (False, 1)
    p.slept(WINDOW / 10)                 # still within BACKOFF
    assert not p.armed
    kick(fd)
    assert not p.look()
    assert p.hits == 0


def test_back_off_ends(efd, monkeypatch):
    fd = efd()
    monkeypatch.setattr(I, "BACKOFF", 0.0)
    p = IdlePoll(fd, WINDOW)
    assert not p.look()
    p.slept(WINDOW / 10)
    assert p.backoffs == 1
    p.slept(WINDOW / 10)                 # no miss before this sleep, BACKOFF over
    assert p.armed


def test_a_ready_watched_fd_ends_the_look_without_turning_it_off(efd):
    fd, other = efd(), efd()
    p = IdlePoll(fd, WINDOW, lambda: (other,))
    kick(other)
    assert not p.look()
    assert (p.yielded, p.misses, p.armed) == (1, 0, True)
    kick(fd)                             # both ready: the kick is taken
    assert p.look()


def test_the_watched_fds_may_change(efd):
    fd, a, b = efd(), efd(), efd()
    watched = [(a,)]
    p = IdlePoll(fd, WINDOW, lambda: watched[0])
    kick(b)
    assert not p.look() and p.misses == 1 and p.yielded == 0     # b not watched yet
    watched[0] = (a, b)
    p.slept(10 * WINDOW)
    p.armed = True
    assert not p.look() and p.yielded == 1
    p.close()


def test_a_checkpoint_every_checkpoint_hits(efd):
    fd = efd()
    p = IdlePoll(fd, 1.0)
    due = []
    for _ in range(2 * I.CHECKPOINT_HITS):
        kick(fd)
        assert p.look()
        os.eventfd_read(fd)
        due.append(p.must_checkpoint())
    want = [False] * (I.CHECKPOINT_HITS - 1) + [True]
    # CHECKPOINT_INTERVAL may also come due on a slow machine, never later than the count.
    assert due[I.CHECKPOINT_HITS - 1] and due[-1]
    assert all(d or not w for d, w in zip(due, want * 2))


def test_window_zero_never_looks(efd):
    fd = efd()
    p = IdlePoll(fd, 0.0)
    kick(fd)
    assert not p.look()
    p.slept(0.0)
    assert not p.armed and p.describe()["hits"] == 0


@pytest.mark.parametrize("text, ok", [("0", True), ("300", True), ("1000", True),
                                      ("1001", False), ("-1", False), ("2.5", False)])
def test_the_option_is_bounded(text, ok, capsys):
    p = build_parser()
    if ok:
        assert p.parse_args(["serve", "--idle-poll-us", text]).idle_poll_us == int(text)
    else:
        with pytest.raises(SystemExit):
            p.parse_args(["serve", "--idle-poll-us", text])
        assert "--idle-poll-us" in capsys.readouterr().err


async def test_in_one_thread_with_the_driver_the_look_backs_off(tmp_path, nursery):
    """The in-process frontend runs in the backend's own thread, so no kick
    can come while the backend looks: the worst case, a look always in the
    way. It must back off (one window lost per BACKOFF, not per ping), and
    every ping is still answered."""
    async with served(tmp_path, nursery, idle_poll=WINDOW) as (srv, fe):
        done = await fe.flood(ping(), time.perf_counter() + 0.3, window=1)
        assert done > 0
        doc = srv.current.describe_loop()["idle_poll"]["tx"]
    assert doc["hits"] == 0
    assert doc["backoffs"] >= 1
    # A miss after a slow gap turns looking off without a back-off, so a
    # back-off can cost two misses; a look per ping would be hundreds.
    assert doc["misses"] <= 2 * (doc["backoffs"] + 1)
    assert done >= 10 * doc["misses"]


async def test_no_idle_poll_no_stats(tmp_path, nursery):
    async with served(tmp_path, nursery) as (srv, fe):
        assert await fe.flood(ping(), time.perf_counter() + 0.05, window=1) > 0
        assert "idle_poll" not in srv.current.describe_loop()
