"""scripts/path_trace.py: the segments it cuts a trace into, its file, its
refusal of a tree it cannot wrap, and a real traced backend under
bench_latency.py --path. Nothing is timed: the numbers only have to be there."""
from __future__ import annotations

import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.scripts import script_module

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "path_trace.py"


@pytest.fixture(scope="module")
def pt():
    with script_module("path_trace") as mod:
        yield mod


def _trace(pt, events):
    st = pt._Stamps()
    for name, t in events:
        st.kind.append(pt.KINDS.index(name))
        st.t.append(t)
    return st


def test_segments_of_two_kicks(pt):
    st = _trace(pt, [("kick", 0), ("frame", 10), ("spin", 15), ("answer", 40), ("call", 50),
                     ("call", 55), ("sleep", 60), ("kick", 100), ("call", 150), ("sleep", 160),
                     ("sleep", 170)])
    seg = pt.segments(st.kind, st.t)
    assert seg["kick->frame"] == [10]
    assert seg["kick->spin"] == [15]
    assert seg["spin->answer"] == [25]
    assert seg["answer->call"] == [10]
    assert seg["kick->call"] == [50, 50]
    assert seg["call->call"] == [5, 0]
    assert seg["call->sleep"] == [5, 10]        # the first sleep after the last call
    assert seg["sleep"] == [40]                 # the last kick has no next one
    s = pt.summarize(st.kind, st.t)
    assert s["kick->call"] == {"n": 2, "p50_us": 0.1, "p90_us": 0.1}


def test_calls_before_the_answer_and_a_kick_without_calls(pt):
    # An RX ring's work (a call) before the answer is not the answer's call;
    # a kick with no call has no call segments at all.
    st = _trace(pt, [("kick", 0), ("spin", 5), ("call", 6), ("answer", 20), ("call", 30),
                     ("kick", 100), ("frame", 104), ("sleep", 110)])
    seg = pt.segments(st.kind, st.t)
    assert seg["answer->call"] == []
    assert seg["kick->call"] == [6]
    assert seg["call->call"] == [24]
    assert seg["kick->frame"] == [4]
    assert seg["call->sleep"] == []


def test_file_round_trip_and_bound(pt, tmp_path):
    st = pt._Stamps(limit=3)
    for k in range(5):
        st.mark(k)
    assert len(st.t) == 3 and st.dropped == 2
    f = tmp_path / "t.trace"
    st.write(str(f))
    kind, t = pt.load(f)
    assert list(kind) == [0, 1, 2] and list(t) == list(st.t)
    r = subprocess.run([sys.executable, str(SCRIPT), "--summarize", str(f), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (tmp_path / "junk").write_bytes(b"\xff" * 12)
    r = subprocess.run([sys.executable, str(SCRIPT), "--summarize", str(tmp_path / "junk")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a trace" in r.stderr


def test_a_renamed_function_is_named(pt):
    mod = types.ModuleType("vhostnet.fake")
    with pytest.raises(SystemExit, match=r"vhostnet\.fake\.gone is not in this tree"):
        pt._need(mod, "gone")


def test_backend_without_trace_file_refuses():
    r = subprocess.run([sys.executable, str(SCRIPT), "serve"], capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "VHOSTNET_PATH_TRACE" in r.stderr


def test_bench_latency_path_on_a_real_backend():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_latency.py"), "--path",
                        "--tests", "udp,ping", "--repeat", "1", "--seconds", "0.5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("test ") and "kick->call" in line)
    cols = lines[head].split()[2:]
    rows = {}
    for line in lines[head + 1:]:
        m = re.match(r"(udp|ping)\s+this\s+(.*)", line)
        if m:
            rows[m[1]] = dict(zip(cols, m[2].split()))
    assert set(rows) == {"udp", "ping"}
    udp, ping = rows["udp"], rows["ping"]
    # UDP goes out through the express, waits for hostsrv's answer, calls.
    for seg in ("kick->frame", "kick->spin", "spin->answer", "answer->call", "kick->call", "sleep"):
        v = float(udp[seg])
        assert math.isfinite(v) and v > 0, (seg, udp)
    assert float(udp["kick->spin"]) < float(udp["kick->call"])
    # The backend answers a ping itself: no host, so no spin and no answer.
    assert ping["spin->answer"] == "-" and float(ping["kick->call"]) > 0
