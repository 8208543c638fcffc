"""The masked protocol of one protected linear equals the fixed-point reference bit for bit.

mask (service) -> field GEMM (host) -> unmask (service) is compared with
``shielded_linear_reference`` on random and extreme inputs for several shapes, including a GQA-like
fused qkv; and the dequantized result is compared with the float product x @ W^T under a derived
error bound.
"""

from __future__ import annotations

import pytest
import torch

from secure_service.masks import PooledMaskProvider
from secure_service.shielded_linear import ShieldedLinear
from slip_vllm.core.field import choose_prime, field_matmul
from slip_vllm.core.quantize import (
    LowRankFactors,
    PublicWeight,
    act_qmax,
    centered_lift,
    quantize_weight,
    select_prime,
    shielded_linear_reference,
    shielded_linear_reference_int,
)

# (m, n): tiny; GQA-like fused qkv (hidden 256, 8 query heads and 2 kv heads of 32: 256 + 2*64);
# MLP up/down-like; a single output channel; more outputs than a pool chunk
SHAPES = [(48, 32), (384, 256), (704, 256), (256, 704), (1, 64), (130, 3)]


def _layer(m, n, seed, *, low_rank=True, bias=True, bits=8, act_bits=16, pool_rows=16):
    g = torch.Generator().manual_seed(seed)
    w_d = torch.randn(m, n, generator=g) / n**0.5
    q = quantize_weight(w_d, bits)
    p = select_prime([q.w_q], act_bits=act_bits)
    pw = PublicWeight(q.w_q, p)
    lr = None
    if low_rank:
        k = max(1, min(m, n) // 8)
        lr = (torch.randn(m, k, generator=g), torch.randn(k, n, generator=g) / n**0.5)
    b = torch.randn(m, generator=g) if bias else None
    prov = PooledMaskProvider({"L": pw}, p, pool_rows=pool_rows, chunk_rows=8, start=False)
    prov.prefill()
    lin = ShieldedLinear("L", pw, q.scale, prov, low_rank=lr, bias=b, act_bits=act_bits)
    return lin, q, w_d, lr, b, g


def _inputs(n, g):
    """Random rows plus extreme ones: zeros, constants, one-hot spikes, huge/tiny magnitudes."""
    rows = [torch.randn(7, n, generator=g)]
    rows.append(torch.zeros(2, n))
    rows.append(torch.full((1, n), -3.5))
    spike = torch.randn(2, n, generator=g) * 1e-3
    spike[0, 0], spike[1, n - 1] = 1e4, -1e4  # the rest quantizes to zero
    rows.append(spike)
    rows.append(torch.randn(2, n, generator=g) * torch.tensor([[1e-30], [1e30]]))
    return torch.cat(rows)


def _run(lin, x):
    x_masked, ticket = lin.mask(x)
    y_masked = field_matmul(x_masked, lin.weight.w_q, lin.p) if lin.weight.bits == 8 else lin.host_step(x_masked)
    return x_masked, ticket, y_masked


@pytest.mark.parametrize("m,n", SHAPES)
def test_masked_protocol_equals_reference_bit_for_bit(m, n):
    lin, q, _, lr, b, g = _layer(m, n, seed=m * 1000 + n)
    for x in (_inputs(n, g), torch.randn(1, n, generator=g), torch.randn(33, n, generator=g).to(torch.bfloat16)):
        _, ticket, y_masked = _run(lin, x)
        y_q, x_scale, _ = lin.unmask_quantized(ticket, y_masked)
        ref_q, ref_scale = shielded_linear_reference_int(x, q.w_q, lin.p)
        assert torch.equal(y_q, ref_q)
        assert torch.equal(x_scale, ref_scale)
        _, ticket, y_masked = _run(lin, x)
        y = lin.unmask(ticket, y_masked)
        ref = shielded_linear_reference(x, q.w_q, q.scale, lin.p, low_rank=lr, bias=b)
        assert y.dtype == ref.dtype == torch.float32
        assert torch.equal(y, ref)  # bit for bit
    assert lin.pending == 0


def test_the_layer_holds_its_factors_once_in_compute_precision():
    """Factors are converted at construction (not per step) and computed with as float32; a fused
    layer's per-part factors are used as given and match the reference bit for bit."""
    m, n = 96, 64
    g = torch.Generator().manual_seed(5)
    q = quantize_weight(torch.randn(m, n, generator=g) / n ** 0.5)
    p = select_prime([q.w_q])
    pw = PublicWeight(q.w_q, p)
    prov = PooledMaskProvider({"L": pw}, p, pool_rows=0)
    as_pair = (torch.randn(m, 6, generator=g, dtype=torch.float64), torch.randn(6, n, generator=g, dtype=torch.float64))
    lin = ShieldedLinear("L", pw, q.scale, prov, low_rank=as_pair)
    assert isinstance(lin.low_rank, LowRankFactors)
    assert lin.low_rank.right.dtype == lin.low_rank.lefts[0].dtype == torch.float32
    fused = LowRankFactors([torch.randn(64, 4, generator=g), torch.randn(32, 2, generator=g)],
                           torch.randn(6, n, generator=g))
    lin2 = ShieldedLinear("L", pw, q.scale, prov, low_rank=fused)
    assert lin2.low_rank is fused
    with pytest.raises(ValueError, match="low-rank factors"):
        ShieldedLinear("L", pw, q.scale, prov, low_rank=LowRankFactors([torch.zeros(m, 2)], torch.zeros(2, n + 1)))
    x = torch.randn(5, n, generator=g)
    _, ticket, y_masked = _run(lin2, x)
    assert torch.equal(lin2.unmask(ticket, y_masked), shielded_linear_reference(x, q.w_q, q.scale, p, low_rank=fused))
    prov.close()


def test_extreme_products_hit_the_lift_boundary():
    """|W_q x_q| = n*127*32767 exactly, both signs: the largest value the lift must recover."""
    m, n = 6, 200
    w_q = torch.full((m, n), 127, dtype=torch.int8)
    w_q[1] = -127
    w_q[2, ::2] = -127
    w_q[3] = 0
    w_q[4, 0] = -127
    w_q[5] = torch.randint(-127, 128, (n,), dtype=torch.int8)
    scale = torch.rand(m) + 0.5
    p = select_prime([w_q])
    assert p == choose_prime(2 * n * 127 * act_qmax(16))
    pw = PublicWeight(w_q, p)
    prov = PooledMaskProvider({"E": pw}, p, pool_rows=0)
    lin = ShieldedLinear("E", pw, scale, prov)
    sign2 = torch.where(w_q[2] >= 0, 1.0, -1.0)
    x = torch.stack([torch.ones(n), -torch.ones(n), sign2, -sign2, torch.zeros(n)])
    _, ticket, y_masked = _run(lin, x)
    y_q, _, _ = lin.unmask_quantized(ticket, y_masked)
    ref_q, _ = shielded_linear_reference_int(x, w_q, p)
    assert torch.equal(y_q, ref_q)
    top = n * 127 * act_qmax(16)
    assert int(y_q.max()) == top and int(y_q.min()) == -top
    # negative control: with a prime below the bound the same field path loses these values
    small = choose_prime(top)  # > top but < 2 * top
    assert not torch.equal(centered_lift(torch.remainder(ref_q, small), small), ref_q)


def test_int16_weights_with_8bit_activations():
    lin, q, _, lr, b, g = _layer(40, 300, seed=7, bits=16, act_bits=8)
    assert lin.weight.bits == 16
    x = _inputs(300, g)
    _, ticket, y_masked = _run(lin, x)
    y = lin.unmask(ticket, y_masked)
    ref = shielded_linear_reference(x, q.w_q, q.scale, lin.p, act_bits=8, low_rank=lr, bias=b)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("m,n", [(384, 256), (256, 704)])
def test_dequantized_result_close_to_float(m, n):
    """Error bound (derived, holds for every entry):

    with W_D ~= s_i q_ij (|w_ij - s_i q_ij| <= s_i / 2) and x ~= sigma_t x_q,tj
    (|x_tj - sigma_t x_q,tj| <= sigma_t / 2),
        |y_ti - x_t . W_i| <= (s_i / 2) ||x_t||_1 + (sigma_t / 2) ||s_i q_i||_1
    plus float rounding: the float64 steps (< 1e-12 relative) and the final float32 cast
    (2^-24 relative to |y|).  The W_C x and bias terms are computed in float64 and add no
    quantization error.  Typical error is far smaller: for Gaussian data about
    step / sqrt(12) per weight, i.e. ~1 % of |y| relative in Frobenius norm for int8.
    """
    lin, q, w_d, lr, b, g = _layer(m, n, seed=11)
    x = torch.randn(64, n, generator=g) * (1 + 10 * torch.rand(64, 1, generator=g))
    _, ticket, y_masked = _run(lin, x)
    y = lin.unmask(ticket, y_masked).double()
    w_full = w_d.double() + lr[0].double() @ lr[1].double()
    exact = x.double() @ w_full.t() + b.double()
    s = q.scale.double()
    sigma = x.double().abs().amax(dim=1) / act_qmax(16)
    w_hat_l1 = (q.w_q.double().abs() * s[:, None]).sum(dim=1)
    bound = 0.5 * s[None, :] * x.double().abs().sum(dim=1)[:, None] + 0.5 * sigma[:, None] * w_hat_l1[None, :]
    bound = bound * (1 + 1e-9) + exact.abs() * 2.0**-23 + 1e-9
    err = (y - exact).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    wd_part = x.double() @ w_d.double().t()
    rel = float((y - exact).norm() / wd_part.norm())
    assert rel < 0.02, rel
