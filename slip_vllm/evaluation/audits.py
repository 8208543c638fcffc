"""Security audits of the evaluation report that need no training (brief §8, attacks (a), (b), (d) and
the traffic half of (b) for ``shielded``).

What this module owns
---------------------
(a) :func:`subspace_audit`: the null-space attack on every protected matrix of an artifact, with and
    without blinding;
(a') :func:`spectral_gap_audit`: the prior-free spectral-gap attack (singular values "inserted" among
    the tail's) on every protected matrix, against the shipped blinding and the earlier block one;
(b) :func:`split_extraction_audit`: least-squares extraction of W_C from recorded ``split`` traffic;
(c) :func:`shielded_extraction_audit`: the same attacker's best linear fit on recorded ``shielded``
    traffic;
(d) :func:`mask_freshness_audit`: duplicates, uniformity and plaintext correlation of the masked
    values of a recorded ``shielded`` run;
(e) :func:`logit_matrix_audit`: the logit-matrix attack (Carlini et al. 2024) on the logits rows a
    ``shielded`` host receives under each logits policy of the service;
and the two recorders that produce the traffic: :class:`SplitTraffic` (the ``split`` protocol run in
process: the public residual model as the host, the service's own :class:`SplitExecutor` as the
secure side) and :func:`record_shielded_run` (the service's :class:`ShieldedExecutor` driven through
its ``host_gemm`` callback, which receives exactly what the host sees).

Every audit returns its numbers and a verdict computed from them ("protection fails" / "holds" /
"leaks"), with the rule that produced it. The module runs on the evaluator's machine: it holds the
original weights and both halves, which the host never does; the attacker's computations use only what
the host sees, and the evaluator's knowledge is used only to score them.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Sequence

import numpy as np
import torch

from slip_vllm.evaluation import quality as q
from slip_vllm.evaluation import reference_model as rm

LS_TARGET_ERROR = 1e-3           # (b): "recovered" means relative Frobenius error below this
CHANCE_R2_MARGIN = 0.05          # (c): a fit "at chance" explains at most this much held-out variance
# (d): family-wise false-alarm rate of the uniformity / correlation tests.  Fresh masks come from the
# OS CSPRNG, so every run draws new data: at 1e-3 one honest run in a thousand would be flagged (seen
# once in CI); 1e-6 keeps the controls (plaintext, a reused mask: p ~ 0) far below the threshold.
MASK_ALPHA = 1e-6
SUBSPACE_P_VALUE = 1e-4          # (a): blinded matrices: hypergeometric p-value above this ...
SUBSPACE_CHANCE_FACTOR = 1.5     # ... and overlap below this multiple of chance
SUBSPACE_LEAK_OVERLAP = 0.95     # (a): an overlap above this recovers the secret subspaces
SPECTRAL_GAP_TRIALS = 24         # (a'): fresh blindings of every matrix the attack is averaged over
SPECTRAL_GAP_CHANCE_FACTOR = 1.5  # (a'): holds if every matrix's mean score is <= this x chance


# ==================================================================================================
# (a) subspace / null-space attack on the public residual


@dataclass
class SubspaceMatrixResult:
    name: str
    shape: tuple[int, int]
    rank: int
    chance: float
    unblinded_overlap: float
    unblinded_p: float
    blinded_overlap: float
    blinded_p: float


@dataclass
class SubspaceAudit:
    fraction: float
    matrices: list[SubspaceMatrixResult]
    unblinded_verdict: str
    blinded_verdict: str
    rule: str
    seconds: float


def subspace_audit(ref_dir: Path, work_dir: Path, fraction: float, *, seed: int = q.EVAL_PROTECT_SEED) -> SubspaceAudit:
    """Attack (a) on every protected matrix of the reference model's ``split`` artifact.

    Protocol:
      1. ``slip protect`` twice at the same rank fraction: ``blinding=False`` (the textbook residual
         W - U_k S_k V_k^T) and ``blinding=True`` (the shipped construction, brief §3);
      2. the attacker takes each public residual W_D and guesses the secret subspaces as its k
         weakest singular directions (``decompose.subspace_attack``; the better of the left/right
         side); the evaluator scores the guess against the top-k singular directions of the
         original W (mean squared cosine; chance = k / min(m, n); hypergeometric p-value).
    Verdicts: unblinded "protection fails" if the overlap exceeds 0.95 on every matrix; blinded
    "holds" if every matrix has p > 1e-4 and mean overlap < 1.5 x chance.
    """
    from safetensors.torch import load_file

    from slip_vllm.core.decompose import subspace_attack
    from slip_vllm.core.manifest import ORIENT_IN_OUT, read_public_manifest

    t0 = time.perf_counter()
    original = load_file(str(next(Path(ref_dir).glob("*.safetensors"))))
    publics = {}
    for blind in (False, True):
        out = q.protect_reference(ref_dir, Path(work_dir) / f"subspace-{'blind' if blind else 'noblind'}-{q._tag(fraction)}",
                                  protocol="split", fraction=fraction, seed=seed, blinding=blind)
        manifest, _ = read_public_manifest(out / "public")
        publics[blind] = (manifest, load_file(str(out / "public" / "model.safetensors")))
    manifest, _ = publics[True]
    results = []
    for entry in manifest.tensors:
        w = original[entry.name].double()
        orient = (lambda t: t.T) if entry.orientation == ORIENT_IN_OUT else (lambda t: t)
        w = orient(w)
        res = {}
        for blind in (False, True):
            d = orient(publics[blind][1][entry.name].double())
            res[blind] = subspace_attack(w, d, entry.rank)
        results.append(SubspaceMatrixResult(entry.name, tuple(entry.shape), entry.rank, res[True].chance,
                                            res[False].overlap, res[False].p_value, res[True].overlap,
                                            res[True].p_value))
    leak = all(r.unblinded_overlap > SUBSPACE_LEAK_OVERLAP for r in results)
    mean_blind = float(np.mean([r.blinded_overlap for r in results]))
    mean_chance = float(np.mean([r.chance for r in results]))
    blinded_ok = (all(r.blinded_p > SUBSPACE_P_VALUE for r in results)
                  and mean_blind < SUBSPACE_CHANCE_FACTOR * mean_chance)
    worst = min(results, key=lambda r: r.blinded_p)
    unblinded_verdict = (f"protection fails: the secret subspaces are read off every unblinded residual "
                         f"(min overlap {min(r.unblinded_overlap for r in results):.3f})" if leak else
                         f"attack succeeds only partly (min overlap {min(r.unblinded_overlap for r in results):.3f})")
    blinded_verdict = (f"holds: no better than chance on every matrix (mean overlap {mean_blind:.3f} vs chance "
                       f"{mean_chance:.3f}; smallest p-value {worst.blinded_p:.2g} on {worst.name})" if blinded_ok else
                       f"protection fails: blinded residual leaks (mean overlap {mean_blind:.3f} vs chance "
                       f"{mean_chance:.3f}; smallest p-value {worst.blinded_p:.2g} on {worst.name})")
    rule = (f"unblinded fails if overlap > {SUBSPACE_LEAK_OVERLAP} on every matrix; blinded holds if every "
            f"matrix has p > {SUBSPACE_P_VALUE:g} and mean overlap < {SUBSPACE_CHANCE_FACTOR} x chance")
    return SubspaceAudit(fraction, results, unblinded_verdict, blinded_verdict, rule, time.perf_counter() - t0)


# ==================================================================================================
# (a') the prior-free spectral-gap attack on the public residual


@dataclass
class SpectralGapMatrixResult:
    name: str
    shape: tuple[int, int]
    rank: int
    chance: float            # k / min(m, n)
    published_ratio: float   # score / chance of the attack on the artifact's own W_D (one draw)
    mixed_ratio: float       # mean over fresh blindings, shipped scheme
    block_ratio: float       # mean over fresh blindings, the earlier block scheme
    control_ratio: float     # k random pairs of each fresh shipped W_D, scored the same way
    mixed_side: str          # the target the attack did best on most often (shipped scheme)


@dataclass
class SpectralGapAudit:
    model: str
    fraction: float
    trials: int
    matrices: list[SpectralGapMatrixResult]
    mixed_mean: float
    mixed_max: float
    block_mean: float
    control_mean: float
    verdict: str
    block_verdict: str
    rule: str
    seconds: float


def spectral_gap_audit(model_dir: Path, work_dir: Path, fraction: float, *, label: str = "reference",
                       trials: int = SPECTRAL_GAP_TRIALS, seed: int = q.EVAL_PROTECT_SEED) -> SpectralGapAudit:
    """Attack (a') on every protected matrix of ``model_dir``'s ``split`` artifact.

    Protocol:
      1. ``slip protect`` (blinding on, the shipped scheme) at the rank fraction; the attacker runs
         ``decompose.spectral_gap_select`` on each published W_D: prior-free, it uses W_D's spectrum
         only and greedily removes the k singular values whose removal leaves the most typical gaps
         (an inserted value splits a gap, a genuine one does not);
      2. the evaluator scores the singular vectors of the picked pairs (``decompose.spectral_gap_attack``):
         mean squared cosine with the best of four secret subspaces (top-k of W left/right, column
         and row space of W_C), over chance k / min(m, n);
      3. one draw is noisy (k picks), so the same matrix W is split again ``trials`` times with fresh
         blinding streams under the shipped ``mixed`` and the earlier ``block`` scheme and the scores
         averaged; a control scores k random pairs of each fresh shipped W_D the same way (the level
         that "chance" means for this score, which takes the best of four targets).
    Verdict: holds if every matrix's mean score under ``mixed`` is <= 1.5 x chance; the block scheme
    "leaks" if its mean over the matrices exceeds 1.5 x chance.
    """
    import hashlib

    from safetensors.torch import load_file

    from slip_vllm.core.decompose import BlindingRng, RankPolicy, spectral_gap_attack, split_matrix
    from slip_vllm.core.manifest import ORIENT_IN_OUT, read_public_manifest

    t0 = time.perf_counter()
    original = load_file(str(next(Path(model_dir).glob("*.safetensors"))))
    out = q.protect_reference(model_dir, Path(work_dir) / f"spectral-{label}-{q._tag(fraction)}", protocol="split",
                              fraction=fraction, seed=seed, blinding=True)
    manifest, _ = read_public_manifest(out / "public")
    public = load_file(str(out / "public" / "model.safetensors"))
    factors = load_file(str(out / "secret" / "factors.safetensors"))
    control_rng = np.random.default_rng(seed)
    results = []
    for entry in manifest.tensors:
        orient = (lambda t: t.T) if entry.orientation == ORIENT_IN_OUT else (lambda t: t)
        w = orient(original[entry.name].float()).contiguous()
        k = entry.rank
        shipped = spectral_gap_attack(w, orient(public[entry.name].float()), k, factors[f"t{entry.id}.left"],
                                      factors[f"t{entry.id}.right"])
        ratios: dict[str, list[float]] = {"mixed": [], "block": [], "control": []}
        sides: dict[str, int] = defaultdict(int)
        for scheme in ("mixed", "block"):
            key = hashlib.shake_256(f"spectral-gap|{seed}|{label}|{entry.name}|{scheme}".encode()).digest(32)
            rng = BlindingRng(key)
            for _ in range(trials):
                sp = split_matrix(w, RankPolicy(absolute=k), rng, scheme=scheme)
                res = spectral_gap_attack(w, sp.public, k, sp.left, sp.right)
                ratios[scheme].append(res.overlap / res.chance)
                if scheme == "mixed":
                    sides[res.side] += 1
                    pick = control_rng.choice(min(w.shape), size=k, replace=False)
                    ctl = spectral_gap_attack(w, sp.public, k, sp.left, sp.right, chosen=pick)
                    ratios["control"].append(ctl.overlap / ctl.chance)
        results.append(SpectralGapMatrixResult(
            entry.name, tuple(entry.shape), k, shipped.chance, shipped.overlap / shipped.chance,
            float(np.mean(ratios["mixed"])), float(np.mean(ratios["block"])), float(np.mean(ratios["control"])),
            max(sides, key=sides.get)))
    mixed_mean = float(np.mean([r.mixed_ratio for r in results]))
    block_mean = float(np.mean([r.block_ratio for r in results]))
    control_mean = float(np.mean([r.control_ratio for r in results]))
    worst = max(results, key=lambda r: r.mixed_ratio)
    holds = worst.mixed_ratio <= SPECTRAL_GAP_CHANCE_FACTOR
    verdict = (f"{'holds' if holds else 'protection fails'}: shipped blinding, mean {mixed_mean:.2f} x chance over "
               f"{len(results)} matrices (random-pick control {control_mean:.2f} x), worst {worst.mixed_ratio:.2f} x on "
               f"{worst.name}")
    block_verdict = (f"{'leaks' if block_mean > SPECTRAL_GAP_CHANCE_FACTOR else 'at chance'}: earlier block "
                     f"blinding, mean {block_mean:.2f} x chance (max {max(r.block_ratio for r in results):.2f} x)")
    rule = (f"score = mean squared cosine of the picked singular vectors with the best of four secret subspaces, "
            f"over chance k/min(m,n), averaged over {trials} fresh blindings per matrix; holds if every matrix is "
            f"<= {SPECTRAL_GAP_CHANCE_FACTOR} x chance")
    return SpectralGapAudit(label, fraction, trials, results, mixed_mean, worst.mixed_ratio, block_mean, control_mean,
                            verdict, block_verdict, rule, time.perf_counter() - t0)


# ==================================================================================================
# (b) least-squares extraction of W_C from recorded split traffic


class SplitTraffic:
    """Protocol ``split`` in process, recording what the host sees.

    The host is the public residual model (transformers, W_D in every protected layer); the secure
    side is the service's own ``SplitExecutor`` on the secret bundle. Each protected linear's forward
    hook does what the plugin does: y = W_D x (the host's layer) + S(x) (the executor, same wire
    ``Request``), and records the host's view: the rows x it sent and the rows S(x) = W_C x it got
    back (token ids and W_C rows for the embedding). Up to ``max_rows`` rows per tensor are kept.
    """

    def __init__(self, ref_dir: Path, artifact: Path, max_rows: int):
        from secure_service.bundle import is_embedding, load_bundle
        from secure_service.split_executor import SplitExecutor
        from slip_vllm.core.wire import KIND_EMBED, KIND_LINEAR, Request

        self.bundle = load_bundle(artifact / "secret")
        self.executor = SplitExecutor(self.bundle)
        self.model = q.load_public_residual(ref_dir, artifact / "public")
        self.max_rows = max_rows
        self.x: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.y: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.rows: dict[int, int] = defaultdict(int)
        self.entries = {t.entry.id: t.entry for t in self.bundle.tensors}
        self.embedding_ids = {t.entry.id for t in self.bundle.tensors if is_embedding(t)}
        self._handles = []
        tied = self.bundle.manifest.tied_embeddings
        for t in self.bundle.tensors:
            module = self.model.get_submodule(t.entry.name.removesuffix(".weight"))
            tid = t.entry.id
            if is_embedding(t):
                def embed_hook(mod, inp, out, tid=tid):
                    ids = inp[0].reshape(-1)
                    s = self.executor.run(Request(KIND_EMBED, (tid,), 0, 0, ids.to(torch.int32)))
                    self._record(tid, ids, s)
                    return out + s.reshape(out.shape).to(out.dtype)
                self._handles.append(module.register_forward_hook(embed_hook))
                if tied:
                    self._hook_linear(self.model.get_output_embeddings(), tid, Request, KIND_LINEAR)
            else:
                self._hook_linear(module, tid, Request, KIND_LINEAR)

    def _hook_linear(self, module, tid, Request, KIND_LINEAR):
        def hook(mod, inp, out, tid=tid):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            s = self.executor.run(Request(KIND_LINEAR, (tid,), 0, 0, x))
            self._record(tid, x, s)
            return out + s.reshape(out.shape).to(out.dtype)
        self._handles.append(module.register_forward_hook(hook))

    def _record(self, tid: int, x: torch.Tensor, s: torch.Tensor) -> None:
        room = self.max_rows - self.rows[tid]
        if room > 0:
            self.x[tid].append(x[:room].detach().clone())
            self.y[tid].append(s[:room].detach().clone())
            self.rows[tid] += min(room, int(x.shape[0]))

    @torch.no_grad()
    def run(self, windows: Sequence[torch.Tensor], batch_size: int = 8) -> torch.Tensor:
        """Forward the windows (prompts the host serves); returns the logits of the last batch."""
        logits = None
        for i in range(0, len(windows), batch_size):
            logits = self.model(input_ids=torch.stack(list(windows[i:i + batch_size])), use_cache=False).logits
        return logits

    def observed(self, tid: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.x[tid]), torch.cat(self.y[tid])

    def secret(self, tid: int) -> torch.Tensor:
        t = self.bundle.tensors[tid]
        return t.left.double() @ t.right.double()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class ExtractionPoint:
    tokens: int
    max_rel_error: float          # over every protected linear (embedding excluded), weights
    median_rel_error: float
    max_functional_error: float   # ||(W_C_hat - W_C) x|| / ||W_C x|| on held-out traffic rows
    embedding_rows_recovered: float  # share of vocabulary rows of the embedding secret seen exactly
    attacker_ppl: float | None    # public residual + recovered secret, validation perplexity


@dataclass
class SplitExtractionAudit:
    fraction: float
    hidden: int
    widest_input: int
    in_process_max_logit_error: float  # in-process split vs the original model (sanity of the recorder)
    original_ppl: float
    residual_ppl: float
    points: list[ExtractionPoint]
    long_traffic: ExtractionPoint | None  # linears from the last grid point, embedding rows from a long run
    per_tensor_at_threshold: dict[str, float]
    tokens_needed: int | None
    verdict: str
    rule: str
    eval_positions: int
    seconds: float


def _ls_recover(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares W_hat [m, n] with y ~ x W_hat^T (minimum-norm when underdetermined)."""
    sol = torch.linalg.lstsq(x.double(), y.double(), driver="gelsd").solution  # [n, m]
    return sol.T


def split_extraction_audit(ref_dir: Path, artifact: Path, traffic_ids: torch.Tensor, evalset: q.EvalSet, *,
                           fraction: float, token_grid: Sequence[int] | None = None, holdout: int = 256,
                           seq_len: int, seed: int = 0, num_threads: int = 2,
                           original_ppl: float | None = None, residual_ppl: float | None = None,
                           embedding_traffic_tokens: int | None = None) -> SplitExtractionAudit:
    """Attack (b) against ``split``.

    Protocol:
      1. clients send real prompts (windows of the training stream, seeded order); the host serves
         them with the public residual, and for every protected layer sends the token rows x to the
         service and gets S(x) = W_C x back (:class:`SplitTraffic`, the service's real executor);
      2. the host keeps the first T rows (x, W_C x) of every layer and solves W_C_hat = argmin
         ||X W^T - Y|| (least squares, float64; minimum-norm below T = n); for the embedding it
         reads the rows W_C[id] of every token id it saw;
      3. the evaluator scores W_C_hat: relative Frobenius error against W_C, functional error on
         held-out traffic rows, and the perplexity of the attacker's model W_D + W_C_hat (embedding
         rows of token ids not seen yet stay W_D); last, the same with the embedding rows of a longer
         run (``embedding_traffic_tokens`` served tokens, default 100 x the largest grid point).
    Verdict: "protection fails" when every protected linear is recovered to relative error < 1e-3
    within the observed traffic (tokens needed = the smallest T on the grid that does it).
    """
    t0 = time.perf_counter()
    cfg_hidden = int(json.loads((Path(ref_dir) / "config.json").read_text())["hidden_size"])
    grid = sorted(set(int(t) for t in (token_grid or [cfg_hidden // 4, cfg_hidden // 2, cfg_hidden, 2 * cfg_hidden,
                                                        3 * cfg_hidden, 4 * cfg_hidden, 8 * cfg_hidden])))
    need_rows = grid[-1] + holdout
    n_windows = math.ceil(need_rows / seq_len)
    starts = rm.training_windows(traffic_ids.numel(), n_windows * seq_len, seq_len, seed)
    windows = [traffic_ids[s:s + seq_len] for s in starts[:n_windows]]

    with rm.deterministic(num_threads):
        traffic = SplitTraffic(ref_dir, artifact, max_rows=need_rows)
        try:
            with torch.no_grad():
                probe = torch.stack(windows[:2])
                got = traffic.model(input_ids=probe, use_cache=False).logits
                want = rm.load_model(ref_dir)(input_ids=probe, use_cache=False).logits
                logit_err = float((got - want).abs().max() / want.abs().max())
            for k in list(traffic.rows):
                traffic.rows[k] = 0
            traffic.x.clear()
            traffic.y.clear()
            traffic.run(windows)
        finally:
            traffic.close()
        from safetensors.torch import load_file

        public_state = load_file(str(artifact / "public" / "model.safetensors"))

        def attacker_perplexity(recovered: dict) -> float:
            """The attacker's model: the public residual plus every recovered secret term."""
            state = dict(public_state)
            for tid, w_hat in recovered.items():
                e = traffic.entries[tid]
                state[e.name] = (public_state[e.name].double() + (w_hat.T if e.orientation == "in_out" else w_hat)).float()
            return q.score_model(q.load_with_state(ref_dir, state), evalset, num_threads=num_threads).perplexity

        linear_ids = [tid for tid in traffic.entries if tid not in traffic.embedding_ids]
        secrets = {tid: traffic.secret(tid) for tid in traffic.entries}
        observed = {tid: traffic.observed(tid) for tid in traffic.entries}
        widest = max(traffic.entries[tid].shape[1] for tid in linear_ids)
        if original_ppl is None:
            original_ppl = q.score_model(rm.load_model(ref_dir), evalset, num_threads=num_threads).perplexity
        if residual_ppl is None:
            residual_ppl = q.score_model(q.load_public_residual(ref_dir, artifact / "public"), evalset,
                                         num_threads=num_threads).perplexity
        points, per_tensor_at = [], {}
        tokens_needed = None
        for T in grid:
            errors, functional, recovered = {}, [], {}
            for tid in linear_ids:
                x, y = observed[tid]
                if x.shape[0] < T + holdout:
                    raise RuntimeError(f"recorded only {x.shape[0]} rows for tensor {tid}; need {T + holdout}")
                w_hat = _ls_recover(x[:T], y[:T])
                w_c = secrets[tid]
                errors[traffic.entries[tid].name] = float(torch.linalg.norm(w_hat - w_c) / torch.linalg.norm(w_c))
                xt = x[-holdout:].double()
                functional.append(float(torch.linalg.norm(xt @ (w_hat - w_c).T) / torch.linalg.norm(xt @ w_c.T)))
                recovered[tid] = w_hat
            emb_share = 1.0
            for tid in traffic.embedding_ids:
                ids, rows = observed[tid]
                seen = torch.unique(ids[:T].long())
                w_hat = torch.zeros_like(secrets[tid])
                w_hat[seen] = rows[:T].double()[_first_index(ids[:T].long(), seen)]
                recovered[tid] = w_hat
                emb_share = float(seen.numel()) / secrets[tid].shape[0]
            attacker_ppl = attacker_perplexity(recovered)
            vals = list(errors.values())
            points.append(ExtractionPoint(T, max(vals), float(np.median(vals)), max(functional), emb_share, attacker_ppl))
            if tokens_needed is None and max(vals) < LS_TARGET_ERROR:
                tokens_needed = T
                per_tensor_at = errors
        if not per_tensor_at:
            per_tensor_at = errors
        # A longer run: the embedding's traffic is token ids out, rows W_C[id] back, with no forward
        # pass involved, so the host's view of serving `long_tokens` tokens is replayed through the
        # executor directly; the linears keep their estimate from the last grid point.
        long_point = None
        long_tokens = min(int(traffic_ids.numel()), embedding_traffic_tokens or 100 * grid[-1])
        if traffic.embedding_ids and long_tokens > grid[-1]:
            from slip_vllm.core.wire import KIND_EMBED, Request

            seen = torch.unique(traffic_ids[:long_tokens].long())
            for tid in traffic.embedding_ids:
                rows = traffic.executor.run(Request(KIND_EMBED, (tid,), 0, 0, seen.to(torch.int32)))
                w_hat = torch.zeros_like(secrets[tid])
                w_hat[seen] = rows.double()
                recovered[tid] = w_hat
                emb_share = float(seen.numel()) / secrets[tid].shape[0]
            long_ppl = attacker_perplexity(recovered)
            long_point = ExtractionPoint(long_tokens, points[-1].max_rel_error, points[-1].median_rel_error,
                                         points[-1].max_functional_error, emb_share, long_ppl)
    if tokens_needed is not None:
        at = next(p for p in points if p.tokens == tokens_needed)
        best = long_point or points[-1]
        verdict = (f"protection fails: every protected linear's W_C recovered to relative error < {LS_TARGET_ERROR:g} "
                   f"from {tokens_needed} observed tokens (widest layer input {widest}); the attacker's model "
                   f"reaches perplexity {at.attacker_ppl:.2f} there and {best.attacker_ppl:.2f} with the embedding "
                   f"rows of {best.tokens:,} served tokens (original {original_ppl:.2f}, public residual alone "
                   f"{residual_ppl:.1f})")
    else:
        verdict = (f"holds within the observed traffic: relative error {points[-1].max_rel_error:.2g} after "
                   f"{grid[-1]} tokens")
    rule = (f"fails if least squares on the first T observed (x, W_C x) rows recovers W_C of every protected "
            f"linear to relative Frobenius error < {LS_TARGET_ERROR:g} for some T on the grid")
    return SplitExtractionAudit(fraction, cfg_hidden, widest, logit_err, original_ppl, residual_ppl, points,
                                long_point, per_tensor_at, tokens_needed, verdict, rule, evalset.scored_positions,
                                time.perf_counter() - t0)


def _first_index(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the first occurrence in ``ids`` of each of the sorted unique ``values``."""
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    pos = torch.searchsorted(sorted_ids, values)
    return order[pos]


# ==================================================================================================
# recording a shielded run


class _RetainingMasks:
    """Evaluator-side wrapper of the service's mask provider: hands out the same batches and keeps a
    copy of every mask r, so the evaluator can compute x_q = x~ - r for scoring. (The service itself
    overwrites r right after masking; this copy exists only in the evaluation.)"""

    def __init__(self, inner):
        self.inner = inner
        self.p = inner.p
        self.kept: dict[Hashable, list[torch.Tensor]] = defaultdict(list)

    def take(self, layer_id, rows):
        batch = self.inner.take(layer_id, rows)
        self.kept[layer_id].append(batch.r.clone())
        return batch

    def shape(self, layer_id):
        return self.inner.shape(layer_id)

    def stats(self):
        return self.inner.stats()

    def close(self):
        self.inner.close()


@dataclass
class _StreamStats:
    """Running statistics of (x~, x_q) pairs of one layer for audit (d)."""

    n: int
    p: int
    bins: int = 64
    rows: int = 0
    top_counts: np.ndarray | None = None
    low_counts: np.ndarray | None = None
    plain_counts: np.ndarray | None = None  # negative control: x_q mod p bucketed like x~
    sums: dict = field(default_factory=dict)

    def __post_init__(self):
        self.top_counts = np.zeros(self.bins, dtype=np.int64)
        self.low_counts = np.zeros(self.bins, dtype=np.int64)
        self.plain_counts = np.zeros(self.bins, dtype=np.int64)
        self.sums = {name: np.zeros(self.n) for name in ("a", "b", "aa", "bb", "ab", "reuse_a", "reuse_aa", "reuse_ab")}
        self.reuse_mask = None

    def add(self, x_masked: torch.Tensor, x_q: torch.Tensor) -> None:
        xm = x_masked.numpy()
        xq = x_q.numpy()
        self.rows += xm.shape[0]
        self.top_counts += np.bincount(((xm * self.bins) // self.p).ravel(), minlength=self.bins)
        self.low_counts += np.bincount((xm % self.bins).ravel(), minlength=self.bins)
        self.plain_counts += np.bincount((((xq % self.p) * self.bins) // self.p).ravel(), minlength=self.bins)
        a = xm.astype(np.float64) / self.p
        b = xq.astype(np.float64)
        s = self.sums
        for name, value in (("a", a), ("b", b), ("aa", a * a), ("bb", b * b), ("ab", a * b)):
            s[name] += value.sum(0)
        # negative control: what the host would see if ONE mask were reused for every row
        if self.reuse_mask is None:
            self.reuse_mask = xm[0].astype(np.int64) - xq[0].astype(np.int64)
        ra = ((xq + self.reuse_mask) % self.p).astype(np.float64) / self.p
        for name, value in (("reuse_a", ra), ("reuse_aa", ra * ra), ("reuse_ab", ra * b)):
            s[name] += value.sum(0)

    def correlations(self, reuse: bool = False) -> np.ndarray:
        s, n = self.sums, self.rows
        a, aa, ab = (s["reuse_a"], s["reuse_aa"], s["reuse_ab"]) if reuse else (s["a"], s["aa"], s["ab"])
        cov = ab / n - (a / n) * (s["b"] / n)
        va = aa / n - (a / n) ** 2
        vb = s["bb"] / n - (s["b"] / n) ** 2
        ok = (va > 0) & (vb > 0)
        # clipped: the running sums lose a few ulps when a coordinate is almost constant
        return np.clip(np.where(ok, cov / np.sqrt(np.where(ok, va * vb, 1.0)), 0.0), -1.0, 1.0)


@dataclass
class ShieldedRecording:
    """What a recorded shielded run yields: scores for the quality table, stored host views of some
    layers for audit (c), running statistics of every layer for audit (d), the mask audit log."""

    fraction: float
    p: int
    windows: int
    tokens: int
    scores: q.Scores
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]]    # key -> (x~ [R, n] int64, x_q [R, n] int64)
    secret_factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    stats: dict[str, _StreamStats]
    host_rows: int
    host_calls: int
    mask_rows_recorded: int
    mask_unique_rows: int
    mask_duplicates: int
    mask_provider_stats: dict
    seconds: float


def record_shielded_run(ref_dir: Path, windows: Sequence[torch.Tensor], *, fraction: float,
                        seed: int = q.EVAL_PROTECT_SEED, store_keys: Sequence[str] | None = None,
                        windows_per_step: int = 4, block_size: int = 16, pool_rows: int = 64,
                        max_store_rows: int = 4096,
                        num_threads: int = 2, progress: Callable[[str], None] = lambda s: None) -> ShieldedRecording:
    """Drive the service's ``ShieldedExecutor`` (mode "shielded") over real prompts and record the host's view.

    Protocol of the recorded run:
      1. split the reference checkpoint at the rank fraction (blinded), quantize W_D to int8, choose p
         (exactly what ``from_checkpoint`` does), and give the executor a ``PooledMaskProvider`` with a
         ``MaskAuditRecorder`` (keyed fingerprint of every mask row handed out);
      2. each step prefills ``windows_per_step`` windows (one sequence each, paged KV cache) and asks
         logits for every position (the prompt log-probs of the quality table);
      3. ``host_gemm(key, x~)`` is the host: it receives exactly x~ and answers W_q x~ mod p with
         the public int8 weights (an honest host); the recorder keeps x~ (the first
         ``max_store_rows`` rows of the stored keys: layer 0 and the LM head by default) and running
         statistics of every layer; the evaluator's copy of the masks gives x_q = x~ - r
         for scoring only.
    """
    from secure_service.masks import MaskAuditRecorder, PooledMaskProvider
    from secure_service.shielded_executor import ShieldedExecutor
    from slip_vllm.core.shielded_split import split_checkpoint
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.core.quantize import DEFAULT_ACT_BITS, PublicWeight, centered_lift, quantize_weight, select_prime

    t0 = time.perf_counter()
    with rm.deterministic(num_threads):
        config, splits, embed, norms = split_checkpoint(ref_dir, RankPolicy(fraction=fraction), seed=seed, blind=True)
        quantized = {k: quantize_weight(s.public, 8) for k, s in splits.items()}
        p = select_prime({k: w.w_q for k, w in quantized.items()}, act_bits=DEFAULT_ACT_BITS)
        public = {k: PublicWeight(w.w_q, p) for k, w in quantized.items()}
        audit_log = MaskAuditRecorder()
        provider = PooledMaskProvider(public, p, pool_rows=pool_rows, recorder=audit_log)
        masks = _RetainingMasks(provider)
        L = max(int(w.numel()) for w in windows)
        blocks_per_seq = -(-L // block_size)
        executor = ShieldedExecutor(config, splits, embed, norms, num_blocks=windows_per_step * blocks_per_seq,
                                    block_size=block_size, mode="shielded", quantized=quantized, p=p, masks=masks)
        store = set(store_keys if store_keys is not None else [k for k in executor.layer_keys()
                                                                 if k.startswith("layers.0.") or k == "lm_head"])
        stored_x: dict[str, list] = defaultdict(list)
        stored_q: dict[str, list] = defaultdict(list)
        stats: dict[str, _StreamStats] = {}
        host = {k: PublicWeight(w, p) for k, w in executor.public_weights().items()}
        counters = {"rows": 0, "calls": 0}

        def host_gemm(key: str, x_masked: torch.Tensor) -> torch.Tensor:
            # the host's whole view of this layer and step: x~ (and p, W_q)
            counters["rows"] += int(x_masked.shape[0])
            counters["calls"] += 1
            r = masks.kept[key].pop(0)
            x_q = centered_lift(torch.remainder(x_masked - r, p), p)
            r.zero_()
            if key not in stats:
                stats[key] = _StreamStats(int(x_masked.shape[1]), p)
            stats[key].add(x_masked, x_q)
            room = max_store_rows - sum(int(t.shape[0]) for t in stored_x.get(key, ()))
            if key in store and room > 0:  # memory: only the first rows of a few layers are kept whole
                stored_x[key].append(x_masked[:room].clone())
                stored_q[key].append(x_q[:room])
            return host[key].matmul(x_masked)

        parts = []
        try:
            for i in range(0, len(windows), windows_per_step):
                group = list(windows[i:i + windows_per_step])
                ids = torch.cat(group)
                lens = torch.tensor([int(w.numel()) for w in group])
                qsl = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lens, 0)])
                tables = torch.arange(len(group) * blocks_per_seq).reshape(len(group), blocks_per_seq)
                positions = torch.cat([torch.arange(int(n)) for n in lens])
                seq_of = torch.repeat_interleave(torch.arange(len(group)), lens)
                slots = tables[seq_of, positions // block_size] * block_size + positions % block_size
                logits = executor.step(ids, positions, slots, qsl, lens, tables, host_gemm=host_gemm,
                                       logits_indices=torch.arange(int(ids.numel())))
                for s, w in enumerate(group):
                    parts.append(q.scores_from_logits(logits[int(qsl[s]):int(qsl[s + 1])], w))
                progress(f"shielded run: {min(i + windows_per_step, len(windows))}/{len(windows)} windows")
        finally:
            executor.close()
    return ShieldedRecording(
        fraction=fraction, p=p, windows=len(windows), tokens=sum(int(w.numel()) for w in windows),
        scores=q.concat_scores(parts), stored={k: (torch.cat(stored_x[k]), torch.cat(stored_q[k])) for k in stored_x},
        secret_factors={k: (splits[k].left, splits[k].right) for k in store}, stats=stats,
        host_rows=counters["rows"], host_calls=counters["calls"], mask_rows_recorded=audit_log.rows_recorded,
        mask_unique_rows=audit_log.unique_rows, mask_duplicates=len(audit_log.duplicates),
        mask_provider_stats=provider.stats(), seconds=time.perf_counter() - t0)


# ==================================================================================================
# (c) what an attacker can fit from shielded traffic


@dataclass
class FitPoint:
    key: str
    target: str           # "x_q" (plaintext activations) or "W_C x_q" (the secret term)
    tokens: int
    r2_shielded: float    # held-out R^2 of the best linear fit from x~ (the host's view)
    rel_error_shielded: float
    r2_split_control: float  # the same fitter given the split host's view (x_q itself)
    r2_noise_control: float  # the same fitter given fresh uniform noise of the same shape


@dataclass
class ShieldedExtractionAudit:
    fraction: float
    points: list[FitPoint]
    chance_threshold: float
    verdict: str
    rule: str
    seconds: float


def _fit_r2(features: torch.Tensor, targets: torch.Tensor, train: int, holdout: int) -> tuple[float, float]:
    """Held-out R^2 (mean over target columns with variance) and relative error of least squares with
    an intercept, trained on the first ``train`` rows, tested on the last ``holdout`` rows."""
    f = torch.cat([features.double(), torch.ones(features.shape[0], 1, dtype=torch.float64)], 1)
    y = targets.double()
    sol = torch.linalg.lstsq(f[:train], y[:train], driver="gelsd").solution
    pred = f[-holdout:] @ sol
    yt = y[-holdout:]
    resid = ((yt - pred) ** 2).sum(0)
    total = ((yt - y[:train].mean(0)) ** 2).sum(0)
    keep = total > 1e-12 * total.max().clamp_min(1e-300)
    r2 = float((1 - resid[keep] / total[keep]).mean()) if bool(keep.any()) else 0.0
    rel = float(torch.linalg.norm(yt - pred) / torch.linalg.norm(yt).clamp_min(1e-300))
    return r2, rel


def shielded_extraction_audit(rec: ShieldedRecording, *, holdout: int | None = None,
                              multiples: Sequence[float] = (0.5, 2, 4, 8), seed: int = 0) -> ShieldedExtractionAudit:
    """Attack (b) against ``shielded``, on the recorded host view (audit (c) of the brief's list).

    Protocol: the host's only per-layer observation is x~ (uniform in Z_p; it computes y~ = W_q x~
    itself, and W_C x never leaves the service). The strongest thing an extraction attack could
    start from is a map from x~ to the plaintext activations or to the secret term, so the attacker
    fits, by least squares with an intercept on the first T recorded rows, (1) x_q (the plaintext
    fixed-point activations) and (2) W_C x_q (the secret term) from x~ / p; the evaluator scores the
    fit on held-out rows (R^2, relative error). Positive control: the same fitter given the split
    host's view (x_q itself) recovers the secret term (R^2 ~ 1). Negative control: fresh uniform
    noise features (chance level). Verdict: "holds" if the shielded fit's held-out R^2 stays below
    max(0.05, noise control + 0.05) for every layer, target and T while the positive control
    reaches 0.99 at each layer's largest T.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    points = []
    for key, (x_masked, x_q) in sorted(rec.stored.items()):
        rows, n = x_masked.shape
        hold = holdout or max(64, rows // 5)
        left, right = rec.secret_factors[key]
        secret_term = (x_q.double() @ right.double().T) @ left.double().T
        feats = x_masked.double() / rec.p - 0.5
        noise = torch.rand(x_masked.shape, generator=gen, dtype=torch.float64) - 0.5
        for mult in multiples:
            T = int(mult * n)
            if T < 2 or T > rows - hold:
                continue
            for target_name, target in (("x_q", x_q.double()), ("W_C x_q", secret_term)):
                r2, rel = _fit_r2(feats, target, T, hold)
                r2_split, _ = _fit_r2(x_q.double(), target, T, hold)
                r2_noise, _ = _fit_r2(noise, target, T, hold)
                points.append(FitPoint(key, target_name, T, r2, rel, r2_split, r2_noise))
    if not points:
        raise ValueError("the recorded run is too short for any fit (record more tokens)")
    chance = max(CHANCE_R2_MARGIN, max(p.r2_noise_control for p in points) + CHANCE_R2_MARGIN)
    worst = max(points, key=lambda p: p.r2_shielded)
    # positive control at each layer's largest T (layer 0's input depends on the token id only, so its
    # rows have fewer distinct values than columns until enough distinct tokens were seen)
    control = [max((p for p in points if p.key == key and p.target == "W_C x_q"), key=lambda p: p.tokens)
               for key in sorted({p.key for p in points})]
    control_ok = bool(control) and min(p.r2_split_control for p in control) >= 0.99
    if worst.r2_shielded <= chance and control_ok:
        verdict = (f"holds: nothing beyond chance is recoverable from x~ (best held-out R^2 {worst.r2_shielded:.3f} "
                   f"on {worst.key} / {worst.target} with {worst.tokens} tokens; chance threshold {chance:.3f}); "
                   f"the same fitter on the split host's view recovers the secret term (R^2 >= "
                   f"{min(p.r2_split_control for p in control):.4f})")
    elif worst.r2_shielded > chance:
        verdict = (f"protection fails: x~ predicts {worst.target} of {worst.key} with held-out R^2 "
                   f"{worst.r2_shielded:.3f} > chance threshold {chance:.3f}")
    else:
        verdict = "inconclusive: the positive control did not recover the secret term (too few rows recorded)"
    rule = (f"holds if every held-out R^2 from x~ <= max({CHANCE_R2_MARGIN}, noise control + {CHANCE_R2_MARGIN}) "
            "and the split-view control reaches R^2 >= 0.99 at each layer's largest T")
    return ShieldedExtractionAudit(rec.fraction, points, chance, verdict, rule, time.perf_counter() - t0)


# ==================================================================================================
# (d) mask freshness


@dataclass
class MaskLayerResult:
    key: str
    rows: int
    width: int
    chi2_top_p: float        # uniformity of x~ on 64 top-bit buckets
    chi2_low_p: float        # uniformity of x~ mod 64
    chi2_plain_p: float      # negative control: the plaintext x_q bucketed the same way
    corr_global: float       # Pearson correlation of all (x~, x_q) element pairs of the layer
    corr_max_coordinate: float  # max over input coordinates of |corr(x~_j, x_q_j)|
    corr_threshold: float
    corr_reuse_control: float   # max |corr| if one mask had been reused for every row


@dataclass
class MaskFreshnessAudit:
    host_rows: int
    host_calls: int
    mask_rows: int
    unique_rows: int
    duplicates: int
    layers: list[MaskLayerResult]
    min_p_value: float
    p_threshold: float
    verdict: str
    rule: str
    provider_stats: dict
    seconds: float


def mask_freshness_audit(rec: ShieldedRecording) -> MaskFreshnessAudit:
    """Audit (d) over a recorded shielded run.

    Protocol: (1) count the mask rows the provider handed out (keyed fingerprints,
    ``MaskAuditRecorder``) against the token rows the host received, and the repeats among them
    (must be 0: a repeated mask row lets the host subtract two masked rows and read a plaintext
    difference); (2) chi-square uniformity of the masked values x~, per layer, on 64 buckets of the
    top bits and 64 buckets of the low bits (negative control: the plaintext itself, bucketed the
    same way, must be rejected); (3) Pearson correlation of x~ with the plaintext x_q, over all
    elements and per input coordinate (negative control: the same statistic if one mask were reused
    for every row, which it must flag). Thresholds are Bonferroni-corrected for a family-wise
    false-alarm rate of ``MASK_ALPHA``.
    Verdict: "holds" if duplicates == 0, every handed-out row was used for exactly one host row,
    every p-value is above the threshold and every |corr| below its threshold.
    """
    from scipy import stats as st

    t0 = time.perf_counter()
    layers = []
    n_tests = 2 * len(rec.stats)
    p_threshold = MASK_ALPHA / max(1, n_tests)
    for key, s in sorted(rec.stats.items()):
        corr = s.correlations()
        elements = s.rows
        z = float(st.norm.isf(MASK_ALPHA / (2 * s.n * len(rec.stats))))
        threshold = z / math.sqrt(elements)
        ab_global = s.sums["ab"].sum() / (s.rows * s.n) - (s.sums["a"].sum() / (s.rows * s.n)) * (s.sums["b"].sum() / (s.rows * s.n))
        va = s.sums["aa"].sum() / (s.rows * s.n) - (s.sums["a"].sum() / (s.rows * s.n)) ** 2
        vb = s.sums["bb"].sum() / (s.rows * s.n) - (s.sums["b"].sum() / (s.rows * s.n)) ** 2
        layers.append(MaskLayerResult(
            key, s.rows, s.n, float(st.chisquare(s.top_counts).pvalue), float(st.chisquare(s.low_counts).pvalue),
            float(st.chisquare(s.plain_counts).pvalue), float(ab_global / math.sqrt(va * vb)) if va > 0 and vb > 0 else 0.0,
            float(np.abs(corr).max()), threshold, float(np.abs(s.correlations(reuse=True)).max())))
    min_p = min(min(r.chi2_top_p, r.chi2_low_p) for r in layers)
    corr_ok = all(r.corr_max_coordinate < r.corr_threshold and abs(r.corr_global) < r.corr_threshold for r in layers)
    controls_ok = all(r.chi2_plain_p < p_threshold and r.corr_reuse_control > r.corr_threshold for r in layers)
    count_ok = rec.mask_rows_recorded == rec.host_rows == rec.mask_unique_rows
    fails = []
    if rec.mask_duplicates:
        fails.append(f"{rec.mask_duplicates} repeated mask rows")
    if not count_ok:
        fails.append(f"mask rows {rec.mask_rows_recorded} / unique {rec.mask_unique_rows} / host rows {rec.host_rows} differ")
    if min_p <= p_threshold:
        fails.append(f"uniformity rejected (p = {min_p:.2g})")
    if not corr_ok:
        fails.append("x~ correlates with the plaintext")
    if fails:
        verdict = "protection fails: " + "; ".join(fails)
    else:
        verdict = (f"holds: {rec.mask_rows_recorded} mask rows for {rec.host_rows} host rows, 0 duplicates; "
                   f"smallest uniformity p-value {min_p:.3g} (threshold {p_threshold:.1g}); no correlation with "
                   f"the plaintext" + ("" if controls_ok else " (WARNING: a negative control did not fire)"))
    rule = ("holds if duplicates = 0, mask rows = unique rows = host rows, every chi-square p-value > "
            f"{MASK_ALPHA:g}/#tests and every |corr| < z_({MASK_ALPHA:g}/#coords)/sqrt(rows)")
    return MaskFreshnessAudit(rec.host_rows, rec.host_calls, rec.mask_rows_recorded, rec.mask_unique_rows,
                              rec.mask_duplicates, layers, min_p, p_threshold, verdict, rule,
                              rec.mask_provider_stats, time.perf_counter() - t0)


def as_dict(obj) -> dict:
    return asdict(obj)


# ==================================================================================================
# (e) the logit-matrix attack on what a shielded host receives of the LM head


@dataclass
class LogitPolicyResult:
    policy: str
    rows: int
    observed_per_row: int     # finite logits per row the host receives
    rank_estimate: int        # the attacker's estimate of the hidden size (singular-value drop)
    subspace_overlap: float   # mean squared cosine of the attacker's d-dim estimate with span(LM head)
    chance: float             # d / vocab: a random d-dim subspace
    heldout_rel_error: float  # relative error predicting held-out rows' received logits (nan: <= d per row)


@dataclass
class LogitMatrixAudit:
    hidden: int
    vocab: int
    results: list[LogitPolicyResult]
    rule: str
    seconds: float


def _completion(z: torch.Tensor, seen: torch.Tensor, d: int, iters: int) -> torch.Tensor:
    """Rank-d completion of the partially observed logit matrix (hard impute): unseen entries start
    at the row's smallest seen value and are replaced by the rank-d SVD fit, ``iters`` times."""
    fill = torch.where(seen, z, torch.zeros_like(z))
    low = torch.where(seen, z, torch.full_like(z, math.inf)).min(dim=1, keepdim=True).values
    x = torch.where(seen, z, low.expand_as(z))
    for _ in range(iters):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        approx = (u[:, :d] * s[:d]) @ vh[:d]
        x = torch.where(seen, fill, approx)
    return x


def logit_matrix_audit(model_dir: Path, windows: Sequence[torch.Tensor], *, policies: Sequence = (),
                       holdout: int = 200, iters: int = 30, num_threads: int = 2) -> LogitMatrixAudit:
    """Attack (e): what the host learns about the LM head from the logits it receives.

    Protocol:
      1. the logits rows of the prompts' positions (the host names the rows it wants; the model's
         logits, which the service's equal up to its fixed-point rounding) are passed through each
         policy (``secure_service.logits_policy.LogitsPolicy.apply``: what the host receives);
      2. the attacker stacks N received rows, Z = H A^T (A: the effective LM head, V x d, h: the
         secret final hidden states); where entries are -inf it completes Z at rank d (hard impute,
         given the true d: generous); it estimates the hidden size from the singular-value drop
         (largest ratio s_i / s_{i+1}) and span(A) as the top-d right singular vectors;
      3. the evaluator scores the estimate: mean squared cosine with span(A) (chance d / V) and the
         relative error of predicting held-out received rows (their finite entries) from it.
    "Recovered" means overlap >= 0.99 (the head up to a d x d map; with the public int8 W_q of the
    head the per-row scales follow).
    """
    from secure_service.logits_policy import LogitsPolicy

    t0 = time.perf_counter()
    policies = list(policies) or [LogitsPolicy("full"), LogitsPolicy("topk", 20)]
    with rm.deterministic(num_threads):
        model = rm.load_model(model_dir)
        with torch.no_grad():
            z = torch.cat([model(input_ids=w[None], use_cache=False).logits[0] for w in windows]).double()
        head = model.get_output_embeddings().weight.detach().double()  # [V, d]
    vocab, d = int(head.shape[0]), int(head.shape[1])
    basis = torch.linalg.qr(head)[0]
    n = int(z.shape[0]) - holdout
    if n <= d:
        raise ValueError(f"{z.shape[0]} rows are too few: need more than the hidden size {d} + {holdout} held out")
    results = []
    for policy in policies:
        got = policy.apply(z.float()).double()
        seen = torch.isfinite(got)
        train, test, seen_tr, seen_te = got[:n], got[n:], seen[:n], seen[n:]
        x = train if bool(seen_tr.all()) else _completion(train, seen_tr, d, iters)
        s = torch.linalg.svdvals(x)
        ratio = s[:-1] / s[1:].clamp_min(1e-300)
        rank_est = int(torch.argmax(ratio[:min(len(ratio), 4 * d)]).item()) + 1
        vh = torch.linalg.svd(x, full_matrices=False)[2][:d].T  # [V, d]
        overlap = float((basis.T @ vh).pow(2).sum() / d)
        # held-out rows: fit each row's coefficients on its finite entries, predict them back
        # (only rows with more finite entries than d say anything: d coefficients fit d entries exactly)
        errs = []
        for row, mask in zip(test, seen_te):
            if int(mask.sum()) <= d:
                continue
            a = vh[mask]
            coef = torch.linalg.lstsq(a, row[mask][:, None]).solution
            errs.append(float(torch.linalg.norm(a @ coef - row[mask][:, None]) / torch.linalg.norm(row[mask])))
        results.append(LogitPolicyResult(policy.describe(), n, int(seen_tr.sum(1).float().mean().item()), rank_est,
                                         overlap, d / vocab, float(np.median(errs)) if errs else math.nan))
    rule = "recovered: subspace overlap >= 0.99 (the LM head up to a d x d map); chance = d / vocab"
    return LogitMatrixAudit(d, vocab, results, rule, time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m slip_vllm.evaluation.audits spectral-gap|logit-matrix [--preset tiny|full]``: one
    audit on its own (the report runs them all), printed as a table."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m slip_vllm.evaluation.audits")
    ap.add_argument("audit", choices=["spectral-gap", "logit-matrix"])
    ap.add_argument("--preset", default="tiny", choices=sorted(rm.PRESETS))
    ap.add_argument("--fraction", type=float, default=0.125)
    ap.add_argument("--trials", type=int, default=SPECTRAL_GAP_TRIALS)
    ap.add_argument("--rows", type=int, default=2240, help="logit-matrix: logits rows of validation text")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    cfg = rm.PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    if args.audit == "spectral-gap":
        models = {"reference": rm.get_reference_model(None, cfg), "finetuned": rm.get_base_finetune_pair(None, cfg)[1]}
        with tempfile.TemporaryDirectory() as work:
            for label, model_dir in models.items():
                # the label (it keys the fresh blindings) is the model directory's name
                res = spectral_gap_audit(model_dir, Path(work), args.fraction, label=model_dir.name,
                                         trials=args.trials)
                print(f"{label} ({model_dir.name}), {res.seconds:.0f} s\n  {res.verdict}\n  {res.block_verdict}")
                for m in res.matrices:
                    print(f"  {m.name:48s} k={m.rank:<4d} published {m.published_ratio:5.2f}x  shipped {m.mixed_ratio:5.2f}x"
                          f"  block {m.block_ratio:5.2f}x  control {m.control_ratio:5.2f}x")
        return 0
    from secure_service.logits_policy import LogitsPolicy

    model_dir = rm.get_reference_model(None, cfg)
    data = rm.load_reference_data(model_dir)
    L = 64  # windows of 64 validation tokens, one logits row per position
    windows = [data.val_ids[i:i + L] for i in range(0, min(data.val_ids.numel() - L, args.rows), L)]
    res = logit_matrix_audit(model_dir, windows, num_threads=args.threads, policies=[LogitsPolicy("full")] + [
        LogitsPolicy("topk", k) for k in (1, 5, 20, 64, 128)])
    print(f"hidden {res.hidden}, vocab {res.vocab}, {res.seconds:.0f} s; {res.rule}")
    for r in res.results:
        print(f"  {r.policy:9s} rows {r.rows}  finite/row {r.observed_per_row:4d}  hidden-size estimate "
              f"{r.rank_estimate:4d}  overlap {r.subspace_overlap:.3f} (chance {r.chance:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
