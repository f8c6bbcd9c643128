"""`vhostnet check`: the driver-conformance report of a running backend.

Every refusal and every tolerated mistake of the connected driver is a
finding (vhostnet/virtio/findings.py): a rule with its virtio 1.2 section,
counted per queue, with the first example kept. This module gathers them
from the current connection (each queue's, plus the device-wide ones such
as the features SET_FEATURES took), orders them MUST first, and renders
them as the control socket's `check` document (docs/json.md, "check") or
as text grouped MUST / SHOULD.

Exit status of the command, so a driver's CI can gate on it: 1 when there
is any MUST finding, 0 when there is none (SHOULD findings are reported
but pass), 3 when the backend runs but no QEMU is connected, 1 when no
backend answers.

vhostnet/launch/cli.py adds the sub-command with `add_check_command`;
vhostnet/observe/control.py answers `{"cmd": "check"}` with `check_doc`.
"""
from __future__ import annotations

import argparse
import json
import sys

from vhostnet.virtio.findings import MUST, SHOULD, SPEC

__all__ = ["connection_findings", "check_doc", "check_text", "add_check_command", "add_strict_option",
           "EXIT_MUST"]

VERSION = 1
#: Exit status when the driver broke a MUST rule.
EXIT_MUST = 1
_LEVEL_ORDER = {MUST: 0, SHOULD: 1}

EPILOG_CHECK = """\
Each finding names the virtio 1.2 rule the connected driver broke: its
section, MUST or SHOULD, how often, and the first time in detail (queue,
descriptor ids, addresses, what was expected and what was seen). The
device tolerates what it can (`vhostnet serve --strict` breaks the ring at
the first MUST instead). Entries made available without a kick are found
by the safety poll (`unkicked` in `vhostnet stats`); a missed kick becomes
a finding after 1 s, unless the driver's kick was only late.

Exit status: 0 no MUST finding (SHOULD findings pass); 1 a MUST finding
(or no backend answers); 3 the backend runs but no QEMU is connected.

examples:
  vhostnet check
  vhostnet check --json | jq '.findings[] | select(.level == "MUST")'
  vhostnet check || echo "the driver broke the spec"
"""


def connection_findings(backend) -> list[dict]:
    """Every finding of a connection's backend, MUST first, then by queue and first seen."""
    out = []
    sources = [(None, "device", backend.findings)] + [(q.index, q.name, q.findings) for q in backend.queues]
    for index, name, findings in sources:
        for f in findings.by_id.values():
            r = f.rule
            out.append({"rule": r.id, "section": r.section, "level": r.level, "spec": SPEC,
                        "message": r.message, "queue": index, "queue_name": name,
                        "count": f.count, "example": dict(f.first)})
    out.sort(key=lambda f: _LEVEL_ORDER.get(f["level"], 2))   # stable: queue order, then first seen
    return out


def check_doc(server) -> dict:
    """The `check` document: the findings of the connected driver."""
    conn = server.current
    if conn is None:
        return {"version": VERSION, "connected": False}
    found = connection_findings(conn.backend)
    must = sum(1 for f in found if f["level"] == MUST)
    return {
        "version": VERSION, "connected": True, "spec": SPEC,
        "strict": server.strict,
        "must": must, "should": len(found) - must,
        "findings": found,
        "unkicked": {q.name: q.stats.get("unkicked", 0) for q in conn.backend.queues},
        "broken": {q.name: q.broken for q in conn.backend.queues if q.broken is not None},
    }


def check_text(doc: dict) -> str:
    if not doc["connected"]:
        return "no QEMU connected"
    lines = []
    found = doc["findings"]
    if not found:
        lines.append(f"no findings: the driver broke no {doc['spec']} rule the device can observe")
    for level in (MUST, SHOULD):
        group = [f for f in found if f["level"] == level]
        if not group:
            continue
        lines.append(f"{level} ({len(group)} rule(s) broken)")
        for f in group:
            lines.append(f"  {f['rule']}  §{f['section']}  {f['queue_name']}  x{f['count']}")
            lines.append(f"      {f['message']}")
            ex = dict(f["example"])
            detail = ex.pop("detail", None)
            if detail:
                lines.append(f"      first: {detail}")
            if ex:
                lines.append("      " + ", ".join(f"{k}={_short(v)}" for k, v in ex.items()))
    unk = {k: v for k, v in doc.get("unkicked", {}).items() if v}
    if unk:
        lines.append("found by the safety poll without a kick: "
                     + ", ".join(f"{k} {v} entr{'y' if v == 1 else 'ies'}" for k, v in unk.items()))
    for name, why in doc.get("broken", {}).items():
        lines.append(f"ring {name} is broken ({why}) until the driver restarts it")
    return "\n".join(lines)


def _short(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0xFFFF:
        return hex(v)
    return str(v)


def add_strict_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true",
                   help="fail fast: a MUST violation by the driver breaks that ring (and signals "
                        "QEMU's error eventfd) until the driver restarts it; `vhostnet check` names it")


def add_check_command(sub, commands: dict, add_client_options) -> None:
    c = sub.add_parser("check", help="report the spec violations of the connected driver",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_CHECK,
                       description="The driver-conformance report: every virtio 1.2 driver requirement "
                                   "the device observed broken, grouped MUST / SHOULD.")
    c.add_argument("--json", action="store_true", help='print the JSON document (docs/json.md, "check")')
    add_client_options(c)
    commands["check"] = cmd_check


def cmd_check(args) -> int:
    from vhostnet.launch.cli import EXIT_NO_QEMU, _control_path, _fail
    from vhostnet.observe.control import ControlClient, ControlError
    try:
        with ControlClient(_control_path(args)) as c:
            doc = c.request("check")
    except ControlError as e:
        return _fail(str(e))
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(check_text(doc))
    if not doc["connected"]:
        return EXIT_NO_QEMU
    return EXIT_MUST if doc["must"] else 0
