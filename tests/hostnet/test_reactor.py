"""The TCP relays' reactor (vhostnet/hostnet/reactor.py) on real sockets:
edge-triggered events reach the right handler, a handler's bug is reported
and the others go on, and a removed socket's number can be reused."""
from __future__ import annotations

import select
import socket

import trio

from vhostnet.hostnet.reactor import Reactor

IN_ONLY = select.EPOLLIN | select.EPOLLET


async def _until(cond, what: str) -> None:
    with trio.fail_after(5):
        while not cond():
            await trio.sleep(0.001)
    assert cond(), what


async def test_events_reach_their_handlers_and_a_bug_stays_local(nursery):
    errors: list[BaseException] = []
    r = Reactor(on_error=errors.append)
    nursery.start_soon(r.run)
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    got: list[bytes] = []

    def bad(_events: int) -> None:
        raise RuntimeError("a relay bug")

    def good(_events: int) -> None:
        while True:
            try:
                got.append(b.recv(100))
            except BlockingIOError:
                return

    for s in (a, b):
        s.setblocking(False)
    r.add(a.fileno(), bad, IN_ONLY)
    r.add(b.fileno(), good, IN_ONLY)
    a_peer.send(b"x")
    b_peer.send(b"hello")
    await _until(lambda: got and errors, "both handlers ran")
    assert got == [b"hello"] and isinstance(errors[0], RuntimeError)
    b_peer.send(b"again")                    # the reactor goes on after the bug
    await _until(lambda: len(got) == 2, "the second event")
    assert got[1] == b"again" and len(r) == 2
    for s in (a, a_peer, b, b_peer):
        s.close()
    r.close()


async def test_removed_socket_number_is_free_for_the_next(nursery):
    r = Reactor(on_error=lambda e: None)
    nursery.start_soon(r.run)
    old: list[int] = []
    new: list[int] = []
    s, peer = socket.socketpair()
    s.setblocking(False)
    fd = s.fileno()
    r.add(fd, old.append, IN_ONLY)
    r.remove(fd)
    s.close()
    peer.close()
    s2, peer2 = socket.socketpair()          # most likely the same fd number again
    s2.setblocking(False)
    r.add(s2.fileno(), new.append, IN_ONLY)  # EEXIST if the old one were still registered
    peer2.send(b"x")
    await _until(lambda: new, "the new socket's event")
    assert not old and len(r) == 1
    r.remove(s2.fileno())
    r.remove(s2.fileno())                    # twice is harmless
    assert len(r) == 0
    s2.close()
    peer2.close()
    r.close()
