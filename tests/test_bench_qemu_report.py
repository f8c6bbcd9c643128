"""The report logic of scripts/bench_qemu.py on canned runs: the median of
repeated boots, the ratios to slirp, the target lines and the table.

No guest is booted and nothing is timed: the Run records are made by hand,
as the console parser would fill them, and the checks are on the arithmetic
and on what the table says about missing or skipped cells."""
from __future__ import annotations

import math

import pytest

from tests.scripts import script_module



@pytest.fixture(scope="module")
def bq():
    with script_module("bench_qemu") as mod:
        yield mod


def cpu(bq, backend: float) -> dict:
    return {n: backend if n == "backend" else 1.0 for n in bq.Meters.NAMES}


def run(bq, name: str, **values) -> "bq.Run":
    r = bq.Run(name)
    for t, v in values.items():
        r.results[t] = (v, "x", "")
        r.cpu[t] = cpu(bq, v / 10)
    return r


def test_median_odd_even_and_empty(bq):
    assert bq.median([3.0, 1.0, 2.0]) == 2.0
    assert bq.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert math.isnan(bq.median([]))


def test_median_of_takes_each_test_over_the_boots_that_gave_it(bq):
    boots = [run(bq, "vhostnet", send=100.0, crr=7.0), run(bq, "vhostnet", send=300.0),
             run(bq, "vhostnet", send=200.0, crr=9.0)]
    boots[1].problems.append("no result for crr")
    row = bq.median_of(boots)
    assert row.results["send"][0] == 200.0
    assert row.results["crr"][0] == 8.0                 # two boots gave crr
    assert "2/3" in row.results["crr"][2]
    assert row.cpu["send"]["backend"] == 20.0           # median of 10, 30, 20
    assert row.problems == ["boot 2: no result for crr"]


def test_ratios_are_to_slirp_and_missing_cells_are_nan(bq):
    rows = [run(bq, "vhostnet", send=300.0, ping=3.0, udp=50.0),
            run(bq, "slirp", send=100.0, ping=2.0), run(bq, "passt", send=600.0)]
    r = bq.ratios(rows)
    assert r["vhostnet"]["send"] == 3.0
    assert r["vhostnet"]["ping"] == 1.5
    assert math.isnan(r["vhostnet"]["udp"])             # slirp has no udp result
    assert r["slirp"]["send"] == 1.0
    assert bq.ratios(rows, "passt")["vhostnet"]["send"] == 0.5


def test_targets_say_met_or_missed_and_ping_is_lower_is_better(bq):
    rows = [run(bq, "vhostnet", send=300.0, recv=120.0, ping=1.0, crr=50.0),
            run(bq, "slirp", send=100.0, recv=100.0, ping=2.0, crr=100.0),
            run(bq, "passt", send=600.0, recv=60.0)]
    lines = bq.targets(rows)
    assert "met: vhostnet send 3.00x slirp (target >= 1.5x)" in lines
    assert "MISSED: vhostnet recv 1.20x slirp (target >= 1.5x)" in lines
    assert "MISSED: vhostnet send 0.50x passt (target >= 1x)" in lines
    assert "met: vhostnet recv 2.00x passt (target >= 1x)" in lines
    assert "MISSED: vhostnet crr 0.50x slirp (target >= 1x)" in lines
    assert "met: vhostnet ping 0.50x slirp (target <= 1x)" in lines
    assert not any(" udp " in line for line in lines)   # no numbers, no line


def test_table_shows_values_ratios_cpu_and_skips(bq):
    skipped = bq.Run("passt", skipped="passt not found")
    rows = [run(bq, "vhostnet", send=1234.0, ping=2.5), run(bq, "slirp", send=617.0, ping=5.0),
            skipped]
    text = bq.table(rows, ["send", "ping"])
    lines = text.splitlines()
    vrow = next(line for line in lines if line.startswith("vhostnet"))
    assert "1,234" in vrow and "2.50" in vrow
    assert any(line.startswith("passt") and "skipped: passt not found" in line for line in lines)
    ratio_block = text.split("ratio to slirp")[1].split("backend CPU")[0]
    vratio = next(line for line in ratio_block.splitlines() if line.startswith("vhostnet"))
    assert vratio.split()[1:] == ["2.00x", "0.50x"]
    cpu_block = text.split("backend CPU during each test")[1].split("CPU detail")[0]
    vcpu = next(line for line in cpu_block.splitlines() if line.startswith("vhostnet"))
    assert vcpu.split()[1:] == ["123", "0"]              # 1234/10, 2.5/10 rounded


