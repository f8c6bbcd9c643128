"""An in-process vhost-user frontend: what QEMU and a guest driver do, for tests.

Real parts throughout: guest memory is a memfd shared through SCM_RIGHTS,
kicks and calls are eventfds, and the messages go over a Unix socket to the
real server. The "driver" half writes split-ring descriptors and avail
entries into that memory and reads the used ring back, so tests can also
play a hostile driver (bad addresses, loops, index jumps) with raw writes.

PAIRS > 1 plays QEMU's multiqueue (-netdev vhost-user,queues=N): the rings
of pair k are 2k (RX) and 2k+1 (TX), each pair laid out like pair 0 in its
own PAIR_SPAN of guest memory; the handshake repeats SET_FEATURES per pair
as QEMU's one vhost_dev per pair does. `rx`/`tx` are pair 0's rings;
`pair_rings[k]` is (rx, tx) of pair k, and the frame helpers take `pair=`.
"""
from __future__ import annotations

import array
import fcntl
import os
import socket
import struct

import time

import trio

from vhostnet.vhostuser import protocol as P
from vhostnet.vhostuser.protocol import Req

HDR = struct.Struct("<III")
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")
ADDR = struct.Struct("<IIQQQQ")
REGION = struct.Struct("<QQQQ")
NET_HDR = struct.Struct("<BBHHHHH")
DESC = struct.Struct("<QIHH")

UVA_BASE = 0x7F00_0000_0000
RING_PACKED_BIT = 1 << 34   # virtio 1.2 §6: VIRTIO_F_RING_PACKED
PACKED_FRESH_BASE = 1 << 15 | 1 << 31   # avail and used wrap counters 1, both indices 0
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
RXQ, TXQ = 0, 1
# Guest memory per queue pair: its rings and buffers at the same offsets as pair 0's.
PAIR_SPAN = 32 << 20


