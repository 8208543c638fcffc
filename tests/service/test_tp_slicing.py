"""Tensor-parallel slicing against the unsplit secret (golden reference: the full L R of each tensor).

The rank layouts below are produced the way vLLM's loaders shard (narrow by rank on the output or
the input dimension, GQA kv heads replicated when there are fewer than ranks, vocab padded to a
multiple of 64 per shard, a fused checkpoint tensor split per q/k/v part); the probe maps are read
from index-encoded scratch exactly as the slip loader reads them, and the requests are computed by
the real ``SplitExecutor`` of a real protected bundle.
"""

import pytest
import torch

from secure_service.bundle import load_bundle
from secure_service.split_executor import RequestRejected, SplitExecutor
from slip_vllm.core import sharding, wire

TP = 2


@pytest.fixture(scope="module")
def bundle(model_factory):
    _, protected = model_factory("llama", kv_heads=1)
    b = load_bundle(protected / "secret")
    return b, SplitExecutor(b), {t.entry.name: t for t in b.tensors}


def full(t):
    return t.left @ t.right  # W_C, [m, n]


def probe(shape, load):
    """Maps of a scratch filled by ``load(scratch, loaded)`` with the row and column probes."""
    filled = []
    for dim in (0, 1):
        scratch = torch.zeros(load.local_shape)
        load(scratch, sharding.index_probe(shape, dim))
        filled.append(scratch)
    return sharding.read_probe(*filled)


class Narrow:
    """Local block = loaded.narrow(dim, start, size), written at local rows [offset, ...)."""

    def __init__(self, local_shape, dim, start, size, offset=0):
        self.local_shape, self.dim, self.start, self.size, self.offset = local_shape, dim, start, size, offset

    def __call__(self, scratch, loaded):
        block = loaded.narrow(self.dim, self.start, self.size)
        scratch[self.offset:self.offset + block.shape[0], :block.shape[1]].copy_(block)


def request(ex, kind, ids, x, ranges):
    req = wire.decode_request(wire.encode_request(kind, ids, x, 1, 1, ranges=ranges))
    return ex.run(req)


