"""The control socket against the real server and the in-process frontend:
inspect/desc/stats documents (checked against docs/json.md), several
clients, garbage, stalls, captures."""
import json
import os
import socket
import stat

import pytest
import trio
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from stack import native
from vhostnet.observe import control
from vhostnet.observe.control import ControlClient, ControlError, ControlServer
from vhostnet.launch.serve import serve_backend

from .device.conftest import make_server
from vhostnet.testing.frontend import F_INDIRECT, F_NEXT, F_WRITE, Frontend
from .device.test_datapath import arp_request, ping
from .observe import ask, backend, check_doc, guest, sockdir  # noqa: F401 (fixtures)


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _lines(sock: socket.socket, n: int) -> list[dict]:
    f = sock.makefile("rb")
    return [json.loads(f.readline()) for _ in range(n)]


# -- the socket itself ---------------------------------------------------------------

async def test_control_socket_private_and_removed_on_exit(sockdir):
    srv = make_server(sockdir / "v.sock")
    ctl = ControlServer(srv, str(sockdir / "v.sock.ctl"))
    async with trio.open_nursery() as n:
        await n.start(serve_backend, srv, ctl)
        mode = os.stat(ctl.path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert (await ask(ctl.path, "ping"))["connected"] is False
        n.cancel_scope.cancel()
    assert not os.path.exists(ctl.path)
    assert not os.path.exists(srv.socket_path)


async def test_no_backend_is_a_clear_error(sockdir):
    with pytest.raises(ControlError, match="no control socket at .*vhostnet serve"):
        ControlClient(str(sockdir / "nothing.ctl"))


# -- inspect ---------------------------------------------------------------------------

async def test_inspect_without_qemu(backend):
    srv, ctl = backend
    doc = await ask(ctl.path, "inspect")
    assert set(doc) == {"version", "backend", "connected"}
    assert doc["connected"] is False
    assert doc["backend"]["socket"] == srv.socket_path
    assert doc["backend"]["control"] == ctl.path
    check_doc(doc, "inspect", allow_missing=[k for k in ("features", "protocol_features", "owner", "mtu",
                                                          "hdr_len", "mergeable_rx_buffers", "offloads",
                                                          "rx_pending", "memory", "queues", "requests",
                                                          "request_errors", "messages", "loop")])


async def test_inspect_document_matches_docs(backend, guest):
    _, ctl = backend
    got = await guest.exchange([arp_request(), ping(seq=1), ping(seq=2)], want=3)
    assert len(got) == 3
    doc = await ask(ctl.path, "inspect")
    check_doc(doc, "inspect")
    assert doc["connected"] is True
    assert "VERSION_1" in doc["features"]["negotiated"]["names"]
    assert "REPLY_ACK" in doc["protocol_features"]["negotiated"]["names"]
    assert doc["memory"] == [{"guest_phys_addr": 0, "size": 32 << 20,
                              "userspace_addr": 0x7F00_0000_0000, "mmap_offset": 0}]
    rx, tx = doc["queues"]
    assert (rx["name"], tx["name"]) == ("rx", "tx")
    assert tx["avail_idx"] == tx["used_idx"] == tx["last_avail_idx"] == 3
    assert tx["desc"] == {"guest": guest.tx.desc, "qemu": 0x7F00_0000_0000 + guest.tx.desc}
    assert tx["used"]["guest"] == guest.tx.used
    assert rx["used_idx"] == 3 and rx["rx_buffers_posted"] == guest.rx.avail_idx - 3
    assert tx["rx_buffers_posted"] is None
    assert tx["kicks"] >= 1 and rx["calls"] >= 1
    assert tx["errors"] == {} and tx["event_idx"] is True


async def test_inspect_shows_indices_move(backend, guest):
    srv, ctl = backend
    for i in range(3):
        guest.post_tx(ping(seq=i))
    before = (await ask(ctl.path, "inspect"))["queues"][1]
    assert before["avail_idx"] - before["last_avail_idx"] == 3 == before["pending"]
    guest.tx.kick()
    with trio.fail_after(5):
        while srv.current.device.counters["tx_frames"] < 3:
            await trio.sleep(0.005)
    after = (await ask(ctl.path, "inspect"))["queues"][1]
    assert after["pending"] == 0 and after["in_flight"] == 0
    assert after["used_idx"] == before["used_idx"] + 3
    assert after["kicks"] == before["kicks"] + 1


# -- several clients, garbage, stalls ----------------------------------------------------

async def test_several_clients_at_once(backend, guest):
    _, ctl = backend

    def client(k):
        with ControlClient(ctl.path) as c:
            for _ in range(20):
                assert c.request("inspect")["connected"]
                assert c.request("stats")["device"]["tx_frames"] >= 0
        return k

    results = []

    async def run(k):
        results.append(await trio.to_thread.run_sync(client, k))

    async with trio.open_nursery() as n:
        for k in range(8):
            n.start_soon(run, k)
        n.start_soon(guest.exchange, [ping(seq=5)], 1)
    assert sorted(results) == list(range(8))


async def test_garbage_gets_an_error_and_the_connection_goes_on(backend, guest):
    _, ctl = backend
    bad = [b"not json", b"[1, 2]", b'{"cmd": 5}', b'{"cmd": "nope"}', b'{"cmd": "desc", "queue": "x", "head": 0}',
           b'{"cmd": "desc", "queue": 1, "head": true}', b"\xff\xfe\x00", b"[" * 5000 + b"]" * 5000]

    def talk():
        s = _raw(ctl.path)
        s.sendall(b"".join(line + b"\n" for line in bad) + b'{"cmd": "ping"}\n')
        replies = _lines(s, len(bad) + 1)
        s.close()
        return replies

    replies = await trio.to_thread.run_sync(talk)
    assert all(r["ok"] is False and r["error"] for r in replies[:-1])
    assert "unknown command 'nope'" in replies[3]["error"]
    assert '"queue" must be an integer' in replies[4]["error"]
    assert replies[-1]["ok"] is True
    await guest.exchange([ping(seq=9)], want=1)   # the backend carries on


async def test_oversized_request_closes_only_that_client(backend, guest):
    _, ctl = backend

    def talk():
        s = _raw(ctl.path)
        try:
            s.sendall(b"x" * (control.MAX_REQUEST + 4096))
        except OSError:
            pass
        f = s.makefile("rb")
        reply = json.loads(f.readline())
        eof = f.readline()
        s.close()
        return reply, eof

    reply, eof = await trio.to_thread.run_sync(talk)
    assert reply["ok"] is False and "longer than" in reply["error"]
    assert eof == b""
    assert (await ask(ctl.path, "ping"))["connected"] is True


async def test_stalled_client_does_not_block_the_data_path(backend, guest, monkeypatch):
    srv, ctl = backend
    monkeypatch.setattr(control, "SEND_TIMEOUT", 0.5)
    s = _raw(ctl.path)
    s.setblocking(False)
    sent = 0
    try:   # requests it never reads the answers to, until its buffers are full
        while sent < 50000:
            s.send(b'{"cmd": "inspect"}\n')
            sent += 1
    except BlockingIOError:
        pass
    try:
        with trio.fail_after(5):
            for i in range(5):
                got = await guest.exchange([ping(seq=i)], want=1)
                assert len(got) == 1
            assert (await ask(ctl.path, "ping"))["connected"] is True
            while ctl.clients:   # the stalled client was dropped after SEND_TIMEOUT
                await trio.sleep(0.05)
    finally:
        s.close()


async def test_too_many_clients(backend, monkeypatch):
    """Full of idle clients, a new one evicts the longest idle (more in
    tests/test_control_slots.py); the evicted one is told, then closed."""
    _, ctl = backend
    monkeypatch.setattr(control, "MAX_CLIENTS", 3)
    idle = [_raw(ctl.path) for _ in range(3)]
    with trio.fail_after(5):
        while ctl.clients < 3:
            await trio.sleep(0.01)
    assert (await ask(ctl.path, "ping"))["pid"] == os.getpid()
    r = await trio.to_thread.run_sync(_lines, idle[0], 1)
    assert r[0]["closed"] == "idle" and "full" in r[0]["error"]
    for s in idle:
        s.close()
    with trio.fail_after(5):
        while ctl.clients:
            await trio.sleep(0.01)
    assert (await ask(ctl.path, "ping"))["pid"] == os.getpid()


# -- desc ------------------------------------------------------------------------------

async def test_desc_of_a_pending_tx_chain(backend, guest):
    _, ctl = backend
    head = guest.post_tx(ping(seq=77), split=True)   # header and frame in two descriptors; no kick
    doc = await ask(ctl.path, "desc", queue=1, head=head)
    check_doc(doc, "desc", allow_missing=["last_used."])
    assert [d["flag_names"] for d in doc["descriptors"]] == [["NEXT"], []]
    assert all(d["in_guest_memory"] for d in doc["descriptors"])
    assert doc["pending_in_avail_ring"] == [0]
    assert doc["source"] == "readable"
    assert doc["vnet_hdr"]["flags"] == 0 and doc["vnet_hdr"]["num_buffers"] == 0
    assert doc["frame"]["len"] == len(ping(seq=77))
    assert "ICMP echo request, id 4660, seq 77" in doc["frame"]["summary"]
    assert bytes.fromhex(doc["frame"]["hex"]) == ping(seq=77)


async def test_desc_of_a_used_rx_buffer(backend, guest):
    _, ctl = backend
    await guest.exchange([ping(seq=3)], want=1)
    doc = await ask(ctl.path, "inspect")
    rx_used = doc["queues"][0]["used_idx"]
    # Which buffer got the reply: the used ring's last entry.
    import struct
    slot = (rx_used - 1) % guest.rx.size
    head, length = struct.unpack_from("<II", guest.mem, guest.rx.used + 4 + 8 * slot)
    doc = await ask(ctl.path, "desc", queue=0, head=head)
    check_doc(doc, "desc")
    assert doc["descriptors"][0]["flag_names"] == ["WRITE"]
    assert doc["last_used"] == {"idx": rx_used - 1, "len": length}
    assert doc["source"] == "writable" and "used ring" in doc["note"]
    assert doc["vnet_hdr"]["num_buffers"] == 1
    assert "ICMP echo reply, id 4660, seq 3" in doc["frame"]["summary"]


async def test_desc_of_a_posted_rx_buffer_says_so(backend, guest):
    _, ctl = backend
    head = guest.rx.chains and next(iter(guest.rx.chains))
    doc = await ask(ctl.path, "desc", queue=0, head=head)
    assert doc["frame"] is None and doc["pending_in_avail_ring"]
    assert doc["note"] == "posted by the driver, not yet filled by the device"


async def test_desc_of_a_reposted_rx_buffer_says_its_frame_is_gone(backend, guest):
    _, ctl = backend
    await guest.exchange([ping(seq=4)], want=1)
    doc = await ask(ctl.path, "inspect")
    head = doc["queues"][0]["last_used"]["id"]
    guest.post_rx()      # the driver recycles the buffer (Linux would point it elsewhere)
    doc = await ask(ctl.path, "desc", queue=0, head=head)
    assert doc["pending_in_avail_ring"] and doc["frame"] is None
    assert doc["note"].startswith("posted again by the driver")


async def test_desc_of_bad_and_indirect_chains(backend, guest):
    _, ctl = backend
    r = guest.tx
    # descriptor 200: a buffer outside guest memory, chained to 201 (inside)
    r.write_desc(200, guest.mem_size + 0x1000, 100, F_NEXT, 201)
    r.write_desc(201, r.buf(0), 50, 0)
    doc = await ask(ctl.path, "desc", queue=1, head=200)
    assert [d["in_guest_memory"] for d in doc["descriptors"]] == [False, True]
    # descriptor 210: indirect table of two entries at buf(1); a loop in a table is cut
    table = r.buf(1)
    frame = guest.net_hdr() + ping(seq=8)
    guest.mem[r.buf(2):r.buf(2) + len(frame)] = frame
    import struct
    struct.pack_into("<QIHH", guest.mem, table, r.buf(2), 12, F_NEXT, 1)
    struct.pack_into("<QIHH", guest.mem, table + 16, r.buf(2) + 12, len(frame) - 12, 0, 0)
    r.write_desc(210, table, 32, F_INDIRECT)
    doc = await ask(ctl.path, "desc", queue=1, head=210)
    d = doc["descriptors"]
    assert d[0]["flag_names"] == ["INDIRECT"] and not d[0]["indirect_table"]
    assert [x["indirect_table"] for x in d[1:]] == [True, True]
    assert "seq 8" in doc["frame"]["summary"]
    # a loop: the dump stops (bounded by the queue size)
    r.write_desc(220, r.buf(3), 10, F_NEXT, 221)
    r.write_desc(221, r.buf(3), 10, F_NEXT, 220)
    doc = await ask(ctl.path, "desc", queue=1, head=220)
    assert len(doc["descriptors"]) <= r.size + 1
    # huge lengths are not read whole
    r.write_desc(230, 0, 0xFFFF_FFFF, F_WRITE)
    doc = await ask(ctl.path, "desc", queue=1, head=230)
    assert doc["descriptors"][0]["in_guest_memory"] is False


async def test_desc_errors(backend, guest):
    _, ctl = backend
    with pytest.raises(ControlError, match="no queue 5; this device has 2"):
        await ask(ctl.path, "desc", queue=5, head=0)
    with pytest.raises(ControlError, match="descriptor 256 is out of range"):
        await ask(ctl.path, "desc", queue=1, head=256)


async def test_desc_without_qemu(backend):
    _, ctl = backend
    with pytest.raises(ControlError, match="no QEMU is connected"):
        await ask(ctl.path, "desc", queue=1, head=0)


# -- stats -----------------------------------------------------------------------------

async def test_stats_document_matches_docs(backend, guest):
    _, ctl = backend
    await guest.exchange([arp_request(), ping(seq=1)], want=2)
    guest.post_tx(b"\x00" * 8)      # shorter than an Ethernet header: tx_runt
    await guest.exchange([], want=0, timeout=0.2)
    doc = await ask(ctl.path, "stats")
    check_doc(doc, "stats", allow_missing=["stack.tcp", "stack.reassembly", "stack.arp[].pending", "nat.", "forwards[]",
                                             "services.dhcp.leases[]", "services.tftp.transfers[]"])
    # which hot-path implementation runs is part of the document (stack/native chooses)
    assert doc["backend"]["native"] == native.describe()
    assert doc["backend"]["native"]["implementation"] in ("cffi", "python")
    dev = doc["device"]
    assert dev["tx_frames"] == 2 and dev["rx_frames"] == 2
    assert dev["tx_bytes"] == len(arp_request()) + len(ping(seq=1))
    assert dev["drops"] == {"tx_runt": 1}
    st = doc["stack"]
    assert {"ip": "10.0.2.15", "mac": "52:54:00:12:34:56"}.items() <= st["arp"][0].items()
    assert {(u["ip"], u["port"]) for u in st["udp"]} >= {("10.0.2.2", 7)}
    assert st["counters"]["arp_rx"] == 1
    assert [q["name"] for q in doc["queues"]] == ["rx", "tx"]


async def test_stats_without_qemu(backend):
    _, ctl = backend
    doc = await ask(ctl.path, "stats")
    assert set(doc) == {"version", "time", "backend", "capture", "forwards", "connected"}
    assert doc["capture"] == {"clients": 0, "frames": 0, "dropped": 0}


# -- capture ---------------------------------------------------------------------------

def _capture(path: str, count: int | None, out: list, raw_csum=False):
    with ControlClient(path) as c:
        c.send({"cmd": "capture", "count": count, "raw_csum": raw_csum})
        out.append(c.read())
        while True:
            msg = c.read()
            if msg is not None and "frame" in msg:
                msg["frame"]["data"] = c.read_bytes(msg["frame"]["len"])
            out.append(msg)
            if msg is None or "end" in msg:
                return


async def test_capture_streams_frames_then_ends(backend, guest):
    srv, ctl = backend
    out: list = []
    async with trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, _capture, ctl.path, 4, out)
        with trio.fail_after(5):
            while not srv.taps:
                await trio.sleep(0.005)
        assert srv.current.device.taps is srv.taps
        await guest.exchange([ping(seq=1), ping(seq=2)], want=2)
        await guest.exchange([ping(seq=3)], want=1)
    assert out[0]["ok"] and out[0]["result"]["linktype"] == 1
    frames = [m["frame"] for m in out[1:-1]]
    assert out[-1] == {"end": {"frames": 4, "dropped": 0, "reason": "count"}}
    assert [f["dir"] for f in frames] == ["tx", "tx", "rx", "rx"]
    pkts = [Ether(f["data"]) for f in frames]
    assert [p[ICMP].type for p in pkts] == [8, 8, 0, 0]
    assert pkts[2][IP].src == "10.0.2.2"
    with trio.fail_after(5):   # removed when the count was reached
        while srv.taps:
            await trio.sleep(0.005)
    assert ctl.capture_stats() == {"clients": 0, "frames": 4, "dropped": 0}


