"""Fixed-point numerics of protocol ``shielded``: quantization, lift, prime choice, reference, and
the secret low-rank term W_C x (per-part factors, float32).

The reference is checked against plain Python integers; the prime against the brief's bound; the
float32 W_C x against the float64 product under the standard forward error bound of a dot product.
"""

from __future__ import annotations

import random

import pytest
import torch

from slip_vllm.core.field import MAX_P, choose_prime, is_prime
from slip_vllm.core.quantize import (
    LOW_RANK_DTYPE,
    WEIGHT_QMAX,
    LowRankFactors,
    PublicWeight,
    act_qmax,
    centered_lift,
    check_prime,
    low_rank_term,
    quantize_activations,
    quantize_weight,
    required_modulus,
    select_prime,
    shielded_linear_reference_int,
    split_int16,
)


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


@pytest.mark.parametrize("bits", [8, 16])
def test_weight_quantization_per_channel(bits):
    g = _gen(1)
    w = torch.randn(40, 33, generator=g) * torch.logspace(-3, 2, 40)[:, None]  # rows of very different scale
    w[7] = 0.0
    q = quantize_weight(w, bits)
    qmax = WEIGHT_QMAX[bits]
    assert q.w_q.dtype == (torch.int8 if bits == 8 else torch.int16)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (40,)
    absmax = q.w_q.to(torch.int32).abs().amax(dim=1)
    assert int(absmax.max()) <= qmax
    nonzero = torch.arange(40) != 7
    assert bool((absmax[nonzero] == qmax).all())  # every nonzero channel uses its full range
    assert int(absmax[7]) == 0 and float(q.scale[7]) == 1.0
    err = (w.double() - q.w_q.double() * q.scale.double()[:, None]).abs()
    assert bool((err <= q.scale.double()[:, None] * (0.5 + 1e-6)).all())


def test_int16_digit_planes_exact():
    g = _gen(2)
    w = torch.randint(-WEIGHT_QMAX[16], WEIGHT_QMAX[16] + 1, (17, 29), generator=g, dtype=torch.int16)
    w[0, :4] = torch.tensor([WEIGHT_QMAX[16], -WEIGHT_QMAX[16], 0, -1], dtype=torch.int16)
    hi, lo = split_int16(w)
    assert hi.dtype == lo.dtype == torch.int8
    assert torch.equal(hi.to(torch.int32) * 256 + lo.to(torch.int32), w.to(torch.int32))
    assert int(hi.abs().max()) <= 127
    with pytest.raises(ValueError):
        split_int16(torch.tensor([[32767]], dtype=torch.int16))
    # the int16 product mod p equals Python big integers
    p = choose_prime(10**9)
    x = torch.randint(0, p, (3, 29), generator=g, dtype=torch.int64)
    got = PublicWeight(w, p).matmul(x)
    want = [[sum(a * b for a, b in zip(xr, wr)) % p for wr in w.tolist()] for xr in x.tolist()]
    assert got.tolist() == want


@pytest.mark.parametrize("bits", [16, 8])
def test_activation_quantization(bits):
    g = _gen(3)
    x = torch.randn(6, 50, generator=g) * torch.tensor([1e-30, 1e-3, 1.0, 1e3, 1e30, 0.0])[:, None]
    x[5] = 0.0
    x_q, scale = quantize_activations(x, bits)
    qmax = act_qmax(bits)
    assert x_q.dtype == torch.int64 and scale.dtype == torch.float64
    assert int(x_q.abs().max()) <= qmax
    assert bool((x_q[:5].abs().amax(dim=1) == qmax).all())
    assert int(x_q[5].abs().max()) == 0
    err = (x.double() - x_q.double() * scale[:, None]).abs()
    assert bool((err <= scale[:, None] * (0.5 + 1e-9)).all())
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 2] = bad
        with pytest.raises(ValueError):
            quantize_activations(y, bits)


