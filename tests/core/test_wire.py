import pytest
import torch

from slip_vllm.core import wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_round_trip(dtype):
    x = torch.randn(5, 7).to(dtype)
    body = wire.encode_request(wire.KIND_LINEAR, (3, 4, 5), x, session=2**62 + 5, seq=9)
    req = wire.decode_request(body)
    assert req.kind == wire.KIND_LINEAR and req.tensor_ids == (3, 4, 5)
    assert req.session == 2**62 + 5 and req.seq == 9
    assert req.payload.dtype == dtype and torch.equal(req.payload, x)
    reply = wire.decode_reply(wire.encode_reply(x), expect_rows=5, expect_cols=7)
    assert torch.equal(reply, x)


def test_embed_round_trip_and_raw_little_endian_layout():
    ids = torch.tensor([0, 1, 511, 7])
    body = wire.encode_request(wire.KIND_EMBED, (0,), ids, session=1, seq=1)
    assert body[:4] == b"SLQ1"
    assert body[-16:] == b"".join(int(i).to_bytes(4, "little") for i in ids)
    req = wire.decode_request(body)
    assert req.payload.tolist() == ids.tolist() and req.payload.dtype == torch.int32


def test_malformed_frames_are_rejected():
    good = wire.encode_request(wire.KIND_LINEAR, (0,), torch.ones(2, 3), 1, 1)
    bad_frames = [
        b"", good[:10], b"XXXX" + good[4:], good[:-1], good + b"\0",
        good[:4] + bytes([9]) + good[5:],            # unknown kind
        good[:5] + bytes([42]) + good[6:],           # unknown dtype
        good[:6] + (0).to_bytes(2, "little") + good[8:],   # no tensor ids
        good[:6] + (99).to_bytes(2, "little") + good[8:],  # too many ids
    ]
    for frame in bad_frames:
        with pytest.raises(wire.WireError):
            wire.decode_request(frame)
    with pytest.raises(wire.WireError):
        wire.decode_reply(b"SLR2" + b"\0" * 8)
    with pytest.raises(wire.WireError):
        wire.decode_reply(wire.encode_reply(torch.ones(2, 3)), expect_rows=3)


def test_service_identity_travels_in_every_reply_and_step_frame():
    """The instance id of the answering service (and the shielded KV epoch) is in the headers, so a
    restarted service is visible in its first reply; the host's expectation is in its frames."""
    body = wire.encode_reply(torch.ones(2, 3), instance=0xDEADBEEF12345678)
    assert wire.reply_instance(body) == 0xDEADBEEF12345678
    assert torch.equal(wire.decode_reply(body), torch.ones(2, 3))
    frame = wire.decode_shielded_step(wire.encode_shielded_step(
        7, 1, [1, 2], [0, 1], [0, 1], [0, 2], [2], [[0]], defer_logits=True, instance=2**64 - 1, epoch=3))
    assert (frame.instance, frame.epoch, frame.session, frame.defer_logits) == (2**64 - 1, 3, 7, True)
    msg = wire.decode_shielded_message(wire.encode_shielded_message(
        wire.MSG_READY, 5, 2, "", torch.tensor([[4]]), instance=11, epoch=12))
    assert (msg.instance, msg.epoch, msg.step, msg.call) == (11, 12, 5, 2)


def test_sliced_request_round_trip_layout_and_refusals():
    """Tensor parallelism: a rank's block of each tensor travels as (row0, row1, col0, col1) per id
    in an SLQ2 frame; frames without ranges keep the SLQ1 layout."""
    x = torch.randn(3, 4)
    ranges = ((0, 8, 4, 8), (2, 3, 4, 8), (0, 8, 4, 8))
    body = wire.encode_request(wire.KIND_LINEAR, (1, 2, 1), x, session=5, seq=6, ranges=ranges)
    assert body[:4] == b"SLQ2"
    assert len(body) == 32 + 3 * 4 + 3 * 16 + x.numel() * 4
    req = wire.decode_request(body)
    assert req.tensor_ids == (1, 2, 1) and req.ranges == ranges and torch.equal(req.payload, x)
    assert wire.decode_request(wire.encode_request(wire.KIND_LINEAR, (1,), x, 5, 6)).ranges is None
    head = body[:32 + 12]
    bad = [
        body[:32 + 12 + 8],                                              # truncated inside the ranges
        head + (5).to_bytes(4, "little") * 2 + body[32 + 12 + 8:],       # empty row range [5, 5)
        head + b"".join(v.to_bytes(4, "little") for v in (0, 8, 6, 2)) + body[32 + 12 + 16:],  # inverted cols
    ]
    for frame in bad:
        with pytest.raises(wire.WireError):
            wire.decode_request(frame)
    for wrong in [((0, 1, 0, 1),), ((0, 1, 0),) * 3]:
        with pytest.raises(wire.WireError):
            wire.encode_request(wire.KIND_LINEAR, (1, 2, 1), x, 5, 6, ranges=wrong)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_shielded_frames_are_the_same_bytes_from_any_device_dtype_or_buffer(device):
    """A step frame from vLLM's device tensors of its own dtypes (int32 ids, query start locations,
    sequence lengths and block tables), from lists, or from CPU int64 tensors is the same bytes; a
    message written as (header, payload) is the frame; decoding into a given buffer equals decoding
    into a fresh one, and a buffer of the wrong shape, dtype or device is refused."""
    ids, pos, slots, qsl, lens, bt = [5, 6, 7], [0, 1, 2], [8, 9, 10], [0, 3], [3], [[2, 0, 0]]
    want = wire.encode_shielded_step(1, 2, ids, pos, slots, qsl, lens, bt, [2])
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    i64 = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    assert wire.encode_shielded_step(1, 2, i32(ids), i64(pos), i64(slots), i32(qsl), i32(lens), i32(bt),
                                     torch.tensor([2])) == want
    assert wire.encode_shielded_step(1, 2, i64(ids), i64(pos), i64(slots), i64(qsl), i64(lens), i64(bt)[:, :3],
                                     i64([2])) == want
    step = wire.decode_shielded_step(want)
    assert step.block_tables.tolist() == bt and step.logits_indices.tolist() == [2]
    y = torch.tensor([[0, 1, 2**40 + 3], [4, 5, 6]])
    head, payload = wire.shielded_message_header(wire.MSG_ANSWER, 9, 1, "layers.0.o", y, instance=3, epoch=4)
    frame = wire.encode_shielded_message(wire.MSG_ANSWER, 9, 1, "layers.0.o", y, instance=3, epoch=4)
    assert head + payload.numpy().tobytes() == frame
    buf = torch.full((2, 3), -1, dtype=torch.int64)
    got = wire.decode_shielded_message(frame, into=lambda kind, r, c, dt: buf)
    assert got.payload is buf and torch.equal(buf, y) and got.key == "layers.0.o"
    assert torch.equal(wire.decode_shielded_message(frame, into=lambda *a: None).payload, y)
    for wrong in (torch.empty(3, 2, dtype=torch.int64), torch.empty(2, 3, dtype=torch.int32)):
        with pytest.raises(wire.WireError, match="buffer"):
            wire.decode_shielded_message(frame, into=lambda *a, w=wrong: w)