class Ring:
    """The driver's side of one split virtqueue in shared memory."""

    def __init__(self, mem: memoryview, index: int, size: int, desc: int, avail: int, used: int,
                 buf_base: int, buf_size: int):
        self.mem, self.index, self.size = mem, index, size
        self.desc, self.avail, self.used = desc, avail, used
        self.buf_base, self.buf_size = buf_base, buf_size
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}
        self.auto_used_event = True
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def buf(self, i: int) -> int:
        return self.buf_base + i * self.buf_size

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        DESC.pack_into(self.mem, self.desc + 16 * i, addr, length, flags, nxt)

    def add(self, bufs: list[tuple[int, int, int]]) -> int:
        """bufs = [(addr, len, flags)], NEXT filled in. Returns the head."""
        if len(bufs) > len(self.free):
            raise RuntimeError("ring full")
        ids = [self.free.pop() for _ in bufs]
        for k, (addr, length, flags) in enumerate(bufs):
            nxt = ids[k + 1] if k + 1 < len(ids) else 0
            self.write_desc(ids[k], addr, length, flags | (F_NEXT if k + 1 < len(ids) else 0), nxt)
        self.chains[ids[0]] = ids
        self.push_avail(ids[0])
        return ids[0]

    def push_avail(self, head: int) -> None:
        struct.pack_into("<H", self.mem, self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem[self.avail + 2:self.avail + 4] = struct.pack("<H", self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem[self.avail + 2:self.avail + 4] = struct.pack("<H", self.avail_idx)

    def start_at(self, idx: int) -> None:
        """A ring that has already run IDX entries (as after a reconnect): both indices at IDX."""
        self.avail_idx = self.last_used = idx & 0xFFFF
        struct.pack_into("<H", self.mem, self.avail + 2, self.avail_idx)
        struct.pack_into("<H", self.mem, self.used + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        struct.pack_into("<H", self.mem, self.avail, flags)

    def set_used_event(self, v: int) -> None:
        struct.pack_into("<H", self.mem, self.avail + 4 + 2 * self.size, v)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.mem, self.used + 2)[0]

    def avail_event(self) -> int:
        return struct.unpack_from("<H", self.mem, self.used + 4 + 8 * self.size)[0]

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.size
            head, length = struct.unpack_from("<II", self.mem, self.used + 4 + 8 * slot)
            out.append((head, length))
            for i in self.chains.pop(head, [head]):
                if i not in self.free:
                    self.free.append(i)
            self.last_used = (self.last_used + 1) & 0xFFFF
        # Like Linux's virtqueue_enable_cb with EVENT_IDX: interrupt me at the next one.
        if self.auto_used_event:
            self.set_used_event(self.last_used)
        return out

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def calls(self) -> int:
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0

    async def wait_call(self, timeout: float = 5.0) -> bool:
        with trio.move_on_after(timeout):
            while True:
                if self.calls():
                    return True
                await trio.lowlevel.wait_readable(self.call_fd)
        return False

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# What QEMU's memory-backend-memfd does with seal=on, its default (qemu_memfd_alloc).
QEMU_SEALS = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


class Frontend:
    def __init__(self, mem_size: int = 32 << 20, queue_size: int = 256, two_regions: bool = False,
                 sealed: bool = True, packed: bool = False, pairs: int = 1):
        if pairs > 1:
            mem_size = max(mem_size, PAIR_SPAN * pairs)
        self.mem_size = mem_size
        # Guest RAM as QEMU makes it: a memfd, sealed against growing and shrinking
        # (sealed=False plays a front-end that does not seal, e.g. memory-backend-memfd,seal=off).
        self.memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealed else 0))
        os.ftruncate(self.memfd, mem_size)
        if sealed:
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, QEMU_SEALS)
        import mmap
        self.mm = mmap.mmap(self.memfd, mem_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.mem = memoryview(self.mm)
        self.two_regions = two_regions
        self.qsize = queue_size
        n = queue_size
        # Rings low in memory, RX buffers at 1 MiB, TX buffers (64 KiB + header each) at 4 MiB.
        # packed=True: packed rings (virtio 1.2 §2.8, testing/packed_driver.py), RING_PACKED negotiated.
        self.packed = packed
        if packed:
            from vhostnet.testing.packed_driver import frontend_ring as Ring_
        else:
            Ring_ = Ring
        self.pair_rings = []
        for k in range(pairs):
            b = k * PAIR_SPAN
            rx = Ring_(self.mem, 2 * k + RXQ, n, b + 0x1000, b + 0x1000 + 16 * n, b + 0x1000 + 16 * n + 0x2000,
                       b + 0x100000, 0x1000)
            tx = Ring_(self.mem, 2 * k + TXQ, n, b + 0x40000, b + 0x40000 + 16 * n,
                       b + 0x40000 + 16 * n + 0x2000, b + 0x400000, 0x10000 + 0x100)
            assert tx.buf(n - 1) + tx.buf_size <= b + (PAIR_SPAN if pairs > 1 else mem_size), \
                "guest memory too small for the TX buffers"
            self.pair_rings.append((rx, tx))
        self.rx, self.tx = self.pair_rings[0]
        self.rings = [r for pair in self.pair_rings for r in pair]
        self.sock: trio.socket.SocketType | None = None
        self.features = 0
        self.protocol_features = 0
        self.hdr_len = 12

    # -- messages --------------------------------------------------------

    async def connect(self, path: str) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await self.sock.connect(path)

    async def send_raw(self, data: bytes, fds=()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        await self.sock.sendmsg([data], anc)

    async def recv_reply(self, timeout: float = 5.0) -> tuple[int, int, bytes]:
        with trio.fail_after(timeout):
            head = b""
            while len(head) < 12:
                chunk = await self.sock.recv(12 - len(head))
                if not chunk:
                    raise EOFError("backend closed the connection")
                head += chunk
            req, flags, size = HDR.unpack(head)
            body = b""
            while len(body) < size:
                chunk = await self.sock.recv(size - len(body))
                if not chunk:
                    raise EOFError("backend closed the connection")
                body += chunk
        return req, flags, body

    async def request(self, req: int, payload: bytes = b"", fds=(), need_reply: bool = False,
                      expect_reply: bool | None = None):
        flags = P.FLAG_VERSION | (P.FLAG_NEED_REPLY if need_reply else 0)
        await self.send_raw(HDR.pack(req, flags, len(payload)) + payload, fds)
        if expect_reply is None:
            expect_reply = need_reply or req in (Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES,
                                                 Req.GET_QUEUE_NUM, Req.GET_VRING_BASE, Req.GET_CONFIG)
        if not expect_reply:
            return None
        rreq, rflags, body = await self.recv_reply()
        assert rreq == req, f"reply for request {rreq}, expected {req}"
        assert rflags & P.FLAG_REPLY
        return body

    async def get_u64(self, req: int) -> int:
        return U64.unpack(await self.request(req))[0]

    async def ack(self, req: int, payload: bytes = b"", fds=()) -> int:
        """Send with NEED_REPLY (REPLY_ACK negotiated); returns the status (0 = ok)."""
        return U64.unpack(await self.request(req, payload, fds, need_reply=True))[0]

    def mem_table(self) -> tuple[bytes, list[int]]:
        if self.two_regions:
            half = self.mem_size // 2
            regions = [(0, half, UVA_BASE, 0), (half, half, UVA_BASE + half, half)]
        else:
            regions = [(0, self.mem_size, UVA_BASE, 0)]
        payload = struct.pack("<II", len(regions), 0) + b"".join(REGION.pack(*r) for r in regions)
        return payload, [self.memfd] * len(regions)

    async def handshake(self, features: int | None = None, enable: bool = True,
                        reply_ack: bool = True, base: int = 0) -> None:
        """The sequence QEMU 7.2 sends for -netdev vhost-user + virtio-net-pci."""
        offered = await self.get_u64(Req.GET_FEATURES)
        pf = await self.get_u64(Req.GET_PROTOCOL_FEATURES)
        self.protocol_features = pf if reply_ack else pf & ~(1 << P.ProtoFeat.REPLY_ACK)
        await self.request(Req.SET_PROTOCOL_FEATURES, U64.pack(self.protocol_features))
        await self.request(Req.SET_OWNER)
        # QEMU 7.2 disables the rings (and hands over call fds) before it
        # has sent SET_FEATURES.
        for r in self.rings:
            await self.request(Req.SET_VRING_CALL, U64.pack(r.index), [r.call_fd])
            await self.request(Req.SET_VRING_ENABLE, STATE.pack(r.index, 0))
        if features is None:
            features = offered
        # The ring format is the frontend's, whatever the caller's feature set says.
        features = features | RING_PACKED_BIT if self.packed else features & ~RING_PACKED_BIT
        self.features = features
        await self.request(Req.SET_FEATURES, U64.pack(self.features))
        for r in self.rings:
            if getattr(r, "packed", False):
                r.event_idx = bool(self.features >> 29 & 1)
        self.hdr_len = 12 if self.features & (1 << 32 | 1 << 15) else 10
        payload, fds = self.mem_table()
        await self.request(Req.SET_MEM_TABLE, payload, fds)
        for k, pair in enumerate(self.pair_rings):
            if k:
                # QEMU: each pair's vhost_dev sends its own SET_FEATURES (not SET_MEM_TABLE: one-time).
                await self.request(Req.SET_FEATURES, U64.pack(self.features))
            for r in pair:
                if base:
                    r.start_at(base)
                await self.setup_ring(r, base or None)   # None: a fresh ring of its format
        if enable and self.features >> 30 & 1:
            for r in self.rings:
                await self.request(Req.SET_VRING_ENABLE, STATE.pack(r.index, 1))
        # A round trip so every message above has been handled.
        await self.get_u64(Req.GET_FEATURES)

    async def setup_ring(self, r: Ring, base: int | None = None) -> None:
        if base is None:
            # A fresh ring; a packed one starts with both wrap counters at 1
            # (virtio 1.2 §2.8.1), as QEMU sends it (vhost-user.rst "Ring states").
            base = PACKED_FRESH_BASE if getattr(r, "packed", False) else 0
        await self.request(Req.SET_VRING_NUM, STATE.pack(r.index, r.size))
        await self.request(Req.SET_VRING_BASE, STATE.pack(r.index, base))
        await self.request(Req.SET_VRING_ADDR, ADDR.pack(r.index, 0, UVA_BASE + r.desc,
                                                         UVA_BASE + r.used, UVA_BASE + r.avail, 0))
        await self.request(Req.SET_VRING_CALL, U64.pack(r.index), [r.call_fd])
        await self.request(Req.SET_VRING_KICK, U64.pack(r.index), [r.kick_fd])

    async def get_vring_base(self, index: int) -> int:
        body = await self.request(Req.GET_VRING_BASE, STATE.pack(index, 0))
        return STATE.unpack(body)[1]

    # -- driver: frames --------------------------------------------------

    def net_hdr(self, flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0,
                num_buffers=0) -> bytes:
        h = NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)
        return h[:self.hdr_len]

    async def enable_pair(self, pair: int, on: bool) -> None:
        """SET_VRING_ENABLE on both rings of PAIR, as QEMU does when the guest changes the pairs in use."""
        for r in self.pair_rings[pair]:
            await self.request(Req.SET_VRING_ENABLE, STATE.pack(r.index, int(on)))
        await self.get_u64(Req.GET_FEATURES)   # a round trip: handled

    def post_tx(self, frame: bytes, hdr: bytes | None = None, split: bool = False, pair: int = 0) -> int:
        """Place one frame (with its virtio-net header) in the TX ring. Does not kick."""
        r = self.pair_rings[pair][1]
        hdr = self.net_hdr() if hdr is None else hdr
        slot = r.free[-1]
        addr = r.buf(slot)
        if split:
            self.mem[addr:addr + len(hdr)] = hdr
            self.mem[addr + 0x80:addr + 0x80 + len(frame)] = frame
            return r.add([(addr, len(hdr), 0), (addr + 0x80, len(frame), 0)])
        data = hdr + frame
        self.mem[addr:addr + len(data)] = data
        return r.add([(addr, len(data), 0)])

    def post_rx(self, count: int | None = None, size: int = 0x1000, pair: int = 0) -> int:
        r = self.pair_rings[pair][0]
        n = 0
        while r.free and (count is None or n < count):
            slot = r.free[-1]
            r.add([(r.buf(slot), size, F_WRITE)])
            n += 1
        return n

    def read_rx(self, pair: int = 0) -> list[tuple[bytes, bytes]]:
        """(virtio-net header, frame) for every RX buffer the device returned."""
        out = []
        rx = self.pair_rings[pair][0]
        pending: list[tuple[int, int]] = rx.take_used()
        i = 0
        while i < len(pending):
            head, length = pending[i]
            if length == 0:   # a buffer the device refused, returned unused
                i += 1
                continue
            data = bytes(self.mem[rx.buf(head):rx.buf(head) + length])
            hdr = data[:self.hdr_len]
            nbuf = NET_HDR.unpack(hdr)[6] if self.hdr_len == 12 and self.features >> 15 & 1 else 1
            body = data[self.hdr_len:]
            for k in range(1, nbuf):
                h2, l2 = pending[i + k]
                body += bytes(self.mem[rx.buf(h2):rx.buf(h2) + l2])
            out.append((hdr, body))
            i += max(nbuf, 1)
        return out

    async def exchange(self, frames: list[bytes], want: int, timeout: float = 5.0) -> list[bytes]:
        """Send frames, then collect at least `want` frames from the device."""
        for f in frames:
            self.post_tx(f)
        self.tx.kick()
        got: list[bytes] = []
        with trio.move_on_after(timeout):
            while len(got) < want:
                got.extend(b for _h, b in self.read_rx())
                if len(got) >= want:
                    break
                if self.rx.free:
                    self.post_rx()
                    self.rx.kick()
                await self.rx.wait_call(0.05)
        self.tx.take_used()
        return got

    async def flood(self, frame: bytes, deadline: float, window: int) -> int:
        """Keep WINDOW copies of FRAME in flight until time.perf_counter() passes
        DEADLINE, one kick per refill; the frames the device answered with."""
        done = in_flight = 0
        while time.perf_counter() < deadline:
            while in_flight < window and self.tx.free:
                self.post_tx(frame)
                in_flight += 1
            self.tx.kick()
            await self.rx.wait_call(1.0)
            got = self.read_rx()
            done += len(got)
            in_flight -= len(got)
            self.tx.take_used()
            self.post_rx()
            self.rx.kick()
        return done

    async def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def shutdown(self, server, timeout: float = 5.0) -> None:
        """Disconnect, wait until the server has torn the connection down, free memory."""
        await self.close()
        with trio.fail_after(timeout):
            while server.current is not None:
                await trio.sleep(0.005)
        self.release()

    def release(self) -> None:
        for r in self.rings:
            r.close()
        self.mem.release()
        self.mm.close()
        os.close(self.memfd)


# -- raw messages and fds of every kind (for the fuzzer and hostile tests) ----

def encode_message(req: int, payload: bytes = b"", flags: int = P.FLAG_VERSION,
                   size: int | None = None) -> bytes:
    """One vhost-user message as bytes; SIZE overrides the header's length field."""
    return HDR.pack(req, flags, len(payload) if size is None else size) + payload


def send_message(sock: socket.socket, data: bytes, fds=()) -> None:
    """Blocking send of one message with its fds (SCM_RIGHTS)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    view = memoryview(data)
    sent = sock.sendmsg([view], anc)
    if sent < len(view):
        sock.sendall(view[sent:])


def recv_message(sock: socket.socket) -> tuple[int, int, bytes] | None:
    """Blocking read of one reply (request, flags, payload); None at EOF.

    Honours the socket's timeout (socket.timeout propagates).
    """
    head = _recv_exact(sock, HDR.size)
    if head is None:
        return None
    req, flags, size = HDR.unpack(head)
    if size > P.MAX_PAYLOAD:
        raise ValueError(f"reply to request {req} claims {size} bytes of payload")
    body = _recv_exact(sock, size) if size else b""
    if body is None:
        return None
    return req, flags, body


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


#: Every kind of fd a front-end can attach to a message, for `make_fd`.
FD_KINDS = ("eventfd", "memfd_sealed", "memfd_unsealed", "memfd_empty", "memfd_small",
            "pipe", "pipe_eof", "socket", "socket_eof", "opath", "devnull", "tmpfile")

def _qemu_seals() -> int:
    """QEMU's memory-backend-memfd seals (seal=on): no shrink, no grow, no more seals."""
    import fcntl
    return fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def make_memfd(size: int, sealed: bool, name: str = "guest-ram") -> int:
    """A memfd of SIZE bytes; sealed the way QEMU seals memory-backend-memfd."""
    import fcntl
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _qemu_seals())
    return fd


