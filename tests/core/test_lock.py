"""The lock of protocol ``shielded`` (``slip_vllm.core.lock``): the convention, exactness of the
permutation lock, orthogonality and tiling of the block lock, determinism from the key,
independence between GEMMs and keys, serialisation and its refusals."""

import os

import pytest
import torch

from slip_vllm.core.lock import GemmLock, LockSpec, SideTransform, make_lock, parse_lock

KEY = b"k" * 32


def _data(m, n, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(t, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind,block", [("none", 1), ("perm", 1), ("block", 4), ("block", 7), ("block", 64)])
@pytest.mark.parametrize("m,n", [(12, 20), (37, 10), (1, 3)])
def test_unlock_of_locked_product_is_the_product(kind, block, m, n):
    w, x = _data(m, n)
    lock = make_lock(m, n, kind, block, KEY)
    y = lock.unlock_output(lock.lock_input(x).to(w.dtype) @ lock.lock_weight(w).t())
    ref = x @ w.t()
    if kind == "block":  # the service's products are float32 (lock.BLOCK_DTYPE)
        assert y.dtype == torch.float32
        assert torch.allclose(y.double(), ref, rtol=0, atol=1e-6 * float(ref.abs().max()) * n ** 0.5)
    else:
        # a float product sums the permuted inner dimension in another order: equal to rounding;
        # on integers (what the protocol's field GEMM computes) the permutation lock is exact
        assert torch.allclose(y, ref, rtol=0, atol=1e-12 * float(ref.abs().max()) * n)
        wi, xi = torch.round(w * 100).long(), torch.round(x * 1000).long()
        assert torch.equal(lock.unlock_output(lock.lock_input(xi) @ lock.lock_weight(wi).t()), xi @ wi.t())
        w32 = w.float()
        assert lock.lock_weight(w32).dtype == torch.float32
        assert torch.equal(lock.lock_weight(w32), lock.lock_weight(w).float())


def test_dense_matrices_follow_the_documented_convention():
    m, n = 10, 14
    w, x = _data(m, n)
    lock = make_lock(m, n, "block", 4, KEY)
    a, b = lock.out_side.matrix(), lock.in_side.matrix()
    eye_m, eye_n = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    assert torch.allclose(a @ a.t(), eye_m, atol=1e-12) and torch.allclose(b @ b.t(), eye_n, atol=1e-12)
    assert torch.allclose(lock.lock_weight(w), a @ w @ b, atol=1e-12)
    assert torch.allclose(lock.lock_weight(w, chunk=3), a @ w @ b, atol=1e-12)  # chunked rows and columns
    # activations: float32 products (BLOCK_DTYPE), to float32 rounding
    assert torch.allclose(lock.lock_input(x).double(), x @ b, atol=1e-5)
    y = torch.randn(3, m, dtype=torch.float64)
    assert torch.allclose(lock.unlock_output(y).double(), y @ a, atol=1e-5)
    assert torch.allclose(lock.lock_output(lock.unlock_output(y)).double(), y, atol=1e-5)
    # one row (its own product form) agrees with the same row in a batch
    assert torch.allclose(lock.lock_input(x[:1]).double(), x[:1] @ b, atol=1e-5)
    assert torch.allclose(lock.unlock_output(y[:1]).double(), y[:1] @ a, atol=1e-5)
    # the block structure: each coordinate mixes with at most b - 1 others on each side
    assert int((a.abs() > 0).sum(dim=1).max()) <= 4 and int((b.abs() > 0).sum(dim=1).max()) <= 4
    # a real mixing (not a signed permutation): most rows have b nonzeros
    assert int((b.abs() > 1e-6).sum(dim=1).eq(4).sum()) >= 8


def test_perm_lock_is_a_relabelling_of_rows_and_columns():
    m, n = 9, 11
    w, _ = _data(m, n)
    lock = make_lock(m, n, "perm", 1, KEY)
    wl = lock.lock_weight(w)
    assert sorted(wl.flatten().tolist()) == sorted(w.flatten().tolist())
    a, b = lock.out_side.matrix(), lock.in_side.matrix()
    assert torch.equal(a.abs().sum(0), torch.ones(m, dtype=torch.float64)) and set(a.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(a, torch.eye(m, dtype=torch.float64)) and not torch.equal(b, torch.eye(n, dtype=torch.float64))


def test_deterministic_from_the_key_and_independent_across_keys_and_shapes():
    l1, l2 = make_lock(64, 48, "block", 8, KEY), make_lock(64, 48, "block", 8, KEY)
    assert torch.equal(l1.out_side.matrix(), l2.out_side.matrix()) and torch.equal(l1.in_side.matrix(),
                                                                                   l2.in_side.matrix())
    other = make_lock(64, 48, "block", 8, b"j" * 32)
    assert not torch.equal(l1.in_side.perm_in, other.in_side.perm_in)
    # the two sides and two shapes draw different pieces of the stream
    sq = make_lock(48, 48, "perm", 1, KEY)
    assert not torch.equal(sq.out_side.perm_in, sq.in_side.perm_in)
    # permutations look uniform: the fixed points of 2000 draws of a 16-perm average about 1
    fixed = [int((make_lock(16, 2, "perm", 1, os.urandom(16) + bytes([i % 256])).out_side.perm_in
                  == torch.arange(16)).sum()) for i in range(2000)]
    assert 0.85 < sum(fixed) / len(fixed) < 1.15


def test_haar_blocks_have_unbiased_entries():
    # entries of Haar-orthogonal b x b blocks: mean 0, variance 1/b
    lock = make_lock(4096, 2, "block", 16, KEY)
    blocks = lock.out_side.blocks
    assert blocks.shape == (256, 16, 16)
    assert abs(float(blocks.mean())) < 0.01
    assert abs(float(blocks.var()) * 16 - 1) < 0.05


def test_serialisation_round_trip_and_refusals():
    lock = make_lock(13, 9, "block", 4, KEY)
    t = lock.to_tensors("layers.0.qkv")
    assert set(t) == set(GemmLock.tensor_names("layers.0.qkv", "block"))
    back = GemmLock.from_tensors(t, "layers.0.qkv", 13, 9, "block", 4)
    w, x = _data(13, 9)
    assert torch.equal(back.lock_weight(w), lock.lock_weight(w))
    assert torch.equal(back.lock_input(x), lock.lock_input(x))
    p = make_lock(13, 9, "perm", 1, KEY)
    assert set(p.to_tensors("a")) == set(GemmLock.tensor_names("a", "perm"))
    assert torch.equal(GemmLock.from_tensors(p.to_tensors("a"), "a", 13, 9, "perm").lock_weight(w), p.lock_weight(w))
    assert make_lock(13, 9, "none", 1, KEY).to_tensors("a") == {}

    def bad(mutate, err):
        tt = {k: v.clone() for k, v in t.items()}
        mutate(tt)
        with pytest.raises(ValueError, match=err):
            GemmLock.from_tensors(tt, "layers.0.qkv", 13, 9, "block", 4)

    bad(lambda tt: tt.__setitem__("layers.0.qkv.lock.in.perm_in", torch.zeros(9, dtype=torch.int64)),
        "not a permutation")
    bad(lambda tt: tt["layers.0.qkv.lock.out.blocks"][0].mul_(1.01), "not orthogonal")
    bad(lambda tt: tt.pop("layers.0.qkv.lock.out.perm_out"), "missing")
    bad(lambda tt: tt.__setitem__("layers.0.qkv.lock.in.blocks", torch.eye(3, dtype=torch.float64)[None]),
        "blocks")
    with pytest.raises(ValueError, match="4 wide|wide"):
        GemmLock.from_tensors(t, "layers.0.qkv", 13, 9, "block", 8)
    with pytest.raises(ValueError, match="perm lock has no"):
        GemmLock.from_tensors(t, "layers.0.qkv", 13, 9, "perm")
    # a partial last block must act by the identity on its padding
    tt = {k: v.clone() for k, v in t.items()}
    tt["layers.0.qkv.lock.out.blocks"][-1] = torch.flip(torch.eye(4, dtype=torch.float64), [0])
    with pytest.raises(ValueError, match="padded"):
        GemmLock.from_tensors(tt, "layers.0.qkv", 13, 9, "block", 4)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind"):
        make_lock(4, 4, "rotate", 2, KEY)
    with pytest.raises(ValueError, match="block >= 2"):
        make_lock(4, 4, "block", 1, KEY)
    with pytest.raises(ValueError, match="16 bytes"):
        make_lock(4, 4, "perm", 1, b"short")
    with pytest.raises(ValueError, match="out_features"):
        make_lock(0, 4, "perm", 1, KEY)
    lock = make_lock(4, 6, "perm", 1, KEY)
    with pytest.raises(ValueError, match=r"\[T, 6\]"):
        lock.lock_input(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[4, 6\]"):
        lock.lock_weight(torch.zeros(6, 4))
    with pytest.raises(ValueError):
        SideTransform(3, torch.tensor([0, 1, 1]))


def test_parse_lock():
    assert parse_lock("none") == LockSpec("none") and parse_lock("perm") == LockSpec("perm")
    assert parse_lock("block:16") == LockSpec("block", 16) and str(parse_lock("block:16")) == "block:16"
    assert parse_lock("block").kind == "block" and parse_lock("block").block >= 2
    for bad in ("block:1", "block:x", "rot", "perm:3", ""):
        with pytest.raises(ValueError):
            parse_lock(bad)
