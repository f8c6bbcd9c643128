"""The two processes of tests/hostnet/test_netns.py, each in a network
namespace of its own that the test created (`unshare -n`, as root).

    backend  (namespace A): the vhostnet server and device as `vhostnet
             serve` builds them, an in-process frontend + our TCP as the
             guest (tests/hostnet/guest.py); veth far0 192.0.2.1/24 (RFC
             5737 TEST-NET-1) towards namespace B. Prints one JSON line of
             results.
    far      (namespace B): the far host, veth far1 192.0.2.2/24, with a TCP
             echo on 7000 and a UDP echo on 7001; nothing on 7002.

The guest talks to 192.0.2.2: not the gateway, not the host's own address,
so every byte takes the NAT's non-gateway path and a real interface.
Nothing leaves the two namespaces (they have no other interface).

    python3 -m tests.hostnet.netns_child backend
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

FAR_IP, NS_IP = "192.0.2.2", "192.0.2.1"
NO_ROUTE_IP = "198.51.100.1"       # RFC 5737 TEST-NET-2: no route in namespace A
ECHO_PORT, UDP_PORT, CLOSED_PORT = 7000, 7001, 7002
ALL_GROUPS = "0 2147483647"         # net.ipv4.ping_group_range: everyone may ping


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def far() -> None:
    """Namespace B: say it is in its namespace, wait for the veth end,
    configure it, serve."""
    # Python runs, so `unshare -n` has made our namespace: only now may the
    # parent move far1 to our pid (before, it would land in the parent's own
    # namespace, which we shared until then, and `ip addr add` fail here).
    print("in-namespace", flush=True)
    sys.stdin.readline()                            # "go": far1 has been moved in
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "addr", "add", f"{FAR_IP}/24", "dev", "far1")
    sh("ip", "link", "set", "far1", "up")
    ls = socket.socket()
    ls.bind((FAR_IP, ECHO_PORT))
    ls.listen(16)
    us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    us.bind((FAR_IP, UDP_PORT))

    def tcp():
        while True:
            c, _ = ls.accept()
            threading.Thread(target=echo, args=(c,), daemon=True).start()

    def echo(c):
        with c:
            while (d := c.recv(65536)):
                c.sendall(d)

    def udp():
        while True:
            d, a = us.recvfrom(65536)
            us.sendto(d.upper(), a)
    threading.Thread(target=tcp, daemon=True).start()
    threading.Thread(target=udp, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.readline()                            # parent closes stdin at the end


def backend() -> None:
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "far0", "type", "veth", "peer", "name", "far1")
    farp = subprocess.Popen(["unshare", "-n", sys.executable, "-m", "tests.hostnet.netns_child",
                             "far"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert farp.stdout.readline().strip() == "in-namespace"
        sh("ip", "link", "set", "far1", "netns", str(farp.pid))
        sh("ip", "addr", "add", f"{NS_IP}/24", "dev", "far0")
        sh("ip", "link", "set", "far0", "up")
        farp.stdin.write("go\n")
        farp.stdin.flush()
        assert farp.stdout.readline().strip() == "ready"
        import trio
        print(json.dumps(trio.run(_guest_tests)), flush=True)
    finally:
        farp.stdin.close()
        farp.wait(timeout=10)


async def _guest_tests() -> dict:
    import tempfile

    import trio
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.packet import Raw

    from vhostnet.hostnet import Forwards, HostNet, HostNetConfig
    from vhostnet.launch.serve import make_server, serve_backend

    from .guest import GUEST_B, FeGuest

    res: dict = {}
    far_b = socket.inet_aton(FAR_IP)
    with tempfile.TemporaryDirectory() as d:
        srv = make_server(os.path.join(d, "v.sock"),
                          hostnet=HostNet(HostNetConfig(connect_timeout=5.0),
                                          Forwards([], "10.0.2.15")))
        srv.listen()
        async with trio.open_nursery() as n:
            await n.start(serve_backend, srv)
            g = await FeGuest.attach(srv, n)
            with trio.fail_after(5):
                while srv.current is None:
                    await trio.sleep(0.005)
            dev = srv.current.device
            # TCP to the far host, 200 KB each way.
            conn = await g.connect(far_b, ECHO_PORT)
            res["tcp_state"] = conn.state.value
            data = os.urandom(200_000)
            await g.send_all(conn, data)
            back = bytearray()
            with trio.fail_after(30):
                while len(back) < len(data):
                    back += conn.recv()
                    g.wake.set()
                    await trio.sleep(0.005)
            res["tcp_echo_ok"] = bytes(back) == data
            res["tcp_host_side"] = dev.stack.flows.snapshot(0)[0]["host"]
            conn.close()
            # A closed port on the far host: its RST becomes ours.
            refused = await g.connect(far_b, CLOSED_PORT)
            res["refused_error"] = refused.error
            # No route: the host's ENETUNREACH becomes ICMP net unreachable.
            g.other.clear()
            g.tcp.connect(g.now(), GUEST_B, 0, socket.inet_aton(NO_ROUTE_IP), 80)
            g.wake.set()
            with trio.fail_after(10):
                while not any(ICMP in p for p in g.other_ip()):
                    await trio.sleep(0.01)
            icmp = [p for p in g.other_ip() if ICMP in p][0]
            res["no_route_icmp"] = [icmp[ICMP].type, icmp[ICMP].code]
            # UDP to the far host.
            g.other.clear()
            g.send_ip(IP(src="10.0.2.15", dst=FAR_IP) / UDP(sport=33333, dport=UDP_PORT)
                      / Raw(b"far away"))
            with trio.fail_after(5):
                while not any(UDP in p for p in g.other_ip()):
                    await trio.sleep(0.005)
            u = [p for p in g.other_ip() if UDP in p][0]
            res["udp"] = [u[IP].src, u[UDP].sport, u[Raw].load.decode()]
            # ICMP echo: first with ping sockets forbidden, then allowed.
            with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
                f.write("1 0")
            g.other.clear()
            g.send_ip(IP(src="10.0.2.15", dst=FAR_IP) / ICMP(type=8, id=77, seq=1) / Raw(b"p"))
            with trio.fail_after(5):
                while not dev.proxy.counters.get("icmp_ping_socket_denied"):
                    await trio.sleep(0.01)
            res["ping_denied"] = dev.proxy.counters["icmp_ping_socket_denied"]
            with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
                f.write(ALL_GROUPS)
            g.send_ip(IP(src="10.0.2.15", dst=FAR_IP) / ICMP(type=8, id=78, seq=5) / Raw(b"ping"))
            with trio.fail_after(5):
                while not any(ICMP in p and p[ICMP].type == 0 for p in g.other_ip()):
                    await trio.sleep(0.01)
            e = [p for p in g.other_ip() if ICMP in p and p[ICMP].type == 0][0]
            res["ping_reply"] = [e[IP].src, e[ICMP].id, e[ICMP].seq, e[Raw].load.decode()]
            n.cancel_scope.cancel()
    return res


if __name__ == "__main__":
    {"far": far, "backend": backend}[sys.argv[1]]()
