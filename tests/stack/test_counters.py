"""stack.counters.Counters: a Counter in every way the project uses, with
item assignment on dict's C slot."""
from __future__ import annotations

from collections import Counter

import pytest

from stack import NetConfig
from stack.counters import Counters
from stack.interface import Stack


def test_counts_like_counter():
    c = Counters()
    c["a"] += 1
    c["a"] += 2
    c["b"] += 0
    assert c["missing"] == 0 and "missing" not in c
    assert c == Counter(a=3, b=0) and dict(c) == {"a": 3, "b": 0}
    assert c.most_common(1) == [("a", 3)]
    assert isinstance(c, Counter) and (c + Counter(a=1))["a"] == 4
    c.update({"b": 5})
    assert c["b"] == 5


def test_delete_is_dicts():
    # The point of the class: no Python-level __delitem__ (see the module docstring).
    assert Counters.__delitem__ is dict.__delitem__
    c = Counters(a=1)
    del c["a"]
    assert "a" not in c
    with pytest.raises(KeyError):
        del c["a"]


def test_stack_counts_in_counters():
    assert type(Stack(NetConfig()).counters) is Counters
