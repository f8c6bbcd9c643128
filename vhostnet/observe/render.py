"""Text for people from the JSON documents of vhostnet/observe/report.py.

The CLI gets a document over the control socket and prints either the
JSON itself (--json, for scripts; docs/json.md) or these renderings. The
functions take plain dicts, so they work on any backend version's answer
that has the documented fields, and never touch live state.
"""
from __future__ import annotations

from vhostnet.observe import decode

__all__ = ["inspect_text", "desc_text", "stats_text", "not_connected"]


# The fault layer's counters worth a line in `stats` (all of them: `vhostnet fault show`).
_FAULT_COUNTS = ("frames", "lost", "duplicated", "corrupted", "reordered", "delayed", "overflow", "queued")


def _hex(v) -> str:
    return "-" if v is None else f"{v:#x}"


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _kv(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) if d else "none"


def not_connected(doc: dict) -> str:
    b = doc["backend"]
    seen = b["connections"]
    return (f"backend pid {b['pid']} listens on {b['socket']}, but no QEMU is connected"
            + (f" (it has served {seen} connection{'s' * (seen != 1)} so far)." if seen else
               " (none has connected yet).")
            + "\nStart QEMU with the flags of `vhostnet qemu-args --socket " + b["socket"] + "`.")


def _pairs_text(qp: dict | None) -> list[str]:
    """Multiqueue: one line (nothing with one pair)."""
    if not qp or qp["served"] == 1:
        return []
    line = (f"queue pairs: {qp['served']} served, enabled {qp['enabled'] or 'none'}, "
            f"waiting for RX buffers per pair {qp['rx_pending']}")
    st = qp.get("steering")
    if st:
        line += (f"; steering: {st['flows']} flow(s), rx by flow {st['rx_by_flow']}, "
                 f"by hash {st['rx_by_hash']}, no flow {st['rx_no_flow']}")
    return [line]


def inspect_text(doc: dict, queue: int | None = None) -> str:
    if not doc["connected"]:
        return not_connected(doc)
    b = doc["backend"]
    out = [f"backend pid {b['pid']}, vhost-user socket {b['socket']}, connection {b['connections']}, "
           f"{doc['messages']} vhost-user messages"]
    for label, key in (("virtio features", "features"), ("vhost-user protocol", "protocol_features")):
        f = doc[key]
        out.append(f"{label}: {f['negotiated']['hex']} {' '.join(f['negotiated']['names']) or '(none)'}")
        missing = [n for n in f["offered"]["names"] if n not in f["negotiated"]["names"]]
        if missing:
            out.append(f"  offered, not taken: {' '.join(missing)}")
    off = ", ".join(k for k, v in doc["offloads"].items() if v) or "none"
    out.append(f"virtio-net header {doc['hdr_len']} bytes, mergeable RX buffers "
               f"{'yes' if doc['mergeable_rx_buffers'] else 'no'}, offloads: {off}; "
               f"{doc['rx_pending']} frame(s) waiting for RX buffers")
    out += _pairs_text(doc.get("queue_pairs"))
    mem = doc["memory"]
    out.append(f"memory: {len(mem)} region(s)")
    for r in mem:
        out.append(f"  guest {r['guest_phys_addr']:#012x}-{r['guest_phys_addr'] + r['size'] - 1:#012x} "
                   f"({_size(r['size'])})  qemu {r['userspace_addr']:#x}  mmap offset {r['mmap_offset']:#x}")
    for q in doc["queues"]:
        if queue is not None and q["index"] != queue:
            continue
        out += _queue_text(q)
    if doc["request_errors"]:
        out.append(f"refused vhost-user requests: {_kv(doc['request_errors'])}")
    if b["log_suppressed"]:
        out.append(f"log lines suppressed by rate limiting: {b['log_suppressed']}")
    return "\n".join(out)


