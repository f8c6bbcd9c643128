"""Guest memory that cannot shrink under the backend (issue 7, case 3).

A front-end that truncates its memfd after SET_MEM_TABLE used to kill the
backend with SIGBUS at the next ring access. Regions must now be memfds
sealed with F_SEAL_SHRINK, as QEMU's memory-backend-memfd makes them by
default; unsealed memory is refused with a message naming the QEMU option,
unless --allow-unsealed-memory says the front-end is trusted.
"""
import os
import shutil
import tempfile

import pytest
import trio

from vhostnet.testing.dpdk import VhostnetServe
from vhostnet.testing.frontend import Frontend
from vhostnet.vhostuser.protocol import Req

from .conftest import ask_backend, responsive
from .test_datapath import ping


async def test_unsealed_memfd_is_refused_so_a_shrink_is_harmless(proc_backend):
    fe = Frontend(sealed=False)
    await fe.connect(proc_backend.socket)
    await fe.handshake()                       # its SET_MEM_TABLE (no reply asked) is refused
    payload, fds = fe.mem_table()
    assert await fe.ack(Req.SET_MEM_TABLE, payload, fds) != 0
    log = proc_backend.log_text()
    assert "F_SEAL_SHRINK" in log and "memory-backend-memfd" in log and "--allow-unsealed-memory" in log
    assert (await ask_backend(proc_backend))["memory"] == []
    os.ftruncate(fe.memfd, 0)                  # the front-end shrinks its memory...
    fe.tx.kick()                               # ...and pokes the rings
    fe.rx.kick()
    await responsive(fe, proc_backend)         # SIGBUS before: the process died here
    await fe.close()
    fe.release()


async def test_a_file_is_refused_too(proc_backend, tmp_path):
    """memory-backend-file cannot be sealed at all."""
    fe = Frontend()
    path = tmp_path / "ram"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, fe.mem_size)
    await fe.connect(proc_backend.socket)
    payload, _ = fe.mem_table()
    await fe.get_u64(Req.GET_FEATURES)
    pf = await fe.get_u64(Req.GET_PROTOCOL_FEATURES)
    from vhostnet.testing.frontend import U64
    await fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(pf))
    assert await fe.ack(Req.SET_MEM_TABLE, payload, [fd]) != 0
    assert "memory-backend-file" in proc_backend.log_text()
    os.close(fd)
    await responsive(fe, proc_backend)
    await fe.close()
    fe.release()


async def test_sealed_memory_cannot_shrink_and_works():
    fe = Frontend()
    with pytest.raises(PermissionError):
        os.ftruncate(fe.memfd, 0)              # what QEMU's seal=on guarantees
    fe.release()


@pytest.fixture
def trusting_backend():
    d = tempfile.mkdtemp(prefix="vn-", dir="/tmp")
    try:
        with VhostnetServe(d, log_level="info", allow_unsealed_memory=True) as b:
            yield b
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_allow_unsealed_memory_accepts_it_with_a_warning(trusting_backend):
    fe = Frontend(sealed=False)
    await fe.connect(trusting_backend.socket)
    await fe.handshake()
    fe.post_rx()
    fe.rx.kick()
    got = await fe.exchange([ping(seq=3)], want=1)
    assert len(got) == 1
    assert "accepted (--allow-unsealed-memory)" in trusting_backend.log_text()
    await fe.close()
    fe.release()
