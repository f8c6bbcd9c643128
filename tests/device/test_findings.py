"""Every refusal is a named finding with its virtio 1.2 section (issue 7, must-deliver 6)."""
import re
from pathlib import Path

import trio
from scapy.layers.l2 import ARP, Ether

from vhostnet.testing.frontend import F_WRITE, Frontend
from vhostnet.virtio import findings

from .conftest import wait_counter
from .test_datapath import arp_request, ping

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["vhostnet/virtio/split.py", "vhostnet/net/device.py"]


def test_every_refusal_in_the_code_has_a_rule_with_a_section():
    used = set()
    for src in SOURCES:
        text = (ROOT / src).read_text()
        used |= set(re.findall(r'ChainError\(\s*"(\w+)"', text))
        used |= set(re.findall(r'_refuse\(\s*(?:q,\s*)?"(\w+)"', text))
    assert {"chain_too_long", "desc_out_of_bounds", "tx_runt", "rx_ring_too_small"} <= used
    missing = used - set(findings.RULES)
    assert not missing, f"refusals without a rule in findings.py: {missing}"
    for r in findings.RULES.values():
        assert r.level in ("MUST", "SHOULD")
        assert re.fullmatch(r"[25](\.\d+)+", r.section), r
        assert r.message.startswith(f"virtio 1.2 §{r.section}: ")
    assert findings.RULES["chain_too_long"].message == "virtio 1.2 §2.7.5.3.1: chain longer than the queue (a loop?)"


async def test_a_finding_carries_queue_count_and_first_example(ready, server):
    r = ready.tx
    addr = r.buf(0)
    r.write_desc(0, addr, 64, 1, 1)
    r.write_desc(1, addr, 64, 1, 0)              # 0 -> 1 -> 0: a loop
    for _ in range(3):
        r.push_avail(0)
    r.kick()
    q = server.current.backend.queues[1]
    with trio.fail_after(5):
        while q.errors.get("chain_too_long", 0) < 3:
            await trio.sleep(0.005)
    [f] = q.describe_findings()
    assert (f["id"], f["level"], f["section"], f["queue"], f["count"]) == ("chain_too_long", "MUST", "2.7.5.3.1", "tx", 3)
    assert f["first"]["head"] == 0 and f["first"]["expected"] == f"at most {r.size} descriptors"
    assert f["first"]["avail_idx"] == 0 and "a loop" in f["first"]["detail"]


async def test_a_frame_no_posted_buffers_can_hold_is_dropped_not_waited_for(server):
    """The class of case 1: with MRG_RXBUF, the whole ring of small buffers is not enough."""
    fe = Frontend(queue_size=8)
    await fe.connect(server.socket_path)
    await fe.handshake()
    r = fe.rx
    for _ in range(8):
        r.add([(r.buf(r.free[-1]), 12, F_WRITE)])   # 8 x 12 bytes: less than a 110-byte echo reply
    r.kick()
    fe.post_tx(ping(seq=1))
    fe.tx.kick()
    dev = server.current.device
    await wait_counter(dev, "rx_ring_too_small", 1)
    assert r.used_idx() == 0                          # the buffers stay posted
    fe.tx.take_used()
    fe.tx.free = list(range(fe.tx.size))
    fe.post_tx(arp_request())                         # the 42-byte reply plus header: 54 bytes,
    fe.tx.kick()                                      # 5 of the 12-byte buffers
    assert await r.wait_call()
    got = fe.read_rx()
    assert len(got) == 1 and Ether(got[0][1]).haslayer(ARP)
    assert server.current.backend.queues[0].errors == {"rx_ring_too_small": 1}
    await fe.shutdown(server)