def _queue_text(q: dict) -> list[str]:
    state = [("started" if q["started"] else "stopped"), ("enabled" if q["enabled"] else "disabled")]
    if q["broken"]:
        state.append(f"BROKEN ({q['broken']})")
    state.append(f"kick {q['kick'] or 'none'}, call {q['call'] or 'none'}")
    lines = [f"queue {q['index']} ({q['name']}): size {q['size']}, {', '.join(state)}"]
    for ring in ("desc", "avail", "used"):
        a = q[ring]
        lines.append(f"  {ring:<5} guest {_hex(a['guest'])}  qemu {_hex(a['qemu'])}")
    if q.get("format") == "packed":
        lines[0] += ", packed"
        lines.append(f"  next avail position {q['last_avail_idx']} (wrap {q['avail_wrap_counter']})  "
                     f"next used position {q['next_used_idx']} (wrap {q['used_wrap_counter']})")
        for who, ev in (("driver", q["driver_event"]), ("device", q["device_event"])):
            if ev is not None:
                flags = {0: "ENABLE", 1: "DISABLE", 2: "DESC"}.get(ev["flags"], f"reserved {ev['flags']}")
                lines.append(f"  {who} event suppression: {flags}"
                             + (f" at position {ev['off']} wrap {ev['wrap']}" if ev["flags"] == 2 else ""))
    else:
        lines.append(f"  avail->idx {_v(q['avail_idx'])}  used->idx {_v(q['used_idx'])}  "
                     f"last_avail_idx {q['last_avail_idx']}  next used {q['next_used_idx']}")
    posted = f"  RX buffers posted {q['rx_buffers_posted']}" if q["rx_buffers_posted"] is not None else ""
    lines.append(f"  pending {q['pending']}  in flight {q['in_flight']}{posted}  "
                 f"chains {q['chains']}  bytes {q['bytes']}")
    notif = (f"  kicks {q['kicks']}  calls {q['calls']}  calls suppressed {q['calls_suppressed']}"
             f" (+{q['calls_late_suppressed']} late)")
    if q.get("format") == "packed":
        pass   # the event suppression lines above
    elif q["event_idx"]:
        notif += f"  used_event {_v(q['used_event'])}  avail_event {_v(q['avail_event'])}"
    else:
        notif += (f"  avail flags {_v(q['avail_flags'])}"
                  f"{' (NO_INTERRUPT)' if (q['avail_flags'] or 0) & 1 else ''}")
    lines.append(notif)
    lu, na = q.get("last_used"), q.get("next_avail_head")
    if lu or na is not None:
        lines.append("  " + "  ".join(
            ([f"last used: id {lu['id']} len {lu['len']} (used ring idx {lu['idx']})"] if lu else [])
            + ([f"next avail: id {na}"] if na is not None else [])))
    lines.append(f"  errors: {_kv(q['errors'])}")
    for f in q.get("findings", []):
        lines.append(f"    {f['id']} x{f['count']}: {f['message']} ({f['level']}); first: {f['first'].get('detail', '')}")
    return lines


def _v(x) -> str:
    return "-" if x is None else str(x)


def desc_text(doc: dict) -> str:
    out = [f"queue {doc['queue']} ({doc['name']}), chain at descriptor {doc['head']}"
           + (f"; pending in the avail ring at idx {', '.join(map(str, doc['pending_in_avail_ring']))}"
              if doc["pending_in_avail_ring"] else "")]
    for d in doc["descriptors"]:
        where = "in guest memory" if d["in_guest_memory"] else "OUTSIDE GUEST MEMORY"
        tag = "  (indirect)" if d["indirect_table"] else ""
        out.append(f"  [{d['index']:>4}] addr {d['addr']:#014x} len {d['len']:>6} "
                   f"flags {decode.desc_flags(d['flags']):<14} next {d['next']:<5} {where}{tag}")
    if doc.get("descriptors_truncated"):
        out.append(f"  ... the chain claims more; listing stopped after {len(doc['descriptors'])} descriptors")
    out.append(f"  device-readable {doc['readable_bytes']} bytes, device-writable {doc['writable_bytes']} bytes")
    ref = doc.get("refusal")
    if ref:
        out.append(f"  the device refuses this chain: {ref['message']} ({ref['level']}): {ref['detail']}")
    if doc["note"]:
        out.append(f"  {doc['note']}")
    if doc["frame"] is None:
        return "\n".join(out)
    out.append(f"  virtio-net header: {decode.vnet_hdr_text(doc['vnet_hdr'])}")
    fr = doc["frame"]
    out.append(f"  frame {fr['len']} bytes{' (dump truncated)' if fr['truncated'] else ''}: {fr['summary']}")
    out += ["    " + line for line in decode.hexdump(bytes.fromhex(fr["hex"]), 128)]
    return "\n".join(out)


