"""Counters: a collections.Counter whose item assignment stays in C.

The stack and the device count every frame (`counters["rx_frames"] += 1`),
several times per frame on the echo path. collections.Counter defines
`__delitem__` in Python (to ignore missing keys), and a Python-level
`__delitem__` makes CPython route *every* item assignment through a
Python-level slot as well (the two share the mapping type's one
assignment slot): on this project's machines `c[k] += 1` costs about 2x
a plain dict's. Binding `__delitem__` back to dict's keeps the C slot, so
`+=` runs at dict speed; everything else (missing keys read as 0,
most_common, arithmetic) is Counter's.

The one difference: `del counters[key]` on a key that is not there raises
KeyError (Counter's would pass). Nothing deletes counters.
"""
from __future__ import annotations

from collections import Counter

__all__ = ["Counters"]


class Counters(Counter):
    __slots__ = ()
    __delitem__ = dict.__delitem__
