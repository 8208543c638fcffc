#!/usr/bin/env bash
# The test suite: unit tests, the secure service over real sockets, and real vLLM servers compared
# token for token with stock vLLM. Extra arguments go to pytest (e.g. -m "not vllm" for the fast part).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -ra --durations=15 "$@"
