"""One-time masks: CSPRNG uniformity, what the host sees, freshness, and the precompute pool
(sized from the settings, refilled by the low-water policy, exact and never reused under demand
above the refill rate, with consistent stats).

Every statistical test has a negative control that must fail, so a broken mask source is caught
(a chi-square p-value below 1e-6 counts as "not uniform"; an honest run fails a test with
probability about 1e-6).
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import torch
from scipy import stats

from secure_service import masks as masks_mod
from secure_service.masks import (
    MaskAuditRecorder,
    MaskBatch,
    PooledMaskProvider,
    csprng_field_elements,
    select_precompute_backend,
)
from secure_service.shielded_linear import ShieldedLinear
from slip_vllm.core.field import available_backends, choose_prime, field_matmul, field_matmul_reference
from slip_vllm.core.quantize import PublicWeight, quantize_activations, quantize_weight, select_prime
from slip_vllm.settings import Settings, settings

ALPHA = 1e-6


def _uniform_pvalue(values: np.ndarray, p: int, bins: int = 64) -> float:
    """Chi-square p-value of values in [0, p) against uniform, on top-bit buckets floor(v*bins/p).

    Bucket sizes differ by at most one element out of ~p/bins, negligible for the p used here.
    """
    v = np.asarray(values, dtype=object if p > 2**31 else np.int64)
    b = np.array([(int(a) * bins) // p for a in v.ravel()]) if v.dtype == object else (v.ravel() * bins) // p
    counts = np.bincount(b, minlength=bins)
    return float(stats.chisquare(counts).pvalue)


def _low_bits_pvalue(values: np.ndarray, bins: int = 64) -> float:
    counts = np.bincount(np.asarray(values).ravel() % bins, minlength=bins)
    return float(stats.chisquare(counts).pvalue)


@pytest.mark.parametrize("p", [251, 257, 65537, 2**31 - 1])
def test_csprng_field_elements_exactly_uniform(p):
    v = csprng_field_elements((400, 500), p)
    assert v.dtype == torch.int64 and v.shape == (400, 500)
    assert int(v.min()) >= 0 and int(v.max()) < p
    a = v.numpy().ravel()
    if p < 70000:  # one bin per element of Z_p: any bias of a modulo reduction would show
        counts = np.bincount(a, minlength=p)
        assert stats.chisquare(counts).pvalue > ALPHA
    else:
        assert _uniform_pvalue(a, p) > ALPHA and _low_bits_pvalue(a) > ALPHA
    # negative control: the same test rejects "bits(p-1) random bits, reduced mod p" (the values
    # below 2^b - p come up twice as often), the shortcut that rejection sampling avoids
    if p < 1000:  # (for p just above a power of two only two values are rarer: too few samples here)
        b = (p - 1).bit_length()
        raw = np.random.default_rng(0).integers(0, 1 << b, size=a.size)
        assert stats.chisquare(np.bincount(raw % p, minlength=p)).pvalue < ALPHA


def _provider_and_layers(shapes, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    qs = {name: quantize_weight(torch.randn(m, n, generator=g)) for name, (m, n) in shapes.items()}
    p = select_prime([q.w_q for q in qs.values()])
    pws = {name: PublicWeight(q.w_q, p) for name, q in qs.items()}
    return p, pws, qs, g


def test_pairs_are_exact_images():
    p, pws, _, _ = _provider_and_layers({"a": (24, 40)})
    with PooledMaskProvider(pws, p, pool_rows=8, chunk_rows=3, start=False) as prov:
        prov.prefill()
        for rows in (5, 4, 0, 9):  # pool, pool+on demand, empty, on demand
            batch = prov.take("a", rows)
            assert batch.r.shape == (rows, 40) and batch.wr.shape == (rows, 24)
            if rows:
                assert int(batch.r.min()) >= 0 and int(batch.r.max()) < p
                assert torch.equal(batch.wr, field_matmul_reference(batch.r, pws["a"].w_q, p))
            batch.destroy()
            assert batch.destroyed and int(batch.r.abs().sum()) == 0 and int(batch.wr.abs().sum()) == 0


def test_host_view_in_field_fresh_and_uniform():
    """A recorded run: every value the host gets is in [0, p); no mask row repeats; masked rows of
    adversarial constant inputs pass uniformity tests, and differences of rows with equal inputs too."""
    shapes = {"qkv": (96, 64), "o": (64, 64), "up": (128, 64), "down": (64, 128)}
    p, pws, qs, g = _provider_and_layers(shapes, seed=1)
    rec = MaskAuditRecorder()
    seen_by_input = {"zeros": [], "const": [], "onehot": [], "random": []}
    with PooledMaskProvider(pws, p, pool_rows=32, chunk_rows=8, recorder=rec) as prov:
        layers = {k: ShieldedLinear(k, pws[k], qs[k].scale, prov) for k in shapes}
        total = 0
        for step in range(30):
            for name, lin in layers.items():
                n = lin.n
                inputs = {
                    "zeros": torch.zeros(4, n),
                    "const": torch.full((4, n), 2.0),
                    "onehot": torch.eye(n)[:4] * 7,
                    "random": torch.randn(4, n, generator=g),
                }
                x = torch.cat(list(inputs.values()))
                x_masked, ticket = lin.mask(x)
                total += x.shape[0]
                assert x_masked.dtype == torch.int64
                assert int(x_masked.min()) >= 0 and int(x_masked.max()) < p
                for i, key in enumerate(inputs):
                    seen_by_input[key].append(x_masked[4 * i:4 * i + 4].numpy().copy())
                lin.unmask(ticket, lin.host_step(x_masked))
        assert rec.rows_recorded == total == 30 * 4 * 16
        assert rec.unique_rows == total and rec.duplicates == []
        assert sum(rec.rows_per_layer.values()) == total
    for key, chunks in seen_by_input.items():
        vals = np.concatenate([c.ravel() for c in chunks])
        assert _uniform_pvalue(vals, p) > ALPHA, key
        assert _low_bits_pvalue(vals) > ALPHA, key
    # equal inputs, different rows: the difference of masked rows is uniform too (it would be 0
    # everywhere if a mask were reused, and low-dimensional if masks were combinations of a basis)
    zeros = np.concatenate([c for c in seen_by_input["zeros"] if c.shape[1] == 64])
    diffs = (zeros[1:] - zeros[:-1]) % p
    assert _uniform_pvalue(diffs, p) > ALPHA
    # rank check: masked rows of one constant input span the full space
    assert np.linalg.matrix_rank(zeros[:80].astype(np.float64)) == 64
    # the two constant inputs give indistinguishable histograms
    h = [np.bincount((np.concatenate([c.ravel() for c in seen_by_input[k]]) * 32) // p, minlength=32)
         for k in ("zeros", "const")]
    assert stats.chi2_contingency(np.stack(h)).pvalue > ALPHA


def test_negative_controls_fail():
    """The audits above are able to fail: unmasked values are not uniform, a reused mask repeats."""
    p = choose_prime(2 * 64 * 127 * 32767)
    x_q, _ = quantize_activations(torch.full((64, 64), 2.0))
    assert _uniform_pvalue(torch.remainder(x_q, p).numpy(), p) < ALPHA

    class Reusing(PooledMaskProvider):  # a broken provider that hands the same stored mask out again
        def take(self, layer_id, rows):
            if not hasattr(self, "_stored"):
                self._stored = super().take(layer_id, rows)
            return MaskBatch(layer_id, self._stored.r.clone(), self._stored.wr.clone())

    p2, pws, qs, _ = _provider_and_layers({"a": (16, 64)})
    rec = MaskAuditRecorder()
    prov = Reusing(pws, p2, pool_rows=0, recorder=rec)
    lin = ShieldedLinear("a", pws["a"], qs["a"].scale, prov)
    outs = []
    for _ in range(3):
        xm, t = lin.mask(torch.zeros(2, 64))
        outs.append(xm)
        lin.discard(t)
    prov.recorder.record("a", torch.cat(outs))  # what an auditor of the traffic would fingerprint
    assert rec.duplicates  # repeated rows are reported
    diffs = (outs[1] - outs[0]) % p2
    assert int(diffs.abs().sum()) == 0  # and equal inputs give equal masked rows: obvious to the host


def test_pool_fills_in_background_and_counts():
    p, pws, _, _ = _provider_and_layers({"a": (32, 48), "b": (48, 32)})
    with PooledMaskProvider(pws, p, pool_rows=40, chunk_rows=16) as prov:
        assert prov.wait_filled(20.0)
        assert prov.pooled("a") == 40 and prov.pooled("b") == 40
        s = prov.stats()
        assert s["rows_generated"] >= 80 and s["pool_hits"] == 0 and s["pool_misses"] == 0
        assert s["precompute_seconds"] > 0 and s["seconds_per_row_precompute"] > 0
        prov.take("a", 10).destroy()
        s = prov.stats()
        assert s["pool_hits"] == 10 and s["pool_misses"] == 0
        assert prov.wait_filled(20.0)  # refilled ahead of demand
        assert prov.stats()["rows_generated"] >= 90


def test_on_demand_when_empty_and_pool_copies_overwritten():
    p, pws, _, _ = _provider_and_layers({"a": (32, 48)})
    rec = MaskAuditRecorder()
    prov = PooledMaskProvider(pws, p, pool_rows=20, chunk_rows=8, recorder=rec, start=False)
    prov.prefill()
    assert prov.pooled("a") == 20
    chunks = list(prov._layers["a"].chunks)  # keep references to the pool's own buffers
    batch = prov.take("a", 30)
    assert batch.rows == 30
    s = prov.stats()
    assert (s["pool_hits"], s["pool_misses"]) == (20, 10) and s["seconds_per_row_on_demand"] > 0
    assert prov.pooled("a") == 0
    for c in chunks:  # handed-out rows no longer exist in the pool
        assert int(c.r.abs().sum()) == 0 and int(c.wr.abs().sum()) == 0
    assert torch.equal(batch.wr, field_matmul(batch.r, pws["a"].w_q, p))
    more = prov.take("a", 5)  # empty pool: on demand, fresh rows
    assert prov.stats()["pool_misses"] == 15
    assert rec.duplicates == [] and rec.rows_recorded == 35
    assert not any(torch.equal(row, old) for row in more.r for old in batch.r)
    with PooledMaskProvider(pws, p, pool_rows=0) as only_on_demand:
        only_on_demand.take("a", 3)
        assert only_on_demand.stats()["pool_misses"] == 3 and only_on_demand._thread is None
    with pytest.raises(KeyError):
        prov.take("zzz", 1)
    with pytest.raises(ValueError):
        prov.take("a", -1)
    prov.close()


def test_concurrent_takers_never_share_a_row():
    p, pws, _, _ = _provider_and_layers({"a": (16, 24), "b": (24, 16)})
    rec = MaskAuditRecorder()
    requested = []
    lock = threading.Lock()
    errors = []
    with PooledMaskProvider(pws, p, pool_rows=24, chunk_rows=5, recorder=rec) as prov:
        def worker(seed):
            rng = np.random.default_rng(seed)
            try:
                for _ in range(60):
                    layer = "a" if rng.random() < 0.5 else "b"
                    rows = int(rng.integers(0, 9))
                    batch = prov.take(layer, rows)
                    assert batch.rows == rows
                    with lock:
                        requested.append(rows)
                    batch.destroy()
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        s = prov.stats()
    total = sum(requested)
    assert rec.rows_recorded == total and rec.unique_rows == total and rec.duplicates == []
    assert s["pool_hits"] + s["pool_misses"] == total
    assert s["pool_hits"] > 0


# ---------------------------------------------------------------------------------------------
# sized for load: settings, refill policy, demand above the refill rate, stats
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def env_settings(monkeypatch):
    """apply(**env) sets SLIP_* variables and re-reads the settings; undone (and re-read) after."""
    def apply(**env):
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        return settings(refresh=True)

    yield apply
    monkeypatch.undo()
    settings(refresh=True)


def test_pool_capacity_from_settings(env_settings):
    assert Settings.from_env({}).mask_pool_rows_per_layer() == 32 * 4  # the defaults
    cfg = Settings.from_env({"SLIP_MASK_POOL_CONCURRENT_ROWS": "7", "SLIP_MASK_POOL_STEPS": "3"})
    assert cfg.mask_pool_rows_per_layer() == 21
    cfg = Settings.from_env({"SLIP_MASK_POOL_CONCURRENT_ROWS": "7", "SLIP_MASK_POOL_ROWS": "5"})
    assert cfg.mask_pool_rows_per_layer() == 5  # the explicit row count still wins
    with pytest.raises(ValueError):
        Settings.from_env({"SLIP_MASK_POOL_ROWS": "-2"}).mask_pool_rows_per_layer()

    shapes = {"a": (24, 40), "b": (40, 16)}
    p, pws, _, _ = _provider_and_layers(shapes)
    env_settings(SLIP_MASK_POOL_CONCURRENT_ROWS=6, SLIP_MASK_POOL_STEPS=3, SLIP_MASK_PRECOMPUTE_CHUNK=4,
                 SLIP_MASK_PRECOMPUTE_BACKEND="naive_int8", SLIP_MASK_PRECOMPUTE_NICE=0)
    with PooledMaskProvider(pws, p) as prov:
        assert prov.pool_rows == 18 and prov.chunk_rows == 4 and prov.backend == "naive_int8"
        assert prov.low_water() == 18 - 4
        assert prov.wait_filled(30.0)
        assert prov.pooled("a") == prov.pooled("b") == 18
        s = prov.stats()
        assert s["pool_rows_per_layer"] == 18 and s["pool_capacity_rows"] == 36 and s["pooled_rows"] == 36
        assert s["pool_memory_bytes"] == 18 * 8 * ((24 + 40) + (40 + 16))
        assert s["rows_precomputed"] == 36 and s["precompute_batches"] >= 36 // 4
        batch = prov.take("a", 5)
        assert torch.equal(batch.wr, field_matmul_reference(batch.r, pws["a"].w_q, p))
    env_settings(SLIP_MASK_POOL_ROWS=0)
    with PooledMaskProvider(pws, p) as prov:
        assert prov.pool_rows == 0 and prov._thread is None and prov.low_water() == 0
    env_settings(SLIP_MASK_POOL_ROWS=-1, SLIP_MASK_PRECOMPUTE_BACKEND="no-such-backend")
    with pytest.raises(ValueError):
        PooledMaskProvider(pws, p, start=False)
    backend, why = select_precompute_backend(pws, p, "auto")
    assert backend in available_backends("cpu") and backend != "reference" and why.startswith("auto")


def test_refill_policy_low_water_and_idle_top_up():
    """The filler's decisions, driven with explicit times (no waiting): nothing while a recently
    drawn pool is above the low-water mark, a full batch once it falls to the mark, a top-up of
    whatever is free once the pool has been idle; the emptiest pool first."""
    p, pws, _, _ = _provider_and_layers({"a": (16, 24), "b": (24, 16)})
    with PooledMaskProvider(pws, p, pool_rows=20, chunk_rows=6, start=False) as prov:
        assert prov.low_water() == 20 - 6
        now = 1e6
        assert prov._next_refill(now)[0] is not None  # empty pools are below the mark
        prov.prefill()
        assert prov.pooled("a") == prov.pooled("b") == 20
        assert prov._next_refill(now)[0] is None  # all full
        prov.take("a", 3).destroy()  # 17 > low water 14
        t = prov._layers["a"].last_take
        pool, rows, wait = prov._next_refill(t + 0.01)
        assert pool is None and 0 < wait <= masks_mod._TOPUP_IDLE_S  # it sleeps until the idle top-up
        pool, rows, _ = prov._next_refill(t + masks_mod._TOPUP_IDLE_S + 0.01)
        assert pool is prov._layers["a"] and rows == 6
        assert prov._refill_once(pool, rows) and prov.pooled("a") == 20  # capped by the free space (3)
        prov.take("a", 9).destroy()  # 11 <= 14: due at once, recently drawn or not
        prov.take("b", 7).destroy()  # 13 <= 14
        t = prov._layers["b"].last_take
        pool, rows, _ = prov._next_refill(t)
        assert pool is prov._layers["a"] and rows == 6  # the emptier one first
        assert prov._refill_once(pool, rows) and prov.pooled("a") == 17
        assert prov._next_refill(t)[0] is prov._layers["b"]
        s = prov.stats()
        assert s["pool_hits"] == 19 and s["pool_misses"] == 0 and s["rows_taken"] == 19
        # within the window: empty at the start, full after prefill, now 17
        assert (s["layers"]["a"]["min_level"], s["layers"]["a"]["level"], s["layers"]["a"]["max_level"]) == (0, 17, 20)
        assert (s["pool_level_min"], s["pool_level_max"]) == (13, 17)


def test_demand_above_refill_rate_unique_exact_and_counted():
    """Small pools and many takes from several threads, larger than the pools: every row handed
    out is unique, every image W_q r is exact (checked against big integers on kept copies), and
    the counters add up."""
    g = torch.Generator().manual_seed(3)
    w16 = torch.randint(-20000, 20000, (12, 8), generator=g, dtype=torch.int16)  # two int8 planes
    qs = {"a": torch.randint(-127, 128, (16, 24), generator=g, dtype=torch.int8),
          "b": torch.randint(-127, 128, (24, 16), generator=g, dtype=torch.int8), "c": w16}
    p = select_prime(list(qs.values()), act_bits=8)
    pws = {k: PublicWeight(w, p) for k, w in qs.items()}
    rec = MaskAuditRecorder()
    kept, errors, requested = [], [], []
    lock = threading.Lock()
    with PooledMaskProvider(pws, p, pool_rows=6, chunk_rows=4, recorder=rec, backend="f64", nice=0) as prov:
        assert prov.wait_filled(30.0)

        def worker(seed):
            rng = np.random.default_rng(seed)
            try:
                for i in range(50):
                    layer = "abc"[int(rng.integers(0, 3))]
                    rows = int(rng.integers(0, 13))  # up to twice the pool: part of it on demand
                    batch = prov.take(layer, rows)
                    assert batch.r.shape == (rows, pws[layer].n) and batch.wr.shape == (rows, pws[layer].m)
                    with lock:
                        requested.append(rows)
                        if i % 5 == 0 and rows:
                            kept.append((layer, batch.r.clone(), batch.wr.clone()))
                    batch.destroy()
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        s = prov.stats()
    total = sum(requested)
    assert max(requested) > 6  # at least one take larger than its whole pool
    assert rec.rows_recorded == total and rec.unique_rows == total and rec.duplicates == []
    assert s["pool_hits"] + s["pool_misses"] == s["rows_taken"] == total
    assert s["pool_hits"] > 0 and s["pool_misses"] > 0 and s["on_demand_seconds"] > 0
    assert s["rows_generated"] == s["rows_precomputed"] + s["pool_misses"]
    assert s["pooled_rows"] == sum(v["level"] for v in s["layers"].values()) <= 3 * 6
    assert s["pool_level_min"] <= s["pool_level_max"] <= 6
    for v in s["layers"].values():
        assert 0 <= v["min_level"] <= v["level"] <= v["max_level"] <= v["capacity"] == 6
    # the recent window holds at most everything since the start (timing-free relations only)
    w = s["window_s"]
    assert w > 0
    assert 0 <= s["demand_rows_per_s"] * w <= total + 1e-6
    assert 0 <= s["refill_rows_per_s"] * w <= s["rows_precomputed"] + 1e-6
    assert 0 <= s["on_demand_rows_per_s"] * w <= s["pool_misses"] + 1e-6
    assert 0 <= s["on_demand_seconds_per_s"] * w <= s["on_demand_seconds"] + 1e-6
    assert s["background_error"] is None and s["backend"] == "f64"
    assert kept
    for layer, r, wr in kept:
        assert int(r.min()) >= 0 and int(r.max()) < p
        assert torch.equal(wr, field_matmul_reference(r, qs[layer], p)), layer


def test_large_on_demand_take_is_made_in_pieces():
    p, pws, _, _ = _provider_and_layers({"a": (20, 12)})
    rec = MaskAuditRecorder()
    with PooledMaskProvider(pws, p, pool_rows=0, recorder=rec) as prov:
        prov._layers["a"].max_gemm_rows = 3  # as if a row's temporaries were large
        batch = prov.take("a", 11)
        assert torch.equal(batch.wr, field_matmul_reference(batch.r, pws["a"].w_q, p))
        assert rec.unique_rows == 11 and prov.stats()["pool_misses"] == 11


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux only")
def test_filler_runs_at_lower_priority():
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if base > 19 - 3:
        pytest.skip("already at the lowest priority")
    p, pws, _, _ = _provider_and_layers({"a": (16, 24)})
    with PooledMaskProvider(pws, p, pool_rows=8, chunk_rows=8, nice=3) as prov:
        assert prov.wait_filled(30.0)  # the filler lowered its priority before its first batch
        assert os.getpriority(os.PRIO_PROCESS, prov._thread.native_id) == base + 3
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the rest is unchanged
        assert prov.stats()["filler_nice"] == 3
