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
