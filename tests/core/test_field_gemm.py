"""Exactness of the mod-p field GEMM (host path of protocol ``shielded``) and the prime utilities.

Every backend is checked against a pure-Python big-integer reference: in full for small shapes,
on random entries plus closed-form extreme inputs for the Llama-like shapes, for int8 weights and
for int16 weights (p up to 2^48: 6 limbs and the int16 digit planes).  CUDA tests skip cleanly
without a GPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from slip_vllm.core.field import (
    MAX_N,
    MAX_P,
    FieldWeight,
    available_backends,
    choose_prime,
    default_backend,
    field_matmul,
    field_matmul_reference,
    is_prime,
    limb_count,
    min_modulus,
    reference_entries,
)

BIG_SHAPES = [(4096, 4096), (12288, 4096), (14336, 4096), (4096, 14336)]
P40 = 1099511627689  # the largest prime below 2^40
P41 = 1099511627791  # the smallest prime above 2^40 (6 limbs)
P47 = 140179159515209  # the prime int16 weights x 16-bit activations need at n = 2^16
P48 = 281474976710597  # the largest prime below 2^48 = MAX_P
PRIMES = [2, 3, 251, 257, 65537, 2**31 - 1, 549755813911, P40, P41, P47, P48]
Q16 = 127 * 256 + 127  # largest |w| of an int16 weight
CPU_BACKENDS = ["cpu_int8", "naive_int8", "f64"]
_skip_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def cuda(f):
    return pytest.mark.gpu(_skip_no_cuda(f))


def _trial_division(n: int) -> bool:
    if n < 2:
        return False
    for q in range(2, math.isqrt(n) + 1):
        if n % q == 0:
            return False
    return True


def _rand(shape, lo, hi, gen, dtype):
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)


# ---------------------------------------------------------------------------------------------
# primes
# ---------------------------------------------------------------------------------------------


def test_is_prime_matches_trial_division_below_5000():
    for n in range(5000):
        assert is_prime(n) == _trial_division(n), n


@pytest.mark.parametrize(
    "n",
    [561, 1105, 1729, 41041, 825265, 321197185,  # Carmichael numbers
     2047, 3215031751, 2152302898747, 3474749660383, 341550071728321,  # strong pseudoprimes
     (2**20 + 7) * (2**20 + 39), (2**31 - 1) * 3, P40 * 3],
)
def test_is_prime_rejects_pseudoprimes(n):
    assert not is_prime(n)


@pytest.mark.parametrize("n", [2**31 - 1, 2**61 - 1, P40, P41, P47, P48, 549755813911, 1000000007, 998244353])
def test_is_prime_accepts_known_primes(n):
    assert is_prime(n)


def test_is_prime_random_40_bit_against_trial_division():
    gen = torch.Generator().manual_seed(1)
    for n in torch.randint(2**39, 2**40, (12,), generator=gen).tolist():
        n |= 1
        assert is_prime(n) == _trial_division(n), n


def test_is_prime_types():
    with pytest.raises(TypeError):
        is_prime(7.0)
    with pytest.raises(ValueError):
        is_prime(10**30)


def test_choose_prime():
    assert choose_prime(0) == 2
    assert choose_prime(2) == 3
    assert choose_prime(10) == 11
    assert choose_prime(13) == 17
    p = choose_prime(2**39)
    assert p > 2**39 and is_prime(p)
    assert not any(_trial_division(c) for c in range(2**39 + 1, p))
    assert choose_prime(P40 - 1) == P40
    assert choose_prime(P40) == P41 and not any(_trial_division(c) for c in range(P40 + 1, P41))
    assert choose_prime(P48 - 1) == P48
    assert choose_prime(2 * 65536 * Q16 * 32767) == P47
    with pytest.raises(ValueError, match="2\\^48"):
        choose_prime(P48)  # no prime in (P48, 2^48)
    with pytest.raises(ValueError):
        choose_prime(2**48)


def test_min_modulus_and_limbs():
    assert min_modulus(4096, 127, 32767) == 2 * 4096 * 127 * 32767
    p = choose_prime(min_modulus(14336, 127, 32767))
    assert p < MAX_P and limb_count(p) == 5
    assert [limb_count(q) for q in (2, 256, 257, 65536, 65537, 2**32, 2**32 + 1, P40, P41, P48)] == [
        1, 1, 2, 2, 3, 4, 5, 5, 6, 6]
    assert MAX_P == 2**48 and P48 < MAX_P


# ---------------------------------------------------------------------------------------------
# CPU exactness
# ---------------------------------------------------------------------------------------------


def _extreme_cases(T, n, m, p, gen):
    """(x, w) pairs with extreme values: 0, p-1, +-127, -128, and mixtures."""
    cases = []
    full = lambda shape, v, dt: torch.full(shape, v, dtype=dt)  # noqa: E731
    for xv in (0, p - 1):
        for wv in (127, -127, -128):
            cases.append((full((T, n), xv, torch.int64), full((m, n), wv, torch.int8)))
    xs = torch.where(_rand((T, n), 0, 2, gen, torch.int64) == 1, p - 1, 0)
    ws = torch.where(_rand((m, n), 0, 2, gen, torch.int64) == 1, 127, -128).to(torch.int8)
    cases.append((xs, ws))
    cases.append((_rand((T, n), max(0, p - 3), p, gen, torch.int64), ws))
    return cases


@pytest.mark.parametrize("p", PRIMES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_small_shapes_exact(p, backend):
    gen = torch.Generator().manual_seed(p % 1000)
    for (T, n, m) in [(1, 1, 1), (3, 7, 5), (5, 64, 33), (17, 129, 40)]:
        x = _rand((T, n), 0, p, gen, torch.int64)
        w = _rand((m, n), -128, 128, gen, torch.int8)
        pairs = [(x, w)] + _extreme_cases(T, n, m, p, gen)
        for xx, ww in pairs:
            x0, w0 = xx.clone(), ww.clone()
            y = field_matmul(xx, ww, p, backend=backend)
            assert y.dtype == torch.int64 and y.shape == (T, m)
            assert torch.equal(y, field_matmul_reference(xx, ww, p)), (T, n, m, backend)
            assert torch.equal(xx, x0) and torch.equal(ww, w0), "inputs must not be modified"


def test_reference_is_plain_big_int():
    x = torch.tensor([[P40 - 1, 5]], dtype=torch.int64)
    w = torch.tensor([[-128, 127]], dtype=torch.int8)
    assert field_matmul_reference(x, w, P40).item() == ((P40 - 1) * -128 + 5 * 127) % P40


def test_field_weight_reuse_and_vector_input():
    gen = torch.Generator().manual_seed(3)
    w = _rand((48, 96), -128, 128, gen, torch.int8)
    fw = FieldWeight(w, P40)
    for T in (1, 2, 9):
        x = _rand((T, 96), 0, P40, gen, torch.int64)
        ref = field_matmul_reference(x, w, P40)
        assert torch.equal(fw.matmul(x), ref)
        assert torch.equal(field_matmul(x, fw, P40, backend="f64"), ref)
    x1 = _rand((96,), 0, P40, gen, torch.int64)
    y1 = field_matmul(x1, fw, P40)
    assert y1.shape == (48,) and torch.equal(y1, field_matmul_reference(x1[None], w, P40)[0])
    assert field_matmul(torch.zeros((0, 96), dtype=torch.int64), fw, P40).shape == (0, 48)
    assert default_backend("cpu") == "cpu_int8" and "cpu_int8" in available_backends("cpu")


def test_errors():
    w = torch.zeros((4, 8), dtype=torch.int8)
    x = torch.zeros((2, 8), dtype=torch.int64)
    with pytest.raises(ValueError, match="not prime"):
        field_matmul(x, w, 15)
    with pytest.raises(ValueError, match="2\\^48"):
        field_matmul(x, w, 2**48 + 15)
    with pytest.raises(TypeError):
        field_matmul(x.to(torch.int32), w, 7)
    with pytest.raises(TypeError):
        field_matmul(x, w.to(torch.int32), 7)
    with pytest.raises(ValueError, match="32639"):
        field_matmul(x, torch.full((4, 8), 32640, dtype=torch.int16), 7)
    with pytest.raises(ValueError):
        field_matmul(torch.zeros((2, 9), dtype=torch.int64), w, 7)
    with pytest.raises(ValueError, match="prepared for"):
        field_matmul(x, FieldWeight(w, 7), 11)
    with pytest.raises(ValueError, match="outside"):
        field_matmul(x + 7, w, 7, validate=True)
    with pytest.raises(ValueError, match="outside"):
        field_matmul(x - 1, w, 7, validate=True)
    with pytest.raises(ValueError, match="MAX_N"):
        FieldWeight(torch.zeros((1, MAX_N + 1), dtype=torch.int8), 7)
    with pytest.raises(ValueError, match="unknown backend"):
        field_matmul(x, w, 7, backend="nope")
    with pytest.raises(ValueError, match="CUDA"):
        field_matmul(x, w, 7, backend="triton")


@pytest.mark.parametrize("p", [P40, P48])
def test_bound_at_max_n(p):
    """n = MAX_N with all-extreme inputs: the int32 / int64 bounds of the argument are tight here
    (5 limbs without, 6 limbs with the one intermediate reduction)."""
    n = MAX_N
    for wv in (-128, 127):
        w = torch.full((3, n), wv, dtype=torch.int8)
        x = torch.full((2, n), p - 1, dtype=torch.int64)
        want = (p - 1) * wv * n % p
        for backend in CPU_BACKENDS:
            y = field_matmul(x, w, p, backend=backend)
            assert torch.equal(y, torch.full((2, 3), want, dtype=torch.int64)), backend


@pytest.mark.parametrize("p", [257, P40, P41, P47, P48])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int16_small_shapes_exact(p, backend):
    """int16 weights (the stacked digit planes [W_hi | W_lo] with x' = [256 x mod p | x]) against
    Python integers on the original int16 W: random values and the extremes +-32639, 0, p - 1."""
    gen = torch.Generator().manual_seed(p % 991)
    for (T, n, m) in [(1, 1, 1), (3, 7, 5), (17, 129, 40)]:
        x = _rand((T, n), 0, p, gen, torch.int64)
        w = _rand((m, n), -Q16, Q16 + 1, gen, torch.int16)
        pairs = [(x, w)]
        for xv in (0, p - 1):
            for wv in (Q16, -Q16, -1):
                pairs.append((torch.full((T, n), xv, dtype=torch.int64), torch.full((m, n), wv, dtype=torch.int16)))
        for xx, ww in pairs:
            fw = FieldWeight(ww, p)
            assert fw.bits == 16 and fw.k == 2 * n and fw.parts is None
            assert torch.equal(field_matmul(xx, fw, p, backend=backend), field_matmul_reference(xx, ww, p))


@pytest.mark.parametrize("n", [MAX_N // 2, MAX_N // 2 + 1, MAX_N])
def test_int16_bound_at_the_widths_where_the_layout_changes(n):
    """int16 at n = 2^15 (stacked planes, inner dimension 2^16: the int32 bound is tight), just above
    (two separate planes) and at MAX_N, with all-extreme inputs at p = P47 and P48, every CPU backend."""
    for p in (P47, P48):
        for wv in (-Q16, Q16):
            fw = FieldWeight(torch.full((2, n), wv, dtype=torch.int16), p)
            assert (fw.parts is None) == (2 * n <= MAX_N)
            x = torch.full((2, n), p - 1, dtype=torch.int64)
            want = (p - 1) * wv * n % p
            for backend in CPU_BACKENDS:
                assert bool((field_matmul(x, fw, p, backend=backend) == want).all()), (n, p, wv, backend)


def _spot_check(y, x, w, p, gen, k=24):
    T, m = y.shape
    rows = torch.randint(0, T, (k,), generator=gen).tolist() + [0, T - 1, T - 1]
    cols = torch.randint(0, m, (k,), generator=gen).tolist() + [0, m - 1, 0]
    want = reference_entries(x, w, p, rows, cols)
    got = y.cpu()
    for t, i, v in zip(rows, cols, want):
        assert int(got[t, i]) == v, (t, i)


@pytest.mark.parametrize("m,n", BIG_SHAPES)
def test_cpu_big_shapes(m, n):
    """Llama-like shapes on CPU, T = 1 and 3: big-int spot checks, f64 cross-check, extremes."""
    gen = torch.Generator().manual_seed(m + n)
    p = P40
    w = _rand((m, n), -128, 128, gen, torch.int8)
    fw = FieldWeight(w, p)
    for T in (1, 3):
        x = _rand((T, n), 0, p, gen, torch.int64)
        y = field_matmul(x, fw, p)
        _spot_check(y, x, w, p, gen)
        if T == 1:
            assert torch.equal(y, field_matmul(x, fw, p, backend="f64"))
    # extremes in closed form: x = p-1 everywhere, rows of W all +127 / all -128 / all 0
    we = torch.zeros((m, n), dtype=torch.int8)
    we[0::3] = 127
    we[1::3] = -128
    xe = torch.full((2, n), p - 1, dtype=torch.int64)
    ye = field_matmul(xe, we, p)
    want = torch.tensor([(p - 1) * v * n % p for v in (127, -128, 0)], dtype=torch.int64)
    assert torch.equal(ye, want.repeat((m + 2) // 3)[:m].expand(2, m))


def test_triton_kernel_logic_in_interpreter():
    """Runs the CUDA kernels' code through Triton's CPU interpreter (small shapes), if installed."""
    pytest.importorskip("triton")
    code = r"""
import torch
from slip_vllm.core.field import FieldWeight, field_matmul_reference
from slip_vllm.core import field_kernels_cuda as fk
fk._sm_count = lambda d: 8
g = torch.Generator().manual_seed(0)
cfgs = [fk.KernelConfig(64, 16, 64, 4, 2, 8, 0, "fused"), fk.KernelConfig(64, 16, 64, 4, 2, 2, 3, "planes"),
        fk.KernelConfig(64, 32, 128, 4, 2, 8, 1, "stacked"), fk.KernelConfig(64, 16, 64, 4, 2, 2, 2, "stacked")]
P48 = 281474976710597
for (T, n, m, p) in [(3, 200, 70, 1099511627689), (20, 130, 64, 257), (1, 64, 64, 65537), (17, 96, 65, 2**31 - 1),
                     (5, 64, 64, 3), (40, 128, 64, 549755813911), (3, 200, 70, P48), (20, 130, 64, 1099511627791)]:
    x = torch.randint(0, p, (T, n), generator=g)
    w = torch.randint(-128, 128, (m, n), generator=g).to(torch.int8)
    fw = FieldWeight(w, p)
    ref = field_matmul_reference(x, w, p)
    for c in cfgs:
        assert torch.equal(fk.field_matmul_triton(x, fw, c), ref), (T, n, m, p, c)
for p in (1099511627689, P48):
    x = torch.full((5, 128), p - 1); w = torch.full((64, 128), -128, dtype=torch.int8)
    for c in cfgs:
        assert torch.equal(fk.field_matmul_triton(x, FieldWeight(w, p), c), field_matmul_reference(x, w, p))
# int16: the kernel multiplies the stacked planes with x' = [256 x mod p | x]
for (T, n, m, p) in [(5, 64, 64, 140179159515209), (3, 100, 70, P48)]:
    x = torch.randint(0, p, (T, n), generator=g)
    w = torch.randint(-32639, 32640, (m, n), generator=g).to(torch.int16)
    fw = FieldWeight(w, p)
    xk = torch.cat([torch.remainder(x * 256, p), x], dim=1)
    ref = field_matmul_reference(x, w, p)
    for c in cfgs:
        assert torch.equal(fk.field_matmul_triton(xk, fw, c), ref), (T, n, m, p, c)
x = torch.randint(0, 257, (21, 100), generator=g); w = torch.randint(-128, 128, (64, 100), generator=g).to(torch.int8)
fk._INDEX_LIMIT = 100 * 2 * 4  # forces chunks of 4 tokens (int32 offset guard)
assert torch.equal(fk.field_matmul_triton(x, FieldWeight(w, 257), cfgs[2]), field_matmul_reference(x, w, 257))
print("INTERPRETER_OK")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "INTERPRETER_OK" not in r.stdout:
        if "ModuleNotFoundError" in r.stderr and "triton" in r.stderr:
            pytest.skip("triton not importable in a subprocess")
    assert r.returncode == 0 and "INTERPRETER_OK" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# CUDA exactness (run on a GPU machine; skipped elsewhere)
# ---------------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("p", PRIMES)
def test_cuda_small_shapes_exact(p):
    gen = torch.Generator().manual_seed(p % 997)
    backends = [b for b in available_backends("cuda") if b != "reference"]
    assert backends[0] == "triton", "the Triton kernel should be the CUDA default"
    for (T, n, m) in [(1, 1, 1), (3, 7, 5), (5, 64, 33), (37, 1000, 200), (130, 257, 300)]:
        x = _rand((T, n), 0, p, gen, torch.int64)
        w = _rand((m, n), -128, 128, gen, torch.int8)
        for xx, ww in [(x, w)] + _extreme_cases(T, n, m, p, gen):
            ref = field_matmul_reference(xx, ww, p)
            xc, wc = xx.cuda(), ww.cuda()
            for b in backends:
                y = field_matmul(xc, wc, p, backend=b)
                assert y.is_cuda and y.dtype == torch.int64
                assert torch.equal(y.cpu(), ref), (T, n, m, p, b)
            assert torch.equal(xc.cpu(), xx) and torch.equal(wc.cpu(), ww)


@cuda
def test_cuda_every_kernel_config():
    from slip_vllm.core import field_kernels_cuda as fk

    gen = torch.Generator().manual_seed(11)
    for (T, n, m, splits) in [(50, 1000, 200, (1, 2)), (300, 768, 384, (0,))]:
        x = _rand((T, n), 0, P40, gen, torch.int64)
        w = _rand((m, n), -128, 128, gen, torch.int8)
        want = field_matmul_reference(x, w, P40).cuda()
        fw = FieldWeight(w.cuda(), P40)
        xc = x.cuda()
        for cfg in fk.CANDIDATES + [fk.pick_config(T, m, n)]:
            for split in splits:
                c = fk.replace(cfg, split_k=split)
                assert torch.equal(fk.field_matmul_triton(xc, fw, c), want), (T, n, m, c)


@cuda
@pytest.mark.parametrize("m,n", BIG_SHAPES)
@pytest.mark.parametrize("T", [1, 16, 256, 4096])
def test_cuda_big_shapes(m, n, T):
    gen = torch.Generator().manual_seed(m * 7 + n + T)
    p = P40
    w = _rand((m, n), -128, 128, gen, torch.int8)
    x = _rand((T, n), 0, p, gen, torch.int64)
    fw = FieldWeight(w.cuda(), p)
    y = field_matmul(x.cuda(), fw, p)
    assert torch.equal(y, field_matmul(x.cuda(), fw, p, backend="f64"))
    _spot_check(y, x, w, p, gen)
    # extremes: x in {0, p-1}, w in {+127, -128, -127}
    xe = torch.where(_rand((T, n), 0, 2, gen, torch.int64) == 1, p - 1, 0)
    we = torch.where(_rand((m, n), 0, 3, gen, torch.int64) == 0, 127, -128).to(torch.int8)
    we[-1] = -127
    fwe = FieldWeight(we.cuda(), p)
    ye = field_matmul(xe.cuda(), fwe, p)
    assert torch.equal(ye, field_matmul(xe.cuda(), fwe, p, backend="f64"))
    _spot_check(ye, xe, we, p, gen, k=8)
    full = field_matmul(torch.full((T, n), p - 1, dtype=torch.int64, device="cuda"),
                        FieldWeight(torch.full((m, n), -128, dtype=torch.int8, device="cuda"), p), p)
    assert bool((full == (p - 1) * -128 * n % p).all())


@cuda
@pytest.mark.parametrize("m,n", BIG_SHAPES)
@pytest.mark.parametrize("T", [1, 16, 2048])
def test_cuda_int16_big_shapes(m, n, T):
    """int16 weights at Llama-8B shapes on the GPU, p = P47 (6 limbs, what n = 2^16 needs at 16
    bits): Triton == f64 (independent limbs), big-int spot checks, and the all-extreme closed form."""
    gen = torch.Generator().manual_seed(m * 5 + n + T)
    p = P47
    w = _rand((m, n), -Q16, Q16 + 1, gen, torch.int16)
    x = _rand((T, n), 0, p, gen, torch.int64)
    fw = FieldWeight(w.cuda(), p)
    y = field_matmul(x.cuda(), fw, p)
    assert torch.equal(y, field_matmul(x.cuda(), fw, p, backend="f64"))
    _spot_check(y, x, w, p, gen)
    for wv in (-Q16, Q16):
        full = field_matmul(torch.full((T, n), p - 1, dtype=torch.int64, device="cuda"),
                            FieldWeight(torch.full((m, n), wv, dtype=torch.int16, device="cuda"), p), p)
        assert bool((full == (p - 1) * wv * n % p).all())


def _masked_gemm_shapes(config) -> list[tuple[int, int]]:
    """(m, n) of every masked GEMM of a Llama-family config: qkv, o, gate_up, down, LM head."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    return [(heads * d + 2 * kv * d, hidden), (hidden, heads * d), (2 * inter, hidden), (hidden, inter),
            (config.vocab_size, hidden)]


def test_every_masked_gemm_shape_of_the_tests_models_is_exact(tmp_path):
    """The shapes the shielded tests serve (tiny random Llama/Qwen2, the TINY reference LM), with
    the prime the protocol would pick for them and with the 40-bit limit: random inputs and the
    extreme values, every CPU backend and the default one, against Python big ints."""
    from transformers import AutoConfig

    from slip_vllm.core.quantize import act_qmax
    from slip_vllm.evaluation.reference_model import TINY
    from slip_vllm.protect.tiny_models import make_tiny_model

    configs = [AutoConfig.from_pretrained(make_tiny_model(f, tmp_path / f, hidden=128, layers=1, tie=(f == "qwen2")))
               for f in ("llama", "qwen2")]
    ref = TINY
    configs.append(type("Tiny", (), dict(hidden_size=ref.hidden_size, num_attention_heads=ref.num_heads,
                                         num_key_value_heads=ref.num_kv_heads, intermediate_size=ref.intermediate_size,
                                         vocab_size=ref.vocab_size)))
    shapes = sorted({s for c in configs for s in _masked_gemm_shapes(c)})
    assert len(shapes) >= 8
    gen = torch.Generator().manual_seed(29)
    for m, n in shapes:
        for p in (choose_prime(min_modulus(n, 127, act_qmax())), P40):
            for T in (1, 5):
                x = _rand((T, n), 0, p, gen, torch.int64)
                w = _rand((m, n), -128, 128, gen, torch.int8)
                for xx, ww in [(x, w)] + _extreme_cases(T, n, m, p, gen)[-3:]:
                    want = field_matmul_reference(xx, ww, p)
                    assert torch.equal(field_matmul(xx, ww, p), want), (m, n, p, T)
                    for backend in CPU_BACKENDS:
                        assert torch.equal(field_matmul(xx, ww, p, backend=backend), want), (m, n, p, T, backend)