async def test_capture_tap_removed_when_client_goes(backend):
    srv, ctl = backend
    c = await trio.to_thread.run_sync(ControlClient, ctl.path)
    c.send({"cmd": "capture"})
    assert (await trio.to_thread.run_sync(c.read))["ok"]
    assert len(srv.taps) == 1
    c.close()   # no traffic at all: EOF alone must end it
    with trio.fail_after(5):
        while srv.taps or ctl.captures:
            await trio.sleep(0.005)


async def test_slow_capture_client_loses_frames_not_the_guest(backend, guest, monkeypatch):
    srv, ctl = backend
    monkeypatch.setattr(control, "CAPTURE_FRAMES", 2)
    c = await trio.to_thread.run_sync(ControlClient, ctl.path)
    c.send({"cmd": "capture"})
    assert (await trio.to_thread.run_sync(c.read))["ok"]
    got = await guest.exchange([ping(seq=i) for i in range(20)], want=20)
    assert len(got) == 20
    assert ctl.captures[0].dropped > 0
    c.close()
    with trio.fail_after(5):
        while ctl.captures:
            await trio.sleep(0.005)
    assert ctl.capture_stats()["dropped"] > 0


async def test_capture_bad_count(backend):
    _, ctl = backend
    with pytest.raises(ControlError, match="count must be at least 1"):
        await ask(ctl.path, "capture", count=0)
    with pytest.raises(ControlError, match='"count" must be an integer'):
        await ask(ctl.path, "capture", count="10")


