"""Hostile ring set-up and contents that used to hang or kill the backend (issue 7).

Each test runs the real `vhostnet serve` in a subprocess, plays a hostile
front-end or driver, and then checks the backend still answers a fresh
GET_FEATURES quickly and is alive: on the code before the fix, the process
died or its event loop never came back.
"""
import struct

import trio

from vhostnet.testing.frontend import ADDR, STATE, U64, UVA_BASE, F_NEXT, Frontend
from vhostnet.vhostuser.protocol import Req

from .conftest import ask_backend, responsive
from .test_datapath import ping


async def test_vring_num_after_vring_addr(proc_backend):
    """Case 8: SET_VRING_NUM after SET_VRING_ADDR resizes the ring: no views sized for the old queue."""
    fe = Frontend()
    await fe.connect(proc_backend.socket)
    await fe.handshake()
    r = fe.tx
    base = await fe.get_vring_base(1)              # stop the ring, as a driver reset does
    await fe.request(Req.SET_VRING_ADDR, ADDR.pack(1, 0, UVA_BASE + r.desc, UVA_BASE + r.used,
                                                  UVA_BASE + r.avail, 0))
    await fe.request(Req.SET_VRING_NUM, STATE.pack(1, 4 * r.size))   # bigger than the views
    await fe.request(Req.SET_VRING_BASE, STATE.pack(1, 3 * r.size))  # an index past the old size
    await fe.request(Req.SET_VRING_KICK, U64.pack(1), [r.kick_fd])
    await fe.request(Req.SET_VRING_ENABLE, STATE.pack(1, 1))
    struct.pack_into("<H", fe.mem, r.avail + 2, (3 * r.size + 1) & 0xFFFF)
    r.kick()
    await responsive(fe, proc_backend)
    q = (await ask_backend(proc_backend))["queues"][1]
    assert q["size"] == 4 * r.size and q["last_avail_idx"] == 3 * r.size + 1
    assert base == 0
    await fe.close()
    fe.release()


class _BuggyDevice:
    """A NetDevice with a bug planted where a handler and a kick reach it."""

    def __new__(cls, *a, **kw):
        from vhostnet.net.device import NetDevice

        class Buggy(NetDevice):
            def set_mtu(self, mtu):
                raise KeyError("planted bug")

            def drain_tx(self, rings, now, *args):
                raise TypeError("planted bug")
        return Buggy(*a, **kw)


async def test_a_bug_in_a_handler_or_the_device_does_not_end_the_connection(tmp_path, nursery):
    """A handler raising KeyError, a device raising TypeError: counted, refused, the loop goes on."""
    from vhostnet.vhostuser.server import Server
    srv = Server(str(tmp_path / "s.sock"), _BuggyDevice)
    srv.listen()
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake()
    assert await fe.ack(Req.NET_SET_MTU, U64.pack(1400)) != 0
    fe.post_tx(ping())
    fe.tx.kick()
    q = srv.current.backend.queues[1]
    with trio.fail_after(5):
        while q.broken != "internal_error":
            await trio.sleep(0.005)
    await responsive(fe)
    assert srv.current.backend.errors["internal_error"] == 2
    await fe.shutdown(srv)
