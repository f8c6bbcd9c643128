"""tests/hostnet/test_proxy.py again, under the kick hook (vhostnet/vhostuser/kick_hook.py).

`vhostnet serve` and `run` run trio with KickClock, so kicks and the host
proxy's reactor passes are handled from where trio would sleep; the
in-process frontend kicks from the backend's own thread, so here most of
them are. Every proxy test must pass the same way under it.

pytest-trio runs a test under a Clock only if the test function itself
takes it as an argument: each test of test_proxy.py is wrapped here in one
that also takes `kick_clock`, with the same marks.
"""
from __future__ import annotations

import functools
import inspect

import pytest

from vhostnet.vhostuser.kick_hook import KickClock

from . import test_proxy
from .test_proxy import backend  # noqa: F401,F811  (the fixture, by name)


@pytest.fixture
def kick_clock():
    return KickClock()


def _hooked(test):
    @functools.wraps(test)
    async def run(kick_clock, **kw):
        await test(**kw)
        if "backend" in kw:     # the server's kick tasks watched their fds through the hook
            assert kick_clock.available, kick_clock.describe()
    sig = inspect.signature(test)
    run.__signature__ = sig.replace(parameters=[inspect.Parameter("kick_clock", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                                *sig.parameters.values()])
    del run.__wrapped__        # pytest would read test's own signature through it
    return run


for _name, _test in vars(test_proxy).items():
    if _name.startswith("test_") and inspect.iscoroutinefunction(_test):
        globals()[_name] = _hooked(_test)


@pytest.mark.hostnet_kw(answer_spin=0)      # no spin: the answer comes through the reactor
async def test_a_host_answer_is_taken_by_a_reactor_pass_from_the_hook(kick_clock, backend, nursery,  # noqa: F811
                                                                     monkeypatch):
    """The host answers a datagram while the hook waits (from another thread,
    once the hook's count of waits moves): the host proxy's reactor pass that
    takes the answer runs from the hook, outside any task
    (trio.lowlevel.current_task raises there), and the guest gets it."""
    import socket
    import threading
    import time

    import trio
    from scapy.layers.inet import UDP

    from vhostnet.hostnet.reactor import Reactor

    from .test_latency_paths import GW

    srv, _ = backend
    where = []
    real = Reactor.run_pass

    def run_pass(self):
        try:
            trio.lowlevel.current_task()
            where.append("task")
        except RuntimeError:
            where.append("hook")
        real(self)
    monkeypatch.setattr(Reactor, "run_pass", run_pass)    # before the connection's reactor starts
    hs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hs.bind(("127.0.0.1", 0))
    hs.setblocking(False)
    g = await test_proxy.attach(srv, nursery)
    g.send_ip(GW / UDP(sport=41100, dport=hs.getsockname()[1]) / b"hook?")
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(hs)
    data, peer = hs.recvfrom(2048)
    w0 = kick_clock.waits

    def answer():
        while kick_clock.waits == w0:
            time.sleep(1e-4)
        hs.sendto(data.upper(), peer)
    threading.Thread(target=answer, daemon=True).start()
    with trio.fail_after(10):
        while not [p for p in g.other_ip() if UDP in p]:
            await trio.sleep(0.005)
    assert [p[UDP].load for p in g.other_ip() if UDP in p] == [b"HOOK?"]
    assert "hook" in where, where
    hs.close()
