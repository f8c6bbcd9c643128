"""The control socket's `fault` request and the fault parts of `stats`.

    -> {"cmd": "fault", "op": "show"}
    -> {"cmd": "fault", "op": "set", "spec": "loss=5%,delay=20ms,seed=1"}
    -> {"cmd": "fault", "op": "clear"}
    <- {"ok": true, "result": <fault document>}      (docs/json.md, "fault")

`set` replaces the whole spec (what `show` prints is what is in force);
the spec text is parsed here again, whatever the client checked. The
settings belong to the backend, so they can be set before QEMU connects
and stay across reconnects; the counters belong to the current connection.
These functions run in the backend between two steps of the data path and
only read state, except `set`/`clear`, which swap one immutable spec.
"""
from __future__ import annotations

from vhostnet.link import LinkSettings, layers
from vhostnet.link.faults import FaultInjector
from vhostnet.link.spec import FaultSpecError, parse

__all__ = ["FaultRequestError", "fault_request", "fault_doc", "stats_faults", "injector_of"]

VERSION = 1
#: Longest spec text accepted over the socket (the grammar needs a few dozen bytes).
MAX_SPEC = 1024


class FaultRequestError(Exception):
    """A bad `fault` request; the message is for the user."""


def injector_of(device) -> FaultInjector | None:
    """The fault layer among DEVICE's link layers, if it has one."""
    for layer in layers(getattr(device, "link", None)):
        if isinstance(layer, FaultInjector):
            return layer
    return None


def stats_faults(device) -> dict | None:
    """The `faults` object of the stats document: spec and counters of this connection."""
    inj = injector_of(device)
    return None if inj is None else inj.snapshot()


def fault_doc(link: LinkSettings, server) -> dict:
    spec = link.faults.spec
    conn = server.current
    inj = injector_of(conn.device) if conn is not None else None
    snap = inj.snapshot() if inj is not None else None
    return {
        "version": VERSION,
        "spec": str(spec),
        "active": spec.active,
        "seed": spec.seed,
        "changes": link.faults.changes,
        "directions": {"tx": spec.tx.to_json(), "rx": spec.rx.to_json()},
        "connected": conn is not None,
        "counters": None if snap is None else {"tx": snap["tx"], "rx": snap["rx"]},
    }


def fault_request(link: LinkSettings | None, server, req: dict) -> dict:
    if link is None:
        raise FaultRequestError("this backend was built without link layers: no fault injection")
    op = req.get("op", "show")
    if op == "set":
        text = req.get("spec")
        if not isinstance(text, str) or len(text) > MAX_SPEC:
            raise FaultRequestError(f'"spec" must be a string of at most {MAX_SPEC} characters')
        try:
            link.faults.set(parse(text))
        except FaultSpecError as e:
            raise FaultRequestError(f"bad fault spec: {e}") from None
    elif op == "clear":
        link.faults.clear()
    elif op != "show":
        raise FaultRequestError(f'unknown fault op {op!r}; known: "show", "set", "clear"')
    return fault_doc(link, server)
