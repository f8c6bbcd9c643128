"""The host network's command-line options and the `vhostnet forward` command.

`add_hostnet_options(parser)` adds them to `serve` and `run`;
`hostnet_from_args(args)` turns them into a HostNet (forwards bound at
once, so a port in use is an error before anything starts: ForwardError,
a ValueError, exit status 2 for a bad spec, 1 for a bind failure).
`add_forward_command(sub)` adds `vhostnet forward add|remove|list`, which
talks to a running backend over its control socket.
"""
from __future__ import annotations

import argparse

from .config import DEFAULT_ANSWER_SPIN

__all__ = ["add_hostnet_options", "hostnet_from_args", "add_forward_command", "EPILOG_HOSTNET"]

EPILOG_HOSTNET = """\
Host network (NAT): the guest reaches the host and beyond like QEMU user-net.
TCP, UDP and ping to any address leave from the host's own sockets; the
gateway 10.0.2.2 is the host's 127.0.0.1 (--no-map-host-loopback turns that
off). The gateway keeps its built-in echo/discard/chargen on TCP/UDP 7, 9
and 19; every other gateway port goes to the host, and with --no-services
7, 9 and 19 go to the host too. Ping beyond the gateway needs unprivileged
ping sockets (sysctl net.ipv4.ping_group_range).

  --forward tcp:127.0.0.1:2222-:22        host 127.0.0.1:2222 -> guest port 22
  --forward udp::5353-10.0.2.15:53        every host address, UDP 5353 -> guest 53
  vhostnet forward add tcp:127.0.0.1:8080-:80      while it runs
  vhostnet forward list --json
"""


#: The longest --nat-spin-us: the device step it holds stays far under the 10 ms "slow step".
MAX_SPIN_US = 1000


def add_hostnet_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("host network (NAT and port forwards)")
    g.add_argument("--forward", action="append", default=[], metavar="SPEC",
                   help="forward a host port to the guest, QEMU hostfwd syntax: "
                        "tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT (or udp:); repeatable. "
                        "An empty HOSTADDR binds every address; HOSTPORT 0 takes a free one")
    g.add_argument("--restrict", action="store_true",
                   help="nothing outbound: only forwards and the built-in services (slirp restrict=on)")
    g.add_argument("--no-services", action="store_true",
                   help="no built-in echo/discard/chargen on the gateway: its ports 7, 9, 19 go to the host too")
    g.add_argument("--no-map-host-loopback", action="store_true",
                   help="the gateway address is not the host's 127.0.0.1 (connections to it are refused)")
    g.add_argument("--max-nat-tcp", type=int, default=1000, metavar="N",
                   help="NAT TCP flows at once, inbound and outbound (default %(default)s)")
    g.add_argument("--max-nat-udp", type=int, default=512, metavar="N",
                   help="NAT UDP flows at once (default %(default)s)")
    g.add_argument("--nat-spin-us", type=int, default=round(DEFAULT_ANSWER_SPIN * 1e6), metavar="US",
                   help="after the guest's datagrams (UDP, ping) or TCP bytes go to their host sockets, "
                        "wait up to US microseconds in that same step for the answers, which then reach the guest "
                        "without a wake-up of the backend (a loopback echo answers in 10-30 us). "
                        "8 misses in a row stop it for 1 s, so slow or silent hosts cost little. "
                        "0: never wait (default %(default)s)")
    g.add_argument("--no-express", action="store_true",
                   help="every guest datagram through the stack's whole path: no UDP express "
                        "(by default, a UDP flow's datagrams after its first go from the TX ring "
                        "straight to its host socket, in C; `vhostnet stats` shows it, "
                        "--json under nat.proxy.express)")


def hostnet_from_args(args, guest_ip: str):
    from stack.flows import FlowConfig
    from .config import HostNet, HostNetConfig
    from .forwards import ForwardSpec, Forwards
    if args.max_nat_tcp < 1 or args.max_nat_udp < 1:
        raise ValueError("--max-nat-tcp and --max-nat-udp must be at least 1")
    if not 0 <= args.nat_spin_us <= MAX_SPIN_US:
        raise ValueError(f"--nat-spin-us must be 0..{MAX_SPIN_US}")
    specs = [ForwardSpec.parse(s) for s in args.forward]   # ForwardError is a ValueError
    cfg = HostNetConfig(restrict=args.restrict, services=not args.no_services,
                        map_host_loopback=not args.no_map_host_loopback,
                        answer_spin=args.nat_spin_us * 1e-6, express=not args.no_express,
                        flows=FlowConfig(max_tcp=args.max_nat_tcp, max_udp=args.max_nat_udp,
                                         max_half_open=min(128, args.max_nat_tcp)))
    return HostNet(cfg, Forwards(specs, guest_ip))


EPILOG_FORWARD = """\
Forwards added here live until removed or the backend exits. SPEC is QEMU's
hostfwd syntax: tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, or udp:.
remove matches on protocol, host address and host port.

examples:
  vhostnet forward add tcp:127.0.0.1:2222-:22
  vhostnet forward remove tcp:127.0.0.1:2222-:22
  vhostnet forward list
  vhostnet forward list --json | jq '.[].host'
"""


def add_forward_command(sub, add_client_options, formatter) -> None:
    f = sub.add_parser("forward", help="add, remove or list port forwards of a running backend",
                       formatter_class=formatter, epilog=EPILOG_FORWARD,
                       description="Change the host-to-guest port forwards of a running backend.")
    f.add_argument("action", choices=["add", "remove", "list"])
    f.add_argument("spec", nargs="?", metavar="SPEC", help="the forward (add, remove)")
    f.add_argument("--json", action="store_true", help="print JSON (docs/json.md)")
    add_client_options(f)


def cmd_forward(args, control_path: str) -> int:
    import json
    import sys

    from vhostnet.observe.control import ControlClient, ControlError
    from .forwards import ForwardError, ForwardSpec
    if args.action in ("add", "remove"):
        if not args.spec:
            print(f"vhostnet: forward {args.action} needs a SPEC, e.g. tcp:127.0.0.1:2222-:22",
                  file=sys.stderr)
            return 2
        try:
            ForwardSpec.parse(args.spec)
        except ForwardError as e:
            print(f"vhostnet: {e}", file=sys.stderr)
            return 2
    elif args.spec:
        print("vhostnet: forward list takes no SPEC", file=sys.stderr)
        return 2
    try:
        with ControlClient(control_path) as c:
            if args.action == "list":
                doc = c.request("forward_list")
            else:
                doc = c.request("forward_" + args.action, spec=args.spec)
    except ControlError as e:
        print(f"vhostnet: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    elif args.action == "list":
        print(forwards_text(doc))
    else:
        print(f"{args.action.replace('add', 'added').replace('remove', 'removed')} "
              f"{doc['spec']}: host {doc['host']} -> guest {doc['guest']}")
    return 0


def forwards_text(fwds: list[dict]) -> str:
    if not fwds:
        return "no forwards"
    lines = [f"{'PROTO':<6} {'HOST':<22} {'GUEST':<22} {'ACCEPTED':>9} {'REFUSED':>8}"]
    lines += [f"{f['proto']:<6} {f['host']:<22} {f['guest']:<22} {f['accepted']:>9} {f['refused']:>8}"
              for f in fwds]
    return "\n".join(lines)
