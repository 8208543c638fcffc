#!/usr/bin/env python
"""Cost of the secure service's per-layer steps in protocol ``shielded`` (trusted side).

For Llama-7B/8B-like layer shapes (m x n) it times, on this CPU, with medians of repetitions:
  * csprng   : drawing one mask row r (n elements of Z_p) from the OS CSPRNG;
  * precompute: one pooled pair (r, W_q r mod p) per row, made in chunks as the background thread
              does (the O(m*n) price of information-theoretic hiding);
  * mask     : the online step 1 for T token rows (quantize, take pooled masks, add mod p);
  * host     : the host's field GEMM W_q x~ mod p for the same T (for scale; untrusted side);
  * freivalds: the integrity check of T rows (t secret vectors, exact limb arithmetic);
  * unmask   : the online step 3 for T rows (check + subtract W_q r + lift + dequantize),
and checks that the unmasked result equals the fixed-point reference before timing.

    python benchmarks/bench_shielded_steps.py [--threads 1] [--tokens 1 16 256] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="only the 4096 x 4096 layer, fewer repetitions")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 5
    shapes = SHAPES[:1] if args.quick else SHAPES
    print(f"torch {torch.__version__}, {args.threads} thread(s); times are medians of {reps}")
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


if __name__ == "__main__":
    main()