async def test_capture_told_when_the_backend_stops(sockdir):
    srv = make_server(sockdir / "v.sock")
    ctl = ControlServer(srv, str(sockdir / "v.sock.ctl"))
    async with trio.open_nursery() as n:
        await n.start(serve_backend, srv, ctl)
        c = await trio.to_thread.run_sync(ControlClient, ctl.path)
        c.send({"cmd": "capture"})
        assert (await trio.to_thread.run_sync(c.read))["ok"]
        n.cancel_scope.cancel()
    assert c.read() == {"end": {"frames": 0, "dropped": 0, "reason": "backend stopping"}}
    assert c.read() is None
    c.close()


async def test_desc_of_a_frame_merged_over_rx_buffers(backend):
    """MRG_RXBUF: a reply spread over 3 small RX buffers is found from any of them."""
    srv, ctl = backend
    fe = Frontend()
    await fe.connect(srv.socket_path)
    try:
        await fe.handshake()
        fe.post_rx(size=512)
        fe.rx.kick()
        for seq in range(3):   # some history in the used ring first
            fe.post_tx(ping(seq=seq, payload=b"z" * 1200))
            fe.tx.kick()
            with trio.fail_after(5):
                while fe.rx.used_idx() < 3 * (seq + 1):
                    await trio.sleep(0.005)
        import struct
        used = fe.rx.used_idx()
        entries = [struct.unpack_from("<II", fe.mem, fe.rx.used + 4 + 8 * (k % fe.rx.size))
                   for k in range(used - 3, used)]
        first, second, third = (head for head, _len in entries)
        doc = await ask(ctl.path, "desc", queue=0, head=first)
        assert doc["vnet_hdr"]["num_buffers"] == 3
        assert "MRG_RXBUF" in doc["note"] and f"idx {used - 3}" in doc["note"]
        assert "ICMP echo reply, id 4660, seq 2, length 1208" in doc["frame"]["summary"]
        assert doc["frame"]["len"] == len(ping(seq=2, payload=b"z" * 1200))
        for k, head in ((2, second), (3, third)):
            doc = await ask(ctl.path, "desc", queue=0, head=head)
            assert doc["frame"] is None
            assert doc["note"].startswith(f"part {k} of 3 of a frame merged over several RX buffers: "
                                          f"its header and start are in descriptor {first}")
    finally:
        await fe.close()
        with trio.move_on_after(2):
            while srv.current is not None:
                await trio.sleep(0.005)
        fe.release()


