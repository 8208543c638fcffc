"""Weight-recovery attacks on the tiny reference model (the FULL numbers come from the CLI).

One tiny suite run is shared by most tests; thresholds are set from measurement with margin
(tiny preset, rank fraction 0.125, seed 0: original ~81, residual ~476, full fine-tuning at 10 % ~121,
public-prior ~68 against a fine-tuned original of ~63 and a base of ~80; public-prior-lowrank ~67 under the
earlier block blinding, ~414 under the shipped mixed one).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from slip_vllm.core.decompose import BlindingRng, RankPolicy, split_matrix
from slip_vllm.evaluation import attacks as A
from slip_vllm.evaluation import reference_model as rm

CFG = rm.TINY
BUDGETS = (0.001, 0.01, 0.1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reference_cache")


@pytest.fixture(scope="module")
def recovery(cache, tmp_path_factory):
    return A.run_recovery_attacks("tiny", budgets=BUDGETS, cache_dir=cache,
                                  work_dir=tmp_path_factory.mktemp("recovery"), progress=False)


@pytest.fixture(scope="module")
def prior(cache, tmp_path_factory):
    return A.run_public_prior_attack("tiny", cache_dir=cache, work_dir=tmp_path_factory.mktemp("prior"),
                                     progress=False)


# ------------------------------------------------------------------------------- recovery suite


def test_suite_has_every_row_and_curve(recovery):
    attacks = [r.attack for r in recovery.rows]
    assert attacks[:2] == ["original", "residual-only"]
    for attack in A.TRAINING_ATTACKS:
        rows = recovery.rows_for(attack)
        assert [r.budget_fraction for r in rows] == list(BUDGETS), attack
        assert recovery.curves[attack] == [(r.tokens, r.val_ppl) for r in rows]
        for r in rows:
            # tokens are whole windows of the budget (at least one window)
            want = max(1, round(r.budget_fraction * recovery.reference_tokens) // CFG.seq_len) * CFG.seq_len
            assert r.tokens == want, (attack, r)
    assert recovery.reference_tokens == CFG.train_tokens
    assert recovery.scratch_rows == recovery.rows_for("scratch")
    assert recovery.ranks and all(k == math.ceil(0.125 * 64) for k in recovery.ranks.values())
    assert recovery.eval_tokens > 4000
    table = recovery.table()
    assert table.count("\n| ") == len(recovery.rows) + 1 and "finetune-lora" in table


def test_residual_alone_is_much_worse_than_the_original(recovery):
    assert recovery.row("original").val_ppl == recovery.original_ppl
    assert recovery.residual_ppl > 3 * recovery.original_ppl, recovery.table()
    assert recovery.row("residual-only").agreement < 0.3


def test_full_finetuning_recovers_more_with_more_tokens(recovery):
    ppl = [r.val_ppl for r in recovery.rows_for("finetune-full")]
    assert ppl[-1] < 0.5 * recovery.residual_ppl, recovery.table()
    assert ppl[0] > ppl[1] > ppl[2]
    # the attack uses the artifact: at the largest budget it is ahead of training from scratch
    assert recovery.row("finetune-full", 0.1).beats_scratch
    assert recovery.row("finetune-full", 0.1).agreement > recovery.row("residual-only").agreement + 0.2


def test_verdicts_follow_the_rule(recovery, prior):
    assert A.verdict(1.25 * 80.0, 80.0) == "fails" and A.verdict(1.2501 * 80.0, 80.0) == "holds"
    for res in (recovery, prior):
        assert f"{1.25 * res.original_ppl:.2f}" in res.rule
        for r in res.rows:
            if r.attack == "original":
                assert r.verdict == "n/a"
            else:
                assert r.verdict == ("fails" if r.val_ppl <= 1.25 * res.original_ppl else "holds"), r
    scratch = {r.budget_fraction: r.val_ppl for r in recovery.scratch_rows}
    for r in recovery.rows:
        if r.attack in ("finetune-full", "finetune-lora", "distill"):
            assert r.vs_scratch == pytest.approx(r.val_ppl / scratch[r.budget_fraction], rel=1e-12)
            assert r.beats_scratch == (r.val_ppl < scratch[r.budget_fraction])
            assert ("beats scratch" in r.note) == r.beats_scratch
        else:
            assert r.vs_scratch is None and r.beats_scratch is None


def test_original_score_matches_the_reference_evaluation(recovery):
    data = rm.load_reference_data(recovery.model_dir)
    subset = A.spread_validation(data.val_ids, CFG.seq_len, CFG.eval_tokens)
    assert subset.numel() == CFG.eval_tokens
    # the chosen windows are whole windows of the stream, spread from its start to its end
    first, last = subset[:CFG.seq_len], subset[-CFG.seq_len:]
    n_win = data.val_ids.numel() // CFG.seq_len
    assert torch.equal(first, data.val_ids[:CFG.seq_len])
    assert torch.equal(last, data.val_ids[(n_win - 1) * CFG.seq_len:n_win * CFG.seq_len])
    kw = {"seq_len": CFG.seq_len, "batch_size": CFG.eval_batch_size, "num_threads": CFG.num_threads}
    assert math.isclose(rm.evaluate_perplexity(recovery.model_dir, subset, **kw), recovery.original_ppl, rel_tol=1e-9)
    # and the residual row is the public checkpoint, scored the same way
    residual = A.load_public_model(A.Path(recovery.public_dir))
    assert math.isclose(rm.evaluate_perplexity(residual, subset, **kw), recovery.residual_ppl, rel_tol=1e-9)


def test_public_checkpoint_is_the_residual(recovery):
    from pathlib import Path

    public = Path(recovery.public_dir)
    original = load_file(str(Path(recovery.model_dir) / "model.safetensors"))
    residual = A.load_public_model(public).state_dict()
    assert set(residual) == set(original)
    for name, tensor in residual.items():
        if name in recovery.ranks:
            assert not torch.allclose(tensor, original[name]), name
        else:  # norms are public and unchanged
            assert torch.equal(tensor, original[name]), name


def test_results_are_deterministic_for_a_seed(recovery, cache, tmp_path, monkeypatch):
    opened = []
    real_load_file = A.load_file
    monkeypatch.setattr(A, "load_file", lambda path, *a, **k: opened.append(str(path)) or real_load_file(path, *a, **k))
    again = A.run_recovery_attacks("tiny", budgets=(0.01,), cache_dir=cache, work_dir=tmp_path / "w", progress=False)
    assert opened and all("/public/" in p and "/secret/" not in p for p in opened)
    assert again.original_ppl == recovery.original_ppl and again.residual_ppl == recovery.residual_ppl
    for attack in A.TRAINING_ATTACKS:
        a, b = again.row(attack, 0.01), recovery.row(attack, 0.01)
        assert (a.tokens, a.val_ppl, a.agreement, a.verdict) == (b.tokens, b.val_ppl, b.agreement, b.verdict)
    other = A.run_recovery_attacks("tiny", budgets=(0.01,), seed=1, cache_dir=cache, work_dir=tmp_path / "s1",
                                   progress=False, attacks=("finetune-full",))
    assert other.original_ppl == recovery.original_ppl
    assert other.residual_ppl != recovery.residual_ppl  # another blinding draw
    assert other.row("finetune-full", 0.01).val_ppl != recovery.row("finetune-full", 0.01).val_ppl


# ------------------------------------------------------------------------------- LoRA, distillation


def test_lora_trains_only_the_adapters(recovery):
    from pathlib import Path

    from slip_vllm.core.manifest import read_public_manifest

    public = Path(recovery.public_dir)
    manifest, _ = read_public_manifest(public)
    model = A.load_public_model(public)
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    data = rm.load_reference_data(recovery.model_dir)
    batch = data.val_ids[:CFG.seq_len][None]
    with torch.no_grad():
        before = model(input_ids=batch).logits

    adapters = A.attach_lora(model, manifest, rank=None, seed=0)
    assert len(adapters) == 2 * len(manifest.tensors)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapters}
    for entry in manifest.tensors:
        upd = A._module_for(model, entry.name).parametrizations.weight[0]
        assert upd.A.shape == (entry.shape[0], entry.rank) and upd.B.shape == (entry.rank, entry.shape[1])
    with torch.no_grad():  # A = 0: the adapted model starts exactly at the residual
        assert torch.equal(model(input_ids=batch).logits, before)

    rm.train(model, data.train_ids, 4 * CFG.seq_len, **CFG.train_kwargs(), trainable=adapters, progress=False)
    for name, base in A.lora_base_weights(model, manifest).items():
        assert torch.equal(base, untouched[name]), name
    for name, param in model.named_parameters():
        if "parametrizations" not in name:
            assert torch.equal(param, untouched[name]), name
    assert all(float(p.detach().abs().sum()) > 0 for p in adapters)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=batch).logits, before)


def test_distillation_uses_only_the_top_k_and_leaves_the_teacher_alone(recovery):
    data = rm.load_reference_data(recovery.model_dir)
    teacher = rm.load_model(recovery.model_dir)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = data.val_ids[:2 * CFG.seq_len].view(2, CFG.seq_len)

    # a student equal to the teacher reaches the entropy-plus-mass bound of the renormalised top-20
    same = A.TopKDistillation(rm.load_model(recovery.model_dir), teacher)
    with torch.no_grad():
        logits = teacher(input_ids=batch).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).topk(A.DISTILL_TOP_K, -1).values
        target = torch.softmax(logp, -1)
        expected = -(target * logp).sum(-1).mean()
        assert float(same(input_ids=batch).loss) == pytest.approx(float(expected), rel=1e-5)

    student = A.load_public_model(A.Path(recovery.public_dir))
    objective = A.TopKDistillation(student, teacher)
    assert {id(p) for p in objective.parameters()} == {id(p) for p in student.parameters()}
    rm.train(objective, data.train_ids, 4 * CFG.seq_len, **CFG.train_kwargs(), progress=False)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert not teacher.training


# ------------------------------------------------------------------------------- public prior


def test_public_prior_rebuilds_the_finetuned_model(prior):
    assert prior.scenario == "public-prior" and prior.curves == {}
    rows = {r.attack: r for r in prior.rows}
    assert set(rows) == {"original", "base-only", "residual-only", "public-prior", "public-prior-lowrank",
                         "public-prior-smallest"}
    assert prior.base_ppl == rows["base-only"].val_ppl
    assert rows["residual-only"].val_ppl > 3 * prior.original_ppl
    # with the base as prior, the secret part is largely redundant: the generic estimate (W_D plus the
    # best rank-k part of W_base - W_D) beats the prior alone whatever the blinding (measured 68.0 vs
    # 80.1, 69 % of the base -> fine-tuned gain: a limit of SLIP for fine-tunes of public bases)
    assert rows["public-prior"].val_ppl < rows["base-only"].val_ppl
    assert rows["public-prior"].agreement > rows["base-only"].agreement + 0.1
    # the estimate that picks W_D's singular pairs aligned with the base used the block structure of
    # the earlier blinding (~67 there); the shipped mixed blinding has none: worse than the base alone
    # (measured 414)
    assert rows["public-prior-lowrank"].val_ppl > 2 * rows["base-only"].val_ppl
    # the null-space guess is defeated by blinding: no better than the residual alone
    assert rows["public-prior-smallest"].val_ppl > 0.8 * rows["residual-only"].val_ppl


def test_residual_subspace_selection_finds_the_blinded_secret_subspace():
    g = torch.Generator().manual_seed(0)
    m, n, k = 48, 40, 5
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.cat([torch.tensor([20.0, 16, 13, 11, 9], dtype=torch.float64), torch.linspace(3, 0.2, n - k,
                                                                                            dtype=torch.float64)])
    w = ((u[:, :n] * s) @ v.T).float()
    # the block scheme (every singular pair of W_D in the secret block or the tail) is what this
    # selection exploits; the shipped mixed scheme has no such pairs (tests/core/test_decompose.py)
    split = split_matrix(w, RankPolicy(absolute=k), BlindingRng.from_seed(0), blind=True, scheme="block")
    prior_w = w + 0.02 * torch.randn(m, n, generator=g)  # a close public relative of w
    estimate, chosen = A.prior_residual_subspace(split.public, prior_w, k, "prior")
    u_d, _, _ = torch.linalg.svd(split.public.double(), full_matrices=False)
    overlap = (u[:, :k].T @ u_d[:, chosen]).pow(2).sum() / k
    assert overlap > 0.99
    assert torch.linalg.norm(estimate - w) < 0.1 * torch.linalg.norm(split.public - w)
    # the blinded secret pairs are not the weakest ones
    _, weakest = A.prior_residual_subspace(split.public, prior_w, k, "smallest")
    assert (u[:, :k].T @ u_d[:, weakest]).pow(2).sum() / k < 0.5
    # the truncated variant also lands near w
    assert torch.linalg.norm(A.prior_truncated(split.public, prior_w, k) - w) < 0.2 * torch.linalg.norm(split.public - w)
