"""The GPU-scale evaluation's pieces on the CPU: artifacts, lock alignment, the verdict rule, a micro grid.

The real grid runs on the GPU (`python -m slip_vllm.evaluation.gpu_scale run ...`, docs/SECURITY_EVAL.md
section 5); here every piece it relies on is checked at a size that takes seconds.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from slip_vllm.core.lock import make_lock
from slip_vllm.core.quantize import quantize_weight
from slip_vllm.evaluation import gpu_scale as gs
from slip_vllm.evaluation.corpus import build_code_corpus, load_code_corpus, stdlib_root

MICRO = dataclasses.replace(gs.PRESETS["tiny"], name="micro", hidden=32, heads=2, inter=64, layers=1, seq_len=32,
                            batch=4, base_tokens=1024, finetune_tokens=512, budgets=(0.1, 0.3), sweep_budgets=(0.1,),
                            lr_grid=(3e-3,), eval_tokens=256, locks=("perm", "block:8"), min_steps=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Models of a few thousand parameters: one thread is 4x faster than two on a loaded 2-core box."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("code")
    m = build_code_corpus(d, max_bytes=150_000, xz_preset=0,
                          roots=[("stdlib", stdlib_root() / "json"), ("site-packages", stdlib_root() / "email")])
    return d, m


def test_code_corpus_is_deterministic_and_checked(corpus, tmp_path):
    d, m = corpus
    train, val, man = load_code_corpus(d)
    assert len(train) == m["train_bytes"] > 0 and len(val) == m["val_bytes"] > 0
    assert b"\x00" in train and train.count(b"\x00") == m["files_per_split"]["train"]
    again = build_code_corpus(tmp_path, max_bytes=150_000, xz_preset=0,
                              roots=[("stdlib", stdlib_root() / "json"), ("site-packages", stdlib_root() / "email")])
    assert again["digest"] == m["digest"] and again["stream_sha256"] == m["stream_sha256"]
    names = [f[0] for f in m["file_list"]]
    assert names == sorted(names) and len(set(f[3] for f in m["file_list"])) == len(names)  # no duplicate content


def test_artifacts_are_what_the_host_gets():
    ref = gs.make_model(MICRO, 3, "cpu")
    arts = gs.build_artifacts(ref, MICRO, 0)
    assert arts.max_rel_error <= 1e-6
    w = ref.layers[0].qkv.weight.detach()
    # split: the residual differs from W by a low-rank secret of the recorded rank per part
    d = w - arts.split_state["layers.0.qkv.weight"]
    for j, part in enumerate(d.split(MICRO.hidden, 0)):
        assert torch.linalg.matrix_rank(part.double(), rtol=1e-6) == arts.ranks[f"layers.0.qkv[{j}]"]
    plain, perm, block = (arts.shielded_wq[k]["layers.0.qkv"] for k in ("none", "perm", "block:8"))
    assert plain.dtype == perm.dtype == block.dtype == torch.int8
    # a permutation lock relabels rows and columns: same multiset of entries, different matrix
    assert torch.equal(plain.flatten().sort().values, perm.flatten().sort().values)
    assert not torch.equal(plain, perm) and not torch.equal(plain, block)


def test_alignment_undoes_a_permutation_lock_given_the_exact_base():
    torch.manual_seed(0)
    w = torch.randn(48, 40) * 0.02
    lock = make_lock(48, 40, "perm", 1, b"k" * 32)
    wq = quantize_weight(lock.lock_weight(w), 8).w_q
    aligned, info = gs.align_to_base(wq, w)
    assert torch.equal(aligned, quantize_weight(w, 8).w_q.float())
    assert info["cosine_to_base"] > 0.99


def _row(attack, artifact, budget, ppl, scenario="black-box", lr=1e-3):
    return {"attack": attack, "artifact": artifact, "scenario": scenario, "budget": budget, "lr": lr, "val_ppl": ppl}


def test_verdict_rule_and_recommendation():
    rows = [_row("scratch", "none", 0.1, 10.0), _row("distill", "none", 0.1, 8.0, lr=1e-3),
            _row("distill", "none", 0.1, 7.0, lr=3e-3),              # the best rate counts
            _row("split-ft", "split", 0.1, 6.0), _row("shielded-ft", "shielded", 0.1, 6.7),
            _row("base-distill", "none", 0.1, 5.0, "public-prior"),
            _row("shielded-prior", "shielded", 0.1, 5.2, "public-prior")]
    v = gs.verdicts(rows, (0.1,))
    cell = v["split"]["black-box"]["0.1"]
    assert cell["floor_attack"] == "distill" and cell["floor_ppl"] == 7.0
    assert cell["ratio"] == pytest.approx(6.0 / 7.0) and cell["verdict"] == "fails"
    sh = v["shielded"]["black-box"]["0.1"]
    assert sh["ratio"] == pytest.approx(6.7 / 7.0) and sh["verdict"] == "holds"     # 0.957 >= 0.95
    pp = v["shielded"]["public-prior"]["0.1"]
    assert pp["floor_attack"] == "base-distill" and pp["best_attack"] == "shielded-prior" and pp["verdict"] == "holds"
    rec = gs.recommend(v, (0.1,))
    assert rec["artifact"] == "shielded" and rec["holds_everywhere"]
    rec2 = gs.recommend(gs.verdicts(rows[:-1] + [_row("shielded-prior", "shielded", 0.1, 4.0, "public-prior")], (0.1,)), (0.1,))
    assert not rec2["holds_everywhere"] and "none holds" in rec2["text"]


def test_micro_grid_runs_end_to_end(corpus, tmp_path):
    d, _ = corpus
    out = tmp_path / "r.json"
    gs.run_grid(d, MICRO, out, device="cpu", cache_dir=tmp_path / "cache",
                only=("scratch", "split-ft", "block:8-relink"), log=lambda s: None)
    r = json.loads(out.read_text())
    got = {(x["attack"], x["budget"]) for x in r["rows"]}
    assert got == {(a, b) for a in ("scratch", "split-ft", "block:8-relink") for b in (0.1, 0.3)}
    assert all(x["val_ppl"] > 1.0 for x in r["rows"]) and r["complete"]
    assert r["notes"] == ["only these attacks were run: scratch, split-ft, block:8-relink"]  # no attack failed
    assert set(r["verdicts"]) == {"split", "shielded+block:8"}
    assert r["verdicts"]["split"]["black-box"]["0.3"]["floor_attack"] == "scratch"
    md = gs.render_section([r])
    assert md.startswith(gs.MARK_BEGIN) and md.endswith(gs.MARK_END) and "| split | black-box |" in md
    assert "every run together" in md and "| 10 %, 30 % |" in md  # the combined table names the budgets run
    report = tmp_path / "R.md"
    report.write_text("# title\n\nbody\n")
    gs.splice(report, md)
    gs.splice(report, md)  # replaces, does not append twice
    assert report.read_text().count(gs.MARK_BEGIN) == 1 and report.read_text().startswith("# title")


def test_top_k_scenario_uses_only_top_k_floors_and_attacks():
    rows = [_row("scratch", "none", 0.1, 10.0), _row("distill", "none", 0.1, 7.0),
            _row("distill-top20", "none", 0.1, 9.0),
            _row("shielded-ft", "shielded", 0.1, 7.5),                           # full logits: black-box only
            _row("shielded-ft-top20", "shielded", 0.1, 8.0, gs.TOPK_SCENARIO)]
    v = gs.verdicts(rows, (0.1,))["shielded"]
    top = v[gs.TOPK_SCENARIO]["0.1"]
    assert top["floor_attack"] == "distill-top20" and top["best_attack"] == "shielded-ft-top20"
    assert top["ratio"] == pytest.approx(8.0 / 9.0) and top["verdict"] == "fails"   # 0.889 < 0.95
    bb = v["black-box"]["0.1"]   # an attacker with full logits may also drop them: top-K rows are candidates
    assert bb["floor_attack"] == "distill" and bb["best_attack"] == "shielded-ft" and bb["verdict"] == "holds"
    assert "shielded-ft-top20" in bb["attacks_run"]
    # no top-K attack on split: no top-K verdict for it
    assert gs.TOPK_SCENARIO not in gs.verdicts(rows + [_row("split-ft", "split", 0.1, 7.2)], (0.1,))["split"]


def test_both_scales_recommends_only_what_holds_everywhere():
    def run(preset, ppl_split, ppl_sh, budgets=gs.ALL_BUDGETS):
        rows = []
        for b in budgets:
            rows += [_row("scratch", "none", b, 10.0), _row("split-ft", "split", b, ppl_split),
                     _row("shielded-ft", "shielded", b, ppl_sh)]
        v = gs.verdicts(rows, budgets)
        return {"preset": preset, "verdicts": v}
    b = gs.both_scales([run("cpu", 9.9, 11.0), run("mid", 9.0, 10.5)])
    assert b["recommended"] == "shielded" and b["artifacts"]["split"]["holds_everywhere"] is False
    assert b["artifacts"]["shielded"]["worst_ratio"] == pytest.approx(1.05) and b["artifacts"]["shielded"]["complete"]
    partial = gs.both_scales([run("cpu", 9.9, 11.0), run("mid", 9.0, 10.5, budgets=(0.001, 0.01))])
    assert partial["recommended"] is None and partial["strongest"] == "shielded"
    assert "not every budget measured" in partial["text"]


def test_public_prior_start_is_the_guess_and_trains(corpus, tmp_path):
    """shielded-prior starts from W_q diag(guessed scales) = the base residual's quantization, in factors Adam can
    move (16-bit W_q entries with raw 1e-6 scales diverged at the grid's rates)."""
    c = dataclasses.replace(MICRO, weight_bits=16)
    base = gs.make_model(c, 1, "cpu")
    res = gs.base_residuals(base, c, seed=0)
    arts = gs.build_artifacts(base, c, 0)   # the base protected as if it were the reference
    model, _, extra = gs._make_attacker("shielded-prior", "shielded", c, arts, base, 5, torch.device("cpu"))
    g = model.gemms()["layers.0.gate_up"]
    assert g.row_scale is not None and g.row_scale.mean().item() == pytest.approx(1.0, rel=1e-5)
    scales = gs.base_row_scales(res, 16)["layers.0.gate_up"]
    want = arts.shielded_wq["none"]["layers.0.gate_up"].float() * scales[:, None]
    assert torch.allclose(g.effective_weight().detach(), want, rtol=1e-5, atol=1e-9)
    d, _ = corpus
    train_b, _, _ = load_code_corpus(d)
    data = torch.frombuffer(bytearray(train_b), dtype=torch.uint8)
    lg = gs.train(model, data, 2048, lr=3e-3, c=c, seed=0, objective="kd", teacher=base, extra_no_decay=tuple(extra))
    assert 0 < lg.final_loss < 20