def _rate(cur: dict, prev: dict | None, key: str, secs: float | None) -> str:
    if not prev or not secs or not prev.get("connected"):
        return ""
    d = cur["device"][key] - prev["device"][key]
    return f" ({d / secs:,.0f}/s)"


def stats_text(doc: dict, prev: dict | None = None) -> str:
    if not doc["connected"]:
        return not_connected(doc)
    secs = doc["time"] - prev["time"] if prev else None
    dev, st = doc["device"], doc["stack"]
    out = ["frames     tx (guest->stack) {:>10}{}  bytes {:>14}{}".format(
               dev["tx_frames"], _rate(doc, prev, "tx_frames", secs), dev["tx_bytes"],
               _rate(doc, prev, "tx_bytes", secs)),
           "           rx (stack->guest) {:>10}{}  bytes {:>14}{}".format(
               dev["rx_frames"], _rate(doc, prev, "rx_frames", secs), dev["rx_bytes"],
               _rate(doc, prev, "rx_bytes", secs)),
           f"           waiting for RX buffers {dev['rx_pending']}, loopback injections {st['loopback_frames']}",
           f"drops      device: {_kv(dev['drops'])}",
           f"           stack:  {_kv(st['drops'])}"]
    out += _pairs_text(doc.get("queue_pairs"))
    for q in doc["queues"]:
        out.append(f"queue {q['name']:<5} kicks {q['kicks']}  calls {q['calls']}  suppressed "
                   f"{q['calls_suppressed']} (+{q['calls_late_suppressed']} late)  chains {q['chains']}  "
                   f"errors: {_kv(q['errors'])}")
    flt = doc.get("faults")
    if flt and flt["spec"] != "none":
        out.append(f"faults     {flt['spec']}")
        out += [f"           {d}: " + ", ".join(f"{k} {flt[d][k]}" for k in _FAULT_COUNTS if flt[d].get(k))
                for d in ("tx", "rx")]
    cap = doc.get("capture")
    if cap and (cap["clients"] or cap["frames"]):
        out.append(f"capture    {cap['clients']} running, {cap['frames']} frames sent, {cap['dropped']} dropped")
    out.append("ARP")
    out += [f"  {a['ip']:<15} " + (a["mac"] if a.get("mac") else f"(incomplete, {a.get('pending', 0)} queued)")
            for a in st["arp"]] or ["  (empty)"]
    out.append("UDP")
    out += [f"  {u['ip']}:{u['port']:<6} rx {u.get('rx', 0)} tx {u.get('tx', 0)}" for u in st["udp"]] or ["  (none)"]
    out.append("TCP")
    out += _tcp_lines(st["tcp"]) or ["  (none)"]
    listed = sum(1 for t in st["tcp"] if t.get("state") != "LISTEN")
    if st.get("tcp_total", 0) > listed:
        out.append(f"  ... {st['tcp_total'] - listed} more connection(s) not listed (the newest {listed} are)")
    if st["reassembly"]:
        out.append(f"IP reassembly: {len(st['reassembly'])} datagram(s) in progress")
    out += nat_lines(doc.get("nat"), doc.get("forwards", []))
    if doc.get("services"):
        out += _services_lines(doc["services"])
    return "\n".join(out)


def nat_lines(nat: dict | None, forwards: list[dict]) -> list[str]:
    """NAT flows like `ss`: proto, guest side, remote (as the guest sees it),
    host side, state, bytes each way, age; then the forwards."""
    out = []
    if nat is not None:
        n = nat["counts"]
        out.append(f"NAT        {'outbound' if nat['outbound'] else 'restricted (forwards only)'}; "
                   f"flows tcp {n['tcp']}/{nat['limits']['tcp']} udp {n['udp']}/{nat['limits']['udp']} "
                   f"icmp {n['icmp']}/{nat['limits']['icmp']}; {_kv(nat['counters'])}")
        xp = (nat.get("proxy") or {}).get("express")
        if xp is not None:
            out.append(f"  UDP express: {xp['flows']}/{xp['capacity']} flows, {xp['datagrams']} datagrams "
                       f"straight to their host sockets, emptied {xp['flushes']} times by a local bind")
        if nat["flows"]:
            out.append(f"  {'PROTO':<5} {'DIR':<3} {'GUEST':<21} {'REMOTE':<21} {'HOST':<43} "
                       f"{'STATE':<12} {'FROM-GUEST':>10} {'TO-GUEST':>10} {'AGE':>7}")
        for f in nat["flows"]:
            out.append(f"  {f['proto']:<5} {f['direction']:<3} {f['guest']:<21} {f['remote']:<21} "
                       f"{f['host'] or '-':<43} {f['state']:<12} {f['bytes_from_guest']:>10} "
                       f"{f['bytes_to_guest']:>10} {f['age_s']:>6.1f}s")
        if nat.get("flows_total", 0) > len(nat["flows"]):
            out.append(f"  ... {nat['flows_total'] - len(nat['flows'])} more flow(s) not listed "
                       f"(the {len(nat['flows'])} most recently active are)")
    if forwards:
        out.append("forwards")
        out += [f"  {f['proto']:<4} host {f['host']:<21} -> guest {f['guest']:<21} "
                f"accepted {f['accepted']} refused {f['refused']}" for f in forwards]
    return out


