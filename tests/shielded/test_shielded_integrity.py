"""Integrity of the host's answers: Freivalds checks, fail-closed steps, replay refusal, alarms."""

from __future__ import annotations

import random

import pytest
import torch

from secure_service.integrity import AlarmCounter, FreivaldsKey, IntegrityError, ReplayError, _key_limbs, dot_mod
from secure_service.masks import PooledMaskProvider
from secure_service.shielded_linear import ShieldedLinear
from slip_vllm.core.field import choose_prime
from slip_vllm.core.quantize import PublicWeight, quantize_weight, select_prime

P40 = 1099511627689  # the largest prime below 2^40


@pytest.mark.parametrize("K", [1, 77, (1 << 18) + 5])
def test_dot_mod_exact(K):
    """Exact against Python integers, including all-(p-1) operands and more than one inner chunk."""
    rng = random.Random(K)
    a = [[P40 - 1] * K, [rng.randrange(P40) for _ in range(K)]]
    v = [[P40 - 1] * K, [rng.randrange(P40) for _ in range(K)]]
    got = dot_mod(torch.tensor(a), _key_limbs(torch.tensor(v)), P40)
    want = [[sum(x * y for x, y in zip(ar, vr)) % P40 for vr in v] for ar in a]
    assert got.tolist() == want


def _layer(m=96, n=64, seed=0, alarms=None, pool_rows=64):
    g = torch.Generator().manual_seed(seed)
    q = quantize_weight(torch.randn(m, n, generator=g))
    p = select_prime([q.w_q])
    pw = PublicWeight(q.w_q, p)
    prov = PooledMaskProvider({"L": pw}, p, pool_rows=pool_rows, chunk_rows=32)
    lin = ShieldedLinear("L", pw, q.scale, prov, alarms=alarms or AlarmCounter())
    return lin, prov, g


def test_key_soundness_parameters():
    lin, prov, _ = _layer()
    key = lin.key
    assert key.u.shape == (key.t, lin.m) and key.t >= 2 and key.soundness_bits >= 64
    assert int(key.u.min()) >= 0 and int(key.u.max()) < lin.p
    want = [[sum(int(u) * int(w) for u, w in zip(ur, col)) % lin.p for col in lin.weight.w_q.t().tolist()]
            for ur in key.u.tolist()]
    assert key.uw.tolist() == want  # a = u^T W_q mod p, exactly
    prov.close()


def test_honest_results_always_pass():
    lin, prov, g = _layer()
    for _ in range(200):
        T = random.randint(1, 6)
        x = torch.randn(T, lin.n, generator=g) * 10 ** random.uniform(-3, 3)
        xm, t = lin.mask(x)
        ym = lin.host_step(xm)
        assert bool(lin.key.check(xm, ym).all())
        lin.unmask(t, ym)
    assert lin.alarms.count == 0 and lin.pending == 0
    prov.close()


def test_single_altered_element_caught_every_trial():
    """A host that alters one element of one result (random place, random nonzero delta mod p) is
    caught on every one of 1000 trials; the step fails closed, the alarm rises, the layer stays usable."""
    trials = 1000
    alarms = AlarmCounter()
    lin, prov, g = _layer(alarms=alarms, pool_rows=256)
    rng = random.Random(1234)
    for i in range(trials):
        T = rng.randint(1, 4)
        xm, t = lin.mask(torch.randn(T, lin.n, generator=g))
        ym = lin.host_step(xm)
        row, col = rng.randrange(T), rng.randrange(lin.m)
        ym[row, col] = (ym[row, col] + rng.randrange(1, lin.p)) % lin.p
        with pytest.raises(IntegrityError) as info:
            lin.unmask(t, ym)
        assert info.value.rows == [row]
        assert alarms.count == i + 1
    assert alarms.per_layer == {"L": trials} and lin.pending == 0
    # the service stays up: the next honest step goes through
    x = torch.randn(3, lin.n, generator=g)
    xm, t = lin.mask(x)
    assert lin.unmask(t, lin.host_step(xm)).shape == (3, lin.m)
    assert alarms.count == trials
    prov.close()


def test_other_cheats_caught():
    alarms = AlarmCounter()
    lin, prov, g = _layer(alarms=alarms)
    p = lin.p

    def step():
        xm, t = lin.mask(torch.randn(3, lin.n, generator=g))
        return xm, t, lin.host_step(xm)

    # an honest product of a different input (the host shifts x~ by one unit): caught, because the
    # check uses the service's own copy of x~
    xm, t, _ = step()
    shifted = xm.clone()
    shifted[1, 5] = (shifted[1, 5] + 1) % p
    with pytest.raises(IntegrityError):
        lin.unmask(t, lin.host_step(shifted))
    # a multiple of p added (same value mod p) is out of range and refused
    xm, t, ym = step()
    ym[0, 0] += p
    with pytest.raises(IntegrityError, match="outside"):
        lin.unmask(t, ym)
    # negative values, wrong shape, wrong dtype
    xm, t, ym = step()
    ym[2, 3] = -1
    with pytest.raises(IntegrityError):
        lin.unmask(t, ym)
    xm, t, ym = step()
    with pytest.raises(IntegrityError):
        lin.unmask(t, ym[:2])
    xm, t, ym = step()
    with pytest.raises(IntegrityError):
        lin.unmask(t, ym.to(torch.float64))
    # a whole row of zeros, a row swap
    xm, t, ym = step()
    ym[1] = 0
    with pytest.raises(IntegrityError):
        lin.unmask(t, ym)
    xm, t, ym = step()
    with pytest.raises(IntegrityError):
        lin.unmask(t, ym[[1, 0, 2]])
    assert alarms.count == 7 and lin.pending == 0
    prov.close()


