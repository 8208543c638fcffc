#!/usr/bin/env python
"""One protected linear at Llama-3-8B shapes on a GPU host, as vLLM calls it (no vLLM needed).

Protocol ``split`` (per layer, T token rows, the model's dtype):
  stock      y = x @ W^T on the GPU (cuBLAS), the unprotected layer;
  protected  what ``host.ops.protected_linear`` does: x to the CPU (device-to-host copy), post it on
             the shared-memory channel to a real secure-service process (``secure_service.app``
             under uvicorn, with an in-memory bundle of random rank-1/8 factors, so no checkpoint
             is needed), launch the public GEMM on the GPU meanwhile, wait for S(x) = W_C x
             (computed by the service on this machine's CPU cores), copy it to the GPU and add it.
  Columns: median wall time per call of each, the ratio, and the parts: device-to-host copy,
  channel round trip (service compute included), host-to-device copy, the GEMM alone.

Protocol ``shielded`` (per layer, T rows): the trusted side's online work on the CPU (mask: quantize,
take pooled one-time masks, add mod p; unmask: Freivalds check, subtract W_q r, lift, dequantize,
+ W_C x) with the real ``ShieldedLinear``; the host's exact field GEMM W_q x~ mod p on the GPU (the
Triton kernel) with its copies; and a channel echo of the masked payloads between two processes;
their sum is the layer's critical path.  Next to it, what keeps the pools full: the CPU
precompute rate of (r, W_q r) pairs, in rows per second (each row costs an m x n field product).

Host path of ``shielded`` (``--parts host``; per masked GEMM of a Llama-3-8B decoder layer and its
LM head, T token rows): the host's whole work for one ask, from the ask frame's bytes (as the
channel hands them over) to the answer's bytes written into a channel-sized buffer, through the
serving code itself (``ShieldedHost._decode`` + ``ShieldedHost.answer``: checks, y~ = W_q x~ mod p,
y~ back on the CPU), on the CPU (``device=None``: the exact CPU backend measured fastest on this
machine, ``--host-cpu-threads`` torch threads) and on the GPU (``device="cuda"``: weights on the
device, x~ decoded into pinned memory, one non-blocking upload, the Triton kernel, one non-blocking
download into pinned memory, one wait), side by side with a pageable baseline on the same GPU
(``x.to("cuda")``, the kernel, ``y.cpu()``, ``encode_shielded_message``) and the kernel alone
(CUDA events, x~ already on the device).  Every case first checks that the CPU and GPU answers are
identical.  The LM head is timed only up to 256 rows (vLLM asks logits for the sampled rows: one per
sequence, not per prompt token).

How the cores are shared: on this machine the service process gets ``--service-threads`` torch
threads and the host process the rest; a real deployment gives the secure service its own cores
(a TEE or confidential VM), so the service-side figures are what those cores must deliver.

    python benchmarks/bench_layer_gpu.py [--tokens 1 16 128 512] [--service-threads 8] [--quick]
        [--parts split shielded host] [--host-tokens 1 16 64 512 2048] [--host-cpu-threads N]

Prints the command, the machine, and a table per part; --json FILE also writes the rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (fused output parts, input width); Llama-3-8B: hidden 4096, 32 heads, 8 KV heads of 128,
# intermediate 14336
LAYERS = {"qkv": ((4096, 1024, 1024), 4096), "gate_up": ((14336, 14336), 4096), "down": ((4096,), 14336)}


DIGEST = hashlib.sha256(b"bench-layer-gpu").hexdigest()  # the in-memory bundle's "manifest hash"
ECHO_REPLY_WORD = 27  # a control word the channel leaves unused: the echo's reply size, set by the host


def rank_of(m: int, n: int) -> int:
    return max(1, min(m, n) // 8)


# ---------------------------------------------------------------------------------------------
# the secure service with an in-memory split bundle
# ---------------------------------------------------------------------------------------------


def _bundle(layers):
    from secure_service.bundle import Bundle, SecretTensor
    from slip_vllm.core.manifest import Manifest, TensorEntry

    gen = torch.Generator().manual_seed(0)
    entries, tensors, tid = [], [], 0
    for name, (parts, n) in layers.items():
        for j, m in enumerate(parts):
            k = rank_of(m, n)
            entry = TensorEntry(id=tid, name=f"model.layers.0.{name}.{j}.weight", kind="linear", shape=(m, n),
                                orientation="out_in", rank=k, public_sha256="0" * 64)
            left = torch.randn(m, k, generator=gen) / k ** 0.5
            right = torch.randn(k, n, generator=gen) / n ** 0.5
            entries.append(entry)
            tensors.append(SecretTensor(entry, left, right))
            tid += 1
    manifest = Manifest(protocol="split", architecture="LlamaForCausalLM", model_type="llama",
                        tied_embeddings=False, tensors=entries)
    return Bundle(path=Path("/nonexistent"), protocol="split", manifest=manifest, manifest_sha256=DIGEST,
                  tensors=tensors)


def _serve(port: int, threads: int, layers) -> None:
    import uvicorn

    from secure_service.app import create_app

    torch.set_num_threads(threads)
    bundle = _bundle(layers)
    uvicorn.run(create_app(bundle, max_body_bytes=1 << 30), host="127.0.0.1", port=port, log_level="warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _cuda_ms(fn, reps: int) -> float:
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[max(1, reps // 5):]) * 1e3


def bench_split(tokens, dtype, threads, reps):
    import httpx

    from slip_vllm.core import wire
    from slip_vllm.host.transport import ShmTransport

    port = _free_port()
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_serve, args=(port, threads, dict(LAYERS)), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not proc.is_alive():
            raise RuntimeError("the service did not start")
        time.sleep(0.5)
    transport = ShmTransport(url, DIGEST, timeout_s=120)
    rows = []
    seq = iter(range(1, 10**9))
    tid0 = 0
    try:
        for name, (parts, n) in LAYERS.items():
            ids = tuple(range(tid0, tid0 + len(parts)))
            tid0 += len(parts)
            m = sum(parts)
            w = (torch.randn(m, n, device=DEVICE) / n ** 0.5).to(dtype)
            for t in tokens:
                x = torch.randn(t, n, device=DEVICE).to(dtype)
                holder = {}

                def stock():
                    holder["y"] = x @ w.t()

                def protected():
                    x_cpu = x.to("cpu")                       # D2H (synchronises)
                    header, payload = wire.request_header(wire.KIND_LINEAR, ids, x_cpu, transport.session, next(seq))
                    transport.send(wire.EP_SPLIT_APPLY, header, payload)
                    y = x @ w.t()                              # launched on the GPU meanwhile
                    secret = wire.decode_reply(transport.receive(), copy=False)
                    y.add_(secret.to(DEVICE))
                    holder["y"] = y

                def d2h():
                    holder["c"] = x.to("cpu")

                x_cpu = x.to("cpu")

                def channel():
                    header, payload = wire.request_header(wire.KIND_LINEAR, ids, x_cpu, transport.session, next(seq))
                    holder["s"] = wire.decode_reply(transport.call(wire.EP_SPLIT_APPLY, header, payload))

                channel()
                secret_cpu = holder["s"]

                def h2d():
                    holder["g"] = secret_cpu.to(DEVICE)

                protected()
                want = (x.float() @ w.float().t())
                err = float((holder["y"].float() - want - secret_cpu.float().to(DEVICE)).abs().max())
                row = {"layer": name, "m": m, "n": n, "T": t, "dtype": str(dtype).replace("torch.", ""),
                       "stock_ms": _cuda_ms(stock, reps), "protected_ms": _cuda_ms(protected, reps),
                       "d2h_ms": _cuda_ms(d2h, reps), "channel_ms": _cuda_ms(channel, reps),
                       "h2d_ms": _cuda_ms(h2d, reps), "max_abs_err_vs_fp32": err}
                row["ratio"] = row["protected_ms"] / row["stock_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        transport.close()
        proc.terminate()
        proc.join(10)
    return rows


# ---------------------------------------------------------------------------------------------
# shielded
# ---------------------------------------------------------------------------------------------


def _echo(fd: int, sock: socket.socket) -> None:
    from slip_vllm.core.channel import (
        W_REP_LEN, W_REP_OFF, W_REP_SEQ, W_REP_STATUS, W_REQ_LEN, W_REQ_OFF, W_REQ_SEQ, Channel, ChannelClosed,
    )

    ch = Channel(fd, sock, "service")
    last = 0
    try:
        while True:
            seq = ch.wait(W_REQ_SEQ, last, None)
            n, off = ch.word(W_REQ_LEN), ch.word(W_REQ_OFF)
            reply = int(ch.word(ECHO_REPLY_WORD))
            ch.reply_area[:reply] = ch.request_area[off:off + reply] if reply <= n else bytes(reply)
            ch.set_word(W_REP_STATUS, 200)
            ch.set_word(W_REP_LEN, reply)
            ch.set_word(W_REP_OFF, 0)
            ch.set_word(W_REP_SEQ, seq)
            ch.ring()
            last = seq
    except ChannelClosed:
        pass


def bench_shielded(tokens, threads, reps):
    from secure_service.masks import PooledMaskProvider
    from secure_service.shielded_linear import ShieldedLinear
    from slip_vllm.core.channel import W_REP_SEQ, W_REQ_LEN, W_REQ_OFF, W_REQ_SEQ, Channel
    from slip_vllm.core.field import FieldWeight, field_matmul
    from slip_vllm.core.quantize import PublicWeight, quantize_weight, select_prime

    torch.set_num_threads(threads)
    # the channel echo runs in a forked process (forked before this process uses CUDA)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = Channel.create_segment(1 << 30, 1)
    pid = os.fork()
    if pid == 0:
        a.close()
        _echo(fd, b)
        os._exit(0)
    b.close()
    ch = Channel(fd, a, "host")
    rows = []
    seq = 0
    for name, (parts, n) in LAYERS.items():
        m = sum(parts)
        gen = torch.Generator().manual_seed(1)
        w = torch.randn(m, n, generator=gen) / n ** 0.5
        q = quantize_weight(w, 8)
        p = select_prime({name: q.w_q})
        pw = PublicWeight(q.w_q, p)
        k = sum(rank_of(pm, n) for pm in parts)
        left, right = torch.randn(m, k) / k ** 0.5, torch.randn(k, n) / n ** 0.5
        masks = PooledMaskProvider({name: pw}, p, pool_rows=256, chunk_rows=256, start=False)
        t_pre = time.perf_counter()
        masks.prefill()  # what the background thread does: 256 fresh (r, W_q r) pairs
        precompute_rows_s = 256 / (time.perf_counter() - t_pre)
        lin = ShieldedLinear(name, pw, q.scale, masks, low_rank=(left, right), bias=None)
        fw_gpu = FieldWeight(q.w_q.to(DEVICE), p)
        for t in tokens:
            x = torch.randn(t, n)
            # pooled masks for every repetition, made before timing (the background thread's work)
            pooled = PooledMaskProvider({name: pw}, p, pool_rows=t * (reps + 2), chunk_rows=max(t, 64), start=False)
            pooled.prefill()
            lin.masks = pooled
            times = {"mask": [], "unmask": [], "gemm_gpu": [], "channel": []}
            xq_bytes, yq_bytes = t * n * 8, t * m * 8
            for _ in range(reps):
                t0 = time.perf_counter()
                x_masked, ticket = lin.mask(x)
                t1 = time.perf_counter()
                seq += 1
                ch.set_word(ECHO_REPLY_WORD, yq_bytes)
                ch.request_area[:xq_bytes] = x_masked.numpy().tobytes()
                ch.set_word(W_REQ_LEN, xq_bytes)
                ch.set_word(W_REQ_OFF, 0)
                ch.set_word(W_REQ_SEQ, seq)
                ch.ring()
                ch.wait(W_REP_SEQ, seq - 1, 60)
                t2 = time.perf_counter()
                _sync()
                t3 = time.perf_counter()
                y_masked = field_matmul(x_masked.to(DEVICE), fw_gpu, p).cpu()
                t4 = time.perf_counter()
                lin.unmask(ticket, y_masked)
                t5 = time.perf_counter()
                times["mask"].append(t1 - t0)
                times["channel"].append(t2 - t1)
                times["gemm_gpu"].append(t4 - t3)
                times["unmask"].append(t5 - t4)
            pooled.close()
            wq_bf16 = (q.w_q.float() * q.scale[:, None]).to(torch.bfloat16).to(DEVICE)
            xb = x.to(torch.bfloat16).to(DEVICE)
            stock = _cuda_ms(lambda: xb @ wq_bf16.t(), reps)
            row = {"layer": name, "m": m, "n": n, "T": t, "p_bits": p.bit_length(),
                   **{f"{k}_ms": statistics.median(v[1:]) * 1e3 for k, v in times.items()},
                   "stock_bf16_ms": stock, "precompute_rows_per_s": precompute_rows_s}
            row["critical_path_ms"] = row["mask_ms"] + row["channel_ms"] + row["gemm_gpu_ms"] + row["unmask_ms"]
            row["ratio"] = row["critical_path_ms"] / stock
            rows.append(row)
            print(json.dumps(row), flush=True)
        masks.close()
    ch.close()
    os.waitpid(pid, 0)
    return rows


# ---------------------------------------------------------------------------------------------
# the shielded host's per-ask path, CPU vs GPU
# ---------------------------------------------------------------------------------------------

# the masked GEMMs of one Llama-3-8B decoder layer and its LM head: name -> (m, n)
HOST_LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
               "lm_head": (128256, 4096)}
LM_HEAD_MAX_ROWS = 256


def _wall_ms(fn, reps: int, budget_s: float = 0.0) -> tuple:
    """(median ms, repetitions) of fn (which returns with its work done); one warm-up call first.
    budget_s > 0: fewer repetitions (at least 2) when one call is slow."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if budget_s > 0:
        reps = max(2, min(reps, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, reps


def bench_host(tokens, reps, cpu_threads):
    from slip_vllm.core import wire
    from slip_vllm.core.field import FieldWeight, choose_prime, field_matmul, min_modulus
    from slip_vllm.host.shielded_client import PublicShieldedWeights, ShieldedHost

    torch.set_num_threads(cpu_threads)
    layers = dict(HOST_LAYERS)
    # one prime for the model, from its widest layer: 8-bit weights, 16-bit activations (as slip protect)
    p = choose_prime(min_modulus(max(n for _, n in layers.values()), 127, 32767))
    gen = torch.Generator().manual_seed(3)
    weights = {k: FieldWeight(torch.randint(-127, 128, (m, n), generator=gen, dtype=torch.int8), p)
               for k, (m, n) in layers.items()}
    public = PublicShieldedWeights(None, DIGEST, p, list(layers), weights)
    unused = "http://127.0.0.1:9"  # the transport is never used: the bench calls the per-ask path directly
    t0 = time.perf_counter()
    cpu = ShieldedHost(public, unused)
    cpu_setup = time.perf_counter() - t0
    gpu = None
    if DEVICE == "cuda":
        t0 = time.perf_counter()
        gpu = ShieldedHost(public, unused, device="cuda")
        gpu_setup = time.perf_counter() - t0
        print(f"host: CPU backend {cpu.backend} ({cpu.backend_reason}; {cpu_setup:.1f} s), GPU backend "
              f"{gpu.backend} ({gpu.backend_reason}; weights uploaded and kernel checked in {gpu_setup:.1f} s); "
              f"p = {p} ({p.bit_length()} bits)", flush=True)
    else:
        print(f"host: CPU backend {cpu.backend} ({cpu.backend_reason}); p = {p}", flush=True)
    out_buf = torch.empty(max(t * m for t in tokens for m, _ in layers.values()) * 8 + 4096, dtype=torch.uint8)
    rows = []
    for name, (m, n) in layers.items():
        for t in tokens:
            if name == "lm_head" and t > LM_HEAD_MAX_ROWS:
                continue
            x = torch.randint(0, p, (t, n), generator=gen, dtype=torch.int64)
            frame = bytearray(wire.encode_shielded_message(wire.MSG_ASK, 1, 0, name, x))  # writable, as a channel area

            def through(host):
                def one():
                    host.calls.clear()
                    header, y = host.answer(host._decode(memoryview(frame)))
                    out_buf[:len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
                    nbytes = y.numel() * 8
                    out_buf[len(header):len(header) + nbytes].copy_(y.reshape(-1).view(torch.uint8))
                    return y
                return one

            y_cpu = through(cpu)()
            row = {"layer": name, "m": m, "n": n, "T": t, "cpu_backend": cpu.backend,
                   "x_bytes": t * n * 8, "y_bytes": t * m * 8}
            row["cpu_ms"], row["cpu_reps"] = _wall_ms(through(cpu), reps, budget_s=2.0)
            if gpu is not None:
                y_gpu = through(gpu)()
                if not torch.equal(y_cpu, y_gpu):
                    raise SystemExit(f"{name} T={t}: the GPU answer differs from the CPU answer")
                fw = gpu.weights[name]

                def pageable():
                    msg = wire.decode_shielded_message(memoryview(frame))
                    y = field_matmul(msg.payload.to("cuda"), fw, p).cpu()
                    return wire.encode_shielded_message(wire.MSG_ANSWER, msg.step, msg.call, name, y)

                x_dev = x.to("cuda")
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

                def kernel():
                    start.record()
                    field_matmul(x_dev, fw, p)
                    end.record()
                    end.synchronize()
                    return start.elapsed_time(end)

                row["cuda_ms"], _ = _wall_ms(through(gpu), reps)
                row["cuda_pageable_ms"], _ = _wall_ms(pageable, reps)
                kernel()
                row["kernel_ms"] = statistics.median(kernel() for _ in range(reps))
                row["cpu_over_cuda"] = row["cpu_ms"] / row["cuda_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    cpu.close()
    if gpu is not None:
        gpu.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    ap.add_argument("--shielded-tokens", type=int, nargs="+", default=[1, 16, 128],
                    help="token rows for shielded (each needs reps x T fresh mask pairs precomputed first)")
    ap.add_argument("--service-threads", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--skip", choices=["split", "shielded"], default=None)
    ap.add_argument("--parts", nargs="+", choices=["split", "shielded", "host"], default=["split", "shielded", "host"])
    ap.add_argument("--host-tokens", type=int, nargs="+", default=[1, 16, 64, 512, 2048],
                    help="token rows of the host-path part (decode and prefill sizes)")
    ap.add_argument("--host-cpu-threads", type=int, default=os.cpu_count(),
                    help="torch threads of the CPU host path (default: every core of this machine)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the same code on the CPU at 1/16 of the shapes (checks the script, times nothing real)")
    args = ap.parse_args()
    global DEVICE
    if args.cpu_smoke:
        DEVICE = "cpu"
        for name, (parts, n) in list(LAYERS.items()):
            LAYERS[name] = (tuple(m // 16 for m in parts), n // 16)
        for name, (m, n) in list(HOST_LAYERS.items()):
            HOST_LAYERS[name] = (m // 16, n // 16)
    if args.quick:
        args.tokens, args.shielded_tokens, args.host_tokens, args.reps = [1, 16], [1, 16], [1, 16], 5
    parts = set(args.parts) - ({args.skip} if args.skip else set())
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()}, torch {torch.__version__}, "
          f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, device {DEVICE}; service threads "
          f"{args.service_threads}")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU host (--cpu-smoke checks the script)")
        return 2
    host = bench_host(args.host_tokens, args.reps, args.host_cpu_threads) if "host" in parts else []
    shielded = [] if "shielded" not in parts else bench_shielded(args.shielded_tokens, args.service_threads,
                                                                 max(5, args.reps // 2))
    split = []
    if "split" in parts:
        for dtype in (torch.bfloat16, torch.float32):
            split += bench_split(args.tokens, dtype, args.service_threads, args.reps)
    print("\nsplit, one protected linear (ms, median):")
    print("| layer (m x n) | T | dtype | stock | protected | ratio | D2H | channel + service | H2D |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in split:
        print(f"| {r['layer']} ({r['m']} x {r['n']}) | {r['T']} | {r['dtype']} | {r['stock_ms']:.3f} | "
              f"{r['protected_ms']:.3f} | {r['ratio']:.1f}x | {r['d2h_ms']:.3f} | {r['channel_ms']:.3f} | {r['h2d_ms']:.3f} |")
    print("\nshielded, one masked linear (ms, median; stock = bf16 GEMM of the same layer):")
    print("| layer (m x n) | T | mask (CPU) | channel echo | field GEMM + copies (GPU) | unmask (CPU) | "
          "critical path | stock | ratio | mask precompute rows/s (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in shielded:
        print(f"| {r['layer']} ({r['m']} x {r['n']}) | {r['T']} | {r['mask_ms']:.3f} | {r['channel_ms']:.3f} | "
              f"{r['gemm_gpu_ms']:.3f} | {r['unmask_ms']:.3f} | {r['critical_path_ms']:.3f} | {r['stock_bf16_ms']:.3f} | "
              f"{r['ratio']:.1f}x | {r['precompute_rows_per_s']:.0f} |")
    print(f"\nshielded host path, one masked GEMM per ask, bytes in to bytes out (ms, median; CPU path: "
          f"{args.host_cpu_threads} torch threads):")
    print("| GEMM (m x n) | T | x~ in / y~ out | CPU path (backend) | GPU path | GPU pageable baseline | "
          "kernel alone | CPU / GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in host:
        io = f"{r['x_bytes'] / 2**20:.2f} / {r['y_bytes'] / 2**20:.2f} MiB"
        gpu_cols = (f"{r['cuda_ms']:.3f} | {r['cuda_pageable_ms']:.3f} | {r['kernel_ms']:.3f} | {r['cpu_over_cuda']:.1f}x"
                    if "cuda_ms" in r else "- | - | - | -")
        print(f"| {r['layer']} ({r['m']} x {r['n']}) | {r['T']} | {io} | {r['cpu_ms']:.3f} ({r['cpu_backend']}) | "
              f"{gpu_cols} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"split": split, "shielded": shielded, "host": host}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
