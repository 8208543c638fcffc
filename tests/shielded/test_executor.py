"""The trusted-side executor of protocol ``shielded`` (``secure_service.shielded_executor``).

A small scheduler simulation drives the executor the way vLLM's runner does: flattened mixed
prefill/decode batches with ``positions``, ``slot_mapping``, ``query_start_loc``, ``seq_lens`` and
shuffled (non-contiguous) ``block_tables``, a chunked prefill and a sequence joining mid-run.  Every
logits row is compared with the transformers model run on the original weights over the whole
sequence.

Three paths of the same executor, the same split:
* ``float`` (W_C + W_D unquantized, no host) must match transformers to float rounding (<= 1e-4):
  the glue (norms, RoPE and its scaling, GQA, paged cache, biases, q/k norms, tied head) is right;
* ``shielded`` (masks, in-process host doing the exact field GEMM, Freivalds, unmasking) must equal
  ``fixed_point`` (the fixed-point specification, no masks) bit for bit: the protocol adds no error;
* ``shielded`` vs transformers then differs only by quantization.  The error budget is split by a
  float run of the same executor with W_D replaced by its dequantized int8 grid: shielded differs
  from it by the 16-bit activation quantization alone (measured max |d logits| <= 7.2e-4).
  Measured with int8 weights on these tiny random models (init std 0.1, 2 layers, |logits| <= 4.5,
  44 compared positions per model): per-row relative error ||d|| / ||logits|| <= 0.042, max |d| <= 0.16,
  greedy agreement 0.886 (qwen2) to 0.977 (llama).  Per-channel int8 has a relative weight error of
  about max|w| / (127 sqrt(12)) / rms|w| ~ 0.6 % per GEMM for Gaussian rows; nine GEMMs in sequence
  and the model's gain give the few per cent measured, and these random models' top-2 logit margins
  are often below 0.1, so int8 flips some greedy tokens here.  Asserted for int8: relative <= 0.06,
  max |d| <= 0.25, agreement >= 0.85.  With int16 weights (two int8 digit planes on the host)
  the error drops to relative <= 2.6e-4, max |d| <= 9.3e-4 and greedy agreement is 100 %; asserted:
  1e-3, 5e-3 and >= 99 %.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from secure_service.integrity import IntegrityError
from secure_service.shielded_executor import ShieldedExecutor
from slip_vllm.core.decompose import RankPolicy
from slip_vllm.core.field import field_matmul
from slip_vllm.core.quantize import PublicWeight
from slip_vllm.protect.tiny_models import make_tiny_model

NUM_BLOCKS, BLOCK_SIZE = 16, 4
POLICY = RankPolicy(absolute=8)
# name -> (tiny-model family, tied embeddings, entries written into config.json); rope scaling is
# written under the legacy key of real checkpoints, which the config parser converts
FAMILIES = {
    "llama-llama3rope": ("llama", False, {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "mistral-linearrope-window": ("mistral", False, {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                                     "sliding_window": 5}),
    "qwen2-tied": ("qwen2", True, {}),
    "qwen3": ("qwen3", False, {}),
}
# int8 weights, 44 teacher-forced rows of a random tiny model, many near-ties. Measured with the mixed
# blinding: rel <= 0.038, max|d| <= 0.14, greedy 0.84-0.95 (llama 37/44; the block blinding gave >= 0.886:
# the mixed one leaves W_D a generic spectrum, so its int8 grid rounds differently). The error bounds
# are the tight checks; the greedy floor only catches a grossly broken path.
REL_TOL, ABS_TOL, AGREE_INT8 = 0.06, 0.25, 0.75
REL_TOL_INT16, ABS_TOL_INT16, AGREE = 1e-3, 5e-3, 0.99  # int16 weights (measured: <= 2.6e-4, <= 9.3e-4, 1.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("executor-models")
    cache = {}

    def get(name):
        if name not in cache:
            family, tie, overrides = FAMILIES[name]
            d = make_tiny_model(family, root / name, hidden=128, layers=2, heads=4, kv_heads=2, tie=tie, seed=3)
            if overrides:
                cfg_path = Path(d) / "config.json"
                cfg = json.loads(cfg_path.read_text())
                if "rope_scaling" in overrides:
                    cfg.pop("rope_parameters", None)
                cfg.update(overrides)
                cfg_path.write_text(json.dumps(cfg))
            cache[name] = Path(d)
        return cache[name]

    return get


def _hf_logits(model_dir, seqs):
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return {sid: hf(toks[None]).logits[0] for sid, toks in seqs.items()}, hf.config


# each step: (sequence id, number of new tokens); A, B, C prefill together (C in two chunks),
# D joins at step 2 with a prefill next to decodes, then everybody decodes
SCHEDULE = [
    [("A", 5), ("B", 9), ("C", 3)],
    [("A", 1), ("B", 1), ("C", 4)],
    [("B", 1), ("D", 6), ("A", 1), ("C", 1)],
    [("A", 1), ("B", 1), ("C", 1), ("D", 1)],
    [("D", 1), ("C", 1), ("B", 1), ("A", 1)],
    [("A", 1), ("B", 1), ("C", 1), ("D", 1)],
]


def _scenario(vocab, seed=0):
    """(sequences' tokens, list of step batches) with shuffled block allocation."""
    g = torch.Generator().manual_seed(seed)
    totals = {}
    for step in SCHEDULE:
        for sid, n in step:
            totals[sid] = totals.get(sid, 0) + n
    seqs = {sid: torch.randint(2, vocab, (n,), generator=g) for sid, n in totals.items()}
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    blocks = {sid: [] for sid in seqs}
    done = {sid: 0 for sid in seqs}
    max_blocks = max(-(-n // BLOCK_SIZE) for n in totals.values())
    steps = []
    for step in SCHEDULE:
        ids, pos, slots, qsl, lens, tables, rows = [], [], [], [0], [], [], []
        for sid, n in step:
            start = done[sid]
            while len(blocks[sid]) * BLOCK_SIZE < start + n:
                blocks[sid].append(free.pop())
            for j in range(start, start + n):
                ids.append(int(seqs[sid][j]))
                pos.append(j)
                slots.append(blocks[sid][j // BLOCK_SIZE] * BLOCK_SIZE + j % BLOCK_SIZE)
                rows.append((sid, j))
            done[sid] = start + n
            qsl.append(qsl[-1] + n)
            lens.append(start + n)
            tables.append(blocks[sid] + [0] * (max_blocks - len(blocks[sid])))
        steps.append(dict(input_ids=torch.tensor(ids), positions=torch.tensor(pos), slot_mapping=torch.tensor(slots),
                          query_start_loc=torch.tensor(qsl), seq_lens=torch.tensor(lens),
                          block_tables=torch.tensor(tables), rows=rows))
    return seqs, steps


class _Host:
    """In-process honest host: the exact field GEMM with the public int8 weights; checks and counts."""

    def __init__(self, executor, tamper_key=None):
        self.weights = {k: PublicWeight(w, executor.p) for k, w in executor.public_weights().items()}
        self.p = executor.p
        self.calls = []
        self.tamper_key = tamper_key

    def __call__(self, key, x_masked):
        assert x_masked.dtype == torch.int64 and x_masked.dim() == 2
        assert int(x_masked.min()) >= 0 and int(x_masked.max()) < self.p
        self.calls.append((key, int(x_masked.shape[0])))
        w = self.weights[key]
        # int8: exactly the host's field GEMM; int16: its two digit planes
        y = field_matmul(x_masked, w.w_q, self.p) if w.bits == 8 else w.matmul(x_masked)
        if key == self.tamper_key:
            y = y.clone()
            y[0, 0] = (y[0, 0] + 1) % self.p
        return y


def _run(executor, steps, host=None, all_rows=True):
    """Run every step; returns [(sid, position, logits row)]."""
    out = []
    for st in steps:
        batch = {k: v for k, v in st.items() if k != "rows"}
        n = int(batch["input_ids"].shape[0])
        idx = torch.arange(n) if all_rows else None
        logits = executor.step(**batch, host_gemm=host, logits_indices=idx)
        rows = st["rows"] if all_rows else [st["rows"][int(i) - 1] for i in batch["query_start_loc"][1:]]
        assert logits.shape == (len(rows), executor.vocab)
        out += [(sid, j, logits[r]) for r, (sid, j) in enumerate(rows)]
    return out


def _build(model_dir, mode, **kw):
    return ShieldedExecutor.from_checkpoint(model_dir, POLICY, seed=11, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                            mode=mode, pool_rows=0, **kw)


def _errors(rows, ref):
    """(max row-relative error, max |d|, greedy agreement) of logits rows against transformers."""
    rel = [((lg - ref[sid][j]).norm() / ref[sid][j].norm()).item() for sid, j, lg in rows]
    abs_err = max((lg - ref[sid][j]).abs().max().item() for sid, j, lg in rows)
    agree = sum(int(lg.argmax() == ref[sid][j].argmax()) for sid, j, lg in rows) / len(rows)
    return max(rel), abs_err, agree


@pytest.mark.parametrize("name", list(FAMILIES))
def test_executor_matches_transformers(models, name):
    model_dir = models(name)
    fl = _build(model_dir, "float")
    seqs, steps = _scenario(fl.vocab, seed=len(name))
    ref, hf_config = _hf_logits(model_dir, seqs)

    # the model library's pieces are the ones in use (rope variant, tied head)
    family, tie, overrides = FAMILIES[name]
    assert fl.rotary.rope_type == overrides.get("rope_scaling", {}).get("rope_type", "default")
    assert bool(hf_config.tie_word_embeddings) == tie
    assert [layer.sliding_window for layer in fl.layers] == [overrides.get("sliding_window")] * fl.num_layers

    # float path: W_C + W_D unquantized -> transformers up to float rounding
    float_rows = _run(fl, steps)
    float_err = max((lg - ref[sid][j]).abs().max().item() for sid, j, lg in float_rows)
    assert float_err <= 1e-4, f"float path differs from transformers by {float_err:.3e}"

    # shielded path == fixed-point specification, bit for bit, with the host-call budget
    fx = _build(model_dir, "fixed_point")
    sh = _build(model_dir, "shielded")
    assert fx.p == sh.p
    host = _Host(sh)
    fixed_rows = _run(fx, steps)
    shielded_rows = []
    for st in steps:
        before = len(host.calls)
        shielded_rows += _run(sh, [st], host)
        calls = host.calls[before:]
        assert [k for k, _ in calls] == sh.layer_keys() == sh.host_calls
        assert len(calls) == 4 * sh.num_layers + 1
        n = int(st["input_ids"].shape[0])
        assert all(t == n for _, t in calls)  # one call for the whole batch (all rows asked for logits)
    for (sid, j, a), (_, _, b) in zip(shielded_rows, fixed_rows):
        assert torch.equal(a, b), f"shielded != fixed point at {sid}:{j}"

    # the error budget: int8 weights (dominant) vs 16-bit activations.  The float path with W_D
    # replaced by its dequantized int8 grid has the weight error only; shielded differs from it by
    # the activation quantization alone.
    for key, s in fl.splits.items():
        q = sh._quantized[key]
        s.public = q.w_q.float() * q.scale[:, None]
    wq_rows = _run(fl, steps)
    act_err = max((a[2] - b[2]).abs().max().item() for a, b in zip(shielded_rows, wq_rows))
    rel, abs_err, agree = _errors(shielded_rows, ref)
    print(f"{name}: float max|d|={float_err:.2e}; int8 shielded rows={len(shielded_rows)} rel max={rel:.4f} "
          f"max|d|={abs_err:.4f} greedy={agree:.4f}; activation-only max|d|={act_err:.2e}; p={sh.p}")
    assert act_err <= 5e-3
    assert rel <= REL_TOL and abs_err <= ABS_TOL
    assert agree >= AGREE_INT8
    sh.close()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_int16_weights_agree_greedily(models, name):
    """With int16 public weights (two int8 digit planes on the host) the quantization error is
    ~1/256 of int8's and greedy tokens agree on >= 99 % of positions."""
    model_dir = models(name)
    sh = _build(model_dir, "shielded", weight_bits=16)
    seqs, steps = _scenario(sh.vocab, seed=len(name))
    ref, _ = _hf_logits(model_dir, seqs)
    host = _Host(sh)
    rows = _run(sh, steps, host)
    assert len(host.calls) == len(steps) * (4 * sh.num_layers + 1)
    rel, abs_err, agree = _errors(rows, ref)
    print(f"{name}: int16 shielded rel max={rel:.2e} max|d|={abs_err:.2e} greedy={agree:.4f}")
    assert rel <= REL_TOL_INT16 and abs_err <= ABS_TOL_INT16
    assert agree >= AGREE


def test_default_logits_rows_are_last_tokens(models):
    """Without logits_indices the LM head runs on the last token of every sequence only.  Those
    logits equal the fixed-point specification of the same request bit for bit, and the same rows'
    logits computed among all token rows up to the float32 rounding of the head's W_C x (BLAS
    picks its kernel by the number of rows, so a row's last bits may depend on how many rows share
    the product; measured max |d| 4.8e-7 at |logits| <= 4.5, asserted <= 1e-5)."""
    model_dir = models("qwen3")
    sh = _build(model_dir, "shielded")
    seqs, steps = _scenario(sh.vocab, seed=5)
    host = _Host(sh)
    last = _run(sh, steps[:3], host, all_rows=False)
    fx_last = _run(_build(model_dir, "fixed_point"), steps[:3], all_rows=False)
    every = {(sid, j): lg for sid, j, lg in _run(_build(model_dir, "fixed_point"), steps[:3])}
    assert len(last) == len(fx_last) == sum(len(s) for s in SCHEDULE[:3])
    for (sid, j, lg), (sid2, j2, ref) in zip(last, fx_last):
        assert (sid, j) == (sid2, j2) and torch.equal(lg, ref)
    regrouped = max((lg - every[(sid, j)]).abs().max().item() for sid, j, lg in last)
    print(f"last-token logits vs the same rows among all rows: max |d| = {regrouped:.2e}")
    assert regrouped <= 1e-5
    # the LM head call carries only the requested rows
    assert [t for k, t in host.calls if k == "lm_head"] == [len(s) for s in SCHEDULE[:3]]


def test_rope_scaling_changes_the_model(models):
    """The rope variant of the config is in effect (not silently the default frequencies)."""
    import transformers as tf

    ex = _build(models("llama-llama3rope"), "float")
    plain = tf.LlamaConfig(**{**ex.config.to_dict(), "rope_scaling": None, "rope_parameters": None})
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    default = LlamaRotaryEmbedding(plain)
    assert not torch.allclose(ex.rotary.inv_freq, default.inv_freq)


def test_sliding_window_is_in_effect(models):
    """Sequences longer than the window: attention without the window would give other logits."""
    model_dir = models("mistral-linearrope-window")
    ex = _build(model_dir, "float")
    seqs, steps = _scenario(ex.vocab, seed=2)
    windowed = _run(ex, steps)
    for layer in ex.layers:
        layer.sliding_window = None
    ex.cache.k.zero_()
    ex.cache.v.zero_()
    full = _run(ex, steps)
    late = [(a[2] - b[2]).abs().max().item() for a, b in zip(windowed, full) if a[1] >= 5]
    early = [(a[2] - b[2]).abs().max().item() for a, b in zip(windowed, full) if a[1] < 5]
    assert min(late) > 1e-3 and max(early) == 0.0


def test_tampering_host_fails_closed(models):
    model_dir = models("qwen2-tied")
    a = _build(model_dir, "shielded")
    b = _build(model_dir, "shielded")
    seqs, steps = _scenario(a.vocab, seed=9)
    _run(a, steps[:2], _Host(a))
    _run(b, steps[:2], _Host(b))
    assert torch.equal(a.cache.k, b.cache.k) and torch.equal(a.cache.v, b.cache.v)

    # the last layer's down projection is tampered with: earlier layers already wrote this step's K/V
    bad = _Host(a, tamper_key=f"layers.{a.num_layers - 1}.down")
    with pytest.raises(IntegrityError):
        _run(a, steps[2:3], bad)
    assert a.alarms.count == 1 and a.alarms.per_layer == {f"layers.{a.num_layers - 1}.down": 1}
    assert "lm_head" not in [k for k, _ in bad.calls]  # refused at once, nothing after it
    assert torch.equal(a.cache.k, b.cache.k) and torch.equal(a.cache.v, b.cache.v)  # cache restored
    assert all(lin.pending == 0 for lin in a._shielded.values())

    # the next step (the retried one, then another) is served normally and exactly
    for st in steps[2:4]:
        ra, rb = _run(a, [st], _Host(a)), _run(b, [st], _Host(b))
        assert all(torch.equal(x[2], y[2]) for x, y in zip(ra, rb))
    assert a.alarms.count == 1


def test_malformed_batches_and_models_are_refused(models):
    import transformers as tf

    ex = _build(models("qwen3"), "float")
    _, steps = _scenario(ex.vocab, seed=1)
    good = {k: v for k, v in steps[0].items() if k != "rows"}
    for key, bad in [("slot_mapping", good["slot_mapping"] + NUM_BLOCKS * BLOCK_SIZE),
                     ("input_ids", good["input_ids"] + ex.vocab),
                     ("seq_lens", good["seq_lens"] - 1),
                     ("query_start_loc", good["query_start_loc"][:-1]),
                     ("positions", good["positions"] + 1),
                     ("block_tables", good["block_tables"] + NUM_BLOCKS)]:
        with pytest.raises(ValueError):
            ex.step(**{**good, key: bad})
    with pytest.raises(ValueError, match="needs a host_gemm"):
        _build(models("qwen3"), "shielded").step(**good)
    with pytest.raises(ValueError, match="not supported"):
        ShieldedExecutor(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2), {}, torch.zeros(4, 32), {},
                         num_blocks=1, block_size=1)


def test_trusted_side_does_not_import_vllm():
    import subprocess
    import sys

    code = ("import sys, secure_service.shielded_executor; "
            "sys.exit(1 if any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules) else 0)")
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, timeout=60).returncode == 0


# ---------------------------------------------------------------------------------------------
# the generator form of a step, driven by its caller
# ---------------------------------------------------------------------------------------------


def _batch_of(st):
    return {k: v for k, v in st.items() if k != "rows"}


def test_step_generator_asks_each_masked_gemm_and_equals_the_callback_form(models):
    model_dir = models("qwen2-tied")
    a, b = _build(model_dir, "shielded"), _build(model_dir, "shielded")
    _, steps = _scenario(a.vocab, seed=3)
    host_a, host_b = _Host(a), _Host(b)
    for st in steps[:3]:
        batch = _batch_of(st)
        gen = a.step_gen(**batch)
        keys, ask = [], next(gen)
        try:
            while True:
                keys.append(ask[0])
                ask = gen.send(host_a(*ask))
        except StopIteration as stop:
            logits = stop.value
        assert keys == a.layer_keys()
        assert torch.equal(logits, b.step(**batch, host_gemm=host_b))
    # deferred form: layers, then the head on chosen rows, each a generator of its own
    batch = _batch_of(steps[3])
    gen = a.forward_layers_gen(**batch)
    ask, n_asks = next(gen), 0
    try:
        while True:
            n_asks += 1
            ask = gen.send(host_a(*ask))
    except StopIteration as stop:
        hidden = stop.value
    assert n_asks == 4 * a.num_layers
    head = a.head_gen(hidden[:2])
    key, x = next(head)
    assert key == "lm_head" and x.shape[0] == 2
    with pytest.raises(StopIteration) as stop:
        head.send(host_a(key, x))
    hidden_b = b.forward_layers(**batch, host_gemm=host_b)
    assert torch.equal(hidden, hidden_b) and torch.equal(stop.value.value, b.head(hidden_b[:2], host_b))


def test_fixed_point_and_float_steps_never_ask_the_host(models):
    model_dir = models("qwen3")
    for mode in ("fixed_point", "float"):
        ex, ref = _build(model_dir, mode), _build(model_dir, mode)
        _, steps = _scenario(ex.vocab, seed=1)
        gen = ex.step_gen(**_batch_of(steps[0]))
        with pytest.raises(StopIteration) as stop:
            next(gen)
        assert torch.equal(stop.value.value, ref.step(**_batch_of(steps[0])))


@pytest.mark.parametrize("how", ["close", "throw"])
def test_a_step_closed_or_thrown_into_mid_way_is_rolled_back_at_once(models, how):
    """Closing a step's generator at an ask (a new step, a time-out) or throwing into it (a transport
    error) restores the KV slots it wrote before close/throw returns and discards its masks; the
    executor then serves the next steps exactly like one that never saw the aborted step."""
    model_dir = models("llama-llama3rope")
    a, b = _build(model_dir, "shielded"), _build(model_dir, "shielded")
    _, steps = _scenario(a.vocab, seed=6)
    _run(a, steps[:2], _Host(a))
    _run(b, steps[:2], _Host(b))
    k0, v0 = a.cache.k.clone(), a.cache.v.clone()
    host = _Host(a)
    gen = a.step_gen(**_batch_of(steps[2]))
    ask = next(gen)
    for _ in range(5):  # both layers' qkv: this step's K/V are in the cache now
        ask = gen.send(host(*ask))
    assert ask[0] == "layers.1.o" and not torch.equal(a.cache.k, k0)
    assert a._shielded["layers.1.o"].pending == 1
    if how == "close":
        gen.close()
    else:
        with pytest.raises(ConnectionError):
            gen.throw(ConnectionError("host went away"))
    assert torch.equal(a.cache.k, k0) and torch.equal(a.cache.v, v0)
    assert all(lin.pending == 0 for lin in a._shielded.values())
    ra, rb = _run(a, steps[2:4], _Host(a)), _run(b, steps[2:4], _Host(b))
    assert all(torch.equal(x[2], y[2]) for x, y in zip(ra, rb))


# ---------------------------------------------------------------------------------------------
# attention vectorized over the sequences of a step
# ---------------------------------------------------------------------------------------------


def _attention_per_sequence(ex, layer, q, qsl, seq_lens, block_tables):
    """The definition, one sequence at a time, in float64 (the executor's former loop)."""
    k_flat, v_flat = ex.cache.flat(layer)
    bs, groups = ex.cache.block_size, ex.num_heads // ex.num_kv_heads
    window = ex.layers[layer].sliding_window
    out = torch.zeros(q.shape[0], ex.num_heads, ex.head_dim, dtype=torch.float64)
    for s in range(int(seq_lens.shape[0])):
        lo, hi = int(qsl[s]), int(qsl[s + 1])
        q_len, seq_len = hi - lo, int(seq_lens[s])
        if q_len == 0:
            continue
        j = torch.arange(seq_len)
        slots = block_tables[s, j // bs] * bs + j % bs
        k = k_flat[slots].double().repeat_interleave(groups, dim=1)
        v = v_flat[slots].double().repeat_interleave(groups, dim=1)
        scores = q[lo:hi].double().transpose(0, 1) @ k.permute(1, 2, 0) * ex.scaling
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        allowed = j[None, :] <= q_pos
        if window is not None:
            allowed &= j[None, :] > q_pos - window
        probs = torch.softmax(scores.masked_fill(~allowed[None], float("-inf")), dim=-1)
        out[lo:hi] = (probs @ v.transpose(0, 1)).transpose(0, 1)
    return out.reshape(q.shape[0], -1)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_vectorized_attention_equals_the_per_sequence_definition(models, window, kind):
    """Decode-only and mixed steps (a long prefill chunk, a short one, decodes, a sequence with no
    query this step), GQA, shuffled and shared blocks, with and without a sliding window: the batched
    attention equals the per-sequence definition (float64) to float32 rounding."""
    ex = _build(models("qwen3"), "float")
    g = torch.Generator().manual_seed(7 + (window or 0))
    ex.cache.k.normal_(generator=g)
    ex.cache.v.normal_(generator=g)
    ex.layers[0].sliding_window = window
    # (q_len, seq_len) per sequence
    seqs = [(1, 9), (1, 1), (1, 16), (1, 5)] if kind == "decode" else [(11, 11), (1, 14), (3, 7), (0, 6), (1, 2)]
    q_lens = torch.tensor([a for a, _ in seqs])
    seq_lens = torch.tensor([b for _, b in seqs])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)])
    max_blocks = -(-int(seq_lens.max()) // BLOCK_SIZE)
    # shuffled blocks; sequences may share blocks (as with a cached prefix)
    block_tables = torch.randint(0, NUM_BLOCKS, (len(seqs), max_blocks), generator=g)
    n = int(qsl[-1])
    q = torch.randn(n, ex.num_heads, ex.head_dim, generator=g)
    plan = ex._attention_plan(qsl, seq_lens, block_tables)
    assert len(plan) == (1 if kind == "decode" else 2)  # decodes apart from the prefill chunks
    got = ex._attention(0, q, plan)
    want = _attention_per_sequence(ex, 0, q, qsl, seq_lens, block_tables)
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-5, err


def test_the_bundle_module_never_imports_the_executor():
    """One-way dependency: the executor imports ``shielded_bundle`` (``FusedSplit``, the loader);
    the bundle module imports the executor nowhere, not even inside a function."""
    import ast

    import secure_service.shielded_bundle as bundle_mod
    import secure_service.shielded_executor as executor_mod

    tree = ast.parse(Path(bundle_mod.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not any("shielded_executor" in name for name in imported)
    assert executor_mod.FusedSplit is bundle_mod.FusedSplit
