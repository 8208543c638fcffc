"""Protected (`split`) vs stock vLLM serving, side by side in one run.

Makes a random Llama-style model (no model hub here), protects it, starts the secure service, a
protected ``vllm serve --load-format slip`` and a stock ``vllm serve`` of the original model, then
for each concurrency level sends the same streamed completion requests to each server in turn and
prints throughput, time to first token (TTFT) and inter-token latency (ITL, measured as the mean
time per output token after the first) with protected/stock
ratios, plus secure-service calls per engine step and bytes per generated token.

    .venv/bin/python benchmarks/bench_serving.py            # defaults used for docs/BENCHMARKS.md
    .venv/bin/python benchmarks/bench_serving.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx


async def one_request(client: httpx.AsyncClient, url: str, prompt_ids: list[int], max_tokens: int) -> dict:
    body = {"model": "m", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                stamps.append(time.perf_counter())
    # Time per output token after the first (TPOT): robust to several tokens arriving in one read.
    tpot = (stamps[-1] - stamps[0]) / (max_tokens - 1) if max_tokens > 1 else 0.0
    return {"ttft": stamps[0] - start, "tpot": tpot, "end": stamps[-1], "start": start, "tokens": max_tokens}


async def run_level(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def guarded(p):
            async with semaphore:
                return await one_request(client, url, p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*[guarded(p) for p in prompts])
        wall = time.perf_counter() - t0
    return {"tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_ms": 1e3 * statistics.mean(r["ttft"] for r in results),
            "itl_ms": 1e3 * statistics.mean(r["tpot"] for r in results), "wall_s": wall,
            "tokens": sum(r["tokens"] for r in results)}


def engine_steps(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    match = re.search(r'^vllm:iteration_tokens_total_count\{[^}]*\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank-fraction", type=float, default=0.125)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: max(8, 2 x concurrency)")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager for both servers")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.concurrency, args.output_len = 128, 2, "1,8", 8

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.launch import secure_service, vllm_server
    from slip_vllm.vendor.protect import ProtectConfig, protect
    from slip_vllm.vendor.tiny_models import make_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="slip-bench-"))
    heads = max(4, args.hidden // 64)
    original = make_tiny_model("llama", work / "original", hidden=args.hidden, layers=args.layers, heads=heads,
                               kv_heads=max(1, heads // 2))
    manifest = protect(original, work / "protected", ProtectConfig(default_rank=RankPolicy(fraction=args.rank_fraction)),
                       force=True, progress=False)
    logs = work / "logs"
    extra = ["--enforce-eager"] if args.eager else []
    service = secure_service(work / "protected" / "secret", logs).start().wait_ready(60)
    slip = vllm_server(work / "protected" / "public", logs, "slip", slip=True, service_url=service.url,
                       extra_args=extra).start()
    stock = vllm_server(original, logs, "stock", slip=False, extra_args=extra).start()
    try:
        slip.wait_ready(900)
        stock.wait_ready(900)
        rng = random.Random(0)
        vocab = json.loads((original / "config.json").read_text())["vocab_size"]
        levels = [int(c) for c in args.concurrency.split(",")]
        rows = []
        # Warm both servers (first requests pay lazy initialisation).
        warm = [[rng.randrange(2, vocab) for _ in range(args.prompt_len)] for _ in range(4)]
        for server in (stock, slip):
            asyncio.run(run_level(server.url, warm, 4, 4))
        for c in levels:
            n = args.requests_per_level or max(8, 2 * c)
            prompts = [[rng.randrange(2, vocab) for _ in range(args.prompt_len)] for _ in range(n)]
            result = {}
            for label, server in (("stock", stock), ("slip", slip)):
                before_steps = engine_steps(server.url)
                before = httpx.get(service.url + "/v1/stats").json()
                result[label] = asyncio.run(run_level(server.url, prompts, c, args.output_len))
                after = httpx.get(service.url + "/v1/stats").json()
                steps = engine_steps(server.url) - before_steps
                result[label]["calls_per_step"] = (after["calls"] - before["calls"]) / steps if steps else 0
                result[label]["bytes_per_token"] = ((after["bytes_in"] + after["bytes_out"])
                                                    - (before["bytes_in"] + before["bytes_out"])) / result[label]["tokens"]
                result[label]["service_s_per_step"] = (after["compute_s"] - before["compute_s"]) / steps if steps else 0
            rows.append((c, n, result))
    finally:
        slip.stop()
        stock.stop()
        service.stop()

    secret = sum(t.rank * (t.shape[0] + t.shape[1]) for t in manifest.tensors)
    public = sum(t.shape[0] * t.shape[1] for t in manifest.tensors)
    print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, vocab {vocab}; "
          f"rank fraction {args.rank_fraction}; secret factors {secret:,} params vs {public:,} protected "
          f"(secure-side FLOPs/token ~{secret / public:.1%} of the protected matmuls)")
    print(f"prompt {args.prompt_len} tokens, output {args.output_len} tokens, greedy, streamed; "
          f"{'eager' if args.eager else 'torch.compile (default)'}; machine: {platform.machine()}, "
          f"{__import__('os').cpu_count()} cores")
    print()
    print("| concurrency | requests | stock tok/s | slip tok/s | ratio | stock TTFT ms | slip TTFT ms | ratio "
          "| stock ITL ms | slip ITL ms | ratio | service calls/step | bytes/token | service compute ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c, n, r in rows:
        s, p = r["stock"], r["slip"]
        print(f"| {c} | {n} | {s['tok_s']:.1f} | {p['tok_s']:.1f} | {p['tok_s'] / s['tok_s']:.2f} | "
              f"{s['ttft_ms']:.0f} | {p['ttft_ms']:.0f} | {p['ttft_ms'] / s['ttft_ms']:.2f} | "
              f"{s['itl_ms']:.1f} | {p['itl_ms']:.1f} | {p['itl_ms'] / s['itl_ms']:.2f} | "
              f"{p['calls_per_step']:.1f} | {p['bytes_per_token']:,.0f} | {1e3 * p['service_s_per_step']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
