"""Host sockets waited on without a trio task each: one epoll, one task.

A NATed TCP connection used to cost two trio tasks, a nursery, a cancel
scope and three Events, and every wait went through trio's epoll, which
registers and unregisters the fd around each wait (two epoll_ctl calls).
Issue 12's profile of a connect/echo/close race put that machinery at about
a third of the backend's CPU per connection. Here each socket is registered
once, edge-triggered (epoll(7): an event only when readiness changes, so the
owner keeps its own "ready" flags and reads or writes until EAGAIN), and a
single task waits on the epoll fd itself (trio polls it like any other fd)
and calls each socket's handler.

Fairness: one pass (run_pass: from this task, or from the kick hook where
trio would sleep) handles at most MAX_EVENTS sockets and then waits again,
a checkpoint, so host sockets cannot starve the vhost-user message loop;
handlers are bounded by their own budgets (tcp_relay: the guest's window).
"""
from __future__ import annotations

import logging
import select
from typing import Callable

import trio

from vhostnet.vhostuser.kick_hook import current_kick_clock

__all__ = ["Reactor", "EDGE", "MAX_EVENTS"]

log = logging.getLogger("vhostnet.hostnet")

#: Sockets served per pass before the task yields to the others.
MAX_EVENTS = 64
#: What a relay's socket is registered for (epoll(7)), once, for its life.
EDGE = (select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLERR
        | select.EPOLLHUP | select.EPOLLET)

Handler = Callable[[int], None]


class Reactor:
    """One epoll for a proxy's relays. on_error(exc) hears a handler's bug;
    the reactor carries on with the other sockets."""

    def __init__(self, on_error: Callable[[BaseException], None]):
        self._ep = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._on_error = on_error

    def __len__(self) -> int:
        return len(self._handlers)

    def fileno(self) -> int:
        """The epoll fd: readable while a registered socket has an event."""
        return self._ep.fileno()

    def add(self, fd: int, handler: Handler, events: int = EDGE) -> None:
        self._ep.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        """New events for a registered fd (EPOLL_CTL_MOD; with EPOLLET, an
        event already true is reported at once)."""
        self._ep.modify(fd, events)

    def remove(self, fd: int) -> None:
        """Before the fd is closed: a later socket may get the same number."""
        if self._handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self._handlers.clear()
        self._ep.close()

    async def run(self) -> None:
        fd = self._ep.fileno()
        # The kick hook (vhostnet/vhostuser/kick_hook.py) runs a pass from
        # where trio would sleep, without a scheduler pass of its own; this
        # task's wait takes the events whenever trio is busy.
        hook = current_kick_clock()
        token = None if hook is None else hook.watch(fd, self.run_pass, self._on_error)
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                self.run_pass()
        finally:
            if token is not None:
                hook.unwatch(fd, token)

    def run_pass(self) -> None:
        """The ready sockets' handlers, at most MAX_EVENTS of them."""
        handlers = self._handlers
        for sock_fd, events in self._ep.poll(0, MAX_EVENTS):
            h = handlers.get(sock_fd)
            if h is None:
                continue
            try:
                h(events)
            except Exception as e:      # a relay bug must not end the other relays
                self._on_error(e)
