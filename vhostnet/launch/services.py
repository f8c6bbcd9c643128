"""Command-line options of the network services (DHCP, DNS, TFTP), and
their translation into what the composition root (serve.py) wires.

    add_service_options(parser)   --no-dhcp, --no-dns, --dns-upstream, --tftp, --bootfile
    services_from_args(args)      -> (ServicesConfig, DNS upstreams); ValueError for bad values

DNS upstreams: every `--dns-upstream ADDR[:PORT]` in order, or else the
nameservers of /etc/resolv.conf. With neither, the guest's queries get
SERVFAIL at once (counted), rather than waiting for a timeout.
"""
from __future__ import annotations

import argparse

from stack.services.config import ServicesConfig
from vhostnet.hostnet.dns import parse_upstream, resolv_conf_upstreams
from vhostnet.hostnet.tftp_root import TftpRoot

__all__ = ["add_service_options", "services_from_args"]

_DESCRIPTION = """\
DHCP on the gateway (10.0.2.2) leases the guest its address with netmask,
router, DNS, MTU and broadcast; DNS on 10.0.2.3 (UDP and TCP) relays queries
verbatim to the upstream resolvers; TFTP (off unless --tftp) serves one
directory read-only. Examples:
  --dns-upstream 127.0.0.1:5353 --dns-upstream 192.0.2.53
  --tftp /srv/tftp --bootfile pxelinux.0
  --no-dhcp --no-dns"""


def _upstream(text: str) -> tuple[str, int]:
    try:
        return parse_upstream(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_service_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network services", _DESCRIPTION)
    g.add_argument("--no-dhcp", action="store_true", help="no DHCP server")
    g.add_argument("--no-dns", action="store_true", help="no DNS relay on the DNS address")
    g.add_argument("--dns-upstream", action="append", type=_upstream, default=[],
                   metavar="ADDR[:PORT]",
                   help="resolver to relay DNS queries to; repeatable, tried in order "
                        "(default: the nameservers of /etc/resolv.conf)")
    g.add_argument("--tftp", metavar="DIR", help="serve DIR read-only over TFTP on the gateway address")
    g.add_argument("--bootfile", metavar="NAME",
                   help="boot file announced by DHCP (option 67 and the 'file' field); needs --tftp")


def services_from_args(args) -> tuple[ServicesConfig, list[tuple[str, int]]]:
    if args.bootfile and not args.tftp:
        raise ValueError("--bootfile needs --tftp DIR")
    files = None
    if args.tftp:
        files = TftpRoot(args.tftp)           # ValueError: not a directory
    cfg = ServicesConfig(dhcp=not args.no_dhcp, dns=not args.no_dns,
                         restrict=bool(getattr(args, "restrict", False)),
                         tftp_files=files, bootfile=args.bootfile)
    upstreams = []
    if cfg.dns:
        upstreams = list(args.dns_upstream) or resolv_conf_upstreams()
    return cfg, upstreams
