"""The fault grammar: `loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1,dir=both`.

Parsed once (control plane) into an immutable FaultSpec: one DirFaults per
direction plus the seed. The data path (faults.py) reads plain attributes.

    SPEC   := ITEM ["," ITEM]...  |  "none"
    ITEM   := [DIR "."] KEY "=" VALUE  |  "seed=" N  |  "dir=" (tx|rx|both)
    DIR    := tx | rx        (tx: guest -> stack, rx: stack -> guest)
    KEY    := loss | dup | reorder | corrupt        VALUE: P% or a fraction, 0..100%
            | delay | jitter                        VALUE: TIME: 20ms, 1.5s, 500us (at most 10 s)
            | rate                                  VALUE: bits/s: 10mbit, 512kbit, 1gbit, 64000
            | limit                                 VALUE: frames queued per direction (default 1000)
            | limit-bytes                           VALUE: bytes queued per direction: 4M, 64K (default 8M)

Items without a DIR prefix apply to the directions named by `dir=`
(default both), wherever `dir=` stands; `tx.`/`rx.` items override them for
one direction. Without `seed=` a random seed is chosen and shown by
`vhostnet fault show`, so a run can be repeated with it. Every mistake is
a FaultSpecError whose message names the item and says what was expected.
"""
from __future__ import annotations

import dataclasses
import random
import re

__all__ = ["DirFaults", "FaultSpec", "FaultSpecError", "parse", "GRAMMAR", "EXAMPLES"]

#: Longest delay (and jitter) accepted: frames wait in memory for that long.
MAX_DELAY = 10.0
#: Frames one direction may hold (delayed, rate-limited, held for reordering); netem's default limit.
DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000
#: Bytes one direction may hold: at 64 KiB TSO frames, 128 of them.
DEFAULT_LIMIT_BYTES = 8 << 20
MAX_LIMIT_BYTES = 256 << 20
#: Slowest rate accepted, in bits/s: below this a single frame waits seconds.
MIN_RATE = 8000
MAX_SEED = 2 ** 63 - 1

GRAMMAR = """\
fault SPEC: comma-separated KEY=VALUE items, or "none"
  loss=P  dup=P  reorder=P  corrupt=P   probability per frame: 5% or 0.05
  delay=TIME  jitter=TIME               20ms, 1.5s, 500us (at most 10 s); jitter is
                                        uniform in +-TIME and never reorders
  rate=BITS                             link rate in bits/s: 10mbit, 512kbit, 1gbit
  limit=N  limit-bytes=SIZE             frames/bytes queued per direction (1000, 8M);
                                        beyond them frames are dropped and counted
  seed=N                                repeatable runs (default: random, shown by show)
  dir=tx|rx|both                        where unprefixed items apply (default both);
                                        tx = guest -> stack, rx = stack -> guest
  tx.KEY=VALUE  rx.KEY=VALUE            one direction only"""

EXAMPLES = """\
  loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1,dir=both
  rate=10mbit,delay=50ms
  dir=rx,corrupt=1%
  tx.loss=10%,rx.delay=100ms,seed=7"""


class FaultSpecError(ValueError):
    """A bad fault spec; the message is for the user."""


@dataclasses.dataclass(frozen=True)
class DirFaults:
    """The faults of one direction. Probabilities are fractions, times seconds, rate bits/s."""
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    rate: int = 0           # 0: no limit
    limit: int = DEFAULT_LIMIT
    limit_bytes: int = DEFAULT_LIMIT_BYTES

    @property
    def active(self) -> bool:
        return bool(self.loss or self.dup or self.reorder or self.corrupt or self.delay
                    or self.jitter or self.rate)

    def items(self) -> list[str]:
        """KEY=VALUE for each field that differs from the default, in grammar order."""
        out = []
        for key in ("loss", "dup", "reorder", "corrupt"):
            v = getattr(self, key)
            if v:
                out.append(f"{key}={_fmt_pct(v)}")
        for key in ("delay", "jitter"):
            v = getattr(self, key)
            if v:
                out.append(f"{key}={_fmt_time(v)}")
        if self.rate:
            out.append(f"rate={_fmt_rate(self.rate)}")
        if self.limit != DEFAULT_LIMIT:
            out.append(f"limit={self.limit}")
        if self.limit_bytes != DEFAULT_LIMIT_BYTES:
            out.append(f"limit-bytes={_fmt_size(self.limit_bytes)}")
        return out

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    tx: DirFaults = DirFaults()
    rx: DirFaults = DirFaults()
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.tx.active or self.rx.active

    def __str__(self) -> str:
        tx, rx = self.tx.items(), self.rx.items()
        if not tx and not rx:
            return "none"
        if tx == rx:
            body = tx
        elif not rx:
            body = tx + ["dir=tx"]
        elif not tx:
            body = rx + ["dir=rx"]
        else:
            body = [f"tx.{i}" for i in tx] + [f"rx.{i}" for i in rx]
        return ",".join(body + [f"seed={self.seed}"])


_FIELDS = {f.name: f for f in dataclasses.fields(DirFaults)}
_KEYS = {"loss": "loss", "dup": "dup", "reorder": "reorder", "corrupt": "corrupt",
         "delay": "delay", "jitter": "jitter", "rate": "rate", "limit": "limit",
         "limit-bytes": "limit_bytes"}


