#!/usr/bin/env bash
# The main job: protect a small model, start the secure service and vLLM, answer an OpenAI request.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1
exec .venv/bin/python -m slip_vllm.demo "$@"
