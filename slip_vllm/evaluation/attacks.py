"""Weight-recovery attacks on the public artifact (brief §8 (c), and the public-prior scenario of §3).

Owns the question "how much of the protected model can someone rebuild who holds the public half?".
Every attack starts from what ``slip protect`` really writes: the reference model is protected with
the project's own :func:`~slip_vllm.protect.artifact.protect` (protocol ``split``, blinding on, rank
policy ``fraction``), and the attacker's model is read from ``OUT/public`` only (config, public
tensors, manifest). ``OUT/secret`` is never opened here. The subspace, least-squares and mask audits
live in the report module; this module measures *model quality* an attacker reaches.

Shared assumptions, stated once because every number below depends on them:

* Data: the attacker has in-distribution data, in fact the reference model's own training stream
  (:func:`~slip_vllm.evaluation.reference_model.load_reference_data`). That is stronger than a
  realistic attacker, who would hold less well-matched text, so each row is an upper bound on what
  an attacker reaches with that many tokens.
* Budgets are fractions of the tokens the reference model was trained on
  (:func:`~slip_vllm.evaluation.reference_model.training_token_budget`); ``tokens`` in a row is what
  was actually consumed (whole windows of ``seq_len``; a budget below one window trains on one).
* Optimisation is the reference recipe (:func:`~slip_vllm.evaluation.reference_model.train`: AdamW,
  same learning rate, warm-up, cosine decay, clipping, batch and window length). Only the seeds
  differ from the reference run, so neither the scratch model's initialisation nor the data order
  replays the reference's own training.
* Scoring: validation perplexity and teacher-forced greedy agreement with the original model, on
  whole ``seq_len`` windows spread evenly over the validation stream (``eval_tokens`` of them; the
  full stream for FULL would cost ~45 s per model, 14 models per suite). Perplexities here are
  therefore on that subset, not the whole-stream number in the reference's ``metrics.json``.

Verdict (computed in :func:`verdict`, rule text in :attr:`RecoveryResults.rule`): a row *fails*
(the protection fails) when its validation perplexity is at most ``FAIL_FACTOR`` (1.25) times the
original's, else it *holds*; the original itself is ``n/a``. Zero-budget rows (residual alone, base
alone) get a verdict too: a usable residual would be a failure without any training. Independently
every training attack records whether it beats training from scratch on the same tokens, since the
SLIP claim is that the artifact gives no large head start; its ratio is ``vs_scratch``.

Attacks of :func:`run_recovery_attacks` (threat model: an untrusted host that holds the public
residual of every protected matrix, the public unprotected tensors (norms), the architecture and the
per-matrix ranks from the public manifest, plus training data and compute):

``residual-only`` (budget 0): serve the public checkpoint as is.

``finetune-full``: the host fine-tunes every parameter of the residual model.
  1. load ``OUT/public`` into a ``LlamaForCausalLM``;
  2. :func:`train` all parameters for ``budget x reference tokens`` on the training stream;
  3. score.

``finetune-lora``: the host knows each matrix lost a rank-k part (k is in the manifest), so it
  fits exactly that: W = W_D (frozen) + A·B with A [m, k], B [k, n] trainable.
  1. load ``OUT/public``; freeze every parameter;
  2. for each protected matrix (linears, embedding, untied LM head) register a parametrisation
     weight = W_D + A·B, A = 0 and B ~ U(-1/sqrt(n), 1/sqrt(n)) so training starts at the residual;
     k = the matrix's protection rank, or ``lora_rank``;
  3. :func:`train` the adapters only; 4. score (the adapters stay attached).

``scratch`` (the baseline the SLIP claim is measured against): the same architecture, freshly
  initialised with a seed other than the reference's, trained with the same recipe on the same
  number of tokens. It uses nothing from the artifact.

``distill``: black-box distillation through the serving API. The host (or any API client) sends
  the budget's text and reads back, per position, the top-20 log-probabilities (what an
  OpenAI-compatible ``logprobs``/``prompt_logprobs`` answer carries).
  1. student = the public residual model (its best available initialisation);
  2. per training window: teacher (the original model, standing in for the API) top-20
     log-probabilities at every position, renormalised over those 20 tokens;
  3. loss = cross-entropy of the student's full-vocabulary log-softmax against that renormalised
     top-20 distribution (soft targets only: no hard labels, so it measures what the API leaks
     beyond the text the client already has); optimised by :func:`train` through
     :class:`TopKDistillation`; 4. score.

Attacks of :func:`run_public_prior_attack` (threat model: the vendor fine-tuned a *publicly
released* base model on private data and protects the fine-tuned model; the host holds the
fine-tuned model's public artifact and downloads the base, no training):

``base-only``: serve the public base model as is (what the prior alone is worth).

``residual-only``: serve the fine-tuned model's residual as is.

``public-prior``: for every protected matrix, with Delta = W_base - W_D,
  W_hat = W_D + (best rank-k approximation of Delta), k = the matrix's protection rank; unprotected
  tensors from the artifact. Because W_base ~ W, Delta ~ W_C + (W_base - W), whose rank-k part is
  dominated by the secret W_C.

``public-prior-lowrank``: uses the structure of the split itself. W_D = U_k R V_k^T + U_⊥ S_⊥ V_⊥^T,
  i.e. the secret subspaces are invariant under W_D and are spanned by exactly k of W_D's own
  singular pairs; blinding only hides *which* k. A prior resolves that.
  1. SVD W_D = sum_i s_i u_i v_i^T; top-k singular subspaces P (left), Q (right) of W_base;
  2. score_i = ||P^T u_i||^2 + ||Q^T v_i||^2; keep the k best pairs as U_s, V_s;
  3. W_hat = W_D + U_s U_s^T Delta V_s V_s^T: W_D's action outside the block is the fine-tuned
     model's exactly; inside the k x k block the base's action replaces the blinded one.

``public-prior-smallest``: step 2 replaced by "the k smallest singular pairs of W_D", the textbook
  null-space guess. Against an unblinded split that is the secret subspace; against a blinded one it
  should be no better than ``residual-only`` (it shows what blinding buys when a prior exists).

CLI: ``python -m slip_vllm.evaluation.attacks [--tiny] [--skip-recovery] [--skip-public-prior]
[--json PATH]`` prints both tables (FULL also builds the base / fine-tune pair on first use).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from slip_vllm.core.decompose import RankPolicy
from slip_vllm.core.manifest import ORIENT_OUT_IN, Manifest, read_public_manifest
from slip_vllm.evaluation import reference_model as rm

FAIL_FACTOR = 1.25
DISTILL_TOP_K = 20
TRAINING_ATTACKS = ("finetune-full", "finetune-lora", "scratch", "distill")
# Validation tokens scored per model when the caller gives none. FULL: 256 windows spread over the
# 400 k-token stream (~7 s per model on 2 idle cores instead of ~45 s for the whole stream).
DEFAULT_EVAL_TOKENS = {"full": 65_536, "tiny": rm.TINY.eval_tokens}
DEFAULT_WORK_ROOT = rm.REPO_ROOT / ".cache" / "attacks"
# Offsets from the caller's seed, so that no attack replays the reference's own initialisation
# (make_model seeds with cfg.seed) or data order (train seeds windows with cfg.seed).
_BLINDING_SEED_BASE = 0x511F_A77C
_TRAIN_SEED_OFFSET = 101
_SCRATCH_INIT_OFFSET = 202
_LORA_INIT_OFFSET = 303

RULE = ("An attack row 'fails' (the protection fails) when its validation perplexity is <= {factor} x the "
        "original model's ({original:.2f}, threshold {threshold:.2f}), otherwise 'holds'; the original is "
        "'n/a'. Zero-budget rows are judged too. Separately, a training attack 'beats scratch' when its "
        "perplexity is below training from scratch on the same tokens (vs_scratch = its perplexity / "
        "scratch's): the SLIP claim is that the public artifact gives no large head start.")


@dataclass
class AttackRow:
    attack: str
    budget_fraction: float  # of the reference's training tokens; 0.0 for rows without training
    tokens: int             # tokens actually trained on (or sent to the API, for distill)
    val_ppl: float
    agreement: float        # teacher-forced greedy agreement with the original, on validation
    verdict: str            # "fails" / "holds" by the rule, "n/a" for the original
    note: str = ""
    vs_scratch: float | None = None      # val_ppl / scratch's val_ppl at the same budget
    beats_scratch: bool | None = None
    seconds: float = 0.0                 # training + scoring time of this row
    train_seconds: float = 0.0           # training alone (tokens / train_seconds = the throughput reached)


@dataclass
class RecoveryResults:
    original_ppl: float
    residual_ppl: float
    rows: list[AttackRow]
    curves: dict[str, list[tuple[int, float]]]  # attack -> [(tokens, val_ppl)], budgets ascending, tokens > 0
    rule: str
    seconds: float
    scenario: str = "recovery"                  # "recovery" or "public-prior"
    preset: str = "full"
    rank_fraction: float = 0.125
    seed: int = 0
    reference_tokens: int = 0                   # training tokens of the protected model (budget base)
    eval_tokens: int = 0                        # validation tokens scored per model
    eval_split: str = ""                        # which validation stream
    ranks: dict[str, int] = field(default_factory=dict)  # protected tensor -> protection rank
    data_assumption: str = ""
    base_ppl: float | None = None               # public-prior scenario: the public base model alone
    model_dir: str = ""                         # the protected (original) model
    public_dir: str = ""                        # what the attacker used
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def scratch_rows(self) -> list[AttackRow]:
        return self.rows_for("scratch")

    def rows_for(self, attack: str) -> list[AttackRow]:
        return [r for r in self.rows if r.attack == attack]

    def row(self, attack: str, budget_fraction: float = 0.0) -> AttackRow:
        for r in self.rows:
            if r.attack == attack and math.isclose(r.budget_fraction, budget_fraction, rel_tol=1e-9, abs_tol=1e-12):
                return r
        raise KeyError((attack, budget_fraction))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        return format_table(self)


def verdict(val_ppl: float, original_ppl: float) -> str:
    return "fails" if val_ppl <= FAIL_FACTOR * original_ppl else "holds"


def rule_text(original_ppl: float) -> str:
    return RULE.format(factor=FAIL_FACTOR, original=original_ppl, threshold=FAIL_FACTOR * original_ppl)


def format_table(res: RecoveryResults) -> str:
    head = (f"{res.scenario} | preset {res.preset} | rank fraction {res.rank_fraction} | seed {res.seed} | "
            f"reference tokens {res.reference_tokens:,} | scored {res.eval_tokens:,} tokens of {res.eval_split} | "
            f"{res.seconds:.0f} s")
    lines = [head, "",
             "| attack | budget | tokens | val ppl | x original | agreement | vs scratch | verdict | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in res.rows:
        vs = "" if r.vs_scratch is None else f"{r.vs_scratch:.2f}"
        lines.append(f"| {r.attack} | {r.budget_fraction:.2%} | {r.tokens:,} | {r.val_ppl:.2f} | "
                     f"{r.val_ppl / res.original_ppl:.2f} | {r.agreement:.3f} | {vs} | {r.verdict} | {r.note} |")
    lines += ["", res.rule]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# shared machinery


def _preset_config(preset: str) -> rm.ReferenceConfig:
    try:
        return rm.PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(rm.PRESETS)}") from None


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[attacks] {msg}", file=sys.stderr, flush=True)


def protect_for_attack(model_dir: Path, out_dir: Path, rank_fraction: float, seed: int) -> tuple[Path, Manifest]:
    """Run the real vendor transform (split, blinding on) and return (OUT/public, its manifest).

    The blinding seed is fixed only so that runs are reproducible; the attacker never sees it.
    """
    import logging

    from slip_vllm.protect.artifact import ProtectConfig, protect

    cfg = ProtectConfig(protocol="split", default_rank=RankPolicy(fraction=rank_fraction), blinding=True,
                        seed=_BLINDING_SEED_BASE + seed)
    # protect() warns about the fixed seed on every call; here that is the intended use.
    logger = logging.getLogger("slip.protect")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        protect(model_dir, out_dir, cfg, force=True, progress=False)
    finally:
        logger.setLevel(level)
    public = out_dir / "public"
    manifest, _ = read_public_manifest(public)
    return public, manifest


def load_public_model(public_dir: Path) -> torch.nn.Module:
    """The attacker's starting point: ``OUT/public`` as a plain model (W_D in place of W).

    Built from the config with the ``slip`` quantization block dropped (it only tells vLLM to call
    the secure service), then loaded strictly, so a missing or extra tensor is an error.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(public_dir)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_file(str(public_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_head = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied_head:
        raise RuntimeError(f"public checkpoint does not match its config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def spread_validation(val_ids: torch.Tensor, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Whole ``seq_len`` windows spread evenly over the stream, concatenated.

    The validation stream is ordered by file path, so a prefix would score only the first few
    modules; ``rm.eval_windows`` cuts this concatenation back into exactly the chosen windows.
    """
    val_ids = torch.as_tensor(val_ids, dtype=torch.long).flatten()
    n_windows = val_ids.numel() // seq_len
    if max_tokens is None or n_windows * seq_len <= max_tokens or n_windows == 0:
        return val_ids
    n_pick = max(1, max_tokens // seq_len)
    picks = torch.linspace(0, n_windows - 1, n_pick).round().long().unique()
    return torch.cat([val_ids[i * seq_len:(i + 1) * seq_len] for i in picks.tolist()])


class Scorer:
    """Perplexity and greedy agreement with the original in one forward pass per model."""

    def __init__(self, original: torch.nn.Module, val_ids: torch.Tensor, *, seq_len: int, batch_size: int,
                 num_threads: int | None):
        self.val_ids = val_ids
        self.seq_len, self.batch_size, self.num_threads = seq_len, batch_size, num_threads
        self.windows = rm.eval_windows(val_ids, seq_len)
        self.original_ppl, self.original_argmax = self._forward(original)

    @property
    def n_tokens(self) -> int:
        return int(sum(w.numel() - 1 for w in self.windows))

    @torch.no_grad()
    def _forward(self, model: torch.nn.Module) -> tuple[float, torch.Tensor]:
        nll, count, argmaxes = 0.0, 0, []
        with rm.deterministic(self.num_threads):
            was_training = model.training
            model.eval()
            # Same window batching as rm.evaluate_perplexity (equal lengths per batch).
            for batch in _batches(self.windows, self.batch_size):
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                nll += -float(logp.gather(-1, batch[:, 1:, None]).double().sum())
                count += batch[:, 1:].numel()
                argmaxes.append(logits.argmax(-1).flatten())
            model.train(was_training)
        return math.exp(nll / count), torch.cat(argmaxes)

    def score(self, model: torch.nn.Module) -> tuple[float, float]:
        ppl, argmax = self._forward(model)
        return ppl, float((argmax == self.original_argmax).double().mean())


def _batches(windows: list[torch.Tensor], batch_size: int):
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        full = [w for w in group if w.numel() == group[0].numel()]
        if full:
            yield torch.stack(full)
        for w in group[len(full):]:
            yield w[None]


# --------------------------------------------------------------------------------------------------
# LoRA (plain torch: a parametrisation W = W_D + A·B on each protected matrix)


class LowRankUpdate(torch.nn.Module):
    """Parametrisation ``weight -> weight + A @ B`` with the original weight frozen."""

    def __init__(self, shape: tuple[int, int], rank: int, generator: torch.Generator):
        super().__init__()
        m, n = shape
        bound = 1.0 / math.sqrt(n)
        # A = 0 makes the adapted model start exactly at the residual; B random so A gets gradient.
        self.A = torch.nn.Parameter(torch.zeros(m, rank))
        self.B = torch.nn.Parameter((torch.rand(rank, n, generator=generator) * 2 - 1) * bound)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.A @ self.B


def _module_for(model: torch.nn.Module, tensor_name: str) -> torch.nn.Module:
    module_name, _, attr = tensor_name.rpartition(".")
    if attr != "weight":
        raise ValueError(f"protected tensor {tensor_name} is not a module weight")
    return model.get_submodule(module_name)


def attach_lora(model: torch.nn.Module, manifest: Manifest, *, rank: int | None, seed: int) -> list[torch.nn.Parameter]:
    """Freeze ``model`` and give every protected matrix a trainable rank-k update; returns the adapters."""
    from torch.nn.utils import parametrize

    if manifest.tied_embeddings:
        # A tied head shares the embedding Parameter; one parametrisation would cover only one module.
        raise NotImplementedError("LoRA attack on tied embeddings is not implemented (reference models are untied)")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters: list[torch.nn.Parameter] = []
    for entry in manifest.tensors:
        if entry.orientation != ORIENT_OUT_IN:
            raise NotImplementedError(f"{entry.name}: only [out, in] storage is handled (Llama family)")
        module = _module_for(model, entry.name)
        k = entry.rank if rank is None else min(rank, min(entry.shape) - 1)
        update = LowRankUpdate(tuple(module.weight.shape), k, generator)
        parametrize.register_parametrization(module, "weight", update)
        adapters += [update.A, update.B]
    return adapters


def lora_base_weights(model: torch.nn.Module, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The frozen residuals under the adapters (for checking that LoRA training left them alone)."""
    return {e.name: _module_for(model, e.name).parametrizations.weight.original for e in manifest.tensors}


# --------------------------------------------------------------------------------------------------
# black-box distillation objective


class TopKDistillation(torch.nn.Module):
    """Wraps a student so :func:`rm.train` optimises distillation on the API's top-k log-probabilities.

    ``train`` calls ``model(input_ids=..., labels=..., use_cache=False).loss``; the labels are ignored
    on purpose (soft targets only). The teacher is held outside the module tree so that neither
    ``parameters()`` nor ``train()`` touches it.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, top_k: int = DISTILL_TOP_K):
        super().__init__()
        self.student = student
        self._teacher = (teacher.eval(),)
        self.top_k = top_k

    def forward(self, input_ids: torch.Tensor, labels=None, use_cache: bool = False):
        with torch.no_grad():
            teacher_logits = self._teacher[0](input_ids=input_ids, use_cache=False).logits[:, :-1].float()
            top = torch.log_softmax(teacher_logits, dim=-1).topk(self.top_k, dim=-1)
            # The API reports log-probabilities of the full distribution; renormalising over the k
            # returned tokens is all a client can do with them.
            target = torch.softmax(top.values, dim=-1)
        student_logp = torch.log_softmax(self.student(input_ids=input_ids, use_cache=False).logits[:, :-1].float(), -1)
        loss = -(target * student_logp.gather(-1, top.indices)).sum(-1).mean()
        return SimpleNamespace(loss=loss)


# --------------------------------------------------------------------------------------------------
# recovery attacks


def _budget_tokens(reference_tokens: int, fraction: float) -> int:
    return max(1, round(fraction * reference_tokens))


def _default_work_dir(kind: str, preset: str, rank_fraction: float, seed: int) -> Path:
    return DEFAULT_WORK_ROOT / f"{kind}-{preset}-r{rank_fraction:g}-s{seed}"


def run_recovery_attacks(preset: str = "full", *, budgets=(0.001, 0.01, 0.1), rank_fraction: float = 0.125,
                         lora_rank: int | None = None, seed: int = 0, work_dir: Path | None = None,
                         progress: bool = True, cache_dir: Path | None = None, eval_tokens: int | None = None,
                         num_threads: int | None = None,
                         attacks: tuple[str, ...] = TRAINING_ATTACKS) -> RecoveryResults:
    """Protect the reference model, then attack its public residual (see the module docstring).

    ``cache_dir``: where the reference model is (trained on first use); ``eval_tokens``: validation
    tokens scored per model (default per preset); ``attacks``: a subset of :data:`TRAINING_ATTACKS`
    (``scratch`` is needed for the vs-scratch comparison).
    """
    t_start = time.perf_counter()
    cfg = _preset_config(preset)
    unknown = set(attacks) - set(TRAINING_ATTACKS)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; choose from {TRAINING_ATTACKS}")
    budgets = tuple(sorted(float(b) for b in budgets))
    if any(not 0.0 < b <= 1.0 for b in budgets):
        raise ValueError(f"budgets are fractions in (0, 1], got {budgets}")
    threads = cfg.num_threads if num_threads is None else num_threads
    eval_tokens = DEFAULT_EVAL_TOKENS.get(preset) if eval_tokens is None else eval_tokens
    work_dir = Path(work_dir) if work_dir is not None else _default_work_dir("recovery", preset, rank_fraction, seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    ref_dir = rm.get_reference_model(cache_dir, cfg, progress=progress)
    reference_tokens = rm.training_token_budget(ref_dir)
    data = rm.load_reference_data(ref_dir)
    timings["reference"] = time.perf_counter() - t

    t = time.perf_counter()
    public_dir, manifest = protect_for_attack(ref_dir, work_dir / "protected", rank_fraction, seed)
    timings["protect"] = time.perf_counter() - t
    _say(progress, f"protected {len(manifest.tensors)} matrices of {ref_dir.name} (rank fraction {rank_fraction}) "
                   f"in {timings['protect']:.1f} s")

    with rm.deterministic(threads):
        original = rm.load_model(ref_dir)
        residual = load_public_model(public_dir)
    t = time.perf_counter()
    scorer = Scorer(original, spread_validation(data.val_ids, cfg.seq_len, eval_tokens), seq_len=cfg.seq_len,
                    batch_size=cfg.eval_batch_size, num_threads=threads)
    original_ppl = scorer.original_ppl
    residual_ppl, residual_agreement = scorer.score(residual)
    timings["score_references"] = time.perf_counter() - t
    _say(progress, f"original ppl {original_ppl:.2f}; public residual ppl {residual_ppl:.2f} "
                   f"(agreement {residual_agreement:.3f}); scored {scorer.n_tokens:,} tokens each")

    rows = [
        AttackRow("original", 0.0, 0, original_ppl, 1.0, "n/a", note="the protected model itself (reference)"),
        AttackRow("residual-only", 0.0, 0, residual_ppl, residual_agreement, verdict(residual_ppl, original_ppl),
                  note="the public checkpoint served as is, no training"),
    ]
    train_kw = {**cfg.train_kwargs(), "seed": cfg.seed + _TRAIN_SEED_OFFSET + seed, "num_threads": threads}
    notes = {
        "finetune-full": "all parameters fine-tuned from the public residual",
        "finetune-lora": ("frozen residual + trainable A·B per protected matrix, rank "
                          + ("= its protection rank" if lora_rank is None else str(lora_rank))),
        "scratch": "same architecture from a fresh initialisation; uses nothing from the artifact",
        "distill": f"student from the public residual trained on the original's top-{DISTILL_TOP_K} "
                   "log-probs (renormalised), soft targets only",
    }
    curves: dict[str, list[tuple[int, float]]] = {a: [] for a in attacks}
    scratch_ppl: dict[float, float] = {}
    # Scratch first so the other rows can be compared with it as they are made.
    order = sorted(attacks, key=lambda a: a != "scratch")
    for attack in order:
        for fraction in budgets:
            n_tokens = _budget_tokens(reference_tokens, fraction)
            t = time.perf_counter()
            model, result = _train_attack(attack, n_tokens, data, residual, original, manifest, cfg, train_kw,
                                          lora_rank=lora_rank, seed=seed, progress=progress)
            ppl, agreement = scorer.score(model)
            seconds = time.perf_counter() - t
            row = AttackRow(attack, fraction, result.tokens, ppl, agreement, verdict(ppl, original_ppl),
                            note=notes[attack], seconds=seconds, train_seconds=result.wall_s)
            if attack == "scratch":
                scratch_ppl[fraction] = ppl
            elif fraction in scratch_ppl:
                row.vs_scratch = ppl / scratch_ppl[fraction]
                row.beats_scratch = ppl < scratch_ppl[fraction]
                row.note += (f"; {'beats' if row.beats_scratch else 'does not beat'} scratch at this budget "
                             f"({row.vs_scratch:.2f}x its perplexity)")
            rows.append(row)
            curves[attack].append((result.tokens, ppl))
            _say(progress, f"{attack:14s} budget {fraction:7.2%} ({result.tokens:,} tokens, {result.steps} steps): "
                           f"ppl {ppl:.2f} agreement {agreement:.3f} -> {row.verdict} ({seconds:.1f} s)")
            del model

    ranks = {e.name: e.rank for e in manifest.tensors}
    return RecoveryResults(
        original_ppl=original_ppl, residual_ppl=residual_ppl, rows=_ordered(rows, attacks), curves=curves,
        rule=rule_text(original_ppl), seconds=time.perf_counter() - t_start, scenario="recovery", preset=preset,
        rank_fraction=rank_fraction, seed=seed, reference_tokens=reference_tokens, eval_tokens=scorer.n_tokens,
        eval_split="the reference validation split (whole stdlib corpus)", ranks=ranks,
        data_assumption="attacker trains on the reference model's own training stream (in-distribution data, "
                        "an upper bound for a real attacker)",
        model_dir=str(ref_dir), public_dir=str(public_dir), timings=timings)


def _ordered(rows: list[AttackRow], attacks) -> list[AttackRow]:
    rank = {"original": -2, "residual-only": -1, **{a: i for i, a in enumerate(TRAINING_ATTACKS)}}
    return sorted(rows, key=lambda r: (rank.get(r.attack, 99), r.budget_fraction))


def _train_attack(attack: str, n_tokens: int, data: rm.ReferenceData, residual: torch.nn.Module,
                  original: torch.nn.Module, manifest: Manifest, cfg: rm.ReferenceConfig, train_kw: dict, *,
                  lora_rank: int | None, seed: int, progress: bool):
    desc = f"{attack}[{n_tokens}]"
    # Step bars only on a terminal: in a log file the one line per run says enough.
    progress = progress and sys.stderr.isatty()
    train_ids = data.train_ids
    if attack == "scratch":
        with rm.deterministic(train_kw["num_threads"]):
            model = rm.make_model(dataclasses.replace(cfg, seed=cfg.seed + _SCRATCH_INIT_OFFSET + seed),
                                  data.tokenizer)
        result = rm.train(model, train_ids, n_tokens, **train_kw, progress=progress, desc=desc)
        return model, result
    model = copy.deepcopy(residual)
    if attack == "finetune-full":
        result = rm.train(model, train_ids, n_tokens, **train_kw, progress=progress, desc=desc)
    elif attack == "finetune-lora":
        adapters = attach_lora(model, manifest, rank=lora_rank, seed=_LORA_INIT_OFFSET + seed)
        result = rm.train(model, train_ids, n_tokens, **train_kw, trainable=adapters, progress=progress, desc=desc)
    elif attack == "distill":
        objective = TopKDistillation(model, original)
        result = rm.train(objective, train_ids, n_tokens, **train_kw, trainable=list(model.parameters()),
                          progress=progress, desc=desc)
    else:
        raise ValueError(attack)
    return model, result


# --------------------------------------------------------------------------------------------------
# public-prior attack


def prior_truncated(w_public: torch.Tensor, w_base: torch.Tensor, k: int) -> torch.Tensor:
    """W_D + best rank-k approximation of (W_base - W_D)."""
    d = w_public.double()
    u, s, vh = torch.linalg.svd(w_base.double() - d, full_matrices=False)
    return (d + (u[:, :k] * s[:k]) @ vh[:k]).float()


def prior_residual_subspace(w_public: torch.Tensor, w_base: torch.Tensor, k: int,
                            select: str = "prior") -> tuple[torch.Tensor, torch.Tensor]:
    """W_D + U_s U_s^T (W_base - W_D) V_s V_s^T over k of W_D's own singular pairs.

    ``select="prior"``: the pairs best aligned with W_base's top-k singular subspaces;
    ``select="smallest"``: W_D's k weakest pairs (the null-space guess). Returns (W_hat, chosen indices).
    """
    d = w_public.double()
    base = w_base.double()
    u_d, _, vh_d = torch.linalg.svd(d, full_matrices=False)
    if select == "prior":
        u_b, _, vh_b = torch.linalg.svd(base, full_matrices=False)
        score = (u_b[:, :k].T @ u_d).pow(2).sum(0) + (vh_b[:k] @ vh_d.T).pow(2).sum(0)
        chosen = torch.topk(score, k).indices.sort().values
    elif select == "smallest":
        chosen = torch.arange(u_d.shape[1] - k, u_d.shape[1])
    else:
        raise ValueError(select)
    us, vs = u_d[:, chosen], vh_d[chosen].T
    block = us.T @ (base - d) @ vs
    return (d + us @ block @ vs.T).float(), chosen


def run_public_prior_attack(preset: str = "full", *, rank_fraction: float = 0.125, seed: int = 0,
                            work_dir: Path | None = None, progress: bool = True, cache_dir: Path | None = None,
                            eval_tokens: int | None = None, num_threads: int | None = None) -> RecoveryResults:
    """Protect the fine-tuned model of the base / fine-tune pair and rebuild it from its public residual
    plus the public base model (no training; see the module docstring). Scored on the fine-tune part's
    validation stream."""
    t_start = time.perf_counter()
    cfg = _preset_config(preset)
    threads = cfg.num_threads if num_threads is None else num_threads
    eval_tokens = DEFAULT_EVAL_TOKENS.get(preset) if eval_tokens is None else eval_tokens
    work_dir = Path(work_dir) if work_dir is not None else _default_work_dir("public-prior", preset, rank_fraction, seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    base_dir, ft_dir = rm.get_base_finetune_pair(cache_dir, cfg, progress=progress)
    data = rm.load_reference_data(ft_dir)  # the fine-tune part
    timings["pair"] = time.perf_counter() - t
    t = time.perf_counter()
    public_dir, manifest = protect_for_attack(ft_dir, work_dir / "protected", rank_fraction, seed)
    timings["protect"] = time.perf_counter() - t
    _say(progress, f"protected the fine-tuned model ({len(manifest.tensors)} matrices, rank fraction "
                   f"{rank_fraction}) in {timings['protect']:.1f} s")

    with rm.deterministic(threads):
        original = rm.load_model(ft_dir)
        base = rm.load_model(base_dir)
        residual = load_public_model(public_dir)
    scorer = Scorer(original, spread_validation(data.val_ids, cfg.seq_len, eval_tokens), seq_len=cfg.seq_len,
                    batch_size=cfg.eval_batch_size, num_threads=threads)
    original_ppl = scorer.original_ppl
    rows = [AttackRow("original", 0.0, 0, original_ppl, 1.0, "n/a",
                      note="the fine-tuned (protected) model itself (reference)")]

    base_ppl = math.nan  # set by the base-only row, read by the rows after it

    def add(attack: str, model: torch.nn.Module, note: str, seconds: float) -> AttackRow:
        t = time.perf_counter()
        ppl, agreement = scorer.score(model)
        row = AttackRow(attack, 0.0, 0, ppl, agreement, verdict(ppl, original_ppl), note=note,
                        seconds=seconds + time.perf_counter() - t)
        if attack.startswith("public-prior"):
            gain = _gain_recovered(base_ppl, ppl, original_ppl)
            if math.isfinite(gain):
                row.note += (f"; {gain:.0%} of the base -> fine-tuned gain recovered" if gain >= 0
                             else "; worse than the base alone")
        rows.append(row)
        _say(progress, f"{attack:22s} ppl {ppl:.2f} agreement {agreement:.3f} -> {row.verdict}")
        return row

    base_ppl = add("base-only", base, "the public base model alone (the attacker's prior)", 0.0).val_ppl
    residual_ppl = add("residual-only", residual, "the fine-tuned model's public checkpoint served as is", 0.0).val_ppl

    base_state = base.state_dict()
    public_state = residual.state_dict()
    variants = {
        "public-prior": ("W_D + best rank-k approximation of (W_base - W_D), k = protection rank",
                         prior_truncated),
        "public-prior-lowrank": (("W_D corrected by the base on the k singular pairs of W_D best aligned with "
                                  "W_base's top-k subspaces (blinding hides only which k pairs)"),
                                 lambda d, b, k: prior_residual_subspace(d, b, k, "prior")[0]),
        "public-prior-smallest": (("as public-prior-lowrank but on W_D's k weakest singular pairs (the null-space "
                                   "guess blinding is meant to defeat)"),
                                  lambda d, b, k: prior_residual_subspace(d, b, k, "smallest")[0]),
    }
    for attack, (note, estimate) in variants.items():
        t = time.perf_counter()
        model = copy.deepcopy(residual)
        with rm.deterministic(threads), torch.no_grad():
            new_state = {}
            for entry in manifest.tensors:
                new_state[entry.name] = estimate(public_state[entry.name], base_state[entry.name], entry.rank)
            model.load_state_dict(new_state, strict=False)
        add(attack, model, note, time.perf_counter() - t)
        del model

    ranks = {e.name: e.rank for e in manifest.tensors}
    return RecoveryResults(
        original_ppl=original_ppl, residual_ppl=residual_ppl, rows=rows, curves={}, rule=rule_text(original_ppl),
        seconds=time.perf_counter() - t_start, scenario="public-prior", preset=preset, rank_fraction=rank_fraction,
        seed=seed, reference_tokens=rm.training_token_budget(ft_dir), eval_tokens=scorer.n_tokens,
        eval_split="the fine-tune part's validation split", ranks=ranks,
        data_assumption="no training data: the attacker has the public base model and the public residual",
        base_ppl=base_ppl, model_dir=str(ft_dir), public_dir=str(public_dir), timings=timings)


def _gain_recovered(base_ppl: float, attack_ppl: float, original_ppl: float) -> float:
    """Share of the base -> fine-tuned improvement (in log-perplexity) the attack reaches."""
    gap = math.log(base_ppl) - math.log(original_ppl)
    if gap <= 0:
        return math.nan
    return (math.log(base_ppl) - math.log(attack_ppl)) / gap


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slip_vllm.evaluation.attacks",
                                 description="Run the weight-recovery attacks on the protected reference model.")
    ap.add_argument("--tiny", action="store_true", help="tiny preset (about a minute; for smoke tests)")
    ap.add_argument("--rank-fraction", type=float, default=0.125)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    ap.add_argument("--lora-rank", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=None, help="validation tokens scored per model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's)")
    ap.add_argument("--skip-recovery", action="store_true")
    ap.add_argument("--skip-public-prior", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write both results as JSON here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    preset = "tiny" if args.tiny else "full"
    out: dict[str, dict] = {}
    t0 = time.perf_counter()
    if not args.skip_recovery:
        res = run_recovery_attacks(preset, budgets=tuple(args.budgets), rank_fraction=args.rank_fraction,
                                   lora_rank=args.lora_rank, seed=args.seed, progress=not args.quiet,
                                   eval_tokens=args.eval_tokens, num_threads=args.threads)
        print(res.table() + "\n", flush=True)
        out["recovery"] = res.to_dict()
    if not args.skip_public_prior:
        res = run_public_prior_attack(preset, rank_fraction=args.rank_fraction, seed=args.seed,
                                      progress=not args.quiet, eval_tokens=args.eval_tokens,
                                      num_threads=args.threads)
        print(res.table() + "\n", flush=True)
        out["public_prior"] = res.to_dict()
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