def make_fd(kind: str, size: int = 1 << 20) -> tuple[int, int | None]:
    """(fd to send, fd we keep to drive it or None). Close both when done.

    The kept fd is the write end of a pipe or the peer of a socket pair, or
    the eventfd itself (a dup) so a kick can be written to it.
    """
    if kind == "eventfd":
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, os.dup(fd)
    if kind == "memfd_sealed":
        return make_memfd(size, True), None
    if kind == "memfd_unsealed":
        return make_memfd(size, False), None
    if kind == "memfd_empty":      # size 0: a region mapped over it has no pages at all
        return make_memfd(0, False), None
    if kind == "memfd_small":      # smaller than any region it is offered for
        return make_memfd(4096, False), None
    if kind in ("pipe", "pipe_eof"):
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        if kind == "pipe_eof":     # always readable, read() returns b"" for ever
            os.close(w)
            return r, None
        return r, w
    if kind in ("socket", "socket_eof"):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fa, fb = a.detach(), b.detach()
        if kind == "socket_eof":
            os.close(fb)
            return fa, None
        os.set_blocking(fb, False)
        return fa, fb
    if kind == "opath":
        return os.open("/", os.O_PATH | os.O_CLOEXEC), None
    if kind == "devnull":
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC), None
    if kind == "tmpfile":
        fd = os.open("/tmp", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
        return fd, None
    raise ValueError(f"unknown fd kind {kind!r}; known: {', '.join(FD_KINDS)}")