def test_table_without_slirp_prints_no_ratios(bq):
    text = bq.table([run(bq, "vhostnet", send=1.0)], ["send"])
    assert "ratio to" not in text


def test_guest_interrupts_per_operation_are_a_median_over_boots(bq):
    """qemu/init's `bench: MODE irqs N` per boot -> interrupts per round trip
    (udp: rate x seconds round trips), per ping (5 a second), per MB (bulk)."""
    boots = [run(bq, "vhostnet", udp=1000.0, send=80.0, ping=2.0) for _ in range(3)]
    for b, n in zip(boots, (3000, 6000, 4500)):
        b.irqs.update(udp=n, send=160, ping=20)
    row = bq.median_of(boots, seconds=3.0)
    assert row.irqs["udp"] == 1.5                       # 4,500 / 3,000 round trips
    assert row.irqs["send"] == 160 / 30                 # 30 MB in 3 s at 80 Mbit/s
    assert row.irqs["ping"] == 20 / 15
    assert "interrupts the guest took" in bq.table([row], ["udp", "send", "ping"], base="slirp")
    assert not bq.median_of(boots).irqs                 # no seconds given: no per-op figure


def test_operation_percentiles_come_from_tcp_bench_and_are_a_median_over_boots(bq):
    line = "bench: udp 2000.0 rt/s round_trips=6000 seconds=3.000 lost=0 p50_us=400 p90_us=600 p99_us=1000"
    m = bq.RESULT.match(line)
    assert bq.percentiles(m[4]) == {"p50": 400.0, "p90": 600.0, "p99": 1000.0}
    assert bq.percentiles(" round_trips=6000 seconds=3.000 lost=0") == {}     # an older guest image
    assert bq.percentiles(" p50_us=1 p90_us=2") == {}                        # all three or none
    boots = [run(bq, "vhostnet", udp=2000.0) for _ in range(3)]
    for b, p50 in zip(boots, (400, 300, 500)):
        b.lat["udp"] = {"p50": float(p50), "p90": 2.0 * p50, "p99": 3.0 * p50}
    row = bq.median_of(boots)
    assert row.lat["udp"] == {"p50": 400.0, "p90": 800.0, "p99": 1200.0}
    text = bq.table([row], ["udp"], base="slirp")
    assert "400 / 800 / 1200 (500)" in text            # the mean: 1 s / 2,000 rt/s
    assert "one operation's time" not in bq.table([run(bq, "vhostnet", udp=2000.0)], ["udp"])


def test_every_row_boots_in_every_place_of_a_round(bq):
    rows = ["vhostnet", "vhostnet-nooffloads", "slirp", "passt"]
    rounds = [bq.round_order(rows, rep) for rep in range(8)]
    assert all(sorted(r) == sorted(rows) for r in rounds)
    for place in range(len(rows)):
        seen = [r[place] for r in rounds]
        assert sorted(seen) == sorted(rows * 2)     # each row twice in each place over 8 rounds


def test_cpu_per_operation_by_party_and_slirp_counted_once(bq):
    """% of a core / rate -> µs per operation; slirp's backend is QEMU's main
    thread, so its main-thread column is not added a second time."""
    v = bq.Run("vhostnet")
    v.results["udp"] = (4000.0, "rt/s", "")
    v.cpu["udp"] = {"backend": 40.0, "qemu_main": 12.0, "vcpu": 36.0, "others": 0.0}
    s = bq.Run("slirp")
    s.results["udp"] = (10000.0, "rt/s", "")
    s.cpu["udp"] = {"backend": 30.0, "qemu_main": 30.0, "vcpu": 60.0, "others": 0.0}
    assert bq.per_op(v, "udp") == "100/30/90 (220) of 250"
    assert bq.per_op(s, "udp") == "30/0/60 (90) of 100"
    assert bq.per_op(v, "crr") == "-"                   # no result, no figure
    text = bq.table([v, s], ["udp", "ping"])
    block = text.split("CPU per operation")[1]
    assert "100/30/90 (220) of 250" in block and "ping" not in block.splitlines()[1]


def test_steal_is_read_from_the_cpu_line_of_proc_stat(bq, tmp_path, monkeypatch):
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  10 0 5 900 1 0 2 {3 * bq.CLK_TCK} 0 0\ncpu0 1 2 3\n")
    real = bq.Path
    monkeypatch.setattr(bq, "Path", lambda p: stat if p == "/proc/stat" else real(p))
    assert bq.steal_seconds() == 3.0
    assert bq.host_busy_seconds() == (10 + 5 + 2 + 3 * bq.CLK_TCK) / bq.CLK_TCK   # steal counts as busy
