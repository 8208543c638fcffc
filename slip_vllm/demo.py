"""End-to-end demo: protect a small model, start the secure service and ``vllm serve --load-format
slip``, answer an OpenAI chat request through them, and shut everything down.

Run with ``bash scripts/demo.sh`` (which also sets up the environment). Every role runs as its own
process, exactly as in a deployment: the vendor's ``slip protect``, the trusted ``slip
secure-service`` with OUT/secret, and the untrusted ``vllm serve`` with OUT/public.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model directory to protect (default: a tiny random Llama)")
    parser.add_argument("--workdir", default=None, help="where to write artifacts and logs (default: a temp dir)")
    parser.add_argument("--prompt", default="Explain what the secure service keeps.")
    parser.add_argument("--protocol", choices=["split", "shielded"], default="split",
                        help="split: fast, the host sees activations; shielded: the host sees only masked values")
    args = parser.parse_args(argv)

    from openai import OpenAI

    from slip_vllm.launch import BIN, secure_service, vllm_server
    from slip_vllm.vendor.tiny_models import make_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="slip-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    model = Path(args.model) if args.model else None
    if model is None:
        print("[demo] 1/5 making a small random Llama model (no model hub here)")
        model = make_tiny_model("llama", work / "original", hidden=128, layers=2)
    print(f"[demo] 2/5 slip protect --model {model} --out {work / 'protected'} --protocol {args.protocol}")
    subprocess.run([str(BIN / "slip"), "protect", "--model", str(model), "--out", str(work / "protected"),
                    "--protocol", args.protocol, "--force"], check=True)
    service = secure_service(work / "protected" / "secret", logs)
    server = vllm_server(work / "protected" / "public", logs, "vllm-slip", slip=True, service_url="")
    try:
        print(f"[demo] 3/5 starting the secure service on {service.url} (log {service.log_path})")
        service.start().wait_ready(60)
        channel = service.url.replace("http://", "shm://")  # colocated: the shared-memory data plane
        server.env["SLIP_SERVICE_URL"] = channel
        print(f"[demo] 4/5 starting SLIP_SERVICE_URL={channel} vllm serve {work / 'protected' / 'public'} "
              f"--load-format slip on {server.url} (log {server.log_path}; ~1 min on 2 cores)")
        started = time.monotonic()
        server.start().wait_ready(900)
        print(f"[demo]     vLLM ready after {time.monotonic() - started:.0f} s")
        before = httpx.get(service.url + "/v1/stats").json()
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        print(f"[demo] 5/5 OpenAI chat request: {args.prompt!r}")
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": args.prompt}],
                                               max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        after = httpx.get(service.url + "/v1/stats").json()
        calls = after["calls"] - before["calls"]
        print("\n=== completion (served by vLLM from the public residual + the secure service) ===")
        print(reply.choices[0].message.content)
        print("=== end ===\n")
        print(f"[demo] the secure service answered {calls} data-plane calls for this request "
              f"({after['bytes_in'] - before['bytes_in']:,} bytes in, {after['bytes_out'] - before['bytes_out']:,} out); "
              f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
        if calls <= 0:
            print("[demo] error: the completion did not go through the secure service", file=sys.stderr)
            return 1
        if args.protocol == "split":
            print("[demo] (the model is random, so the text is gibberish; the tests check it token for token "
                  "against stock vLLM on the original weights)")
        else:
            print("[demo] (the model is random, so the text is gibberish; the tests check shielded serving bit for "
                  "bit against the fixed-point reference and against stock vLLM on a trained model)")
    finally:
        server.stop()
        service.stop()
        print(f"[demo] stopped vLLM and the secure service; artifacts and logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
