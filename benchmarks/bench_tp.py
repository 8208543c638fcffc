"""Tensor parallelism: TP 2 vs TP 1, stock vLLM and SLIP ``split``, side by side in one run.

Makes a random Llama-style model (``--hidden``, ``--layers``; 4 KV heads), protects it (``split``,
rank ``--rank-fraction`` of min(m, n)), starts one secure service, then for each TP size in turn a
stock ``vllm serve`` and a ``vllm serve --load-format slip`` (``--enforce-eager``; TP 2 binds each
CPU worker to one core: ``VLLM_CPU_OMP_THREADS_BIND="0|1"``), one server busy at a time, and drives
each with vLLM's own client (``vllm bench serve``, random dataset, ``--request-rate inf``,
``--ignore-eos``) at every concurrency level.  Prints per (server, TP, level): output throughput,
median TTFT and TPOT, the TP2/TP1 ratio of each, split/stock at the same TP, and the machine's load
before and after.  The same secure service serves both TP sizes (TP 2: one channel per rank).

Run: ``.venv/bin/python benchmarks/bench_tp.py [--hidden 512 --layers 4 --levels 1,8 --requests 16]``
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import vllm_bench  # noqa: E402

from slip_vllm.core.decompose import RankPolicy  # noqa: E402
from slip_vllm.launch import secure_service, vllm_server  # noqa: E402
from slip_vllm.protect.artifact import ProtectConfig, protect  # noqa: E402
from slip_vllm.protect.tiny_models import make_tiny_model  # noqa: E402


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank-fraction", type=float, default=0.125)
    p.add_argument("--levels", default="1,8")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--tp", default="1,2", help="TP sizes to compare (the first is the baseline)")
    p.add_argument("--work-dir", default=None)
    args = p.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-tp-"))
    levels = [int(v) for v in args.levels.split(",")]
    tps = [int(v) for v in args.tp.split(",")]
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"cores: {os.cpu_count()}  load before: {load()}")
    original = make_tiny_model("llama", work / "original", hidden=args.hidden, layers=args.layers,
                               heads=args.hidden // 64, kv_heads=4, init_std=0.02)
    rank = max(1, int(args.rank_fraction * args.hidden))
    protect(original, work / "protected", ProtectConfig(default_rank=RankPolicy(absolute=rank)), progress=False)
    logs = work / "logs"
    service = secure_service(work / "protected" / "secret", logs, name="service").start().wait_ready(120)
    url = f"shm://127.0.0.1:{service.port}"
    rows = {}
    try:
        for tp in tps:
            env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i) for i in range(tp))} if tp > 1 else {}
            extra = ["--enforce-eager", "--tensor-parallel-size", str(tp), "--no-enable-prefix-caching"]
            for label in ("stock", "split"):
                model = original if label == "stock" else work / "protected" / "public"
                server = vllm_server(model, logs, f"{label}-tp{tp}", slip=label == "split", service_url=url,
                                     extra_args=extra, **env).start()
                try:
                    server.wait_ready(900)
                    for c in levels:
                        before = load()
                        r = vllm_bench(server.url, original, concurrency=c, requests=max(args.requests, 2 * c),
                                       prompt_len=args.prompt_len, output_len=args.output_len, seed=100 + c,
                                       result_dir=work / "results", name=f"{label}-tp{tp}-c{c}")
                        rows[(label, tp, c)] = (r["output_throughput"], r["median_ttft_ms"], r["median_tpot_ms"],
                                                r.get("failed", 0), before, load())
                finally:
                    server.stop()
    finally:
        service.stop()
    base = tps[0]
    print()
    print(f"model: llama hidden {args.hidden}, {args.layers} layers, rank {rank}; prompt {args.prompt_len}, "
          f"output {args.output_len}; eager; shared-memory data plane")
    print("| server | TP | concurrency | output tok/s | median TTFT ms | median TPOT ms | tok/s vs TP "
          f"{base} | TPOT vs TP {base} | split/stock tok/s | failed | load before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label in ("stock", "split"):
        for tp in tps:
            for c in levels:
                tput, ttft, tpot, failed, lb, la = rows[(label, tp, c)]
                b = rows[(label, base, c)]
                vs = rows[("stock", tp, c)][0]
                print(f"| {label} | {tp} | {c} | {tput:.1f} | {ttft:.1f} | {tpot:.2f} | {tput / b[0]:.2f} | "
                      f"{tpot / b[2]:.2f} | {tput / vs:.2f} | {failed} | {lb} -> {la} |")
    print(f"load after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