def test_column_parallel_qkv_with_replicated_kv_head_gets_exactly_its_rows(bundle):
    b, ex, by = bundle
    q, k, v = (by[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    mq, n = q.entry.shape
    mk = k.entry.shape[0]  # one kv head: replicated on both ranks
    x = torch.randn(5, n)
    for rank in range(TP):
        local = (mq // TP + 2 * mk, n)
        segs = []
        for t, start, size, off in ((q, rank * mq // TP, mq // TP, 0), (k, 0, mk, mq // TP),
                                    (v, 0, mk, mq // TP + mk)):
            segs += sharding.segments_for_load(t.entry.id, *probe(t.entry.shape, Narrow(local, 0, start, size, off)))
        shapes = {t.entry.id: tuple(t.entry.shape) for t in (q, k, v)}
        ids, ranges, width = sharding.layer_segments(segs, local[0], n, shapes)
        assert ids == (q.entry.id, k.entry.id, v.entry.id) and width == local[0]
        got = request(ex, wire.KIND_LINEAR, ids, x, ranges)
        want = torch.cat([x @ full(q)[rank * mq // TP:(rank + 1) * mq // TP].T, x @ full(k).T, x @ full(v).T], 1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_row_parallel_partials_sum_to_the_full_secret_term(bundle):
    b, ex, by = bundle
    o = by["model.layers.1.self_attn.o_proj.weight"]
    m, n = o.entry.shape
    x = torch.randn(7, n)
    total = torch.zeros(7, m)
    for rank in range(TP):
        cols = n // TP
        row_map, col_map = probe(o.entry.shape, Narrow((m, cols), 1, rank * cols, cols))
        ids, ranges, width = sharding.layer_segments(sharding.segments_for_load(o.entry.id, row_map, col_map),
                                                     m, cols, {o.entry.id: (m, n)})
        assert ranges == ((0, m, rank * cols, (rank + 1) * cols),) and width == m
        total += request(ex, wire.KIND_LINEAR, ids, x[:, rank * cols:(rank + 1) * cols].contiguous(), ranges)
    torch.testing.assert_close(total, x @ full(o).T, rtol=1e-4, atol=1e-5)


def test_vocab_shards_of_embedding_and_lm_head_with_padding(bundle):
    b, ex, by = bundle
    emb = by["model.embed_tokens.weight"]
    head = by["lm_head.weight"]
    vocab, dim = emb.entry.shape
    padded = -(-vocab // 64) * 64
    per = padded // TP
    ids = torch.arange(vocab)
    h = torch.randn(3, dim)
    looked_up = torch.zeros(vocab, dim)
    logits = []
    for rank in range(TP):
        start, stop = rank * per, min((rank + 1) * per, vocab)
        row_map, col_map = probe((vocab, dim), Narrow((per, dim), 0, start, stop - start))
        tid, ranges, width = sharding.layer_segments(sharding.segments_for_load(emb.entry.id, row_map, col_map),
                                                     per, dim, {emb.entry.id: (vocab, dim)}, padding_ok=True)
        assert ranges == ((start, stop, 0, dim),) and width == stop - start
        # vLLM's masking: ids shifted into the shard, out-of-shard ids become 0 and their rows are zeroed
        inside = (ids >= start) & (ids < stop)
        out = request(ex, wire.KIND_EMBED, tid, torch.where(inside, ids - start, 0), ranges)
        looked_up += out.masked_fill(~inside[:, None], 0)
        hrow, hcol = probe((vocab, dim), Narrow((per, dim), 0, start, stop - start))
        hid, hranges, hwidth = sharding.layer_segments(sharding.segments_for_load(head.entry.id, hrow, hcol),
                                                       per, dim, {head.entry.id: (vocab, dim)}, padding_ok=True)
        logits.append(request(ex, wire.KIND_LINEAR, hid, h, hranges))
    torch.testing.assert_close(looked_up, full(emb), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(logits, 1), h @ full(head).T, rtol=1e-4, atol=1e-5)


def test_fused_checkpoint_tensor_split_into_runs_and_layouts_that_are_refused(bundle):
    b, ex, by = bundle
    gate = by["model.layers.0.mlp.gate_proj.weight"]
    m, n = gate.entry.shape
    # a fused checkpoint tensor whose rank block is two non-adjacent runs (like GPT-2's c_attn)
    def two_runs(scratch, loaded):
        scratch[: m // 4].copy_(loaded[: m // 4])
        scratch[m // 4:].copy_(loaded[m // 2: 3 * m // 4])
    two_runs.local_shape = (m // 2, n)
    segs = sharding.segments_for_load(gate.entry.id, *probe((m, n), two_runs))
    ids, ranges, _ = sharding.layer_segments(segs, m // 2, n, {gate.entry.id: (m, n)})
    assert ids == (gate.entry.id,) * 2 and ranges == ((0, m // 4, 0, n), (m // 2, 3 * m // 4, 0, n))
    x = torch.randn(4, n)
    w = full(gate)
    torch.testing.assert_close(request(ex, wire.KIND_LINEAR, ids, x, ranges),
                               x @ torch.cat([w[: m // 4], w[m // 2: 3 * m // 4]]).T, rtol=1e-4, atol=1e-5)
    # a strided column shard is no consecutive run: refused at load, not served wrong
    def strided(scratch, loaded):
        scratch.copy_(loaded[:, ::2])
    strided.local_shape = (m, n // 2)
    with pytest.raises(sharding.ShardingError, match="one consecutive run"):
        sharding.segments_for_load(gate.entry.id, *probe((m, n), strided))
    # rows left without a secret in the middle of a layer are refused
    with pytest.raises(sharding.ShardingError, match="receive no protected row"):
        sharding.layer_segments([sharding.Segment(gate.entry.id, 4, 0, 4, 0, 0, n)], 8, n, {gate.entry.id: (m, n)})


def test_whole_tensors_keep_the_unsliced_frame_and_bad_ranges_are_refused(bundle):
    b, ex, by = bundle
    gate = by["model.layers.0.mlp.gate_proj.weight"]
    m, n = gate.entry.shape
    segs = sharding.segments_for_load(gate.entry.id, *probe((m, n), Narrow((m, n), 0, 0, m)))
    assert sharding.layer_segments(segs, m, n, {gate.entry.id: (m, n)})[1] is None  # TP 1: SLQ1 frames
    for ranges in [((0, m + 1, 0, n),), ((0, m, 0, n + 1),)]:
        with pytest.raises(RequestRejected):
            request(ex, wire.KIND_LINEAR, (gate.entry.id,), torch.randn(2, n), ranges)
    with pytest.raises(RequestRejected):  # rows of a different width than the columns asked for
        request(ex, wire.KIND_LINEAR, (gate.entry.id,), torch.randn(2, n), ((0, m, 0, n // 2),))
