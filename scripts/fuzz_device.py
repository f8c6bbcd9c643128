#!/usr/bin/env python3
"""A stateful fuzzer for the device: a real `vhostnet serve`, hostile from every side.

Theory of operation
-------------------
The backend runs as a subprocess (`vhostnet serve`, through a two-line
wrapper that only registers faulthandler on SIGUSR1, so that a hung backend
can be asked where it is stuck), from this checkout or --tree. A crash (an
exception, a SIGBUS) or a hang is seen from outside, as QEMU would see it;
the fuzzer survives it, names it, restarts the backend and (--keep-going)
carries on. Why not an in-process server in a thread: measured here, a bare
GET_FEATURES round trip costs 170 us in-process against 280 us to a
subprocess (load average 9 on 2 shared cores), but a step costs 4-8 ms
either way, nearly all of it the backend's own work; in-process, that work
and ours would share one GIL instead of two cores, a SIGBUS would kill the
fuzzer, and a spinning backend would starve the watchdog meant to catch it.

Each step is drawn from a seeded RNG and a small model the generator keeps
of its own choices (queue sizes, features, where it planted what). The
generator never looks at what the backend did, so a seed names one input
sequence and `--replay SEED --steps N` sends the same steps again, printing
each. A first failure replays faithfully; later ones in a --keep-going run
are best-effort, since which kick the backend handles before which message
is timing, and so is the state a restart leaves. Steps are of three sorts:

- front-end: every vhost-user request type (and unknown ones) with valid
  and invalid payloads, sizes, flags and NEED_REPLY, carrying fds of every
  kind (FD_KINDS in vhostnet/testing/frontend.py: eventfd, memfd sealed,
  unsealed, empty or too small, pipe, pipe at EOF, socket, socket at EOF,
  O_PATH, /dev/null, a regular file, or none); well-formed handshakes and
  ring set-ups, so that deep states are reached; memory tables; truncating
  the guest memfd; broken framing.
- driver: frames and RX buffers written into guest memory as descriptor
  chains, hostile chains (loops, out of bounds, in the guard gaps, nested or
  huge indirect tables, a table that loops), avail index moves, avail flags
  and used_event, kicks.
- control socket: inspect, desc (often on a planted head), stats, ping,
  fault show/set/clear (valid and bad specs), capture start and stop (read or never read), garbage lines, a line over
  the limit, idle clients held open, and a held "session" client.

Multiqueue (docs/multiqueue.md): the backend serves --queues N pairs
(default 2). MQ_SHARE of the connects negotiate VIRTIO_NET_F_MQ and
PROTOCOL_F_MQ, ask GET_QUEUE_NUM and set up all 2N rings (each in its own
RING_SLOT of region 0; now and then only pair 0, or a later pair left
disabled), and "venable" steps switch single rings on and off. Every
ring-level step then draws its ring from the connection's 2N (pair 0's
most often), traffic runs on every pair (RX 2k, TX 2k+1), and the used-ring
oracle and packed driver models are kept per ring. --queues 1 is the
one-pair fuzzer: no MQ draws and no venable steps, rings 0 and 1 only.

Targeted generators add the sequences that random steps reach too rarely,
one per class of issue 7: a too-small merged RX buffer (rxsmall), an RX
avail jump while a frame waits (rxjump), unsealed memory shrunk under the
backend (shrink), a refused SET_VRING_KICK then a control client (stale),
a driver thread that keeps feeding refused chains while we probe (feed),
inspect --desc on a looping table as large as memory (descbomb), a kick fd
that is always readable (pipe_eof and socket_eof kicks), SET_VRING_NUM after
SET_VRING_ADDR (resize, as a "ring" step), an O_PATH fd (any fd step),
more idle control clients than admitted (idleflood), a merged RX buffer
followed by a refused one (mrgref), and min(512, n) chains of n descriptors
(long).

After every step the fuzzer checks (the step fails if one does not hold):

- alive: the backend process has not exited;
- answers: a GET_FEATURES sent on the current connection is answered within
  PROBE_TIMEOUT (1 s). Replies the step earned are read and skipped on the
  way; a GET_FEATURES the step itself sent always has valid version bits,
  so exactly one reply is owed for each. If the backend closed the
  connection (allowed after a protocol error), a new connection must be
  accepted and answer within the same second: the backend serves one
  front-end at a time, so this also proves the old one was torn down. No
  answer within HANG_GRACE more is a "hang", a late one is "slow" if the
  backend spent at least PROBE_TIMEOUT of CPU in the wait (it was working,
  a loop), and otherwise only counted (late_answers_loaded: it was waiting
  for a core on a loaded machine; seen at load 9 on 2 cores);
- bounded: its fd count (/proc/PID/fd) stays under its count with one idle
  connection plus what a connection and our open control clients can hold,
  and its RSS under its idle RSS plus twice guest memory plus RSS_SLACK;
- untouched: the guard areas of the guest memfd around and between the
  declared regions hold a canary pattern, unchanged (a backend that
  ignored mmap_offset or a region's size would write there); so is a
  canary memfd never given to it;
- used ring: while a ring holds exactly what the driver set up (armed), no
  used element names a head more often than the driver offered it;
- control: every control request gets a reply line within 1 s, a fresh
  control client gets an answer to ping within 1 s (held idle clients must
  not lock it out), and a "session" client in use is never closed under us
  (how a backend closing an fd it does not own shows);
- idle: every IDLE_EVERY steps, before every step that connects anew, and
  after a step that gave a kick fd other than an eventfd or left a frame
  no posted buffer can take, with nothing sent for
  IDLE_WINDOW the backend must not be runnable most of the time while its
  rings make no progress and it never blocks (a kick fd that is always
  readable does that; a ring polled every millisecond blocks each time).

A failure prints the seed, the step, the class (what failed and where: the
traceback's frames for a crash, the frame every faulthandler sample of a
hang shares), the steps since the last connect and the backend's stack.
The --json document's fields are JSON_FIELDS below.

Examples:
    PYTHONPATH=$PWD python3 scripts/fuzz_device.py --seed 1 --steps 20000
    PYTHONPATH=$PWD python3 scripts/fuzz_device.py --seconds 60 --keep-going --json
    PYTHONPATH=$PWD nice -n 10 python3 scripts/fuzz_device.py --workers 4 --seed 100 --steps 1000000
    PYTHONPATH=$PWD python3 scripts/fuzz_device.py --replay 1 --steps 4242
    PYTHONPATH=$PWD python3 scripts/fuzz_device.py --only feed,long --seed 3 --steps 20
    PYTHONPATH=$PWD python3 scripts/fuzz_device.py --queues 1 --seed 1 --steps 2000   # one pair, no MQ
    PYTHONPATH=$PWD python3 scripts/fuzz_device.py --tree /path/to/other/checkout --seconds 30
"""
from __future__ import annotations

import argparse
import collections
import json
import mmap
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# This tree's code, whether or not it is the installed one (a second clone, a worktree).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stack.config import NetConfig
from vhostnet.testing.frontend import (FD_KINDS, PACKED_FRESH_BASE, encode_message, make_fd, make_memfd,
                                       recv_message, send_message)
from vhostnet.testing.packed_driver import PackedDriver
from vhostnet.virtio import features as F
from vhostnet.virtio.packed import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, decode_base
from vhostnet.vhostuser import protocol as P
from vhostnet.vhostuser.protocol import Req

ROOT = Path(__file__).resolve().parent.parent   # the tree the backend runs from, unless --tree

