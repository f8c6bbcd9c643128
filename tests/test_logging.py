"""Logging: one line per event, and a guest flooding bad descriptors or bad
frames yields a bounded number of lines plus a "suppressed" count."""
import logging

import pytest
import trio

from vhostnet.logging_setup import OneLineFormatter
from vhostnet.launch.serve import make_server
from vhostnet.ratelimit import RateLimitedLog

from vhostnet.testing.frontend import Frontend
from .observe import sockdir  # noqa: F401 (fixture)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_one_line_per_record():
    fmt = OneLineFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        rec = logging.LogRecord("vhostnet.x", logging.ERROR, __file__, 1, "line one\nline two", (), True)
        import sys
        rec.exc_info = sys.exc_info()
    text = fmt.format(rec)
    assert "\n" not in text
    assert text.startswith("ERROR line one | line two | Traceback (most recent call last):")
    assert "ValueError: bad | thing" in text


@pytest.fixture
async def flood_server(sockdir, nursery):
    clock = FakeClock()
    rlog = RateLimitedLog(logging.getLogger("vhostnet.backend"), burst=5, per_second=1.0, clock=clock)
    dev_rlog = RateLimitedLog(logging.getLogger("vhostnet.net"), burst=5, per_second=1.0, clock=clock)
    srv = make_server(str(sockdir / "v.sock"), device_rlog=dev_rlog, rlog=rlog)
    srv.listen()
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake()
    yield srv, fe, clock
    await fe.close()
    with trio.move_on_after(2):
        while srv.current is not None:
            await trio.sleep(0.005)
    fe.release()


async def _post_bad(fe, srv, n):
    """N chains whose only descriptor lies outside guest memory, in batches the ring holds."""
    q = srv.current.backend.queues[1]
    start = q.errors.get("desc_out_of_bounds", 0)
    for i in range(fe.tx.size // 2):
        fe.tx.write_desc(i, fe.mem_size + 0x1000, 100, 0)
    left = n
    while left:
        k = min(left, fe.tx.size // 2)
        # Distinct heads per batch: one head twice before the device returns it
        # would be a different finding (avail_head_in_use, §2.7.13.1).
        for i in range(k):
            fe.tx.push_avail(i)
        fe.tx.kick()
        left -= k
        with trio.fail_after(5):
            while q.errors.get("desc_out_of_bounds", 0) < start + n - left:
                await trio.sleep(0.002)


async def test_flood_of_bad_descriptors_is_bounded(flood_server, caplog):
    srv, fe, clock = flood_server
    caplog.set_level(logging.WARNING, logger="vhostnet")
    await _post_bad(fe, srv, 1000)
    lines = [r for r in caplog.records if "desc_out_of_bounds" in r.getMessage()]
    assert len(lines) == 5                       # the burst, then silence
    assert srv.current.backend.queues[1].errors["desc_out_of_bounds"] == 1000
    assert srv.rlog.suppressed_total == 995
    caplog.clear()
    clock.t += 2                                 # later: the next one says how many were held back
    await _post_bad(fe, srv, 1)
    [line] = [r.getMessage() for r in caplog.records if "desc_out_of_bounds" in r.getMessage()]
    assert line.endswith("(995 similar suppressed)")
    assert "outside" in line or "not inside" in line or "leaves guest memory" in line


async def test_flood_of_bad_frames_is_bounded(flood_server, caplog):
    srv, fe, clock = flood_server
    caplog.set_level(logging.WARNING, logger="vhostnet")
    for _round in range(4):
        for _ in range(100):
            fe.post_tx(b"\x00" * 4)              # runt: shorter than an Ethernet header
        fe.tx.kick()
        with trio.fail_after(5):
            while srv.current.device.counters["tx_runt"] < (_round + 1) * 100:
                await trio.sleep(0.002)
        fe.tx.take_used()
    runts = [r for r in caplog.records if "shorter than" in r.getMessage()]
    assert len(runts) == 5
    assert srv.current.device.counters["tx_runt"] == 400
    assert srv.current.device.rlog.suppressed_total == 395


async def test_disconnect_logs_every_count_once(sockdir, nursery, caplog):
    """When a flood just stops, the per-connection summary still tells what was held back."""
    caplog.set_level(logging.WARNING, logger="vhostnet")
    clock = FakeClock()
    rlog = RateLimitedLog(logging.getLogger("vhostnet.backend"), clock=clock)
    srv = make_server(str(sockdir / "v.sock"), rlog=rlog)
    srv.listen()
    nursery.start_soon(srv.serve)
    await srv.ready.wait()
    fe = Frontend()
    await fe.connect(srv.socket_path)
    await fe.handshake()
    await _post_bad(fe, srv, 50)
    await fe.close()
    with trio.fail_after(2):
        while srv.current is not None:
            await trio.sleep(0.005)
    fe.release()
    [line] = [r.getMessage() for r in caplog.records if "connection 1 errors" in r.getMessage()]
    assert line == "connection 1 errors: tx:desc_out_of_bounds 50; 45 log line(s) suppressed so far"
