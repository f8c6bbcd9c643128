"""The kick hook: a kick handled where trio would sleep, without a scheduler pass.

Why (issue 12's latency work): a trio task woken by an eventfd runs a whole
scheduler pass first (epoll_wait, process_events, reschedule, the coroutine
send down to the kick loop, an epoll_ctl to re-arm the fd as EPOLLONESHOT)
and, after an idle spell, every one of those lines is out of the CPU caches.
Measured on this 2-core TCG machine with an eventfd echo: a trio task
answers a kick after 0.2 s idle in 119 µs (median), the hook in 55 µs; back
to back 16 µs against 10-13 µs (docs/benchmarks.md, "The kick hook").

How: trio asks its clock `deadline_to_sleep_time(deadline)` once per pass,
only when no task is runnable, right before it blocks in epoll_wait.
KickClock blocks there itself, in an epoll of its own that holds the kick
eventfds being watched and trio's own epoll fd (readable when any fd a task
waits on is ready: sockets, trio's wakeup socket for signals, other threads
and Ctrl-C). A kick runs its handler right there: the same sync code the
kick task runs after its wait (read the eventfd, drain the ring). Anything
else ready, a deadline due, or a handler that made a task runnable ends the
wait, and trio's pass goes on with sleep time 0.

Timers (`at`): a sync function the hook runs once trio's clock passes its
time, inside the same wait, with no scheduler pass; it returns when to run
next. The safety poll's looks every 5 ms run so (safety_poll.py): as trio
tasks each was a pass, and a kick that landed during one took trio's path.
A timer runs only while trio sleeps, so its owner keeps a trio deadline of
its own for when trio is busy.

Nothing depends on the hook being called: each kick task still waits on
its fd through trio as before. While trio is busy (tasks runnable, so the
hook is not called) kicks take that path; when the hook has read a kick,
the eventfd is no longer readable and trio's level-triggered epoll drops
the stale readiness without waking the task (epoll(7)).

Bounds: a handler is sync and does one drain step (its ring's budget); a
step that leaves more work hands it back to a task (the handler's own
choice), so the hook never loops on one ring; a timer never runs again
sooner than MIN_TIMER after it ran; after MAX_RUNS handlers in
one call trio gets its pass whatever comes. A handler that raises is
unwatched, counted and reported to its owner; it can never end trio's run.

Private trio API: the runner's epoll, run queue and deadlines
(trio/_core/_run.py, _io_epoll.py). They are looked up when the hook first
runs; without them (another trio release, another I/O backend) it stays off,
kicks take trio's path, and `available` says so.
"""
from __future__ import annotations

import math
import select
import time
from typing import Callable

import trio

__all__ = ["KickClock", "current_kick_clock", "run"]

#: The longest one wait in the hook, in seconds: past it the pass goes on and
#: trio asks again (a bound on a deadline the hook could not see move).
MAX_WAIT = 1.0
#: Handlers run in one call of the hook before trio gets its pass anyway: a
#: guest that kicks without pause cannot keep trio's scheduler from running.
MAX_RUNS = 64
#: The soonest an at() timer runs again after it ran, in seconds.
MIN_TIMER = 1e-4


