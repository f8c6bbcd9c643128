"""DHCP server (RFC 2131, options RFC 2132) on the gateway address.

Theory of operation:
* It binds UDP port 67 on the wildcard address, so it sees the clients'
  broadcasts (src 0.0.0.0, dst 255.255.255.255) as well as unicast renewals
  to the gateway. The stack delivers both before the guest has an address.
* Addresses come from a small pool: the configured guest address and the
  `pool_size - 1` after it. A client is known by its hardware address
  (chaddr), as slirp does: U-Boot, then Linux on the same NIC, get the same
  address even though one sends a client identifier and the other not.
* A lease is "offered" (held `OFFER_HOLD` seconds) after DISCOVER, "bound"
  after the ACK until it expires; expired entries are reclaimed lazily when
  the pool is full. There are no timers, so no deadline.
* The REQUEST is handled by client state (RFC 2131 §4.3.2): SELECTING
  (server identifier present: ours -> ACK, another server's -> forget the
  offer), INIT-REBOOT (requested address, no ciaddr: NAK unless it is the
  client's address), RENEWING/REBINDING (ciaddr: ACK if it is the client's).
* Replies go where §4.1 says: to ciaddr if set; else broadcast when the
  client set the BROADCAST flag; else unicast to yiaddr at chaddr (no ARP:
  the client cannot answer yet). NAKs are always broadcast. Relayed
  requests (giaddr set) cannot happen on this one link and are dropped.
* Options: subnet mask (1), router (3), DNS (6), MTU (26), broadcast (28),
  lease time (51), server identifier (54), T1/T2 (58/59); with TFTP the
  boot file in the `file` field and option 67 and the next server in siaddr
  and option 66. Under `restrict` the router and DNS are left out.

Counters (in the stack's counter dict): dhcp_rx_<type>, dhcp_tx_<type>,
drop_dhcp_<reason>, dhcp_pool_exhausted, dhcp_declined.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..config import ip_text, mac_text
from ..wire.ethernet import BROADCAST
from . import dhcp_wire as w

__all__ = ["DhcpServer", "DHCP_SERVER_PORT", "DHCP_CLIENT_PORT"]

DHCP_SERVER_PORT = 67                 # RFC 2131 §4.1
DHCP_CLIENT_PORT = 68                 # RFC 2131 §4.1
OFFER_HOLD = 60.0                     # seconds an offered address stays reserved for its client
DECLINE_HOLD = 600.0                  # seconds a DECLINEd address stays out of the pool (RFC 2131 §3.1 step 5)
T1_FRACTION, T2_FRACTION = 0.5, 0.875  # RFC 2131 §4.4.5 defaults
LIMITED_BROADCAST = b"\xff\xff\xff\xff"
ZERO = b"\0\0\0\0"

# RFC 2132 option codes
OPT_SUBNET_MASK = 1                   # §3.3
OPT_ROUTER = 3                        # §3.5
OPT_DNS = 6                           # §3.8
OPT_MTU = 26                          # §5.1 interface MTU
OPT_BROADCAST = 28                    # §5.3
OPT_REQUESTED_IP = 50                 # §9.1
OPT_LEASE_TIME = 51                   # §9.2
OPT_MESSAGE_TYPE = 53                 # §9.6
OPT_SERVER_ID = 54                    # §9.7
OPT_MESSAGE = 56                      # §9.9
OPT_T1 = 58                           # §9.11
OPT_T2 = 59                           # §9.12
OPT_TFTP_SERVER = 66                  # §9.4 TFTP server name
OPT_BOOTFILE = 67                     # §9.5 bootfile name


@dataclass
class Lease:
    mac: bytes
    ip: bytes
    state: str                        # "offered" | "bound"
    expires: float


class DhcpServer:
    def __init__(self, udp_layer, counters, clock, *, server_ip: bytes, dns_ip: bytes,
                 first_ip: bytes, prefix_len: int, mtu: int, lease_time: int, pool_size: int,
                 restrict: bool, bootfile: str | None):
        self._c = counters
        self._clock = clock
        self._ip = server_ip
        self._dns = dns_ip
        self._lease_time = lease_time
        self._restrict = restrict
        self._mtu = mtu
        self._bootfile = bootfile.encode() if bootfile else None
        net = ipaddress.IPv4Network(f"{ip_text(first_ip)}/{prefix_len}", strict=False)
        self._mask = net.netmask.packed
        self._bcast = net.broadcast_address.packed
        first = int(ipaddress.IPv4Address(first_ip))
        pool = []
        for a in range(first, int(net.broadcast_address)):
            b = ipaddress.IPv4Address(a).packed
            if b not in (server_ip, dns_ip):
                pool.append(b)
            if len(pool) == pool_size:
                break
        self._pool = pool
        self._leases: dict[bytes, Lease] = {}       # by MAC
        self._declined: dict[bytes, float] = {}     # ip -> until
        self.sock = udp_layer.bind(DHCP_SERVER_PORT, self._on_datagram)

    # ------------------------------------------------------------------ input
    def _on_datagram(self, sock, payload, src_ip, src_port, dst_ip) -> None:
        c = self._c
        try:
            m = w.parse(payload)
        except w.DhcpWireError as e:
            c["drop_" + e.reason] += 1
            return
        if m.op != w.BOOTREQUEST:
            c["drop_dhcp_not_request"] += 1
            return
        if m.giaddr != ZERO:
            c["drop_dhcp_relayed"] += 1
            return
        if m.chaddr[0] & 1 or m.chaddr == bytes(6):
            c["drop_dhcp_bad_chaddr"] += 1
            return
        t = m.message_type
        name = w.MESSAGE_TYPE_NAMES.get(t)
        if name is None or t in (w.DHCPOFFER, w.DHCPACK, w.DHCPNAK):
            c["drop_dhcp_bad_type"] += 1
            return
        c["dhcp_rx_" + name] += 1
        now = self._clock()
        if t == w.DHCPDISCOVER:
            self._discover(m, now)
        elif t == w.DHCPREQUEST:
            self._request(m, now)
        elif t == w.DHCPRELEASE:
            self._release(m)
        elif t == w.DHCPDECLINE:
            self._decline(m, now)
        else:
            self._inform(m)

    def _discover(self, m, now) -> None:
        lease = self._allocate(m.chaddr, m.options.get(OPT_REQUESTED_IP), now)
        if lease is None:
            self._c["dhcp_pool_exhausted"] += 1
            return
        if lease.state != "bound":
            lease.state = "offered"
            lease.expires = now + OFFER_HOLD
        self._reply(m, w.DHCPOFFER, lease.ip)

    def _request(self, m, now) -> None:
        sid = m.options.get(OPT_SERVER_ID)
        req = m.options.get(OPT_REQUESTED_IP)
        lease = self._leases.get(m.chaddr)
        if lease is not None and lease.expires <= now and lease.state == "offered":
            lease = None
        if sid is not None:
            # SELECTING (§4.3.2): the client picked a server.
            if sid != self._ip:
                if lease is not None and lease.state == "offered":
                    del self._leases[m.chaddr]
                self._c["dhcp_other_server"] += 1
                return
            if lease is None or req != lease.ip or m.ciaddr != ZERO:
                self._nak(m, "no such offer")
                return
        elif m.ciaddr == ZERO:
            # INIT-REBOOT: the client asks for the address it remembers.
            if req is None or len(req) != 4:
                self._c["drop_dhcp_bad_request"] += 1
                return
            if lease is None:
                lease = self._allocate(m.chaddr, req, now)
            if lease is None or lease.ip != req:
                self._nak(m, "address not available")
                return
        else:
            # RENEWING (unicast) or REBINDING (broadcast): ciaddr is the address.
            if lease is None:
                lease = self._allocate(m.chaddr, m.ciaddr, now)
            if lease is None or lease.ip != m.ciaddr:
                self._nak(m, "address not available")
                return
        lease.state = "bound"
        lease.expires = now + self._lease_time
        self._reply(m, w.DHCPACK, lease.ip)

    def _release(self, m) -> None:
        lease = self._leases.get(m.chaddr)
        if lease is not None and lease.ip == m.ciaddr:
            del self._leases[m.chaddr]
        else:
            self._c["dhcp_release_unknown"] += 1

    def _decline(self, m, now) -> None:
        ip = m.options.get(OPT_REQUESTED_IP)
        lease = self._leases.get(m.chaddr)
        if lease is not None and lease.ip == ip:
            del self._leases[m.chaddr]
            self._declined[ip] = now + DECLINE_HOLD
            self._c["dhcp_declined"] += 1

    def _inform(self, m) -> None:
        # RFC 2131 §4.3.5: configuration only; no lease, no yiaddr, to ciaddr.
        if m.ciaddr == ZERO:
            self._c["drop_dhcp_inform_no_ciaddr"] += 1
            return
        self._reply(m, w.DHCPACK, ZERO, inform=True)

    # --------------------------------------------------------------- leases
    def _allocate(self, mac: bytes, wanted: bytes | None, now: float) -> Lease | None:
        lease = self._leases.get(mac)
        if lease is not None and (lease.state == "bound" or lease.expires > now):
            if wanted is None or wanted == lease.ip or lease.state == "bound":
                return lease
        self._leases.pop(mac, None)
        taken = {l.ip for l in self._leases.values() if l.state == "bound" or l.expires > now}
        for ip, until in list(self._declined.items()):
            if until <= now:
                del self._declined[ip]
            else:
                taken.add(ip)
        choice = None
        if wanted is not None and wanted in self._pool and wanted not in taken:
            choice = wanted
        else:
            choice = next((ip for ip in self._pool if ip not in taken), None)
        if choice is None:
            # Reclaim the oldest expired lease, if any.
            dead = [k for k, l in self._leases.items() if l.expires <= now]
            if not dead:
                return None
            choice = self._leases.pop(dead[0]).ip
        lease = self._leases[mac] = Lease(mac, choice, "offered", now + OFFER_HOLD)
        return lease

    # ---------------------------------------------------------------- output
    def _options(self, t: int, inform: bool) -> dict[int, bytes]:
        o = {OPT_MESSAGE_TYPE: bytes([t]), OPT_SERVER_ID: self._ip}
        if not inform:
            lt = self._lease_time
            o[OPT_LEASE_TIME] = lt.to_bytes(4, "big")
            o[OPT_T1] = int(lt * T1_FRACTION).to_bytes(4, "big")
            o[OPT_T2] = int(lt * T2_FRACTION).to_bytes(4, "big")
        o[OPT_SUBNET_MASK] = self._mask
        if not self._restrict:
            o[OPT_ROUTER] = self._ip
            o[OPT_DNS] = self._dns
        o[OPT_MTU] = self._mtu.to_bytes(2, "big")
        o[OPT_BROADCAST] = self._bcast
        if self._bootfile is not None:
            o[OPT_TFTP_SERVER] = ip_text(self._ip).encode()
            o[OPT_BOOTFILE] = self._bootfile
        return o

    def _reply(self, m, t: int, yiaddr: bytes, inform: bool = False) -> None:
        boot = self._bootfile is not None
        r = w.DhcpMessage(op=w.BOOTREPLY, xid=m.xid, chaddr=m.chaddr, flags=m.flags,
                          ciaddr=m.ciaddr if t == w.DHCPACK else ZERO, yiaddr=yiaddr,
                          siaddr=self._ip if boot else ZERO,
                          file=self._bootfile if boot else b"",
                          options=self._options(t, inform))
        if m.ciaddr != ZERO and t == w.DHCPACK:
            dst_ip, dst_mac = m.ciaddr, None                   # ARP resolves it
        elif m.flags & w.FLAG_BROADCAST:
            dst_ip, dst_mac = LIMITED_BROADCAST, BROADCAST
        else:
            dst_ip, dst_mac = yiaddr, m.chaddr
        self._send(r, t, dst_ip, dst_mac)

    def _nak(self, m, why: str) -> None:
        o = {OPT_MESSAGE_TYPE: bytes([w.DHCPNAK]), OPT_SERVER_ID: self._ip,
             OPT_MESSAGE: why.encode()}
        r = w.DhcpMessage(op=w.BOOTREPLY, xid=m.xid, chaddr=m.chaddr, flags=m.flags, options=o)
        self._send(r, w.DHCPNAK, LIMITED_BROADCAST, BROADCAST)   # §4.1: NAKs are broadcast

    def _send(self, r, t, dst_ip, dst_mac) -> None:
        self._c["dhcp_tx_" + w.MESSAGE_TYPE_NAMES[t]] += 1
        self.sock.send(w.build(r), dst_ip, DHCP_CLIENT_PORT, src_ip=self._ip, dst_mac=dst_mac)

    # ---------------------------------------------------------------- report
    def snapshot(self) -> list[dict]:
        now = self._clock()
        return [{"mac": mac_text(l.mac), "ip": ip_text(l.ip), "state": l.state,
                 "expires_in": max(0, int(l.expires - now))}
                for l in self._leases.values() if l.state == "bound" or l.expires > now]
