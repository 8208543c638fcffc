"""End-to-end demo: a trained model served through the secure service, next to stock vLLM.

Run with ``bash scripts/demo.sh [--protocol split|shielded]`` (which also sets up the environment).
Every role runs as its own process, exactly as in a deployment:

1. the model: the project's reference LM in a small configuration (:data:`DEMO`, a Llama-style
   model of about 1.1 M parameters with a BPE vocabulary, trained from scratch on the Python standard
   library's sources, ``slip_vllm.evaluation.reference_model``), trained on the first run and
   cached under ``.cache/reference/`` (progress shown); ``--model DIR`` protects another HF model;
2. the vendor: ``slip protect`` writes OUT/public and OUT/secret;
3. the trusted ``slip secure-service`` loads OUT/secret;
4. the untrusted ``vllm serve OUT/public --load-format slip`` (shared-memory data plane) and, for
   comparison, stock ``vllm serve`` on the original weights, started side by side;
5. the same greedy completions of Python code prefixes from both, printed next to each other, and
   what the secure service did for them.

The demo needs no network.  Timing on the 2-core development machine is in the README.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import httpx

from slip_vllm.evaluation import reference_model as ref

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = REPO_ROOT / ".cache" / "demo"

# The reference model's recipe at a size that trains in a few minutes on 2 cores: a 4 MB slice of
# the stdlib corpus, vocabulary 2048, hidden 128 (head_dim 64, which vLLM's CPU attention takes),
# 3 layers, 400 k training tokens.
DEMO = dataclasses.replace(
    ref.FULL, name="demo", corpus_max_bytes=4_000_000, vocab_size=2048, hidden_size=128, intermediate_size=344,
    num_layers=3, num_heads=2, num_kv_heads=2, seq_len=128, batch_size=16, train_tokens=409_600, lr=3e-3,
    eval_tokens=16_384,
)

# Python code prefixes; none ends in a space (the byte-level BPE merges a space with the word after it,
# so a trailing space is a token the model rarely saw in training).
PROMPTS = [
    "def __init__(self",
    "    for i in range(len(",
    "        raise ValueError(",
    "    def __repr__(self):\n        return",
    "import os\nimport sys\n",
]
# Greedy decoding of a small LM falls into loops ("the the the"); a repetition penalty (HF style,
# applied by vLLM's sampler, deterministic) keeps the text code-shaped.  Both servers get it.
REPETITION_PENALTY = 1.2


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _complete(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy completions of every prompt in one OpenAI /v1/completions request (batched by vLLM)."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    reply = client.completions.create(model="m", prompt=prompts, max_tokens=max_tokens, temperature=0,
                                      extra_body={"repetition_penalty": REPETITION_PENALTY})
    return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]


def _show(prompt: str, stock: str, slip: str, protocol: str) -> None:
    def block(label: str, text: str) -> None:
        lines = (prompt + text).splitlines() or [""]
        print(f"  {label}")
        for line in lines:
            print(f"    | {line}")

    print("-" * 78)
    block("stock vLLM (original weights):", stock)
    block(f"SLIP {protocol} (public residual on vLLM + secret part in the secure service):", slip)
    if stock == slip:
        print("  -> identical")
    else:
        n = next((i for i, (a, b) in enumerate(zip(stock, slip)) if a != b), min(len(stock), len(slip)))
        print(f"  -> the same for the first {n} characters, then different")


def _stats(url: str) -> dict:
    return httpx.get(url + "/v1/stats", timeout=10).json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["split", "shielded"], default="split",
                        help="split: fast, the host sees activations; shielded: the host sees only masked values")
    parser.add_argument("--model", default=None,
                        help="HF model directory to protect (default: the demo reference model, trained and cached)")
    parser.add_argument("--workdir", default=None, help=f"artifacts and logs (default: {DEFAULT_WORKDIR}/PROTOCOL)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt to complete (repeatable; default: a few Python code prefixes)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    from slip_vllm.launch import BIN, secure_service, vllm_server

    started = time.monotonic()
    work = Path(args.workdir) if args.workdir else DEFAULT_WORKDIR / args.protocol
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    prompts = args.prompt or PROMPTS

    if args.model:
        model = Path(args.model)
        _say(f"1/5 model: {model}")
    else:
        cached = ref.DEFAULT_CACHE_DIR
        _say(f"1/5 model: the demo reference LM ({DEMO.num_layers} layers, hidden {DEMO.hidden_size}, "
             f"vocabulary {DEMO.vocab_size}) trained on the Python standard library's sources; cached in "
             f"{cached} (the first run trains it: a few minutes on 2 cores, progress below)")
        t0 = time.monotonic()
        model = ref.get_reference_model(config=DEMO, progress=True)
        metrics = ref.read_metrics(model)
        _say(f"    {model.name}: validation perplexity {metrics['val_ppl']:.1f} (unigram baseline "
             f"{metrics['unigram_val_ppl']:.0f}), {metrics['n_params'] / 1e6:.2f} M parameters "
             f"({time.monotonic() - t0:.0f} s)")

    out = work / "protected"
    _say(f"2/5 slip protect --model {model} --out {out} --protocol {args.protocol}")
    subprocess.run([str(BIN / "slip"), "protect", "--model", str(model), "--out", str(out),
                    "--protocol", args.protocol, "--force"], check=True)

    service = secure_service(out / "secret", logs)
    slip = vllm_server(out / "public", logs, "vllm-slip", slip=True, service_url="")
    stock = vllm_server(model, logs, "vllm-stock", slip=False)
    try:
        _say(f"3/5 slip secure-service --bundle {out / 'secret'} on {service.url} (log {service.log_path})")
        service.start().wait_ready(120)
        channel = service.url.replace("http://", "shm://")  # colocated: the shared-memory data plane
        slip.env["SLIP_SERVICE_URL"] = channel
        _say(f"4/5 SLIP_SERVICE_URL={channel} vllm serve {out / 'public'} --load-format slip  (log {slip.log_path})")
        _say(f"    and stock vllm serve {model}  (log {stock.log_path}); both start side by side, "
             f"about a minute on 2 cores")
        t0 = time.monotonic()
        slip.start()
        stock.start()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(s.wait_ready, 900) for s in (slip, stock)]:
                f.result()
        _say(f"    both ready after {time.monotonic() - t0:.0f} s")

        _say(f"5/5 the same OpenAI completion request (greedy, repetition penalty {REPETITION_PENALTY}, "
             f"{args.max_tokens} tokens, {len(prompts)} prompts) to both servers")
        before = _stats(service.url)
        got = _complete(slip.url, prompts, args.max_tokens)
        after = _stats(service.url)
        want = _complete(stock.url, prompts, args.max_tokens)
        for p, a, b in zip(prompts, want, got):
            _show(p, a, b, args.protocol)
        print("-" * 78)
        calls = after["calls"] - before["calls"]
        same = sum(a == b for a, b in zip(want, got))
        _say(f"{same} of {len(prompts)} completions identical to stock vLLM's")
        _say(f"the secure service answered {calls} data-plane calls for the request "
             f"({after['bytes_in'] - before['bytes_in']:,} bytes in, {after['bytes_out'] - before['bytes_out']:,} out)")
        if calls <= 0:
            print("[demo] error: the completions did not go through the secure service", file=sys.stderr)
            return 1
        if args.protocol == "split":
            _say("split: the host computes W_D x, the service adds W_C x (exact in float32; "
                 "the serving tests compare token for token)")
        else:
            _say("shielded: the host sees only one-time-masked values; the service unmasks, checks "
                 "(Freivalds) and runs the glue; outputs match up to its fixed-point quantization")
    finally:
        for s in (slip, stock, service):
            s.stop()
        _say(f"stopped vLLM (both) and the secure service; artifacts and logs in {work}; "
             f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