def test_centered_lift():
    for p in (3, 251, 2**31 - 1, 1099511627689):
        v = torch.tensor([0, 1, (p - 1) // 2, (p + 1) // 2, p - 1] + [random.randrange(p) for _ in range(50)])
        lifted = centered_lift(v, p)
        assert torch.equal(torch.remainder(lifted, p), v)
        assert int(lifted.abs().max()) <= (p - 1) // 2
        assert int(centered_lift(torch.tensor([p - 1]), p)) == -1


def test_select_prime_meets_bound_and_is_minimal():
    g = _gen(4)
    layers = {
        "qkv": torch.randint(-127, 128, (384, 256), generator=g, dtype=torch.int8),
        "down": torch.randint(-100, 101, (256, 704), generator=g, dtype=torch.int8),
        "small": (64, 5),
    }
    p = select_prime(layers)
    assert is_prime(p) and p < MAX_P
    bounds = {}
    for name, spec in layers.items():
        n, mw = (spec.shape[1], int(spec.abs().max())) if isinstance(spec, torch.Tensor) else spec
        bounds[name] = 2 * n * mw * (2**15 - 1)
        assert p > bounds[name]
    worst = max(bounds.values())
    assert not any(is_prime(c) for c in range(worst + 1, p))  # the smallest such prime
    check_prime(p, layers)  # accepted
    with pytest.raises(ValueError, match="does not exceed"):
        check_prime(choose_prime(worst // 2), layers)
    with pytest.raises(ValueError):
        check_prime(p + 1, layers)  # even, so composite
    assert required_modulus(704, 100) == 2 * 704 * 100 * 32767


def test_select_prime_int16_fits_every_width_and_refuses_impossible_bounds():
    """int16 weights with 16-bit activations fit every inner dimension the field GEMM takes
    (n <= 2^16: 2*n*32639*32767 < 2^47 < MAX_P = 2^48); int8 ones stay below 2^40 (5 limbs)."""
    for n in (514, 515, 4096, 14336, 53248, 1 << 16):
        p = select_prime({"w16": (n, WEIGHT_QMAX[16])})
        assert 2 * n * WEIGHT_QMAX[16] * (2**15 - 1) < p < MAX_P and is_prime(p)
        check_prime(p, {"w16": (n, WEIGHT_QMAX[16])})
    assert select_prime([(1 << 16, WEIGHT_QMAX[16])]) < 2**47
    assert select_prime([(53248, 127)]) < 2**40  # the largest Llama-family width, int8: 5 limbs
    # a bound beyond 2^48 is refused with the limit named (activation bits are capped at 16, so
    # only an out-of-grid weight magnitude gets there)
    with pytest.raises(ValueError, match="2\\^48"):
        select_prime({"huge": (1 << 16, 1 << 17)})
    with pytest.raises(ValueError, match="exceeds"):
        select_prime([(1 << 17, 127)])
    with pytest.raises(ValueError):
        select_prime([])
    with pytest.raises(ValueError, match="2\\^48"):
        check_prime(2**48 + 21, [(4, 3)])


@pytest.mark.parametrize("n", [600, 4096])
def test_int16_product_exact_at_widths_beyond_the_old_bound(n):
    """PublicWeight with int16 weights at n > 514 (p > 2^40): extremes and random values against
    Python integers, and the lift of the product recovers W_q x_q exactly."""
    g = _gen(n)
    p = select_prime([(n, WEIGHT_QMAX[16])])
    assert p > 2**40
    w = torch.randint(-WEIGHT_QMAX[16], WEIGHT_QMAX[16] + 1, (9, n), generator=g, dtype=torch.int16)
    w[0] = WEIGHT_QMAX[16]
    w[1] = -WEIGHT_QMAX[16]
    x = torch.randint(0, p, (3, n), generator=g, dtype=torch.int64)
    x[0] = p - 1
    got = PublicWeight(w, p).matmul(x)
    want = [[sum(a * b for a, b in zip(xr, wr)) % p for wr in w.tolist()] for xr in x.tolist()]
    assert got.tolist() == want
    # the worst case of the lift: x_q = +-qmax everywhere against +-32639 rows
    x_q = torch.full((2, n), act_qmax(), dtype=torch.int64)
    x_q[1] = -act_qmax()
    y = centered_lift(PublicWeight(w, p).matmul(torch.remainder(x_q, p)), p)
    assert torch.equal(y, x_q @ w.to(torch.int64).t())


def test_reference_equals_python_integers():
    g = _gen(5)
    w = torch.randint(-127, 128, (21, 37), generator=g, dtype=torch.int8)
    x = torch.randn(5, 37, generator=g) * 3
    p = select_prime([w])
    y_q, x_scale = shielded_linear_reference_int(x, w, p)
    x_q, _ = quantize_activations(x)
    want = [[sum(a * b for a, b in zip(xr, wr)) for wr in w.tolist()] for xr in x_q.tolist()]
    assert y_q.tolist() == want
    # the reference refuses a prime that leaves the lift inexact for these values
    sign = torch.where(w[0] >= 0, 1.0, -1.0)
    x_ext = sign[None, :].repeat(2, 1)
    y_ext, _ = shielded_linear_reference_int(x_ext, w, p)
    with pytest.raises(ValueError, match="too small"):
        shielded_linear_reference_int(x_ext, w, choose_prime(int(y_ext.abs().max())))


# ---------------------------------------------------------------------------------------------
# W_C x
# ---------------------------------------------------------------------------------------------


def _blocks(parts, ranks, n, seed):
    g = _gen(seed)
    lefts = [torch.randn(m, k, generator=g) for m, k in zip(parts, ranks)]
    right = torch.randn(sum(ranks), n, generator=g) / n ** 0.5
    dense = torch.zeros(sum(parts), sum(ranks))
    r = c = 0
    for left in lefts:
        dense[r:r + left.shape[0], c:c + left.shape[1]] = left
        r, c = r + left.shape[0], c + left.shape[1]
    return lefts, right, dense


def test_low_rank_factors_cut_the_block_diagonal_left_into_its_parts():
    # a GQA-like qkv (q wide, k and v narrow) with one part of rank 0
    parts, ranks = (64, 16, 16), (8, 0, 3)
    lefts, right, dense = _blocks(parts, ranks, 40, seed=3)
    f = LowRankFactors.block_diagonal(dense, right, parts)
    assert f.rows == ((0, 64), (64, 80), (80, 96)) and f.cols == ((0, 8), (8, 8), (8, 11))
    assert all(torch.equal(a, b) for a, b in zip(f.lefts, lefts))
    assert torch.equal(f.dense_left(), dense) and torch.equal(f.right, right)
    assert (f.m, f.n, f.rank) == (96, 40, 11)
    # the blocks are a function of the dense matrix: cutting again gives the same blocks
    g = LowRankFactors.block_diagonal(f.dense_left(), f.right, parts)
    assert g.cols == f.cols and all(torch.equal(a, b) for a, b in zip(g.lefts, f.lefts))
    # W_C x per part == the dense product (same float32 values up to rounding)
    x = torch.randn(7, 40, generator=_gen(4))
    exact = x.double() @ (dense.double() @ right.double()).t()
    y = f.apply(x)
    assert y.dtype == LOW_RANK_DTYPE == torch.float32 and y.shape == (7, 96)
    assert torch.allclose(y.double(), exact, rtol=0, atol=1e-5)
    assert bool((y[:, 64:80] == 0).all())  # the rank-0 part adds nothing
    # a trailing all-zero column of a part is counted in the next part, where it adds nothing
    z_lefts = [torch.cat([lefts[0], torch.zeros(64, 1)], 1), torch.randn(16, 2, generator=_gen(5)), lefts[2]]
    z_right = torch.randn(14, 40, generator=_gen(6))
    zf = LowRankFactors(z_lefts, z_right)
    cut = LowRankFactors.block_diagonal(zf.dense_left(), z_right, parts)
    assert zf.cols == ((0, 9), (9, 11), (11, 14)) and cut.cols == ((0, 8), (8, 11), (11, 14))
    assert torch.allclose(cut.apply(x), zf.apply(x), rtol=0, atol=1e-6)


def test_low_rank_factors_refuse_a_left_that_is_not_block_diagonal():
    parts, ranks = (6, 5), (2, 3)
    _, right, dense = _blocks(parts, ranks, 9, seed=7)
    bad = dense.clone()
    bad[7, 0] = 0.5  # part 1 reaches into part 0's columns
    with pytest.raises(ValueError, match="not block diagonal"):
        LowRankFactors.block_diagonal(bad, right, parts)
    with pytest.raises(ValueError):
        LowRankFactors.block_diagonal(dense, right, (6, 4))  # parts do not add up to m
    with pytest.raises(ValueError):
        LowRankFactors([torch.zeros(3, 2)], torch.zeros(3, 4))  # widths do not tile right


def test_factors_are_held_in_float32_and_x_may_be_any_float():
    g = _gen(8)
    left, right = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(4, 20, generator=g)
    f = LowRankFactors([left], right)
    assert f.lefts[0].dtype == f.right.dtype == torch.float32 and f.lefts[0].is_contiguous()
    x = torch.randn(3, 20, generator=g).to(torch.bfloat16)
    assert torch.equal(low_rank_term(x, f), low_rank_term(x.float(), (left.float(), right)))


def test_factors_and_x_are_copied_to_aligned_storage():
    """A factor read in place from a file buffer may sit at any offset; BLAS results can depend on
    alignment, so the factors (and x) are copied: the result does not depend on where they were."""
    g = _gen(11)
    buf = torch.randn(10 + 8 * 128, generator=g)
    right_view = buf[10:].view(8, 128)  # 40 bytes past an aligned start, like a safetensors tensor
    left = torch.randn(461, 8, generator=g)
    f_view, f_copy = LowRankFactors([left], right_view), LowRankFactors([left], right_view.clone())
    assert f_view.right.data_ptr() % 64 == 0 and f_view.lefts[0].data_ptr() % 64 == 0
    xbuf = torch.randn(3 + 128, generator=g)
    x_view = xbuf[3:].view(1, 128)
    for x in (x_view, x_view.clone()):
        assert torch.equal(f_view.apply(x), f_copy.apply(x_view.clone()))


@pytest.mark.parametrize("t", [1, 5, 33])
def test_float32_low_rank_term_within_the_dot_product_error_bound(t):
    """Forward error of the two float32 products (Higham, Thm 3.5, gamma_k = k u / (1 - k u),
    u = 2^-24): z^ = fl(x R^T) has |z^ - z| <= gamma_n |x| |R|^T; y^ = fl(z^ L^T) has
    |y^ - z^ L^T| <= gamma_K |z^| |L|^T; so |y^ - x W_C^T| <= gamma_n |x| |R|^T |L|^T + gamma_K |z^| |L|^T.
    Checked entry by entry at a gate_up-like fused shape, against the product in float64; the
    typical relative error (Frobenius) is printed and far below the int8 weight quantization's
    ~2^-8 / sqrt(12)."""
    parts, ranks, n = (1536, 1536), (96, 96), 768
    lefts, right, dense = _blocks(parts, ranks, n, seed=9)
    f = LowRankFactors.block_diagonal(dense, right, parts)
    x = torch.randn(t, n, generator=_gen(10)) * 3
    y = f.apply(x).double()
    exact = (x.double() @ right.double().t()) @ dense.double().t()
    u = 2.0 ** -24

    def gamma(k):
        return k * u / (1 - k * u)

    z_hat = (x @ right.t()).double()
    bound = gamma(n) * (x.double().abs() @ right.double().abs().t()) @ dense.double().abs().t() \
        + gamma(max(ranks)) * z_hat.abs() @ dense.double().abs().t()
    err = (y - exact).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    rel = float((y - exact).norm() / exact.norm())
    print(f"T={t}: float32 W_C x relative error {rel:.1e} (int8 weight quantization ~{2 ** -8 / 12 ** 0.5:.1e})")
    assert rel < 1e-6
