"""What `inspect`, `inspect --desc` and `stats` report: JSON documents built from a live server.

These functions run inside the backend (the control socket calls them
between two steps of the data path) and only read state: the backend's
`describe()`, each virtqueue's `describe()` and `describe_chain()`, the
device counters and `Stack.snapshot()`. Field by field, the documents are
described in docs/json.md; tests/test_control.py holds the code to that
page. Text rendering for people lives in vhostnet/render.py.

Bounded, since a hostile driver controls what is read: a descriptor dump
lists at most MAX_CHAIN_DESCS + 1 descriptors (an indirect table is entered
only if the device would accept its length) and reads at most MAX_DUMP bytes
of guest memory, however long the chain claims to be; the avail-ring scan
looks at most at one queue's worth of entries, once per request; finding a
merged RX frame's first buffer looks back at most MERGE_SCAN used entries.
"""
from __future__ import annotations

import os
import time

from stack import native
from vhostnet import native as express_native
from stack.services.network import disabled_snapshot
from vhostnet.hostnet.dns import DnsForwarder
from vhostnet.link.control import stats_faults
from vhostnet.observe import decode
from vhostnet.virtio import features as F
from vhostnet.virtio.ring import MAX_CHAIN_DESCS
from vhostnet.vhostuser.memory import OutOfBounds
from vhostnet.vhostuser.protocol import PROTOCOL_FEATURE_NAMES

__all__ = ["inspect_doc", "desc_doc", "stats_doc", "VERSION", "MAX_DUMP"]

VERSION = 1
MAX_DUMP = 12 + 14 + 65535  # virtio-net header + the largest frame
# Used entries looked back through for a merged frame's first buffer: a
# frame's num_buffers never exceeds the descriptors one frame may take.
MERGE_SCAN = MAX_CHAIN_DESCS
_FRAME_COUNTERS = ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes")


class ReportError(Exception):
    """A request about something that is not there (no QEMU, no such queue)."""


def _backend_info(server, control=None) -> dict:
    return {
        "pid": os.getpid(),
        "socket": server.socket_path,
        "control": getattr(control, "path", None),
        "uptime": round(time.monotonic() - control.started, 3) if control else None,
        "connections": server.connections,
        "log_suppressed": server.rlog.suppressed_total + (
            server.current.device.rlog.suppressed_total if server.current else 0),
        "taps": len(server.taps) + len(getattr(getattr(control, "link", None), "stack_taps", ())),
        "control_errors": control.internal_errors if control else 0,
        "native": native.describe(),
        "express": express_native.describe(),
        "cpus": sorted(os.sched_getaffinity(0)),
    }


def _bits(value: int, table) -> dict:
    return {"value": value, "hex": f"{value:#x}", "names": F.names(value, table)}


def _addr(q: dict, which: str) -> dict:
    return {"guest": q[f"{which}_guest_addr"], "qemu": q[f"{which}_user_addr"]}


def _queue(q: dict) -> dict:
    return {
        "index": q["index"], "name": q["name"], "pair": q["index"] >> 1, "size": q["size"],
        "started": q["started"], "enabled": q["enabled"], "broken": q["broken"],
        "desc": _addr(q, "desc"), "avail": _addr(q, "avail"), "used": _addr(q, "used"),
        "avail_idx": q["avail_idx"], "used_idx": q["guest_used_idx"],
        "last_avail_idx": q["last_avail_idx"], "next_used_idx": q["used_idx"],
        "pending": q["pending"], "in_flight": q["in_flight"],
        "rx_buffers_posted": q["pending"] if q["name"].startswith("rx") else None,
        "kicks": q["kicks"], "calls": q["calls"], "calls_suppressed": q["calls_suppressed"],
        "calls_late_suppressed": q["calls_late_suppressed"],
        "chains": q["chains"], "bytes": q["bytes"], "unkicked": q["unkicked"],
        "event_idx": q["event_idx"], "avail_flags": q["avail_flags"], "used_flags": q["used_flags"],
        "used_event": q["used_event"], "avail_event": q["avail_event"],
        "kick": "polled" if q["kick_polled"] else ("eventfd" if q["kick_fd"] is not None else None),
        "call": "eventfd" if q["call_fd"] is not None else None,
        "errors": q["errors"],
        "findings": q["findings"],
        # split or packed; a packed ring's state is its positions and wrap
        # counters and the two event suppression structures (virtio 1.2 §2.8).
        "format": q.get("format", "split"),
        **({k: q[k] for k in ("avail_wrap_counter", "used_wrap_counter", "driver_event", "device_event")}
           if q.get("format") == "packed" else {}),
    }


