"""Constants shared by the parts of TcpConnection (connection.py, input.py,
output.py, timers.py): sequence-space masks, short state names, option bytes."""
from __future__ import annotations

from .state import State

M = 0xFFFFFFFF                       # sequence numbers on the wire are mod 2**32
HALF = 0x80000000                    # unwrap: pick the value nearest the reference
TS_OPT_LEN = 12
MAX_IP_PAYLOAD = 65535 - 20          # IPv4 total length bound

CLOSED = State.CLOSED
SYN_SENT = State.SYN_SENT
SYN_RECEIVED = State.SYN_RECEIVED
ESTABLISHED = State.ESTABLISHED
FIN_WAIT_1 = State.FIN_WAIT_1
FIN_WAIT_2 = State.FIN_WAIT_2
CLOSE_WAIT = State.CLOSE_WAIT
CLOSING = State.CLOSING
LAST_ACK = State.LAST_ACK
TIME_WAIT = State.TIME_WAIT

# States in which the application may still queue data (before its close()).
APP_CAN_SEND = frozenset({SYN_SENT, SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT})
KEEPALIVE_STATES = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, FIN_WAIT_2, CLOSING,
                              LAST_ACK})
TS_HEAD = b"\x01\x01\x08\x0a"
NO_OPTS = b""