def parse(text: str, *, rng: random.Random | None = None) -> FaultSpec:
    """A FaultSpec from TEXT (see GRAMMAR), or FaultSpecError."""
    text = text.strip()
    if not text:
        raise FaultSpecError('empty fault spec; give KEY=VALUE items, e.g. "loss=5%,delay=20ms", or "none"')
    if text == "none":
        return FaultSpec(seed=0)
    common: dict = {}
    per = {"tx": {}, "rx": {}}
    seed = None
    dirs = ("tx", "rx")
    seen: set = set()
    for item in text.split(","):
        item = item.strip()
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key or not value:
            raise FaultSpecError(f"{item!r}: expected KEY=VALUE, e.g. loss=5%")
        if key in seen:
            raise FaultSpecError(f"{key!r} is given twice")
        seen.add(key)
        if key == "seed":
            seed = _int(key, value, 0, MAX_SEED)
            continue
        if key == "dir":
            v = value.lower()
            if v not in ("tx", "rx", "both"):
                raise FaultSpecError(f"dir={value}: expected tx (guest -> stack), rx (stack -> guest) or both")
            dirs = ("tx", "rx") if v == "both" else (v,)
            continue
        where, dot, name = key.partition(".")
        if not dot:
            where, name = None, key
        elif where not in per:
            raise FaultSpecError(f"{key!r}: a direction prefix is tx. or rx., not {where}.")
        field = _KEYS.get(name)
        if field is None:
            raise FaultSpecError(f"unknown fault {name!r}; known: {', '.join(_KEYS)}, seed, dir")
        (per[where] if where else common)[field] = _value(name, value)
    spec_dirs = {}
    for d in ("tx", "rx"):
        values = dict(common) if d in dirs else {}
        values.update(per[d])
        spec_dirs[d] = DirFaults(**values)
    if seed is None:
        seed = (rng or random.SystemRandom()).randrange(1 << 31)
    return FaultSpec(tx=spec_dirs["tx"], rx=spec_dirs["rx"], seed=seed)


def _value(name: str, value: str):
    if name in ("loss", "dup", "reorder", "corrupt"):
        return _probability(name, value)
    if name in ("delay", "jitter"):
        return _time(name, value)
    if name == "rate":
        return _rate(value)
    if name == "limit":
        return _int(name, value, 1, MAX_LIMIT)
    return _size(name, value)


_NUM = r"(\d+(?:\.\d*)?|\.\d+)"


def _probability(name: str, value: str) -> float:
    m = re.fullmatch(_NUM + r"\s*(%?)", value)
    if not m:
        raise FaultSpecError(f"{name}={value}: expected a probability such as 5% or 0.05")
    p = float(m.group(1)) / (100 if m.group(2) else 1)
    if m.group(2) and p > 1:
        raise FaultSpecError(f"{name}={value}: a probability is between 0 and 100%")
    if p > 1:
        raise FaultSpecError(f"{name}={value}: a fraction is between 0 and 1; for a percentage write {value}%")
    return p


_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def _time(name: str, value: str) -> float:
    m = re.fullmatch(_NUM + r"\s*([a-z]*)", value.lower())
    if not m or m.group(2) not in _TIME_UNITS:
        raise FaultSpecError(f"{name}={value}: expected a time with its unit, such as 20ms, 1.5s or 500us")
    t = float(m.group(1)) * _TIME_UNITS[m.group(2)]
    if t > MAX_DELAY:
        raise FaultSpecError(f"{name}={value}: at most {MAX_DELAY:g} s")
    return t


_RATE_UNITS = {"": 1, "bit": 1, "k": 10**3, "kbit": 10**3, "m": 10**6, "mbit": 10**6,
               "g": 10**9, "gbit": 10**9}


def _rate(value: str) -> int:
    v = value.lower().replace("/s", "")
    m = re.fullmatch(_NUM + r"\s*([a-z]*)", v)
    if m and m.group(2).endswith(("bps", "byte", "b")) and m.group(2) not in _RATE_UNITS:
        raise FaultSpecError(f"rate={value}: rates are in bits per second (10mbit, 512kbit), "
                             f"not bytes: write 8 times the number with 'bit'")
    if not m or m.group(2) not in _RATE_UNITS:
        raise FaultSpecError(f"rate={value}: expected bits per second such as 10mbit, 512kbit, 1gbit or 64000")
    r = int(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if r and r < MIN_RATE:
        raise FaultSpecError(f"rate={value}: at least {MIN_RATE} bit/s (0 means no limit)")
    return r


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20}


def _size(name: str, value: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([a-z]*)", value.lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise FaultSpecError(f"{name}={value}: expected a size in bytes such as 65536, 64K or 8M")
    n = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if not 1514 <= n <= MAX_LIMIT_BYTES:
        raise FaultSpecError(f"{name}={value}: between one frame (1514 bytes) and {MAX_LIMIT_BYTES >> 20}M")
    return n


def _int(name: str, value: str, lo: int, hi: int) -> int:
    if not re.fullmatch(r"\d+", value):
        raise FaultSpecError(f"{name}={value}: expected a whole number")
    n = int(value)
    if not lo <= n <= hi:
        raise FaultSpecError(f"{name}={value}: between {lo} and {hi}")
    return n


def _fmt_pct(p: float) -> str:
    return f"{p * 100:.6g}%"


def _fmt_time(t: float) -> str:
    if t >= 1 and (t * 1000) % 1000 == 0:
        return f"{t:g}s"
    ms = t * 1e3
    if abs(ms - round(ms, 3)) < 1e-9 and ms >= 1:
        return f"{round(ms, 3):g}ms"
    return f"{round(t * 1e6, 3):g}us"


def _fmt_rate(r: int) -> str:
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if r % mult == 0:
            return f"{r // mult}{unit}"
    return str(r)


def _fmt_size(n: int) -> str:
    for unit, shift in (("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
