"""The earliest of several deadlines, any of which may be None (none wanted).

Every layer's next_deadline() is asked after each step of the event loop
(the server re-arms its timer), so this runs per frame: one call and a loop,
with no list built (issue 12's latency profile: the composite deadlines
cost 2 list comprehensions and a min() per layer per frame)."""
from __future__ import annotations


def earliest(*deadlines: float | None) -> float | None:
    best = None
    for d in deadlines:
        if d is not None and (best is None or d < best):
            best = d
    return best
