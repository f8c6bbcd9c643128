"""TCP for the embedded stack (RFC 9293 with 5681, 5961, 6298, 6582, 6675, 7323, 2018).

One file per concern, read top to bottom:

  config.py      tunables shared by a layer's connections (TcpConfig)
  state.py       the state transition table (the only place states change)
  layer.py       TcpLayer: demux, listeners/backlog, TIME-WAIT bound, RSTs, timer heap
  connection.py  TcpConnection: the sans-IO socket (state, app API, negotiation)
  input.py       ...its receive path (RFC 9293 3.10.7.4, RFC 5961, RFC 7323 PAWS)
  output.py      ...its send loop (lost bytes, new data, FIN; TSO; window advertised)
  timers.py      ...its timers (RTO, persist, keepalive, delayed ACK, TIME-WAIT)
  common.py      ...their shared constants
  buffers.py     bounded send/receive byte FIFOs
  assembler.py   out-of-order reassembly + the SACK blocks we report
  sack.py        the SACK scoreboard of what the peer reported
  rtt.py         RTO estimation and backoff (RFC 6298)
  congestion.py  slow start, congestion avoidance, NewReno recovery (RFC 5681/6582)

The header format is in stack/wire/tcp.py; the built-in echo/discard/chargen
services are in stack/services/tcp_services.py.
"""
from .config import TcpConfig
from .connection import TcpConnection, TcpError
from .layer import TcpLayer
from .state import State

__all__ = ["TcpLayer", "TcpConnection", "TcpConfig", "TcpError", "State"]
