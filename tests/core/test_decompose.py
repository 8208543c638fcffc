"""Decomposition: exactness, rank policies, the blinding randomness, and the subspace and spectral-gap
attacks of brief §3."""

import json

import pytest
import torch
from safetensors.torch import load_file

from slip_vllm.core.decompose import (
    BlindingRng, RankPolicy, spectral_gap_attack, spectral_gap_select, split_matrix, subspace_attack,
)


def decaying_matrix(m, n, seed, power=1.0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -power
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(64, 64), (96, 48), (48, 160), (512, 128)])
@pytest.mark.parametrize("blind", [True, False])
def test_split_is_exact_and_keeps_rank(shape, blind):
    w = decaying_matrix(*shape, seed=shape[0] + shape[1]).float()
    split = split_matrix(w, RankPolicy(absolute=8), BlindingRng.from_seed(0), blind=blind)
    recon = split.left.double() @ split.right.double() + split.public.double()
    rel = (torch.linalg.norm(recon - w.double()) / torch.linalg.norm(w.double())).item()
    assert rel <= 1e-6
    assert split.relative_error == pytest.approx(rel, rel=1e-3, abs=1e-12)
    assert split.left.shape == (shape[0], 8) and split.right.shape == (8, shape[1])
    assert torch.linalg.matrix_rank(split.left.double() @ split.right.double()).item() == 8
    # The secret part is the bulk of the matrix's energy: with blinding the residual keeps tail-sized
    # terms on the secret subspaces (R and the couplings), so its norm stays at tail level.
    s = torch.linalg.svdvals(w.double())
    bound = 1.15 if blind else 1 + 1e-4
    assert torch.linalg.matrix_norm(split.public.double(), ord=2).item() <= s[8].item() * bound


def test_rank_policies():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1, 0.01], dtype=torch.float64)
    assert RankPolicy(absolute=3).choose(s, (6, 6)) == 3
    assert RankPolicy(absolute=99).choose(s, (6, 6)) == 5  # leaves one tail value
    assert RankPolicy(fraction=0.5).choose(s, (6, 8)) == 3
    # energies: 100, 25, 1, ... -> 100/126.26 = 0.79 for k=1, 0.99 for k=2
    assert RankPolicy(energy=0.5).choose(s, (6, 6)) == 1
    assert RankPolicy(energy=0.9).choose(s, (6, 6)) == 2
    with pytest.raises(ValueError):
        RankPolicy(absolute=2, fraction=0.5)
    with pytest.raises(ValueError):
        RankPolicy(energy=1.5)
    with pytest.raises(ValueError):
        RankPolicy.from_dict({"rank": 3})


def test_split_rejects_bad_input():
    with pytest.raises(ValueError):
        split_matrix(torch.ones(3), RankPolicy(absolute=1), BlindingRng())
    w = torch.randn(8, 8)
    with pytest.raises(TypeError, match="CSPRNG"):  # a torch.Generator is not a source of secret randomness
        split_matrix(w, RankPolicy(absolute=2), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="scheme"):
        split_matrix(w, RankPolicy(absolute=2), BlindingRng(), scheme="rotate")
    w[0, 0] = float("nan")
    with pytest.raises(ValueError):
        split_matrix(w, RankPolicy(absolute=2), BlindingRng())


def test_blinding_spectrum_has_no_exact_repeats():
    """Blinding values drawn as copies of tail values would mark secret directions as duplicates."""
    w = decaying_matrix(128, 128, seed=7).float()
    split = split_matrix(w, RankPolicy(absolute=16), BlindingRng.from_seed(1))
    s = torch.linalg.svdvals(split.public.double())
    gaps = (s[:-1] - s[1:]).abs() / s[0]
    assert gaps.min().item() > 1e-9


@pytest.mark.parametrize("shape", [(128, 128), (128, 384), (384, 128)])
def test_subspace_attack_breaks_unblinded_and_fails_on_blinded(shape):
    w = decaying_matrix(*shape, seed=11, power=0.7).float()
    k = 16
    leaky = split_matrix(w, RankPolicy(absolute=k), BlindingRng.from_seed(2), blind=False)
    blinded = split_matrix(w, RankPolicy(absolute=k), BlindingRng.from_seed(2), blind=True)
    hit = subspace_attack(w, leaky.public, k)
    miss = subspace_attack(w, blinded.public, k)
    assert hit.overlap > 0.99 and hit.p_value < 1e-12
    assert miss.overlap < 3 * miss.chance
    assert miss.p_value > 1e-3


def test_blinding_rng_is_a_keyed_stream():
    a, b = BlindingRng.from_seed(3), BlindingRng.from_seed(3)
    assert torch.equal(a.normal(5, 4), b.normal(5, 4)) and torch.equal(a.uniform(7), b.uniform(7))
    assert not torch.equal(BlindingRng.from_seed(3).uniform(8), BlindingRng.from_seed(4).uniform(8))
    assert not torch.equal(BlindingRng().uniform(8), BlindingRng().uniform(8))  # fresh keys from os.urandom
    rng = BlindingRng.from_seed(0)
    first, second = rng.uniform(8), rng.uniform(8)
    assert not torch.equal(first, second)  # every draw takes new blocks of the stream
    u = rng.uniform(200_000)
    assert 0.0 < u.min().item() and u.max().item() < 1.0 and abs(u.mean().item() - 0.5) < 0.005
    z = rng.normal(200_000)
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1.0) < 0.02
    assert abs(((z.abs() < 1.96).double().mean() - 0.95).item()) < 0.005
    with pytest.raises(ValueError):
        BlindingRng(b"short key")
    with pytest.raises(TypeError):
        BlindingRng.from_seed("7")