# -- guest memory layout ---------------------------------------------------------
# One memfd: [guard][region 0][guard][region 1][guard]. Only the regions are
# declared to the backend (through mmap_offset); the guards hold a canary.
GUARD = 64 << 10
REGION = 8 << 20       # room for MAX_QUEUES pairs' rings (RING_SLOT each) and buffers in region 0
MEM_SIZE = 3 * GUARD + 2 * REGION
REGION_OFF = (GUARD, 2 * GUARD + REGION)          # memfd offset of each region
REGION_GPA = (0, REGION)                          # contiguous in guest-physical space
REGION_UVA = (0x7F00_0000_0000, 0x7F10_0000_0000)  # "QEMU" addresses, apart
GUARDS = ((0, GUARD), (GUARD + REGION, 2 * GUARD + REGION), (2 * GUARD + 2 * REGION, MEM_SIZE))
CANARY = (bytes(range(1, 256)) * (GUARD // 255 + 1))[:GUARD]
# Multiqueue (docs/multiqueue.md): pair k's RX ring is 2k, its TX ring 2k+1.
MAX_QUEUES = 3              # --queues: the pairs whose rings fit in region 0 below BUF_LO
DEFAULT_QUEUES = 2
MQ_SHARE = 0.4              # connects that negotiate VIRTIO_NET_F_MQ and PROTOCOL_F_MQ (with --queues > 1)
MQ_BIT = 1 << F.MQ          # virtio 1.2 §5.1.3
RING_SLOT = 0x100000        # each ring's desc/avail/used in its own 1 MiB of region 0 (32768 split: 832 KiB)
RING_GPA = tuple(0x10000 + k * RING_SLOT for k in range(2 * MAX_QUEUES))
BUF_LO, BUF_HI = RING_GPA[-1] + RING_SLOT, 2 * REGION   # where buffers and tables go
QUEUE_SIZES = (1, 2, 16, 256, 256, 1024, 32768)    # virtio 1.2 §2.7: a power of 2, at most 32768
RXQ, TXQ = 0, 1
VNET_HDR = struct.Struct("<BBHHHHH")               # virtio 1.2 §5.1.6
DESC = struct.Struct("<QIHH")                      # virtio 1.2 §2.7.5
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4              # virtio 1.2 §2.7.5
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")
ADDR = struct.Struct("<IIQQQQ")
REGION_DESC = struct.Struct("<QQQQ")

# -- checks ------------------------------------------------------------------------
PROBE_TIMEOUT = 1.0     # a fresh GET_FEATURES must be answered within this (issue 7)
CLK_TCK = os.sysconf("SC_CLK_TCK")   # proc(5): the unit of /proc/PID/stat's utime and stime
HANG_GRACE = 2.0        # after a missed probe, how long we wait to tell "slow" from "stuck"
CONTROL_TIMEOUT = 1.0
IDLE_EVERY = 128        # steps between idle checks (also before every connecting step)
IDLE_WINDOW = 0.02      # seconds of silence measured
IDLE_BUSY = 0.8         # fraction of the time an idle backend may be runnable (a polled kick
                        # ring: up to ~0.45 under load; a spin: ~1, however little of a core it gets)
IDLE_BLOCKS = 3         # a backend that blocked this often in the window is polling (a "none" kick:
                        # every 1 ms), not spinning, however runnable a loaded machine makes it look
IDLE_CONFIRM = 3        # windows more, after IDLE_PAUSE, before two busy ones are a finding
IDLE_PAUSE = 0.25
RSS_SLACK = 96 << 20
FD_SLACK = 8            # trio internals, a capture being set up, timing of closes
MAX_IDLE_CLIENTS = 20   # more than the backend's 16-client limit
MAX_CONTROL_REPLY = 64 << 20
LOG_KEEP = 40           # steps shown with a failure
START_TIMEOUT = 20.0
STACK_SAMPLES = 5       # faulthandler samples of a hung backend's stack

# Two driver models: split rings (virtio 1.2 §2.7), written here, and packed
# rings (§2.8, vhostnet/testing/packed_driver.py), negotiated on PACKED_SHARE
# of the connects, with their own hostile moves (g_pbad, g_pevent).
OFFERED = F.DEFAULT_FEATURES & ~(1 << F.RING_PACKED) | 1 << F.PROTOCOL_FEATURES
PACKED_BIT = 1 << F.RING_PACKED
OFFERED_ANY = OFFERED | PACKED_BIT | MQ_BIT
PACKED_SHARE = 0.3
PACKED_EVENT = 4                                   # §2.8.14: struct pvirtq_event_suppress
PACKED_KINDS = ("noend", "nested", "indirect_len", "indirect_chain", "id_oob", "id_inflight", "not_avail",
                "out_of_order", "wrap_bad", "wrap_flip", "oob", "readafterwrite", "zero_len")
CFG = NetConfig()
GUEST_IP = bytes(map(int, CFG.guest_ip.split(".")))
GATEWAY_IP = bytes(map(int, CFG.gateway_ip.split(".")))
VRING_REQUESTS = {Req.SET_VRING_NUM, Req.SET_VRING_ADDR, Req.SET_VRING_BASE, Req.GET_VRING_BASE,
                  Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR, Req.SET_VRING_ENABLE,
                  Req.VRING_KICK, Req.SET_VRING_ENDIAN}
# Requests that cannot change what a ring holds (the used-ring check stays armed).
HARMLESS_REQUESTS = {Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_QUEUE_NUM, Req.GET_CONFIG,
                     Req.SET_CONFIG, Req.GET_MAX_MEM_SLOTS, Req.SET_OWNER, Req.NET_SET_MTU, Req.SEND_RARP,
                     Req.SET_PROTOCOL_FEATURES, Req.GET_STATUS}
ALL_REQUESTS = [int(r) for r in Req] + [0, 41, 99, 0xFFFF, 0x7FFFFFFF]
DATA_FD_KINDS = [k for k in FD_KINDS]


def conn_fds(queues: int) -> int:
    """A connection's fds: its socket, kick, call, err per ring (2 rings per pair), region fds if kept."""
    return 1 + 3 * 2 * queues + P.MAX_MEM_REGIONS


def ring_addrs(q: int, n: int, packed: bool = False) -> tuple[int, int, int]:
    """(desc, avail, used) guest addresses of queue q with size n (virtio 1.2 §2.7 alignment);
    packed: (descriptor ring, driver event area, device event area), §2.8.10.1."""
    desc = RING_GPA[q]
    if packed:
        return desc, desc + 16 * n, desc + 16 * n + PACKED_EVENT
    avail = desc + 16 * n
    used = (avail + 6 + 2 * n + 3) & ~3
    return desc, avail, used


def gpa_to_uva(gpa: int) -> int:
    for g, u in zip(REGION_GPA, REGION_UVA):
        if g <= gpa < g + REGION:
            return u + gpa - g
    return REGION_UVA[0] + gpa


def csum16(data: bytes) -> int:
    """RFC 1071 internet checksum."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def frame(kind: str, size: int, rng: random.Random) -> bytes:
    """A guest frame: ARP who-has gateway, ICMP echo or UDP echo to it, or junk."""
    eth_gw = CFG.gateway_mac_b + CFG.guest_mac_b
    if kind == "arp":
        return (b"\xff" * 6 + CFG.guest_mac_b + b"\x08\x06"
                + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + CFG.guest_mac_b + GUEST_IP
                + b"\0" * 6 + GATEWAY_IP)
    if kind in ("ping", "udp"):
        payload = rng.randbytes(size)
        if kind == "ping":
            l4 = struct.pack("!BBHHH", 8, 0, 0, rng.getrandbits(16), rng.getrandbits(16)) + payload
            l4 = l4[:2] + struct.pack("!H", csum16(l4)) + l4[4:]
            proto = 1
        else:
            l4 = struct.pack("!HHHH", 40000 + rng.getrandbits(8), 7, 8 + len(payload), 0) + payload
            proto = 17
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), rng.getrandbits(16), 0, 64, proto, 0,
                         GUEST_IP, GATEWAY_IP)
        ip = ip[:10] + struct.pack("!H", csum16(ip)) + ip[12:]
        return eth_gw + b"\x08\x00" + ip + l4
    return rng.randbytes(size)


# -- the generator: steps from the seed, never from the backend --------------------

# Steps that start a new connection (and so end the last one).
CONNECTING_OPS = {"connect", "mrgref", "rxsmall", "rxjump", "shrink", "feed", "long", "eofkick"}

# Steps aimed at one ring (st["q"]), with the ring of those that name none (the pair-0 defaults).
RING_OPS = {"tx": 1, "rx": 0, "ptx": 1, "prx": 0, "bad": 0, "avail": 0, "aflags": 0, "pbad": 0, "pevent": 0,
            "kick": 0, "stale": 0, "ring": 0, "venable": 0, "descbomb": 0}

# Ops whose generator is named otherwise (g_rx_small makes "rxsmall" steps).
_GEN_OF_OP = {"rxsmall": "g_rx_small", "rxjump": "g_rx_jump", "mrgref": "g_mrg_refused",
              "descbomb": "g_desc_bomb", "idleflood": "g_idle_flood", "resize": "g_resize",
              "eofkick": "g_eof_kick"}


def OP_ALIASES(only: set[str]) -> set[str]:  # noqa: N802 - reads as a table
    return {_GEN_OF_OP[o] for o in only if o in _GEN_OF_OP}


def op_names() -> list[str]:
    names = [n[2:] for n in dir(Gen) if n.startswith("g_") and n[2:] not in
             ("rx_small", "rx_jump", "mrg_refused", "desc_bomb", "idle_flood", "eof_kick")]
    return sorted(set(names) | set(_GEN_OF_OP))


class Gen:
    """Draws steps (plain dicts) from a seeded RNG and its own model of what it set up."""

    def __init__(self, seed: int, only: set[str] | None = None, queues: int = DEFAULT_QUEUES):
        self.rng = random.Random(seed)
        self.n = 0
        self.queues = queues     # the pairs the backend serves (--queues)
        self.nq = 2              # rings on this connection: 2 * queues once MQ was negotiated, else 2
        self.qsize = [256, 256]
        self.feats = 0
        self.regions = 2
        self.packed = False      # the last connect negotiated RING_PACKED: driver steps are packed ones
        self.planted: list[int | None] = [None, None]   # a head whose desc is a huge indirect table
        self.ops = [  # (weight, generator); targeted ones that open their own connection are rarer
            (14, self.g_tx), (10, self.g_rx), (9, self.g_bad), (5, self.g_avail), (2, self.g_aflags),
            (6, self.g_kick), (14, self.g_msg), (3, self.g_ring), (2, self.g_memtab), (0.4, self.g_truncate),
            (0.4, self.g_framing), (0.6, self.g_stale), (5, self.g_ctl), (1, self.g_session),
            (1.2, self.g_capture), (1.5, self.g_idle), (0.8, self.g_connect), (0.5, self.g_resize),
            (0.2, self.g_desc_bomb), (0.15, self.g_idle_flood),
            (0.15, self.g_long), (0.05, self.g_feed), (0.2, self.g_mrg_refused), (0.15, self.g_rx_small),
            (0.15, self.g_rx_jump), (0.15, self.g_shrink), (0.1, self.g_eof_kick),
        ]
        if queues > 1:   # with one pair the op mix (and so every seed's sequence) is the one-pair fuzzer's
            self.ops.append((1, self.g_venable))
        if only:   # --only: just these ops (the first step still connects)
            self.ops = [(w, g) for w, g in self.ops if g.__name__ in {f"g_{o}" for o in only} | OP_ALIASES(only)]
            if not self.ops:
                raise ValueError(f"--only {','.join(sorted(only))}: no such op; known: {', '.join(op_names())}")
        self.weights = [w for w, _ in self.ops]

    def next(self) -> dict:
        self.n += 1
        if self.n == 1:
            return self.g_connect()
        return self.rng.choices(self.ops, self.weights)[0][1]()

    # -- helpers
    @property
    def hdr_len(self) -> int:
        return 12 if self.feats & (1 << F.VERSION_1 | 1 << F.MRG_RXBUF) else 10

    def head(self, q: int) -> int:
        return self.rng.randrange(self.qsize[q])

    def ring_q(self) -> int:
        """A ring of this connection: pair 0's two rings most often. Without MQ, 0 or 1
        with the very draw of the one-pair fuzzer."""
        r = self.rng
        if self.nq == 2:
            return r.choice([0, 1])
        return r.choices(range(self.nq), [2, 2] + [1] * (self.nq - 2))[0]

    def pair(self) -> int:
        """A queue pair of this connection for a traffic step (no draw without MQ)."""
        if self.nq == 2:
            return 0
        return self.rng.choices(range(self.nq // 2), [2] + [1] * (self.nq // 2 - 1))[0]

    def no_mq(self, st: dict) -> dict:
        """A targeted connect that sets up one pair of its own: MQ not negotiated."""
        st.update(mq=False, q=st["q"][:2], feats=st["feats"] & ~MQ_BIT, setup=1, disabled=[])
        self.nq = 2
        self.feats &= ~MQ_BIT
        self.qsize = self.qsize[:2]
        self.planted = self.planted[:2]
        return st

    def buf_addr(self, length: int) -> int:
        r = self.rng
        hi = BUF_HI if self.regions == 2 else REGION
        if r.random() < 0.05:   # across the boundary of the two regions
            return REGION - r.randrange(1, max(2, length))
        return r.randrange(BUF_LO, max(BUF_LO + 1, hi - length))

    def fd_kinds(self, n: int | None = None) -> list[str]:
        r = self.rng
        if n is None:
            n = r.choices([0, 1, 2, 3, 8, 9], [3, 10, 2, 1, 0.3, 0.3])[0]
        return [r.choice(DATA_FD_KINDS) for _ in range(n)]

    # -- front-end
    def g_connect(self) -> dict:
        r = self.rng
        feats = r.choice([OFFERED, OFFERED, OFFERED & ~(1 << F.MRG_RXBUF), OFFERED & ~(1 << F.EVENT_IDX),
                          OFFERED & ~F.OFFLOAD_FEATURES, 1 << F.PROTOCOL_FEATURES | 1 << F.MAC,
                          r.getrandbits(40) & OFFERED, OFFERED | 1 << 35])
        packed = r.random() < PACKED_SHARE
        if packed:   # a valid set mostly; a random one now and then
            feats = r.choice([OFFERED, OFFERED, OFFERED & ~(1 << F.MRG_RXBUF), OFFERED & ~(1 << F.EVENT_IDX),
                              OFFERED & ~(1 << F.INDIRECT_DESC), r.getrandbits(40) & OFFERED]) | PACKED_BIT
        q = [r.choice(QUEUE_SIZES), r.choice(QUEUE_SIZES)]
        self.qsize = list(q)
        self.feats = feats if not feats & ~OFFERED_ANY else 0
        self.packed = bool(self.feats & PACKED_BIT)
        self.regions = r.choice([1, 2, 2])
        self.planted = [None, None]
        kick = r.choices(["eventfd", "pipe", "pipe_eof", "socket_eof", "none", "opath"],
                         [40, 2, 1, 1, 2, 0.5])[0]
        st = {"op": "connect", "feats": feats, "q": q, "sealed": r.random() < 0.8,
              "regions": self.regions, "ack": r.random() < 0.7, "enable": r.random() < 0.95, "kick": kick}
        # Multiqueue (drawn after everything above, and only with --queues > 1: one
        # pair's sequences stay the one-pair fuzzer's): MQ and PROTOCOL_F_MQ,
        # GET_QUEUE_NUM, all 2N rings; now and then only pair 0 set up, or a
        # later pair's rings left disabled.
        self.nq = 2
        mq = self.queues > 1 and r.random() < MQ_SHARE
        st.update(mq=mq, setup=1, disabled=[])
        if mq:
            self.nq = 2 * self.queues
            q += [r.choice(QUEUE_SIZES) for _ in range(self.nq - 2)]
            feats |= MQ_BIT
            self.qsize = list(q)
            self.feats = feats if not feats & ~OFFERED_ANY else 0
            self.planted = [None] * self.nq
            setup = self.queues if r.random() < 0.85 else 1
            off = r.randrange(1, self.queues)
            st.update(feats=feats, q=q, setup=setup, disabled=[2 * off, 2 * off + 1] if r.random() < 0.2 else [])
        return st

    def g_msg(self) -> dict:
        r = self.rng
        req = r.choice(ALL_REQUESTS)
        flags = r.choices([P.FLAG_VERSION, P.FLAG_VERSION | P.FLAG_NEED_REPLY, 0, 2, 3,
                           P.FLAG_VERSION | P.FLAG_REPLY, r.getrandbits(32)], [10, 6, 1, 1, 1, 1, 1])[0]
        if req == Req.GET_FEATURES:
            flags = flags & ~P.VERSION_MASK | P.FLAG_VERSION   # one reply owed (see the probe)
        payload = self.payload(req)
        size = None
        if r.random() < 0.03:
            size = r.choice([len(payload) + 1, max(0, len(payload) - 1)])
        return {"op": "msg", "req": req, "flags": flags, "payload": payload.hex(), "size": size,
                "fds": self.fd_kinds()}

    def payload(self, req: int) -> bytes:
        r = self.rng
        q = r.choices([0, 1, 2, 0xFF, 0x100, 0x101, r.getrandbits(32)], [10, 10, 1, 1, 2, 2, 1])[0]
        if q in (0, 1) and self.nq > 2:
            q = self.ring_q()    # with MQ: any ring of the connection
        num = r.choice([0, 1, 3, 16, 256, 1024, 32768, 65535, 65536, r.getrandbits(32)])
        mode = r.random()
        if mode < 0.05:
            return r.randbytes(r.choice([0, 1, 7, 9, 40, 300, 4097]))
        if req in (Req.SET_FEATURES, Req.SET_PROTOCOL_FEATURES, Req.NET_SET_MTU, Req.SET_STATUS,
                   Req.SEND_RARP, Req.SET_LOG_BASE):
            v = r.choice([0, OFFERED, self.feats, r.getrandbits(64), 1500, 67, 65536,
                          (1 << P.ProtoFeat.REPLY_ACK) | (1 << P.ProtoFeat.MTU)])
            return U64.pack(v)
        if req in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
            return U64.pack(q & 0xFFFFFFFF)
        if req in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.GET_VRING_BASE, Req.SET_VRING_ENABLE):
            return STATE.pack(q & 0xFFFFFFFF, num if req != Req.SET_VRING_ENABLE else r.choice([0, 1, 1, 2]))
        if req == Req.SET_VRING_ADDR:
            qi = q % self.nq if q < 0x100 else q & 1
            n = r.choice([self.qsize[qi], r.choice(QUEUE_SIZES)])
            d, a, u = ring_addrs(qi, n, self.packed)
            addrs = [gpa_to_uva(d), gpa_to_uva(u), gpa_to_uva(a)]
            if r.random() < 0.3:
                addrs[r.randrange(3)] = r.choice([0, 1, r.getrandbits(64), REGION_UVA[0] + REGION - 8,
                                                  REGION_UVA[1] + REGION - 4])
            return ADDR.pack(q & 0xFFFFFFFF, r.choice([0, 0, 1]), *addrs, 0)
        if req == Req.SET_MEM_TABLE:
            return self.memtab_payload(r.randrange(0, 10))[0]
        if req in (Req.GET_CONFIG, Req.SET_CONFIG):
            return struct.pack("<III", r.choice([0, 6, 256, 0xFFFFFFFF]), r.choice([0, 6, 10, 256, 4096]),
                               0) + r.randbytes(r.choice([0, 6, 256]))
        if req in (Req.ADD_MEM_REG, Req.REM_MEM_REG):
            return b"\0" * 8 + REGION_DESC.pack(*self.region(0))
        return r.randbytes(r.choice([0, 0, 8, 16]))

    def region(self, i: int) -> tuple[int, int, int, int]:
        return REGION_GPA[i], REGION, REGION_UVA[i], REGION_OFF[i]

    def memtab_payload(self, n: int) -> tuple[bytes, int]:
        r = self.rng
        regs = [list(self.region(i % 2)) for i in range(n)]
        for reg in regs:
            if r.random() < 0.25:
                field = r.randrange(4)
                reg[field] = r.choice({
                    0: [0, REGION // 2, 2 * REGION, r.getrandbits(64)],
                    1: [0, 4096, REGION // 2, REGION + 1, MEM_SIZE, 1 << 63, r.getrandbits(64)],
                    2: [0, 1, REGION_UVA[0] + 8, r.getrandbits(64)],
                    3: [0, 1, MEM_SIZE, 1 << 62, r.getrandbits(64)]}[field])
            # Declared bytes of our memfd must stay off its guard areas, or the
            # guard check would be wrong: a region starts where one of ours does
            # and is at most REGION long, or it reaches beyond the end of the
            # file (which the backend must refuse).
            if reg[3] not in REGION_OFF and reg[3] < MEM_SIZE:
                reg[3] = REGION_OFF[0]
            if reg[3] + reg[1] <= MEM_SIZE:
                reg[1] = min(reg[1], REGION)
        payload = struct.pack("<II", n, 0) + b"".join(REGION_DESC.pack(*x) for x in regs)
        return payload, n

    def g_memtab(self) -> dict:
        r = self.rng
        n = r.choices([1, 2, 2, 0, 3, 8, 9], [4, 6, 0, 1, 1, 0.5, 0.5])[0]
        payload, _ = self.memtab_payload(n)
        fds = ["guest"] * n
        if r.random() < 0.3 and fds:
            fds[r.randrange(len(fds))] = r.choice(DATA_FD_KINDS)
        if r.random() < 0.1:
            fds = fds[:-1] if fds and r.random() < 0.5 else fds + ["guest"]
        return {"op": "memtab", "payload": payload.hex(), "fds": fds,
                "flags": r.choice([P.FLAG_VERSION, P.FLAG_VERSION | P.FLAG_NEED_REPLY])}

    def g_ring(self) -> dict:
        """A (mostly) well-formed ring set-up, in a random order now and then."""
        r = self.rng
        q = self.ring_q()
        n = r.choice([self.qsize[q]] * 3 + list(QUEUE_SIZES) + [0, 3, 65536])
        order = ["num", "base", "addr", "call", "kick", "enable"]
        if r.random() < 0.3:
            r.shuffle(order)
        if r.random() < 0.2:
            order.insert(r.randrange(len(order) + 1), "num2")   # SET_VRING_NUM again, another size
        if r.random() < 0.9:
            order.insert(0, "stop")     # GET_VRING_BASE first, as QEMU does before it sets a ring up again
        addr_n = r.choice([self.qsize[q], n])
        if self.packed:   # wrap-counter games: both counters, each index, as vhost-user.rst packs them
            base = r.choice([PACKED_FRESH_BASE, PACKED_FRESH_BASE, 0, 1 << 15, 1 << 31, 5 | 1 << 15 | 5 << 16,
                             r.getrandbits(32), 0xFFFFFFFF])
        else:
            base = r.choice([0, 0, 1, 65535, 70000])
        # When the set-up is complete and valid, the driver model follows it.
        follow = ({"num", "addr", "kick"} <= set(order) and "num2" not in order and addr_n == n
                  and n in QUEUE_SIZES and base <= (0xFFFFFFFF if self.packed else 0xFFFF))
        if follow:
            self.qsize[q] = n
        return {"op": "ring", "q": q, "num": n, "num2": r.choice(QUEUE_SIZES), "base": base,
                "addr_n": addr_n, "order": order, "follow": follow,
                "kick": r.choices(["eventfd", "pipe", "pipe_eof", "socket", "socket_eof", "opath",
                                   "memfd_sealed", "devnull", "none"], [30, 2, 1, 1, 1, 0.5, 0.5, 0.5, 2])[0],
                "call": r.choices(["eventfd", "none", "pipe"], [8, 1, 1])[0]}

    def g_resize(self) -> dict:
        """Targeted (case 8): SET_VRING_NUM again after SET_VRING_ADDR, larger, then start and use it."""
        r = self.rng
        q = self.ring_q()
        small = r.choice([1, 2, 16, 256])
        return {"op": "ring", "q": q, "num": small, "num2": small * r.choice([2, 16, 128]), "base": 0,
                "addr_n": small, "order": ["stop", "num", "base", "addr", "num2", "call", "kick", "enable"],
                "follow": False, "kick": "eventfd", "call": "eventfd", "then": "traffic"}

    def g_mrg_refused(self) -> dict:
        """Targeted (case 11): merged RX buffers, one too small and the next refused, and a frame to place."""
        st = self.no_mq(self.g_connect())
        self.packed = False   # its own set-up is split rings
        st.update(op="mrgref", feats=OFFERED, q=[256, 256], kick="eventfd", enable=True, sealed=True)
        self.feats, self.qsize = OFFERED, [256, 256]
        r = self.rng
        st.update(small=r.choice([1, 12, 20]), heads=r.sample(range(256), 3), s=r.getrandbits(32),
                  extra=r.choice([None, "loop", "oob", "next_oob"]))
        return st

    def g_rx_small(self) -> dict:
        """Targeted (case 1): MRG_RXBUF, RX buffers that together cannot hold the frame, a frame for them."""
        st = self.no_mq(self.g_connect())
        self.packed = False   # its own set-up is split rings
        st.update(op="rxsmall", feats=OFFERED, q=[256, 256], kick="eventfd", enable=True, sealed=True)
        self.feats, self.qsize = OFFERED, [256, 256]
        r = self.rng
        st.update(sizes=[r.choice([1, 12, 20, 40]) for _ in range(r.choice([1, 2]))], s=r.getrandbits(32))
        return st

    def g_rx_jump(self) -> dict:
        """Targeted (case 2): a frame waits for RX buffers, and RX avail->idx jumps past the queue size."""
        st = self.no_mq(self.g_connect())
        self.packed = False   # its own set-up is split rings
        r = self.rng
        st.update(op="rxjump", q=[r.choice([16, 256]), 256], kick="eventfd", enable=True, sealed=True,
                  feats=st["feats"] & ~PACKED_BIT)
        self.feats, self.qsize = st["feats"] if not st["feats"] & ~OFFERED else 0, list(st["q"])
        st.update(jump=st["q"][0] + r.randrange(1, 1000), s=r.getrandbits(32))
        return st

    def g_shrink(self) -> dict:
        """Targeted (case 3): unsealed guest memory, shrunk under the backend, then the rings used."""
        st = self.g_connect()
        self.packed = False   # its own set-up is split rings
        r = self.rng
        st.update(op="shrink", sealed=False, kick="eventfd", enable=True, feats=st["feats"] & ~PACKED_BIT,
                  to=r.choice([0, GUARD, GUARD + 4096]), s=r.getrandbits(32))
        return st

    def g_desc_bomb(self) -> dict:
        """Targeted (case 6): plant an indirect table as large as memory that loops, and inspect it."""
        st = self.split_bad()   # on a packed ring: split structures written over it, junk to the device
        st.update(op="descbomb", kind="huge_indirect")
        return st

    def g_idle_flood(self) -> dict:
        """Targeted (case 10): more idle control clients than the backend admits."""
        return {"op": "idleflood", "n": self.rng.choice([16, 17, MAX_IDLE_CLIENTS])}

    def g_truncate(self) -> dict:
        return {"op": "truncate", "to": self.rng.choice([0, GUARD + REGION // 2, GUARD + 4096])}

    def g_framing(self) -> dict:
        return {"op": "framing", "mode": self.rng.choice(["huge", "short", "toomanyfds"])}

    def g_stale(self) -> dict:
        """Targeted (case 4): a refused SET_VRING_KICK, then a control client, then a restart."""
        return {"op": "stale", "q": self.ring_q()}

    # -- driver
    def g_tx(self) -> dict:
        r = self.rng
        if self.packed:
            return self.g_ptx()
        kind = r.choices(["arp", "ping", "udp", "junk"], [3, 4, 3, 1])[0]
        size = r.choice([0, 1, 56, 200, 1000, 1472, 3000, 9000, 65000])
        hdr = "ok" if r.random() < 0.8 else "rand"
        nseg = r.choices([1, 2, 3], [6, 3, 1])[0]
        q = 2 * self.pair() + 1
        heads = [self.head(q) for _ in range(nseg)]
        return {"op": "tx", "q": q, "kind": kind, "size": size, "hdr": hdr, "descs": heads,
                "addr": self.buf_addr(size + 200), "kick": r.random() < 0.8, "s": r.getrandbits(32),
                "hl": self.hdr_len}

    def g_rx(self) -> dict:
        r = self.rng
        if self.packed:
            return self.g_prx()
        count = r.choice([1, 1, 4, 16, 64, 256])
        size = r.choice([1, 12, 20, 60, 100, 1526, 4096, 65562, "mix"])
        bufs = []
        q = 2 * self.pair()
        for _ in range(min(count, self.qsize[q])):
            s = r.choice([1, 12, 30, 64, 1526, 4096]) if size == "mix" else size
            bufs.append((self.head(q), self.buf_addr(s), s, r.random() < 0.05))
        return {"op": "rx", "q": q, "bufs": bufs, "kick": r.random() < 0.8}

    def g_bad(self) -> dict:
        if self.packed:
            return self.g_pbad()
        return self.split_bad()

    def split_bad(self) -> dict:
        r = self.rng
        q = self.ring_q()
        kind = r.choice(["loop", "oob", "guard", "gap", "indirect", "nested", "next_oob", "readafterwrite",
                         "huge_indirect", "indirect_loop", "zero_len", "head_oob"])
        head = self.head(q)
        if kind == "huge_indirect":
            self.planted[q] = head
        return {"op": "bad", "q": q, "kind": kind, "head": head, "s": r.getrandbits(32),
                "n": self.qsize[q], "regions": self.regions, "kick": r.random() < 0.8}

    def g_avail(self) -> dict:
        r = self.rng
        if self.packed:
            return self.g_pevent()
        q = self.ring_q()
        n = self.qsize[q]
        mode = r.choice(["fwd", "jump", "back", "rand"])
        k = {"fwd": r.randrange(1, n + 1), "jump": n + r.randrange(1, 100), "back": -r.randrange(1, 50),
             "rand": r.getrandbits(16)}[mode]
        return {"op": "avail", "q": q, "mode": mode, "k": k, "kick": r.random() < 0.7}

    def g_aflags(self) -> dict:
        r = self.rng
        if self.packed:
            return self.g_pevent()
        return {"op": "aflags", "q": self.ring_q(), "flags": r.choice([0, 1, 0xFFFF]),
                "used_event": r.getrandbits(16)}

    # -- driver, packed rings (virtio 1.2 §2.8): the executor's PackedDriver writes them
    def g_ptx(self) -> dict:
        r = self.rng
        kind = r.choices(["arp", "ping", "udp", "junk"], [3, 4, 3, 1])[0]
        size = r.choice([0, 1, 56, 200, 1000, 1472, 3000, 9000, 65000])
        return {"op": "ptx", "q": 2 * self.pair() + 1, "kind": kind, "size": size, "hdr": "ok" if r.random() < 0.8 else "rand",
                "nseg": r.choices([1, 2, 3], [6, 3, 1])[0], "addr": self.buf_addr(size + 200),
                "kick": r.random() < 0.8, "s": r.getrandbits(32), "hl": self.hdr_len,
                "indirect": r.random() < 0.15}

    def g_prx(self) -> dict:
        r = self.rng
        count = r.choice([1, 1, 4, 16, 64, 256])
        size = r.choice([1, 12, 20, 60, 100, 1526, 4096, 65562, "mix"])
        bufs = []
        q = 2 * self.pair()
        for _ in range(min(count, self.qsize[q])):
            sz = r.choice([1, 12, 30, 64, 1526, 4096]) if size == "mix" else size
            bufs.append((self.buf_addr(sz), sz, r.random() < 0.05))
        return {"op": "prx", "q": q, "bufs": bufs, "kick": r.random() < 0.8}

    def g_pbad(self) -> dict:
        """A packed-ring hostile move (§2.8): each should be refused with a packed_* finding."""
        r = self.rng
        q = self.ring_q()
        return {"op": "pbad", "q": q, "kind": r.choice(PACKED_KINDS), "s": r.getrandbits(32),
                "n": self.qsize[q], "kick": r.random() < 0.85}

    def g_pevent(self) -> dict:
        """Event suppression games (§2.8.10, §2.8.14): the driver's structure, and scribbles on ours."""
        r = self.rng
        q = self.ring_q()
        return {"op": "pevent", "q": q, "flags": r.choice([0, 1, 2, 3, 3, r.getrandbits(16)]),
                "off": r.choice([0, 1, self.qsize[q] - 1, self.qsize[q], 0x7FFF, r.getrandbits(15)]),
                "wrap": r.random() < 0.5, "device": r.random() < 0.2, "raw": r.getrandbits(32),
                "kick": r.random() < 0.7}

    def g_kick(self) -> dict:
        return {"op": "kick", "q": self.ring_q()}

    def g_venable(self) -> dict:
        """SET_VRING_ENABLE on one ring of this connection, as the guest's
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET becomes in QEMU (docs/multiqueue.md)."""
        r = self.rng
        return {"op": "venable", "q": self.ring_q(), "on": r.random() < 0.6, "kick": r.random() < 0.5}

    def g_long(self) -> dict:
        """Targeted (case 12): min(512, n) copies of a chain as long as the queue, n up to 32768."""
        r = self.rng
        st = self.no_mq(self.g_connect())
        self.packed = False   # its own set-up is split rings
        n = r.choice([1024, 32768, 32768])
        st.update(op="long", q=[256, n], kick="eventfd", enable=True, sealed=True, indirect=r.random() < 0.5)
        self.qsize = [256, n]
        return st

    def g_eof_kick(self) -> dict:
        """Targeted (case 7): a kick fd that is always readable (a pipe or socket whose writer is gone)."""
        st = self.g_connect()
        self.packed = False   # its own set-up is split rings
        st.update(op="eofkick", kick=self.rng.choice(["pipe_eof", "socket_eof"]), enable=True, sealed=True,
                  feats=st["feats"] & ~PACKED_BIT)
        return st

    def g_feed(self) -> dict:
        """Targeted (case 5): a thread keeps feeding refused chains while we probe."""
        # On its own connection with the largest queue: a driver thread on a
        # shared machine is not always running, and a 32768-entry ring gives
        # it time to refill before the backend catches up.
        st = self.no_mq(self.g_connect())
        self.packed = False   # its own set-up is split rings
        st.update(op="feed", q=[256, 32768], kick="eventfd", enable=True, sealed=True, secs=0.3)
        self.qsize = [256, 32768]
        return st

    # -- control
    def g_ctl(self) -> dict:
        r = self.rng
        q = self.ring_q()
        head = self.planted[q] if self.planted[q] is not None and r.random() < 0.6 else r.randrange(0, 300)
        req = r.choices([
            {"cmd": "inspect"}, {"cmd": "stats"}, {"cmd": "ping"}, {"cmd": "desc", "queue": q, "head": head},
            {"cmd": "desc", "queue": r.choice([-1, 2, "x"]), "head": r.choice([-1, 1 << 40, None])},
            {"cmd": r.choice(["", "nope", "capture2"])}, "garbage", "huge", "list", "notutf8",
            {"cmd": "fault", "op": r.choice(["show", "clear", "set", "bogus"]),
             "spec": r.choice(["loss=5%,seed=1", "dup=20%,reorder=10%", "corrupt=50%", "delay=20ms,jitter=5ms",
                               "rate=1mbit,limit=10", "loss=101%", "x" * 2000, "", 7])}],
            [3, 3, 1, 4, 1, 1, 1, 0.3, 0.5, 0.5, 1])[0]
        return {"op": "ctl", "via": r.choice(["new", "new", "session"]), "req": req}

    def g_session(self) -> dict:
        return {"op": "session", "open": self.rng.random() < 0.6}

    def g_capture(self) -> dict:
        r = self.rng
        return {"op": "capture", "start": r.random() < 0.6, "count": r.choice([None, 1, 10, 1000, 0, -1]),
                "read": r.random() < 0.7}

    def g_idle(self) -> dict:
        return {"op": "idle", "open": self.rng.random() < 0.7}


# -- the backend, from outside -------------------------------------------------------

WRAPPER = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
           "from vhostnet.launch.cli import main; sys.exit(main(sys.argv[1:]))")


class Backend:
    """A `vhostnet serve` subprocess with its socket, log, and /proc views."""

    def __init__(self, workdir: str, tree: Path, queues: int = 1):
        self.workdir = workdir
        self.tree = tree
        self.queues = queues
        self.sock_path = os.path.join(workdir, "v.sock")
        self.ctl_path = self.sock_path + ".ctl"
        self.proc: subprocess.Popen | None = None
        self.log_path = ""
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log_path = os.path.join(self.workdir, f"backend-{self.starts}.log")
        log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONPATH=str(self.tree))
        self.proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", WRAPPER, "serve",
                                      "--socket", self.sock_path, "--log-level", "warning",
                                      "--queues", str(self.queues)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                     cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not (os.path.exists(self.sock_path) and os.path.exists(self.ctl_path)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("backend did not listen within 20 s")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """The backend's CPU time so far (proc(5): utime + stime); 0 when it is gone."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / CLK_TCK   # fields 14, 15 of stat

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        for p in (self.sock_path, self.ctl_path):
            try:
                os.unlink(p)
            except OSError:
                pass

    def dump_stack(self, samples: int = STACK_SAMPLES) -> list[str]:
        """Python stacks of the backend from faulthandler (it answers even while the loop spins)."""
        out = []
        for _ in range(samples):
            if not self.alive():
                break
            size = os.path.getsize(self.log_path)
            os.kill(self.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 2
            last = size
            while time.monotonic() < deadline:
                time.sleep(0.03)
                now = os.path.getsize(self.log_path)
                if now > size and now == last:   # it wrote, and has stopped writing
                    break
                last = now
            with open(self.log_path, "rb") as f:
                f.seek(size)
                out.append(f.read().decode(errors="replace"))
        return out

    def log_tail(self, n: int = 64 << 10) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return int(f.read().split()[1]) * mmap.PAGESIZE
        except OSError:
            return -1

    def runnable_ns(self) -> int:
        """Time its threads were running or waiting for a CPU (schedstat fields 1 and 2).

        Not CPU time alone: on a shared machine a spinning process gets only
        part of a core, but it is runnable all the time; an idle one is neither.
        """
        total = 0
        try:
            for t in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{t}/schedstat") as f:
                    run, wait = f.read().split()[:2]
                    total += int(run) + int(wait)
        except OSError:
            pass
        return total

    def blocks(self) -> int:
        """Times its threads went to sleep of their own accord (voluntary context switches).

        A spin never does: a loop that finds work at once, a timer due at
        once, a kick fd always readable, all go round without blocking. A
        ring polled every millisecond does, each time, however long it then
        waits for a CPU on a loaded machine.
        """
        total = 0
        try:
            for t in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{t}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            total += int(line.split()[1])
        except OSError:
            pass
        return total


_FRAME_RE = re.compile(r'File "([^"]*?/(?:vhostnet|stack|trio)/[^"]+)", line (\d+),? in (\w+)')
_EXC_RE = re.compile(r"^[\s|+\-]*([A-Za-z_][\w.]*(?:Error|error|Exception|Interrupt|Exit)\b[^\n]*)$", re.M)


# Where the backend enters guest- or client-driven work. A crash is named by
# the two frames below the innermost of these; a hang or a spin by the
# deepest frame below it that every sample of the stack shares: the function
# whose loop does not end (the frames under it change from sample to sample).
ENTRIES = {"process", "poll", "handle", "_answer", "message_loop", "_kick_loop", "_poll_loop",
           "timer_loop", "_client", "_capture"}


def frames_of(text: str) -> list[str]:
    """vhostnet and stack function names of one traceback, outermost first."""
    if "most recent call first" in text:   # faulthandler: innermost first; the current thread's block
        at = text.find("Current thread")
        block = text[at if at >= 0 else text.index("most recent call first"):].split("\n\n")[0]
        return [fn for f, _l, fn in _FRAME_RE.findall(block) if "/trio/" not in f][::-1]
    return [fn for f, _l, fn in _FRAME_RE.findall(text) if "/trio/" not in f]


def below_entry(names: list[str]) -> list[str]:
    k = max((i for i, fn in enumerate(names) if fn in ENTRIES), default=-1)
    return names[k + 1:]


def where(text: str) -> str:
    """A crash's place: the two frames below the entry point, 'drain_tx > pop'."""
    names = frames_of(text)
    if not names:
        return "?"
    path = below_entry(names)[:2] or names[-2:]
    return " > ".join(path)


def loop_owner(samples: list[str]) -> str:
    """A hang's place: the deepest frame every stack sample shares, preferably below the entry point."""
    full = [frames_of(t) for t in samples]
    full = [f for f in full if f]
    if not full:
        return "?"
    common = full[0]
    for p in full[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    below = below_entry(common)
    if below:
        return below[-1]
    entries = [fn for fn in common if fn in ENTRIES]
    return entries[-1] if entries else (common[-1] if common else "?")


def exception_of(text: str) -> str:
    found = [m for m in _EXC_RE.findall(text) if "ExceptionGroup" not in m]
    return found[-1].strip()[:120] if found else ""


class Failure(Exception):
    """A check that did not hold; STACKS are samples of the backend's stack taken then."""

    def __init__(self, kind: str, detail: str, stacks: list[str] | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.stacks = kind, detail, stacks or []


# -- the executor: steps against the backend, checks after each ----------------------

class GuestMem:
    """Our side of guest memory: one memfd with guard areas, and a shadow of what we wrote."""

    def __init__(self, sealed: bool):
        self.fd = make_memfd(MEM_SIZE, sealed, "fuzz-guest")
        self.sealed = sealed
        self.mm = mmap.mmap(self.fd, MEM_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.valid = MEM_SIZE        # bytes still backed (after a truncation)
        for lo, hi in GUARDS:
            self.mm[lo:hi] = CANARY[:hi - lo]

    @staticmethod
    def off(gpa: int) -> int | None:
        for g, o in zip(REGION_GPA, REGION_OFF):
            if g <= gpa < g + REGION:
                return o + gpa - g
        return None

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest bytes; a range crossing the region boundary is split."""
        while data:
            o = self.off(gpa)
            if o is None:
                return
            room = REGION - (gpa - REGION_GPA[0 if gpa < REGION else 1])
            part = data[:room]
            if o + len(part) <= self.valid:
                self.mm[o:o + len(part)] = part
            gpa += len(part)
            data = data[len(part):]

    def read(self, gpa: int, n: int) -> bytes | None:
        o = self.off(gpa)
        if o is None or o + n > self.valid:
            return None
        return self.mm[o:o + n]

    def guards_intact(self) -> str | None:
        for lo, hi in GUARDS:
            hi = min(hi, self.valid)
            if lo < hi and self.mm[lo:hi] != CANARY[:hi - lo]:
                at = next(i for i in range(lo, hi) if self.mm[i] != CANARY[i - lo])
                return f"guard area {lo:#x}-{hi:#x} of the guest memfd written at offset {at:#x}"
        return None

    def truncate(self, size: int) -> bool:
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            return False    # sealed: what the seals are for
        self.valid = min(self.valid, size)
        return True

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


class RingOracle:
    """Used-ring check for one queue: no head returned more often than offered."""

    def __init__(self, n: int):
        self.n = n
        self.armed = True
        self.offered: collections.Counter = collections.Counter()
        self.returned: collections.Counter = collections.Counter()
        self.slots = [0] * n       # shadow of the avail ring slots we wrote
        self.avail = 0
        self.seen = 0              # used ring index read so far


class Ctl:
    """A control-socket client: blocking, line-oriented, with timeouts."""

    def __init__(self, path: str, timeout: float = CONTROL_TIMEOUT):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:
                # The listen backlog is full (a burst of clients the backend has
                # not accepted yet): with a timeout set, Python does not wait.
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.005)
            except OSError:
                self.sock.close()
                raise
        self.buf = bytearray()
        self.last_used = time.monotonic()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.last_used = time.monotonic()

    def line(self, timeout: float = CONTROL_TIMEOUT) -> bytes | None:
        """One reply line, None at EOF; socket.timeout if none within TIMEOUT."""
        deadline = time.monotonic() + timeout
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                out = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                self.last_used = time.monotonic()
                return out
            if len(self.buf) > MAX_CONTROL_REPLY:
                raise Failure("control_reply_huge", f"a control reply over {MAX_CONTROL_REPLY >> 20} MiB")
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk

    def drain(self) -> bool:
        """Read what is there without waiting; False at EOF."""
        try:
            self.sock.setblocking(False)
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return False
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


class Executor:
    def __init__(self, backend: Backend, verbose: bool = False):
        self.b = backend
        self.verbose = verbose
        self.sock: socket.socket | None = None
        self.mem: GuestMem | None = None
        self.canary_fd = make_memfd(GUARD, True, "fuzz-canary")
        self.canary = mmap.mmap(self.canary_fd, GUARD, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.canary[:] = CANARY
        self.kept: dict[str, int] = {}             # "kick0", "call1"...: fds we keep to drive
        self.rings = 2 * backend.queues            # every ring the backend serves (2 per pair)
        self.nq = 2                                # rings of this connection: all of them once MQ was negotiated
        self.kick_kind = ["none"] * self.rings
        self.oracle: list[RingOracle | None] = [None] * self.rings
        self.qsize = [256] * self.rings
        self.feats = 0
        self.packed = False                        # this connection negotiated RING_PACKED
        self.pdrv: list[PackedDriver | None] = [None] * self.rings   # the packed driver model per ring
        self.mq_connects = 0                       # connects that negotiated MQ
        self.ring_moves = [0] * self.rings         # driver and ring steps aimed at each ring
        self.ring_chains = [0] * self.rings        # inspect's per-ring chains, errors: the most one connection had
        self.ring_errors = [0] * self.rings
        self.rules_seen: set[str] = set()          # refusal rule ids inspect showed (findings.py)
        self.last_connect: dict | None = None
        self.idle: list[Ctl] = []
        self.captures: list[tuple[Ctl, bool]] = []
        self.session: Ctl | None = None
        self.pending_gf = 0
        self.connections = 0
        self.disconnects = 0
        self.base_fds = 0
        self.base_rss = 0
        self.fd_max = 0
        self.rss_max = 0
        self.probe_max = 0.0
        self.cpu0 = 0.0                 # the backend's CPU seconds when the current probe began
        self.late_loaded = 0
        self.idle_due = False
        # The longest event-loop step the backend timed (ms, kind, its CPU ms), read
        # with inspect at every idle check (and so before every connecting step).
        self.loop_max: tuple[float, str | None, float] = (0.0, None, 0.0)
        self.loop_slow = 0

    # -- connection
    def vh_connect(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(PROBE_TIMEOUT)
        self.sock.connect(self.b.sock_path)
        self.pending_gf = 0
        self.connections += 1

    def send(self, req: int, payload: bytes = b"", flags: int = P.FLAG_VERSION, fds=(), size=None) -> None:
        if req == Req.GET_FEATURES:
            self.pending_gf += 1
        try:
            send_message(self.sock, encode_message(req, payload, flags, size), fds)
        except socket.timeout:
            raise Failure("hang", "the backend stopped reading its vhost-user socket") from None
        except OSError:
            pass     # it closed the connection: the probe sees that and reconnects

    def send_fds(self, req, payload, kinds, flags=P.FLAG_VERSION, size=None, keep_as: str | None = None):
        """Send with fds of the given kinds; we close our copies (keeping a driver end if asked)."""
        fds, keep = [], None
        try:
            for k in kinds:
                if k == "guest" and self.mem is None:
                    # No guest memory on this connection (a bare reconnect after a
                    # failed recovery): a memfd of the same size stands in.
                    fds.append(make_memfd(MEM_SIZE, True, "fuzz-guest-standin"))
                elif k == "guest":
                    fds.append(os.dup(self.mem.fd))
                else:
                    fd, other = make_fd(k, REGION + GUARD)
                    fds.append(fd)
                    if other is not None:
                        if keep is None and keep_as:
                            keep = other
                        else:
                            os.close(other)
            self.send(req, payload, flags, fds, size)
        finally:
            for fd in fds:
                os.close(fd)
        if keep_as:
            self._keep(keep_as, keep)

    def _keep(self, name: str, fd: int | None) -> None:
        old = self.kept.pop(name, None)
        if old is not None:
            os.close(old)
        if fd is not None:
            self.kept[name] = fd

    def release_connection(self) -> None:
        for name in list(self.kept):
            self._keep(name, None)
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.oracle = [None] * self.rings
        self.pdrv = [None] * self.rings

    # -- probe
    def probe(self) -> float:
        """GET_FEATURES answered within PROBE_TIMEOUT, on this connection or a fresh one."""
        t0 = time.monotonic()
        self.cpu0 = self.b.cpu_seconds()
        self.send(Req.GET_FEATURES)
        while self.pending_gf:
            left = PROBE_TIMEOUT - (time.monotonic() - t0)
            try:
                if left <= 0:
                    raise socket.timeout
                self.sock.settimeout(left)
                msg = recv_message(self.sock)
            except socket.timeout:
                return self.missed_probe(t0)
            except ValueError as e:
                raise Failure("bad_reply", str(e)) from None
            except OSError:
                msg = None
            if msg is None:   # the backend closed the connection: a new one must be served
                if not self.b.alive():
                    raise Failure("crash", "backend exited")
                self.disconnects += 1
                try:
                    self.vh_connect()
                except OSError as e:
                    try:    # a backend on its way out closes its listener first
                        self.b.proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        raise Failure("refuses_connections", f"cannot connect again: {e}") from None
                    raise Failure("crash", "backend exited") from None
                self.send(Req.GET_FEATURES)
                continue
            if msg[0] == Req.GET_FEATURES:
                self.pending_gf -= 1
        dt = time.monotonic() - t0
        self.probe_max = max(self.probe_max, dt)
        return dt

    def missed_probe(self, t0: float) -> float:
        if not self.b.alive():
            raise Failure("crash", "backend exited")
        stack = self.b.dump_stack()
        self.sock.settimeout(HANG_GRACE)
        try:
            while self.pending_gf:
                msg = recv_message(self.sock)
                if msg is None:
                    raise Failure("hang", f"no answer to GET_FEATURES in {PROBE_TIMEOUT} s, then the "
                                          f"connection closed after {time.monotonic() - t0:.2f} s", stack)
                if msg[0] == Req.GET_FEATURES:
                    self.pending_gf -= 1
        except (socket.timeout, OSError, ValueError):
            raise Failure("hang", f"no answer to GET_FEATURES in {PROBE_TIMEOUT + HANG_GRACE:.0f} s", stack) from None
        if self.b.cpu_seconds() - self.cpu0 < PROBE_TIMEOUT:
            self.late_loaded += 1       # waiting for a core, not working: the machine, not the backend
            return time.monotonic() - t0
        raise Failure("slow", f"GET_FEATURES answered after {time.monotonic() - t0:.2f} s "
                              f"(limit {PROBE_TIMEOUT} s)", stack)

    # -- checks after every step
    def check(self, step_no: int, idle: bool) -> None:
        if not self.b.alive():
            raise Failure("crash", f"backend exited with status {self.b.proc.returncode}")
        self.probe()
        if self.mem is not None:
            bad = self.mem.guards_intact()
            if bad:
                raise Failure("memory_outside_regions", bad)
        if self.canary[:] != CANARY:
            raise Failure("memory_outside_regions", "the canary memfd (never given to the backend) changed")
        fds, rss = self.b.fds(), self.b.rss()
        self.fd_max, self.rss_max = max(self.fd_max, fds), max(self.rss_max, rss)
        held = len(self.idle) + len(self.captures) + (self.session is not None)
        if fds > self.base_fds + conn_fds(self.b.queues) + held + FD_SLACK:
            raise Failure("fd_leak", f"{fds} fds open (idle {self.base_fds}, {held} control clients held)")
        if rss > self.base_rss + 2 * MEM_SIZE + RSS_SLACK:
            raise Failure("rss", f"RSS {rss >> 20} MiB (idle {self.base_rss >> 20} MiB)")
        for q in range(self.rings):
            self.check_used(q)
        for c, _read in self.captures:
            if _read:
                c.drain()
        if idle or self.idle_due:
            self.idle_due = False
            self.check_idle()

    def check_used(self, q: int) -> None:
        o = self.oracle[q]
        if o is None or not o.armed or self.mem is None:
            return
        _d, _a, used = ring_addrs(q, o.n)
        raw = self.mem.read(used + 2, 2)
        if raw is None:
            o.armed = False
            return
        idx = struct.unpack("<H", raw)[0]
        ahead = (idx - o.seen) & 0xFFFF
        if ahead > o.n:
            o.armed = False      # more than a ring's worth since we looked: cannot tell
            return
        for k in range(ahead):
            slot = (o.seen + k) % o.n
            e = self.mem.read(used + 4 + 8 * slot, 8)
            head, _len = struct.unpack("<II", e)
            o.returned[head] += 1
            if o.returned[head] > o.offered[head]:
                raise Failure("used_ring_duplicate",
                              f"queue {q}: head {head} returned {o.returned[head]} time(s), offered "
                              f"{o.offered[head]} (used idx {(o.seen + k) & 0xFFFF})")
        o.seen = idx

    def ring_progress(self) -> int | None:
        """Chains, bytes and refusals the backend has counted on its rings (inspect), or None."""
        try:
            c = Ctl(self.b.ctl_path)
        except OSError:
            return None
        try:
            c.send(b'{"cmd": "inspect"}\n')
            line = c.line()
            doc = json.loads(line) if line else {}
        except (OSError, ValueError, Failure):
            return None
        finally:
            c.close()
        if not doc.get("ok"):
            return None
        self.note_loop(doc["result"].get("loop"))
        for q in doc["result"].get("queues", []):
            self.rules_seen.update(q.get("errors", {}))
            i = q.get("index", -1)
            if 0 <= i < self.rings:
                self.ring_chains[i] = max(self.ring_chains[i], q.get("chains", 0))
                self.ring_errors[i] = max(self.ring_errors[i], sum(q.get("errors", {}).values()))
        return sum(q.get("chains", 0) + q.get("bytes", 0) + sum(q.get("errors", {}).values())
                   for q in doc["result"].get("queues", []))

    def note_loop(self, loop: dict | None) -> None:
        """The backend's own timing of its event-loop steps (inspect's `loop`, per connection)."""
        if loop and loop.get("max_step_ms", 0) > self.loop_max[0]:
            self.loop_max = (loop["max_step_ms"], loop.get("max_step_kind"), loop.get("max_step_cpu_ms", 0.0))
        if loop:
            self.loop_slow = max(self.loop_slow, loop.get("slow_steps", 0))

    def check_idle(self) -> None:
        """Nothing sent, no ring work left, and yet runnable all the time: a spin.

        A backend still working through what the guest posted (it may have
        been given 512 chains of 32768 descriptors) is busy but makes ring
        progress, which inspect's counters show; that is not a finding.
        """
        busy = 0.0
        # Twice, then (only if both look busy) IDLE_CONFIRM more after a pause:
        # a spin is busy for ever, while work the backend is still doing
        # (a capture being streamed, a step slowed down by a loaded machine) ends.
        for k in range(2 + IDLE_CONFIRM):
            if k == 2:
                time.sleep(IDLE_PAUSE)
            p0 = self.ring_progress()
            c0, v0, t0 = self.b.runnable_ns(), self.b.blocks(), time.monotonic()
            time.sleep(IDLE_WINDOW)
            busy = (self.b.runnable_ns() - c0) / 1e9 / (time.monotonic() - t0)
            if busy < IDLE_BUSY or self.b.blocks() - v0 >= IDLE_BLOCKS:
                return
            p1 = self.ring_progress()
            if p0 is None or p1 is None or p1 != p0:
                return   # working on guest work (or we cannot tell): not idle
        raise Failure("busy_when_idle", f"runnable {busy:.0%} of the time with nothing sent; the kick fds it was given: "
                                        ", ".join(f"{i}: {k}" for i, k in enumerate(self.kick_kind[:self.nq])),
                             self.b.dump_stack())

    def check_control(self) -> None:
        """A fresh control client is answered (held idle ones must not lock it out)."""
        try:
            c = Ctl(self.b.ctl_path)
        except OSError as e:
            raise Failure("control_lockout", f"cannot connect to the control socket: {e}") from None
        try:
            c.send(b'{"cmd": "ping"}\n')
            line = c.line()
        except socket.timeout:
            raise Failure("control_lockout", f"a fresh control client got no answer in {CONTROL_TIMEOUT} s "
                                             f"({len(self.idle)} idle clients held)") from None
        except OSError as e:
            raise Failure("control_lockout", f"fresh control client: {e}") from None
        finally:
            c.close()
        if line is None or not json.loads(line).get("ok"):
            raise Failure("control_lockout", f"fresh control client refused: {line!r} "
                                             f"({len(self.idle)} idle clients held)")

    # -- steps
    def run(self, st: dict) -> None:
        getattr(self, "x_" + st["op"])(st)

    def x_connect(self, st: dict) -> None:
        self.last_connect = st
        if self.sock is not None:
            # End the old connection first and wait for the backend to be idle,
            # so nothing of it is counted against this one.
            self.sock.close()
            self.sock = None
        self.release_connection()
        self.mem = GuestMem(st["sealed"])
        self.vh_connect()
        feats, q = st["feats"], st["q"]
        mq = st.get("mq", False) and 2 * self.b.queues == len(q)
        self.nq = len(q) if mq else 2
        self.qsize = (list(q) + [256] * self.rings)[:self.rings]
        self.feats = feats
        self.packed = bool(feats & PACKED_BIT) and not feats & ~OFFERED_ANY
        self.send(Req.GET_FEATURES)
        self.send(Req.GET_PROTOCOL_FEATURES)
        pf = 1 << P.ProtoFeat.MTU | (1 << P.ProtoFeat.REPLY_ACK if st["ack"] else 0)
        if mq:
            pf |= 1 << P.ProtoFeat.MQ
            self.mq_connects += 1
        self.send(Req.SET_PROTOCOL_FEATURES, U64.pack(pf))
        if mq:
            self.send(Req.GET_QUEUE_NUM)       # answered; the probe reads past the reply
        self.send(Req.SET_OWNER)
        for i in range(self.nq):
            self.send_fds(Req.SET_VRING_CALL, U64.pack(i), ["eventfd"], keep_as=f"call{i}")
            self.send(Req.SET_VRING_ENABLE, STATE.pack(i, 0))
        self.send(Req.SET_FEATURES, U64.pack(feats))
        self.send_mem_table(st["regions"])
        ready = range(2 * st.get("setup", 1) if mq else 2)
        for i in ready:
            self.setup_ring(i, q[i], st["kick"])
            # The used-ring oracle reads split used rings; a packed ring's refusals
            # are checked through the findings inspect names (rules_seen).
            self.oracle[i] = None if self.packed else RingOracle(q[i])
        if st["enable"]:
            for i in ready:
                if i not in st.get("disabled", ()):
                    self.send(Req.SET_VRING_ENABLE, STATE.pack(i, 1))

    def send_mem_table(self, n: int) -> None:
        regs = [(REGION_GPA[i], REGION, REGION_UVA[i], REGION_OFF[i]) for i in range(n)]
        payload = struct.pack("<II", n, 0) + b"".join(REGION_DESC.pack(*r) for r in regs)
        self.send_fds(Req.SET_MEM_TABLE, payload, ["guest"] * n)

    def setup_ring(self, i: int, n: int, kick: str, base: int | None = None, call: str = "eventfd") -> None:
        if base is None:
            base = PACKED_FRESH_BASE if self.packed else 0
        d, a, u = ring_addrs(i, n, self.packed)
        self.follow_packed(i, n, base)
        self.send(Req.SET_VRING_NUM, STATE.pack(i, n))
        self.send(Req.SET_VRING_BASE, STATE.pack(i, base))
        self.send(Req.SET_VRING_ADDR, ADDR.pack(i, 0, gpa_to_uva(d), gpa_to_uva(u), gpa_to_uva(a), 0))
        self.send_call(i, call)
        self.send_kick(i, kick)

    def follow_packed(self, i: int, n: int, base: int) -> None:
        """A packed driver model for queue I of size N starting at BASE (vhost-user.rst "Ring states")."""
        if not self.packed or self.mem is None or base > 0xFFFFFFFF:
            self.pdrv[i] = None
            return
        d, a, u = ring_addrs(i, n, True)
        drv = PackedDriver(self.mem.mm, n, GuestMem.off(d), GuestMem.off(a), GuestMem.off(u))
        avail, aw, used, uw = decode_base(base)
        if base >> 16 == 0:
            used, uw = avail, aw    # only the avail half given: the backend takes it for both
        drv.next_avail, drv.avail_wrap, drv.next_used, drv.used_wrap = avail % n, aw, used % n, uw
        self.pdrv[i] = drv

    def send_kick(self, i: int, kind: str) -> None:
        self.kick_kind[i] = kind
        if kind not in ("eventfd", "none"):
            self.idle_due = True    # the step ends with an idle-CPU check
        if kind == "none":
            self.send(Req.SET_VRING_KICK, U64.pack(i | P.VRING_NOFD_MASK))
            self._keep(f"kick{i}", None)
        else:
            self.send_fds(Req.SET_VRING_KICK, U64.pack(i), [kind], keep_as=f"kick{i}")

    def send_call(self, i: int, kind: str) -> None:
        if kind == "none":
            self.send(Req.SET_VRING_CALL, U64.pack(i | P.VRING_NOFD_MASK))
            self._keep(f"call{i}", None)
        else:
            self.send_fds(Req.SET_VRING_CALL, U64.pack(i), [kind], keep_as=f"call{i}")

    def disarm(self, q: int | None = None) -> None:
        for i in (range(self.rings) if q is None else (q,)):
            if self.oracle[i] is not None:
                self.oracle[i].armed = False

    def x_msg(self, st: dict) -> None:
        req = st["req"]
        payload = bytes.fromhex(st["payload"])
        if req in VRING_REQUESTS and len(payload) >= 4:
            # A ring message can only change the ring it names (VRING_IDX_MASK).
            q = payload[0]
            if q < self.rings:
                self.disarm(q)
        elif req not in HARMLESS_REQUESTS:
            self.disarm()
        self.send_fds(req, payload, st["fds"], st["flags"], st["size"])
        if st["size"] is not None:
            # The header lied about the length: the stream is out of step.
            # Whatever the backend makes of it, we start again on a new connection.
            self.sock.close()
            self.sock = None
            self.vh_connect()

    def x_memtab(self, st: dict) -> None:
        self.disarm()
        self.send_fds(Req.SET_MEM_TABLE, bytes.fromhex(st["payload"]), st["fds"], st["flags"])

    def x_ring(self, st: dict) -> None:
        q, n = st["q"], st["num"]
        self.disarm(q)
        self.pdrv[q] = None      # until the set-up below is followed
        d, a, u = ring_addrs(q, st["addr_n"], self.packed)
        for part in st["order"]:
            if part == "stop":
                self.send(Req.GET_VRING_BASE, STATE.pack(q, 0))
            elif part == "num":
                self.send(Req.SET_VRING_NUM, STATE.pack(q, n))
            elif part == "num2":
                self.send(Req.SET_VRING_NUM, STATE.pack(q, st["num2"]))
            elif part == "base":
                self.send(Req.SET_VRING_BASE, STATE.pack(q, st["base"]))
            elif part == "addr":
                self.send(Req.SET_VRING_ADDR, ADDR.pack(q, 0, gpa_to_uva(d), gpa_to_uva(u), gpa_to_uva(a), 0))
            elif part == "call":
                self.send_call(q, st["call"])
            elif part == "kick":
                self.send_kick(q, st["kick"])
            elif part == "enable":
                self.send(Req.SET_VRING_ENABLE, STATE.pack(q, 1))
        if st.get("follow") and self.packed:
            self.qsize[q] = n
            self.follow_packed(q, n, st["base"] if "base" in st["order"] else PACKED_FRESH_BASE)
            self.pdrv[q] = None if "base" not in st["order"] else self.pdrv[q]
        elif st.get("follow"):
            self.qsize[q] = n
            o = RingOracle(n)
            o.avail = st["base"] if "base" in st["order"] else 0
            o.armed = False          # the avail ring still holds the old ring's entries
            self.oracle[q] = o
        if st.get("then") == "traffic":   # use the ring: a frame out, buffers in, both kicked
            rng = random.Random(q)
            d, a, _u = ring_addrs(q, st["addr_n"])    # where the backend was told the ring is
            data = bytes(12) + frame("arp", 0, rng)
            if self.mem is not None:
                self.mem.write(BUF_LO, data)
                tx = q % 2 == TXQ
                self.mem.write(d, DESC.pack(BUF_LO, len(data) if tx else 4096, 0 if tx else F_WRITE, 0))
                self.mem.write(a + 4, b"\0\0")
                self.mem.write(a + 2, struct.pack("<H", 1))
            self.disarm(q)
            self.kick(q)

    def x_mrgref(self, st: dict) -> None:
        """A fresh connection with MRG_RXBUF; RX: a buffer too small, then a refused one; a ping to answer."""
        self.x_connect(st)
        self.probe()
        small, refused = st["heads"][:2]
        self.desc(RXQ, small, BUF_LO, st["small"], F_WRITE, 0)
        self.desc(RXQ, refused, 1 << 40, 64, F_WRITE, 0)
        self.push(RXQ, small)
        self.push(RXQ, refused)
        self.x_tx({"kind": "ping", "size": 56, "hdr": "ok", "descs": [0], "addr": BUF_LO + 0x10000,
                   "kick": True, "s": st["s"], "hl": 12})
        if st.get("extra"):    # one more bad chain behind them, and an RX kick
            self.probe()
            self.x_bad({"q": RXQ, "kind": st["extra"], "head": st["heads"][2], "s": st["s"], "n": 256,
                        "regions": st["regions"], "kick": True})
        self.idle_due = True   # a frame that cannot be placed must not keep the backend busy

    def x_rxsmall(self, st: dict) -> None:
        self.x_connect(st)
        self.probe()
        for k, size in enumerate(st["sizes"]):
            self.desc(RXQ, k, BUF_LO + 0x1000 * k, size, F_WRITE, 0)
            self.push(RXQ, k)
        self.x_tx({"kind": "ping", "size": 56, "hdr": "ok", "descs": [0], "addr": BUF_LO + 0x10000,
                   "kick": True, "s": st["s"], "hl": 12})

    def x_rxjump(self, st: dict) -> None:
        self.x_connect(st)
        self.probe()
        hl = 12 if st["feats"] & (1 << F.VERSION_1 | 1 << F.MRG_RXBUF) else 10
        self.x_tx({"kind": "ping", "size": 56, "hdr": "ok", "descs": [0], "addr": BUF_LO + 0x10000,
                   "kick": True, "s": st["s"], "hl": hl})
        self.probe()     # the reply is waiting for RX buffers now
        self.x_avail({"q": RXQ, "mode": "jump", "k": st["jump"], "kick": True})

    def x_shrink(self, st: dict) -> None:
        self.x_connect(st)
        self.probe()
        self.mem.truncate(st["to"])      # unsealed: it works
        self.disarm()
        for q in range(self.nq):         # any ring access now touches pages that are gone
            self.kick(q)

    def x_eofkick(self, st: dict) -> None:
        self.x_connect(st)      # send_kick marks the step for an idle check

    def x_descbomb(self, st: dict) -> None:
        self.x_bad(dict(st, kick=False))
        self.x_ctl({"via": "new", "req": {"cmd": "desc", "queue": st["q"], "head": st["head"]}})

    def x_idleflood(self, st: dict) -> None:
        while len(self.idle) < st["n"]:
            try:
                self.idle.append(Ctl(self.b.ctl_path))
            except OSError:
                break
        self.check_control()

    def x_truncate(self, st: dict) -> None:
        if self.mem is not None and self.mem.truncate(st["to"]):
            self.disarm()

    def x_framing(self, st: dict) -> None:
        mode = st["mode"]
        if mode == "huge":
            self.send(Req.SET_FEATURES, b"\0" * 8, size=1 << 20)
        elif mode == "short":
            try:
                self.sock.send(encode_message(Req.SET_OWNER)[:7])
            except OSError:
                pass
        else:
            self.send_fds(Req.SET_VRING_CALL, U64.pack(0), ["eventfd"] * 12)
            return
        self.sock.close()
        self.sock = None
        self.vh_connect()

    def x_stale(self, st: dict) -> None:
        """Refused kick (ring not mappable), a control session opened next, then the ring restarted."""
        q = st["q"]
        self.disarm(q)
        self.send(Req.GET_VRING_BASE, STATE.pack(q, 0))                    # stops the ring
        self.send(Req.SET_VRING_ADDR, ADDR.pack(q, 0, 8, 8, 8, 0))       # nowhere: refused, ring unmapped
        self.send_kick(q, "eventfd")                                      # refused: cannot start
        self.probe()
        if self.session is None:
            self.session = Ctl(self.b.ctl_path)
        self.session_request({"cmd": "ping"})
        d, a, u = ring_addrs(q, self.qsize[q], self.packed)
        self.send(Req.SET_VRING_ADDR, ADDR.pack(q, 0, gpa_to_uva(d), gpa_to_uva(u), gpa_to_uva(a), 0))
        self.send_kick(q, "eventfd")                                      # stops the ring: closes its old kick fd
        self.probe()
        if self.session is None:
            self.session = Ctl(self.b.ctl_path)
        self.session_request({"cmd": "ping"})

    # driver steps
    def desc(self, q: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        if self.mem is None:
            return
        d, _a, _u = ring_addrs(q, self.qsize[q])
        self.mem.write(d + 16 * (i % self.qsize[q]), DESC.pack(addr, length, flags, nxt))

    def push(self, q: int, head: int) -> None:
        """Put HEAD in the next avail slot and publish avail->idx."""
        o = self.oracle[q]
        n = self.qsize[q]
        _d, a, _u = ring_addrs(q, n)
        idx = o.avail if o is not None else 0
        if self.mem is not None:
            self.mem.write(a + 4 + 2 * (idx % n), struct.pack("<H", head))
            self.mem.write(a + 2, struct.pack("<H", (idx + 1) & 0xFFFF))
        if o is not None:
            o.slots[idx % n] = head
            o.offered[head] += 1
            o.avail = (idx + 1) & 0xFFFF

    def kick(self, q: int) -> None:
        fd = self.kept.get(f"kick{q}")
        if fd is None:
            return
        try:
            os.write(fd, U64.pack(1))
        except OSError:
            pass

    def x_tx(self, st: dict) -> None:
        rng = random.Random(st["s"])
        hl = st["hl"]
        f = frame(st["kind"], st["size"], rng)
        if st["hdr"] == "ok":
            hdr = bytes(hl)
        else:
            hdr = VNET_HDR.pack(rng.choice([0, 1, 2, 0xFF]), rng.choice([0, 1, 3, 4, 0x80]), rng.getrandbits(16),
                                rng.choice([0, 1, 1448, 0xFFFF]), rng.getrandbits(16), rng.getrandbits(16),
                                rng.getrandbits(16))[:hl]
        data = hdr + f
        addr = st["addr"]
        if self.mem is not None:
            self.mem.write(addr, data)
        descs = st["descs"]
        q = st.get("q", TXQ)      # a pair's TX ring (2k+1)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(len(descs) - 1))
        bounds = [0] + cuts + [len(data)]
        for k, i in enumerate(descs):
            last = k == len(descs) - 1
            self.desc(q, i, addr + bounds[k], bounds[k + 1] - bounds[k], 0 if last else F_NEXT,
                      0 if last else descs[k + 1])
        self.push(q, descs[0])
        if st["kick"]:
            self.kick(q)

    def x_rx(self, st: dict) -> None:
        q = st.get("q", RXQ)      # a pair's RX ring (2k)
        for head, addr, size, split in st["bufs"]:
            if split and size > 1:
                nxt = (head + 1) % self.qsize[q]
                self.desc(q, head, addr, size // 2, F_WRITE | F_NEXT, nxt)
                self.desc(q, nxt, addr + size // 2, size - size // 2, F_WRITE, 0)
            else:
                self.desc(q, head, addr, size, F_WRITE, 0)
            self.push(q, head)
        if st["kick"]:
            self.kick(q)

    def x_bad(self, st: dict) -> None:
        rng = random.Random(st["s"])
        q, kind, head, n = st["q"], st["kind"], st["head"], st["n"]
        w = F_WRITE if q % 2 == RXQ else 0
        a = rng.randrange(BUF_LO, REGION - 0x2000)
        nxt = (head + 1) % n
        if kind == "loop":
            self.desc(q, head, a, 64, w | F_NEXT, nxt)
            self.desc(q, nxt, a, 64, w | F_NEXT, head)
        elif kind == "oob":
            self.desc(q, head, rng.choice([2 * REGION, 1 << 40, (1 << 64) - 16]), rng.choice([1, 4096, 0xFFFFFFFF]), w, 0)
        elif kind == "guard":   # just past the last declared byte: the guard area in our memfd
            end = REGION * st["regions"]
            self.desc(q, head, end - rng.randrange(0, 64), rng.choice([64, 4096, GUARD]), w, 0)
        elif kind == "gap":
            self.desc(q, head, REGION - 8, 0xFFFFFFFF, w, 0)
        elif kind == "indirect":
            t = rng.randrange(BUF_LO, REGION - 0x10000)
            length = rng.choice([0, 8, 16, 16 * n, 16 * (n + 1), 0xFFFFFFF0])
            self.desc(q, head, t, length, F_INDIRECT, 0)
            if self.mem is not None:
                self.mem.write(t, DESC.pack(a, 64, w, 0))
        elif kind == "nested":
            t = rng.randrange(BUF_LO, REGION - 0x10000)
            self.desc(q, head, t, 32, F_INDIRECT, 0)
            if self.mem is not None:
                self.mem.write(t, DESC.pack(t + 64, 32, F_INDIRECT, 0) + DESC.pack(a, 64, w, 0))
        elif kind == "next_oob":
            self.desc(q, head, a, 64, w | F_NEXT, rng.choice([n, 65535]))
        elif kind == "readafterwrite":
            self.desc(q, head, a, 64, F_WRITE | F_NEXT, nxt)
            self.desc(q, nxt, a + 64, 64, 0, 0)
        elif kind in ("huge_indirect", "indirect_loop"):
            # A table as large as a region whose first entry loops on itself.
            base = REGION if st["regions"] == 2 else BUF_LO
            length = REGION if st["regions"] == 2 else (REGION - BUF_LO) & ~15
            if kind == "indirect_loop":
                length = 16 * rng.choice([1, n, 2 * n])
                base = rng.randrange(BUF_LO, REGION - length - 16) & ~15 if length < REGION // 2 else base
            self.desc(q, head, base, length, F_INDIRECT, 0)
            if self.mem is not None:
                self.mem.write(base, DESC.pack(a, 64, w | F_NEXT, 0))
        elif kind == "zero_len":
            self.desc(q, head, a, 0, w, 0)
        elif kind == "head_oob":   # no valid id: nothing may come back for it
            self.push(q, head + n)
            if st["kick"]:
                self.kick(q)
            return
        self.push(q, head)
        if st["kick"]:
            self.kick(q)

    def x_avail(self, st: dict) -> None:
        q = st["q"]
        o = self.oracle[q]
        n = self.qsize[q]
        _d, a, _u = ring_addrs(q, n)
        if o is None:
            return
        if st["mode"] == "fwd":
            for k in range(st["k"]):   # the device may take whatever those slots hold
                o.offered[o.slots[(o.avail + k) % n]] += 1
            o.avail = (o.avail + st["k"]) & 0xFFFF
        else:
            o.avail = (o.avail + st["k"]) & 0xFFFF
            # A jump or a move back: the device's view of what was offered is
            # no longer one we can model; it must still survive it.
            o.armed = False
        if self.mem is not None:
            self.mem.write(a + 2, struct.pack("<H", o.avail))
        if st["kick"]:
            self.kick(q)

    # packed driver steps (virtio 1.2 §2.8)
    def _pdrv(self, q: int) -> PackedDriver | None:
        """Queue Q's packed driver model, with what the device used since reclaimed."""
        drv = self.pdrv[q]
        if drv is None or self.mem is None or not self.packed:
            return None
        if self.mem.valid < MEM_SIZE:
            # Truncated (unsealed memory): the driver model writes the mapping
            # directly, and a page past the end would be our own SIGBUS.
            self.pdrv[q] = None
            return None
        try:
            drv.used()
        except (ValueError, IndexError):
            self.pdrv[q] = None
            return None
        # Ids the device echoed that were never ours (a hostile id, a scribble) are not reused.
        drv.free_ids = [i for i in dict.fromkeys(drv.free_ids) if 0 <= i < drv.size and i not in drv.slots_of]
        return drv

    def _padd(self, drv: PackedDriver, bufs, buf_id: int | None = None) -> int | None:
        if len(bufs) > drv.free_slots or (buf_id is None and not drv.free_ids):
            return None
        return drv.add(bufs, buf_id=buf_id)

    def x_ptx(self, st: dict) -> None:
        q = st.get("q", TXQ)
        drv = self._pdrv(q)
        if drv is None:
            return
        rng = random.Random(st["s"])
        hl = st["hl"]
        f = frame(st["kind"], st["size"], rng)
        hdr = bytes(hl) if st["hdr"] == "ok" else rng.randbytes(hl)
        data = hdr + f
        addr = st["addr"]
        self.mem.write(addr, data)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(st["nseg"] - 1))
        bounds = [0] + cuts + [len(data)]
        segs = [(addr + bounds[k], bounds[k + 1] - bounds[k], 0) for k in range(st["nseg"])]
        if st["indirect"]:   # §2.8.7: the segments in a table, one INDIRECT descriptor in the ring
            table = (addr + len(data) + 15) & ~15
            self.mem.write(table, b"".join(DESC.pack(a, n, 0, 0) for a, n, _f in segs))
            segs = [(table, 16 * len(segs), F_INDIRECT)]
        self._padd(drv, segs)
        if st["kick"]:
            self.kick(q)

    def x_prx(self, st: dict) -> None:
        q = st.get("q", RXQ)
        drv = self._pdrv(q)
        if drv is None:
            return
        for addr, size, split in st["bufs"]:
            if split and size > 1:
                bufs = [(addr, size // 2, F_WRITE), (addr + size // 2, size - size // 2, F_WRITE)]
            else:
                bufs = [(addr, size, F_WRITE)]
            if self._padd(drv, bufs) is None:
                break
        if st["kick"]:
            self.kick(q)

    def x_pbad(self, st: dict) -> None:
        """One hostile packed move; moves that leave the ring with no safe position break it
        (the device's rule), and the driver model stops there until the ring is set up again."""
        q, kind, n = st["q"], st["kind"], st["n"]
        drv = self._pdrv(q)
        if drv is None:
            return
        rng = random.Random(st["s"])
        w = F_WRITE if q % 2 == RXQ else 0
        a = rng.randrange(BUF_LO, REGION - 0x2000)
        avail = drv.avail_flags(drv.avail_wrap)
        slot = drv.next_avail
        if kind == "noend":
            # Every slot available, every one with NEXT: a chain that never ends.
            if drv.free_slots < n:
                return
            for k in range(n):
                drv.write_desc((slot + k) % n, a, 64, 0, w | F_NEXT | drv.avail_flags(
                    drv.avail_wrap if slot + k < n else not drv.avail_wrap))
            self.pdrv[q] = None
        elif kind == "nested":   # an indirect table holding an indirect descriptor (§2.8.19)
            t = rng.randrange(BUF_LO, REGION - 0x10000) & ~15
            self.mem.write(t, DESC.pack(t + 64, 32, F_INDIRECT, 0) + DESC.pack(a, 64, w, 0))
            self._padd(drv, [(t, 32, F_INDIRECT)])
        elif kind == "indirect_len":
            t = rng.randrange(BUF_LO, REGION - 0x10000) & ~15
            self._padd(drv, [(t, rng.choice([0, 8, 17, 16 * (n + 1), 0xFFFFFFF0]), F_INDIRECT)])
        elif kind == "indirect_chain":   # INDIRECT inside a chain linked by NEXT (§2.8.19)
            t = rng.randrange(BUF_LO, REGION - 0x10000) & ~15
            self.mem.write(t, DESC.pack(a, 64, w, 0))
            self._padd(drv, [(a, 64, w), (t, 16, F_INDIRECT)])
        elif kind == "id_oob":   # a buffer id not below the queue size
            self._padd(drv, [(a, 64, w)], buf_id=rng.choice([n, n + 1, 0xFFFF]))
        elif kind == "id_inflight":   # an id the device still holds, made available again
            if drv.slots_of:
                self._padd(drv, [(a, 64, w)], buf_id=rng.choice(sorted(drv.slots_of)))
                self.pdrv[q] = None   # two chains, one id: the model cannot tell them apart
        elif kind == "not_avail":   # the head available before the rest of its chain (§2.8.17)
            if drv.free_slots < 2 or n < 2:
                return
            drv.write_desc((slot + 1) % n, a + 64, 64, 0, w)             # not available for this lap
            drv.write_desc(slot, a, 64, 0, w | F_NEXT | avail)
            self.pdrv[q] = None
        elif kind == "out_of_order":   # the second chain's head made available before the first's
            if drv.free_slots < 2 or n < 2 or not drv.free_ids:
                return
            first = drv.free_ids.pop()
            nxt, nwrap = (slot + 1) % n, drv.avail_wrap if slot + 1 < n else not drv.avail_wrap
            second = drv.free_ids.pop() if drv.free_ids else first
            drv.write_desc(nxt, a + 64, 64, second, w | drv.avail_flags(nwrap))
            self.kick(q)
            drv.write_desc(slot, a, 64, first, w | avail)
            drv.slots_of[first] = drv.slots_of[second] = 1
            drv.free_slots -= 2
            drv.next_avail, drv.avail_wrap = (slot + 2) % n, drv.avail_wrap if slot + 2 < n else not drv.avail_wrap
        elif kind == "wrap_bad":   # AVAIL and USED equal: a descriptor that looks used, not available
            drv.write_desc(slot, a, 64, 0, w | (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
                                                 if rng.random() < 0.5 else 0))
        elif kind == "wrap_flip":   # the driver's wrap counter flipped without passing the end
            drv.avail_wrap = not drv.avail_wrap
            self._padd(drv, [(a, 64, w)])
            self.pdrv[q] = None
        elif kind == "oob":
            self._padd(drv, [(rng.choice([2 * REGION, 1 << 40, (1 << 64) - 16]), rng.choice([1, 4096, 0xFFFFFFFF]), w)])
        elif kind == "readafterwrite":
            self._padd(drv, [(a, 64, F_WRITE), (a + 64, 64, 0)])
        elif kind == "zero_len":
            self._padd(drv, [(a, 0, w)])
        if st["kick"]:
            self.kick(q)

    def x_pevent(self, st: dict) -> None:
        q = st["q"]
        if not self.packed or self.mem is None:
            return
        _d, drv_area, dev_area = ring_addrs(q, self.qsize[q], True)
        if st["device"]:   # the driver scribbles on the device's own structure
            self.mem.write(dev_area, struct.pack("<I", st["raw"]))
        else:
            self.mem.write(drv_area, struct.pack("<HH", (st["off"] & 0x7FFF) | st["wrap"] << 15, st["flags"] & 0xFFFF))
        if st["kick"]:
            self.kick(q)

    def x_aflags(self, st: dict) -> None:
        q = st["q"]
        n = self.qsize[q]
        _d, a, _u = ring_addrs(q, n)
        if self.mem is not None:
            self.mem.write(a, struct.pack("<H", st["flags"]))
            self.mem.write(a + 4 + 2 * n, struct.pack("<H", st["used_event"]))

    def x_kick(self, st: dict) -> None:
        self.kick(st["q"])

    def x_venable(self, st: dict) -> None:
        """One ring enabled or disabled: what it holds stays, so the used-ring check stays armed."""
        self.send(Req.SET_VRING_ENABLE, STATE.pack(st["q"], int(st["on"])))
        if st["kick"]:
            self.kick(st["q"])

    def x_long(self, st: dict) -> None:
        self.x_connect(st)
        self.probe()
        n = self.qsize[TXQ]
        self.disarm(TXQ)
        a = BUF_LO
        if st["indirect"]:
            table = REGION if self.last_connect and self.last_connect["regions"] == 2 else BUF_LO + 0x1000
            body = b"".join(DESC.pack(a, 1, F_NEXT, (i + 1) & 0xFFFF) for i in range(n - 1)) + DESC.pack(a, 1, 0, 0)
            self.mem.write(table, body)
            self.desc(TXQ, 0, table, 16 * n, F_INDIRECT, 0)
        else:
            d, _a, _u = ring_addrs(TXQ, n)
            body = b"".join(DESC.pack(a, 1, F_NEXT, i + 1) for i in range(n - 1)) + DESC.pack(a, 1, 0, 0)
            self.mem.write(d, body)
        for _ in range(min(512, n)):
            self.push(TXQ, 0)
        self.kick(TXQ)

    def x_feed(self, st: dict) -> None:
        """A driver thread keeps the TX ring full of refused chains while we probe (case 5).

        Every descriptor is refused (outside guest memory) and avail slot k
        names descriptor k. The device writes a used element for each chain it
        refuses before it publishes used->idx, so the feeder watches the used
        elements (it marks each with SENTINEL) to see how far the device got,
        and keeps exactly a ring's worth offered: never a jump, never a pause.
        """
        self.x_connect(st)
        self.probe()
        q = TXQ
        n = self.qsize[q]
        mem = self.mem
        self.disarm(q)
        d, a, u = ring_addrs(q, n)
        mem.write(d, DESC.pack(1 << 40, 64, 0, 0) * n)
        mem.write(a + 4, b"".join(struct.pack("<H", k) for k in range(n)))
        sentinel = b"\xff\xff\xff\xff"
        raw = mem.read(u + 2, 2)
        if raw is None:
            return
        dev = struct.unpack("<H", raw)[0]
        for k in range(n):
            mem.write(u + 4 + 8 * k, sentinel)
        o = self.oracle[q]
        idx = o.avail if o is not None else dev
        stop = threading.Event()
        fed = [0]

        def feeder():
            nonlocal idx, dev
            while not stop.is_set():
                while (idx - dev) & 0xFFFF:      # what the device has taken since we looked
                    slot = u + 4 + 8 * (dev % n)
                    if mem.read(slot, 4) == sentinel:
                        break
                    mem.write(slot, sentinel)
                    dev = (dev + 1) & 0xFFFF
                room = n - ((idx - dev) & 0xFFFF)
                if room > 0:
                    idx = (idx + room) & 0xFFFF
                    fed[0] += room
                    mem.write(a + 2, struct.pack("<H", idx))
                    self.kick(q)
                else:
                    time.sleep(0)

        t = threading.Thread(target=feeder, daemon=True)
        t.start()
        try:
            end = time.monotonic() + st["secs"]
            while time.monotonic() < end:
                self.probe()
        finally:
            stop.set()
            t.join()
            if o is not None:
                o.avail = idx

    # control steps
    def session_request(self, req) -> None:
        s = self.session
        idle = time.monotonic() - s.last_used
        try:
            s.send(json.dumps(req).encode() + b"\n")
            line = s.line()
        except socket.timeout:
            raise Failure("control_no_answer", f"session client: no reply to {req} in {CONTROL_TIMEOUT} s") from None
        except OSError as e:
            line = None
            err = e
        else:
            err = None
        if line is None:
            # Closed: with a notice first (evicted while idle to make room, and the
            # notice is still unread in our buffer) is the backend's right.
            try:
                s.sock.setblocking(False)
                s.buf += s.sock.recv(1 << 16)
            except OSError:
                pass
            if b'"closed"' in s.buf:
                line = bytes(s.buf)
        if line is not None and (b"too many control clients" in line or b'"closed"' in line):
            # Never admitted (the lockout check speaks for that), or closed with
            # a notice (an idle client evicted to make room): not an fd lost.
            self.session.close()
            self.session = None
            return
        if line is None:
            self.session.close()
            self.session = None
            if idle < 1.0:
                raise Failure("control_client_closed",
                              f"the backend closed a control client in use ({err or 'EOF'}) after a request")

    def x_ctl(self, st: dict) -> None:
        req = st["req"]
        if req == "garbage":
            data = b"\x00{not json]\n"
        elif req == "huge":
            data = b"{" + b" " * (70 << 10) + b"\n"
        elif req == "list":
            data = b"[1, 2]\n"
        elif req == "notutf8":
            data = b"\xff\xfe{\"cmd\": 1}\n"
        else:
            data = json.dumps(req).encode() + b"\n"
        if st["via"] == "session" and self.session is not None and req != "huge":
            self.session_request(req)
            self.check_control()
            return
        try:
            c = Ctl(self.b.ctl_path)
        except OSError as e:
            raise Failure("control_lockout", f"cannot connect to the control socket: {e}") from None
        try:
            c.send(data)
            try:
                line = c.line()
            except socket.timeout:
                self.probe()   # the vhost-user side tells a blocked loop from a slow reply
                raise Failure("control_no_answer", f"no reply to {data[:60]!r} in {CONTROL_TIMEOUT} s",
                              self.b.dump_stack()) from None
            except OSError:
                line = None
            if line is None and req != "huge":
                self.check_control()
                raise Failure("control_no_answer", f"connection closed without a reply to {data[:60]!r}")
        finally:
            c.close()
        self.check_control()

    def x_session(self, st: dict) -> None:
        if st["open"] and self.session is None:
            self.session = Ctl(self.b.ctl_path)
            self.session_request({"cmd": "ping"})
        elif not st["open"] and self.session is not None:
            self.session.close()
            self.session = None

    def x_capture(self, st: dict) -> None:
        if st["start"] and len(self.captures) < 4:
            c = Ctl(self.b.ctl_path)
            req = {"cmd": "capture"}
            if st["count"] is not None:
                req["count"] = st["count"]
            c.send(json.dumps(req).encode() + b"\n")
            try:
                line = c.line()
            except socket.timeout:
                c.close()
                raise Failure("control_no_answer", f"no reply to {req} in {CONTROL_TIMEOUT} s") from None
            except OSError:
                line = None
            if line is None or not json.loads(line).get("ok"):
                c.close()
                if line is None:
                    self.check_control()
                return
            self.captures.append((c, st["read"]))
        elif not st["start"] and self.captures:
            c, _ = self.captures.pop(0)
            c.close()
        self.check_control()

    def x_idle(self, st: dict) -> None:
        if st["open"] and len(self.idle) < MAX_IDLE_CLIENTS:
            try:
                self.idle.append(Ctl(self.b.ctl_path))
            except OSError:
                pass
        elif not st["open"] and self.idle:
            self.idle.pop(0).close()
        self.check_control()

    def close_all(self) -> None:
        for c in self.idle + [c for c, _ in self.captures] + ([self.session] if self.session else []):
            c.close()
        self.idle, self.captures, self.session = [], [], None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.release_connection()


def describe(st: dict) -> str:
    d = {k: v for k, v in st.items() if k != "op"}
    if "payload" in d and len(d["payload"]) > 48:
        d["payload"] = d["payload"][:48] + f"...({len(d['payload']) // 2} B)"
    if "bufs" in d and len(d["bufs"]) > 4:
        d["bufs"] = d["bufs"][:4] + [f"... {len(d['bufs'])} buffers"]
    if "req" in d and isinstance(d["req"], int):
        d["req"] = P.request_name(d["req"])
    return f"{st['op']} " + json.dumps(d, separators=(",", ":"), default=str)


# -- the run -----------------------------------------------------------------------

def classify(f: Failure, backend: Backend, op: str) -> str:
    if f.kind == "crash":
        tail = backend.log_tail()
        rc = backend.proc.returncode
        if rc is not None and rc < 0:
            sig = signal.Signals(-rc).name
            return f"crash {sig} in {where(tail)}"
        exc = exception_of(tail).split(":")[0]
        return f"crash {exc or 'exit ' + str(rc)} in {where(tail)}"
    if f.kind in ("hang", "slow", "busy_when_idle", "control_no_answer") and f.stacks:
        owner = loop_owner(f.stacks)
        if f.kind == "busy_when_idle" and owner in ("cmd_serve", "main", "?"):
            return f.kind    # between tasks: trio's own frames, which we leave out
        if owner in ("cmd_serve", "main", "?"):
            return f"{f.kind} (the backend was idle again when sampled)"
        return f"{f.kind} in {owner}"
    return f.kind


def restart(ex: Executor, backend: Backend) -> None:
    """A clean backend, set up again as the last connect step did (or bare, if that fails at once)."""
    ex.close_all()
    backend.stop()
    backend.start()
    if ex.last_connect is not None:
        try:
            # The same set-up, with eventfd kicks and sealed memory: a known-good
            # start, so one finding is not met again at once by the recovery itself.
            ex.x_connect(dict(ex.last_connect, op="connect", kick="eventfd", sealed=True))
            ex.probe()
            return
        except Failure:
            ex.close_all()
            backend.stop()
            backend.start()
    ex.vh_connect()
    ex.probe()


def run(args) -> dict:
    tree = Path(args.tree).resolve()
    workdir = tempfile.mkdtemp(prefix="fuzz-device-")
    backend = Backend(workdir, tree, args.queues)
    gen = Gen(args.seed, args.only, args.queues)
    ex = Executor(backend)
    history: collections.deque = collections.deque(maxlen=2000)
    findings: dict[str, dict] = {}
    stats = {"crashes": 0, "hangs": 0}
    steps = 0
    t_start = time.monotonic()
    longest = (0.0, None)
    deadline = t_start + args.seconds if args.seconds else None
    last_connect_step = 0
    recovering = 0.0   # time spent on failures: stack dumps, waiting out hangs, restarts
    op_time: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    failures_before = 0
    last_progress = time.monotonic()
    try:
        backend.start()
        ex.vh_connect()
        ex.probe()
        ex.base_fds, ex.base_rss = backend.fds(), backend.rss()
        ex.sock.close()
        ex.sock = None
        t_start = time.monotonic()   # the backend's start-up (seconds under load) is not fuzzing
        deadline = t_start + args.seconds if args.seconds else None
        while steps < args.steps and (deadline is None or time.monotonic() < deadline):
            st = gen.next()
            steps += 1
            if st["op"] in CONNECTING_OPS:
                last_connect_step = steps
            history.append((steps, st))
            if args.verbose:
                print(f"{steps:8d} {describe(st)}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                try:
                    if st["op"] in CONNECTING_OPS and steps > 1:
                        ex.check_idle()   # the connection is about to go: is it leaving a core burning?
                    ex.run(st)
                    ex.check(steps, idle=steps % IDLE_EVERY == 0 or steps == args.steps)
                except Failure:
                    raise
                except Exception as e:
                    if not args.keep_going:
                        raise     # a bug of the fuzzer's own: loud
                    # A long run goes on: named as the fuzzer's, never as the backend's.
                    import traceback
                    raise Failure("fuzzer_error", f"{type(e).__name__}: {e} at "
                                  f"{traceback.extract_tb(e.__traceback__)[-1].name}") from None
            except Failure as f:
                t_fail = t0
                cls = classify(f, backend, st["op"])
                if f.kind == "crash":
                    stats["crashes"] += 1
                elif f.kind in ("hang", "slow", "control_no_answer"):
                    stats["hangs"] += 1
                rec = findings.setdefault(cls, {"class": cls, "count": 0, "seed": args.seed, "step": steps,
                                                "detail": f.detail, "kind": f.kind, "ops": {}})
                rec["count"] += 1
                rec.setdefault("after_failures", failures_before)
                failures_before += 1
                rec["ops"].setdefault(st["op"], steps)   # first step of each op that met it
                if rec["count"] == 1:
                    since = [(n, s) for n, s in history if n >= last_connect_step]
                    rec["log"] = [f"{n:8d} {describe(s)}" for n, s in since[-LOG_KEEP:]]
                    if len(since) > LOG_KEEP:
                        rec["log"].insert(0, f"{since[0][0]:8d} {describe(since[0][1])}")
                        rec["log"].insert(1, f"         ... {len(since) - LOG_KEEP - 1} steps ...")
                    rec["backend_log"] = ((f.stacks[0] if f.stacks else "") or backend.log_tail(4000))[-3000:]
                    report_failure(rec, args)
                if not args.keep_going:
                    break
                # Start again from a clean backend, on the last connect's set-up.
                restart(ex, backend)
                history.append((steps, {"op": "restart"}))
                last_connect_step = steps
                recovering += time.monotonic() - t_fail
                continue
            dt = time.monotonic() - t0
            if args.progress and time.monotonic() - last_progress > PROGRESS_EVERY:
                last_progress = time.monotonic()
                write_progress(args.progress, {
                    "seed": args.seed, "steps": steps, "seconds": round(last_progress - t_start, 1),
                    "findings": {k: v["count"] for k, v in findings.items()},
                    "loop_max_step_ms": ex.loop_max[0], "loop_max_step_cpu_ms": ex.loop_max[2],
                    "mq_connects": ex.mq_connects, "ring_moves": ex.ring_moves,
                    "rules_seen": sorted(ex.rules_seen)})
            op_time[st["op"]][0] += 1
            op_time[st["op"]][1] += dt
            if st["op"] in RING_OPS and st.get("q", 0) < ex.rings:
                ex.ring_moves[st.get("q", RING_OPS[st["op"]])] += 1
            if dt > longest[0]:
                longest = (dt, st["op"])
    finally:
        if backend.alive():
            ex.ring_progress()   # the last connection's loop stats
        ex.close_all()
        backend.stop()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t_start
    return {
        "seed": args.seed, "seeds": [args.seed], "workers": 1, "steps": steps, "seconds": round(elapsed, 2),
        "steps_per_s": round(steps / elapsed, 1) if elapsed else 0.0,
        "seconds_recovering": round(recovering, 2),
        "steps_per_s_fuzzing": round(steps / (elapsed - recovering), 1) if elapsed > recovering else 0.0,
        "connections": ex.connections, "disconnects_by_backend": ex.disconnects,
        "backend_starts": backend.starts, "queues": args.queues, "mq_connects": ex.mq_connects,
        "ring_moves": ex.ring_moves, "ring_chains_max": ex.ring_chains, "ring_errors_max": ex.ring_errors,
        "crashes": stats["crashes"], "hangs": stats["hangs"],
        "fd_idle": ex.base_fds, "fd_max": ex.fd_max,
        "rss_idle_mib": round(ex.base_rss / (1 << 20), 1), "rss_max_mib": round(ex.rss_max / (1 << 20), 1),
        "longest_probe_ms": round(ex.probe_max * 1000, 1),
        "late_answers_loaded": ex.late_loaded,
        "longest_step_ms": round(longest[0] * 1000, 1), "longest_step_op": longest[1],
        "rules_seen": sorted(ex.rules_seen),
        "loop_max_step_ms": ex.loop_max[0], "loop_max_step_kind": ex.loop_max[1],
        "loop_max_step_cpu_ms": ex.loop_max[2], "loop_slow_steps_max": ex.loop_slow,
        "ms_per_op": {op: round(t / n * 1000, 2) for op, (n, t) in sorted(op_time.items())},
        "findings": sorted(findings.values(), key=lambda r: r["step"]),
        "tree": str(tree),
        "load_avg": round(os.getloadavg()[0], 2),
    }


#: The --json document: every field, and what it means (tests/device/test_fuzz_device.py
#: holds the output to this table both ways).
JSON_FIELDS = {
    "seed": "the RNG seed: with steps, names the input sequence",
    "seeds": "the seeds of every worker (--workers N runs seeds seed .. seed+N-1, one backend each)",
    "workers": "worker processes (each a fuzzer with its own backend); sums and maxima are over all of them",
    "steps": "steps run",
    "seconds": "wall time of the run, from the backend's first answer (its start-up is left out)",
    "steps_per_s": "steps / seconds",
    "seconds_recovering": "time spent on failures: stack samples, waiting out hangs, restarts",
    "steps_per_s_fuzzing": "steps / (seconds - seconds_recovering): the rate of a run that finds nothing",
    "load_avg": "the machine's 1-minute load average at the end (the CPU is shared)",
    "connections": "vhost-user connections the fuzzer made (connect steps, reconnects after the backend closed one)",
    "disconnects_by_backend": "connections the backend closed (allowed after a protocol error)",
    "backend_starts": "backend processes started (1 + restarts after failures with --keep-going)",
    "queues": "queue pairs the backend serves (--queues; `vhostnet serve --queues N`)",
    "mq_connects": "connect steps that negotiated VIRTIO_NET_F_MQ and PROTOCOL_F_MQ and set up 2N rings",
    "ring_moves": "per ring index (pair k: RX 2k, TX 2k+1), passing driver and ring steps aimed at it",
    "ring_chains_max": "per ring index, the most chains inspect counted on it on one connection (idle checks)",
    "ring_errors_max": "per ring index, the most refusals (inspect's errors, summed) it had on one connection",
    "crashes": "failures where the backend process exited",
    "hangs": "failures where it did not answer in time (GET_FEATURES or a control request)",
    "fd_idle": "the backend's open fds with one idle connection, before the first step",
    "fd_max": "the most fds it had open after any step",
    "rss_idle_mib": "its RSS before the first step",
    "rss_max_mib": "its largest RSS after any step",
    "longest_probe_ms": "the longest a passing GET_FEATURES probe waited: a bound on the longest event-loop step",
    "late_answers_loaded": "probes answered after PROBE_TIMEOUT with under PROBE_TIMEOUT of backend CPU in the "
                           "wait: the backend waited for a core (a loaded machine), no finding",
    "longest_step_ms": "the longest passing step, with its checks",
    "longest_step_op": "that step's op",
    "rules_seen": "refusal rule ids (vhostnet/virtio/findings.py) inspect showed on some queue at an idle check",
    "loop_max_step_ms": "the longest event-loop step the backend itself timed (inspect's loop.max_step_ms, "
                        "read at every idle check, so before every connecting step), wall clock",
    "loop_max_step_kind": "that step's kind (rx, tx, timer, message)",
    "loop_max_step_cpu_ms": "the most CPU time one backend step took (loop.max_step_cpu_ms): its own work, "
                            "without the time the kernel gave other processes",
    "loop_slow_steps_max": "the most steps over the backend's SLOW_STEP (10 ms) one connection had",
    "ms_per_op": "mean wall time per step, by op",
    "findings": "failures by class, first occurrence first: class, kind, count, seed, step, detail, "
                "ops (op -> first step), log (steps since the last connect), backend_log, after_failures",
    "tree": "the vhostnet tree the backend ran from",
}


PROGRESS_EVERY = 5.0    # seconds between --progress snapshots


def write_progress(path: str, doc: dict) -> None:
    """A snapshot of a running fuzzer, replaced atomically: what a killed run leaves behind."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def run_workers(args) -> dict:
    """--workers N: N fuzzers in their own processes, seeds seed .. seed+N-1, one backend each.

    While one waits for its backend (a probe, an idle window), the others
    work: on a shared machine that is where the rate comes from. Each worker
    keeps every check of every step; the document sums steps and failures
    and takes the maxima.
    """
    seeds = [args.seed + i for i in range(args.workers)]
    procs = []
    for sd in seeds:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--seed", str(sd), "--json", "--tree", args.tree]
        if args.seconds:
            cmd += ["--seconds", str(args.seconds)]
        if args.steps < 1 << 62:
            cmd += ["--steps", str(max(1, args.steps // args.workers))]
        if args.keep_going:
            cmd.append("--keep-going")
        if args.only:
            cmd += ["--only", ",".join(sorted(args.only))]
        cmd += ["--queues", str(args.queues)]
        if args.progress:
            cmd += ["--progress", f"{args.progress}.{sd}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE))
    docs = []
    for pr in procs:
        out, _ = pr.communicate()
        try:
            docs.append(json.loads(out))
        except ValueError:
            docs.append(None)
    lost = [sd for sd, d in zip(seeds, docs) if d is None]
    docs = [d for d in docs if d is not None]
    if not docs:
        raise SystemExit(f"every worker failed (seeds {seeds})")
    total = lambda k: sum(d[k] for d in docs)
    top = lambda k: max(docs, key=lambda d: d[k] or 0)
    steps = total("steps")
    seconds = max(d["seconds"] for d in docs)
    recovering = max(d["seconds_recovering"] for d in docs)
    ops: dict[str, list] = collections.defaultdict(list)
    for d in docs:
        for op, ms in d["ms_per_op"].items():
            ops[op].append(ms)
    findings = [f for d in docs for f in d["findings"]]
    for sd in lost:
        findings.append({"class": "worker_lost", "count": 1, "seed": sd, "step": 0, "kind": "worker_lost",
                         "detail": "the worker printed no result", "ops": {}})
    loop = top("loop_max_step_ms")
    longest = top("longest_step_ms")
    return {
        "seed": args.seed, "seeds": seeds, "workers": args.workers, "steps": steps, "seconds": round(seconds, 2),
        "steps_per_s": round(steps / seconds, 1) if seconds else 0.0,
        "seconds_recovering": round(recovering, 2),
        "steps_per_s_fuzzing": round(steps / (seconds - recovering), 1) if seconds > recovering else 0.0,
        "connections": total("connections"), "disconnects_by_backend": total("disconnects_by_backend"),
        "backend_starts": total("backend_starts"), "crashes": total("crashes"), "hangs": total("hangs"),
        "queues": args.queues, "mq_connects": total("mq_connects"),
        "ring_moves": [sum(v) for v in zip(*(d["ring_moves"] for d in docs))],
        "ring_chains_max": [max(v) for v in zip(*(d["ring_chains_max"] for d in docs))],
        "ring_errors_max": [max(v) for v in zip(*(d["ring_errors_max"] for d in docs))],
        "fd_idle": max(d["fd_idle"] for d in docs), "fd_max": max(d["fd_max"] for d in docs),
        "rss_idle_mib": max(d["rss_idle_mib"] for d in docs), "rss_max_mib": max(d["rss_max_mib"] for d in docs),
        "longest_probe_ms": max(d["longest_probe_ms"] for d in docs),
        "late_answers_loaded": total("late_answers_loaded"),
        "longest_step_ms": longest["longest_step_ms"], "longest_step_op": longest["longest_step_op"],
        "rules_seen": sorted({r for d in docs for r in d["rules_seen"]}),
        "loop_max_step_ms": loop["loop_max_step_ms"], "loop_max_step_kind": loop["loop_max_step_kind"],
        "loop_max_step_cpu_ms": max(d["loop_max_step_cpu_ms"] for d in docs),
        "loop_slow_steps_max": max(d["loop_slow_steps_max"] for d in docs),
        "ms_per_op": {op: round(sum(v) / len(v), 2) for op, v in sorted(ops.items())},
        "findings": sorted(findings, key=lambda r: (r["seed"], r["step"])),
        "tree": docs[0]["tree"], "load_avg": round(os.getloadavg()[0], 2),
    }


def report_failure(rec: dict, args) -> None:
    out = sys.stderr
    print(f"\nFAILURE {rec['class']}: {rec['detail']}", file=out)
    more = " --keep-going" if rec.get("after_failures") else ""
    if args.only:
        more += " --only " + ",".join(sorted(args.only))
    if args.queues != DEFAULT_QUEUES:
        more += f" --queues {args.queues}"
    print(f"  seed {rec['seed']}, step {rec['step']}; replay: python3 scripts/fuzz_device.py "
          f"--replay {rec['seed']} --steps {rec['step']}{more}", file=out)
    print("  steps since the last connect:", file=out)
    for line in rec["log"]:
        print("  " + line, file=out)
    if rec.get("backend_log"):
        print("  backend said (tail):", file=out)
        for line in rec["backend_log"].strip().splitlines()[-25:]:
            print("    " + line[:200], file=out)
    out.flush()


def table(doc: dict) -> str:
    rows = [("seed", doc["seed"] if doc["workers"] == 1 else
             f"{doc['seeds'][0]}..{doc['seeds'][-1]} ({doc['workers']} workers)"), ("steps", doc["steps"]), ("seconds", doc["seconds"]),
            ("steps/s", doc["steps_per_s"]),
            ("steps/s, failures aside", f"{doc['steps_per_s_fuzzing']} ({doc['seconds_recovering']} s "
                                        f"spent on failures and restarts)"),
            ("connections", doc["connections"]),
            ("  closed by the backend", doc["disconnects_by_backend"]),
            ("backend starts", doc["backend_starts"]), ("crashes", doc["crashes"]), ("hangs", doc["hangs"]),
            ("queue pairs / MQ connects", f"{doc['queues']} / {doc['mq_connects']}"),
            ("moves per ring", " ".join(map(str, doc["ring_moves"]))),
            ("chains / errors per ring", " ".join(f"{c}/{e}" for c, e in zip(doc["ring_chains_max"],
                                                                             doc["ring_errors_max"]))),
            ("fd idle / max", f"{doc['fd_idle']} / {doc['fd_max']}"),
            ("RSS idle / max", f"{doc['rss_idle_mib']} / {doc['rss_max_mib']} MiB"),
            ("longest probe", f"{doc['longest_probe_ms']} ms"),
            ("late answers, machine busy", doc["late_answers_loaded"]),
            ("longest step", f"{doc['longest_step_ms']} ms ({doc['longest_step_op']})"),
            ("longest backend loop step", f"{doc['loop_max_step_ms']} ms ({doc['loop_max_step_kind']}; "
                                          f"{doc['loop_max_step_cpu_ms']} ms CPU)")]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    packed = [r for r in doc["rules_seen"] if r.startswith("packed_")]
    lines.append(f"{'rules seen':<{w}}  {len(doc['rules_seen'])}, packed: {', '.join(packed) or 'none'}")
    lines.append("findings by class:" if doc["findings"] else "findings: none")
    for f in doc["findings"]:
        lines.append(f"  {f['count']:5d}  {f['class']}  (first: seed {f['seed']} step {f['step']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    import faulthandler
    faulthandler.enable()   # a fatal signal in the fuzzer itself leaves its stack on stderr
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__[__doc__.index("Examples:"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random, printed)")
    p.add_argument("--steps", type=int, default=None, help="stop after N steps (default 10000, or unlimited with --seconds)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--replay", type=int, metavar="SEED", help="run SEED's steps again, printing each (with --steps N)")
    p.add_argument("--keep-going", action="store_true", help="after a failure restart the backend and go on")
    p.add_argument("--progress", metavar="FILE", help=f"write a JSON snapshot (steps, findings by class, loop "
                   f"stats) every {PROGRESS_EVERY:.0f} s; with --workers, FILE.SEED per worker")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N fuzzers in parallel, seeds SEED..SEED+N-1, each with its own backend (--steps is shared)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--verbose", action="store_true", help="print every step")
    p.add_argument("--only", metavar="OP,OP", help="draw only these ops, e.g. ctl,idle,idleflood "
                   "(replay with the same --only); ops: " + ", ".join(op_names()))
    p.add_argument("--queues", type=int, default=DEFAULT_QUEUES, metavar="N",
                   help=f"queue pairs the backend serves (1..{MAX_QUEUES}, default {DEFAULT_QUEUES}); with N > 1, "
                        f"{MQ_SHARE * 100:.0f}%% of connects negotiate MQ and drive all 2N rings; 1: the one-pair fuzzer")
    p.add_argument("--tree", default=str(ROOT), help="the vhostnet tree the backend runs from (default: this one)")
    p.add_argument("--keep-workdir", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.replay is not None:
        if args.steps is None:
            p.error("--replay needs --steps N (the failing step)")
        args.seed, args.verbose = args.replay, True
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    if args.only:
        args.only = set(args.only.split(","))
        unknown = args.only - set(op_names())
        if unknown:
            p.error(f"--only: unknown op(s) {', '.join(sorted(unknown))}; known: {', '.join(op_names())}")
    if args.steps is None:
        args.steps = 1 << 62 if args.seconds else 10000
    if args.steps < 1 or (args.seconds is not None and args.seconds <= 0):
        p.error("--steps and --seconds must be positive")
    if not 1 <= args.queues <= MAX_QUEUES:
        p.error(f"--queues must be 1..{MAX_QUEUES} (the rings of more pairs do not fit the guest memory layout)")
    if args.workers < 1 or (args.workers > 1 and args.replay is not None):
        p.error("--workers must be at least 1, and 1 with --replay")
    doc = run_workers(args) if args.workers > 1 else run(args)
    print(json.dumps(doc, indent=1) if args.json else table(doc))
    return 1 if doc["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