async def test_desc_of_a_planted_huge_indirect_table_is_bounded(backend, guest):
    """Issue 7 case 6: an indirect table as large as guest memory, every entry chained to
    the next, used to be listed whole (262,145 descriptors, 30 MB of JSON)."""
    import struct
    bound = 1024 + 1                                # the device's chain limit (ring.MAX_CHAIN_DESCS) + 1
    _, ctl = backend
    table, entries = 0x1000000, 1 << 16           # 1 MiB of table at 16 MiB
    for i in range(entries):
        struct.pack_into("<QIHH", guest.mem, table + 16 * i, 0x30000, 64, F_NEXT, (i + 1) & 0xFFFF)
    r = guest.tx
    r.write_desc(200, table, 16 * entries, F_INDIRECT)
    doc = await ask(ctl.path, "desc", queue=1, head=200)
    check_doc(doc, "desc", allow_missing=["last_used.", "vnet_hdr.", "frame."])
    assert len(doc["descriptors"]) == 1             # a table the device would refuse is not entered
    assert doc["refusal"]["id"] == "bad_indirect_len" and doc["refusal"]["section"] == "2.7.5.3"
    # A table the device would enter, chained past the device's limit: bounded, and said so.
    r.write_desc(201, table, 16 * r.size, F_INDIRECT)
    r.write_desc(202, 0x30000, 64, F_NEXT, 202)    # a loop in the ring's own table
    for head in (201, 202):
        doc = await ask(ctl.path, "desc", queue=1, head=head)
        assert len(doc["descriptors"]) <= bound
        assert doc["refusal"]["id"] in ("next_out_of_range", "chain_too_long")
    assert doc["descriptors_truncated"] is True and doc["refusal"]["id"] == "chain_too_long"


