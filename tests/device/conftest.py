import contextlib

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


@pytest.fixture
def proc_backend():
    """`vhostnet serve` in a subprocess: a hang or a crash there fails the test instead of the run."""
    import shutil
    import tempfile
    from vhostnet.testing.dpdk import VhostnetServe
    d = tempfile.mkdtemp(prefix="vn-", dir="/tmp")   # short: AF_UNIX paths are limited
    try:
        with VhostnetServe(d, log_level="info") as b:
            yield b
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def responsive(fe, backend=None, timeout: float = 2.0) -> None:
    """The backend answers a fresh GET_FEATURES within TIMEOUT and (if a subprocess) is alive."""
    from vhostnet.vhostuser.protocol import Req
    with trio.fail_after(timeout):
        assert await fe.get_u64(Req.GET_FEATURES)
    if backend is not None:
        assert backend.proc.poll() is None, f"backend exited:\n{backend.log_text()}"


async def ask_backend(backend, what: str = "inspect") -> dict:
    return await trio.to_thread.run_sync(backend.request, {"cmd": what})


@contextlib.asynccontextmanager
async def served(tmp_path, nursery, **kw):
    """A server as `vhostnet serve` builds it (KW: its options) and a frontend, ready."""
    srv = make_server(tmp_path / "v.sock", **kw)
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake()
    fe.post_rx()
    fe.rx.kick()
    yield srv, fe
    await fe.shutdown(srv)
