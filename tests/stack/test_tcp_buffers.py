"""The send buffer's ring (stack/tcp/buffers.py) against a plain bytes model.

Writes, ACKs and segment reads in any order, across the ring's wrap and its
growth: every read returns exactly the model's bytes at that sequence
number, space and length agree, and the storage never exceeds the capacity.
"""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from stack.tcp.buffers import SEND_STORE_MIN, SendBuffer

CAP = 3 * SEND_STORE_MIN + 123     # not a power of two: the last growth stops at the capacity

# What an application hands to send(): write() copies each kind alike (a
# byte-format view through a view of the store, anything else the bytearray way).
AS = {"memoryview": memoryview, "bytes": bytes, "bytearray": bytearray,
      "signed view": lambda b: memoryview(b).cast("b")}

OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, CAP + 10), st.sampled_from(list(AS))),
    st.tuples(st.just("ack"), st.integers(-5, CAP + 10)),
    st.tuples(st.just("read"), st.integers(0, CAP), st.integers(0, CAP)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, seq0=st.integers(0, 1 << 32))
def test_the_ring_reads_back_what_the_model_holds(ops, seq0):
    sb = SendBuffer(CAP, seq0)
    model = bytearray()          # the bytes from sb.seq on
    seq = seq0
    counter = 0
    for op in ops:
        if op[0] == "write":
            data = bytes((counter + i) & 0xFF for i in range(op[1]))
            counter += op[1]
            n = sb.write(AS[op[2]](data))
            assert n == min(op[1], CAP - len(model))
            model += data[:n]
        elif op[0] == "ack":
            n = sb.ack_to(seq + op[1])
            assert n == max(0, min(op[1], len(model)))
            del model[:n]
            seq += n
        else:
            off = min(op[1], len(model))
            n = min(op[2], len(model) - off)
            out = bytearray(b"hdr")
            sb.append_to(out, seq + off, n)
            assert out == b"hdr" + model[off:off + n]
        assert len(sb) == len(model) and sb.space == CAP - len(model)
        assert sb.seq == seq and sb.end == seq + len(model)
        assert len(sb.store) <= CAP


def test_a_full_buffer_wraps_without_copying_the_rest():
    """The bulk sender's cycle: ACK a frame's worth, write as much; the
    storage stays the one bytearray (no regrowth), the bytes stay in order."""
    sb = SendBuffer(CAP, 7)
    block = bytes(range(256)) * (CAP // 256 + 1)
    assert sb.write(block[:CAP]) == CAP
    store = sb.store
    model = bytearray(block[:CAP])
    for i in range(20):
        sb.ack_to(sb.seq + 5000)
        chunk = block[i:i + 5000]
        assert sb.write(chunk) == 5000
        del model[:5000]
        model += chunk
        out = bytearray()
        sb.append_to(out, sb.seq, len(sb))
        assert out == model
    assert sb.store is store