# -- check: the driver-conformance report ------------------------------------------------

from .observe import cli  # noqa: E402


async def test_check_document_matches_docs_and_gates_on_must(backend, guest, capsys):
    srv, ctl = backend
    await guest.exchange([ping(seq=1)], want=1)
    assert await cli("check", "--control", ctl.path, "--json") == 0      # a clean driver passes
    doc = json.loads(capsys.readouterr().out)
    assert doc["findings"] == [] and doc["must"] == 0
    check_doc(doc, "check", allow_missing=["findings[]"])
    # A device-writable descriptor before a device-readable one (§2.7.4.2).
    r = guest.tx
    r.add([(0x200000, 64, F_WRITE), (0x201000, 64, 0)])
    r.kick()
    with trio.fail_after(5):
        while not srv.current.backend.queues[1].errors:
            await trio.sleep(0.005)
    assert await cli("check", "--control", ctl.path, "--json") == 1
    doc = json.loads(capsys.readouterr().out)
    check_doc(doc, "check")
    [f] = doc["findings"]
    assert (f["rule"], f["section"], f["level"], f["queue"], f["count"]) == \
        ("read_after_write", "2.7.4.2", "MUST", 1, 1)
    assert f["example"]["addr"] == 0x201000
    assert await cli("check", "--socket", srv.socket_path) == 1
    out = capsys.readouterr().out
    assert out.startswith("MUST (1 rule(s) broken)\n  read_after_write  §2.7.4.2  tx  x1\n")
    assert "virtio 1.2 §2.7.4.2: device-readable descriptor after a device-writable one" in out


