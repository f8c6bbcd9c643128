import pytest
import trio

from vhostnet.launch import serve
from vhostnet.testing.frontend import Frontend


def make_server(path, **kw):
    """What `vhostnet serve` builds (vhostnet/launch/serve.py), listening on PATH."""
    srv = serve.make_server(str(path), **kw)
    srv.listen()
    return srv


@pytest.fixture
async def server(tmp_path, nursery):
    srv = make_server(tmp_path / "vhost.sock")
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    yield srv


@pytest.fixture
async def fe(server):
    f = Frontend()
    await f.connect(server.socket_path)
    yield f
    await f.shutdown(server)


@pytest.fixture
async def ready(fe):
    await fe.handshake()
    fe.post_rx()
    fe.rx.kick()
    return fe


async def wait_counter(device, name: str, at_least: int, timeout: float = 5.0) -> None:
    """Wait until a device counter reaches a value (the server works in its own tasks)."""
    with trio.fail_after(timeout):
        while device.counters[name] < at_least:
            await trio.sleep(0.005)
