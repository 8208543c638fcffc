#!/usr/bin/env python
"""The lock of protocol ``shielded`` (``slip_vllm.core.lock``): its service-side cost per row, and
what it does to the model's outputs.

Prints, with the command line, the machine and the load average at the top:
  1. cost (always): per GEMM shape and lock, the service's extra work per token row
     (``lock_input`` on x [T, n] + ``unlock_output`` on y' [T, m], float64 as in the protocol),
     median of --reps interleaved runs at each batch size T, beside the price the protocol already
     pays for the same row: one mask pair (r, W_q r mod p) made by the pool's filler
     (``masks.csprng_field_elements`` + ``PublicWeight.matmul`` with the backend
     ``select_precompute_backend(..., "auto")`` picks here, at its default batch of 128 rows), measured
     in the same loop.  "ratio" = lock / mask pair.  The model's flop count is 2 b (m + n) per row
     for ``block:b`` (two gathers per side besides) against the pair's m n multiply-adds;
  2. quality (--quality): the trained reference model (``evaluation.reference_model``, TINY unless
     --full) protected at the default rank 1/8 with a fixed seed and each lock, run by the service's
     executor in ``fixed_point`` mode (the bit-exact specification of what the masked protocol
     serves), teacher-forced over --windows validation windows of --seq-len tokens: next-token
     argmax agreement with the original float model (transformers) and perplexity against the
     original's, plus whether each lock's logits are bit-identical to the unlocked executor's.

    python benchmarks/bench_lock.py [--shapes 6144x4096 4096x4096 28672x4096 4096x14336]
                                    [--locks perm block:8 block:16 block:32 block:64] [--rows 1 32]
                                    [--threads 1] [--reps 5] [--quality] [--weight-bits 8|16]
                                    [--windows 24] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from secure_service.masks import csprng_field_elements, select_precompute_backend  # noqa: E402
from slip_vllm.core.lock import make_lock, parse_lock  # noqa: E402
from slip_vllm.core.quantize import PublicWeight, select_prime  # noqa: E402

MASK_BATCH = 128  # SLIP_MASK_PRECOMPUTE_CHUNK's default: the filler's batch


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def bench_cost(shapes, locks, rows_list, reps: int) -> None:
    print(f"\n## 1. Service-side cost per token row: lock (lock_input + unlock_output) vs one mask pair "
          f"(CSPRNG + W_q r with the backend the service picks for each shape, batch {MASK_BATCH}); medians of {reps}, "
          "us per row\n")
    print("| m x n | lock | flops per row (lock / pair) | " + " | ".join(f"T={t} lock" for t in rows_list)
          + f" | mask pair (T={MASK_BATCH}) | " + " | ".join(f"ratio T={t}" for t in rows_list) + " |")
    print("|---|---|---|" + "---|" * len(rows_list) + "---|" + "---|" * len(rows_list))
    g = torch.Generator().manual_seed(0)
    for m, n in shapes:
        w_q = torch.randint(-127, 128, (m, n), generator=g, dtype=torch.int8)
        p = select_prime([w_q])
        pw = PublicWeight(w_q, p)
        backend, _ = select_precompute_backend({"L": pw}, p, "auto")
        built = {spec: make_lock(m, n, parse_lock(spec).kind, parse_lock(spec).block, os.urandom(32)) for spec in locks}
        xs = {t: torch.randn(t, n, generator=g) for t in rows_list}
        ys = {t: torch.randn(t, m, generator=g, dtype=torch.float64) for t in rows_list}
        times = {(spec, t): [] for spec in locks for t in rows_list}
        pair = []
        for _ in range(reps):  # interleaved: every case sees the same load
            for spec, lock in built.items():
                for t in rows_list:
                    t0 = time.perf_counter()
                    lock.lock_input(xs[t])
                    lock.unlock_output(ys[t])
                    times[(spec, t)].append((time.perf_counter() - t0) / t)
            t0 = time.perf_counter()
            r = csprng_field_elements((MASK_BATCH, n), p)
            pw.matmul(r, backend=backend)
            pair.append((time.perf_counter() - t0) / MASK_BATCH)
        pair_us = statistics.median(pair) * 1e6
        for spec in locks:
            b = parse_lock(spec).block
            flops = 2 * b * (m + n) if parse_lock(spec).kind == "block" else 0
            med = [statistics.median(times[(spec, t)]) * 1e6 for t in rows_list]
            print(f"| {m}x{n} | {spec} | {flops:,} / {m * n:,} ({flops / (m * n):.1%}) | "
                  + " | ".join(f"{v:.1f}" for v in med) + f" | {pair_us:.0f} ({backend}) | "
                  + " | ".join(f"{v / pair_us:.1%}" for v in med) + " |")


def bench_quality(locks, windows: int, seq_len: int, full: bool, weight_bits: int = 8, seed: int = 11) -> None:
    import transformers as tf

    from secure_service.shielded_executor import ShieldedExecutor
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.core.lock import seed_lock_key
    from slip_vllm.evaluation import reference_model as rm

    cfg = rm.FULL if full else rm.TINY
    model_dir = rm.get_reference_model(config=cfg, progress=False)
    ids = rm.load_reference_data(model_dir).val_ids
    step = (len(ids) - seq_len - 1) // windows
    wins = [ids[i * step:i * step + seq_len + 1] for i in range(windows)]
    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [hf(w[None, :-1]).logits[0] for w in wins]

    def run(ex):
        out = []
        for w in wins:
            n = seq_len
            ex.cache.reset()
            out.append(ex.step(w[:-1], torch.arange(n), torch.arange(n), torch.tensor([0, n]), torch.tensor([n]),
                               torch.arange(-(-n // ex.cache.block_size))[None], logits_indices=torch.arange(n)))
        return out

    def score(rows):
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(rows, ref)) / (windows * seq_len)
        nll = sum(float(torch.nn.functional.cross_entropy(a, w[1:], reduction="sum")) for a, w in zip(rows, wins))
        return agree, math.exp(nll / (windows * seq_len))

    _, ppl_orig = score(ref)
    print(f"\n## 2. Quality: reference model {'FULL' if full else 'TINY'} ({model_dir.name}), rank 1/8, seed {seed}, int{weight_bits} weights, "
          f"fixed-point executor (= what the masked protocol serves, bit for bit), {windows} windows x {seq_len} "
          f"tokens teacher-forced; original perplexity {ppl_orig:.3f}\n")
    print("| lock | argmax agreement with the original | perplexity | ratio to the original | "
          "logits bit-identical to unlocked |")
    print("|---|---|---|---|---|")
    kw = dict(seed=seed, num_blocks=-(-seq_len // 16), block_size=16, mode="fixed_point", max_model_len=seq_len,
              weight_bits=weight_bits)
    policy = RankPolicy(fraction=0.125)
    base = run(ShieldedExecutor.from_checkpoint(model_dir, policy, **kw))
    for spec in ["none"] + [s for s in locks if s != "none"]:
        rows = base if spec == "none" else run(ShieldedExecutor.from_checkpoint(
            model_dir, policy, lock=spec, lock_key=seed_lock_key(seed), **kw))
        agree, ppl = score(rows)
        same = all(torch.equal(a, b) for a, b in zip(rows, base))
        print(f"| {spec} | {agree:.4f} | {ppl:.3f} | {ppl / ppl_orig:.4f} | {'yes' if same else 'no'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["6144x4096", "4096x4096", "28672x4096", "4096x14336"],
                    help="m x n of the GEMMs (default: Llama-3-8B's qkv, o, gate_up, down)")
    ap.add_argument("--locks", nargs="+", default=["perm", "block:8", "block:16", "block:32", "block:64"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the service runs one)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quality", action="store_true", help="also run section 2 (the reference model)")
    ap.add_argument("--full", action="store_true", help="section 2 on the FULL reference model instead of TINY")
    ap.add_argument("--weight-bits", type=int, choices=[8, 16], default=8, help="public weights of section 2")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("command: python benchmarks/bench_lock.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(f"machine: {_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch thread(s); "
          f"load average {_load()}")
    for spec in args.locks:
        parse_lock(spec)
    if not args.skip_cost:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        bench_cost(shapes, args.locks, sorted(args.rows), args.reps)
    if args.quality:
        bench_quality(args.locks, args.windows, args.seq_len, args.full, args.weight_bits)
    print(f"\nload average at the end: {_load()}")


if __name__ == "__main__":
    main()
