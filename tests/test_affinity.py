"""vhostnet/launch/affinity.py: --cpu's parsing, its choice among allowed CPUs, the CPU lists."""
import argparse

import pytest

from vhostnet.launch.affinity import CpuChoice, describe, parse_cpu


def test_describe_lists_cpus_as_taskset_does():
    assert describe({0, 1, 2, 3, 6}) == "0-3,6"
    assert describe({0, 2, 3}) == "0,2-3"
    assert describe({5}) == "5"


def test_parse_and_resolve():
    assert str(parse_cpu(" Auto ")) == "auto" and str(parse_cpu("none")) == "none"
    for bad in ("-1", "first", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_cpu(bad)
    allowed = {0, 1, 4}
    assert parse_cpu("auto").resolve(allowed) == 4
    assert parse_cpu("1").resolve(allowed) == 1
    assert parse_cpu("none").resolve(allowed) is None
    assert CpuChoice(0).resolve({0}) is None         # one CPU allowed: pinned already
    assert parse_cpu("auto").resolve({3}) is None
    with pytest.raises(ValueError, match=r"--cpu 7: not among this process's CPUs \(0\)"):
        CpuChoice(7).resolve({0})                   # another CPU named: refused, not ignored
    with pytest.raises(ValueError, match=r"--cpu 2: not among this process's CPUs \(0-1,4\)"):
        parse_cpu("2").resolve(allowed)
