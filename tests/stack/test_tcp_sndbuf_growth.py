"""The send buffer grows while the buffer is what limits a transfer (TcpConfig.sndbuf_max).

A download from the host to a slow guest has a millisecond or more of RTT:
256 KiB in flight then caps it near 1.5 Gbit/s whatever the guest's window.
The layer doubles a connection's buffer when it was full, nearly all of it
in flight and neither the peer's window nor cwnd the limit, up to
sndbuf_max, and all connections' growth together within sndbuf_grow_total.
"""
from __future__ import annotations

import os

from stack.tcp.config import TcpConfig

from .tcp_sim import A_IP, B_IP, BulkApp, Sim, sha

KIB = 1024
BIG_WINDOW = TcpConfig(rcvbuf=4096 * KIB)      # a Linux guest's autotuned receive window


def bulk(sim, n_conns: int, nbytes: int):
    """N_CONNS transfers of NBYTES from A to B, at once. Returns A's
    BulkApps, B's, the data, and the peaks seen at every event: the largest
    send buffer, the layer's growth and the storage all of A's buffers held."""
    A, B = sim.layers[A_IP], sim.layers[B_IP]
    data = os.urandom(nbytes)
    apps = []
    B.listen(B_IP, 80, lambda c: apps.append(BulkApp(c, b"")))
    senders = [BulkApp(A.connect(0.0, A_IP, 40000 + i, B_IP, 80), data) for i in range(n_conns)]
    peak = {"cap": 0, "grown": 0, "store": 0}

    def done():
        peak["cap"] = max(peak["cap"], *(s.conn.sndbuf.cap for s in senders))
        peak["grown"] = max(peak["grown"], A._sndbuf_grown)
        peak["store"] = max(peak["store"], sum(len(s.conn.sndbuf.store) for s in senders))
        return len(apps) == n_conns and all(a.eof for a in apps)
    assert sim.run(until=done, max_time=120)
    return senders, apps, data, peak


def test_a_buffer_limited_transfer_grows_its_buffer_to_the_max():
    sim = Sim(configs={B_IP: BIG_WINDOW})
    A = sim.layers[A_IP]
    senders, apps, data, peak = bulk(sim, 1, 8 << 20)
    assert sha(apps[0].received) == sha(data)
    assert peak["cap"] == A.config.sndbuf_max == 1024 * KIB
    assert A.counters["tcp_sndbuf_grown"] == 2           # 256 -> 512 -> 1024 KiB
    # Its close: the growth goes back, and the storage of the empty buffer
    # (whoever closed first holds none through TIME-WAIT).
    sim.run(until=lambda: not A.connections)
    assert A._sndbuf_grown == 0
    assert senders[0].conn.sndbuf.cap == A.config.sndbuf and not senders[0].conn.sndbuf.store


def test_a_peer_window_smaller_than_the_buffer_keeps_it_as_it_is():
    sim = Sim(configs={B_IP: TcpConfig(rcvbuf=128 * KIB)})
    A = sim.layers[A_IP]
    _, apps, data, peak = bulk(sim, 1, 4 << 20)
    assert sha(apps[0].received) == sha(data)
    assert peak["cap"] == A.config.sndbuf
    assert A.counters["tcp_sndbuf_grown"] == 0


def test_all_connections_grow_within_the_layers_total():
    total = 256 * KIB
    sim = Sim(configs={A_IP: TcpConfig(sndbuf_grow_total=total), B_IP: BIG_WINDOW})
    A = sim.layers[A_IP]
    senders, apps, data, peak = bulk(sim, 3, 4 << 20)
    assert all(sha(a.received) == sha(data) for a in apps)
    base = A.config.sndbuf
    assert peak["grown"] == total                        # used, and never past it
    assert peak["store"] <= 3 * base + total             # what the buffers held, at every event
    assert A.counters["tcp_sndbuf_grown"] >= 1 and A.counters["tcp_sndbuf_grow_refused"] >= 1
    sim.run(until=lambda: not A.connections)
    assert A._sndbuf_grown == 0


def test_sndbuf_max_below_sndbuf_is_refused():
    import pytest
    with pytest.raises(ValueError, match="sndbuf_max"):
        TcpConfig(sndbuf=512 * KIB, sndbuf_max=256 * KIB)