def _services_lines(svc: dict) -> list[str]:
    dhcp, dns, tftp = svc["dhcp"], svc["dns"], svc["tftp"]
    out = ["DHCP " + ("" if dhcp["enabled"] else "(off)")]
    out += [f"  {l['ip']:<15} {l['mac']}  {l['state']}, expires in {l['expires_in']} s"
            for l in dhcp["leases"]] or (["  (no leases)"] if dhcp["enabled"] else [])
    if dns["enabled"]:
        up = dns["upstream"]
        out.append(f"DNS  queries {dns['queries']}  answered {dns['answered']} (nxdomain {dns['nxdomain']}, "
                   f"truncated {dns['truncated']})  failed {dns['failed']}  timed out {dns['timed_out']}  "
                   f"in flight {dns['inflight']}/{dns['max_inflight']} (cap hit {dns['inflight_cap']})")
        out.append(f"     upstreams {', '.join(up['upstreams']) or '(none)'}  udp {up['udp']} tcp {up['tcp']}  "
                   f"errors {up['errors']} timeouts {up['timeouts']}")
    else:
        out.append("DNS  (off)")
    if tftp["enabled"]:
        out.append(f"TFTP transfers {tftp['started']} started, {tftp['completed']} completed, "
                   f"{tftp['failed']} failed ({tftp['timeouts']} timed out), {tftp['bytes']} bytes, "
                   f"{tftp['retransmits']} retransmits")
        out += [f"  {t['file']} -> {t['client']}  {t['sent']}/{t['size']} bytes, blksize {t['blksize']}"
                for t in tftp["transfers"]]
    else:
        out.append("TFTP (off)")
    return out


def _tcp_lines(conns: list[dict]) -> list[str]:
    """Like `ss -ti`: a line of state and addresses, then the internals."""
    out = []
    for c in conns:
        g = c.get
        out.append(f"  {str(g('state', '?')):<12} {str(g('local', '?')):<21} {g('remote', '?')}")
        if g("state") == "LISTEN":
            if g("backlog") is not None:
                out[-1] += f"  backlog {g('pending', 0)}/{g('backlog')}"
            continue
        detail = [f"snd_una {g('snd_una')}", f"snd_nxt {g('snd_nxt')}", f"rcv_nxt {g('rcv_nxt')}",
                  f"snd_wnd {g('snd_wnd')}", f"rcv_wnd {g('rcv_wnd')}"]
        if g("wscale") is not None:
            detail.append(f"wscale {g('wscale')}")
        if g("mss") is not None:
            detail.append(f"mss {g('mss')}")
        srtt = g("srtt_ms")
        detail.append(f"rtt {srtt}/{g('rttvar_ms')} ms" if srtt is not None else "rtt -")
        if g("rto_ms") is not None:
            detail.append(f"rto {g('rto_ms')} ms")
        if g("cwnd") is not None:
            detail.append(f"cwnd {g('cwnd')}")
        if g("ssthresh") is not None and g("ssthresh") < 1 << 30:   # ss leaves out "infinity" too
            detail.append(f"ssthresh {g('ssthresh')}")
        detail.append(f"retrans {g('retransmits', 0)}")
        if g("bytes_in") is not None:
            detail.append(f"bytes in {g('bytes_in')} out {g('bytes_out')}")
        if g("unacked"):
            detail.append(f"unacked {g('unacked')}")
        if g("error"):
            detail.append(f"error {g('error')}")
        out.append("      " + " ".join(detail))
    return out
