"""vhostnet's embedded TCP/IP stack: sans-IO.

The stack never touches sockets, clocks or the device. The device side uses
exactly this surface (see stack/interface.py):

    st = Stack(NetConfig(), net_services=ServicesConfig())   # DHCP/DNS/TFTP: stack/services/
    st.set_offloads(csum=True, tso=True)   # what the guest accepts on its RX side
    st.receive(Frame(data, ...), now)      # a frame the guest transmitted
    st.poll(now)                           # run timers (retransmits, ARP aging, ...)
    for f in st.take_frames(): ...         # frames for the guest's RX queue, in order
    for ev in st.take_events(): ...        # with net_services: DNS queries to relay (pulled)
    st.next_deadline()                     # float seconds or None: when to poll next
    st.counters                            # dict[str, int]: drops by reason etc.
    st.snapshot()                          # JSON-able dict: arp table, sockets, tcp conns

`now` is a float number of seconds from any monotonic origin.
"""
from .config import NetConfig
from .frame import Frame

__all__ = ["NetConfig", "Frame", "Stack"]


def __getattr__(name):
    # Lazy so that importing stack.config does not pull in the whole stack.
    if name == "Stack":
        from .interface import Stack
        return Stack
    raise AttributeError(name)
