#!/usr/bin/env python
"""Cost of the secure service's work in protocol ``shielded`` (trusted side), in three parts.

``layers``: for Llama-7B/8B-like layer shapes (m x n) it times, on this CPU, with medians of
repetitions:
  * csprng   : drawing one mask row r (n elements of Z_p) from the OS CSPRNG;
  * precompute: one pooled pair (r, W_q r mod p) per row, made in chunks as the background thread
              does (the O(m*n) price of information-theoretic hiding);
  * mask     : the online step 1 for T token rows (quantize, take pooled masks, add mod p);
  * host     : the host's field GEMM W_q x~ mod p for the same T (for scale; untrusted side);
  * freivalds: the integrity check of T rows (t secret vectors, exact limb arithmetic);
  * unmask   : the online step 3 for T rows (check + subtract W_q r + lift + dequantize),
and checks that the unmasked result equals the fixed-point reference before timing.

``low_rank``: the secret term W_C x at the Llama-3-8B gate_up shape (two fused parts of
14336 x 4096, rank 512 each: the default rank fraction 1/8), T rows, three ways in one run:
  * old      : the former ``low_rank_term``: both factors (the dense block-diagonal left [m, K] and
               right [K, n]) converted to float64 on every call;
  * old-f64  : the same product with the float64 factors converted once (what caching alone gives);
  * new      : ``quantize.LowRankFactors`` (float32, cached at construction, per-part left blocks:
               one [T, n] x [n, K] product, then one small product per part).

``model``: one decode step of a whole small Llama (hidden 768, 8 layers, 12 heads, 4 KV heads,
rank 1/8) through ``ShieldedExecutor.step`` in shielded mode, for S = 1 and 32 sequences with a
context of ``--context`` cached tokens each (the KV cache is filled with random values: the timing
does not depend on them), with an in-process host callback that runs the real field GEMM
(``--host-backend``, default ``f64``: on a CPU without fast int8 GEMMs the default ``cpu_int8``
backend is far slower).  Masks are
made on demand (pool of 0 rows), so the table splits the step into: the host's GEMMs, the mask
precompute W_q r (which a background pool would do ahead of demand), the attention, and the rest
of the service's online work (quantize, mask, Freivalds, unmask, W_C x, norms, RoPE, glue).
Run it on an older checkout to get "before" numbers for the same table (it only uses the
executor's public API).

    python benchmarks/bench_shielded_steps.py [--parts layers low_rank model] [--threads 1]
        [--tokens 1 16 256] [--quick] [--decode-seqs 1 32] [--context 128] [--reps 3] [--host-backend f64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from secure_service.masks import PooledMaskProvider, csprng_field_elements
from secure_service.shielded_linear import ShieldedLinear
from slip_vllm.core.quantize import PublicWeight, select_prime, shielded_linear_reference

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def _median(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------


def bench_layers(args) -> None:
    reps = 3 if args.quick else 5
    shapes = SHAPES[:1] if args.quick else SHAPES
    print(f"== layers: per-layer protocol steps; times are medians of {reps}")
    print(f"{'m x n':>13} {'T':>4} {'mask ms':>9} {'host ms':>9} {'freiv ms':>9} {'unmask ms':>10} "
          f"{'unmask us/row':>14}")
    for m, n in shapes:
        g = torch.Generator().manual_seed(0)
        w_q = torch.randint(-127, 128, (m, n), generator=g, dtype=torch.int8)
        p = select_prime([w_q])
        pw = PublicWeight(w_q, p)
        scale = torch.rand(m, generator=g) + 0.5
        t_rng = _median(lambda: csprng_field_elements((args.chunk, n), p), reps) / args.chunk
        prov = PooledMaskProvider({"L": pw}, p, pool_rows=0, chunk_rows=args.chunk, start=False)
        t_pre = _median(lambda: prov._make(pw, args.chunk), reps) / args.chunk
        print(f"{m:>6} x {n:<5} p={p} ({p.bit_length()} bits): csprng {t_rng * 1e6:.0f} us/row, "
              f"precompute (r, W_q r) {t_pre * 1e3:.3f} ms/row in chunks of {args.chunk}, "
              f"pool memory {8 * (m + n) / 1024:.0f} KiB/row")
        prov.pool_rows = max(args.tokens) * (reps + 2) * 2
        prov.prefill()
        lin = ShieldedLinear("L", pw, scale, prov)
        print(f"{'':>13} Freivalds: t={lin.key.t} vectors, soundness 2^-{lin.key.soundness_bits:.0f} per wrong row")
        for T in args.tokens:
            x = torch.randn(T, n, generator=g)
            xm, tk = lin.mask(x)
            ym = lin.host_step(xm)
            assert torch.equal(lin.unmask(tk, ym), shielded_linear_reference(x, w_q, scale, p)) or T > 64
            t_mask = _median(lambda: lin.discard(lin.mask(x)[1]), reps)
            t_host = _median(lambda: lin.host_step(xm), reps)
            t_frei = _median(lambda: lin.key.check(xm, ym), reps)

            def one_unmask():
                xm2, tk2 = lin.mask(x)
                ym2 = lin.host_step(xm2)
                t0 = time.perf_counter()
                lin.unmask(tk2, ym2)
                return time.perf_counter() - t0

            t_unm = statistics.median(one_unmask() for _ in range(reps))
            print(f"{m:>6} x {n:<5} {T:>4} {t_mask * 1e3:>9.2f} {t_host * 1e3:>9.2f} {t_frei * 1e3:>9.2f} "
                  f"{t_unm * 1e3:>10.2f} {t_unm / T * 1e6:>14.1f}")
        prov.close()


# ---------------------------------------------------------------------------------------------
# low_rank
# ---------------------------------------------------------------------------------------------


def _low_rank_term_old(x, left, right):
    """The former ``quantize.low_rank_term``: both factors to float64 on every call."""
    x64 = x.detach().to(torch.float64)
    return (x64 @ right.to(torch.float64).t()) @ left.to(torch.float64).t()


def bench_low_rank(args) -> None:
    try:
        from slip_vllm.core.quantize import LowRankFactors
    except ImportError:  # an older checkout
        LowRankFactors = None
    parts, n, k = (14336, 14336), 4096, 512
    m, big_k = sum(parts), k * len(parts)
    g = torch.Generator().manual_seed(0)
    lefts = [torch.randn(mi, k, generator=g) for mi in parts]
    right = torch.randn(big_k, n, generator=g) / n ** 0.5
    dense = torch.zeros(m, big_k)
    for i, (mi, left) in enumerate(zip(parts, lefts)):
        dense[i * mi:(i + 1) * mi, i * k:(i + 1) * k] = left
    dense64, right64 = dense.double(), right.double()
    new = LowRankFactors.block_diagonal(dense, right, parts) if LowRankFactors is not None else None
    reps = args.reps + 2
    print(f"== low_rank: W_C x at the Llama-3-8B gate_up shape, m={m} ({' + '.join(map(str, parts))}), "
          f"n={n}, K={big_k}; medians of {reps}")
    print(f"{'T':>4} {'old ms':>9} {'old-f64 ms':>11} {'new ms':>9} {'old/new':>8} {'max |new-old| / max |old|':>26}")
    for T in args.low_rank_tokens:
        x = torch.randn(T, n, generator=g)
        t_old = _median(lambda: _low_rank_term_old(x, dense, right), reps)
        t_f64 = _median(lambda: (x.double() @ right64.t()) @ dense64.t(), reps)
        if new is None:
            print(f"{T:>4} {t_old * 1e3:>9.2f} {t_f64 * 1e3:>11.2f} {'n/a':>9}")
            continue
        t_new = _median(lambda: new.apply(x), reps)
        ref = _low_rank_term_old(x, dense, right)
        err = float((new.apply(x).double() - ref).abs().max() / ref.abs().max())
        print(f"{T:>4} {t_old * 1e3:>9.2f} {t_f64 * 1e3:>11.2f} {t_new * 1e3:>9.2f} {t_old / t_new:>8.1f} "
              f"{err:>26.2e}")


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


class _Timer:
    def __init__(self):
        self.s = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.s += time.perf_counter() - t0
        return timed


def bench_model(args) -> None:
    from secure_service.shielded_executor import ShieldedExecutor
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.core.field import FieldWeight, field_matmul
    from slip_vllm.protect.tiny_models import make_tiny_model

    hidden, layers, heads, kv_heads = 768, 8, 12, 4
    block_size = 16
    max_seqs, context = max(args.decode_seqs), args.context
    per_seq = -(-(context + args.reps + 2) // block_size)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model("llama", Path(tmp) / "m", hidden=hidden, layers=layers, heads=heads,
                                    kv_heads=kv_heads, seed=0)
        ex = ShieldedExecutor.from_checkpoint(model_dir, RankPolicy(fraction=0.125), seed=0,
                                              num_blocks=max_seqs * per_seq, block_size=block_size,
                                              mode="shielded", pool_rows=0)
    weights = {k: FieldWeight(w, ex.p) for k, w in ex.public_weights().items()}
    ex.cache.k.normal_()
    ex.cache.v.normal_()
    host_t, mask_t, attn_t = _Timer(), _Timer(), _Timer()

    @host_t.wrap
    def host(key, x_masked):
        return field_matmul(x_masked, weights[key], ex.p, backend=args.host_backend)

    ex.masks.take = mask_t.wrap(ex.masks.take)  # on-demand precompute of (r, W_q r) happens in take
    ex._attention = attn_t.wrap(ex._attention)
    print(f"== model: one decode step, llama hidden {hidden}, {layers} layers, {heads} heads / {kv_heads} KV heads, "
          f"intermediate {2 * hidden}, vocab {ex.vocab}, rank 1/8, p={ex.p}; context {context} tokens per "
          f"sequence; medians of {args.reps} steps (ms)")
    print(f"{'seqs':>5} {'step':>9} {'host GEMM':>10} {'W_q r':>9} {'service':>9} {'attention':>10} "
          f"{'other':>9}   service = step - host GEMM - W_q r precompute")
    for S in args.decode_seqs:
        tables = torch.arange(S * per_seq).reshape(S, per_seq)
        rows = []
        for t in range(args.reps + 1):  # the first step warms up
            pos = torch.full((S,), context + t, dtype=torch.int64)
            slots = tables[:, (context + t) // block_size] * block_size + (context + t) % block_size
            host_t.s = mask_t.s = attn_t.s = 0.0
            t0 = time.perf_counter()
            ex.step(torch.randint(2, ex.vocab, (S,)), pos, slots, torch.arange(S + 1), pos + 1, tables,
                    host_gemm=host)
            total = time.perf_counter() - t0
            rows.append((total, host_t.s, mask_t.s, attn_t.s))
        med = [statistics.median(r[i] for r in rows[1:]) * 1e3 for i in range(4)]
        service = med[0] - med[1] - med[2]
        print(f"{S:>5} {med[0]:>9.1f} {med[1]:>10.1f} {med[2]:>9.1f} {service:>9.1f} {med[3]:>10.1f} "
              f"{service - med[3]:>9.1f}")
    ex.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", choices=["layers", "low_rank", "model"],
                    default=["layers", "low_rank", "model"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256], help="layers: token rows T")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="layers: only the 4096 x 4096 layer, fewer repetitions")
    ap.add_argument("--low-rank-tokens", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--decode-seqs", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--host-backend", default="f64",
                    help="model: the host's field GEMM backend (f64 is the fastest exact one on this CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    with torch.no_grad():
        for part in args.parts:
            {"layers": bench_layers, "low_rank": bench_low_rank, "model": bench_model}[part](args)


if __name__ == "__main__":
    main()