async def test_check_passes_with_only_should_findings(backend, capsys):
    from vhostnet.virtio import features as F
    srv, ctl = backend
    fe = Frontend()
    await fe.connect(srv.socket_path)
    try:
        await fe.handshake(features=F.DEFAULT_FEATURES & ~(1 << F.MRG_RXBUF | F.OFFLOAD_FEATURES) | 1 << 30)
        fe.post_rx(size=1024)
        fe.rx.kick()
        assert len(await fe.exchange([ping(seq=1)], want=1)) == 1
        assert await cli("check", "--control", ctl.path) == 0
        out = capsys.readouterr().out
        assert out.startswith("SHOULD (1 rule(s) broken)\n  rx_buffer_below_minimum  §5.1.6.3.1  rx  x")
    finally:
        await fe.shutdown(srv)


async def test_check_without_qemu(backend, capsys):
    srv, ctl = backend
    assert await cli("check", "--control", ctl.path, "--json") == 3
    assert json.loads(capsys.readouterr().out) == {"version": 1, "connected": False}
    assert await cli("check", "--control", ctl.path) == 3
    assert capsys.readouterr().out.strip() == "no QEMU connected"


async def test_an_internal_error_in_a_request_is_an_error_reply_not_the_end(backend, monkeypatch):
    """Found by scripts/fuzz_device.py (seed 2003): a report that met a ring state
    it did not expect raised, and the exception ended the whole process (and the
    guest's network). Now the client gets an error and the socket keeps serving."""
    from vhostnet.observe import report
    srv, ctl = backend

    def broken(*a, **kw):
        raise IndexError("index out of bounds on dimension 1")
    monkeypatch.setattr(report, "inspect_doc", broken)
    s = _raw(ctl.path)

    def talk():   # blocking, so in a thread: the server runs in this one
        s.sendall(b'{"cmd": "inspect"}\n{"cmd": "ping"}\n')
        return _lines(s, 2)
    err, pong = await trio.to_thread.run_sync(talk)
    assert err["ok"] is False and "internal error: IndexError" in err["error"]
    assert pong["ok"] is True                           # the same client, served on
    s.close()
    monkeypatch.undo()
    assert (await ask(ctl.path, "inspect"))["connected"] is False
