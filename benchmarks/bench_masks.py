#!/usr/bin/env python
"""Mask supply of protocol ``shielded`` (trusted side): how fast (r, W_q r mod p) pairs are made.

Prints, with the command line and the machine at the top:
  1. csprng: ``csprng_field_elements`` per element, beside its previous implementation and
     ``os.urandom`` of the same bytes alone (the kernel's share) for each layer's n;
  2. precompute rows/s per field GEMM backend (``field.available_backends("cpu")`` without the
     big-integer reference) and batch size, at each layer shape: the GEMM W_q r alone and the whole
     pair (CSPRNG + GEMM, what the pool's filler does per batch); all backends are first checked to
     return identical images, plus big-integer spot checks.  A case whose call would take longer
     than --max-call-s (predicted from the previous batch size) is skipped ("-");
  3. the chosen configuration: the backend with the best pair rate (multiply-adds per second at its
     best batch size, summed over the shapes), and the smallest batch size within 10 % of its best
     rate at every shape (what SLIP_MASK_PRECOMPUTE_CHUNK's default comes from), beside what
     ``select_precompute_backend("auto")`` picks on this machine at start;
  4. (--pool-seconds > 0) a ``PooledMaskProvider`` over the shapes as layers, its filler running,
     under paced demand (a fraction of the measured refill rate) and unpaced demand: the
     provider's own stats (demand and refill rows/s, hits, misses, on-demand time, levels).

    python benchmarks/bench_masks.py [--shapes 3072x768 768x3072 4096x4096] [--rows 1 32 128 512]
                                     [--threads N] [--reps 3] [--max-call-s 3] [--pool-seconds 4]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from secure_service.masks import (  # noqa: E402
    PooledMaskProvider,
    csprng_field_elements,
    select_precompute_backend,
)
from slip_vllm.core.field import available_backends, reference_entries  # noqa: E402
from slip_vllm.core.quantize import PublicWeight, select_prime  # noqa: E402

NEAR_BEST = 0.9  # a batch size "amortises" when its rate is within 10 % of the best measured


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    want = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
                    return " ".join(w for w in want if w in have) or "none of avx2/avx512/vnni/amx"
    except OSError:
        pass
    return "?"


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _csprng_before(shape, p: int) -> torch.Tensor:
    """The implementation of ``csprng_field_elements`` before commit 6a04fb4 (8 bytes per
    candidate, accepted ones compacted), kept here only to time it against the current one."""
    need = int(np.prod(shape, dtype=np.int64))
    out = np.empty(need, dtype=np.int64)
    bits = (p - 1).bit_length()
    keep = np.uint64((1 << bits) - 1)
    accept = p / float(1 << bits)
    filled = 0
    while filled < need:
        left = need - filled
        draw = int(left / accept * 1.05) + 16
        cand = np.frombuffer(os.urandom(8 * draw), dtype="<u8") & keep
        cand = cand[cand < np.uint64(p)]
        k = min(left, cand.shape[0])
        out[filled:filled + k] = cand[:k].astype(np.int64)
        filled += k
    return torch.from_numpy(out).reshape(shape)


def bench_csprng(shapes, p: int, reps: int) -> None:
    bits = (p - 1).bit_length()
    nbytes = (bits + 7) // 8
    reps = max(reps, 15)
    print(f"\n## 1. CSPRNG: csprng_field_elements, 128 rows, p of {bits} bits ({nbytes} bytes per candidate), "
          f"medians of {reps} interleaved\n")
    print("| n | ns/element | before (8 B per candidate) ns/element | speed-up | os.urandom alone ns/element | "
          "MB/s of random bytes | us per mask row |")
    print("|---|---|---|---|---|---|---|")
    for n in sorted({n for _, n in shapes}):
        count = 128 * n
        fns = {"now": lambda: csprng_field_elements((128, n), p), "before": lambda: _csprng_before((128, n), p),
               "os": lambda: os.urandom(count * nbytes)}
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        t, t_old, t_os = (statistics.median(times[k]) for k in ("now", "before", "os"))
        print(f"| {n} | {t / count * 1e9:.1f} | {t_old / count * 1e9:.1f} | {t_old / t:.2f}x | "
              f"{t_os / count * 1e9:.1f} | {count * nbytes / t_os / 1e6:.0f} | {t / 128 * 1e6:.0f} |")


def bench_precompute(shapes, rows_list, backends, reps: int, max_call_s: float, seed: int = 0):
    """{(shape, backend, rows): (gemm rows/s, pair rows/s)}; None where skipped."""
    print("\n## 2. Precompute rows/s (median of %d; pair = CSPRNG + GEMM, what one filler batch costs)\n" % reps)
    print("| m x n | backend | " + " | ".join(f"T={t} GEMM | T={t} pair" for t in rows_list) + " |")
    print("|---|---|" + "---|---|" * len(rows_list))
    results = {}
    g = torch.Generator().manual_seed(seed)
    for m, n in shapes:
        w_q = torch.randint(-127, 128, (m, n), generator=g, dtype=torch.int8)
        p = select_prime([w_q])
        pw = PublicWeight(w_q, p)
        r = csprng_field_elements((max(rows_list), n), p)
        # exactness first: all backends agree on 8 rows, and spot entries match big integers
        ref = None
        for b in backends:
            out = pw.matmul(r[:8], backend=b)
            if ref is None:
                ref = out
                rows_i, cols_i = [0, 3, 7, 7], [0, m // 2, 1, m - 1]
                exact = reference_entries(r[:8], w_q, p, rows_i, cols_i)
                assert [int(out[t, i]) for t, i in zip(rows_i, cols_i)] == exact, "spot check failed"
            assert torch.equal(out, ref), f"backend {b} disagrees at {m}x{n}"
        for b in backends:
            cells = []
            last = None  # (rows, seconds) of the previous batch size, for the skip prediction
            for t in rows_list:
                if last is not None and last[1] * t / last[0] > max_call_s:
                    results[((m, n), b, t)] = None
                    cells += ["-", "-"]
                    continue
                x = r[:t]
                pw.matmul(x, backend=b)  # warm-up (packed copy, kernels)
                t_gemm = _median_time(lambda: pw.matmul(x, backend=b), reps)
                t_pair = _median_time(lambda: pw.matmul(csprng_field_elements((t, n), p), backend=b), reps)
                last = (t, t_pair)
                results[((m, n), b, t)] = (t / t_gemm, t / t_pair)
                cells += [f"{t / t_gemm:.0f}", f"{t / t_pair:.0f}"]
            print(f"| {m}x{n} | {b} | " + " | ".join(cells) + " |", flush=True)
    return results


def choose(results, shapes, rows_list, backends):
    """(backend, chunk): the backend with the best pair rate at its best batch, in multiply-adds per
    second (rows/s x m x n, so that every shape weighs alike), summed over the shapes; chunk = the
    smallest batch size within NEAR_BEST of that backend's best rate at every shape where it was
    measured."""
    def rate(shape, b, t):
        v = results.get((shape, b, t))
        return None if v is None else v[1]

    def best(shape, b):
        rates = [rate(shape, b, t) for t in rows_list if rate(shape, b, t) is not None]
        return max(rates) if rates else None

    best_b = max(backends, key=lambda b: sum((best(s, b) or 0.0) * s[0] * s[1] for s in shapes))
    for t in rows_list:
        measured = [s for s in shapes if rate(s, best_b, t) is not None]
        if measured and all(rate(s, best_b, t) >= NEAR_BEST * best(s, best_b) for s in measured):
            return best_b, t
    return best_b, rows_list[-1]


def bench_pool(shapes, backend: str, chunk: int, pool_rows: int, seconds: float, step_rows: int) -> None:
    print(f"\n## 4. Pool under load: one layer per shape, {pool_rows} rows per layer, batches of {chunk}, "
          f"backend {backend}; each step takes {step_rows} rows from every layer\n")
    g = torch.Generator().manual_seed(1)
    weights = {f"{m}x{n}": torch.randint(-127, 128, (m, n), generator=g, dtype=torch.int8) for m, n in shapes}
    p = select_prime(list(weights.values()))
    pws = {k: PublicWeight(w, p) for k, w in weights.items()}
    print("| demand | seconds | steps | demand rows/s | refill rows/s | hit rate | on-demand s | "
          "on-demand share of wall time | level min..max now | lowest level seen |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    refill_rate = None
    for label in ("none (refill only)", "paced at 50 % of refill", "unpaced"):
        with PooledMaskProvider(pws, p, pool_rows=pool_rows, chunk_rows=chunk, backend=backend) as prov:
            if label.startswith("none"):
                t0 = time.monotonic()
                prov.wait_filled(timeout=max(seconds * 10, 60))
                dt = time.monotonic() - t0
                s = prov.stats()
                refill_rate = s["rows_precomputed"] / max(dt, 1e-9)
                steps = 0
            else:
                prov.wait_filled(timeout=max(seconds * 10, 60))
                interval = 0.0
                if label.startswith("paced"):
                    interval = step_rows * len(pws) / (0.5 * refill_rate)
                stop = time.monotonic() + seconds
                steps = 0
                t0 = time.monotonic()
                while time.monotonic() < stop:
                    ts = time.monotonic()
                    for lid in pws:
                        prov.take(lid, step_rows).destroy()
                    steps += 1
                    left = interval - (time.monotonic() - ts)
                    if left > 0:
                        time.sleep(left)
                dt = time.monotonic() - t0
                s = prov.stats()
            taken = s["rows_taken"]
            hit = s["pool_hits"] / taken if taken else float("nan")
            lows = min(v["min_level"] for v in s["layers"].values())
            print(f"| {label} | {dt:.1f} | {steps} | {s['demand_rows_per_s']:.0f} | {s['refill_rows_per_s']:.0f} | "
                  f"{hit:.2f} | {s['on_demand_seconds']:.2f} | {s['on_demand_seconds_per_s']:.2f} | "
                  f"{s['pool_level_min']}..{s['pool_level_max']} | {lows} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["3072x768", "768x3072", "4096x4096"], help="m x n of each layer")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128, 512], help="batch sizes (rows per GEMM)")
    ap.add_argument("--backends", nargs="+", default=None, help="default: every exact CPU backend")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-call-s", type=float, default=3.0, help="skip a case predicted to take longer per call")
    ap.add_argument("--pool-seconds", type=float, default=4.0, help="seconds per demand level of section 4 (0: skip)")
    ap.add_argument("--pool-rows", type=int, default=128, help="section 4: rows per layer")
    ap.add_argument("--step-rows", type=int, default=32, help="section 4: rows per layer per step")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    rows_list = sorted(args.rows)
    backends = args.backends or [b for b in available_backends("cpu") if b != "reference"]

    print("$ " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv]))
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}; {_cpu_name()} ({_flags()}), "
          f"{os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"load average at start {_load()}")

    p0 = select_prime([torch.full((1, max(n for _, n in shapes)), 127, dtype=torch.int8)])
    bench_csprng(shapes, p0, args.reps)
    results = bench_precompute(shapes, rows_list, backends, args.reps, args.max_call_s)
    best_b, chunk = choose(results, shapes, rows_list, backends)
    print("\n## 3. Chosen configuration\n")
    print(f"measured here: backend {best_b} (best pair multiply-adds/s over the shapes), batch {chunk} rows "
          f"(smallest batch within {100 - NEAR_BEST * 100:.0f} % of {best_b}'s best rate at every shape)")
    print(f"    SLIP_MASK_PRECOMPUTE_BACKEND={best_b} SLIP_MASK_PRECOMPUTE_CHUNK={chunk}")
    g = torch.Generator().manual_seed(2)
    probe_w = {f"{m}x{n}": PublicWeight(torch.randint(-127, 128, (m, n), generator=g, dtype=torch.int8), p0)
               for m, n in shapes}
    auto, why = select_precompute_backend(probe_w, p0, "auto")
    print(f"select_precompute_backend('auto') at start: {auto} ({why})")
    if args.pool_seconds > 0:
        bench_pool(shapes, best_b, chunk, args.pool_rows, args.pool_seconds, args.step_rows)
    print(f"\nload average at end {_load()}")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
