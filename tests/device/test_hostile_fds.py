"""File descriptors from a hostile or buggy front-end (issue 7, cases 4, 7 and 9).

An fd is owned exactly once and closed exactly once; kick, call and err fds
must be eventfds; anything else is refused with a clear error, closed, and
the connection carries on.
"""
import os
import socket

import trio

from vhostnet.testing.frontend import STATE, U64, Frontend
from vhostnet.vhostuser.protocol import Req

from .conftest import ask_backend, responsive
from .test_datapath import ping


async def test_refused_kick_never_closes_someone_elses_fd(server):
    """Case 4: a SET_VRING_KICK refused (no memory table yet) must not keep the fd number it closed."""
    fe = Frontend()
    await fe.connect(server.socket_path)
    await fe.get_u64(Req.GET_FEATURES)
    pf = await fe.get_u64(Req.GET_PROTOCOL_FEATURES)
    await fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(pf))
    await fe.request(Req.SET_VRING_NUM, STATE.pack(1, fe.tx.size))
    status = await fe.ack(Req.SET_VRING_KICK, U64.pack(1), [fe.tx.kick_fd])
    assert status != 0                     # refused: no memory table
    # Whatever fd number the backend had, it is free now; fill the lowest free numbers
    # with fds of our own, as another owner (a control client, another queue) would.
    mine = [fd for _ in range(16) for fd in os.pipe()]
    await fe.get_vring_base(1)             # stops the ring: closes its kick fd, if it has one
    await fe.shutdown(server)              # and the connection ends: every fd the backend owns is closed
    for fd in mine:
        os.fstat(fd)                       # EBADF here: the backend closed a fd it did not own
        os.close(fd)


async def test_pipe_at_eof_as_kick_fd_is_refused(proc_backend):
    """Case 7: a kick fd that is always readable (a pipe at EOF) is refused, not spun on."""
    fe = Frontend()
    await fe.connect(proc_backend.socket)
    await fe.handshake()
    r, w = os.pipe()
    os.close(w)                            # at EOF: readable for ever
    before = (await ask_backend(proc_backend))["queues"][1]["kicks"]
    status = await fe.ack(Req.SET_VRING_KICK, U64.pack(1), [r])
    os.close(r)
    assert status != 0
    await responsive(fe, proc_backend)
    assert (await ask_backend(proc_backend))["queues"][1]["kicks"] == before
    log = proc_backend.log_text()
    assert "not an eventfd" in log and "pipe" in log
    await fe.close()
    fe.release()


async def test_o_path_and_socket_fds_are_refused_and_the_connection_carries_on(proc_backend):
    """Case 9: an O_PATH fd (os.set_blocking raises on it) or a socket as a call/kick/err fd."""
    fe = Frontend()
    await fe.connect(proc_backend.socket)
    await fe.handshake()
    path_fd = os.open("/", os.O_PATH)
    a, b = socket.socketpair()
    for req in (Req.SET_VRING_CALL, Req.SET_VRING_KICK, Req.SET_VRING_ERR):
        for fd in (path_fd, a.fileno()):
            assert await fe.ack(req, U64.pack(0), [fd]) != 0
            await responsive(fe, proc_backend)
    os.close(path_fd)
    a.close()
    b.close()
    errors = (await ask_backend(proc_backend))["request_errors"]
    assert errors["bad_set_vring_call"] == errors["bad_set_vring_kick"] == errors["bad_set_vring_err"] == 2
    # The same connection still moves frames.
    fe.post_rx()
    fe.rx.kick()
    got = await fe.exchange([ping(seq=9)], want=1)
    assert len(got) == 1
    await fe.close()
    fe.release()
