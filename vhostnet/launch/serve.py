"""The composition root: one place that builds and wires the backend.

    make_server()   a Server whose devices share one list of link taps and one LinkSettings
                    (vhostnet/link: the faults in force, the stack-side taps)
    make_backend()  that, plus the control socket and a --pcap tap, from CLI arguments
    serve_backend() all of it as one trio task group, until --once, cancel or SIGTERM

Every object gets what it needs through its constructor here; nothing is
patched in afterwards. Tests and benchmarks build servers through
`make_server` too, so they run what `vhostnet serve` runs.
"""
from __future__ import annotations

import os
import signal

import trio

from stack import NetConfig
from vhostnet.launch.services import services_from_args
from vhostnet.link import LinkSettings
from vhostnet.link.faults import FaultSettings
from vhostnet.net.device import NetDevice
from vhostnet.observe.control import ControlServer, default_control_path
from vhostnet.observe.pcap import FileTap
from vhostnet.ratelimit import RateLimitedLog
from vhostnet.sockets import SocketInUse
from vhostnet.virtio import features as F
from vhostnet.vhostuser.idle_poll import DEFAULT_IDLE_POLL
from vhostnet.vhostuser.server import Server

__all__ = ["make_server", "make_backend", "close_listeners", "serve_backend"]

#: How often a --pcap file is flushed, in seconds: a crash loses at most this much.
PCAP_FLUSH = 0.5


def make_server(socket_path: str, *, config: NetConfig | None = None,
                features: int = F.DEFAULT_FEATURES, rx_pending_limit: int = 1024,
                once: bool = False, rlog: RateLimitedLog | None = None,
                device_rlog: RateLimitedLog | None = None, link: LinkSettings | None = None,
                listener=None, hostnet=None, allow_unsealed_memory: bool = False,
                strict: bool = False, checks: bool = True, safety_poll: bool = True,
                idle_poll: float = DEFAULT_IDLE_POLL, **device_kw) -> Server:
    """A Server making one NetDevice per connection; all share the server's taps
    and LINK (give the same LinkSettings to the ControlServer).
    LISTENER: an already-listening socket to serve instead of binding SOCKET_PATH.
    HOSTNET (vhostnet.hostnet.HostNet): NAT and port forwards; None: the stack
    alone (the gateway's own services only).
    ALLOW_UNSEALED_MEMORY: accept guest memory without F_SEAL_SHRINK (vhostuser/memory.py)."""
    config = config or NetConfig()
    taps: list = []
    link = link if link is not None else LinkSettings()

    def make_device() -> NetDevice:
        return NetDevice(config, features=features, rx_pending_limit=rx_pending_limit,
                         rlog=device_rlog, taps=taps, link_layers=link.compose, hostnet=hostnet,
                         **device_kw)

    return Server(socket_path, make_device, once=once, rlog=rlog, taps=taps, listener=listener,
                  hostnet=hostnet, allow_unsealed_memory=allow_unsealed_memory,
                  strict=strict, checks=checks, safety_poll=safety_poll, idle_poll=idle_poll)


def _net_config(args):
    return NetConfig(guest_ip=args.guest_ip, prefix_len=args.prefix, gateway_ip=args.gateway_ip,
                     dns_ip=args.dns_ip, guest_mac=args.mac, gateway_mac=args.gateway_mac, mtu=args.mtu)


def _features(disabled: list[str]) -> int:
    feats = F.DEFAULT_FEATURES
    for name in disabled:
        if name == "offloads":
            feats &= ~F.OFFLOAD_FEATURES
        elif name in F.BY_NAME:
            feats &= ~(1 << F.BY_NAME[name])
        else:
            raise ValueError(f"unknown feature {name!r}; known: offloads, {', '.join(F.BY_NAME)}")
    return feats


def make_backend(args, socket_path: str, listener=None, control_path: str | None = None):
    """Server, control server and pcap tap, listening; or ValueError/OSError with a message.

    LISTENER: the socket of `serve --fd` (SOCKET_PATH then only names it).
    CONTROL_PATH: the control socket when --control does not say; default
    SOCKET_PATH + ".ctl"."""
    config = _net_config(args)
    feats = _features(args.disable_feature)
    if args.rx_pending < 1:
        raise ValueError("--rx-pending must be at least 1")

    link = LinkSettings(FaultSettings(args.fault))
    from vhostnet.hostnet.options import hostnet_from_args
    hostnet = hostnet_from_args(args, config.guest_ip)     # binds --forward ports now
    net_services, dns_upstreams = services_from_args(args)
    server = make_server(socket_path, config=config, features=feats, listener=listener,
                         rx_pending_limit=args.rx_pending, once=getattr(args, "once", False), link=link,
                         hostnet=hostnet, net_services=net_services, dns_upstreams=dns_upstreams,
                         allow_unsealed_memory=getattr(args, "allow_unsealed_memory", False),
                         queue_pairs=getattr(args, "queues", 1),
                         strict=getattr(args, "strict", False),
                         idle_poll=getattr(args, "idle_poll_us", 0) * 1e-6)
    control = None
    ctl_path = args.control or control_path or default_control_path(socket_path)
    if not args.no_control:
        control = ControlServer(server, ctl_path, complete_csum=not args.raw_csum, link=link)
    tap = None
    try:
        try:
            server.listen()
        except (SocketInUse, OSError) as e:
            raise OSError(f"cannot listen on {socket_path}: {e}") from None
        if control is not None:
            try:
                control.listen()
            except (SocketInUse, OSError) as e:
                raise OSError(f"cannot open the control socket {control.path}: {e}") from None
        if args.pcap:
            try:
                tap = FileTap(args.pcap, complete_csum=not args.raw_csum)
            except OSError as e:
                raise OSError(f"cannot write {args.pcap}: {e.strerror or e}") from None
    except OSError:
        close_listeners(server, control)
        raise
    return server, control, tap


def close_listeners(server, control) -> None:
    """Close the listening sockets; unlink only the paths we bound ourselves."""
    if getattr(server, "hostnet", None) is not None:
        server.hostnet.forwards.close()
    for obj in (server, control):
        if obj is not None and obj.listener is not None:
            obj.listener.close()
            obj.listener = None
            if obj is server and not server.owns_path:
                continue
            path = obj.socket_path if obj is server else obj.path
            try:
                os.unlink(path)
            except OSError:
                pass


async def serve_backend(server, control=None, pcap_tap=None, *, handle_signals: bool = False,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until the server returns (--once), we are cancelled, or SIGTERM/SIGHUP."""
    try:
        async with trio.open_nursery() as nursery:
            if control is not None:
                await nursery.start(control.serve)
            if pcap_tap is not None:
                server.taps.append(pcap_tap)
                nursery.start_soon(_flush_loop, pcap_tap)
            if handle_signals:
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)

            async def server_then_stop():
                await server.serve()
                nursery.cancel_scope.cancel()
            nursery.start_soon(server_then_stop)
            await server.ready.wait()
            task_status.started()
    finally:
        if pcap_tap is not None:
            if pcap_tap in server.taps:
                server.taps.remove(pcap_tap)
            pcap_tap.close()


async def _flush_loop(tap) -> None:
    while True:
        await trio.sleep(PCAP_FLUSH)
        tap.flush()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as sigs:
        async for _ in sigs:
            scope.cancel()
            return


