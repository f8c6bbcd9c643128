"""Link.receiver: the device asks the layers once per TX batch what to hand
its frames to. A layer with nothing to do (no faults in force, nothing
queued or held; no stack-side tap) answers with the next layer's receiver,
so the common case costs no call per frame; one with work answers with its
own receive, and the frames take the layer's path as before."""
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from stack import Frame, Stack
from vhostnet.link import LinkSettings
from vhostnet.link.faults import FaultInjector, FaultSettings
from vhostnet.link.spec import parse
from vhostnet.link.taps import StackTaps

PING = bytes(Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") / IP(src="10.0.2.15", dst="10.0.2.2") /
             ICMP(type=8, id=1, seq=1) / (b"x" * 56))


def layers(spec: str = "", taps=None):
    stack = Stack()
    settings = LinkSettings(FaultSettings(parse(spec) if spec else None), taps if taps is not None else [])
    return stack, settings, settings.compose(stack)


def test_nothing_to_do_goes_straight_to_the_stack():
    stack, _settings, link = layers()
    assert isinstance(link, FaultInjector) and isinstance(link.inner, StackTaps)
    r = link.receiver(1.0)
    assert r == stack.receive
    r(Frame(PING), 1.0)
    assert stack.counters["icmp_echo"] == 1 and len(link.take_frames()) == 1


def test_a_stack_side_tap_gets_its_frames():
    seen = []
    stack, settings, link = layers(taps=[lambda d, f: seen.append((d, bytes(f.data)))])
    r = link.receiver(1.0)
    assert r == link.inner.receive
    r(Frame(PING), 1.0)
    assert seen == [("tx", PING)] and stack.counters["icmp_echo"] == 1
    settings.stack_taps.clear()                  # capture stopped: the bypass again
    assert link.receiver(2.0) == stack.receive


def test_faults_in_force_take_the_fault_layer_and_a_change_is_seen_at_the_next_batch():
    stack, settings, link = layers()
    assert link.receiver(1.0) == stack.receive
    settings.faults.set(parse("loss=100%"))     # set between two batches (the control socket)
    r = link.receiver(2.0)
    assert r == link.receive
    for _ in range(5):
        r(Frame(PING), 2.0)
    assert stack.counters["rx_frames"] == 0 and link.tx.counters["lost"] == 5
    settings.faults.clear()
    assert link.receiver(3.0) == stack.receive


def test_a_frame_still_queued_keeps_the_fault_layer_in_the_path():
    # Delayed frames must leave in order: while one waits, the next batch
    # goes through the layer (behind it), not around it.
    stack, settings, link = layers("delay=10ms")
    r = link.receiver(1.0)
    assert r == link.receive
    r(Frame(PING), 1.0)
    settings.faults.clear()
    assert link.receiver(1.001) == link.receive    # the delayed frame is not out yet
    link.poll(1.02)
    assert stack.counters["icmp_echo"] == 1
    assert link.receiver(1.03) == stack.receive
