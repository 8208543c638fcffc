"""The attack grid at two scales: every published artifact against the artifact-free floors (SLIP-SEC's safety).

Issue 11 asks whether the published artifacts are worth more to an attacker than black-box access
(SLIP-SEC's safety), at two scales. This module runs one grid at any scale: preset ``cpu`` (0.9 M
parameters, 1.5 M training bytes: the whole grid in under an hour on the 2-core development machine)
and preset ``mid`` (39 M parameters, 30 M training bytes, on one H200). The CPU report
(:mod:`~slip_vllm.evaluation.report`) keeps its 5 M-parameter BPE model for quality and the traffic
audits; its section 5 is this grid, spliced in from the results files. It is device-agnostic
(bf16 autocast on CUDA, float32 on the CPU) and self-contained: a pure-torch Llama (RMSNorm, RoPE,
SwiGLU, fused qkv and gate_up exactly like the five public GEMMs of ``shielded``), so it needs torch
and numpy only, not transformers or vLLM. The artifacts are built from the core functions the vendor
tooling uses (``core.decompose.split_matrix``, ``core.quantize.quantize_weight``,
``core.lock.make_lock``), never from service objects.

Data (``corpus.build_code_corpus``, built on the development machine, carried as one xz file):
byte-level tokens (vocabulary 256, byte 0 separates files) over the sorted ``.py`` files of the
interpreter's stdlib and the project's virtual environment; digest in the results.

Models. ``base``: trained from scratch on the ``site-packages/`` files of the training stream (the
*public base model* of the public-prior scenario). ``reference`` (the vendor's private model, the one
protected): ``base`` fine-tuned on the whole training stream (stdlib included). Budgets are fractions
of the reference's training tokens (base + fine-tune); every attacker trains on the reference's own
training stream (in-distribution: an upper bound for a real attacker).

What the host receives, per artifact (built from the reference at rank fraction 1/8, blinding on):

* ``split``: the public residual W_D of every matrix (q, k, v, o, gate, up, down, embedding, LM head)
  and the norm gains (public in ``split``);
* ``shielded``: the ``W_q`` (``weight_bits`` of the preset: 16, the shipped default, for ``cpu``; 8 in
  the committed ``mid`` runs) of the five GEMMs per layer class (qkv, o, gate_up, down, LM head),
  no per-row scales, no norms, no embedding (untied model);
* ``shielded+perm`` / ``shielded+block:32``: the same with the secret per-GEMM lock applied before
  quantization (``W' = M_out W_D M_in``, ``core.lock``).

Black-box access (everyone): the text it sends and the logits returned: full logits, or the top-K
(K = 20) per position under a top-K policy.

Attacks (each is trained with a small learning-rate sweep; the best is reported):

* floors, no artifact: ``scratch`` (random init, next-token loss), ``distill`` (random init, KL to
  the teacher's full distribution), ``distill-top20`` (random init, KL to the renormalised top-20),
  ``distill-relink`` (random init with the relinking parametrisation below: the floor of the relink
  attacks, so that a gain from the extra parameters alone is not credited to the artifact);
* public-prior floor: ``base-distill`` (the public base model fine-tuned with full-logit distillation);
* ``split-ft``: the split residual model fine-tuned (all parameters) with full-logit distillation;
* ``shielded-ft``: every GEMM initialised from its ``W_q`` times one per-matrix constant (matching the
  initialisation's RMS), a learnable per-output-row scale (the secret scales are unknown), random
  embedding, unit norms; all parameters trained with full-logit distillation;
* ``<lock>-ft``: as ``shielded-ft`` on the locked weights;
* ``shielded-ft-top20`` / ``<lock>-ft-top20`` (the artifacts in ``topk_artifacts``): as ``-ft`` but the
  distillation reads only the top-20 logits, which is all the host receives under the shipped top-K
  logits policy; judged in the ``top-20`` scenario against the floors that need no more (``scratch``,
  ``distill-top20``);
* ``<lock>-relink``: as ``<lock>-ft`` plus learnable relinking matrices on both sides of every GEMM
  (effective weight A W B, A and B initialised to the identity, trained with everything else): the
  attacker's way to learn the secret transforms back;
* public prior (attacker holds ``base``): the attacker first splits the base itself with the public
  algorithm and its own randomness (``base_residuals``); ``shielded-prior`` (the unlocked ``W_q`` with
  the base's embedding and norms and the row scales of the base's residual as the guess of the secret
  ones) and ``<lock>-align`` (each locked GEMM first aligned to the base's residual GEMM: output and
  input permutations found by Hungarian matching of per-row / per-column signatures, scipy's
  ``linear_sum_assignment``; then as ``shielded-prior``). Both are compared with the public-prior floor
  too. (The committed ``mid`` runs predate this: they aligned to the base's whole GEMM and took its
  row scales, a weaker form.)

Verdict per artifact and budget (SLIP-SEC's rule, the issue's 0.95 factor): the artifact HOLDS when
the best attack that uses it reaches a perplexity >= 0.95 x the best artifact-free attack at the same
budget (in the public-prior scenario the floor includes ``base-distill``). The recommendation is the
artifact that holds at every budget, or the strongest (largest worst-case ratio) with its gap.

Learning-rate sweep: every attack runs every rate of ``lr_grid`` at the budgets ``sweep_budgets``; at
the other budgets (the largest, 30 %) it runs only the best rate of the largest swept budget below.
Small budgets shrink the batch so that every run takes at least ``min_steps`` optimizer steps. The
grid runs budget by budget (every attack at 0.1 %, then every attack at 1 %, ...), so a run stopped
at its limit has complete small budgets.

Results are written after every row (``--out``), so a run stopped at its time limit keeps what it
measured, and ``--resume`` skips rows already in the file (same reference weights hash required).

CLI (on the GPU machine; the documented command is in docs/SECURITY_EVAL.md)::

    python -m slip_vllm.evaluation.gpu_scale run --corpus .cache/gpu_corpus --preset mid --out OUT.json
    python -m slip_vllm.evaluation.gpu_scale render --results docs/security_eval/gpu_scale.json \\
        --report docs/SECURITY_EVAL.md
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slip_vllm.core import decompose as dec
from slip_vllm.core.quantize import quantize_weight

HOLD_FACTOR = 0.95
TOP_K = 20
VOCAB = 256
MARK_BEGIN = "<!-- gpu-scale:begin -->"
MARK_END = "<!-- gpu-scale:end -->"


@dataclass(frozen=True)
class ScaleConfig:
    name: str
    hidden: int
    layers: int
    heads: int
    inter: int
    seq_len: int = 512
    batch: int = 128                 # sequences per optimizer step (shrunk for small budgets)
    base_tokens: int = 24_000_000
    finetune_tokens: int = 6_000_000
    lr: float = 2e-3                 # reference / base training
    finetune_lr: float = 6e-4
    warmup: float = 0.03
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    rank_fraction: float = 0.125
    budgets: tuple[float, ...] = (0.001, 0.01, 0.1, 0.3)
    sweep_budgets: tuple[float, ...] = (0.001, 0.01, 0.1)
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    min_steps: int = 16
    eval_tokens: int = 1_048_576
    locks: tuple[str, ...] = ("perm", "block:32")
    weight_bits: int = 8             # of the shielded W_q (the committed runs: 8; `slip protect`'s default is 16)
    # artifacts also attacked with top-K distillation only (what the host gets under the shipped top-K policy)
    topk_artifacts: tuple[str, ...] = ()
    seed: int = 0

    @property
    def reference_tokens(self) -> int:
        return self.base_tokens + self.finetune_tokens


PRESETS = {
    # ~39 M parameters: the GPU scale.
    "mid": ScaleConfig("mid", hidden=640, layers=8, heads=10, inter=1664),
    # ~3.4 M parameters: the small scale, same grid (comparable with the CPU report's 5 M model).
    "small": ScaleConfig("small", hidden=256, layers=4, heads=4, inter=688, base_tokens=8_000_000,
                         finetune_tokens=2_000_000, lr=3e-3, finetune_lr=1e-3, lr_grid=(1e-3, 3e-3)),
    # The CPU scale: the same grid, sized to run whole on the 2-core development machine (48.5 min
    # measured); it attacks the shipped defaults (16-bit W_q; top-20 rows for the shielded artifacts).
    "cpu": ScaleConfig("cpu", hidden=128, layers=4, heads=4, inter=344, seq_len=256, batch=32,
                       base_tokens=1_200_000, finetune_tokens=300_000, lr=3e-3, finetune_lr=1e-3,
                       lr_grid=(1e-3, 3e-3, 1e-2), min_steps=16, eval_tokens=32_768, weight_bits=16,
                       topk_artifacts=("shielded", "shielded+block:32")),
    # seconds on one CPU core: tests only.
    "tiny": ScaleConfig("tiny", hidden=64, layers=2, heads=2, inter=160, seq_len=64, batch=8, base_tokens=24_576,
                        finetune_tokens=8_192, lr=5e-3, finetune_lr=2e-3, lr_grid=(3e-3,), min_steps=2,
                        eval_tokens=4096, locks=("perm",)),
}


# --------------------------------------------------------------------------------------------------
# model


class RMSNorm(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.weight.to(x.dtype)


class Gemm(torch.nn.Module):
    """y = x W^T with optional learnable per-row scale s (W -> diag(s) W) and relinking (W -> A W B)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n_out, n_in))
        self.row_scale = None
        self.relink_out = None
        self.relink_in = None

    def enable_row_scale(self, init: torch.Tensor) -> None:
        self.row_scale = torch.nn.Parameter(init.to(self.weight.device, torch.float32).clone())

    def enable_relink(self) -> None:
        m, n = self.weight.shape
        dev = self.weight.device
        self.relink_out = torch.nn.Parameter(torch.eye(m, device=dev))
        self.relink_in = torch.nn.Parameter(torch.eye(n, device=dev))

    def effective_weight(self):
        w = self.weight
        if self.row_scale is not None:
            w = w * self.row_scale[:, None]
        if self.relink_out is not None:
            w = self.relink_out @ w @ self.relink_in
        return w

    def forward(self, x):
        return F.linear(x, self.effective_weight())


