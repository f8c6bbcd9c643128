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


def _feed_refused(fe, stop, fed: list) -> None:
    """A driver that keeps the TX ring half full of refused chains for as long as the device takes them.

    It watches the used ring's slots (a hostile driver may: the memory is shared)
    to see each refused chain come back, and puts a new one in for each.
    """
    r = fe.tx
    mem, n = fe.mem, r.size
    sentinel = 0xFFFFFFFF
    r.write_desc(0, r.buf(0), 4, F_NEXT, 0)                # a loop: refused after a queue's worth
    c = a = r.avail_idx
    while not stop.is_set():
        while c != a and struct.unpack_from("<I", mem, r.used + 4 + 8 * (c % n))[0] != sentinel:
            c += 1
        while a - c < n // 2:
            struct.pack_into("<I", mem, r.used + 4 + 8 * (a % n), sentinel)
            struct.pack_into("<H", mem, r.avail + 4 + 2 * (a % n), 0)
            a += 1
            struct.pack_into("<H", mem, r.avail + 2, a & 0xFFFF)
        fed[0] = c


async def test_a_driver_feeding_refused_chains_cannot_starve_the_loop(proc_backend):
    """Case 5: refused chains count against the budget, so pop() returns and the loop yields."""
    import threading
    fe = Frontend()
    await fe.connect(proc_backend.socket)
    await fe.handshake()
    stop = threading.Event()
    fed = [0]
    async with trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, _feed_refused, fe, stop, fed)
        try:   # the feeder thread cannot be cancelled: it must be told, whatever happens here
            with trio.fail_after(10):
                while fed[0] < 200:         # the device is taking them
                    fe.tx.kick()
                    await trio.sleep(0.01)
            for _ in range(5):
                await responsive(fe, proc_backend)
        finally:
            stop.set()
    errors = (await ask_backend(proc_backend))["queues"][1]["errors"]
    assert errors["chain_too_long"] >= 200
    await fe.close()
    fe.release()


async def test_a_batch_of_queue_long_chains_does_not_block_the_loop(proc_backend):
    """Case 12: 512 chains of 4096 descriptors each (one event-loop step of several seconds before).

    Budgets count descriptors and a chain longer than the device's limit
    (virtio 1.2 §2.7.4.1) is refused, so GET_FEATURES is answered while the
    batch is worked through.
    """
    size = 4096
    fe = Frontend(queue_size=size, mem_size=288 << 20)
    await fe.connect(proc_backend.socket)
    await fe.handshake()
    r = fe.tx
    for i in range(size):                       # 0 -> 1 -> ... -> size-1: a valid chain, as long as the queue
        r.write_desc(i, r.buf(0) + i, 1, F_NEXT if i + 1 < size else 0, i + 1)
    sentinel = 0xFFFFFFFF
    struct.pack_into("<I", fe.mem, r.used + 4, sentinel)
    for _ in range(512):
        struct.pack_into("<H", fe.mem, r.avail + 4 + 2 * (r.avail_idx % size), 0)
        r.avail_idx += 1
    r.set_avail_idx(r.avail_idx)
    r.kick()
    with trio.fail_after(10):                   # the device has started on the batch
        while struct.unpack_from("<I", fe.mem, r.used + 4)[0] == sentinel:
            await trio.sleep(0.001)
    await responsive(fe, proc_backend, timeout=1.0)
    with trio.fail_after(20):
        while (await ask_backend(proc_backend))["queues"][1]["last_avail_idx"] != 512:
            await trio.sleep(0.05)
    q = (await ask_backend(proc_backend))["queues"][1]
    assert q["errors"] == {"chain_excessive": 512}
    [finding] = q["findings"]
    assert finding["section"] == "2.7.4.2" and finding["level"] == "SHOULD"
    await fe.close()
    fe.release()
