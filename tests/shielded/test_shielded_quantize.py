"""Fixed-point numerics of protocol ``shielded``: quantization, lift, prime choice, reference.

The reference is checked against plain Python integers; the prime against the brief's bound.
"""

from __future__ import annotations

import random

import pytest
import torch

from slip_vllm.core.field import MAX_P, choose_prime, is_prime
from slip_vllm.core.quantize import (
    WEIGHT_QMAX,
    PublicWeight,
    act_qmax,
    centered_lift,
    check_prime,
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


def test_select_prime_refuses_impossible_bounds():
    # int16 weights with 16-bit activations: 2*4096*32639*32767 > 2^40
    with pytest.raises(ValueError, match="2\\^40"):
        select_prime({"big16": (4096, WEIGHT_QMAX[16])})
    with pytest.raises(ValueError, match="2\\^40"):
        select_prime([(600, WEIGHT_QMAX[16])])
    # ... while fewer activation bits make them fit
    p = select_prime([(4096, WEIGHT_QMAX[16])], act_bits=8)
    assert p > 2 * 4096 * WEIGHT_QMAX[16] * 127
    with pytest.raises(ValueError, match="exceeds"):
        select_prime([(1 << 17, 127)])
    with pytest.raises(ValueError):
        select_prime([])
    # the largest Llama-family inner dimension fits with int8 weights
    assert select_prime([(53248, 127)]) < MAX_P


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
