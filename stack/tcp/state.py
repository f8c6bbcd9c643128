"""The TCP connection state machine (RFC 9293 section 3.3.2, figure 5), as one table.

Every change of `TcpConnection.state` goes through `transition()`, so the
legal moves are visible here and nowhere else (h11 style). The table holds
states and events only; what is sent on each move (SYN-ACK, FIN, ACK, RST) is
decided by the connection code that raises the event.

LISTEN lives in the layer (a listener is not a connection): a SYN to a
listener creates a connection that starts in SYN_RECEIVED via RCV_SYN, and a
passive connection that is reset in SYN_RECEIVED is simply deleted instead of
"returning to LISTEN".

Orthogonal per-connection sub-states (congestion recovery, persist,
keepalive) are not connection states and live with their own code.
"""
from __future__ import annotations

import enum

__all__ = ["State", "Event", "TRANSITIONS", "transition", "TcpStateError",
           "SYNCHRONIZED", "CAN_SEND", "CAN_RECEIVE", "FIN_SENT_STATES"]


class State(enum.Enum):
    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"

    # Members are singletons: identity hashing keeps `state in SOME_SET` (on
    # the data path several times per segment) in C instead of Enum.__hash__.
    __hash__ = object.__hash__


class Event(enum.Enum):
    ACTIVE_OPEN = "active open"          # app connect(): SYN sent
    RCV_SYN = "rcv SYN"                  # SYN to a listener, or simultaneous open
    RCV_SYN_ACK = "rcv SYN-ACK"          # our SYN acked and the peer's SYN seen
    RCV_ACK_OF_SYN = "rcv ACK of SYN"    # handshake completes on the passive side
    CLOSE = "app close"                  # app close(): FIN queued after the data
    RCV_FIN = "rcv FIN"                  # peer FIN, in sequence
    RCV_ACK_OF_FIN = "rcv ACK of FIN"    # our FIN acked
    TIMEOUT = "2MSL timeout"             # TIME_WAIT ends
    RCV_RST = "rcv RST"                  # acceptable RST (RFC 5961 exact match)
    ABORT = "abort"                      # app abort(), retransmission give-up, eviction

S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    # opening
    (S.CLOSED, E.ACTIVE_OPEN): S.SYN_SENT,
    (S.LISTEN, E.RCV_SYN): S.SYN_RECEIVED,
    (S.CLOSED, E.RCV_SYN): S.SYN_RECEIVED,          # passive connection born from a listener
    (S.SYN_SENT, E.RCV_SYN_ACK): S.ESTABLISHED,
    (S.SYN_SENT, E.RCV_SYN): S.SYN_RECEIVED,        # simultaneous open
    (S.SYN_RECEIVED, E.RCV_ACK_OF_SYN): S.ESTABLISHED,
    # closing, our side first
    (S.SYN_SENT, E.CLOSE): S.CLOSED,
    (S.SYN_RECEIVED, E.CLOSE): S.FIN_WAIT_1,
    (S.ESTABLISHED, E.CLOSE): S.FIN_WAIT_1,
    (S.FIN_WAIT_1, E.RCV_ACK_OF_FIN): S.FIN_WAIT_2,
    (S.FIN_WAIT_1, E.RCV_FIN): S.CLOSING,           # simultaneous close
    (S.FIN_WAIT_2, E.RCV_FIN): S.TIME_WAIT,
    (S.CLOSING, E.RCV_ACK_OF_FIN): S.TIME_WAIT,
    (S.TIME_WAIT, E.TIMEOUT): S.CLOSED,
    # closing, peer first
    (S.ESTABLISHED, E.RCV_FIN): S.CLOSE_WAIT,
    (S.CLOSE_WAIT, E.CLOSE): S.LAST_ACK,
    (S.LAST_ACK, E.RCV_ACK_OF_FIN): S.CLOSED,
}

# A reset or an abort ends every state that holds a connection. TIME_WAIT is
# included for abort (eviction when the TIME_WAIT table is full) but RSTs in
# TIME_WAIT are ignored by the connection code (RFC 1337).
for _s in S:
    if _s is not S.CLOSED:
        TRANSITIONS[(_s, E.RCV_RST)] = S.CLOSED
        TRANSITIONS[(_s, E.ABORT)] = S.CLOSED
TRANSITIONS[(S.CLOSED, E.ABORT)] = S.CLOSED
del _s

# Groups used by the connection code.
SYNCHRONIZED = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSE_WAIT,
                          S.CLOSING, S.LAST_ACK, S.TIME_WAIT})
CAN_SEND = frozenset({S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK})
CAN_RECEIVE = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})
FIN_SENT_STATES = frozenset({S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSING, S.LAST_ACK, S.TIME_WAIT})


class TcpStateError(RuntimeError):
    """An event that has no move from the current state (a bug, or an app misuse)."""


def transition(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TcpStateError(f"no transition from {state.value} on {event.value}") from None
