"""The host network: NAT flows to host sockets and port forwards into the guest.

    config.py     HostNetConfig (restrict, services, loopback mapping, caps) and HostNet
    forwards.py   inbound forwards in QEMU hostfwd syntax; server-level listeners
    proxy.py      HostProxy: one per guest connection, pulls the stack's flow events
    tcp_relay.py  one TCP connection: connect/accept/refuse, bytes both ways, FIN/RST
    reactor.py    one epoll, one task, for every TCP relay's host socket (edge-triggered)
    datagram.py   UDP flows (one connected socket each) and ICMP echo (ping sockets)
    options.py    the CLI options, and `vhostnet forward add|remove|list`
    dns.py        the DNS upstream relay (UDP and TCP) behind 10.0.2.3
    tftp_root.py  the one directory TFTP serves, read safely

The stack's side of it (the flow API) is stack/flows.py.
"""
from .config import HostNet, HostNetConfig
from .forwards import ForwardError, ForwardSpec, Forwards

__all__ = ["HostNet", "HostNetConfig", "ForwardError", "ForwardSpec", "Forwards"]
