#!/usr/bin/env python
"""Benchmark of the exact mod-p field GEMM (host path of protocol ``shielded``).

For Llama-7B/8B-like weight shapes (m x n) and token counts T it times, side by side in one run on
one device, with repetitions interleaved and medians reported:
  * base   : the plain GEMM of the same shape (bf16 on CUDA, fp32 on CPU), x[T, n] @ W[m, n]^T;
  * kernel : ``field_matmul`` with the device's default backend (CUDA: the Triton kernel, one
             int8 tensor-core product per limb, W tile read once, mod p in the epilogue;
             CPU: one int8 GEMM over the stacked balanced limbs);
  * naive  : one library int8 GEMM per limb plus int64 element-wise work;
  * f64    : the float64 limb split (exact below 2^53), for reference;
and checks that every method returns identical results (plus big-integer spot checks) before
timing.  CUDA times are CUDA-graph replays over several weight copies (so weights come from HBM,
not L2); CPU times are wall-clock.

    python benchmarks/bench_field_gemm.py --device cuda
    python benchmarks/bench_field_gemm.py --device cpu [--quick]
    python benchmarks/bench_field_gemm.py --device cuda --tune   # sweep kernel tile configs
    python benchmarks/bench_field_gemm.py --device cuda --compare-bits   # int8 vs int16 public weights

``--compare-bits`` times, per shape and T, the base GEMM against the field GEMM with int8 and with
int16 public weights, each with the prime the protocol picks for that layer at 16-bit activations
(``quantize.select_prime``: int8 -> p < 2^40, 5 limbs; int16 -> p ~ 2^(31 + log2 n), 6 limbs for
n > 512) and the backend the host would use (CUDA: Triton; CPU: ``field.select_cpu_backend``, the
fastest measured on this machine).  Each field result is checked first against an independent
backend (CUDA: f64 on every row; CPU: an int8 limb backend on the first two rows) and big-integer
spot checks.  Default shapes: Llama-3-8B's fused masked GEMMs.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from slip_vllm.core.field import (  # noqa: E402
    FieldWeight,
    choose_prime,
    default_backend,
    field_matmul,
    reference_entries,
)

SHAPES = [(4096, 4096), (12288, 4096), (14336, 4096), (4096, 14336)]
TOKENS = [1, 16, 256, 4096]
ROTATE_BYTES = 192 << 20  # weight copies per method: at least this many bytes in rotation


# ------------------------------------------------------------------------------------------------
# timers
# ------------------------------------------------------------------------------------------------


def _cuda_graph_timer(fns: dict, rot: dict, reps: int, target_s: float = 3e-3):
    """Median per-call time of each fn(i) (i = weight copy), CUDA-graph replays, interleaved."""
    graphs, calls = {}, {}
    for name, f in fns.items():
        for i in range(rot[name]):
            f(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(3):
            f(i % rot[name])
        torch.cuda.synchronize()
        est = (time.perf_counter() - t0) / 3
        c = max(rot[name], min(200, math.ceil(target_s / max(est, 1e-7))))
        c = math.ceil(c / rot[name]) * rot[name]
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            f(0)  # warm on the capture stream
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for i in range(c):
                f(i % rot[name])
        graphs[name], calls[name] = g, c
    times = {name: [] for name in fns}
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for name, g in graphs.items():
        g.replay()
    torch.cuda.synchronize()
    for _ in range(reps):
        for name, g in graphs.items():
            ev0.record()
            g.replay()
            ev1.record()
            ev1.synchronize()
            times[name].append(ev0.elapsed_time(ev1) / 1e3 / calls[name])
    del graphs
    torch.cuda.empty_cache()
    return {k: statistics.median(v) for k, v in times.items()}


def _cpu_timer(fns: dict, rot: dict, reps: int, target_s: float = 0.2):
    inner = {}
    for name, f in fns.items():
        t0 = time.perf_counter()
        f(0)
        est = time.perf_counter() - t0
        inner[name] = max(1, min(50, math.ceil(target_s / max(est, 1e-6))))
    times = {name: [] for name in fns}
    k = 0
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                f(k % rot[name])
                k += 1
            times[name].append((time.perf_counter() - t0) / inner[name])
    return {k_: statistics.median(v) for k_, v in times.items()}


# ------------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------------


def _n_rot(nbytes: int) -> int:
    return max(1, math.ceil(ROTATE_BYTES / max(1, nbytes)))


def _make_case(m, n, T, p, device, gen):
    w = torch.randint(-128, 128, (m, n), dtype=torch.int8, generator=gen).to(device)
    x = torch.randint(0, p, (T, n), dtype=torch.int64, generator=gen).to(device)
    return w, x


def _check_exact(outs: dict, x, w, p, gen, n_spot=48):
    """All methods equal, and equal to big-integer values on random entries. Returns a message."""
    names = list(outs)
    first = outs[names[0]]
    for nm in names[1:]:
        if not torch.equal(first, outs[nm]):
            bad = int((first != outs[nm]).sum())
            return f"MISMATCH {names[0]} vs {nm} ({bad} entries)"
    T, m = first.shape
    rows = torch.randint(0, T, (n_spot,), generator=gen).tolist()
    cols = torch.randint(0, m, (n_spot,), generator=gen).tolist()
    rows += [0, T - 1]
    cols += [m - 1, 0]
    ref = reference_entries(x, w, p, rows, cols)
    got = first.cpu()
    for t, i, r in zip(rows, cols, ref):
        if int(got[t, i]) != r:
            return f"MISMATCH vs big-int at ({t},{i})"
    return "ok"


def run_case(m, n, T, p, device, reps, gen, methods, tune_cfgs=None):
    w, x = _make_case(m, n, T, p, device, gen)
    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rot_i8 = _n_rot(m * n)
    rot_base = _n_rot(m * n * base_dtype.itemsize)
    fws = [FieldWeight(w if i == 0 else w.clone(), p) for i in range(rot_i8)]
    wb = [w.to(base_dtype) for _ in range(rot_base)]
    xb = torch.randn((T, n), generator=gen).to(base_dtype).to(device)
    kernel_backend = default_backend(device)

    fns, rot = {}, {}
    fns["base"] = lambda i: torch.nn.functional.linear(xb, wb[i])
    rot["base"] = rot_base
    fns["kernel"] = lambda i: field_matmul(x, fws[i], p, backend=kernel_backend)
    rot["kernel"] = rot_i8
    if "naive" in methods:
        fns["naive"] = lambda i: field_matmul(x, fws[i], p, backend="naive_int8")
        rot["naive"] = rot_i8
    if "f64" in methods:
        r64 = _n_rot(m * n * 8)
        fws64 = fws[:min(r64, rot_i8)]
        fns["f64"] = lambda i: field_matmul(x, fws64[i], p, backend="f64")
        rot["f64"] = len(fws64)
    if tune_cfgs:
        from slip_vllm.core import field_kernels_cuda as fk

        for cfg in tune_cfgs:
            if (T <= 16 and cfg.block_t != 16) or (T >= 256 and cfg.block_t < 32):
                continue
            fns[cfg.short()] = (lambda c: lambda i: fk.field_matmul_triton(x, fws[i], c))(cfg)
            rot[cfg.short()] = rot_i8

    # exactness first: every field method must agree, and agree with big integers
    outs = {}
    for k in list(fns):
        if k == "base":
            continue
        try:
            outs[k] = fns[k](0)
        except Exception as e:  # a tile config that does not compile is reported, not fatal
            print(f"   {k} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if k == "kernel":
                raise
            del fns[k]
    status = _check_exact(outs, x, w, p, gen)
    del outs
    timer = _cuda_graph_timer if device.type == "cuda" else _cpu_timer
    times = timer(fns, rot, reps)
    return times, status


LLAMA8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down
BITS_TOKENS = [1, 4, 16, 256, 1024, 2048]


def run_bits_case(m, n, T, device, reps, gen, backend, check_backend):
    """(times, status, primes) of base vs the int8 and int16 field GEMMs at the protocol's primes."""
    from slip_vllm.core.quantize import WEIGHT_QMAX, select_prime

    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fns, rot, status, primes = {}, {}, [], {}
    wb = [torch.randn((m, n), generator=gen).to(base_dtype).to(device)
          for _ in range(_n_rot(m * n * base_dtype.itemsize) if device.type == "cuda" else 1)]
    xb = torch.randn((T, n), generator=gen).to(base_dtype).to(device)
    fns["base"] = lambda i: torch.nn.functional.linear(xb, wb[i])
    rot["base"] = len(wb)
    for bits in (8, 16):
        q = WEIGHT_QMAX[bits]
        p = select_prime([(n, q)])
        primes[bits] = p
        dt = torch.int8 if bits == 8 else torch.int16
        w = torch.randint(-q, q + 1, (m, n), dtype=torch.int64, generator=gen).to(dt).to(device)
        x = torch.randint(0, p, (T, n), dtype=torch.int64, generator=gen).to(device)
        copies = _n_rot(m * n * dt.itemsize) if device.type == "cuda" else 1  # CPU: W is far beyond the caches
        fws = [FieldWeight(w if i == 0 else w.clone(), p) for i in range(copies)]
        for fw in fws[1:]:
            field_matmul(x[:1], fw, p, backend=backend)  # builds each copy's packed form before timing
        got = field_matmul(x, fws[0], p, backend=backend)
        if check_backend and check_backend != backend:
            c = T if device.type == "cuda" else min(T, 2)  # the CPU int8 limb backends are slow on some CPUs
            fw_chk = FieldWeight(w, p)
            other = field_matmul(x[:c], fw_chk, p, backend=check_backend)
            del fw_chk
            if not torch.equal(got[:c], other):
                status.append(f"int{bits}: MISMATCH {backend} vs {check_backend}")
        msg = _check_exact({"kernel": got}, x, w, p, gen, n_spot=24)
        if msg != "ok":
            status.append(f"int{bits}: {msg}")
        del got
        fns[f"int{bits}"] = (lambda fw_, x_, p_: lambda i: field_matmul(x_, fw_[i], p_, backend=backend))(fws, x, p)
        rot[f"int{bits}"] = len(fws)
    timer = _cuda_graph_timer if device.type == "cuda" else _cpu_timer
    times = timer(fns, rot, reps)
    return times, ("ok" if not status else "; ".join(status)), primes


