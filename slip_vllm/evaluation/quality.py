"""The quality table and the rank sweep of the evaluation report (brief §8, "Quality" and "Choosing
the default rank").

What this module owns
---------------------
* the evaluation windows (the reference model's validation stream, cut exactly as
  :func:`reference_model.eval_windows` cuts it, capped to a modest number of tokens);
* per-position scores (next-token NLL and teacher-forced argmax) of a model on those windows, from
  three sources: transformers in this process, a server's OpenAI-compatible ``/v1/completions``
  (``prompt_logprobs``), or any list of logits (the shielded executor);
* serving a protected artifact for measurement: ``slip protect`` at a rank fraction, the secure
  service and ``vllm serve OUT/public --load-format slip`` as real subprocesses
  (:mod:`slip_vllm.launch`), protocol-generic;
* the public residual alone, loaded as an ordinary transformers model;
* the rank sweep, the secure side's cost per token at each rank, and the rule that recommends the
  default rank (:func:`recommend_rank`).

It runs on the evaluator's machine (vendor side): it holds the original weights and both halves.

Measurement protocol of one served row
--------------------------------------
1. ``slip protect --model REF --out OUT --protocol P`` with ``RankPolicy(fraction=f)`` and a fixed
   seed (an evaluation artifact, never a real one: the blinding seed is known);
2. start ``slip secure-service --bundle OUT/secret``, wait for ``/healthz``;
3. start ``vllm serve OUT/public --load-format slip --enforce-eager`` (eager: no compile time; the
   numerics are the same), wait for ``/health``; if either start fails, the row is an error that
   names the log, never a number;
4. for every window w (token ids): POST /v1/completions ``{prompt: w, max_tokens: 1,
   temperature: 0, prompt_logprobs: 1}``. vLLM 0.32 answers ``choices[0].prompt_logprobs``: a list
   as long as the prompt, ``None`` for the first position, then for position i a dict
   ``{token_id: {logprob, rank, decoded_token}}`` holding the prompt's own token i (with its rank
   in the vocabulary) and the top-1 token (rank 1). NLL_i = -logprob of w[i]; the greedy token
   is the entry of rank 1;
5. perplexity = exp(mean NLL) over all scored positions; agreement = share of positions whose
   greedy token equals the original model's teacher-forced argmax (transformers, same windows).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from slip_vllm.evaluation import reference_model as rm

# Rank fractions of min(m, n) swept by default (brief §3: the rank comes from a fraction of min(m, n)).
DEFAULT_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
# Fixed blinding seed of evaluation artifacts: reproducible numbers; such an artifact is never shipped.
EVAL_PROTECT_SEED = 20240715


class ServingUnavailable(RuntimeError):
    """A protocol could not be served through vLLM (start failure or request errors)."""


# --------------------------------------------------------------------------------------------------
# evaluation windows and per-position scores


@dataclass
class EvalSet:
    """The windows every row of the quality table is scored on (same windows, same positions)."""

    windows: list[torch.Tensor]
    seq_len: int
    max_tokens: int

    @property
    def scored_positions(self) -> int:
        return sum(int(w.numel()) - 1 for w in self.windows)

    @property
    def tokens(self) -> int:
        return sum(int(w.numel()) for w in self.windows)

    def targets(self) -> torch.Tensor:
        return torch.cat([w[1:] for w in self.windows])


def make_eval_set(val_ids: torch.Tensor, seq_len: int, max_tokens: int) -> EvalSet:
    """A prefix of ``max_tokens`` validation tokens cut into :func:`reference_model.eval_windows`."""
    return EvalSet(rm.eval_windows(val_ids, seq_len, max_tokens), seq_len, max_tokens)


@dataclass
class Scores:
    """Per scored position, in window order: NLL of the true next token and the greedy token."""

    nll: torch.Tensor     # float64 [P]
    argmax: torch.Tensor  # int64 [P]

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))

    def agreement(self, other: Scores) -> float:
        if other.argmax.shape != self.argmax.shape:
            raise ValueError("scores cover different positions")
        return float((self.argmax == other.argmax).double().mean())

    def prefix(self, positions: int) -> Scores:
        return Scores(self.nll[:positions], self.argmax[:positions])


def scores_from_logits(logits: torch.Tensor, window: torch.Tensor) -> Scores:
    """Scores of one window from its logits [L, V] (row i predicts token i + 1; the last row unused)."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    targets = window[1:].long()
    return Scores(-logp.gather(-1, targets[:, None])[:, 0], logits[:-1].argmax(-1).long())


