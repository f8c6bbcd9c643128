"""Rate-limited logging, so a misbehaving guest cannot flood the log.

Each key (usually an error reason) gets a token bucket. When a burst is
used up, further messages are counted, and the count is reported with the
next message that gets through: "... (37 similar suppressed)".
"""
from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, burst: int = 5, per_second: float = 1.0,
                 clock=time.monotonic, max_keys: int = 1024):
        self.logger = logger
        self.burst = burst
        self.rate = per_second
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, last, suppressed]
        self.suppressed_total = 0

    def log(self, level: int, key: str, msg: str, *args, exc_info=None) -> bool:
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.clear()
            b = self._buckets[key] = [float(self.burst), now, 0]
        b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if b[0] < 1:
            b[2] += 1
            self.suppressed_total += 1
            return False
        b[0] -= 1
        if b[2]:
            msg = msg + " (%d similar suppressed)"
            args = args + (int(b[2]),)
            b[2] = 0
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args, exc_info=None) -> bool:
        return self.log(logging.ERROR, key, msg, *args, exc_info=exc_info)

    def info(self, key: str, msg: str, *args) -> bool:
        return self.log(logging.INFO, key, msg, *args)
