"""Shielded precision: greedy agreement of 16-bit public weights with the float model.

What is compared, and why that is the served-vs-stock comparison:
* served ``shielded`` == the offline fixed-point executor (``ShieldedExecutor`` in mode
  ``fixed_point``), token for token and logits bit for bit (tests/serving/test_shielded_serving.py;
  the masked protocol equals the fixed-point specification bit for bit,
  tests/shielded/test_executor.py).  Here the prompts of a model decode together, one engine step
  per token as vLLM batches them; a row's logits then differ from the same row decoded alone only by
  the float32 rounding of the secret term W_C x (measured <= 4.8e-7, test_executor.py), and a greedy
  token flipped by that would count as a divergence here;
* stock vLLM float32 == float32 Hugging Face transformers, greedy, token for token (the protected
  ``split`` model served by vLLM equals stock vLLM, tests/serving/test_split_serving.py, and
  equals transformers on the original weights,
  tests/serving/test_embeddings_and_startup.py::test_offline_llm_api_matches_transformers);
so the agreement of the fixed-point executor with transformers' greedy tokens is the agreement of
the served shielded model with stock vLLM, measured here without starting servers.

Greedy on the transformers side is the argmax of the float32 logits at every step, with no logits
processors: the tiny models' EOS is token 0, and ``generate(min_new_tokens=...)`` would mask it
where vLLM (``ignore_eos``) does not.  Agreement counts, per prompt, the generated tokens before the
first divergence, over 5 prompts x 24 tokens per model.

Models: a random-init model of every family protocol ``shielded`` serves (llama, mistral, qwen2
with its non-zero random q/k/v biases, qwen3 with q/k norms), hidden 288, so the MLP's down
projection has n = 576 > 514 and the 16-bit prime is above 2^40 (6 limbs: the wide-prime path of
``field`` is what serves them); and the TINY reference LM of the evaluation (trained, cached).
Measured (this box, 2026-12-01; p of 41 bits for the random models, 39 for the reference): 16 bits
120/120 tokens on every model; 8 bits, same prompts and models (``_agreement(..., bits=8)``):
llama 59/120, mistral 59/120 (the tiny mistral without a window is llama's twin), qwen2 62/120,
qwen3 39/120, the reference LM 120/120 -- int8 public weights lose about half the greedy tokens
of random-init models (issue 12: 35-38 % on another model), which is why ``slip protect``
defaults to ``--weight-bits 16``.  Asserted: >= 99 % per model at 16 bits.

The last test takes a 16-bit artifact with a prime above 2^40 end to end without servers: protect,
the host's loader, the masked protocol from the bundle == the fixed-point specification, Freivalds.
Cost on this 2-core box at load average 8-11 (other jobs): about 77 s for the agreement tests and
50 s for the end-to-end one, most of it imports, model making and the executor's start-up probe.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from secure_service.shielded_executor import ShieldedExecutor
from slip_vllm.core.decompose import RankPolicy
from slip_vllm.protect.tiny_models import make_tiny_model

NEW_TOKENS, PROMPTS, PROMPT_LEN = 24, 5, 8
MIN_AGREEMENT = 0.99
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # shielded_executor's families


def _hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Argmax of the float32 logits, n steps (a full forward each step: the sequences are short);
    prompts of one length run as one batch."""
    out = []
    with torch.no_grad():
        for length in sorted({len(p) for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            toks = torch.tensor([prompts[i] for i in idx])
            for _ in range(n):
                toks = torch.cat([toks, model(toks).logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
            out += [(i, toks[j, length:].tolist()) for j, i in enumerate(idx)]
    return [t for _, t in sorted(out)]


def _executor_greedy(ex: ShieldedExecutor, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy decoding of all prompts together: one prefill step, then one step per token with a
    row per sequence; sequence i owns KV blocks [i*B, (i+1)*B)."""
    bs = ex.cache.block_size
    blocks = max(-(-(len(p) + n) // bs) for p in prompts)
    tables = torch.stack([torch.arange(i * blocks, (i + 1) * blocks) for i in range(len(prompts))])
    seqs = [list(p) for p in prompts]

    def run(rows):  # rows: [(sequence, first new position)]
        ids, pos, qsl, lens = [], [], [0], []
        for i, start in rows:
            ids += seqs[i][start:]
            pos += list(range(start, len(seqs[i])))
            qsl.append(len(ids))
            lens.append(len(seqs[i]))
        pos_t = torch.tensor(pos)
        seq_of = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(qsl).diff())
        slots = tables[seq_of, pos_t // bs] * bs + pos_t % bs
        logits = ex.step(torch.tensor(ids), pos_t, slots, torch.tensor(qsl), torch.tensor(lens), tables)
        for i, row in zip(range(len(seqs)), logits):
            seqs[i].append(int(row.argmax()))

    run([(i, 0) for i in range(len(seqs))])
    for _ in range(n - 1):
        run([(i, len(s) - 1) for i, s in enumerate(seqs)])
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def _until_divergence(a: list[int], b: list[int]) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def _agreement(model_dir: Path, prompts: list[list[int]], bits: int = 16):
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ex = ShieldedExecutor.from_checkpoint(model_dir, RankPolicy(fraction=0.125), seed=11, num_blocks=32,
                                          block_size=8, mode="fixed_point", weight_bits=bits, pool_rows=0)
    try:
        got = _executor_greedy(ex, prompts, NEW_TOKENS)
        p_bits = int(ex.p).bit_length()
    finally:
        ex.close()
    ref = _hf_greedy(hf, prompts, NEW_TOKENS)
    per_prompt = [_until_divergence(a, b) for a, b in zip(got, ref)]
    return sum(per_prompt) / (NEW_TOKENS * len(prompts)), per_prompt, p_bits


@pytest.mark.parametrize("family", FAMILIES)
def test_16_bit_weights_keep_greedy_tokens_on_random_models(tmp_path, family):
    torch.set_num_threads(1)
    import transformers as tf

    model_dir = make_tiny_model(family, tmp_path / family, hidden=288, layers=2, seed=3)
    vocab = tf.AutoConfig.from_pretrained(model_dir).vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(PROMPTS)]
    agree, per_prompt, p_bits = _agreement(model_dir, prompts)
    print(f"{family}: 16-bit greedy agreement {agree:.4f} {per_prompt} (p: {p_bits} bits)")
    assert p_bits > 40  # the 6-limb path serves these models
    assert agree >= MIN_AGREEMENT, per_prompt


def test_16_bit_weights_keep_greedy_tokens_on_the_reference_model():
    import transformers as tf

    from slip_vllm.evaluation import reference_model as rm

    torch.set_num_threads(1)
    model_dir = Path(rm.get_reference_model(config=rm.TINY, progress=False))
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    texts = ["def __init__(self, ", "import os\nimport sys\n", "    for i in range(", "class Error(Exception):",
             "        return self."]
    prompts = [tok(t).input_ids for t in texts]
    assert len(prompts) == PROMPTS and all(prompts)
    agree, per_prompt, p_bits = _agreement(model_dir, prompts)
    print(f"reference (tiny): 16-bit greedy agreement {agree:.4f} {per_prompt} (p: {p_bits} bits)")
    assert agree >= MIN_AGREEMENT, per_prompt


def test_16_bit_artifact_end_to_end_with_a_wide_prime(tmp_path):
    """``slip protect --weight-bits 16`` on a model whose 16-bit prime exceeds 2^40: OUT/public
    holds int16 W_q and that p; the host's loader reads them (``FieldWeight`` over the int16
    planes); the service's executor from the bundle runs the masked protocol (masks, Freivalds
    with the wide-prime limbs, unmasking) against that host and equals the fixed-point
    specification bit for bit; a tampered answer is still caught."""
    from safetensors import safe_open

    from secure_service.integrity import IntegrityError
    from slip_vllm.host.shielded_client import load_public_weights
    from slip_vllm.protect.artifact import ProtectConfig, protect
    from test_executor import _run, _scenario

    model_dir = make_tiny_model("qwen2", tmp_path / "qwen2", hidden=288, layers=1, seed=3)
    out = tmp_path / "out"
    protect(model_dir, out, ProtectConfig(protocol="shielded", default_rank=RankPolicy(absolute=8), seed=7),
            progress=False)
    public = load_public_weights(out / "public")
    assert public.manifest.extra["weight_bits"] == 16 and 2**40 < public.p < 2**48
    with safe_open(str(out / "public" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.int16 for k in f.keys())
    assert all(w.bits == 16 and w.L == 6 for w in public.weights.values())

    kw = dict(num_blocks=16, block_size=4, pool_rows=0)
    sh = ShieldedExecutor.from_bundle(out / "secret", mode="shielded", **kw)
    fx = ShieldedExecutor.from_bundle(out / "secret", mode="fixed_point", **kw)
    assert sh.p == fx.p == public.p
    calls = []

    def host(key, x_masked, tamper=None):  # the host's own weights and GEMM (field_matmul on FieldWeight)
        calls.append(key)
        y = public.weights[key].matmul(x_masked)
        if key == tamper:
            y = y.clone()
            y[0, 0] = (y[0, 0] + 1) % public.p
        return y

    seqs, steps = _scenario(sh.vocab, seed=4)
    got, want = _run(sh, steps[:3], host), _run(fx, steps[:3])
    assert len(calls) == 3 * (4 * sh.num_layers + 1)
    for (sid, j, a), (_, _, b) in zip(got, want):
        assert torch.equal(a, b), (sid, j)
    with pytest.raises(IntegrityError):
        _run(sh, steps[3:4], lambda k, x: host(k, x, tamper="layers.0.down"))
    sh.close()
    fx.close()
