"""The UDP express: a guest's datagram on an established NAT flow, from the
TX ring to its host socket in one C call (vhostnet/native/express.c).

Why: a UDP round trip through the NAT cost about 100 Python calls on the
way out (the stack's parse and checks, the flow table's event, the proxy's
dispatch, the relay's send), for a datagram whose every check and whose
host socket were already known after its flow's first one (issue 12's
UDP round-trip profile).

How: the proxy enters an outbound UDP relay here once its connect()ed host
socket exists (`add`), keyed as the guest names the flow (destination
address, source port, destination port; the source is the guest's own
address). The device's TX drain then hands each frame to `receive` instead
of the stack's: C checks it as the stack would (express.c says which
checks) and sends its payload on the flow's socket, or leaves it to the
stack untouched. After the drain, `settle` gives the flow table and the
proxy what the stack's path would have given them: the counters, the
flow's last activity and bytes, the guest's ARP entry refreshed, sends
dropped or refused (an ECONNREFUSED still becomes ICMP port unreachable),
and the answer spin's list (HostProxy.expect_answer).

The flow table stays the one place that decides flows: an entry exists
only while its relay does (`remove` runs before the relay's socket closes),
and a local UDP socket bound in the stack (a TFTP transfer, say) empties
the express, since a flow to a gateway port may then belong to the stack's
service; the flows come back one datagram each, through the proxy.

The device makes one only when the C module is built (vhostnet/native;
`backend.express` in inspect and stats says why not) and not with
`--no-express`. It takes nothing from a guest source address other than
the configured one, nor while the device's link layers are in the way
(faults, stack-side taps: the device hands frames to the link's receiver
then, as before).
"""
from __future__ import annotations

import os

from vhostnet import native

__all__ = ["UdpExpress"]

#: Deleted index marks, as a share of the index, that make add() rebuild it.
REBUILD_SHARE = 4


class UdpExpress:
    def __init__(self, stack, proxy, capacity: int, *, gateway_mac: bytes, guest_ip: bytes):
        self.stack = stack
        self.p = proxy
        self.capacity = max(int(capacity), 1)
        self.sent = 0           # datagrams that took the express
        self.flushes = 0        # times a local UDP bind emptied it
        self.guest_ip = guest_ip
        self._relays: list = [None] * self.capacity
        self._free = list(range(self.capacity - 1, -1, -1))
        self._deleted = 0
        self._binds = None      # the stack's UDP bind count the entries were made under
        self._guest_mac = None  # the guest's MAC the entries were made under
        ffi, lib = native.ffi, native.lib
        size = 1
        while size < 2 * self.capacity:
            size <<= 1
        self._mask = size - 1
        self._idx = ffi.new("int32_t[]", size)
        self._ent = ffi.new("vn_xflow[]", self.capacity)
        for e in range(self.capacity):
            self._ent[e].fd = -1
        self._dirty = ffi.new("uint32_t[]", self.capacity)
        self._nd = ffi.new("uint32_t[1]")
        self._conf = ffi.new("vn_xconf *")
        self._conf.gw_mac = list(gateway_mac)
        self._conf.guest_ip = list(guest_ip)
        lib.vn_x_rebuild(self._idx, self._mask, self._ent, self.capacity)
        self._insert, self._remove, self._send = lib.vn_x_insert, lib.vn_x_remove, lib.vn_x_send
        self._from_buffer = ffi.from_buffer

    def __len__(self) -> int:
        return self.capacity - len(self._free)

    # ------------------------------------------------------------ entries
    def add(self, relay, guest_ip: bytes, sport: int, dst_ip: bytes, dport: int) -> bool:
        """Enter RELAY's flow (its socket open and connected). False: not entered
        (another source address, the guest's MAC not known, or full)."""
        if guest_ip != self.guest_ip or relay.xslot is not None or not self._free:
            return False
        st = self.stack
        arp = st.arp.entries.get(guest_ip)
        if arp is None:
            return False
        self.check_binds(st.udp.binds)
        guest_mac = arp[0]
        if guest_mac != self._guest_mac:
            # A driver that changed its MAC: the entries made under the old
            # one would never match again; they go, and come back one datagram each.
            self.clear()
            self._guest_mac = guest_mac
            self._conf.guest_mac = list(guest_mac)
        if self._deleted * REBUILD_SHARE > self._mask:
            native.lib.vn_x_rebuild(self._idx, self._mask, self._ent, self.capacity)
            self._deleted = 0
        e = self._free.pop()
        key = int.from_bytes(dst_ip, "big") << 32 | sport << 16 | dport
        x = self._ent[e]
        x.fd = relay.sock.fileno()
        x.err = x.sent = x.dropped = x.failed = x.dirty = 0
        x.bytes = 0
        self._insert(self._idx, self._mask, self._ent, key, e)
        self._relays[e] = relay
        relay.xslot = e
        return True

    def remove(self, relay) -> None:
        """RELAY's flow out of the express, before its socket closes."""
        e = relay.xslot
        if e is None:
            return
        x = self._ent[e]
        if x.dirty:
            self.settle(self.p.now())
        self._remove(self._idx, self._mask, self._ent, x.key)
        self._deleted += 1
        x.fd = -1
        self._relays[e] = None
        relay.xslot = None
        self._free.append(e)

    def clear(self) -> None:
        """Every entry out (their relays stay; the proxy enters them again)."""
        for r in self._relays:
            if r is not None:
                self.remove(r)

    def check_binds(self, binds: int) -> None:
        """The stack's UDP bind count now: a local socket bound since the entries
        were made empties the express (a flow's port may be the stack's now)."""
        if binds != self._binds:
            if len(self):
                self.clear()
                self.flushes += 1
            self._binds = binds

    # ------------------------------------------------------------ traffic
    def receiver(self, stack_receive):
        """The TX drain's per-frame call: the express first, the stack for the rest."""
        send, from_buffer = self._send, self._from_buffer
        conf, idx, mask, ent, dirty, nd = self._conf, self._idx, self._mask, self._ent, self._dirty, self._nd

        def receive(frame, now: float) -> None:
            data = frame.data
            if send(from_buffer(data), len(data), 1 if (frame.csum_start or frame.csum_valid) else 0,
                    conf, idx, mask, ent, dirty, nd) < 0:
                stack_receive(frame, now)
        return receive

    @property
    def pending(self) -> int:
        """Entries with counts to settle."""
        return self._nd[0]

    def settle(self, now: float) -> None:
        """The counts of the datagrams sent since the last settle, to the flow
        table and the proxy (what their path through the stack would have done)."""
        nd = self._nd[0]
        if not nd:
            return
        self._nd[0] = 0
        p = self.p
        expressed = self.stack.udp_expressed
        ent, relays, dirty = self._ent, self._relays, self._dirty
        mac = self._guest_mac
        for i in range(nd):
            e = dirty[i]
            x = ent[e]
            r = relays[e]
            n = x.sent + x.dropped + x.failed
            nbytes, dropped, failed, err, sent = x.bytes, x.dropped, x.failed, x.err, x.sent
            x.sent = x.dropped = x.failed = x.err = x.dirty = 0
            x.bytes = 0
            self.sent += n
            expressed(now, r.fid, n, nbytes, mac)
            if dropped:
                p.count("datagram_send_dropped", dropped)
            if failed:
                r.send_failed(OSError(err, os.strerror(err)))
            elif sent:
                p.expect_answer(r)

    def snapshot(self) -> dict:
        return {"flows": len(self), "capacity": self.capacity, "datagrams": self.sent,
                "flushes": self.flushes}