def _queue_pairs(conn) -> dict:
    """Multiqueue: the pairs served, which are in use (both rings enabled), and the steering map."""
    dev, queues = conn.device, conn.backend.queues
    pairs = getattr(dev, "queue_pairs", 1)
    steering = getattr(dev, "steering", None)
    return {"served": pairs,
            "enabled": [k for k in range(pairs) if queues[2 * k].enabled and queues[2 * k + 1].enabled],
            "rx_pending": [len(d) for d in getattr(dev, "rx_pendings", [dev.rx_pending])],
            "steering": steering.describe() if steering is not None else None}


def _ring_heads(vq) -> dict:
    """Descriptor ids worth a `--desc` look: the newest used element, the next avail entry."""
    out = {"last_used": None, "next_avail_head": None}
    if vq.packed:
        # Ring positions: what `inspect --desc` takes for a packed ring.
        pos = vq.last_used_position()
        used = vq.used_entry(pos) if pos is not None else None
        if used is not None:
            out["last_used"] = {"idx": pos, "id": used[0], "len": used[1]}
        if vq.pending():
            out["next_avail_head"] = vq.avail_entry(vq.last_avail_idx)
        return out
    idx = (vq.guest_used_idx() - 1) & 0xFFFF
    used = vq.used_entry(idx)
    if used is not None:
        out["last_used"] = {"idx": idx, "id": used[0], "len": used[1]}
    if vq.pending():
        out["next_avail_head"] = vq.avail_entry(vq.last_avail_idx)
    return out


def inspect_doc(server, control=None) -> dict:
    doc = {"version": VERSION, "backend": _backend_info(server, control)}
    conn = server.current
    if conn is None:
        doc["connected"] = False
        return doc
    b = conn.backend
    d = b.describe()
    dev = conn.device.describe()
    doc.update({
        "connected": True,
        "features": {"offered": _bits(b.offered_features, F.FEATURE_NAMES),
                     "negotiated": _bits(d["features"], F.FEATURE_NAMES)},
        "protocol_features": {"offered": _bits(b.offered_protocol_features, PROTOCOL_FEATURE_NAMES),
                              "negotiated": _bits(d["protocol_features"], PROTOCOL_FEATURE_NAMES)},
        "owner": d["owner"], "mtu": d["mtu"],
        "hdr_len": dev["hdr_len"], "mergeable_rx_buffers": dev["mergeable_rx_buffers"],
        "offloads": dev["offloads"], "rx_pending": dev["rx_pending"],
        "queue_pairs": _queue_pairs(conn),
        "memory": d["memory"],
        "queues": [{**_queue(q), **_ring_heads(vq)} for q, vq in zip(d["queues"], b.queues)],
        "requests": d["requests"], "request_errors": d["errors"],
        "messages": conn.messages,
        "loop": conn.describe_loop(),
    })
    return doc


# -- one descriptor chain -------------------------------------------------------

def _chain_bytes(mem, descs: list[dict], writable: bool) -> tuple[bytes, bool]:
    """Concatenated buffers of one kind (device-readable or -writable), bounded."""
    out = bytearray()
    for d in descs:
        if d["flags"] & 4 or bool(d["flags"] & 2) != writable or not d["in_guest_memory"]:
            continue
        want = min(d["len"], MAX_DUMP - len(out))
        if want <= 0:
            return bytes(out), True
        try:
            for v in mem.gpa_views(d["addr"], want):
                out += v
        except OutOfBounds:
            continue
    total = sum(d["len"] for d in descs if not d["flags"] & 4 and bool(d["flags"] & 2) == writable)
    return bytes(out), total > len(out)


