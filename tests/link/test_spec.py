"""The fault grammar: what it accepts, how it prints, and the errors a user sees."""
import pytest

from vhostnet.link.spec import DirFaults, FaultSpec, FaultSpecError, parse


def test_the_example_of_the_issue():
    s = parse("loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1,dir=both")
    want = DirFaults(loss=0.05, reorder=0.02, delay=0.02, jitter=0.005)
    assert s == FaultSpec(tx=want, rx=want, seed=1)
    assert str(s) == "loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1"


@pytest.mark.parametrize("text", [
    "dir=rx,corrupt=1%,seed=3", "tx.loss=10%,rx.delay=100ms,seed=7", "rate=10mbit,delay=50ms,seed=1",
    "loss=0.05,limit=10,limit-bytes=64K,seed=2", "delay=1.5s,seed=1", "delay=500us,seed=1",
    "dup=0.5%,rate=1500kbit,seed=9", "none",
])
def test_printing_and_parsing_round_trip(text):
    s = parse(text)
    assert parse(str(s)) == s


def test_dir_applies_wherever_it_stands_and_prefixes_override():
    assert parse("dir=tx,loss=5%,seed=1") == parse("loss=5%,dir=tx,seed=1")
    s = parse("loss=5%,rx.loss=1%,seed=1")
    assert (s.tx.loss, s.rx.loss) == (0.05, 0.01)
    s = parse("dir=tx,loss=5%,rx.delay=10ms,seed=1")
    assert s.rx == DirFaults(delay=0.01) and s.tx == DirFaults(loss=0.05)


def test_without_a_seed_one_is_chosen_and_shown():
    s = parse("loss=1%")
    assert f"seed={s.seed}" in str(s)
    assert parse(str(s)) == s


def test_units():
    assert parse("rate=64000,seed=0").tx.rate == 64000
    assert parse("rate=1gbit,seed=0").tx.rate == 10**9
    assert parse("rate=2.5m,seed=0").tx.rate == 2_500_000
    assert parse("jitter=250us,seed=0").tx.jitter == pytest.approx(250e-6)
    assert parse("limit-bytes=8M,seed=0").tx.limit_bytes == 8 << 20


@pytest.mark.parametrize("text, words", [
    ("", "empty fault spec"),
    ("loss", "expected KEY=VALUE"),
    ("loss=5", "for a percentage write 5%"),
    ("loss=101%", "between 0 and 100%"),
    ("loss=lots", "probability such as 5%"),
    ("delay=20", "with its unit"),
    ("delay=11s", "at most 10 s"),
    ("rate=1MBps", "bits per second"),
    ("rate=100bit", "at least 8000"),
    ("foo=1", "unknown fault 'foo'; known: loss, dup"),
    ("seed=-1", "whole number"),
    ("loss=1%,loss=2%", "given twice"),
    ("up.loss=1%", "tx. or rx."),
    ("dir=up", "tx (guest -> stack), rx (stack -> guest) or both"),
    ("limit=0", "between 1 and"),
    ("limit-bytes=100", "one frame"),
])
def test_bad_specs_say_what_is_wrong(text, words):
    with pytest.raises(FaultSpecError, match=None) as e:
        parse(text)
    assert words in str(e.value)
