"""scripts/wake_cost.py: its measurement runs, pins and unpins, and leaves
no process behind. Nothing is timed: the numbers only have to be there."""
from __future__ import annotations

import json
import math
import os

import pytest

from tests.scripts import script_module



@pytest.fixture(scope="module")
def wc():
    with script_module("wake_cost") as mod:
        yield mod


def _no_children() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_measure_rows_affinity_and_children(wc):
    before = os.sched_getaffinity(0)
    rows = wc.measure(n=50)
    assert os.sched_getaffinity(0) == before
    assert _no_children()
    expected = {"unpinned", "one CPU"} | ({"across CPUs"} if len(before) >= 2 else set())
    assert set(rows) == expected
    assert all(math.isfinite(v) and v > 0 for v in rows.values())
    line = wc.summary(rows)
    assert all(k in line for k in rows)


def test_a_failed_peer_is_an_error_not_a_hang(wc, monkeypatch):
    # The peer exits at once: the parent's epoll would wait for ever on a
    # count that never comes, so the peer's failure must end it. Here the
    # peer gives one answer and fails; the parent must raise, not block.
    def broken(rd, wr, n):
        os.eventfd_write(wr, 1)
        raise OSError("broken peer")
    monkeypatch.setattr(wc, "_bounce", broken)
    with pytest.raises(RuntimeError, match="peer"):
        wc.round_trip_us(None, n=1)
    assert _no_children()


def test_cli_json(wc, capsys):
    assert wc.main(["--json", "--round-trips", "20"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["unit"] == "us_per_round_trip" and "one CPU" in doc["rows"]
    with pytest.raises(SystemExit):
        wc.main(["--round-trips", "1"])