def desc_doc(server, queue: int, head: int) -> dict:
    conn = server.current
    if conn is None:
        raise ReportError("no QEMU is connected")
    queues = conn.backend.queues
    if not 0 <= queue < len(queues):
        raise ReportError(f"no queue {queue}; this device has {len(queues)} "
                          f"({', '.join(f'{q.index}={q.name}' for q in queues)})")
    vq = queues[queue]
    if not vq.mapped or vq.mem is None:
        raise ReportError(f"queue {queue} ({vq.name}) is not set up: no ring mapped yet")
    if not 0 <= head < vq.num:
        raise ReportError(f"descriptor {head} is out of range: queue {queue} has size {vq.num}")
    descs = vq.describe_chain(head)
    truncated = vq.chain_truncated(descs)
    for d in descs:
        d.pop("more", None)
        d["flag_names"] = decode.desc_flags(d["flags"]).split("|") if d["flags"] else []
    hdr_len = conn.device.hdr_len
    readable, rtrunc = _chain_bytes(vq.mem, descs, writable=False)
    writable, wtrunc = _chain_bytes(vq.mem, descs, writable=True)
    posted = vq.posted()
    pending = posted.get(head, [])
    used = _last_used(vq, head)
    doc = {
        "version": VERSION, "queue": queue, "name": vq.name, "head": head, "size": vq.num,
        "descriptors": descs,
        "descriptors_truncated": truncated,
        "refusal": vq.chain_refusal(head),
        "readable_bytes": sum(d["len"] for d in descs if not d["flags"] & 6),
        "writable_bytes": sum(d["len"] for d in descs if d["flags"] & 2 and not d["flags"] & 4),
        "pending_in_avail_ring": pending,
        "last_used": used,
        "source": None, "note": None, "vnet_hdr": None, "frame": None,
    }
    # A TX chain carries its frame in the device-readable part. An RX
    # buffer holds what the device last wrote there (the used ring says how
    # much) until the driver posts the descriptor again, often pointing it
    # at a fresh buffer (Linux does): from then on the frame is gone.
    if readable:
        data, trunc, doc["source"] = readable, rtrunc, "readable"
        if not pending and used is not None:
            doc["note"] = (f"returned by the device at used ring idx {used['idx']}; the driver may "
                           f"have reused these buffers since")
    elif writable and used is not None and pending:
        doc["note"] = ("posted again by the driver, which may have pointed it at a fresh buffer: "
                       "what the device wrote last is not here any more (vhostnet capture records "
                       "RX frames)")
        return doc
    elif writable and used is not None:
        doc["source"] = "writable"
        part = _merged_frame(vq, used["idx"], posted) if conn.device.mrg else None
        if conn.device.mrg and part is None:
            doc["note"] = ("with MRG_RXBUF a frame may span several buffers, and which frame this one "
                           "belongs to cannot be told: its neighbours in the used ring were posted again")
            return doc
        if part is not None and part["first"] != used["idx"]:
            doc["note"] = (f"part {part['part'] + 1} of {part['buffers']} of a frame merged over "
                           f"several RX buffers: its header and start are in descriptor {part['first_id']} "
                           f"(used ring idx {part['first']})")
            return doc
        if part is not None and part["buffers"] > 1:
            data, trunc = _used_bytes(vq, part["first"], part["buffers"])
            doc["note"] = (f"as the device last wrote it: {part['buffers']} RX buffers from used ring "
                           f"idx {used['idx']} (MRG_RXBUF), {len(data)} bytes")
        else:
            data, trunc = writable[:used["len"]], wtrunc and used["len"] > len(writable)
            doc["note"] = f"as the device last wrote it (used ring idx {used['idx']}, {used['len']} bytes)"
    else:
        doc["note"] = ("posted by the driver, not yet filled by the device" if writable and pending else
                       "no buffer inside guest memory" if not (readable or writable) else
                       "nothing written by the device within the last ring's worth of used entries")
        return doc
    doc["vnet_hdr"] = decode.vnet_hdr(data, hdr_len)
    frame = data[hdr_len:]
    doc["frame"] = {"len": len(frame), "truncated": trunc,
                    "summary": decode.summarize(frame) if frame else "(empty)",
                    "hex": frame[:256].hex()}
    return doc


def _used_entry(vq, idx: int) -> tuple[int, int]:
    return vq.used_entry(idx) or (0, 0)


def _used_bytes(vq, idx: int, count: int = 1) -> tuple[bytes, bool]:
    """What the device wrote into the buffers of COUNT used entries from IDX, bounded."""
    out = b""
    trunc = False
    for k in range(count):
        head, length = _used_entry(vq, (idx + k) & 0xFFFF)
        if head >= vq.num:
            break
        data, t = _chain_bytes(vq.mem, vq.describe_chain(head), writable=True)
        out += data[:length]
        trunc |= t and length > len(data)
        if len(out) >= MAX_DUMP:
            return out[:MAX_DUMP], True
    return out, trunc


def _num_buffers(vq, idx: int, posted) -> int | None:
    """num_buffers of the header at the start of used entry IDX's buffer
    (0 for a refused, zero-length entry: a boundary of its own)."""
    head, length = _used_entry(vq, idx)
    if length == 0:
        return 0
    if head >= vq.num or length < 12 or head in posted:
        return None   # posted again: the descriptor may point at a fresh buffer now
    first = vq.describe_chain(head, limit=1)[0]
    if not first["in_guest_memory"] or first["len"] < 12:
        return None
    try:
        return int.from_bytes(vq.mem.gpa_view(first["addr"] + 10, 2), "little")
    except OutOfBounds:
        return None


