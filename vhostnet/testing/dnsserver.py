"""A tiny authoritative DNS server on 127.0.0.1 for tests and benchmarks (dnspython + trio).

Tests point `--dns-upstream` here, never at the host's resolver (which is
off-machine). It serves one made-up zone, `test.`:

    NAME.test.       A 192.0.2.N for a few fixed names (see RECORDS)
    big.test.        40 A records: over UDP the answer is TC with no records
                     (as a server does when the answer does not fit), over
                     TCP the whole set
    silent.test.     never answered (to test timeouts)
    anything else    NXDOMAIN

UDP and TCP on the same port. `queries` counts what arrived by transport.
Use: `async with DnsTestServer() as srv: ... srv.port ...`, or
`await nursery.start(srv.serve)`.
"""
from __future__ import annotations

import errno
import socket
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import trio

__all__ = ["DnsTestServer", "RECORDS", "BIG_COUNT"]

RECORDS = {"host.test.": "192.0.2.7", "www.test.": "192.0.2.8", "guest.test.": "192.0.2.9"}
BIG_COUNT = 40
UDP_LIMIT = 512                       # RFC 1035 §4.2.1 without EDNS
BIND_ATTEMPTS = 20                    # port numbers tried for a UDP+TCP pair (port 0)


class DnsTestServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self.queries = {"udp": 0, "tcp": 0}
        self._udp = None
        self._tcp = None
        self._nursery = None

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        q = dns.message.from_wire(wire)
        name = q.question[0].name.to_text().lower()
        if name == "silent.test.":
            return None
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        is_a = q.question[0].rdtype == dns.rdatatype.A
        if name in RECORDS:
            if is_a:                  # other types: NOERROR without records (NODATA)
                r.answer.append(dns.rrset.from_text(name, 300, "IN", "A", RECORDS[name]))
        elif name == "big.test.":
            if transport == "udp":
                r.flags |= dns.flags.TC
            elif is_a:
                r.answer.append(dns.rrset.from_text_list(
                    name, 300, "IN", "A", [f"198.51.100.{i}" for i in range(1, BIG_COUNT + 1)]))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
        return r.to_wire()

    async def __aenter__(self):
        self._cm = trio.open_nursery()
        nursery = await self._cm.__aenter__()
        try:
            await nursery.start(self.serve)
        except BaseException as e:      # e.g. the port is taken: close the nursery too
            if not await self._cm.__aexit__(type(e), e, e.__traceback__):
                raise
        self._nursery = nursery
        return self

    async def __aexit__(self, *exc):
        self._nursery.cancel_scope.cancel()
        return await self._cm.__aexit__(*exc)

    async def _bind_pair(self):
        """A UDP and a TCP socket on one port. With port 0 the kernel picks
        the UDP port, and that number may be taken for TCP by someone else
        (other tests, other agents' servers): then try another, a bounded
        number of times."""
        for attempt in range(BIND_ATTEMPTS):
            udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                await udp.bind((self.host, self.port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await tcp.bind((self.host, port))
                return udp, tcp, port
            except OSError as e:
                udp.close()
                tcp.close()
                if self.port != 0 or e.errno != errno.EADDRINUSE or attempt == BIND_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        udp, tcp, self.port = await self._bind_pair()
        tcp.listen(16)
        listeners = [trio.SocketListener(tcp)]
        with udp:
            async with trio.open_nursery() as n:
                n.start_soon(self._udp_loop, udp)
                n.start_soon(trio.serve_listeners, self._tcp_conn, listeners)
                task_status.started(self.port)

    async def _udp_loop(self, udp) -> None:
        while True:
            data, peer = await udp.recvfrom(65535)
            self.queries["udp"] += 1
            try:
                a = self.answer(data, "udp")
            except Exception:
                continue
            if a is not None:
                await udp.sendto(a, peer)

    async def _tcp_conn(self, stream) -> None:
        async with stream:
            buf = b""
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    n = struct.unpack("!H", buf[:2])[0]
                    msg, buf = buf[2:2 + n], buf[2 + n:]
                    self.queries["tcp"] += 1
                    try:
                        a = self.answer(msg, "tcp")
                    except Exception:
                        continue
                    if a is not None:
                        await stream.send_all(struct.pack("!H", len(a)) + a)


def main(argv=None) -> None:
    """`python -m vhostnet.testing.dnsserver [--port N]`: serve on 127.0.0.1 in
    its own process (benchmarks: the server then does not share our CPU
    time slice); prints "port N" once listening."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(description="the test zone's DNS server on 127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)

    async def run():
        srv = DnsTestServer(port=args.port)
        async with trio.open_nursery() as n:
            port = await n.start(srv.serve)
            print(f"port {port}", flush=True)
            sys.stdout.flush()
    trio.run(run)


if __name__ == "__main__":
    main()