def _runner():
    """trio's runner internals the hook needs, or None if this trio has others."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT
        r = GLOBAL_RUN_CONTEXT.runner
        ep = r.io_manager._epoll
        r.runq.__len__
        r.deadlines.next_deadline
        return r, ep.fileno()
    except (ImportError, AttributeError):
        return None


class KickClock(trio.abc.Clock):
    """trio's system clock (perf_counter plus an offset, as trio.run's own),
    with the kick hook in deadline_to_sleep_time."""

    def __init__(self, enabled: bool = True):
        # trio's SystemClock starts at a large random offset, so code that
        # treats the clock as wall time fails early; keep the same habit.
        self._offset = 10000.0 + time.perf_counter() % 1000.0
        self.enabled = enabled
        self._handlers: dict[int, tuple[Callable[[], None], Callable[[BaseException], None]]] = {}
        self._timers: list[list] = []           # [when, fn, on_error] (at())
        self._ep: select.epoll | None = None
        self._trio_ready: select.epoll | None = None
        self._runner = None
        self._trio_fd = -1
        self.available: bool | None = None    # None: not looked up yet
        self.runs = 0                         # handlers run from the hook (kicks, reactor passes)
        self.waits = 0                        # times the hook slept in its epoll
        self.calls = 0                        # trio passes that reached the hook (about to sleep)
        self.timer_runs = 0                   # at() timers run from the hook (safety-poll looks)
        self.errors = 0

    # -- trio.abc.Clock ------------------------------------------------------

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return time.perf_counter() + self._offset

    def deadline_to_sleep_time(self, deadline: float) -> float:
        self.calls += 1
        now = self.current_time()
        timeout = deadline - now
        if timeout <= 0 or not (self._handlers or self._timers) or not self._setup():
            return max(timeout, 0.0)
        runner, ep, trio_fd = self._runner, self._ep, self._trio_fd
        handlers, timers = self._handlers, self._timers
        runs = 0
        while True:
            soonest = math.inf
            if timers:
                soonest = self._run_timers(now)
                if runner.runq:
                    return 0.0
                timeout = min(runner.deadlines.next_deadline(), soonest) - now
                if timeout <= 0:
                    return 0.0
            self.waits += 1
            events = ep.poll(min(timeout, MAX_WAIT))
            now = self.current_time()
            if not events:
                # A timer of ours came due: run it at the loop's top, trio
                # sleeps on. Anything else (trio's deadline, MAX_WAIT): its pass.
                if soonest <= now < runner.deadlines.next_deadline():
                    continue
                return 0.0
            other = False
            for fd, _ev in events:
                if fd == trio_fd:
                    other = True
                    continue
                h = handlers.get(fd)
                if h is None:
                    continue
                self.runs += 1
                runs += 1
                try:
                    h[0]()
                except Exception as e:      # never into trio's scheduler
                    self.errors += 1
                    self.unwatch(fd, h)
                    try:
                        h[1](e)
                    except Exception:
                        pass
            if runner.runq or runs >= MAX_RUNS:
                return 0.0
            # trio's epoll fd was readable: for our own kick fds (armed there
            # by their tasks; read now, so level-triggered epoll drops them)
            # or for something else. Only something else ends the wait.
            if other and self._trio_ready.poll(0):
                return 0.0
            now = self.current_time()
            timeout = runner.deadlines.next_deadline() - now
            if timeout <= 0:
                return 0.0
            if not handlers and not timers:
                return timeout

    def _run_timers(self, now: float) -> float:
        """Run the timers due by NOW; the soonest time left (inf if none)."""
        timers = self._timers
        soonest = min(t[0] for t in timers) if timers else math.inf
        if soonest > now:
            return soonest      # the common case (a kick between looks): nothing copied
        soonest = math.inf
        for t in tuple(timers):     # a timer may cancel or add timers
            if t[0] > now:
                soonest = min(soonest, t[0])
                continue
            self.timer_runs += 1
            try:
                nxt = t[1](now)
            except Exception as e:          # never into trio's scheduler
                self.errors += 1
                nxt = None
                try:
                    t[2](e)
                except Exception:
                    pass
            if nxt is None:
                self.cancel(t)
            else:
                # Never due again at once: a timer cannot keep the hook looping.
                t[0] = max(nxt, now + MIN_TIMER)
                soonest = min(soonest, t[0])
        return soonest

    # -- for the kick tasks --------------------------------------------------

    def watch(self, fd: int, handler: Callable[[], None],
              on_error: Callable[[BaseException], None]):
        """Run HANDLER from the hook when FD is readable. Returns a token for
        unwatch, or None if the hook is off."""
        if not self.enabled or not self._setup():
            return None
        self.unwatch(fd)
        self._ep.register(fd, select.EPOLLIN)
        token = self._handlers[fd] = (handler, on_error)
        return token

    def unwatch(self, fd: int, token=None) -> None:
        """Before FD is closed: a later fd may get the same number. With TOKEN,
        only if FD is still watched by that watch() (a task that ends late
        must not unwatch the fd number's next owner)."""
        h = self._handlers.get(fd)
        if h is None or (token is not None and h is not token):
            return
        del self._handlers[fd]
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass        # closed already: epoll dropped it with its last reference

    def at(self, when: float, fn: Callable[[float], float | None],
           on_error: Callable[[BaseException], None]):
        """Run FN(now) from the hook once trio's clock passes WHEN, without
        a scheduler pass; FN returns when to run next, or None for never.
        Only while trio sleeps: a task that needs it on time keeps a trio
        deadline of its own as well. Returns a token for cancel(), or None
        if the hook is off."""
        if not self.enabled or not self._setup():
            return None
        token = [when, fn, on_error]
        self._timers.append(token)
        return token

    def cancel(self, token) -> None:
        try:
            self._timers.remove(token)
        except ValueError:
            pass        # ran its last already

    def watching(self, fd: int) -> bool:
        return fd in self._handlers

    def describe(self) -> dict:
        return {"available": bool(self.available) and self.enabled, "watching": len(self._handlers),
                "runs": self.runs, "waits": self.waits, "calls": self.calls,
                "timers": len(self._timers), "timer_runs": self.timer_runs, "errors": self.errors}

    def _setup(self) -> bool:
        if self.available is None:
            found = _runner()
            self.available = found is not None
            if found is not None:
                self._runner, self._trio_fd = found
                self._ep = select.epoll()
                self._ep.register(self._trio_fd, select.EPOLLIN)
                self._trio_ready = select.epoll()
                self._trio_ready.register(self._trio_fd, select.EPOLLIN)
        return self.available


def current_kick_clock() -> KickClock | None:
    """The running trio's KickClock, if it runs with one (vhostnet's serve and run do)."""
    c = trio.lowlevel.current_clock()
    return c if isinstance(c, KickClock) else None


def run(async_fn, *args, kick_hook: bool = True):
    """trio.run with a KickClock (the hook on unless KICK_HOOK is False)."""
    return trio.run(async_fn, *args, clock=KickClock(enabled=kick_hook))
