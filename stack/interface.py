"""The interface: the stack's one entry point for frames from the guest.

`Stack` owns addressing (it answers for the gateway and DNS addresses with
the gateway MAC), the neighbour table, fragment reassembly, ICMP, and the
dispatch to the UDP sockets and the TCP layer. Everything it sends to the
guest is appended to an output list that `take_frames` hands over.

Receive path, top to bottom (`receive`):
  Ethernet type -> ARP (`_rx_arp`), IPv6 (`_rx_ipv6`: only a Router
  Solicitation is answered, with "no router here", stack/wire/ndp.py) or
  IPv4 (`_rx_ipv4`): header checks
  (stack/wire/ipv4.py `check_header`, the one IPv4 parser) -> learn the
  guest's MAC -> loopback if addressed to the guest -> the routing step
  (`_route`) -> reassembly -> per protocol:
    ROUTE_LOCAL (gateway, DNS): local services first: ICMP echo, the UDP
      sockets (`self.udp`: built-in echo/discard, DHCP/DNS/TFTP services bind
      here) and TCP listeners (built-in echo/discard/chargen). A gateway port
      nobody serves goes on to the NAT (`self.flows`) when there is one;
      otherwise port unreachable / RST.
    ROUTE_BROADCAST: the wildcard UDP sockets only (DHCP); never the NAT.
    ROUTE_FORWARD (beyond the gateway): the NAT's flows (stack/flows.py)
      for TCP, UDP and ICMP echo, if it takes outbound traffic; otherwise
      Time Exceeded (TTL) or Host Unreachable.
  With `services=False` the built-in echo/discard/chargen are not
  installed, so gateway ports 7, 9 and 19 go to the NAT (the host) as well.

Hot path: an ICMP echo request to one of our addresses (no IP options,
checksums not offloaded, within the MTU) is answered by one call,
stack/native `EchoReplier` (C, or its Python twin): it checks the ICMP
checksum and builds the reply from the request (RFC 1624 checksum patch),
with no objects beyond the reply bytearray and its Frame. Everything else goes through `_send_ip`,
which picks full or partial L4 checksums, fragments to the MTU and resolves
the destination MAC (queueing behind ARP when needed).

Every drop is counted as `drop_<reason>`; ICMP errors are rate-limited by
a token bucket (`icmp_rate` per second, `icmp_burst` deep). At most
`max_out` frames wait for `take_frames`. `counters` holds this layer's
counters; `snapshot()["counters"]` adds the TCP layer's (prefixed tcp_).
"""
from __future__ import annotations

import importlib
import ipaddress
from collections import Counter

from .arp_cache import ArpCache
from .checksum import checksum, finalize_l4_checksum, l4_sum, ones_sum, pseudo_sum
from .config import NetConfig
from .counters import Counters
from .frame import Frame
from .loopback import loop_back
from .native import EchoReplier
from .reassembly import Reassembler
from .segment import SegmentError, segment_tcp
from .services import udp_services
from .services.network import NetworkServices, ServicesConfig
from .udp import UdpLayer
from .wire import arp as arpw
from .wire import icmp as icmpw
from .wire import ndp
from .wire.udp import HEADER as _UDPH
from .wire.ethernet import BROADCAST, MIN_FRAME
from .wire.ipv4 import (FLAG_DF, FLAG_MF, OFFSET_MASK, PROTO_ICMP, PROTO_TCP,
                        PROTO_UDP, Ipv4Error, build_header, check_header, fragment_payload)
from .flows import FlowConfig, FlowTable

try:
    from .tcp.layer import TcpLayer
except ModuleNotFoundError as e:  # only "not written yet"; a broken layer must fail loudly
    if e.name not in ("stack.tcp.layer", "stack.tcp"):
        raise
    TcpLayer = None

__all__ = ["Stack", "finalize_l4_checksum"]