def _rope(seq_len: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(torch.nn.Module):
    def __init__(self, c: ScaleConfig):
        super().__init__()
        self.heads = c.heads
        self.input_norm = RMSNorm(c.hidden)
        self.qkv = Gemm(c.hidden, 3 * c.hidden)
        self.o = Gemm(c.hidden, c.hidden)
        self.post_norm = RMSNorm(c.hidden)
        self.gate_up = Gemm(c.hidden, 2 * c.inter)
        self.down = Gemm(c.inter, c.hidden)

    def forward(self, x, cos, sin):
        b, t, h = x.shape
        q, k, v = self.qkv(self.input_norm(x)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, cos[:t], sin[:t]).to(v.dtype), _rotate(k, cos[:t], sin[:t]).to(v.dtype)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
        x = x + self.o(a)
        g, u = self.gate_up(self.post_norm(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


class ByteLlama(torch.nn.Module):
    """Llama-style decoder over bytes, untied embedding and LM head. GEMM names follow ``shielded``."""

    def __init__(self, c: ScaleConfig):
        super().__init__()
        self.cfg = c
        self.embed = torch.nn.Embedding(VOCAB, c.hidden)
        self.layers = torch.nn.ModuleList([Block(c) for _ in range(c.layers)])
        self.norm = RMSNorm(c.hidden)
        self.lm_head = Gemm(c.hidden, VOCAB)
        self._rope = None

    def gemms(self) -> dict[str, Gemm]:
        out = {}
        for i, blk in enumerate(self.layers):
            for key in ("qkv", "o", "gate_up", "down"):
                out[f"layers.{i}.{key}"] = getattr(blk, key)
        out["lm_head"] = self.lm_head
        return out

    def norms(self) -> dict[str, RMSNorm]:
        out = {"norm": self.norm}
        for i, blk in enumerate(self.layers):
            out[f"layers.{i}.input_norm"] = blk.input_norm
            out[f"layers.{i}.post_norm"] = blk.post_norm
        return out

    def forward(self, ids):
        t = ids.shape[1]
        if self._rope is None or self._rope[0].shape[0] < t or self._rope[0].device != ids.device:
            self._rope = _rope(max(t, self.cfg.seq_len), self.cfg.hidden // self.cfg.heads, ids.device)
        cos, sin = self._rope
        x = self.embed(ids)
        for blk in self.layers:
            x = blk(x, cos, sin)
        return self.lm_head(self.norm(x))


INIT_STD = 0.02


def make_model(c: ScaleConfig, seed: int, device) -> ByteLlama:
    torch.manual_seed(seed)
    m = ByteLlama(c)
    with torch.no_grad():
        torch.nn.init.normal_(m.embed.weight, std=INIT_STD)
        for name, g in m.gemms().items():
            std = INIT_STD / math.sqrt(2 * c.layers) if name.endswith((".o", ".down")) else INIT_STD
            torch.nn.init.normal_(g.weight, std=std)
    return m.to(device)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{k}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# training and scoring


def _autocast(device):
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


@dataclass
class TrainLog:
    tokens: int
    steps: int
    batch: int
    final_loss: float
    seconds: float


def train(model: ByteLlama, data: torch.Tensor, n_tokens: int, *, lr: float, c: ScaleConfig, seed: int,
          objective: str = "ce", teacher: ByteLlama | None = None, top_k: int | None = None,
          extra_no_decay: tuple = ()) -> TrainLog:
    """AdamW (warm-up, cosine to min_lr_ratio), grad clip 1, random windows of ``data`` from ``seed``.

    ``objective``: ``ce`` (next-token loss on the text) or ``kd`` (cross-entropy against the teacher's
    distribution over the whole vocabulary, or over its top-``top_k`` logits renormalised, i.e. what
    a top-K logits policy returns; no hard labels).
    """
    device = data.device
    n_seq = max(1, n_tokens // c.seq_len)
    batch = max(1, min(c.batch, n_seq // c.min_steps))
    steps = math.ceil(n_seq / batch)
    rng = np.random.default_rng([seed, 0x6A5])
    starts = torch.from_numpy(rng.integers(0, data.numel() - c.seq_len - 1, size=n_seq)).to(device)
    offs = torch.arange(c.seq_len + 1, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    no_decay_ids = {id(p) for p in extra_no_decay}
    decay = [p for p in params if p.ndim >= 2 and id(p) not in no_decay_ids]
    rest = [p for p in params if p.ndim < 2 or id(p) in no_decay_ids]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    warm = max(1, round(c.warmup * steps))

    def mult(s):
        if s < warm:
            return (s + 1) / warm
        t = (s - warm) / max(1, steps - warm)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, mult)
    model.train()
    if teacher is not None:
        teacher.eval()
    t0 = time.perf_counter()
    losses = []
    for s in range(steps):
        idx = starts[s * batch:(s + 1) * batch]
        win = data[idx[:, None] + offs[None]].long()
        x, y = win[:, :-1], win[:, 1:]
        with _autocast(device):
            logits = model(x)
            if objective == "ce":
                loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
            else:
                with torch.no_grad():
                    tl = teacher(x).float()
                logp = torch.log_softmax(logits.float(), -1)
                if top_k is None:
                    loss = -(torch.softmax(tl, -1) * logp).sum(-1).mean()
                else:
                    top = tl.topk(top_k, -1)
                    loss = -(torch.softmax(top.values, -1) * logp.gather(-1, top.indices)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if s % 8 == 0 or s == steps - 1:
            losses.append(float(loss.detach()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.eval()
    fl = losses[-1] if losses else float("nan")
    if not math.isfinite(fl):
        raise FloatingPointError("non-finite training loss")
    return TrainLog(tokens=n_seq * c.seq_len, steps=steps, batch=batch, final_loss=fl, seconds=time.perf_counter() - t0)


@torch.no_grad()
def perplexity(model: ByteLlama, val: torch.Tensor, c: ScaleConfig, batch: int = 64) -> float:
    """exp(mean next-byte NLL) over whole windows spread evenly over the validation stream."""
    n_win = max(1, min(c.eval_tokens, val.numel() - 1) // c.seq_len)
    starts = torch.linspace(0, val.numel() - c.seq_len - 2, n_win).long().to(val.device)
    offs = torch.arange(c.seq_len + 1, device=val.device)
    model.eval()
    tot, cnt = 0.0, 0
    for i in range(0, n_win, batch):
        win = val[starts[i:i + batch, None] + offs[None]].long()
        with _autocast(val.device):
            logits = model(win[:, :-1]).float()
        tot += float(F.cross_entropy(logits.reshape(-1, VOCAB), win[:, 1:].reshape(-1), reduction="sum"))
        cnt += win[:, 1:].numel()
    return math.exp(tot / cnt)


# --------------------------------------------------------------------------------------------------
# artifacts, from the core functions


def _blinding_rng(seed: int):
    if hasattr(dec, "BlindingRng"):
        return dec.BlindingRng.from_seed(seed)
    return torch.Generator().manual_seed(seed)


def _fused_parts(model: ByteLlama) -> dict[str, list[torch.Tensor]]:
    """GEMM key -> its original matrices (q, k, v / gate, up), [out, in], float32 on the CPU."""
    out = {}
    h, inter = model.cfg.hidden, model.cfg.inter
    for key, g in model.gemms().items():
        w = g.weight.detach().float().cpu()
        if key.endswith(".qkv"):
            out[key] = list(w.split(h, 0))
        elif key.endswith(".gate_up"):
            out[key] = list(w.split(inter, 0))
        else:
            out[key] = [w]
    return out


@dataclass
class Artifacts:
    split_state: dict[str, torch.Tensor]          # the split public dir: residuals + norms
    shielded_wq: dict[str, dict[str, torch.Tensor]]  # lock name ("none", "perm", ...) -> GEMM key -> int8 W_q
    ranks: dict[str, int]
    max_rel_error: float
    seconds: float
    aligned: dict = field(default_factory=dict)   # lock -> (aligned W_q per GEMM, match quality)
    base_residual: dict = field(default_factory=dict)  # the attacker's own split of the public base, per GEMM


def build_artifacts(reference: ByteLlama, c: ScaleConfig, seed: int) -> Artifacts:
    """Split every matrix (blinded, rank fraction), quantize the fused residuals to int8, lock them."""
    from slip_vllm.core.lock import make_lock, parse_lock

    t0 = time.perf_counter()
    policy = dec.RankPolicy(fraction=c.rank_fraction)
    rng = _blinding_rng(0x6B5C + seed)
    ranks, max_err = {}, 0.0
    residual: dict[str, torch.Tensor] = {}
    for key, parts in _fused_parts(reference).items():
        pubs = []
        for j, w in enumerate(parts):
            sm = dec.split_matrix(w, policy, rng)
            ranks[f"{key}[{j}]"] = sm.rank
            max_err = max(max_err, sm.relative_error)
            pubs.append(sm.public)
        residual[key] = torch.cat(pubs, 0)
    emb = dec.split_matrix(reference.embed.weight.detach().float().cpu(), policy, rng)
    ranks["embed"] = emb.rank
    split_state = {}
    ref_sd = {k: v.detach().float().cpu() for k, v in reference.state_dict().items()}
    for k, v in ref_sd.items():
        split_state[k] = v.clone()
    split_state["embed.weight"] = emb.public
    for key, w in residual.items():
        split_state[_state_key(key)] = w
    shielded = {"none": {k: quantize_weight(w, c.weight_bits).w_q for k, w in residual.items()}}
    for spec_text in c.locks:
        spec = parse_lock(spec_text)
        locked = {}
        for key, w in residual.items():
            lock = make_lock(w.shape[0], w.shape[1], spec.kind, spec.block,
                             hashlib.sha256(f"eval-lock|{seed}|{key}".encode()).digest())
            locked[key] = quantize_weight(lock.lock_weight(w.double()).float(), c.weight_bits).w_q
        shielded[spec_text] = locked
    return Artifacts(split_state, shielded, ranks, max_err, time.perf_counter() - t0)


def _state_key(gemm_key: str) -> str:
    return "lm_head.weight" if gemm_key == "lm_head" else f"{gemm_key}.weight"


# --------------------------------------------------------------------------------------------------
# attacker initialisations


def _init_from_wq(model: ByteLlama, wq: dict[str, torch.Tensor], row_scales: dict[str, torch.Tensor] | None) -> None:
    """GEMM weights = W_q times a constant per matrix; a learnable row scale (the base's guess, or 1)."""
    with torch.no_grad():
        for key, g in model.gemms().items():
            w = wq[key].to(torch.float32)
            if row_scales is not None:   # W_q diag(s) as (W_q * mean s) * (s / mean s): same product, both
                mean = row_scales[key].float().mean().clamp_min(1e-30)   # factors in Adam's working range
                g.weight.copy_((w * mean).to(g.weight.device))
                g.enable_row_scale(row_scales[key].float() / mean)
            else:
                target = INIT_STD / math.sqrt(2 * model.cfg.layers) if key.endswith((".o", ".down")) else INIT_STD
                g.weight.copy_((w * (target / w.pow(2).mean().sqrt().clamp_min(1e-12))).to(g.weight.device))
                g.enable_row_scale(torch.ones(w.shape[0]))


def _copy_public_prior(model: ByteLlama, base: ByteLlama) -> None:
    """The base's embedding and norm gains (the base model is public in this scenario)."""
    with torch.no_grad():
        model.embed.weight.copy_(base.embed.weight)
        bn = base.norms()
        for name, n in model.norms().items():
            n.weight.copy_(bn[name].weight)


def base_residuals(base: ByteLlama, c: ScaleConfig, seed: int) -> dict[str, torch.Tensor]:
    """The public-prior attacker's own ``split`` of the base model (the public algorithm, its own randomness).

    The locked / quantized GEMMs of the artifact are residuals, not whole matrices: the base's residual,
    not the base's whole GEMM, is what they should resemble if the fine-tune moved the weights little.
    """
    policy = dec.RankPolicy(fraction=c.rank_fraction)
    rng = _blinding_rng(0xA77AC + seed)
    return {key: torch.cat([dec.split_matrix(w, policy, rng).public for w in parts], 0)
            for key, parts in _fused_parts(base).items()}


def base_row_scales(residuals: dict[str, torch.Tensor], bits: int = 8) -> dict[str, torch.Tensor]:
    """Per-row quantization scales of the base's residuals: the attacker's guess of the secret scales."""
    qmax = 2 ** (bits - 1) - 1
    return {k: w.float().abs().amax(1) / qmax for k, w in residuals.items()}


def _signature_rows(w: torch.Tensor) -> torch.Tensor:
    """Row signature invariant to a permutation of the columns and to a positive row scale."""
    s = torch.sort(w, dim=1).values
    return s / s.abs().amax(1, keepdim=True).clamp_min(1e-12)


def align_to_base(wq: torch.Tensor, w_base: torch.Tensor, rounds: int = 2) -> tuple[torch.Tensor, dict]:
    """Undo a permutation lock by matching the locked W_q to the base's GEMM (public-prior alignment).

    1. rows: Hungarian matching of column-permutation-invariant row signatures (sorted, max-normalised);
    2. columns: with rows matched, Hungarian matching of the columns' correlation with the base's;
    3. repeat the row step on the column-aligned matrix (now a direct correlation) ``rounds`` times.
    Returns W_q with rows and columns reordered into the base's order, and the match quality.
    """
    from scipy.optimize import linear_sum_assignment

    a = wq.double()
    b = w_base.double()
    sa, sb = _signature_rows(a), _signature_rows(b)
    cost = torch.cdist(sa, sb)
    r_ind, c_ind = linear_sum_assignment(cost.numpy())
    row_of = torch.empty(a.shape[0], dtype=torch.long)
    row_of[torch.as_tensor(c_ind)] = torch.as_tensor(r_ind)   # base row j <- locked row row_of[j]
    col_of = torch.arange(a.shape[1])
    for _ in range(rounds):
        ar = a[row_of]
        an = (ar - ar.mean(0)) / ar.std(0).clamp_min(1e-12)
        bn = (b - b.mean(0)) / b.std(0).clamp_min(1e-12)
        r, cidx = linear_sum_assignment((-(an.T @ bn)).numpy())    # locked column r[i] <-> base column cidx[i]
        col_of = torch.empty(a.shape[1], dtype=torch.long)
        col_of[torch.as_tensor(cidx)] = torch.as_tensor(r)
        ac = a[:, col_of]
        ar_n = ac / ac.norm(dim=1, keepdim=True).clamp_min(1e-12)
        br_n = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
        r2, c2 = linear_sum_assignment((-(ar_n @ br_n.T)).numpy())
        row_of = torch.empty(a.shape[0], dtype=torch.long)
        row_of[torch.as_tensor(c2)] = torch.as_tensor(r2)
    out = a[row_of][:, col_of]
    corr = float(F.cosine_similarity(out, b, dim=1).mean())   # per row: the secret row scales do not matter
    return out.to(torch.float32), {"cosine_to_base": corr}


# --------------------------------------------------------------------------------------------------
# the grid


FLOOR_ATTACKS = ("scratch", "distill", "distill-relink", f"distill-top{TOP_K}")
TOPK_SCENARIO = f"top-{TOP_K}"   # black-box access limited to the top-K logits (the shipped shielded policy)
TOPK_FLOORS = ("scratch", f"distill-top{TOP_K}")   # the artifact-free attacks that need no more than that
PRIOR_FLOOR = "base-distill"
PRIOR_FLOORS = (PRIOR_FLOOR, "base-only")


@dataclass
class Row:
    attack: str
    artifact: str          # "none" for floors, "split", "shielded", "shielded+perm", ...
    scenario: str          # "black-box", "public-prior" or TOPK_SCENARIO (black-box, top-K logits only)
    budget: float
    lr: float
    tokens: int
    steps: int
    batch: int
    val_ppl: float
    train_seconds: float
    note: str = ""
    wall_seconds: float = 0.0   # the whole row: attacker set-up (alignment included), training, scoring


@dataclass
class Results:
    preset: str
    config: dict
    device: str
    corpus: dict
    reference: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    command: str = ""
    complete: bool = False
    notes: list[str] = field(default_factory=list)


def attack_plan(c: ScaleConfig) -> list[tuple[str, str, str]]:
    """(attack, artifact, scenario), in the order the grid runs them (most informative first)."""
    plan = [("scratch", "none", "black-box"), ("distill", "none", "black-box"),
            ("split-ft", "split", "black-box"), ("shielded-ft", "shielded", "black-box")]
    for lk in c.locks:
        plan.append((f"{lk}-ft", f"shielded+{lk}", "black-box"))
    plan += [(PRIOR_FLOOR, "none", "public-prior"), ("shielded-prior", "shielded", "public-prior")]
    for lk in c.locks:
        plan.append((f"{lk}-align", f"shielded+{lk}", "public-prior"))
    plan.append(("distill-relink", "none", "black-box"))
    for lk in c.locks:
        plan.append((f"{lk}-relink", f"shielded+{lk}", "black-box"))
    plan.append((f"distill-top{TOP_K}", "none", "black-box"))
    for art in c.topk_artifacts:   # fine-tuning with only what the top-K policy returns
        plan.append((f"{art.split('+', 1)[1] if '+' in art else art}-ft-top{TOP_K}", art, TOPK_SCENARIO))
    return plan


def _make_attacker(attack: str, artifact: str, c: ScaleConfig, arts: Artifacts, base: ByteLlama,
                   seed: int, device) -> tuple[ByteLlama, str, list]:
    """Fresh attacker model for one run; returns (model, note, parameters exempt from weight decay)."""
    model = make_model(c, seed, device)
    extra: list = []
    if attack in ("scratch", "distill", f"distill-top{TOP_K}"):
        return model, "random initialisation", extra
    if attack == "distill-relink":  # the relinking parametrisation without the artifact: its own floor
        for g in model.gemms().values():
            g.enable_relink()
            extra += [g.relink_out, g.relink_in]
        return model, "random initialisation with learnable relinking A W B on every GEMM", extra
    if attack == PRIOR_FLOOR:
        model.load_state_dict(base.state_dict())
        return model, "the public base model", extra
    if attack == "split-ft":
        model.load_state_dict({k: v.to(device) for k, v in arts.split_state.items()})
        return model, "split public dir: residuals of every matrix + norms", extra
    lock = artifact.split("+", 1)[1] if "+" in artifact else "none"
    wq = arts.shielded_wq[lock]
    note = ""
    prior = attack in ("shielded-prior",) or attack.endswith("-align")
    if prior and not arts.base_residual:
        arts.base_residual = base_residuals(base, c, seed=0)
    if attack.endswith("-align"):
        if lock not in arts.aligned:  # the alignment uses no training data: computed once per artifact
            aligned, qual = {}, []
            for key in base.gemms():
                aligned[key], q = align_to_base(wq[key], arts.base_residual[key])
                qual.append(q["cosine_to_base"])
            arts.aligned[lock] = (aligned, qual)
        wq, qual = arts.aligned[lock]
        note = f"aligned to the base's own residual (mean row cosine after alignment {np.mean(qual):.3f}); "
    if prior:
        _init_from_wq(model, wq, base_row_scales(arts.base_residual, c.weight_bits))
        _copy_public_prior(model, base)
        note += "W_q with the row scales of the base's residual, the base's embedding and norms"
    else:
        _init_from_wq(model, wq, None)
        note += "W_q scaled per matrix, learnable row scales, random embedding, unit norms"
    if attack.endswith("-relink"):
        for g in model.gemms().values():
            g.enable_relink()
            extra += [g.relink_out, g.relink_in]
        note += "; learnable relinking A W B on every GEMM (A = B = I at start)"
    for g in model.gemms().values():
        if g.row_scale is not None:
            extra.append(g.row_scale)
    return model.to(device), note, extra


def verdicts(rows: list[dict], budgets) -> dict:
    """Best (over learning rates and attacks) per artifact and budget against the floors.

    Scenarios: ``black-box`` (floors FLOOR_ATTACKS; candidates every black-box attack, top-K ones included:
    an attacker with full logits can always drop some), ``public-prior`` (floors also the public base;
    candidates every attack), TOPK_SCENARIO (the shipped top-K policy: floors TOPK_FLOORS, candidates the
    attacks that read only the top-K logits; judged only where such attacks ran).
    """
    best: dict[tuple[str, str, float], dict] = {}
    for r in rows:
        k = (r["attack"], r["artifact"], r["budget"])
        if k not in best or r["val_ppl"] < best[k]["val_ppl"]:
            best[k] = r
    out = {}
    artifacts = sorted({r["artifact"] for r in rows if r["artifact"] != "none"})
    for b in budgets:
        floors = [v for (a, art, bb), v in best.items() if bb == b and a in FLOOR_ATTACKS]
        prior = [v for (a, art, bb), v in best.items() if bb == b and a in PRIOR_FLOORS]
        if not floors:
            continue
        floor = min(floors, key=lambda r: r["val_ppl"])
        floor_prior = min(floors + prior, key=lambda r: r["val_ppl"])
        topk_floors = [v for v in floors if v["attack"] in TOPK_FLOORS]
        floor_topk = min(topk_floors, key=lambda r: r["val_ppl"]) if topk_floors else None
        allowed = {"black-box": ("black-box", TOPK_SCENARIO), TOPK_SCENARIO: (TOPK_SCENARIO,),
                   "public-prior": ("black-box", TOPK_SCENARIO, "public-prior")}
        for art in artifacts:
            for scen, fl in (("black-box", floor), (TOPK_SCENARIO, floor_topk), ("public-prior", floor_prior)):
                cand = [v for (a, aa, bb), v in best.items() if bb == b and aa == art
                        and v["scenario"] in allowed[scen]]
                if not cand or fl is None or (scen == "public-prior" and not prior):
                    continue
                att = min(cand, key=lambda r: r["val_ppl"])
                ratio = att["val_ppl"] / fl["val_ppl"]
                out.setdefault(art, {}).setdefault(scen, {})[str(b)] = {
                    "best_attack": att["attack"], "attack_ppl": att["val_ppl"], "attack_lr": att["lr"],
                    "floor_attack": fl["attack"], "floor_ppl": fl["val_ppl"], "ratio": ratio,
                    "verdict": "holds" if ratio >= HOLD_FACTOR else "fails",
                    "attacks_run": sorted({v["attack"] for v in cand})}
    return out


def recommend(v: dict, budgets) -> dict:
    """The artifact that holds at every budget in every scenario measured, else the strongest and its gap."""
    worst = {}
    for art, scen in v.items():
        ratios = [cell["ratio"] for s in scen.values() for cell in s.values()]
        complete = all(str(b) in scen.get("black-box", {}) for b in budgets)
        if ratios:
            worst[art] = (min(ratios), complete)
    holds = [a for a, (w, complete) in worst.items() if w >= HOLD_FACTOR and complete]
    if not worst:
        return {"artifact": None, "text": "no artifact measured"}
    strongest = max(worst, key=lambda a: worst[a][0])
    if not any(complete for _, complete in worst.values()):
        held = sorted(a for a, (w, _) in worst.items() if w >= HOLD_FACTOR)
        return {"artifact": None, "holds_everywhere": None, "worst_ratio": worst[strongest][0],
                "text": (f"not decidable from this run alone (not every budget measured); at the budgets it has, "
                         f"{', '.join(held) if held else 'no artifact'} holds, the strongest is {strongest} (worst "
                         f"ratio {worst[strongest][0]:.3f})")}
    if holds:
        a = max(holds, key=lambda a: worst[a][0])
        return {"artifact": a, "holds_everywhere": True, "worst_ratio": worst[a][0],
                "text": f"{a} holds at every budget measured (worst ratio {worst[a][0]:.3f} >= {HOLD_FACTOR})"}
    return {"artifact": strongest, "holds_everywhere": False, "worst_ratio": worst[strongest][0],
            "text": (f"none holds at every budget; the strongest is {strongest} (worst ratio "
                     f"{worst[strongest][0]:.3f} < {HOLD_FACTOR}, i.e. the best attack using it reaches "
                     f"{worst[strongest][0]:.3f}x the best artifact-free perplexity)")}


def run_grid(corpus_dir: Path, c: ScaleConfig, out: Path, *, device: str, deadline_s: float | None = None,
             resume: bool = False, command: str = "", cache_dir: Path | None = None,
             only: tuple[str, ...] | None = None, attack_lr: dict[str, float] | None = None,
             budget_config: dict | None = None,
             log=lambda s: print(s, file=sys.stderr, flush=True)) -> Results:
    from slip_vllm.evaluation.corpus import load_code_corpus

    t_start = time.perf_counter()
    attack_lr = dict(attack_lr or {})
    model_cfg = c  # the models (and their cache key) depend on this; budgets and rates may be overridden
    c = dataclasses.replace(c, **(budget_config or {}))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    train_b, val_b, manifest = load_code_corpus(corpus_dir)
    train_ids = torch.frombuffer(bytearray(train_b), dtype=torch.uint8).to(dev)
    val = torch.frombuffer(bytearray(val_b), dtype=torch.uint8).to(dev)
    n_site = sum(f[2] + 1 for f in manifest["file_list"] if f[1] == "train" and f[0].startswith("site-packages/"))
    base_part = train_ids[:n_site]
    res = Results(preset=c.name, config=dataclasses.asdict(c), device=_device_name(dev),
                  corpus={k: v for k, v in manifest.items() if k != "file_list"} | {"base_part_bytes": n_site},
                  command=command)
    old_rows: list[dict] = []
    if resume and out.exists():
        old = json.loads(out.read_text())
        old_rows = old.get("rows", [])
    save = lambda: (out.parent.mkdir(parents=True, exist_ok=True), out.write_text(json.dumps(dataclasses.asdict(res), indent=1)))

    # reference models (cached per config on the machine that trains them)
    cache = (cache_dir or Path(".cache/gpu_scale")) / f"{c.name}-{hashlib.sha256(json.dumps(dataclasses.asdict(model_cfg), sort_keys=True).encode()).hexdigest()[:12]}-{manifest['digest'][:12]}"
    base = make_model(c, c.seed, dev)
    reference = make_model(c, c.seed, dev)
    t = time.perf_counter()
    if (cache / "reference.pt").exists():
        base.load_state_dict(torch.load(cache / "base.pt", map_location=dev))
        reference.load_state_dict(torch.load(cache / "reference.pt", map_location=dev))
        info = json.loads((cache / "info.json").read_text())
        log(f"reference models from {cache}")
    else:
        lb = train(base, base_part, c.base_tokens, lr=c.lr, c=c, seed=c.seed + 1)
        log(f"base: {lb.tokens:,} tokens in {lb.seconds:.1f} s ({lb.tokens / lb.seconds:,.0f} tok/s), loss {lb.final_loss:.3f}")
        reference.load_state_dict(base.state_dict())
        lf = train(reference, train_ids, c.finetune_tokens, lr=c.finetune_lr, c=c, seed=c.seed + 2)
        log(f"reference: fine-tuned {lf.tokens:,} tokens in {lf.seconds:.1f} s")
        info = {"base_train": dataclasses.asdict(lb), "finetune": dataclasses.asdict(lf)}
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), cache / "base.pt")
        torch.save(reference.state_dict(), cache / "reference.pt")
        (cache / "info.json").write_text(json.dumps(info))
    res.timings["reference"] = time.perf_counter() - t
    for p in list(base.parameters()) + list(reference.parameters()):
        p.requires_grad_(False)
    ref_ppl, base_ppl = perplexity(reference, val, c), perplexity(base, val, c)
    res.reference = {"n_params": n_params(reference), "val_ppl": ref_ppl, "base_val_ppl": base_ppl,
                     "weights_sha256": weights_sha256(reference), "base_weights_sha256": weights_sha256(base),
                     "train_tokens": c.reference_tokens, **info}
    log(f"reference ppl {ref_ppl:.3f}, base ppl {base_ppl:.3f}, {res.reference['n_params']:,} parameters")
    if old_rows and old.get("reference", {}).get("weights_sha256") == res.reference["weights_sha256"]:
        res.rows = list(old_rows)
    elif old_rows:
        res.notes.append("resume: reference weights differ from the earlier file's; its rows were not reused")
    save()

    t = time.perf_counter()
    arts = build_artifacts(reference, c, c.seed)
    res.timings["artifacts"] = time.perf_counter() - t
    res.artifacts = {"max_relative_error": arts.max_rel_error, "ranks": arts.ranks, "seconds": arts.seconds}
    for name, state in (("split", arts.split_state),):
        m = make_model(c, 0, dev)
        m.load_state_dict({k: v.to(dev) for k, v in state.items()})
        res.artifacts[f"{name}_alone_ppl"] = perplexity(m, val, c)
    arts.base_residual = base_residuals(base, c, seed=0)
    for lock, wq in arts.shielded_wq.items():
        m = make_model(c, 0, dev)
        _init_from_wq(m, wq, base_row_scales(arts.base_residual, c.weight_bits))
        _copy_public_prior(m, base)
        res.artifacts[f"shielded+{lock}_with_base_glue_ppl" if lock != "none" else "shielded_with_base_glue_ppl"] = perplexity(m, val, c)
    log(f"artifacts in {arts.seconds:.1f} s: {json.dumps({k: v for k, v in res.artifacts.items() if k != 'ranks'})}")
    save()

    if only is None or "base-only" in only:
        for b in c.budgets:
            if not any(r["attack"] == "base-only" and r["budget"] == b for r in res.rows):
                res.rows.append(dataclasses.asdict(Row("base-only", "none", "public-prior", b, 0.0, 0, 0, 0, base_ppl, 0.0,
                                                       "the public base model as is (no training)")))
    done = {(r["attack"], r["budget"], r["lr"]) for r in res.rows}
    plan = [p for p in attack_plan(c) if only is None or p[0] in only]
    stopped = False
    failed: set[str] = set()
    # Budgets outermost: a run stopped at its time limit still has every attack at the small budgets.
    for b in c.budgets:
        for attack, artifact, scenario in plan:
            if attack in attack_lr:
                lrs = (attack_lr[attack],)
            elif b in c.sweep_budgets:
                lrs = c.lr_grid
            else:  # the best rate of the largest swept budget below this one
                swept = [r for r in res.rows if r["attack"] == attack and r["budget"] in c.sweep_budgets
                         and r["budget"] < b]
                if swept:
                    top = max(r["budget"] for r in swept)
                    lrs = (min((r for r in swept if r["budget"] == top), key=lambda r: r["val_ppl"])["lr"],)
                else:
                    lrs = c.lr_grid
            for lr in lrs:
                if (attack, b, lr) in done:
                    continue
                if deadline_s is not None and time.perf_counter() - t_start > deadline_s:
                    stopped = True
                    break
                if attack in failed:
                    continue
                seed = c.seed + 1000 + int(hashlib.sha256(attack.encode()).hexdigest()[:6], 16) + int(b * 1e4)
                t_row = time.perf_counter()
                try:
                    model, note, extra = _make_attacker(attack, artifact, c, arts, base, seed, dev)
                    objective = "ce" if attack == "scratch" else "kd"
                    top_k = TOP_K if attack.endswith(f"-top{TOP_K}") else None
                    lg = train(model, train_ids, max(1, round(b * c.reference_tokens)), lr=lr, c=c, seed=seed + 1,
                               objective=objective, teacher=reference if objective == "kd" else None, top_k=top_k,
                               extra_no_decay=tuple(extra))
                    ppl = perplexity(model, val, c)
                except Exception as exc:  # noqa: BLE001 - a broken attack is reported, the grid goes on
                    failed.add(attack)
                    res.notes.append(f"{attack} failed at budget {b} lr {lr}: {type(exc).__name__}: {exc}")
                    log(f"!! {res.notes[-1]}")
                    save()
                    continue
                row = Row(attack, artifact, scenario, b, lr, lg.tokens, lg.steps, lg.batch, ppl, lg.seconds, note,
                          wall_seconds=time.perf_counter() - t_row)
                res.rows.append(dataclasses.asdict(row))
                log(f"{attack:18s} {b:6.1%} lr {lr:.0e}: ppl {ppl:8.3f}  ({lg.tokens:,} tok, {lg.steps} steps, "
                    f"{lg.seconds:.1f} s, {lg.tokens / max(lg.seconds, 1e-9):,.0f} tok/s)")
                del model
                save()
            if stopped:
                break
        if stopped:
            break
    res.complete = not stopped
    if only is not None:
        res.notes.append("only these attacks were run: " + ", ".join(only))
    if stopped:
        res.notes.append(f"stopped at the time limit ({deadline_s:.0f} s) before every row was run")
    v = verdicts(res.rows, c.budgets)
    res.timings["total"] = time.perf_counter() - t_start
    out_d = dataclasses.asdict(res)
    out_d["verdicts"] = v
    out_d["recommendation"] = recommend(v, c.budgets)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(out_d, indent=1))
    return res


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "cpu"


# --------------------------------------------------------------------------------------------------
# rendering (markdown section spliced into docs/SECURITY_EVAL.md between markers)


def render_section(results: list[dict]) -> str:
    L = [MARK_BEGIN, "## 5. The attack grid at two scales: every artifact attacked as published\n"]
    L.append("Generated by `python -m slip_vllm.evaluation.gpu_scale render` from the results files named below "
             "(do not edit by hand); the runs are `python -m slip_vllm.evaluation.gpu_scale run`, preset `cpu` on "
             "the 2-core development machine and preset `mid` on one NVIDIA H200 (command and device per file). "
             "Method: `slip_vllm/evaluation/gpu_scale.py` (module docstring). Rule: an "
             f"artifact **holds** at a budget when the best attack that uses it (best learning rate) reaches a "
             f"perplexity >= {HOLD_FACTOR} x the best artifact-free attack at the same budget; in the "
             "public-prior scenario the floor also includes the public base model as is and fine-tuned by distillation.\n")
    L.append("To regenerate: (1) on the development machine `python -m slip_vllm.evaluation.corpus --out "
             ".cache/gpu_corpus` (the corpus, 10.5 MB of xz, carried to the GPU machine); (2) the CPU scale, here: "
             "`python -m slip_vllm.evaluation.gpu_scale run --corpus .cache/gpu_corpus --preset cpu --out "
             "docs/security_eval/gpu_scale_cpu.json` (about 50 min on 2 cores); (3) the GPU scale, on the GPU "
             "machine: `python -m slip_vllm.evaluation.gpu_scale run --corpus .cache/gpu_corpus --preset mid --out "
             "docs/security_eval/gpu_scale_mid.json` (the whole grid; about 15 min on one H200; each committed file "
             "names the exact command of its part); (4) here `python -m slip_vllm.evaluation.gpu_scale render "
             "--results docs/security_eval/gpu_scale_*.json --report docs/SECURITY_EVAL.md` (also refreshes the "
             "grid's keys of `security_eval/results.json`; the CPU report splices the same files back in whenever "
             "it is regenerated).\n")
    for r in results:
        r = finish_results(r)
        c = r["config"]
        ref = r["reference"]
        L.append(f"### Preset `{r['preset']}`, budgets {', '.join(f'{100 * b:g} %' for b in c['budgets'])}: "
                 f"{ref['n_params']:,} parameters, {r['device']}\n")
        if r.get("_file"):
            L.append(f"* results: [{r['_file']}]({r['_file']})")
        L.append(f"* command: `{r.get('command', '')}`")
        corp = r["corpus"]
        L.append(f"* corpus: byte-level, {corp['train_bytes']:,} training / {corp['val_bytes']:,} validation bytes "
                 f"from {corp['files']:,} `.py` files ({corp['sources']}), digest `{corp['digest'][:16]}…`, "
                 f"xz {corp['xz_bytes']:,} bytes (`python -m slip_vllm.evaluation.corpus --out .cache/gpu_corpus`)")
        L.extend(_render_body(r))
    for preset in sorted({r["preset"] for r in results}):
        L.extend(_render_combined(preset, [finish_results(r) for r in results if r["preset"] == preset]))
    L.extend(_render_both(both_scales([finish_results(r) for r in results])))
    L.append("### Limits of these runs\n")
    L.extend(f"* {x}" for x in LIMITS)
    L.append("")
    L.append(MARK_END)
    return "\n".join(L)


ALL_BUDGETS = (0.001, 0.01, 0.1, 0.3)


def combine(runs: list[dict]) -> dict:
    """Per artifact: the verdict cells of every run of one preset, by budget (each run judged against its own
    floors: GPU training is not bit-reproducible, so runs have slightly different reference models)."""
    cells: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        for art, scen in r["verdicts"].items():
            for s, by_budget in scen.items():
                for b, cell in by_budget.items():
                    cells.setdefault(art, {}).setdefault(b, []).append({**cell, "scenario": s, "budget": float(b),
                                                                         "run": r.get("_file", r.get("command", ""))})
    out = {}
    for art, by_budget in cells.items():
        measured = sorted(float(b) for b in by_budget)
        worst = min((c for cs in by_budget.values() for c in cs), key=lambda c: c["ratio"])
        out[art] = {"budgets": measured, "every_budget": all(b in measured for b in ALL_BUDGETS),
                    "holds_everywhere": all(c["verdict"] == "holds" for cs in by_budget.values() for c in cs),
                    "worst": worst}
    return out


def _render_combined(preset: str, runs: list[dict]) -> list[str]:
    comb = combine(runs)
    L = [f"### Preset `{preset}`: every run together\n",
         "Worst ratio over every budget, scenario and run (each cell against its own run's floor):\n",
         "| artifact | budgets measured | verdict everywhere | worst cell |", "|---|---|---|---|"]
    for art, c in sorted(comb.items(), key=lambda kv: -kv[1]["worst"]["ratio"]):
        w = c["worst"]
        L.append(f"| {art} | {', '.join(f'{100 * b:g} %' for b in c['budgets'])} | "
                 f"{'holds' if c['holds_everywhere'] else '**fails somewhere**'} | {w['ratio']:.3f} at "
                 f"{100 * w['budget']:g} % ({w['scenario']}: {w['best_attack']} "
                 f"{w['attack_ppl']:.3f} vs {w['floor_attack']} {w['floor_ppl']:.3f}) |")
    L.append("")
    return L


def both_scales(runs: list[dict]) -> dict:
    """The recommendation across scales: an artifact that holds at every budget of every preset, else the
    strongest (largest worst ratio over every preset) and its gap. ``complete`` is False while some preset
    lacks a budget for that artifact (then "holds everywhere" is not established)."""
    per = {p: combine([r for r in runs if r["preset"] == p]) for p in sorted({r["preset"] for r in runs})}
    arts = sorted({a for comb in per.values() for a in comb})
    table = {}
    for a in arts:
        cells = {p: per[p].get(a) for p in per}
        measured = [c for c in cells.values() if c is not None]
        table[a] = {"per_preset": {p: None if c is None else {"holds_everywhere": c["holds_everywhere"],
                                                              "every_budget": c["every_budget"],
                                                              "worst_ratio": c["worst"]["ratio"]}
                                   for p, c in cells.items()},
                    "holds_everywhere": bool(measured) and all(c["holds_everywhere"] for c in measured),
                    "complete": len(measured) == len(per) and all(c["every_budget"] for c in measured),
                    "worst_ratio": min(c["worst"]["ratio"] for c in measured) if measured else None}
    ok = [a for a, t in table.items() if t["holds_everywhere"] and t["complete"]]
    if ok:
        best = max(ok, key=lambda a: table[a]["worst_ratio"])
        text = (f"{best} holds at every budget at every scale measured ({', '.join(per)}; worst ratio "
                f"{table[best]['worst_ratio']:.3f} >= {HOLD_FACTOR})")
        if len(ok) > 1:
            text += "; also holding everywhere: " + ", ".join(a for a in ok if a != best)
    elif table:
        best = max(table, key=lambda a: table[a]["worst_ratio"] if table[a]["worst_ratio"] is not None else -1)
        t = table[best]
        text = (f"no artifact is shown to hold at every budget at every scale; the strongest is {best} (worst "
                f"ratio {t['worst_ratio']:.3f}" + ("" if t["complete"] else ", not every budget measured at every scale")
                + ")")
    else:
        best, text = None, "no artifact measured"
    return {"presets": list(per), "artifacts": table, "recommended": best if ok else None, "strongest": best,
            "text": text}


def _render_both(b: dict) -> list[str]:
    L = ["### Both scales together\n",
         "Per artifact: holds at every budget of the preset (and whether every budget 0.1-30 % was measured), "
         "worst ratio over budgets and scenarios.\n",
         "| artifact | " + " | ".join(f"`{p}`" for p in b["presets"]) + " | everywhere |",
         "|---|" + "---|" * len(b["presets"]) + "---|"]
    for a, t in sorted(b["artifacts"].items(), key=lambda kv: -(kv[1]["worst_ratio"] or 0)):
        cells = []
        for p in b["presets"]:
            c = t["per_preset"][p]
            cells.append("not run" if c is None else
                         f"{'holds' if c['holds_everywhere'] else '**fails**'} (worst {c['worst_ratio']:.3f}"
                         f"{'' if c['every_budget'] else ', budgets missing'})")
        L.append(f"| {a} | " + " | ".join(cells) + f" | {'holds' if t['holds_everywhere'] else '**fails**'}"
                 f"{'' if t['complete'] else ' (incomplete)'} |")
    L.append("")
    L.append(f"**Recommendation across scales:** {b['text']}.\n")
    return L


RESULTS_GLOB = "gpu_scale_*.json"

# What the committed runs (docs/security_eval/gpu_scale_*.json) did not do; update with the runs.
LIMITS = (
    "Preset `cpu` (0.86 M parameters, the 2-core development machine, 48.5 min): every attack at every budget, "
    "rates 1e-3, 3e-3 and 1e-2 at 0.1 / 1 / 10 % and the best 10 % rate at 30 %; 16-bit W_q and top-20 rows for "
    "`shielded` and `block:32` (the shipped defaults). CPU training is bit-reproducible: the run was stopped once "
    "after the 0.1 % rows of the first two rates and resumed with the third (`--resume`; same reference weights "
    "hash). Its reference is weak (perplexity 9.95 per byte) and its budgets are few optimizer steps (5, 20, 19, "
    "55 at 0.1, 1, 10, 30 %): a head start that shows only with more steps or closer to convergence is not tested.",
    "Preset `mid` (39 M parameters, one H200): the device time of one session (15 min for this grid) allowed two "
    "runs: the first (every attack, rates 1e-3 and 3e-3) stopped at its limit after the 0.1 % and 1 % budgets "
    "(and part of the alignment rows); the second ran 10 % and 30 % for the floors, the fine-tuning attacks and "
    "the public-prior floor with one rate each (1e-3, the best at 1 % for every fine-tuning attack in the first "
    "run; `base-distill` 3e-4); `base-distill` at 30 % was cut by the limit. So at `mid` the rates at 10 % and "
    "30 % are not swept, and relinking, top-20 distillation and `block:32-align` ran only at 0.1 % (`perm-align` "
    "at 0.1 % and, one rate, 1 %). The `mid` files predate the 16-bit default, the top-20 artifact attacks and "
    "the alignment to the attacker's own split of the base: they carry int8 W_q, full-logit attackers and the "
    "weaker alignment to the base's whole GEMMs (mean row cosine 0.13 after alignment). No device was lent in "
    "the session that ran the `cpu` grid, so `mid` was not completed: at `mid`, 'holds at every budget' rests "
    "on plain fine-tuning alone at 10 % and 30 %.",
    "At `cpu` the strongest floor is often `distill-relink` (a random initialisation with learnable A W B on "
    "every GEMM): over-parametrised linear maps train faster in few steps, so without that floor the relinking "
    "attacks would have been credited with the parametrisation's own gain.",
    "One seed per row and no repeats at either scale: the run-to-run spread is not measured, so ratios within a "
    "few per cent of each other (`shielded` 0.98, `perm` 1.00, `block:32` 1.01 at `cpu`) do not rank the "
    "artifacts; `perm` and the unlocked artifact hold by margins smaller than that unmeasured spread.",
    "Public-prior scenario: the base alone is within 5-6 % of the reference at both scales (10.43 vs 9.95 at "
    "`cpu`, 3.85-3.88 vs 3.63-3.65 at `mid`), so the secret part of the fine-tune is small and this scenario's "
    "verdicts say little beyond 'no artifact attack beat the public base model'.",
)


def finish_results(r: dict) -> dict:
    """Add zero-training base-only rows if missing and recompute verdicts and recommendation from the rows."""
    r = dict(r)
    c, ref = r["config"], r["reference"]
    if ref.get("base_val_ppl") and not any(x["attack"] == "base-only" for x in r["rows"]):
        r["rows"] = r["rows"] + [dataclasses.asdict(Row("base-only", "none", "public-prior", b, 0.0, 0, 0, 0,
                                                        ref["base_val_ppl"], 0.0, "the public base model as is "
                                                        "(no training; from the run's base perplexity)"))
                                 for b in c["budgets"]]
    r["verdicts"] = verdicts(r["rows"], c["budgets"])
    r["recommendation"] = recommend(r["verdicts"], c["budgets"])
    return r


def _render_body(r: dict) -> list[str]:
    L: list[str] = []
    c = r["config"]
    ref = r["reference"]
    L.append(f"* model: hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads, SwiGLU {c['inter']}, "
             f"windows of {c['seq_len']} bytes; base trained {c['base_tokens']:,} tokens on the site-packages part, "
             f"reference = base fine-tuned {c['finetune_tokens']:,} tokens on the whole training stream; "
             f"budgets are fractions of {c['base_tokens'] + c['finetune_tokens']:,} tokens")
    L.append(f"* reference perplexity per byte {ref['val_ppl']:.3f} (base {ref['base_val_ppl']:.3f}); weights "
             f"sha256 `{ref['weights_sha256'][:16]}…`; artifacts built at rank fraction {c['rank_fraction']}, "
             f"max reconstruction error {r['artifacts'].get('max_relative_error', float('nan')):.1e}")
    arts = r["artifacts"]
    zero = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in arts.items() if k.endswith("_ppl"))
    L.append(f"* artifacts without training: {zero}")
    L.append(f"* learning rates swept {c['lr_grid']} at budgets {c['sweep_budgets']}; other budgets use the best "
             f"rate of the largest swept budget; total {r['timings'].get('total', 0) / 60:.1f} min")
    if not r.get("complete"):
        L.append("* **incomplete run** (rows missing below were not run)")
    for note in r.get("notes", []):
        L.append(f"* note: {note}")
    L.append("")
    L.append("| artifact | scenario | " + " | ".join(f"{100 * b:g} %" for b in c["budgets"]) + " |")
    L.append("|---|---|" + "---|" * len(c["budgets"]))
    for art, scen in sorted(r.get("verdicts", {}).items()):
        for s, cells in scen.items():
            line = []
            for b in c["budgets"]:
                cell = cells.get(str(b))
                if cell is None:
                    line.append("not run")
                else:
                    v = cell["verdict"]
                    line.append(f"{'**fails**' if v == 'fails' else 'holds'} {cell['ratio']:.3f} "
                                f"({cell['best_attack']} {cell['attack_ppl']:.3f} vs {cell['floor_attack']} "
                                f"{cell['floor_ppl']:.3f})")
            L.append(f"| {art} | {s} | " + " | ".join(line) + " |")
    L.append("")
    rec = r.get("recommendation", {})
    L.append(f"**Recommendation at this scale:** {rec.get('text', 'not computed')}.\n")
    L.append("All rows (perplexity per byte on validation; best learning rate in bold):\n")
    L.append("| attack | artifact | scenario | budget | lr | tokens | steps | batch | val ppl | s | note |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    best = {}
    for row in r["rows"]:
        k = (row["attack"], row["budget"])
        if k not in best or row["val_ppl"] < best[k]:
            best[k] = row["val_ppl"]
    for row in r["rows"]:
        p = f"{row['val_ppl']:.3f}"
        if best[(row["attack"], row["budget"])] == row["val_ppl"]:
            p = f"**{p}**"
        L.append(f"| {row['attack']} | {row['artifact']} | {row['scenario']} | {100 * row['budget']:g} % | "
                 f"{row['lr']:g} | {row['tokens']:,} | {row['steps']} | {row['batch']} | {p} | "
                 f"{row['train_seconds']:.1f} | {row['note']} |")
    L.append("")
    return L


def splice(report: Path, section: str) -> None:
    text = report.read_text() if report.exists() else ""
    if MARK_BEGIN in text and MARK_END in text:
        pre, rest = text.split(MARK_BEGIN, 1)
        post = rest.split(MARK_END, 1)[1]
        text = pre + section + post
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    report.write_text(text)


def main(argv: list[str] | None = None) -> int:
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m slip_vllm.evaluation.gpu_scale")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the models of a preset and run the attack grid")
    r.add_argument("--corpus", type=Path, required=True)
    r.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--deadline-s", type=float, default=None, help="stop starting rows after this many seconds")
    r.add_argument("--resume", action="store_true", help="keep the rows already in --out (same reference weights)")
    r.add_argument("--only", nargs="+", default=None, help="run only these attacks")
    r.add_argument("--cache-dir", type=Path, default=None)
    r.add_argument("--budgets", type=float, nargs="+", default=None, help="override the preset's budgets")
    r.add_argument("--sweep-budgets", type=float, nargs="*", default=None)
    r.add_argument("--lr-grid", type=float, nargs="+", default=None)
    r.add_argument("--attack-lr", nargs="*", default=[], help="ATTACK=LR: one fixed rate for that attack")
    d = sub.add_parser("render", help="splice the results into the report")
    d.add_argument("--results", type=Path, nargs="+", required=True)
    d.add_argument("--report", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        cmd = "python -m slip_vllm.evaluation.gpu_scale " + shlex.join(argv)
        cfg = PRESETS[args.preset]
        over = {k: tuple(v) for k, v in (("budgets", args.budgets), ("sweep_budgets", args.sweep_budgets),
                                         ("lr_grid", args.lr_grid)) if v is not None}
        run_grid(args.corpus, cfg, args.out, device=args.device, deadline_s=args.deadline_s,
                 resume=args.resume, command=cmd, cache_dir=args.cache_dir,
                 only=tuple(args.only) if args.only else None, budget_config=over,
                 attack_lr={a.split("=")[0]: float(a.split("=")[1]) for a in args.attack_lr})
        return 0
    import os

    loaded = []
    for p in args.results:
        r = json.loads(p.read_text())
        r["_file"] = Path(os.path.relpath(p.resolve(), args.report.resolve().parent)).as_posix()
        loaded.append(r)
    section = render_section(loaded)
    splice(args.report, section)
    results_json = args.report.resolve().parent / "security_eval" / "results.json"
    if results_json.exists():   # the claims in README / SECURITY read these keys
        doc = json.loads(results_json.read_text())
        doc.update(results_json_keys([finish_results(r) for r in loaded]))
        results_json.write_text(json.dumps(doc, indent=1))
    return 0


def results_json_keys(runs: list[dict]) -> dict:
    """The grid's keys of security_eval/results.json (written by the CPU report and by ``render``)."""
    return {"gpu_scale": [{"file": g.get("_file"), "preset": g["preset"], "device": g.get("device"),
                           "reference": g["reference"], "verdicts": g["verdicts"],
                           "recommendation": g["recommendation"]} for g in runs],
            "gpu_scale_combined": {p: combine([g for g in runs if g["preset"] == p])
                                   for p in sorted({g["preset"] for g in runs})},
            "attack_grid_both_scales": both_scales(runs)}


if __name__ == "__main__":
    raise SystemExit(main())
