#!/usr/bin/env python3
"""path_trace.py: where one operation's time goes inside the backend.

    python3 scripts/bench_latency.py --path --tests udp,ping     # the segments, as a table
    python3 scripts/bench_latency.py --path --base /tmp/base     # two trees, side by side
    python3 scripts/path_trace.py --summarize TRACE [--json]     # a trace written before

Why (issue 12's latency work): twice a temporary build with timestamps
found where a round trip's time goes (docs/benchmarks.md, "The UDP express"
and "The critical path, segment by segment"). This makes that measurement
repeatable on any tree without editing it.

How: bench_latency.py --path starts the backend through this file instead
of `python -m vhostnet`. It wraps a few functions by name, stamps
time.perf_counter_ns() in each, then runs `vhostnet serve` as usual; at
exit the stamps go to the file named by $VHOSTNET_PATH_TRACE. The stamps:

  kick    a TX ring's kick is about to be read (Connection._kicked)
  frame   the TX drain is done with one frame (the UDP express's receive
          returned: for an express flow, the datagram was sent)
  spin    the wait for the host's answer starts (HostProxy.spin)
  answer  a relay took the host's answer (receive_one)
  call    an eventfd write to the frontend starts (NetDevice._signal)
  sleep   the kick hook goes into its epoll wait (the backend idles)

A kick's segments run to the next kick: kick -> first frame, -> spin,
spin -> answer, answer -> first call, kick -> first call, first -> last
call, last call -> sleep, and the sleep itself. Each wrapper is one Python
call more (about a microsecond on this machine), so absolute numbers are a
little long: compare trees measured the same way. A tree whose functions
were renamed stops at once, naming what it could not find.
Memory is bounded: at most MAX_STAMPS stamps are kept (the first ones).
"""
from __future__ import annotations

import argparse
import array
import atexit
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["KINDS", "install", "summarize", "segments", "load"]

KINDS = ("kick", "frame", "spin", "answer", "call", "sleep")
KICK, FRAME, SPIN, ANSWER, CALL, SLEEP = range(len(KINDS))
#: Stamps kept (16 bytes each): about a minute of back-to-back UDP round trips.
MAX_STAMPS = 4_000_000
ENV = "VHOSTNET_PATH_TRACE"
#: The segments reported, in order (name, what it is).
SEGMENTS = (
    ("kick->frame", "the kick read, the ring taken, the first frame handled (the express: sent)"),
    ("kick->spin", "up to the wait for the host's answer"),
    ("spin->answer", "the host's turn (its wake-up, its echo)"),
    ("answer->call", "the answer into the stack and the RX ring, up to the call's write"),
    ("kick->call", "the kick to the first call (the backend's critical path)"),
    ("call->call", "the first call to the last (RX, then TX)"),
    ("call->sleep", "the step's tail: after the last call until the hook sleeps"),
    ("sleep", "the idle wait until the next kick"),
)


