#!/usr/bin/env python3
"""Stack-only throughput: ICMP echo and UDP echo through Stack.receive + take_frames.

Single core, no device, no guest: this measures the stack's share of the
per-packet budget. Frames are handed over as memoryviews, as the device does.
    python3 scripts/bench_stack_udp.py              # 1 s per case, wall clock
    python3 scripts/bench_stack_udp.py 3 --cpu      # 3 s per case, this process's CPU time

--cpu times with process_time (this process's CPU) instead of the wall
clock, which other processes on a shared machine inflate less. Prints a
table; not a test.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import time

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stack import Frame, NetConfig
from stack.checksum import checksum, pseudo_sum
from stack.interface import Stack


def build(cfg: NetConfig, proto: int, payload_len: int) -> bytes:
    payload = bytes(i & 0xFF for i in range(payload_len))
    if proto == 1:
        l4 = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x42, 1)) + payload
        cs = checksum(l4)
    else:
        n = 8 + payload_len
        l4 = bytearray(struct.pack("!HHHH", 40000, 7, n, 0)) + payload
        cs = checksum(l4, pseudo_sum(cfg.guest_ip_b, cfg.gateway_ip_b, 17, n)) or 0xFFFF
    off = 2 if proto == 1 else 6
    l4[off:off + 2] = cs.to_bytes(2, "big")
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                               cfg.guest_ip_b, cfg.gateway_ip_b))
    ip[10:12] = checksum(ip).to_bytes(2, "big")
    return cfg.gateway_mac_b + cfg.guest_mac_b + b"\x08\x00" + bytes(ip) + bytes(l4)


def run(proto: int, size: int, seconds: float, offload: bool,
        clock=time.perf_counter) -> tuple[float, float]:
    cfg = NetConfig()
    st = Stack(cfg)
    frame = memoryview(bytearray(build(cfg, proto, size)))
    # With offload the guest sends UDP as CHECKSUM_PARTIAL and accepts the
    # same back, as a Linux guest with virtio csum features does.
    cs_start, cs_off = (34, 6) if offload and proto == 17 else (0, 0)
    st.set_offloads(csum=offload, tso=offload)
    receive, take = st.receive, st.take_frames
    done = 0
    batch = 1000
    t0 = clock()
    while True:
        for _ in range(batch):
            receive(Frame(frame, cs_start, cs_off), 0.0)
            if not take():
                raise SystemExit(f"no reply for proto {proto} size {size}: {dict(st.counters)}")
        done += batch
        dt = clock() - t0
        if dt >= seconds:
            return done / dt, dt / done * 1e6


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("seconds", nargs="?", type=float, default=1.0, help="per case (default 1)")
    p.add_argument("--cpu", action="store_true", help="time with process_time, not the wall clock")
    a = p.parse_args(argv)
    clock = time.process_time if a.cpu else time.perf_counter
    seconds = a.seconds
    # ICMP sizes are ICMP message bytes (ping -s 56 -> 64 B; -s 1464 -> 1472 B);
    # UDP sizes are UDP payload bytes (1472 fills a 1500-byte MTU).
    cases = [("ICMP echo", 1, 64, False), ("ICMP echo", 1, 1472, False),
             ("UDP echo", 17, 64, False), ("UDP echo", 17, 1472, False),
             ("UDP echo", 17, 64, True), ("UDP echo", 17, 1472, True)]
    print(f"{'case':<10} {'size B':>7} {'csum offload':>13} {'replies/s':>11} {'us/reply':>9}")
    for name, proto, size, offload in cases:
        payload = size - 8 if proto == 1 else size
        rate, us = run(proto, payload, seconds, offload, clock)
        print(f"{name:<10} {size:>7} {'yes' if offload else 'no':>13} {rate:>11,.0f} {us:>9.2f}")


if __name__ == "__main__":
    main()
