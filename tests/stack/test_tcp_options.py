"""Option semantics on a live connection: PAWS, SACK generation, window scaling
and MSS defaults, out-of-order bounds, the receive window, snapshot()."""
from __future__ import annotations

from stack.tcp.config import TcpConfig
from stack.wire.tcp import ACK, PSH, SYN

from .tcp_sim import B_IP, RawPeer

M = 0xFFFFFFFF


def open_passive(peer, **synopts):
    acc = []
    peer.layer.listen(B_IP, 80, acc.append)
    peer.send(4444, 80, 1000, 0, SYN, **synopts)
    synack = peer.take()[0]
    extra = {}
    if "timestamp" in synopts:
        extra["timestamp"] = (synopts["timestamp"][0] + 1, synack.timestamp[0])
    peer.send(4444, 80, 1001, synack.seq + 1, ACK, **extra)
    return acc[0], synack


def test_paws_drops_old_timestamp_and_acks():
    peer = RawPeer()
    conn, synack = open_passive(peer, mss=1460, timestamp=(5000, 0))
    isn = synack.seq + 1
    peer.send(4444, 80, 1001, isn, ACK | PSH, payload=b"new", timestamp=(5010, 0), now=1.0)
    peer.advance(1.1)
    peer.take()
    assert conn.recv() == b"new" and conn.ts_recent == 5010
    # an old duplicate carrying new-looking data but an older timestamp: dropped, ACKed
    peer.send(4444, 80, 1004, isn, ACK | PSH, payload=b"old", timestamp=(4000, 0), now=2.0)
    (ack,) = peer.take()
    assert ack.ack == 1004 and conn.readable == 0
    assert peer.layer.counters["paws_rejected"] == 1
    # timestamps wrap modulo 2**32: a "smaller" value past the wrap is newer
    conn.ts_recent = 0xFFFFFFF0
    peer.send(4444, 80, 1004, isn, ACK | PSH, payload=b"wrap", timestamp=(5, 0), now=3.0)
    assert conn.recv() == b"wrap" and conn.ts_recent == 5


def test_sack_blocks_most_recent_first_and_bounded():
    peer = RawPeer(config=TcpConfig(ooo_max_ranges=4))
    conn, synack = open_passive(peer, mss=1000, sack_permitted=True, timestamp=(1, 0))
    isn = synack.seq + 1
    for i, off in enumerate([2000, 6000, 4000]):
        peer.send(4444, 80, 1001 + off, isn, ACK, payload=b"x" * 100, timestamp=(2 + i, 0))
    acks = peer.take()
    assert acks[-1].sack_blocks[0] == (1001 + 4000, 1001 + 4100)      # most recent first
    assert set(acks[-1].sack_blocks) == {(3001, 3101), (5001, 5101), (7001, 7101)}
    # with timestamps only 3 blocks fit; the 4-range bound drops the 5th range
    for off in (8000, 10000, 12000):
        peer.send(4444, 80, 1001 + off, isn, ACK, payload=b"y" * 100, timestamp=(9, 0))
    assert len(conn.ooo) == 4
    assert peer.layer.counters["rx_ooo_dropped"] == 2
    assert all(len(r.sack_blocks) <= 3 for r in peer.take())


def test_wscale_clamped_and_mss_default():
    peer = RawPeer()
    conn, synack = open_passive(peer, wscale=20)                       # no MSS option
    assert conn.snd_wscale == 14                                       # RFC 7323 clamp
    assert conn.mss == 536                                             # RFC 9293 default
    assert synack.mss == 1460 and synack.wscale == 3 and synack.timestamp is None
    assert not synack.sack_permitted


def test_receive_window_tracks_free_space_and_never_shrinks():
    peer = RawPeer(config=TcpConfig(rcvbuf=64 * 1024))
    conn, synack = open_passive(peer, mss=1460, wscale=0)
    isn = synack.seq + 1
    seq = 1001
    wins = []
    for _ in range(60):
        peer.send(4444, 80, seq, isn, ACK, payload=b"d" * 1460)
        seq += 1460
        peer.advance(peer.now + 0.5)             # let delayed ACKs out
        wins += [(r.ack, r.window) for r in peer.take()]
        if wins and wins[-1][1] == 0:
            break
    # the right edge (ack + window) never moves left
    edges = [a + (w << conn.rcv_wscale) for a, w in wins]
    assert edges == sorted(edges)
    assert wins[-1][1] == 0 and len(conn.rcvbuf) == 64 * 1024
    seq = wins[-1][0]
    # the window is closed: more data is not accepted, but answered with the window
    peer.send(4444, 80, seq, isn, ACK, payload=b"d" * 1460)
    (r,) = peer.take()
    assert r.window == 0 and r.ack == seq
    assert peer.layer.counters["rx_zero_window_drops"] == 1
    # reading opens it again with a window update
    conn.recv()
    (upd,) = peer.take()
    assert upd.window << conn.rcv_wscale >= 32 * 1024


def test_snapshot_like_ss():
    peer = RawPeer()
    conn, _ = open_passive(peer, mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 0))
    snap = peer.layer.snapshot()
    listen = [s for s in snap if s["state"] == "LISTEN"]
    est = [s for s in snap if s["state"] == "ESTABLISHED"]
    assert listen and listen[0]["local"] == "10.0.2.2:80"
    (e,) = est
    assert e["remote"] == "10.0.2.15:4444" and e["local"] == "10.0.2.2:80"
    for key in ("snd_una", "snd_nxt", "rcv_nxt", "snd_wnd", "rcv_wnd", "wscale", "mss",
                "srtt_ms", "rttvar_ms", "rto_ms", "cwnd", "ssthresh", "retransmits",
                "bytes_in", "bytes_out"):
        assert key in e
    assert e["wscale"] == "7,3" and e["rcv_nxt"] == 1001