def _secret_overlap_of_pairs(w, public, k):
    """Per singular pair of W_D: squared norm of its left vector's projection onto span(U_k) of W."""
    u_w = torch.linalg.svd(w.double(), full_matrices=False)[0][:, :k]
    u_d = torch.linalg.svd(public.double(), full_matrices=False)[0]
    return (u_w.T @ u_d).pow(2).sum(0)


def test_mixed_blinding_has_no_block_structure_and_defeats_the_spectral_gap_attack():
    """The block scheme keeps every singular pair of W_D in the secret block or the tail and the
    tail's singular values unchanged; the spectral-gap attack then finds the inserted secret pairs
    far above chance. The shipped mixed scheme leaves neither, and the attack is at chance."""
    w = decaying_matrix(128, 128, seed=5, power=0.7).float()
    k = 16
    tail = torch.linalg.svdvals(w.double())[k:]
    ratios = {}
    for scheme in ("block", "mixed"):
        rng = BlindingRng.from_seed(9)
        got = []
        for _ in range(3):
            split = split_matrix(w, RankPolicy(absolute=k), rng, scheme=scheme)
            assert split.relative_error <= 1e-6
            overlap = _secret_overlap_of_pairs(w, split.public, k)
            s_d = torch.linalg.svdvals(split.public.double())
            kept = ((s_d[None, :] - tail[:, None]).abs().min(1).values / tail[0] < 1e-6).double().mean().item()
            if scheme == "block":
                assert overlap.max() > 0.999 and ((overlap > 0.999) | (overlap < 1e-3)).all()
                assert kept == 1.0  # every tail value is still a singular value of W_D
            else:
                assert overlap.max() < 0.9, overlap.max()  # no pair lies in the secret block
                assert kept == 0.0
            res = spectral_gap_attack(w, split.public, k, split.left, split.right)
            got.append(res.overlap / res.chance)
        ratios[scheme] = sum(got) / len(got)
    assert ratios["block"] > 3.0, ratios
    assert ratios["mixed"] < 1.5, ratios


def test_spectral_gap_select_finds_values_inserted_into_an_even_spectrum():
    rigid = torch.linspace(10.0, 1.0, 60, dtype=torch.float64)
    inserted = torch.tensor([7.43, 4.12, 2.61], dtype=torch.float64)
    values = torch.cat([rigid, inserted])
    chosen = spectral_gap_select(values, 3)
    assert sorted(chosen) == [60, 61, 62]


def _matrices(out_dir):
    """(name, original [out,in], public [out,in], rank) for every protected matrix of an artifact."""
    manifest = json.loads((out_dir / "protected" / "public" / "slip_manifest.json").read_text())
    original = load_file(str(out_dir / "original" / "model.safetensors"))
    public = load_file(str(out_dir / "protected" / "public" / "model.safetensors"))
    factors = load_file(str(out_dir / "protected" / "secret" / "factors.safetensors"))
    for t in manifest["tensors"]:
        w, d = original[t["name"]].float(), public[t["name"]].float()
        if t["orientation"] == "in_out":
            w, d = w.T, d.T
        yield t["name"], w, d, t["rank"], factors[f"t{t['id']}.left"], factors[f"t{t['id']}.right"]


@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True), ("gpt2", True), ("bert", False)])
def test_every_protected_matrix_is_exact_and_resists_the_subspace_attack(model_factory, family, tie):
    original_dir, protected_dir = model_factory(family, tie=tie)
    _, leaky_dir = model_factory(family, tie=tie, blind=False)
    blinded = list(_matrices(protected_dir.parent))
    leaky = {name: d for name, _, d, *_ in _matrices(leaky_dir.parent)}
    assert blinded, "no protected matrices"
    overlaps, chances = [], []
    for name, w, d, k, left, right in blinded:
        rel = (torch.linalg.norm(left.double() @ right.double() + d.double() - w.double())
               / torch.linalg.norm(w.double())).item()
        assert rel <= 1e-6, name
        assert not torch.allclose(d, w, atol=1e-3), f"{name}: public tensor equals the original"
        hit = subspace_attack(w, leaky[name], k)
        assert hit.overlap > 0.95, f"{name}: attack should recover the unblinded subspace ({hit})"
        miss = subspace_attack(w, d, k)
        assert miss.p_value > 1e-4, f"{name}: blinded residual leaks its secret subspace ({miss})"
        overlaps.append(miss.overlap)
        chances.append(miss.chance)
    mean_overlap = sum(overlaps) / len(overlaps)
    mean_chance = sum(chances) / len(chances)
    assert mean_overlap < 1.5 * mean_chance, (mean_overlap, mean_chance)