def _merged_frame(vq, idx: int, posted) -> dict | None:
    """With MRG_RXBUF: which frame the buffer at used entry IDX belongs to.

    The published used->idx is always a frame boundary (a frame's buffers
    are pushed together, then published). Walking back from a boundary B,
    the frame ending there starts at the nearest entry S whose header says
    num_buffers == B - S (a continuation buffer's payload matching that by
    chance is a 1 in 65536 event). Repeat until IDX's frame is found; stop
    at one ring's worth (older entries are overwritten) or MERGE_SCAN entries.
    """
    boundary = vq.guest_used_idx()
    back = (boundary - idx) & 0xFFFF
    window = min(vq.num, MERGE_SCAN)
    if not 0 < back <= window:
        return None
    while True:
        start = None
        for d in range(1, window + 1):
            nb = _num_buffers(vq, (boundary - d) & 0xFFFF, posted)
            if nb == d or (nb == 0 and d == 1):
                start = (boundary - d) & 0xFFFF
                break
        if start is None:
            return None
        if (boundary - idx) & 0xFFFF <= (boundary - start) & 0xFFFF:
            n = (boundary - start) & 0xFFFF
            return {"first": start, "first_id": _used_entry(vq, start)[0], "buffers": n,
                    "part": (idx - start) & 0xFFFF}
        window -= (boundary - start) & 0xFFFF
        boundary = start
        if window <= 0:
            return None


def _last_used(vq, head: int) -> dict | None:
    """The newest used ring entry (within one ring's worth) returning HEAD."""
    idx = vq.guest_used_idx()
    for _ in range(vq.num):
        idx = (idx - 1) & 0xFFFF
        used = vq.used_entry(idx)
        if used is None:
            return None
        if used[0] == head:
            return {"idx": idx, "len": used[1]}
    return None


# -- statistics -------------------------------------------------------------------

# `stats` lists at most this many TCP connections and NAT flows (the newest
# connections, the most recently active flows): listing every one of 1,000
# flows held the event loop ~100 ms. The totals are always given.
STATS_LISTED_MAX = 100

def stats_doc(server, control=None) -> dict:
    doc = {"version": VERSION, "time": time.time(), "backend": _backend_info(server, control),
           "capture": control.capture_stats() if control else None}
    hostnet = getattr(server, "hostnet", None)
    doc["forwards"] = hostnet.forwards.list() if hostnet is not None else []
    conn = server.current
    if conn is None:
        doc["connected"] = False
        return doc
    dev = conn.device
    c = dict(dev.counters)
    snap = dev.stack.snapshot(STATS_LISTED_MAX)
    sc = snap["counters"]
    doc.update({
        "connected": True,
        "device": {
            **{k: c.get(k, 0) for k in _FRAME_COUNTERS},
            "rx_pending": dev.rx_waiting(),
            "drops": {k: v for k, v in sorted(c.items()) if k not in _FRAME_COUNTERS},
        },
        "queue_pairs": _queue_pairs(conn),
        "queues": [{"name": q.name, "pair": q.index >> 1, "enabled": q.enabled, **q.stats,
                    "errors": dict(q.errors)} for q in conn.backend.queues],
        "loop": conn.describe_loop(),
        "faults": stats_faults(dev),
        "stack": {
            "drops": {k: v for k, v in sorted(sc.items()) if "drop" in k},
            "loopback_frames": sc.get("loopback_frames", 0),
            "counters": dict(sorted(sc.items())),
            "arp": snap["arp"], "udp": snap["udp"], "tcp": snap["tcp"],
            "tcp_total": snap["tcp_total"],
            "reassembly": snap["reassembly"],
        },
        "nat": _nat(dev, snap, sc),
        "services": _services(dev, snap),
    })
    return doc


def _nat(dev, snap: dict, counters: dict) -> dict | None:
    """NAT flows like `ss`, the flow counts and the proxy's own counters."""
    flows = dev.stack.flows
    if flows is None:
        return None
    proxy = getattr(dev, "proxy", None)
    return {"outbound": flows.config.outbound, "flows": snap["nat"], "flows_total": snap["nat_total"],
            "counts": flows.counts(),
            "limits": {"tcp": flows.config.max_tcp, "udp": flows.config.max_udp,
                       "icmp": flows.config.max_icmp, "half_open": flows.config.max_half_open},
            "counters": {k: v for k, v in sorted(counters.items()) if k.startswith("nat_")},
            "proxy": proxy.snapshot() if proxy is not None else None}


def _services(dev, snap) -> dict:
    """DHCP leases, DNS and TFTP counters from the stack, plus the upstream relay's."""
    svc = snap.get("services") or disabled_snapshot()
    fwd = getattr(dev, "dns", None)
    svc["dns"]["upstream"] = fwd.snapshot() if fwd is not None else {
        "upstreams": [], **dict.fromkeys(DnsForwarder.COUNTERS, 0)}
    return svc