class _Stamps:
    def __init__(self, limit: int = MAX_STAMPS):
        self.kind = array.array("b")
        self.t = array.array("q")
        self.limit = limit
        self.dropped = 0

    def mark(self, k: int) -> None:
        if len(self.t) < self.limit:
            self.kind.append(k)
            self.t.append(time.perf_counter_ns())
        else:
            self.dropped += 1

    def write(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(len(self.t).to_bytes(8, "little"))
            self.kind.tofile(f)
            self.t.tofile(f)


def load(path: str | Path) -> tuple[array.array, array.array]:
    """(kinds, times in ns) of a trace file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size != 8 + n * 9:       # the count, then n kinds (1 byte) and n times (8)
            raise ValueError(f"{size} bytes, not the {n} stamps its header says")
        kind, t = array.array("b"), array.array("q")
        kind.fromfile(f, n)
        t.fromfile(f, n)
    return kind, t


def _need(mod, name: str):
    obj = getattr(mod, name, None)
    if obj is None:
        raise SystemExit(f"path_trace: {mod.__name__}.{name} is not in this tree (renamed?); "
                         "update scripts/path_trace.py")
    return obj


def install(st: _Stamps) -> None:
    """Wrap the stamped functions of the vhostnet on sys.path."""
    from vhostnet.hostnet import datagram, express, proxy, tcp_relay
    from vhostnet.net import device
    from vhostnet.vhostuser import kick_hook, server
    mark = st.mark

    conn = _need(server, "Connection")
    kicked = _need(conn, "_kicked")

    def _kicked(self, q, fd, poll):
        if q.index & 1:
            mark(KICK)
        return kicked(self, q, fd, poll)
    conn._kicked = _kicked

    ux = _need(express, "UdpExpress")
    receiver = _need(ux, "receiver")

    def _receiver(self, stack_receive):
        inner = receiver(self, stack_receive)

        def receive(frame, now):
            inner(frame, now)
            mark(FRAME)
        return receive
    ux.receiver = _receiver

    hp = _need(proxy, "HostProxy")
    spin = _need(hp, "spin")

    def _spin(self):
        if self._asked:
            mark(SPIN)
        return spin(self)
    hp.spin = _spin

    for cls in (_need(datagram, "_DatagramRelay"), _need(tcp_relay, "TcpRelay")):
        one = _need(cls, "receive_one")

        def receive_one(self, _one=one):
            res = _one(self)
            if res is not False:
                mark(ANSWER)
            return res
        cls.receive_one = receive_one

    nd = _need(device, "NetDevice")
    signal_ = _need(nd, "_signal")

    def _signal(self, q):
        mark(CALL)
        return signal_(self, q)
    nd._signal = _signal

    kc = _need(kick_hook, "KickClock")
    setup = _need(kc, "_setup")

    class _Ep:
        """The hook's epoll, its wait stamped."""
        def __init__(self, ep):
            self._ep = ep

        def poll(self, *a):
            mark(SLEEP)
            return self._ep.poll(*a)

        def __getattr__(self, name):
            return getattr(self._ep, name)

    def _setup(self):
        ok = setup(self)
        if ok and self._ep is not None and not isinstance(self._ep, _Ep):
            self._ep = _Ep(self._ep)
        return ok
    kc._setup = _setup


def segments(kind, t) -> dict[str, list[int]]:
    """Each kick's segments (ns), by name (SEGMENTS)."""
    out: dict[str, list[int]] = {name: [] for name, _ in SEGMENTS}
    kicks = [i for i, k in enumerate(kind) if k == KICK]
    for a, b in zip(kicks, kicks[1:] + [len(kind)]):
        t0 = t[a]
        first: dict[int, int] = {}
        last_call = None
        sleep_after = None
        for i in range(a + 1, b):
            k = kind[i]
            if k == CALL:
                last_call = t[i]
                sleep_after = None
            elif k == SLEEP and last_call is not None and sleep_after is None:
                sleep_after = t[i]
            if k not in first:
                first[k] = t[i]
        if FRAME in first:
            out["kick->frame"].append(first[FRAME] - t0)
        if SPIN in first:
            out["kick->spin"].append(first[SPIN] - t0)
            if ANSWER in first and first[ANSWER] >= first[SPIN]:
                out["spin->answer"].append(first[ANSWER] - first[SPIN])
        if CALL in first:
            out["kick->call"].append(first[CALL] - t0)
            if ANSWER in first and first[CALL] >= first[ANSWER]:
                out["answer->call"].append(first[CALL] - first[ANSWER])
            out["call->call"].append(last_call - first[CALL])
            if sleep_after is not None:
                out["call->sleep"].append(sleep_after - last_call)
                if b < len(kind):
                    out["sleep"].append(t[b] - sleep_after)
    return out


def _pct(v: list[int], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))] / 1e3


def summarize(kind, t) -> dict[str, dict]:
    """Per segment: n, median and 90th percentile in µs (segments never seen are left out)."""
    return {name: {"n": len(v), "p50_us": round(_pct(v, 0.5), 1), "p90_us": round(_pct(v, 0.9), 1)}
            for name, v in segments(kind, t).items() if v}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--summarize"] or argv[:1] in (["-h"], ["--help"]):
        p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                    formatter_class=argparse.RawDescriptionHelpFormatter,
                                    epilog=__doc__.split("\n\n", 1)[1])
        p.add_argument("--summarize", type=Path, required=True, metavar="TRACE",
                       help="a trace file written by a backend run through this script")
        p.add_argument("--json", action="store_true", help="the summary as JSON")
        args = p.parse_args(argv)
        try:
            doc = summarize(*load(args.summarize))
        except (OSError, EOFError, ValueError) as e:
            p.error(f"{args.summarize}: not a trace ({e})")
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            for name, s in doc.items():
                print(f"{name:14} n={s['n']:7} p50 {s['p50_us']:8.1f} µs  p90 {s['p90_us']:8.1f} µs")
        return 0
    # As the backend: vhostnet's CLI with the wrappers in place.
    out = os.environ.get(ENV)
    if not out:
        print(f"path_trace: set {ENV} to the trace file to write (bench_latency.py --path does)",
              file=sys.stderr)
        return 2
    st = _Stamps()
    install(st)
    atexit.register(st.write, out)
    from vhostnet.launch.cli import main as vhostnet_main
    return vhostnet_main(argv)


if __name__ == "__main__":
    sys.exit(main())