def compare_bits(args, device, dev_desc, base_name, cmd, gen) -> int:
    from slip_vllm.core.field import limb_count, select_cpu_backend

    shapes = LLAMA8B_SHAPES if not args.shapes else [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    tokens = args.tokens or BITS_TOKENS
    reps = args.reps or (7 if device.type == "cuda" else 3)
    if device.type == "cuda":
        backend, why, check = "triton", "Triton kernel", "f64"
    else:
        backend, why = select_cpu_backend(6, 0)
        check = "cpu_int8" if backend != "cpu_int8" else "f64"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# compare-bits: backend {backend} ({why}); checked against {check}; load {load}", flush=True)
    rows, all_ok = [], True
    for (m, n) in shapes:
        for T in tokens:
            t0 = time.perf_counter()
            times, status, primes = run_bits_case(m, n, T, device, reps, gen, backend, check)
            all_ok &= status == "ok"
            rows.append((m, n, T, times, status, primes))
            print(f"{m}x{n} T={T}: {base_name} {_fmt_t(times['base'])} ms, int8 {_fmt_t(times['int8'])} ms, "
                  f"int16 {_fmt_t(times['int16'])} ms, 16/8 {times['int16'] / times['int8']:.2f}x, exact={status} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [f"Device: {dev_desc}. Date: {datetime.date.today().isoformat()}. Backend: {backend} ({why}); "
             f"every result checked against {check} and big-integer spot checks before timing. "
             f"Load average at start {tuple(round(v, 1) for v in load) if load else '-'}, at end "
             f"{tuple(round(v, 1) for v in load_end) if load_end else '-'}.", "", f"Command: `{cmd}`", "",
             f"| m x n | T | {base_name} ms | int8 ms (p bits, limbs) | int16 ms (p bits, limbs) | int16 / int8 | "
             f"int8 time vs {base_name} | int16 time vs {base_name} | exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (m, n, T, t, status, primes) in rows:
        p8, p16 = primes[8], primes[16]
        lines.append(f"| {m}x{n} | {T} | {_fmt_t(t['base'])} | {_fmt_t(t['int8'])} ({p8.bit_length()}, "
                     f"{limb_count(p8)}) | {_fmt_t(t['int16'])} ({p16.bit_length()}, {limb_count(p16)}) | "
                     f"{t['int16'] / t['int8']:.2f}x | {t['int8'] / t['base']:.2f}x | {t['int16'] / t['base']:.2f}x | "
                     f"{status} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    if not all_ok:
        print("EXACTNESS FAILURE", file=sys.stderr)
        return 1
    return 0


def _print_cuda_ceilings(gen):
    """The device's measured ceilings: bf16 and int8 (torch._int_mm, B column-major) GEMM rates on
    8192^3 random data, and device-to-device copy bandwidth (bytes read + written)."""
    N = 8192
    d = {
        "a": torch.randn((N, N), generator=gen).to(torch.bfloat16).cuda(),
        "b": torch.randn((N, N), generator=gen).to(torch.bfloat16).cuda(),
        "a8": torch.randint(-128, 128, (N, N), generator=gen, dtype=torch.int8).cuda(),
        "b8": torch.randint(-128, 128, (N, N), generator=gen, dtype=torch.int8).cuda(),
        "src": torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(),
    }
    d["dst"] = torch.empty_like(d["src"])
    nbytes = 2 * d["src"].numel()
    t = _cuda_graph_timer({"bf16": lambda i: d["a"] @ d["b"].t(),
                           "int8": lambda i: torch._int_mm(d["a8"], d["b8"].t()),
                           "copy": lambda i: d["dst"].copy_(d["src"])},
                          {"bf16": 1, "int8": 1, "copy": 1}, 5, 20e-3)
    line = (f"Measured ceilings: bf16 GEMM 8192^3 {2 * N**3 / t['bf16'] / 1e12:.0f} TFLOP/s, "
            f"int8 GEMM 8192^3 (torch._int_mm, B column-major) {2 * N**3 / t['int8'] / 1e12:.0f} TOP/s, "
            f"device copy {nbytes / t['copy'] / 1e12:.2f} TB/s (read + write).")
    print("# " + line, flush=True)
    d.clear()
    torch.cuda.empty_cache()
    return line


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def _fmt_t(s):
    return f"{s * 1e3:.3f}" if s < 1 else f"{s * 1e3:.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="two shapes, T in {1, 256}, fewer repetitions")
    ap.add_argument("--tokens", type=int, nargs="*", help="override the token counts")
    ap.add_argument("--shapes", nargs="*", help="override the shapes, as MxN")
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions per method (default 7 cuda, 5 cpu)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--f64", choices=["auto", "on", "off"], default="auto",
                    help="time the float64 limb split too (auto: CUDA always, CPU for T <= 256)")
    ap.add_argument("--tune", action="store_true", help="CUDA: also time every candidate kernel config")
    ap.add_argument("--tune-extra", action="store_true",
                    help="CUDA: also time variants of the large-T default (stages, K step, grouping)")
    ap.add_argument("--p-bits", type=int, default=40, help="the prime is the smallest above 2^(bits-1) + 12345")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ceilings", action="store_true", help="CUDA: skip the 8192^3 bf16/int8 and copy probes")
    ap.add_argument("--compare-bits", action="store_true",
                    help="int8 vs int16 public weights at the protocol's primes (Llama-3-8B shapes by default)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available")
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    tokens = args.tokens or TOKENS
    if args.quick:
        shapes = shapes if args.shapes else [SHAPES[0], SHAPES[3]]
        tokens = args.tokens or [1, 256]
    reps = args.reps or ((5 if args.quick else 7) if device.type == "cuda" else (3 if args.quick else 5))
    p = choose_prime((1 << (args.p_bits - 1)) + 12345)
    gen = torch.Generator().manual_seed(args.seed)

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        import triton

        dev_desc = (f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
                    f"triton {triton.__version__}, CUDA {torch.version.cuda}")
        base_name = "bf16"
    else:
        dev_desc = (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
                    f"torch {torch.__version__}")
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        dev_desc = line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores, " + dev_desc
                        break
        except OSError:
            pass
        base_name = "fp32"
    cmd = "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))
    print(f"# device: {dev_desc}")
    print(f"# date: {datetime.date.today().isoformat()}  command: {cmd}")
    if args.compare_bits:
        return compare_bits(args, device, dev_desc, base_name, cmd, gen)
    print(f"# p = {p} ({p.bit_length()} bits), limbs = {FieldWeight(torch.zeros(1, 1, dtype=torch.int8, device=device), p).L}")
    print(f"# kernel backend: {default_backend(device)}; base = {base_name} GEMM x[T,n] @ W[m,n]^T", flush=True)

    ceil_line = None
    if device.type == "cuda" and not args.no_ceilings:
        ceil_line = _print_cuda_ceilings(gen)
    tune_cfgs = None
    if args.tune:
        from slip_vllm.core import field_kernels_cuda as fk

        tune_cfgs = fk.CANDIDATES
    if args.tune_extra:
        from slip_vllm.core import field_kernels_cuda as fk

        K = fk.KernelConfig
        tune_cfgs = [K(64, 32, 128, 4, 3, 8, 0, "stacked"), K(64, 32, 128, 4, 5, 8, 0, "stacked"),
                     K(64, 32, 128, 4, 4, 4, 0, "stacked"), K(64, 32, 128, 4, 4, 16, 0, "stacked"),
                     K(64, 32, 128, 4, 4, 1, 0, "stacked"), K(64, 32, 64, 4, 6, 8, 0, "stacked"),
                     K(128, 32, 128, 4, 4, 8, 0, "stacked"), K(64, 64, 128, 4, 4, 8, 0, "stacked"),
                     K(128, 64, 128, 8, 3, 8, 0, "stacked"), K(64, 32, 128, 4, 4, 8, 0, "stacked")]

    rows = []
    tune_rows = []
    all_ok = True
    for (m, n) in shapes:
        for T in tokens:
            methods = set()
            if not args.no_naive:
                methods.add("naive")
            if args.f64 == "on" or (args.f64 == "auto" and (device.type == "cuda" or T <= 256)):
                methods.add("f64")
            t0 = time.perf_counter()
            times, status = run_case(m, n, T, p, device, reps, gen, methods, tune_cfgs)
            all_ok &= status == "ok"
            flop = 2.0 * m * n * T
            tb, tk = times["base"], times["kernel"]
            row = dict(m=m, n=n, T=T, base=tb, kernel=tk, naive=times.get("naive"), f64=times.get("f64"),
                       ratio=tb / tk, slow=tk / tb, tops=flop / tk / 1e12, base_tops=flop / tb / 1e12,
                       vs_naive=(times["naive"] / tk) if "naive" in times else None, exact=status)
            rows.append(row)
            print(f"{m}x{n} T={T}: {base_name} {_fmt_t(tb)} ms, kernel {_fmt_t(tk)} ms, "
                  f"naive {_fmt_t(row['naive']) if row['naive'] else '-'} ms, ratio {row['ratio']:.3f}, "
                  f"exact={status} ({time.perf_counter() - t0:.1f}s)", flush=True)
            if tune_cfgs:
                cand = sorted(((v, k) for k, v in times.items() if k not in ("base", "kernel", "naive", "f64")))
                tune_rows.append((m, n, T, tb, tk, cand))
                print("   tune: " + ", ".join(f"{k} {v * 1e3:.3f}" for v, k in cand[:6]), flush=True)

    lines = []
    lines.append(f"Device: {dev_desc}. Date: {datetime.date.today().isoformat()}. "
                 f"p = {p} ({p.bit_length()} bits, {FieldWeight(torch.zeros(1, 1, dtype=torch.int8), p).L} limbs).")
    lines.append("")
    lines.append(f"Command: `{cmd}`")
    lines.append("")
    if ceil_line:
        lines.append(ceil_line)
        lines.append("")
    unit, scale = ("TOP/s", 1e12) if device.type == "cuda" else ("GOP/s", 1e9)
    hdr = (f"| m x n | T | {base_name} ms | kernel ms | naive ms | f64 ms | kernel {unit}* | "
           f"thr. vs {base_name} | time vs {base_name} | speed-up vs naive | exact |")
    lines.append(hdr)
    lines.append("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
    for r in rows:
        lines.append(
            f"| {r['m']}x{r['n']} | {r['T']} | {_fmt_t(r['base'])} | {_fmt_t(r['kernel'])} | "
            f"{_fmt_t(r['naive']) if r['naive'] else '-'} | {_fmt_t(r['f64']) if r['f64'] else '-'} | "
            f"{r['tops'] * 1e12 / scale:.1f} | {r['ratio']:.3f}x | {r['slow']:.2f}x | "
            f"{(str(round(r['vs_naive'], 2)) + 'x') if r['vs_naive'] else '-'} | {r['exact']} |")
    lines.append("")
    lines.append(f"*useful multiply-adds 2mnT over the kernel's time (the kernel does L int8 products, L = the limbs of p). "
                 f"`thr. vs {base_name}` = t_{base_name} / t_kernel; `time vs {base_name}` = t_kernel / t_{base_name}.")
    if tune_rows:
        lines.append("")
        lines.append("| m x n | T | default ms | best config | best ms | 2nd | 3rd |")
        lines.append("|---|---|---|---|---|---|---|")
        for (m, n, T, tb, tk, cand) in tune_rows:
            c = cand + [(float("nan"), "-")] * 3
            lines.append(f"| {m}x{n} | {T} | {tk * 1e3:.3f} | {c[0][1]} | {c[0][0] * 1e3:.3f} | "
                         f"{c[1][1]} {c[1][0] * 1e3:.3f} | {c[2][1]} {c[2][0] * 1e3:.3f} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    if not all_ok:
        print("EXACTNESS FAILURE", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
