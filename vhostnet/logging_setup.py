"""Logging for the backend: levels, one line per event, nothing a guest can flood.

Every record becomes exactly one line: newlines in a message (or in a
traceback) are escaped, so a log stays greppable and a line count is an
event count. Messages a guest can trigger at will (bad descriptors, bad
frames, refused requests) go through vhostnet/ratelimit.py's
RateLimitedLog: a burst per reason, then one line per second with the
number suppressed in between. The totals suppressed are in
`vhostnet stats`/`inspect` as backend.log_suppressed.

Levels: debug shows every vhost-user message and ring start/stop; info
the connection life cycle and negotiated features; warning what a guest
or QEMU did wrong.
"""
from __future__ import annotations

import logging
import sys

__all__ = ["setup", "OneLineFormatter", "LEVELS", "one_line_traceback"]

LEVELS = ("debug", "info", "warning", "error")


def one_line_traceback(e: BaseException) -> str:
    """E's traceback as one line (" | " between its lines), for a rate-limited log record."""
    import traceback
    return " | ".join(line.strip() for chunk in traceback.format_exception(e)
                      for line in chunk.splitlines() if line.strip())


class OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("\r", "\\r").replace("\n", " | ")


def setup(level: str = "info", path: str | None = None) -> None:
    """Configure the "vhostnet" logger hierarchy (stderr, or PATH appended to)."""
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
                                          datefmt="%H:%M:%S"))
    root = logging.getLogger("vhostnet")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False