def concat_scores(parts: Sequence[Scores]) -> Scores:
    return Scores(torch.cat([s.nll for s in parts]), torch.cat([s.argmax for s in parts]))


@torch.no_grad()
def score_model(model: torch.nn.Module, evalset: EvalSet, *, batch_size: int = 16,
                num_threads: int = 2) -> Scores:
    """Teacher-forced scores of a transformers causal LM (same numerics as ``evaluate_perplexity``)."""
    parts: list[Scores] = []
    with rm.deterministic(num_threads):
        model.eval()
        for batch in rm._batched_windows(evalset.windows, batch_size):
            logits = model(input_ids=batch, use_cache=False).logits.float()
            parts.extend(scores_from_logits(lg, w) for lg, w in zip(logits, batch))
    return concat_scores(parts)


def parse_prompt_logprobs(window: Sequence[int], prompt_logprobs: list) -> Scores:
    """Scores of one window from vLLM's ``prompt_logprobs`` (see the module docstring, step 4)."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(window):
        raise ServingUnavailable(f"expected {len(window)} prompt logprobs, got "
                                 f"{None if prompt_logprobs is None else len(prompt_logprobs)}")
    nll, greedy = [], []
    for i in range(1, len(window)):
        entry = {int(k): v for k, v in prompt_logprobs[i].items()}
        actual = entry.get(int(window[i]))
        if actual is None:
            raise ServingUnavailable(f"position {i}: the prompt token is missing from prompt_logprobs")
        nll.append(-float(_field(actual, "logprob")))
        top = [tok for tok, v in entry.items() if _field(v, "rank") == 1]
        if not top:
            raise ServingUnavailable(f"position {i}: no rank-1 token in prompt_logprobs")
        greedy.append(top[0])
    return Scores(torch.tensor(nll, dtype=torch.float64), torch.tensor(greedy, dtype=torch.long))


def _field(value, name: str):
    return value[name] if isinstance(value, dict) else getattr(value, name)


def score_server(base_url: str, evalset: EvalSet, *, model_name: str = "m", concurrency: int = 8,
                 timeout_s: float = 300.0) -> Scores:
    """Scores of a served model from its OpenAI-compatible API (prompt log-probs, one request per window;
    up to ``concurrency`` in flight so vLLM batches them)."""
    import openai

    async def run() -> list[Scores]:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=timeout_s)
        gate = asyncio.Semaphore(concurrency)

        async def one(window: torch.Tensor) -> Scores:
            ids = [int(t) for t in window]
            async with gate:
                try:
                    resp = await client.completions.create(model=model_name, prompt=ids, max_tokens=1,
                                                           temperature=0, extra_body={"prompt_logprobs": 1})
                except openai.APIError as exc:
                    raise ServingUnavailable(f"request failed: {exc}") from exc
            choice = resp.choices[0]
            plp = getattr(choice, "prompt_logprobs", None)
            if plp is None and choice.model_extra:
                plp = choice.model_extra.get("prompt_logprobs")
            return parse_prompt_logprobs(ids, plp)

        try:
            return await asyncio.gather(*[one(w) for w in evalset.windows])
        finally:
            await client.close()

    return concat_scores(asyncio.run(run()))


# --------------------------------------------------------------------------------------------------
# artifacts, the public residual, serving


def protect_reference(ref_dir: Path, out_dir: Path, *, protocol: str, fraction: float,
                      seed: int = EVAL_PROTECT_SEED, blinding: bool = True) -> Path:
    """``slip protect`` of the reference model at a rank fraction (reuses a complete earlier output)."""
    from slip_vllm.core.decompose import DEFAULT_BLINDING_SCHEME, RankPolicy
    from slip_vllm.protect.artifact import ProtectConfig, protect

    stamp = out_dir / ".eval-stamp.json"
    ref_dir = Path(ref_dir)
    # the stamp names the exact input weights, so a retrained reference model is never paired with a stale artifact
    weights = {f.name: f.stat().st_mtime_ns for f in sorted(ref_dir.glob("*.safetensors"))}
    want = {"ref": str(ref_dir), "protocol": protocol, "fraction": fraction, "seed": seed, "blinding": blinding,
            "blinding_scheme": DEFAULT_BLINDING_SCHEME, "weights": weights}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return out_dir
    cfg = ProtectConfig(protocol=protocol, default_rank=RankPolicy(fraction=fraction), blinding=blinding, seed=seed)
    protect(ref_dir, out_dir, cfg, force=True, progress=False)
    stamp.write_text(json.dumps(want))
    return out_dir


def load_with_state(ref_dir: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The reference architecture with the given tensors (e.g. the public residual) in place."""
    model = rm.load_model(ref_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise RuntimeError(f"state does not fit the reference architecture: missing {missing}, "
                           f"unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model.eval()


def load_public_residual(ref_dir: Path, public_dir: Path) -> torch.nn.Module:
    """What a thief of the public artifact alone runs: W_D in place of every protected W (split
    artifacts; the config's ``slip`` quantization entry is ignored, as a thief would)."""
    from safetensors.torch import load_file

    return load_with_state(ref_dir, load_file(str(public_dir / "model.safetensors")))


@contextlib.contextmanager
def served_artifact(out_dir: Path, log_dir: Path, name: str, *, max_model_len: int,
                    startup_timeout_s: float = 600.0) -> Iterator[str]:
    """Secure service + ``vllm serve OUT/public --load-format slip`` as subprocesses; yields vLLM's URL.

    Raises ``ServingUnavailable`` (with the log's tail) when either does not come up.
    """
    from slip_vllm import launch

    protocol = json.loads((out_dir / "public" / "config.json").read_text()).get(
        "quantization_config", {}).get("protocol", "?")
    # shielded: full logits, since the quality rows score the model's own prompt log-probs (the
    # service's default policy sends only the top-K logits per row; docs/SECURITY.md)
    service = launch.secure_service(out_dir / "secret", log_dir, name=f"{name}-service",
                                    SLIP_SHIELDED_LOGITS_POLICY="full")
    vllm = launch.vllm_server(out_dir / "public", log_dir, f"{name}-vllm", slip=True, service_url=service.url,
                              extra_args=["--enforce-eager", "--max-model-len", str(max_model_len)])
    try:
        service.start()
        try:
            service.wait_ready(120)
        except (RuntimeError, TimeoutError) as exc:
            raise ServingUnavailable(f"the secure service did not start on the {protocol} bundle "
                                     f"{out_dir / 'secret'}: {_short(exc)}") from None
        vllm.start()
        try:
            vllm.wait_ready(startup_timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            raise ServingUnavailable(f"`vllm serve {out_dir / 'public'} --load-format slip` did not start for "
                                     f"protocol {protocol!r} (log: {vllm.log_path}): {_short(exc)}") from None
        yield vllm.url
    finally:
        vllm.stop()
        service.stop()


def _short(exc: BaseException, lines: int = 6) -> str:
    text = [ln for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in text if "Error" in ln or "error" in ln]
    return " | ".join((errors or text)[-lines:])


def serve_stock(model_dir: Path, log_dir: Path, name: str, *, max_model_len: int):
    """Stock ``vllm serve`` of the unprotected model (no plugin load format), same flags."""
    from slip_vllm import launch

    return launch.vllm_server(model_dir, log_dir, name, slip=False,
                              extra_args=["--enforce-eager", "--max-model-len", str(max_model_len)])


# --------------------------------------------------------------------------------------------------
# secure-side cost of a rank choice


@dataclass
class RankCost:
    """Per-token cost of a split at one rank, from the manifest (multiply-accumulates, parameters)."""

    fraction: float
    ranks: dict[str, int]              # kind of matrix -> rank (e.g. "q_proj": 32)
    secret_params: int
    protected_params: int
    service_macs_per_token: int        # split: W_C x of every protected linear + embedding row
    model_macs_per_token: int          # the host's W_D x (all protected linears; the LM head included)
    mask_precompute_macs_per_token: int  # shielded only: W_q r for every masked GEMM row (price of hiding)
    bytes_per_token_split: int         # float32 x out and W_C x back (every protected linear), embedding rows

    @property
    def secret_share(self) -> float:
        return self.secret_params / self.protected_params

    @property
    def service_share(self) -> float:
        return self.service_macs_per_token / self.model_macs_per_token


def rank_cost(public_dir: Path, fraction: float) -> RankCost:
    from slip_vllm.core.manifest import KIND_EMBEDDING, read_public_manifest

    manifest, _ = read_public_manifest(public_dir)
    ranks: dict[str, int] = {}
    secret = total = service = model = masks = wire = 0
    for t in manifest.tensors:
        m, n = t.shape
        ranks[t.name.split(".")[-2]] = t.rank
        secret += t.rank * (m + n)
        total += m * n
        if t.kind == KIND_EMBEDDING:
            service += t.rank * n  # one row of left @ right per token
            wire += 4 + 4 * n      # int32 token id out, float32 row back
            if manifest.tied_embeddings:  # the same matrix is also the LM head
                service += t.rank * (m + n)
                model += m * n
                masks += m * n
            continue
        service += t.rank * (m + n)
        model += m * n
        masks += m * n
        wire += 4 * (m + n)
    return RankCost(fraction, ranks, secret, total, service, model, masks, wire)


# --------------------------------------------------------------------------------------------------
# the table


@dataclass
class QualityRow:
    label: str
    protocol: str           # original | split | shielded | residual
    served_by: str          # transformers | vLLM | stock vLLM | secure-service executor
    rank_fraction: float | None
    positions: int
    perplexity: float | None
    agreement: float | None  # with the original (transformers), teacher-forced argmax
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SweepPoint:
    fraction: float
    cost: RankCost
    residual: QualityRow
    split: QualityRow | None


@dataclass
class RankRecommendation:
    fraction: float | None
    status: str             # confirmed | unconfirmed | provisional | none
    rule: str
    reasons: list[str] = field(default_factory=list)
    cost: RankCost | None = None


@dataclass
class QualityResults:
    preset: str
    evalset_tokens: int
    positions: int
    original_ppl: float
    unigram_ppl: float
    rows: list[QualityRow]
    sweep: list[SweepPoint]
    default_fraction: float
    recommendation: RankRecommendation | None = None
    seconds: float = 0.0
    original_scores: Scores | None = None  # per position (for rows measured elsewhere on the same windows)

    @property
    def errors(self) -> list[QualityRow]:
        return [r for r in self.rows if not r.ok]

    def to_json(self) -> dict:
        return asdict(self)


def _timed_row(label, protocol, served_by, fraction, positions, compute: Callable[[], Scores],
               original: Scores | None) -> tuple[QualityRow, Scores | None]:
    t0 = time.perf_counter()
    try:
        s = compute()
    except ServingUnavailable as exc:
        return QualityRow(label, protocol, served_by, fraction, positions, None, None,
                          time.perf_counter() - t0, error=str(exc)), None
    agree = s.agreement(original) if original is not None else 1.0
    return QualityRow(label, protocol, served_by, fraction, int(s.nll.numel()), s.perplexity, agree,
                      time.perf_counter() - t0), s


def run_quality(ref_dir: Path, evalset: EvalSet, work_dir: Path, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                default_fraction: float = 0.125, serve: bool = True, serve_stock_original: bool = True,
                serve_shielded: bool = True, serve_split_fractions: Sequence[float] | None = None,
                unigram_ppl: float, num_threads: int = 2,
                progress: Callable[[str], None] = lambda s: None,
                extra_rows: Sequence[QualityRow] = ()) -> QualityResults:
    """Every row of the quality table and the sweep (see the module docstring for a served row).

    Served rows: the original by stock vLLM (optional), ``split`` at every swept fraction (or at
    ``serve_split_fractions`` only), ``shielded`` at ``default_fraction``. The shielded row is an error row, not a number, when vLLM cannot serve
    it (the caller must treat that as a failed section). ``extra_rows`` (e.g. the shielded executor
    measured by the audits) are appended as given.
    """
    t_all = time.perf_counter()
    work_dir = Path(work_dir)
    log_dir = work_dir / "logs"
    cfg = rm.ReferenceConfig(**rm.read_metrics(ref_dir)["config"])
    max_len = cfg.max_position_embeddings
    P = evalset.scored_positions
    rows: list[QualityRow] = []

    progress(f"quality: original (transformers), {P} positions")
    t0 = time.perf_counter()
    original = score_model(rm.load_model(ref_dir), evalset, num_threads=num_threads)
    rows.append(QualityRow("original", "original", "transformers", None, P, original.perplexity, 1.0,
                           time.perf_counter() - t0))

    if serve and serve_stock_original:
        progress("quality: original served by stock vLLM")

        def stock() -> Scores:
            server = serve_stock(ref_dir, log_dir, "stock-vllm", max_model_len=max_len).start()
            try:
                try:
                    server.wait_ready(600)
                except (RuntimeError, TimeoutError) as exc:
                    raise ServingUnavailable(f"stock vLLM did not start: {_short(exc)}") from None
                return score_server(server.url, evalset)
            finally:
                server.stop()

        rows.append(_timed_row("original", "original", "stock vLLM", None, P, stock, original)[0])

    sweep: list[SweepPoint] = []
    for f in fractions:
        out = protect_reference(ref_dir, work_dir / f"split-{_tag(f)}", protocol="split", fraction=f)
        cost = rank_cost(out / "public", f)
        progress(f"quality: public residual alone at rank fraction {_frac(f)}")
        residual_row, _ = _timed_row(f"public residual alone, rank {_frac(f)}", "residual", "transformers", f, P,
                                     lambda out=out: score_model(load_public_residual(ref_dir, out / "public"),
                                                                 evalset, num_threads=num_threads), original)
        split_row = None
        if serve and (serve_split_fractions is None or any(abs(f - g) < 1e-12 for g in serve_split_fractions)):
            progress(f"quality: split at rank fraction {_frac(f)} served by vLLM")

            def served(out=out, f=f) -> Scores:
                with served_artifact(out, log_dir, f"split-{_tag(f)}", max_model_len=max_len) as url:
                    return score_server(url, evalset)

            split_row, _ = _timed_row(f"split, rank {_frac(f)}", "split", "vLLM", f, P, served, original)
            rows.append(split_row)
        rows.append(residual_row)
        sweep.append(SweepPoint(f, cost, residual_row, split_row))

    if serve and serve_shielded:
        progress(f"quality: shielded at rank fraction {_frac(default_fraction)} served by vLLM")

        def shielded() -> Scores:
            try:
                out = protect_reference(ref_dir, work_dir / f"shielded-{_tag(default_fraction)}",
                                        protocol="shielded", fraction=default_fraction)
            except Exception as exc:
                raise ServingUnavailable(f"slip protect --protocol shielded failed: {exc}") from exc
            with served_artifact(out, log_dir, f"shielded-{_tag(default_fraction)}", max_model_len=max_len) as url:
                return score_server(url, evalset)

        row, _ = _timed_row(f"shielded, rank {_frac(default_fraction)}", "shielded", "vLLM", default_fraction, P,
                            shielded, original)
        if row.error:
            row.error = "serving protocol shielded through vLLM failed: " + row.error
        rows.append(row)
    rows.extend(extra_rows)
    return QualityResults(preset=cfg.name, evalset_tokens=evalset.tokens, positions=P,
                          original_ppl=original.perplexity, unigram_ppl=unigram_ppl, rows=rows, sweep=sweep,
                          default_fraction=default_fraction, seconds=time.perf_counter() - t_all,
                          original_scores=original)


def original_scores(ref_dir: Path, evalset: EvalSet, num_threads: int = 2) -> Scores:
    return score_model(rm.load_model(ref_dir), evalset, num_threads=num_threads)


def _tag(f: float) -> str:
    return f"{f:.5f}".rstrip("0").replace(".", "p")


def _frac(f: float) -> str:
    """1/8 for 0.125: the sweep's fractions are unit fractions."""
    inv = 1 / f
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-9 else f"{f:g}"


frac_label = _frac


# --------------------------------------------------------------------------------------------------
# the recommendation

# Gate thresholds (stated in the report with the rule).
EXACT_MIN_AGREEMENT = 0.99     # split served by vLLM vs the original (float32 reassociation flips near-ties)
EXACT_MAX_PPL_RATIO = 1.01
SCRATCH_MARGIN = 0.95          # G3: "beats scratch" means below 0.95 x scratch's perplexity at the same budget


def attack_verdict_fails(verdict: str) -> bool:
    """True when a recovery-attack row's own verdict says the protection fails at its budget."""
    return "fail" in verdict.lower()


def recovery_gate_failures(rows) -> list[str]:
    """G3 of :func:`recommend_rank` on the rows of one recovery-attack run (``attacks.AttackRow``).

    Counted against the rank: a fine-tuning attack from the public artifact (``finetune-*``, full or
    LoRA) that ends below training from scratch on the same tokens (its ``beats_scratch``), and a
    public residual that is usable as is (``residual-only`` whose verdict fails). Not counted:
    ``scratch`` itself and black-box ``distill`` (baselines no weight split can beat), a fine-tuning
    row within 5 % of scratch's perplexity (``SCRATCH_MARGIN``: run-to-run noise of small trainings), and the
    attack module's absolute verdict of a training row (with a large budget any attacker, scratch
    included, gets close to the original: that is a property of the budget, not of the rank).
    """
    failures = []
    for r in rows:
        ratio = getattr(r, "vs_scratch", None)
        beats = ratio < SCRATCH_MARGIN if ratio is not None else bool(getattr(r, "beats_scratch", None))
        if r.attack.startswith("finetune") and beats:
            failures.append(f"{r.attack} at {100 * r.budget_fraction:g} % beats scratch"
                            + (f" ({ratio:.2f}x its perplexity)" if ratio is not None else ""))
        if r.attack == "residual-only" and attack_verdict_fails(r.verdict):
            failures.append(f"the public residual alone is usable (ppl {r.val_ppl:.1f})")
    return failures


def recommend_rank(results: QualityResults, attacked: dict[float, list] | None) -> RankRecommendation:
    """The default rank from the measured numbers.

    Gates per swept fraction f:
      G1 (exact): split served by vLLM agrees with the original on >= 99 % of positions and its
         perplexity is within 1 % of the original's;
      G2 (residual useless): the public residual alone has perplexity >= the unigram baseline
         (a thief of the public half gets no better than token frequencies);
      G3 (recovery, only where the recovery attacks ran): at no budget does fine-tuning the public
         residual (full or LoRA) end better than training from scratch on the same tokens, and the
         residual alone is not usable (:func:`recovery_gate_failures`). Assumed monotone: a larger
         secret rank leaves less in the residual, so G3 at f carries to every larger f.
    Recommended: the smallest swept f that passes G1 and G2 and is >= the smallest attacked fraction
    that passes G3 ("confirmed"). If every attacked fraction fails G3: the smallest f passing G1 and
    G2 above all failing fractions ("unconfirmed": rerun the recovery attacks there). Without
    recovery evidence: the smallest f passing G1 and G2 ("provisional").
    """
    rule = ("smallest swept rank fraction f with G1 (split via vLLM: agreement >= "
            f"{EXACT_MIN_AGREEMENT:.0%}, perplexity within {EXACT_MAX_PPL_RATIO - 1:.0%} of the original), "
            "G2 (public residual alone: perplexity >= unigram baseline) and f >= the smallest rank fraction "
            "at which fine-tuning the public residual (full and LoRA, every budget) is no better than training "
            f"from scratch on the same tokens (perplexity >= {SCRATCH_MARGIN} x scratch's) and the residual alone "
            "is unusable (G3, assumed to carry to larger ranks)")
    reasons: list[str] = []
    passing: list[SweepPoint] = []
    for pt in results.sweep:
        why = []
        if pt.split is None or not pt.split.ok:
            why.append("split not measured through vLLM" if pt.split is None else "split serving failed")
        elif (pt.split.agreement < EXACT_MIN_AGREEMENT
              or pt.split.perplexity > EXACT_MAX_PPL_RATIO * results.original_ppl
              or pt.split.perplexity < results.original_ppl / EXACT_MAX_PPL_RATIO):
            why.append(f"G1 fails (agreement {pt.split.agreement:.4f}, ppl {pt.split.perplexity:.2f})")
        if not pt.residual.ok or pt.residual.perplexity < results.unigram_ppl:
            why.append(f"G2 fails (residual ppl {pt.residual.perplexity:.1f} < unigram {results.unigram_ppl:.1f})"
                       if pt.residual.ok else "G2 not measured")
        if why:
            reasons.append(f"{_frac(pt.fraction)}: " + "; ".join(why))
        else:
            passing.append(pt)
            reasons.append(f"{_frac(pt.fraction)}: G1 and G2 pass (residual ppl {pt.residual.perplexity:.1f})")
    g3 = {f: recovery_gate_failures(rows) for f, rows in (attacked or {}).items() if rows}
    holds = sorted(f for f, bad in g3.items() if not bad)
    fails = sorted(f for f, bad in g3.items() if bad)
    for f in holds:
        reasons.append(f"{_frac(f)}: G3 passes (no fine-tuning attack beats scratch; residual alone unusable)")
    for f in fails:
        reasons.append(f"{_frac(f)}: G3 fails: " + "; ".join(g3[f]))
    if not passing:
        return RankRecommendation(None, "none", rule, reasons + ["no swept fraction passes G1 and G2"])
    if holds:
        ok = [pt for pt in passing if pt.fraction >= holds[0] - 1e-12]
        if ok:
            return RankRecommendation(ok[0].fraction, "confirmed", rule, reasons, ok[0].cost)
        return RankRecommendation(None, "none", rule, reasons + ["no fraction at or above the confirmed one passes G1/G2"])
    if fails:
        ok = [pt for pt in passing if pt.fraction > fails[-1] + 1e-12]
        if ok:
            return RankRecommendation(ok[0].fraction, "unconfirmed", rule, reasons + [
                f"recovery attacks were not run at {_frac(ok[0].fraction)}: rerun them there before adopting it"],
                ok[0].cost)
        return RankRecommendation(None, "none", rule, reasons + [
            "every swept fraction passing G1/G2 is at or below a fraction where a recovery attack succeeds"])
    return RankRecommendation(passing[0].fraction, "provisional", rule,
                              reasons + ["no recovery-attack evidence: G3 unchecked"], passing[0].cost)
