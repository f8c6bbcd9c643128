"""`vhostnet fault set|clear|show` and `serve/run --fault SPEC`.

vhostnet/launch/cli.py calls `add_fault_option` for the backend options
and `add_fault_command` for the sub-command; everything else about faults
on the command line is here. A spec is checked by the client before it is
sent (a bad one exits 2 with the grammar's words), and again by the backend.
"""
from __future__ import annotations

import argparse
import json
import sys

from vhostnet.link.faults import COUNTERS
from vhostnet.link.spec import EXAMPLES, GRAMMAR, FaultSpec, FaultSpecError, parse

__all__ = ["add_fault_option", "add_fault_command", "fault_text"]

EPILOG_FAULT = f"""\
{GRAMMAR}

Per frame, in this order: loss, duplication, corruption, the queue limit, the
rate limit, delay and jitter, reordering. A corrupted frame has its checksum
completed (a TSO frame is cut into segments, one corrupted) before one bit
flips, so the receiver's IP or TCP/UDP checksum check fails. With TSO a
64 KiB segment is one frame for loss/dup/reorder (serve --disable-feature
offloads for per-packet behaviour). `set` replaces the whole spec; frames
already delayed keep their times. Counters are in `vhostnet stats` too;
`vhostnet capture --at stack` records frames on the stack's side of the
fault layer.

examples:
{EXAMPLES.replace("  ", "  vhostnet fault set ", )}
  vhostnet fault show
  vhostnet fault show --json | jq .counters.tx.lost
  vhostnet fault clear
  vhostnet serve --fault loss=5%,reorder=2%,delay=20ms,jitter=5ms,seed=1,dir=both
"""


def _spec_arg(text: str) -> FaultSpec:
    try:
        return parse(text)
    except FaultSpecError as e:
        raise argparse.ArgumentTypeError(f"{e} (grammar: vhostnet fault --help)") from None


def add_fault_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fault", type=_spec_arg, default=FaultSpec(), metavar="SPEC",
                   help="make the link bad on purpose from the start, e.g. "
                        "loss=5%%,reorder=2%%,delay=20ms,jitter=5ms,seed=1,dir=both; "
                        "grammar in `vhostnet fault --help`; change it live with `vhostnet fault set`")


def add_fault_command(sub, commands: dict, add_client_options) -> None:
    f = sub.add_parser("fault", help="set, clear or show link fault injection on a running backend",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_FAULT,
                       usage="vhostnet fault {set SPEC | clear | show} [--json] [--control PATH | --socket PATH]",
                       description="Loss, duplication, reordering, corruption, delay with jitter and a "
                                   "rate limit on the link between the guest and the stack, per "
                                   "direction, seeded so a run repeats.")
    f.add_argument("op", choices=["set", "clear", "show"], help="what to do")
    f.add_argument("spec", nargs="?", metavar="SPEC", help="with set: the faults (see below)")
    f.add_argument("--json", action="store_true", help="print the JSON document (docs/json.md, \"fault\")")
    add_client_options(f)
    commands["fault"] = cmd_fault


def cmd_fault(args) -> int:
    from vhostnet.launch.cli import _control_path, _fail
    from vhostnet.observe.control import ControlClient, ControlError
    req = {"op": args.op}
    if args.op == "set":
        if args.spec is None:
            return _fail("fault set needs a SPEC, e.g. `vhostnet fault set loss=5%,delay=20ms` "
                         "(grammar: vhostnet fault --help)", 2)
        try:
            parse(args.spec)
        except FaultSpecError as e:
            return _fail(f"bad fault spec: {e} (grammar: vhostnet fault --help)", 2)
        req["spec"] = args.spec
    elif args.spec is not None:
        return _fail(f"fault {args.op} takes no SPEC (did you mean `vhostnet fault set {args.spec}`?)", 2)
    try:
        with ControlClient(_control_path(args)) as c:
            doc = c.request("fault", **req)
    except ControlError as e:
        return _fail(str(e))
    print(json.dumps(doc, indent=2) if args.json else fault_text(doc))
    return 0


def _pct(n: int, of: int) -> str:
    return f"{n} ({100 * n / of:.1f}%)" if of and n else str(n)


_SETTINGS = (("loss", "pct"), ("dup", "pct"), ("reorder", "pct"), ("corrupt", "pct"),
             ("delay", "time"), ("jitter", "time"), ("rate", "rate"), ("limit", "int"),
             ("limit_bytes", "int"))
_RATED = {"lost", "duplicated", "corrupted", "reordered"}


def _setting(v, kind: str) -> str:
    if kind == "pct":
        return f"{v * 100:g}%" if v else "-"
    if kind == "time":
        return f"{v * 1000:g} ms" if v else "-"
    if kind == "rate":
        return f"{v / 1e6:g} Mbit/s" if v else "-"
    return str(v)


def fault_text(doc: dict) -> str:
    out = [f"faults: {doc['spec']}" + ("" if doc["active"] else " (the link is clean)")]
    d = doc["directions"]
    if doc["active"]:
        out.append(f"  {'':<14}{'tx (guest->stack)':>20}{'rx (stack->guest)':>20}")
        for key, kind in _SETTINGS:
            out.append(f"  {key:<14}{_setting(d['tx'][key], kind):>20}{_setting(d['rx'][key], kind):>20}")
    c = doc["counters"]
    if c is None:
        out.append("no QEMU connected: no counters")
        return "\n".join(out)
    out.append(f"counters of this connection{'':<4}{'tx':>18}{'rx':>18}")
    for key in COUNTERS + ("queued", "queued_bytes"):
        tx, rx = c["tx"].get(key, 0), c["rx"].get(key, 0)
        if key in _RATED:
            tx, rx = _pct(tx, c["tx"]["frames"]), _pct(rx, c["rx"]["frames"])
        out.append(f"  {key:<29}{tx:>18}{rx:>18}")
    return "\n".join(out)


if __name__ == "__main__":   # pragma: no cover
    sys.exit("use: vhostnet fault ...")