ETH_HLEN = 14                  # IEEE 802.3: two MACs and the EtherType
# What TCP reserves in front of each segment (TcpLayer headroom): Ethernet +
# an IPv4 header without options (RFC 791 §3.1), so _send_ip builds the
# frame in place.
FRAME_HEADROOM = ETH_HLEN + 20
_ETH_IP = b"\x08\x00"
_ETH_ARP = b"\x08\x06"
_ETH_IPV6 = b"\x86\xdd"
_ZERO_IP = b"\0\0\0\0"
TSO_MAX_PAYLOAD = 65535 - 40 - 20

# The routing step's verdicts (`Stack._route`).
ROUTE_LOCAL, ROUTE_BROADCAST, ROUTE_FORWARD, ROUTE_NONE = range(4)
_NAT_PROTOS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_ICMP})
LOOPBACK_NET = 127             # RFC 1122 3.2.1.3 (g): 127/8 never appears on a network


class _TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = None

    def take(self, now: float) -> bool:
        if self.stamp is not None and now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now if self.stamp is None else max(self.stamp, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


#: Connections kept for the built-in TCP services beside the NAT's flows.
SERVICE_CONNECTIONS = 64


def _tcp_config_for(flows: FlowConfig | None):
    """The TCP layer's cap on connections must not cut the NAT's below its
    own cap: every NAT flow is a connection, and the ones the host side
    closed first linger in TIME-WAIT after their flow is gone (up to
    max_time_wait). Without room for both, SYNs past the layer's cap were
    dropped silently (tcp_conn_limit_drops) before the NAT's cap, which
    answers with a RST and counts nat_tcp_flow_limit, was reached."""
    if TcpLayer is None or flows is None:
        return None
    from .tcp.config import TcpConfig
    base = TcpConfig()
    need = flows.max_tcp + base.max_time_wait + SERVICE_CONNECTIONS
    return TcpConfig(max_connections=max(base.max_connections, need))


class Stack:
    def __init__(self, config: NetConfig | None = None, *, icmp_rate: float = 100.0,
                 icmp_burst: int = 20, arp_ttl: float = 300.0, reasm_timeout: float = 30.0,
                 reasm_max_total: int = 1 << 20, max_out: int = 8192,
                 flows: FlowConfig | None = None, services: bool = True,
                 net_services: ServicesConfig | None = None):
        cfg = self.config = config or NetConfig()
        self.counters: Counter = Counters()   # Counter with item assignment at dict speed
        self._out: list[Frame] = []
        self.max_out = max_out
        self._now = 0.0
        self._csum = False
        self._tso = False
        self._ip_id = 0
        self._guest_ip = cfg.guest_ip_b
        self._gw_ip = cfg.gateway_ip_b
        self._dns_ip = cfg.dns_ip_b
        self._gw_mac = cfg.gateway_mac_b
        self._echo = EchoReplier(self._gw_mac).reply    # the echo hot path (stack/native)
        self._mtu = cfg.mtu
        net = ipaddress.IPv4Network(f"{cfg.guest_ip}/{cfg.prefix_len}", strict=False)
        self._net = int(net.network_address)
        self._mask = int(net.netmask)
        self._bcast = net.broadcast_address.packed
        self._netaddr = net.network_address.packed
        self._hosts = frozenset(cfg.host_ips)
        self._errors = _TokenBucket(icmp_rate, icmp_burst)
        self._ra_frame = bytes(ndp.advertisement(self._gw_mac))
        self._last_ra: float | None = None
        self.arp = ArpCache(self.counters, ttl=arp_ttl)
        self.reasm = Reassembler(self.counters, timeout=reasm_timeout, max_total=reasm_max_total)
        self.udp = UdpLayer(self._udp_output, self.counters, self._gw_ip)
        self.udp_services = udp_services.install(self.udp, self._gw_ip) if services else []
        self.tcp = None
        self.flows: FlowTable | None = None
        if TcpLayer is not None:
            # ACKs batched per take_frames(): see TcpLayer.flush_acks.
            self.tcp = TcpLayer(self._tcp_emit, defer_acks=True, config=_tcp_config_for(flows),
                                headroom=FRAME_HEADROOM)
            if flows is not None:
                self.flows = FlowTable(flows, self.tcp, self.counters, self._gw_ip,
                                       set_now=self._set_now, udp_output=self._udp_output,
                                       icmp_output=self._icmp_output,
                                       icmp_error=self._nat_icmp_error)
            try:
                tcp_services = importlib.import_module(".services.tcp_services", __package__)
            except ModuleNotFoundError as e:  # the TCP services may land after the layer
                if e.name != __package__ + ".services.tcp_services":
                    raise
                tcp_services = None
            if tcp_services is not None and services:
                tcp_services.install(self.tcp, self._gw_ip)
        # DHCP/DNS/TFTP (stack/services/network.py); None: no services.
        self.net_services = None if net_services is None else NetworkServices(
            net_services, cfg, self.udp, self.tcp, self.counters, lambda: self._now)

    # ------------------------------------------------------------------ API
    def set_offloads(self, csum: bool, tso: bool) -> None:
        """What the guest accepts on RX. TSO without checksum offload is
        impossible in virtio (GSO frames are always partial), so it is off."""
        self._csum = bool(csum)
        self._tso = bool(tso) and self._csum
        if self.tcp is not None:
            self.tcp.set_tso(TSO_MAX_PAYLOAD if self._tso else None)

    def take_events(self) -> list:
        """Events for the device side (DNS queries to relay), oldest first."""
        return self.net_services.take_events() if self.net_services is not None else []

    def take_frames(self) -> list[Frame]:
        if self.tcp is not None:
            self.tcp.flush_acks(self._now)
        out = self._out
        self._out = []
        return out

    def poll(self, now: float) -> None:
        self._now = now
        for ip in self.arp.poll(now):
            self._send_arp_request(ip)
        for quote in self.reasm.poll(now):
            # Only datagrams unicast to us: never an error about a broadcast.
            if quote[16:20] in self._hosts:
                self._icmp_error(now, icmpw.TIME_EXCEEDED, 1, quote, quote[16:20],
                                 quote[12:16], None)
        if self.tcp is not None:
            self.tcp.poll(now)
        if self.flows is not None:
            self.flows.poll(now)
        if self.net_services is not None:
            self.net_services.poll(now)

    def next_deadline(self) -> float | None:
        # Asked after every step of the event loop (the server re-arms its
        # timer): the parts in line, the TCP layer's (the one that moves
        # most) first, with no call to combine them.
        best = None if self.tcp is None else self.tcp.next_deadline()
        for d in (self.arp.next_deadline(), self.reasm.next_deadline(),
                  None if self.flows is None else self.flows.next_deadline(),
                  None if self.net_services is None else self.net_services.next_deadline()):
            if d is not None and (best is None or d < best):
                best = d
        return best

    def snapshot(self, limit: int | None = None) -> dict:
        """The stack's state; LIMIT bounds the TCP connections and NAT flows
        listed (their totals are in `tcp_total` and `nat_total`)."""
        return {
            "arp": self.arp.snapshot(),
            "udp": self.udp.snapshot(),
            "tcp": self.tcp.snapshot(limit) if self.tcp is not None else [],
            "tcp_total": self.tcp.connection_count if self.tcp is not None else 0,
            "reassembly": self.reasm.snapshot(),
            "nat": self.flows.snapshot(self._now, limit) if self.flows is not None else [],
            "nat_total": len(self.flows) if self.flows is not None else 0,
            "services": self.net_services.snapshot() if self.net_services is not None else None,
            "counters": self.all_counters(),
        }

    def all_counters(self) -> dict:
        out = dict(self.counters)
        if self.tcp is not None:
            for k, v in self.tcp.counters.items():
                out["tcp_" + k if not k.startswith("tcp_") else k] = v
        return out

    # ------------------------------------------------------------- receive
    def receiver(self, now: float):
        """What the link layers in front hand a batch of frames to (the
        vhostnet/link Link protocol): receive."""
        return self.receive

    def receive(self, frame: Frame, now: float) -> None:
        """One frame the guest transmitted. Never raises on bad input."""
        self._now = now
        c = self.counters
        c["rx_frames"] += 1
        data = frame.data
        # Private copy: the frame may be a view of guest memory the guest
        # can rewrite while we look at it.
        buf = data if type(data) is bytes else bytes(data)
        n = len(buf)
        if n < 14:
            c["drop_eth_truncated"] += 1
            return
        et = buf[12:14]
        if et == _ETH_IP:
            self._rx_ipv4(frame, buf, n, now)
        elif et == _ETH_ARP:
            self._rx_arp(buf, now)
        elif et == _ETH_IPV6:
            self._rx_ipv6(buf, now)
        else:
            c["drop_eth_unknown_type"] += 1

    # ----------------------------------------------------------------- ARP
    def _rx_arp(self, buf: bytes, now: float) -> None:
        c = self.counters
        try:
            a = arpw.ArpRepr.parse(buf, 14)
        except arpw.ArpError as e:
            c["drop_" + e.reason] += 1
            return
        c["arp_rx"] += 1
        smac = a.sender_mac
        if smac[0] & 1 or smac == b"\0" * 6:
            c["drop_arp_bad_sender_mac"] += 1
            return
        sip = a.sender_ip
        if sip in self._hosts:
            # The guest claims one of our addresses: do not let it poison us.
            c["arp_conflict"] += 1
            return
        if sip != _ZERO_IP and self._on_link(sip):
            for f in self.arp.learn(sip, smac, now):
                self._emit(f)
        if a.op != arpw.OP_REQUEST:
            return
        if a.is_gratuitous or a.target_ip not in self._hosts:
            c["arp_ignored"] += 1
            return
        # A probe (sender 0.0.0.0) for one of our addresses is answered too:
        # RFC 5227 hosts defend their addresses.
        reply = arpw.ArpRepr(arpw.OP_REPLY, self._gw_mac, a.target_ip, smac, sip)
        f = bytearray(smac + self._gw_mac + _ETH_ARP)
        f += reply.emit()
        f += bytes(MIN_FRAME - len(f))
        c["arp_replies"] += 1
        self._emit(Frame(f))

    # ---------------------------------------------------------------- IPv6
    def _rx_ipv6(self, buf: bytes, now: float) -> None:
        """IPv4 only: the one IPv6 packet answered is a Router Solicitation,
        with an advertisement that there is no router (stack/wire/ndp.py),
        at most once per MIN_DELAY_BETWEEN_RAS."""
        c = self.counters
        try:
            ndp.parse_solicitation(buf, ETH_HLEN)
        except ndp.NotSolicitation:
            c["drop_ipv6_unsupported"] += 1     # MLD reports, neighbour solicitations...
            return
        except ndp.NdpError as e:
            c["drop_" + e.reason] += 1
            return
        c["ndp_rs_rx"] += 1
        if self._last_ra is not None and now - self._last_ra < ndp.MIN_DELAY_BETWEEN_RAS:
            c["ndp_rs_rate_limited"] += 1
            return
        self._last_ra = now
        c["ndp_ra_tx"] += 1
        self._emit(Frame(bytearray(self._ra_frame)))

    def _send_arp_request(self, ip: bytes) -> None:
        req = arpw.ArpRepr(arpw.OP_REQUEST, self._gw_mac, self._gw_ip, b"\0" * 6, ip)
        f = bytearray(BROADCAST + self._gw_mac + _ETH_ARP)
        f += req.emit()
        f += bytes(MIN_FRAME - len(f))
        self.counters["arp_requests"] += 1
        self._emit(Frame(f))

    def _on_link(self, ip: bytes) -> bool:
        return (int.from_bytes(ip, "big") & self._mask) == self._net \
            and ip != self._bcast and ip != self._netaddr

    # ---------------------------------------------------------------- IPv4
    def _rx_ipv4(self, frame: Frame, buf: bytes, n: int, now: float) -> None:
        c = self.counters
        try:
            ihl, tos, tot, _ident, ff, ttl, proto, src, dst = check_header(buf, ETH_HLEN)
        except Ipv4Error as e:
            c["drop_" + e.reason] += 1
            return
        end = ETH_HLEN + tot
        b0 = src[0]
        if b0 >= 224 or b0 == 127 or src in self._hosts:
            # Multicast, loopback, or one of our own addresses (a spoof that
            # would make us answer ourselves): never a real source.
            c["drop_ipv4_bad_src"] += 1
            return
        smac = buf[6:12]
        # Learn/refresh the sender's MAC (normally just the guest).
        e = self.arp.entries.get(src)
        if e is not None and e[0] == smac:
            e[1] = now + self.arp.ttl
        elif src != _ZERO_IP and self._on_link(src) and src not in self._hosts \
                and not smac[0] & 1:
            for f in self.arp.learn(src, smac, now):
                self._emit(f)
        if dst == self._guest_ip:
            c["loopback_frames"] += 1
            for f in loop_back(frame, buf, self._csum, self._tso, c):
                self._emit(f)
            return
        dmac = buf[0:6]
        l2bcast = dmac[0] & 1
        if dmac != self._gw_mac and not l2bcast:
            c["drop_eth_not_for_us"] += 1
            return
        # The routing step, its first verdict inline (the common case).
        route = ROUTE_LOCAL if dst in self._hosts else self._route(dst, l2bcast)
        if route == ROUTE_NONE:
            c["drop_ipv4_no_route"] += 1
            return
        if route == ROUTE_FORWARD and not self._may_forward(buf, end, ttl, proto, src, dst, smac,
                                                            now):
            return
        bcast = route == ROUTE_BROADCAST
        # RFC 1122: no ICMP error about broadcast (IP or link layer) or from
        # a source that is not a host yet.
        noerr = bcast or l2bcast or b0 == 0
        if ff & (FLAG_MF | OFFSET_MASK):
            whole = self.reasm.add(now, buf[ETH_HLEN:ETH_HLEN + ihl], buf[ETH_HLEN + ihl:end])
            if whole is None:
                return
            buf = buf[:ETH_HLEN] + whole
            end = ETH_HLEN + len(whole)
            ihl = (whole[0] & 15) << 2
            reassembled = True
        else:
            reassembled = False
        off = ETH_HLEN + ihl
        if proto == PROTO_ICMP:
            self._rx_icmp(frame, buf, off, end, ihl, tos, src, dst, smac, bcast, reassembled,
                          route, now)
        elif proto == PROTO_UDP:
            self._rx_udp(frame, buf, off, end, src, dst, smac, bcast, noerr, route, now)
        elif proto == PROTO_TCP:
            self._rx_tcp(frame, buf, off, end, src, dst, bcast, route, now)
        else:
            c["drop_ipv4_unknown_proto"] += 1
            if not noerr:
                self._icmp_error(now, icmpw.DEST_UNREACH, icmpw.UNREACH_PROTO,
                                 buf[ETH_HLEN:end], dst, src, smac)

    def _route(self, dst: bytes, l2bcast: int) -> int:
        """The routing step: one of our addresses (ROUTE_LOCAL), a broadcast or
        multicast (ROUTE_BROADCAST), beyond the gateway (ROUTE_FORWARD: the
        NAT's), or nowhere (ROUTE_NONE: a unicast IP in a link-layer broadcast)."""
        if dst in self._hosts:
            return ROUTE_LOCAL
        if dst[0] >= 224 or dst == self._bcast or dst == self._netaddr or dst[0] == 0:
            return ROUTE_BROADCAST
        return ROUTE_NONE if l2bcast else ROUTE_FORWARD

    def _may_forward(self, buf, end, ttl, proto, src, dst, smac, now) -> bool:
        """A datagram beyond the gateway goes to the NAT if there is one that
        takes outbound traffic and handles its protocol; otherwise answer
        Time Exceeded (TTL spent) or Host Unreachable. Never forwarded: the
        host's loopback by its own name (127/8: only the gateway maps to it,
        and --no-map-host-loopback must hold) and the guest's own network
        (nobody else lives there)."""
        c = self.counters
        if ttl <= 1:
            c["drop_ipv4_ttl_exceeded"] += 1
            self._icmp_error(now, icmpw.TIME_EXCEEDED, 0, buf[ETH_HLEN:end], self._gw_ip,
                             src, smac)
            return False
        fl = self.flows
        if fl is not None and fl.config.outbound and proto in _NAT_PROTOS \
                and dst[0] != LOOPBACK_NET and not self._on_link(dst):
            return True
        c["drop_ipv4_no_route"] += 1
        self._icmp_error(now, icmpw.DEST_UNREACH, icmpw.UNREACH_HOST, buf[ETH_HLEN:end],
                         self._gw_ip, src, smac)
        return False

    # ---------------------------------------------------------------- ICMP
    def _rx_icmp(self, frame, buf, off, end, ihl, tos, src, dst, smac, bcast, reassembled,
                 route, now):
        c = self.counters
        if end - off < 8:
            c["drop_icmp_truncated"] += 1
            return
        verified = not (frame.csum_valid or frame.csum_start) or reassembled
        if (verified and ihl == 20 and route == ROUTE_LOCAL and buf[off] == icmpw.ECHO_REQUEST
                and buf[off + 1] == 0 and end - ETH_HLEN <= self._mtu):
            # The hot path: an echo request to one of our addresses, answered
            # in one call that checks its ICMP checksum and builds the reply
            # from it (stack/native EchoReplier). The counters are the
            # ones the general path below would count for the same frame.
            ident = (self._ip_id + 1) & 0xFFFF
            r = self._echo(buf, end, ident)
            if r is None:
                c["drop_icmp_bad_checksum"] += 1
                return
            self._ip_id = ident
            c["icmp_echo"] += 1
            self._emit(Frame(r))
            return
        if verified and ones_sum(buf[off:end]) != 0xFFFF:
            c["drop_icmp_bad_checksum"] += 1
            return
        t = buf[off]
        if route == ROUTE_FORWARD:
            if t != icmpw.ECHO_REQUEST or buf[off + 1] != 0:
                c["drop_nat_icmp_type"] += 1
                return
            _t, _code, _cs, ident, seq = icmpw.HEADER.unpack_from(buf, off)
            self.flows.icmp_from_guest(now, src, dst, ident, seq, buf[off + 8:end])
            return
        if t != icmpw.ECHO_REQUEST:
            c["icmp_rx_type_%d" % t if t < 19 else "icmp_rx_type_other"] += 1
            return
        if bcast:
            c["icmp_echo_broadcast_ignored"] += 1
            return
        if buf[off + 1] != 0:
            c["drop_icmp_bad_code"] += 1
            return
        c["icmp_echo"] += 1
        # Options, a partial checksum, or over the MTU (reassembled): a
        # fresh reply through _send_ip (fragmented if need be).
        msg = bytearray(buf[off:end])
        msg[0] = 0
        msg[2] = msg[3] = 0
        cs = checksum(msg)
        msg[2] = cs >> 8
        msg[3] = cs & 0xFF
        self._send_ip(dst, src, 1, msg, now, dst_mac=smac, tos=tos)

    def _icmp_error(self, now, typ, code, orig, src_ip, dst_ip, dst_mac, rest: int = 0) -> None:
        """Send an ICMP error about IP packet `orig` (header onwards), unless
        RFC 1122 forbids it or the rate limit says no."""
        c = self.counters
        if len(orig) < 20:
            return
        ihl = (orig[0] & 15) << 2
        ff = (orig[6] << 8) | orig[7]
        if not icmpw.may_send_error(orig[9], ff, orig[ihl:ihl + 1], False, orig[12:16]):
            c["icmp_err_suppressed"] += 1
            return
        if not self._errors.take(now):
            c["icmp_err_ratelimited"] += 1
            return
        c["icmp_err_tx"] += 1
        self._send_ip(src_ip, dst_ip, 1, icmpw.build_error(typ, code, orig, rest), now,
                      dst_mac=dst_mac)

    # ----------------------------------------------------------------- UDP
    def _rx_udp(self, frame, buf, off, end, src, dst, smac, bcast, noerr, route, now) -> None:
        c = self.counters
        if end - off < 8:
            c["drop_udp_truncated"] += 1
            return
        sport, dport, ulen, ucs = _UDPH.unpack_from(buf, off)
        if ulen < 8 or off + ulen > end:
            c["drop_udp_bad_length"] += 1
            return
        uend = off + ulen
        if ucs and not (frame.csum_valid or frame.csum_start):
            if l4_sum(buf, off, ulen, src, dst, 17) != 0xFFFF:
                c["drop_udp_bad_checksum"] += 1
                return
        c["udp_rx"] += 1
        if route == ROUTE_LOCAL or bcast:
            # Local services first (the built-in ones, DHCP, DNS...).
            if self.udp.deliver(src, dst, sport, dport, buf[off + 8:uend], bcast):
                return
        fl = self.flows
        if fl is not None and not bcast and (route == ROUTE_FORWARD or dst == self._gw_ip):
            if fl.udp_from_guest(now, src, sport, dst, dport,
                                 memoryview(buf)[off + 8:uend]):
                return
        c["drop_udp_no_socket"] += 1
        if not noerr:
            self._icmp_error(now, icmpw.DEST_UNREACH, icmpw.UNREACH_PORT, buf[14:end],
                             dst, src, smac)

    def udp_expressed(self, now: float, fid: int, datagrams: int, nbytes: int, mac: bytes) -> None:
        """DATAGRAMS of NAT flow FID (NBYTES of payload) from the guest's MAC went
        to the host without passing through receive() (the device's UDP express,
        vhostnet/hostnet/express.py, which takes only frames receive() would
        have handed to the flow unchanged): what receive() would have counted
        and refreshed for them."""
        if now > self._now:
            self._now = now
        c = self.counters
        c["rx_frames"] += datagrams
        c["udp_rx"] += datagrams
        e = self.arp.entries.get(self._guest_ip)
        if e is not None and e[0] == mac:
            e[1] = now + self.arp.ttl
        self.flows.udp_expressed(now, fid, nbytes)

    def _udp_output(self, src_ip, dst_ip, src_port, dst_port, payload, dst_mac=None) -> None:
        n = 8 + len(payload)
        d = bytearray(_UDPH.pack(src_port, dst_port, n, 0))
        d += payload
        self.counters["udp_tx"] += 1
        self._send_ip(src_ip, dst_ip, 17, d, self._now, csum_off=6, dst_mac=dst_mac)

    # ----------------------------------------------------------------- TCP
    def _rx_tcp(self, frame, buf, off, end, src, dst, bcast, route, now) -> None:
        c = self.counters
        if self.tcp is None:
            c["drop_tcp_unavailable"] += 1
            return
        if bcast:
            c["drop_tcp_broadcast"] += 1
            return
        if end - off < 20:
            c["drop_tcp_truncated"] += 1
            return
        if not (frame.csum_valid or frame.csum_start):
            if l4_sum(buf, off, end - off, src, dst, 6) != 0xFFFF:
                c["drop_tcp_bad_checksum"] += 1
                return
        c["tcp_rx"] += 1
        # Routed: a SYN no local listener takes goes to the NAT (held for it).
        routed = self.flows is not None and (route == ROUTE_FORWARD or dst == self._gw_ip)
        self.tcp.receive(now, src, dst, memoryview(buf)[off:end], routed)

    def _tcp_emit(self, src_ip: bytes, dst_ip: bytes, segment: bytearray, gso_size: int) -> None:
        # The layer reserved FRAME_HEADROOM in front (TcpLayer headroom): the
        # frame is built in place.
        self.counters["tcp_tx_segments"] += 1
        self._send_ip(src_ip, dst_ip, 6, segment, self._now, csum_off=16, df=True,
                      gso_size=gso_size, in_place=True)

    # --------------------------------------------------- for the flow table
    def _set_now(self, now: float) -> None:
        """A call into the flow table brings the device side's clock."""
        if now > self._now:
            self._now = now
        if self.tcp is not None and now > self.tcp.now:
            self.tcp.now = now

    def _icmp_output(self, src: bytes, dst: bytes, msg: bytearray) -> None:
        msg[2] = msg[3] = 0
        cs = checksum(msg)
        msg[2] = cs >> 8
        msg[3] = cs & 0xFF
        self.counters["nat_icmp_tx"] += 1
        self._send_ip(src, dst, PROTO_ICMP, msg, self._now)

    def _nat_icmp_error(self, typ: int, code: int, quote: bytes, src: bytes, dst: bytes) -> None:
        self._icmp_error(self._now, typ, code, quote, src, dst, None)

    # -------------------------------------------------------------- output
    def _emit(self, f: Frame) -> None:
        if len(self._out) >= self.max_out:
            # Nobody is taking frames: refuse new ones rather than grow.
            self.counters["drop_tx_queue_full"] += 1
            return
        self.counters["tx_frames"] += 1
        self._out.append(f)

    def _send_ip(self, src, dst, proto, l4: bytearray, now, *, csum_off=None, df=False,
                 dst_mac=None, tos=0, gso_size=0, in_place=False) -> None:
        """Wrap an L4 payload in IPv4 + Ethernet and send it to the guest.

        csum_off: offset of an L4 checksum field (zero on entry) that this
        function fills: partial when the guest accepts it and the datagram
        travels whole, else in full. Datagrams over the MTU are fragmented
        unless `df`; gso_size > 0 sends one TSO frame (or software segments).
        in_place: the L4 payload is l4[FRAME_HEADROOM:], the bytes in front
        reserved for the two headers: they are written there and l4 itself
        becomes the frame (one copy of a TCP payload less); csum_off still
        counts from the start of the L4 payload."""
        c = self.counters
        lo = FRAME_HEADROOM if in_place else 0
        n = len(l4) - lo
        mtu = self._mtu
        fits = 20 + n <= mtu
        if 20 + n > 65535:
            c["drop_tx_too_big"] += 1
            return
        if gso_size and fits:
            gso_size = 0
        partial = csum_off is not None and self._csum and (fits or gso_size)
        if csum_off is not None:
            co = lo + csum_off
            if partial:
                ps = pseudo_sum(src, dst, proto, n)
                l4[co] = ps >> 8
                l4[co + 1] = ps & 0xFF
            else:
                cs = (~l4_sum(l4, lo, n, src, dst, proto)) & 0xFFFF
                if cs == 0 and proto == 17:
                    cs = 0xFFFF
                l4[co] = cs >> 8
                l4[co + 1] = cs & 0xFF
        if dst_mac is None:
            dst_mac = self.arp.lookup(dst, now)
        mac = dst_mac if dst_mac is not None else b"\0" * 6
        eth = mac + self._gw_mac + _ETH_IP
        frames = []
        ident = self._ip_id = (self._ip_id + 1) & 0xFFFF
        if fits or gso_size:
            iph = build_header(src, dst, proto, n, ident, FLAG_DF if df else 0, tos=tos)
            if in_place:
                f = l4
                f[:14] = eth
                f[14:FRAME_HEADROOM] = iph
            else:
                f = bytearray(eth)
                f += iph
                f += l4
            if gso_size and not self._tso:
                try:
                    segs = segment_tcp(f, gso_size, partial=self._csum)
                except SegmentError:
                    c["drop_tx_bad_gso"] += 1
                    return
                frames = [Frame(s, 34, csum_off) if self._csum else Frame(s) for s in segs]
            elif gso_size:
                frames = [Frame(f, 34, csum_off, gso_size)]
            else:
                if len(f) < MIN_FRAME:
                    f += bytes(MIN_FRAME - len(f))
                frames = [Frame(f, 34, csum_off) if partial else Frame(f)]
        elif df:
            c["drop_tx_df_too_big"] += 1
            return
        else:
            if in_place:
                l4 = l4[FRAME_HEADROOM:]     # rare (TCP sets df): a copy, then as before
            pieces = fragment_payload(n, mtu)
            last = len(pieces) - 1
            mv = memoryview(l4)
            for i, (o, k) in enumerate(pieces):
                f = bytearray(eth)
                f += build_header(src, dst, proto, k, ident,
                                 (o >> 3) | (FLAG_MF if i != last else 0), tos=tos)
                f += mv[o:o + k]
                if len(f) < MIN_FRAME:
                    f += bytes(MIN_FRAME - len(f))
                frames.append(Frame(f))
            c["tx_fragmented"] += 1
        if dst_mac is None:
            start = False
            for f in frames:
                start = self.arp.enqueue(dst, f, now) or start
            if start:
                self._send_arp_request(dst)
            return
        for f in frames:
            self._emit(f)

