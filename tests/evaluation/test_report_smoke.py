"""The evaluation report end to end, smoke preset: `python -m slip_vllm.evaluation.report --smoke`.

Starts real `vllm serve` processes (split and shielded at the default rank) and the secure
services, trains or reuses the tiny reference model, runs every audit and the recovery attacks of the
tiny preset, and writes the markdown, the plots and results.json. Checks that every section, table
and plot is there, that no section is missing, and that the numbers are sane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "SECURITY_EVAL.md"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, "-m", "slip_vllm.evaluation.report", "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    results = json.loads((out.parent / "security_eval" / "results.json").read_text())
    return proc, out, out.read_text(), results


def test_report_runs_complete(smoke):
    proc, _, md, results = smoke
    assert results["gaps"] == [], (results["gaps"], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "## INCOMPLETE" not in md and "**FAILED**" not in md
    assert "python -m slip_vllm.evaluation.report --smoke" in md
    assert f"{os.cpu_count()} cores" in md


def test_report_has_every_section_table_and_plot(smoke):
    _, out, md, results = smoke
    for heading in ("## Verdicts", "## Time per section", "## 1. Reference model", "## 2. Quality and the default rank",
                    "### Rank sweep", "### Recommended default rank", "### (a) Subspace", "### (b) Least-squares",
                    "### (c) Extraction attempt", "### (d) Mask freshness", "## 4. Recovery attacks",
                    "### Fine-tuning, LoRA, from scratch, distillation", "### Public-prior scenario"):
        assert heading in md, heading
    for name in ("rank_sweep.png", "split_extraction.png", "attack_curves.png"):
        png = out.parent / "security_eval" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"](security_eval/{name})" in md
    timing = [s["name"] for s in results["sections"]]
    assert timing[0] == "reference model" and "recovery attacks" in timing and "public-prior attack" in timing


def test_report_numbers_are_sane(smoke):
    _, _, md, results = smoke
    R = results["results"]
    quality = R["quality"]
    original = quality["original_ppl"]
    assert 1 < original < quality["unigram_ppl"]
    rows = {(r["label"], r["served_by"]): r for r in quality["rows"]}
    stock = rows.get(("original", "stock vLLM"))  # the smoke plan skips it to save a server start
    if stock is not None:
        assert stock["error"] is None and stock["agreement"] > 0.99 and abs(stock["perplexity"] / original - 1) < 0.01
    served = [pt["split"] for pt in quality["sweep"] if pt["split"] is not None]
    assert served  # the smoke plan serves split at the default rank only
    for split in served:
        assert split["error"] is None, split
        assert split["agreement"] > 0.99 and abs(split["perplexity"] / original - 1) < 0.01  # exact protocol
    for pt in quality["sweep"]:
        assert pt["residual"]["perplexity"] > 2 * original  # the public half alone is much worse
    shielded_vllm = [r for r in quality["rows"] if r["protocol"] == "shielded" and r["served_by"] == "vLLM"]
    assert len(shielded_vllm) == 1 and shielded_vllm[0]["error"] is None
    assert shielded_vllm[0]["agreement"] > 0.98 and abs(shielded_vllm[0]["perplexity"] / original - 1) < 0.01
    executor = [r for r in quality["rows"] if r["served_by"] == "secure-service executor"]
    assert len(executor) == 1 and executor[0]["agreement"] > 0.9
    assert quality["recommendation"]["rule"] and quality["recommendation"]["status"] in (
        "confirmed", "unconfirmed", "provisional", "none")

    assert R["subspace"]["unblinded_verdict"].startswith("protection fails")
    assert R["subspace"]["blinded_verdict"].startswith("holds")
    ls = R["split_extraction"]
    assert ls["verdict"].startswith("protection fails") and ls["tokens_needed"] <= 2 * ls["widest_input"]
    assert ls["points"][0]["max_rel_error"] > 0.1
    best = ls["points"][-1]
    # the attacker's model: far better than the public residual alone
    assert best["attacker_ppl"] < ls["residual_ppl"] / 2
    assert R["shielded_extraction"]["verdict"].startswith("holds")
    masks = R["mask_freshness"]
    assert masks["duplicates"] == 0 and masks["verdict"].startswith("holds")
    assert masks["mask_rows"] == masks["host_rows"] > 0

    recovery = R["recovery"]
    assert {r["attack"] for r in recovery["rows"]} >= {"finetune-full", "finetune-lora", "scratch", "distill"}
    for r in recovery["rows"]:
        assert r["verdict"] in md
    assert R["public_prior"]["rows"]
