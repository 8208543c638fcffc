#!/usr/bin/env bash
# The main job: a model trained here (cached after the first run), protected with slip protect, served
# through the secure service and vLLM, its completions printed next to stock vLLM's (slip_vllm/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1
exec .venv/bin/python -m slip_vllm.demo "$@"
