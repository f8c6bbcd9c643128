"""The `vhostnet` command line."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

EPILOG_SERVE = """\
Start the backend first, then QEMU. Attach a guest with (see `vhostnet qemu-args`):
  -object memory-backend-memfd,id=mem,size=512M,share=on -M q35,memory-backend=mem
  -chardev socket,id=chr0,path=SOCKET -netdev vhost-user,id=net0,chardev=chr0
  -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,vectors=0,romfile=

The guest sees a user-mode network: it is 10.0.2.15/24, the gateway 10.0.2.2
answers ARP and ping and runs echo (TCP/UDP 7), discard (9) and chargen (TCP 19);
DNS is 10.0.2.3. Frames the guest sends to its own address come back to it.
"""


def _add_net_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument("--mac", default="52:54:00:12:34:56", metavar="MAC",
                   help="guest MAC: announced in the device config space and used by the stack "
                        "until the guest's own frames teach it otherwise (default %(default)s). "
                        "QEMU's virtio-net-pci takes its MAC from its own mac= option; give it the same one")
    g.add_argument("--guest-ip", default="10.0.2.15", help="guest address (default %(default)s)")
    g.add_argument("--prefix", type=int, default=24, help="guest network prefix length (default %(default)s)")
    g.add_argument("--gateway-ip", default="10.0.2.2", help="gateway address (default %(default)s)")
    g.add_argument("--dns-ip", default="10.0.2.3", help="DNS address (default %(default)s)")
    g.add_argument("--gateway-mac", default="52:55:0a:00:02:02", help="gateway MAC (default %(default)s)")
    g.add_argument("--mtu", type=int, default=1500, help="link MTU (default %(default)s)")


def _net_config(args):
    from stack import NetConfig
    return NetConfig(guest_ip=args.guest_ip, prefix_len=args.prefix, gateway_ip=args.gateway_ip,
                     dns_ip=args.dns_ip, guest_mac=args.mac, gateway_mac=args.gateway_mac, mtu=args.mtu)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostnet",
        description="A virtio-net device for QEMU over vhost-user, backed by an embedded "
                    "Python TCP/IP stack you can look inside.")
    p.add_argument("--version", action="version", version=f"vhostnet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the backend on a vhost-user socket",
                       description="Listen on a vhost-user Unix socket and serve one QEMU at a time.",
                       epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--socket", required=True, metavar="PATH", help="vhost-user socket to listen on")
    s.add_argument("--once", action="store_true", help="exit when the first QEMU disconnects")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (default %(default)s)")
    s.add_argument("--disable-feature", action="append", default=[], metavar="NAME",
                   help="do not offer a virtio feature; repeatable. Names: csum, guest-csum, "
                        "guest-tso4, host-tso4, mrg-rxbuf, event-idx, indirect-desc, status, mac; "
                        "'offloads' for all four offloads. Handy to test a driver's simple paths")
    s.add_argument("--rx-pending", type=int, default=1024, metavar="N",
                   help="frames held for the guest while it posts no RX buffers, before dropping (default %(default)s)")
    _add_net_options(s)
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _features(disabled: list[str]) -> int:
    from . import features as F
    feats = F.DEFAULT_FEATURES
    for name in disabled:
        if name == "offloads":
            feats &= ~F.OFFLOAD_FEATURES
        elif name in F.BY_NAME:
            feats &= ~(1 << F.BY_NAME[name])
        else:
            raise SystemExit(f"vhostnet: unknown feature {name!r}; known: offloads, {', '.join(F.BY_NAME)}")
    return feats


def cmd_serve(args) -> int:
    import trio
    from .net import NetDevice
    from .server import Server, SocketInUse

    _setup_logging(args.log_level)
    try:
        config = _net_config(args)
    except ValueError as e:
        print(f"vhostnet: {e}", file=sys.stderr)
        return 2
    feats = _features(args.disable_feature)
    if args.rx_pending < 1:
        print("vhostnet: --rx-pending must be at least 1", file=sys.stderr)
        return 2

    def make_device():
        return NetDevice(config, features=feats, rx_pending_limit=args.rx_pending)

    server = Server(args.socket, make_device, once=args.once)
    try:
        server.listen()
    except (SocketInUse, OSError) as e:
        print(f"vhostnet: cannot listen on {args.socket}: {e}", file=sys.stderr)
        return 1
    try:
        trio.run(server.serve)
    except KeyboardInterrupt:
        logging.getLogger("vhostnet").info("interrupted; exiting")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return {"serve": cmd_serve}[args.command](args)
