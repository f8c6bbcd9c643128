import pytest
from scapy.layers.inet import TCP

from stack.checksum import finalize_l4_checksum, pseudo_sum
from stack.segment import SegmentError, segment_tcp
from tests.stack.conftest import (GUEST_IP, GUEST_MAC, IP, UDP, Ether, assert_checksums,
                                  send_raw)

G = bytes([10, 0, 2, 15])


def tcp_checksum_ok(p) -> bool:
    q = p[IP].copy()
    q[TCP].chksum = None
    return IP(bytes(q))[TCP].chksum == p[TCP].chksum


def tso_frame(payload_len=5000, flags="FPAC", dst_mac="52:55:0a:00:02:02"):
    """A TSO frame as Linux hands it to virtio: partial checksum (pseudo sum)."""
    data = bytes((i * 7) & 0xFF for i in range(payload_len))
    p = Ether(src=GUEST_MAC, dst=dst_mac) / IP(src=GUEST_IP, dst=GUEST_IP, id=100, flags="DF") / \
        TCP(sport=40000, dport=5201, seq=0xFFFFF000, ack=5, flags=flags, window=500) / data
    raw = bytearray(bytes(p))
    ps = pseudo_sum(G, G, 6, 20 + payload_len)
    raw[50:52] = ps.to_bytes(2, "big")
    return raw, data


def test_plain_frame_comes_back_unchanged_but_mac(st):
    p = Ether(src=GUEST_MAC, dst="00:11:22:33:44:55") / IP(src=GUEST_IP, dst=GUEST_IP) / \
        UDP(sport=1, dport=2) / b"to myself"
    out = send_raw(st, p, csum_valid=True)
    assert len(out) == 1
    guest_mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    assert bytes(out[0].data) == guest_mac + bytes(p)[6:]
    assert out[0].csum_valid
    assert st.counters["loopback_frames"] == 1


def test_gso_kept_when_guest_accepts_tso(st):
    st.set_offloads(csum=True, tso=True)
    raw, _ = tso_frame()
    out = send_raw(st, raw, csum_start=34, csum_offset=16, gso_size=1448)
    assert len(out) == 1
    f = out[0]
    assert (f.csum_start, f.csum_offset, f.gso_size) == (34, 16, 1448)
    assert bytes(f.data[6:]) == bytes(raw[6:]) and bytes(f.data[:6]) == bytes(raw[6:12])


def test_partial_finalized_without_guest_csum(st):
    p = Ether(src=GUEST_MAC, dst="52:55:0a:00:02:02") / IP(src=GUEST_IP, dst=GUEST_IP) / \
        UDP(sport=1, dport=2) / b"finalize me"
    raw = bytearray(bytes(p))
    raw[40:42] = pseudo_sum(G, G, 17, 8 + 11).to_bytes(2, "big")
    out = send_raw(st, raw, csum_start=34, csum_offset=6)
    assert len(out) == 1 and out[0].csum_start == 0
    assert_checksums(Ether(bytes(out[0].data)))


def test_partial_kept_with_guest_csum(st):
    st.set_offloads(csum=True, tso=False)
    p = Ether(src=GUEST_MAC) / IP(src=GUEST_IP, dst=GUEST_IP) / UDP(sport=1, dport=2) / b"x"
    out = send_raw(st, p, csum_start=34, csum_offset=6)
    assert (out[0].csum_start, out[0].csum_offset) == (34, 6)


@pytest.mark.parametrize("csum", [False, True])
def test_software_segmentation(st, csum):
    st.set_offloads(csum=csum, tso=False)
    raw, data = tso_frame(5000)
    out = send_raw(st, raw, csum_start=34, csum_offset=16, gso_size=1448)
    assert len(out) == 4
    got = b""
    for i, f in enumerate(out):
        assert f.gso_size == 0
        if csum:
            assert (f.csum_start, f.csum_offset) == (34, 16)
            finalize_l4_checksum(f)
        assert f.csum_start == 0
        p = Ether(bytes(f.data))
        assert p.dst == GUEST_MAC
        assert p[IP].id == 100 + i and p[IP].len == 40 + len(p[TCP].payload)
        assert p[IP].flags.DF
        assert_checksums(p)
        assert tcp_checksum_ok(p)
        assert p[TCP].seq == (0xFFFFF000 + 1448 * i) & 0xFFFFFFFF
        fl = str(p[TCP].flags)
        assert ("F" in fl) == (i == 3) and ("P" in fl) == (i == 3)
        assert ("C" in fl) == (i == 0) and "A" in fl
        assert len(p[TCP].payload) == (1448 if i < 3 else 5000 - 3 * 1448)
        got += bytes(p[TCP].payload)
    assert got == data
    assert st.counters["loopback_segmented"] == 4


def test_gso_on_udp_dropped(st):
    p = Ether(src=GUEST_MAC) / IP(src=GUEST_IP, dst=GUEST_IP) / UDP() / bytes(3000)
    assert send_raw(st, p, gso_size=1000) == []
    assert st.counters["drop_loopback_gso_not_tcp"] == 1


def test_segmenter_refuses_nonsense():
    raw, _ = tso_frame(5000)
    with pytest.raises(SegmentError):
        segment_tcp(raw, 0)
    with pytest.raises(SegmentError):
        segment_tcp(raw, 8)  # > 256 segments
    with pytest.raises(SegmentError):
        segment_tcp(raw[:40], 100)
    bad = bytearray(raw)
    bad[46] = 0x10  # data offset 4 bytes
    with pytest.raises(SegmentError):
        segment_tcp(bad, 1000)


def test_bad_gso_loopback_counted(st):
    raw, _ = tso_frame(5000)
    raw[46] = 0x10
    assert send_raw(st, raw, gso_size=1448) == []
    assert st.counters["drop_loopback_bad_gso"] == 1
