"""The NAT's TCP cap is the one that holds: the TCP layer under it keeps room
for every flow the cap allows plus the connections lingering in TIME-WAIT, so
a guest gets all `max_tcp` flows even right after many closed, and the one
past the cap gets the NAT's RST (nat_tcp_flow_limit), not a silent drop."""
from __future__ import annotations

from stack.flows import FlowConfig, TcpClosed, TcpRequest
from stack.tcp.state import State

from .nat_guest import NatGuest

FAR = "192.0.2.20"          # RFC 5737 TEST-NET-1 (no sockets here anyway)
MAX_TCP = 520               # with 512 in TIME-WAIT, past the TCP layer's old fixed 1,024
BATCH = 100                 # under the 128 held SYNs (FlowConfig.max_half_open)


def open_many(g: NatGuest, n: int, port: int) -> list:
    conns = []
    for k in range(0, n, BATCH):
        new = [g.connect(FAR, port) for _ in range(min(BATCH, n - k))]
        for ev in g.events():
            if isinstance(ev, TcpRequest):
                g.flows.accept(g.now, ev.fid)
        g.pump()
        conns += new
    return conns


def test_all_nat_flows_fit_beside_connections_in_time_wait():
    g = NatGuest(FlowConfig(max_tcp=MAX_TCP))
    tw = g.stack.tcp.config.max_time_wait
    # A first round the host side closes first: the stack's ends go to TIME-WAIT.
    first = open_many(g, tw, 80)
    assert [c.state for c in first] == [State.ESTABLISHED] * tw
    fids = [e.fid for e in g.flows._flows.values()]
    for fid in fids:
        g.flows.close(g.now, fid)
    g.pump()
    for c in first:
        c.close()
    g.pump()
    assert sum(isinstance(e, TcpClosed) for e in g.events()) == tw
    assert g.flows.counts()["tcp"] == 0
    assert sum(c.state is State.TIME_WAIT for c in g.stack.tcp.connections) == tw

    # A second round: every flow the NAT allows is there...
    second = open_many(g, MAX_TCP, 81)
    assert [c.state for c in second] == [State.ESTABLISHED] * MAX_TCP, \
        dict(g.stack.all_counters())
    assert g.flows.counts()["tcp"] == MAX_TCP
    # ...and the next one is refused by the NAT's cap, with a RST.
    extra = g.connect(FAR, 82)
    g.pump()
    assert extra.state is State.CLOSED and extra.error == "connection refused"
    c = g.stack.all_counters()
    assert c["nat_tcp_flow_limit"] == 1 and c.get("tcp_conn_limit_drops", 0) == 0