def test_replayed_ticket_refused():
    alarms = AlarmCounter()
    lin, prov, g = _layer(alarms=alarms)
    xm, t = lin.mask(torch.randn(2, lin.n, generator=g))
    ym = lin.host_step(xm)
    lin.unmask(t, ym)
    assert alarms.count == 0
    with pytest.raises(ReplayError):
        lin.unmask(t, ym)
    assert alarms.count == 1
    # a failed step's ticket is burnt too: no second try with other values
    xm, t = lin.mask(torch.randn(2, lin.n, generator=g))
    bad = lin.host_step(xm)
    bad[0, 0] = (bad[0, 0] + 1) % lin.p
    with pytest.raises(IntegrityError):
        lin.unmask(t, bad)
    with pytest.raises(ReplayError):
        lin.unmask(t, lin.host_step(xm))
    # a discarded step cannot be redeemed; a ticket of another layer is refused
    xm, t = lin.mask(torch.randn(2, lin.n, generator=g))
    assert lin.discard(t) and not lin.discard(t)
    with pytest.raises(ReplayError):
        lin.unmask(t, lin.host_step(xm))
    other, prov2, _ = _layer(seed=1, alarms=alarms)
    xm2, t2 = other.mask(torch.randn(1, other.n, generator=g))
    with pytest.raises(ReplayError):
        lin.unmask(t2, lin.host_step(xm2))
    assert alarms.count == 5
    prov.close()
    prov2.close()


def test_key_from_stored_vectors_and_mismatch():
    g = torch.Generator().manual_seed(3)
    q = quantize_weight(torch.randn(20, 30, generator=g))
    p = select_prime([q.w_q])
    k1 = FreivaldsKey(q.w_q, p)
    k2 = FreivaldsKey(PublicWeight(q.w_q, p), u=k1.u.clone())
    assert torch.equal(k1.uw, k2.uw)
    with pytest.raises(ValueError):
        FreivaldsKey(q.w_q, p, u=torch.full((1, 20), p, dtype=torch.int64))
    with pytest.raises(ValueError):
        FreivaldsKey(PublicWeight(q.w_q, p), choose_prime(p))
    # a single vector (t=1) already catches a random error except with probability 1/p
    k = FreivaldsKey(q.w_q, p, security_bits=1)
    assert k.t == 1
    x = torch.randint(0, p, (50, 30))
    y = PublicWeight(q.w_q, p).matmul(x)
    y[:, 0] = (y[:, 0] + 1) % p
    assert not bool(k.check(x, y).any())


def test_the_key_of_a_128k_vocabulary_lm_head_is_exact_and_catches_a_tampered_row():
    """Llama-3's LM head has 128 256 output rows.  u^T W_q is a field GEMM whose inner dimension is
    that width, beyond the field GEMM's exactness bound (2^16 terms): a single product is refused,
    and ``key_images`` builds it in two chunks.  Checked against Python integers on every entry,
    then an honest answer passes and one changed value is caught."""
    from slip_vllm.core.field import MAX_N, field_matmul_reference
    from secure_service.integrity import key_images

    vocab, n = 128_256, 6
    g = torch.Generator().manual_seed(5)
    w_q = torch.randint(-127, 128, (vocab, n), dtype=torch.int8, generator=g)
    weight = PublicWeight(w_q, P40)
    with pytest.raises(ValueError, match="MAX_N"):
        weight.transposed()  # the former construction: inner dimension 128 256 > 2^16
    rng = random.Random(6)
    u = torch.tensor([[rng.randrange(P40) for _ in range(vocab)] for _ in range(2)], dtype=torch.int64)
    key = FreivaldsKey(weight, u=u, layer_id="lm_head")
    assert vocab > MAX_N and key.uw.shape == (2, n)
    ws, us = w_q.t().tolist(), u.tolist()
    want = [[sum(a * b for a, b in zip(ur, wc)) % P40 for wc in ws] for ur in us]
    assert key.uw.tolist() == want
    # a smaller chunk (three, uneven) gives the same images
    assert torch.equal(key_images(weight, u, chunk=50_000), key.uw)
    x = torch.tensor([[rng.randrange(P40) for _ in range(n)] for _ in range(3)], dtype=torch.int64)
    y = weight.matmul(x)
    assert torch.equal(y[:, :5], field_matmul_reference(x, w_q[:5], P40))
    key.verify(x, y)
    bad = y.clone()
    bad[1, 100_000] = (bad[1, 100_000] + 1) % P40  # a row of the second chunk
    with pytest.raises(IntegrityError) as err:
        key.verify(x, bad)
    assert err.value.rows == [1]
