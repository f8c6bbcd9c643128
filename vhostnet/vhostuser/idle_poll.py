"""Look at a kick eventfd for a short while before sleeping on it.

Issue 12's latency rows: a request/response guest kicks again tens to
hundreds of microseconds after the backend answered. Sleeping in epoll in
between costs a wake-up per operation on this side (trio's run loop and its
epoll_wait, the scheduler, on a virtual machine the idle vCPU's halt and
IPI) that polling the eventfd in a loop does not.

Bounded and adaptive, so that an idle or a streaming guest costs nothing:
- a look lasts at most `window` seconds;
- it happens only while the gaps are short: a look that misses turns
  looking off, and it comes back on only when a kick arrives within the
  window of the previous step's end (measured on the sleeping path), so a
  guest that kicks every few milliseconds, or not at all, never makes the
  backend spin;
- a look that missed and then a kick soon after the sleep began is what a
  look that keeps the guest's vCPU (or QEMU) off the only free core looks
  like: the kick could not come while we looked. Then looking stops for
  BACKOFF (counted as `backoffs`), so a busy host pays one window per
  BACKOFF, not one per operation;
- other work comes first: the look also watches the fds the device names
  (the host sockets' reactor), and gives up the moment one is ready, so
  that trio's task for it runs; a kick caught by a look skips trio's
  scheduler, but at most CHECKPOINT_HITS in a row and CHECKPOINT_INTERVAL
  apart, so that the other tasks (vhost-user messages, timers) still run.
"""
from __future__ import annotations

import select
import time
from typing import Callable

__all__ = ["IdlePoll", "DEFAULT_IDLE_POLL", "MAX_IDLE_POLL"]

#: How long a kick waiter polls its eventfd before it sleeps (seconds).
DEFAULT_IDLE_POLL = 0.0
#: The longest window `serve --idle-poll-us` accepts: far under a slow step (server.SLOW_STEP).
MAX_IDLE_POLL = 1e-3
#: Kicks taken by looks in a row before the waiter lets trio's other tasks run.
CHECKPOINT_HITS = 8
#: ... or this long (seconds) since it last did.
CHECKPOINT_INTERVAL = 1e-3
#: After a look that missed a kick that came right after it: no look for this long (seconds).
BACKOFF = 1.0


class IdlePoll:
    """One kick fd's look-before-sleep.

    `look()`: True if the kick fd became readable within the window (the
    caller reads it); False: sleep in trio, then call `slept(gap)` with how
    long that took. `must_checkpoint()` after a True: the caller should let
    trio run its other tasks first."""

    def __init__(self, fd: int, window: float, watch: Callable[[], tuple] = tuple):
        self.fd = fd
        self.window = window
        self.armed = window > 0
        self.watch = watch
        self.hits = 0
        self.misses = 0
        self.yielded = 0
        self.backoffs = 0
        self._missed = False            # the last look missed (slept() judges what came next)
        self._resume = 0.0              # no look before this time (BACKOFF)
        self._ep: select.epoll | None = None
        self._watched: tuple = ()
        self._in_row = 0
        self._checkpointed = time.perf_counter()

    def look(self) -> bool:
        if not self.armed:
            return False
        ep = self._epoll()
        poll, clock, fd = ep.poll, time.perf_counter, self.fd
        end = clock() + self.window
        while True:
            ready = poll(0)
            if ready:
                if any(f == fd for f, _ in ready):
                    self.hits += 1
                    self._in_row += 1
                    return True
                self.yielded += 1      # a host socket is ready: its task first
                return False
            if clock() >= end:
                break
        self.misses += 1
        self.armed = False
        self._missed = True
        return False

    def must_checkpoint(self) -> bool:
        now = time.perf_counter()
        if self._in_row >= CHECKPOINT_HITS or now - self._checkpointed >= CHECKPOINT_INTERVAL:
            self._in_row = 0
            self._checkpointed = now
            return True
        return False

    def slept(self, gap: float) -> None:
        """The waiter slept GAP seconds after its step: look next time if a
        look would have caught it, unless a look just failed to (BACKOFF)."""
        now = time.perf_counter()
        short = 0 < self.window and gap <= self.window
        if short and self._missed:
            self.backoffs += 1
            self._resume = now + BACKOFF
        self.armed = short and now >= self._resume
        self._missed = False
        self._in_row = 0
        self._checkpointed = now

    def _epoll(self) -> select.epoll:
        fds = self.watch()
        if self._ep is None or fds != self._watched:
            if self._ep is not None:
                self._ep.close()
            self._ep = select.epoll()
            self._ep.register(self.fd, select.EPOLLIN)
            for f in fds:
                self._ep.register(f, select.EPOLLIN)
            self._watched = fds
        return self._ep

    def close(self) -> None:
        if self._ep is not None:
            self._ep.close()
            self._ep = None

    def describe(self) -> dict:
        return {"window_us": round(self.window * 1e6), "hits": self.hits, "misses": self.misses,
                "yielded": self.yielded, "backoffs": self.backoffs}
