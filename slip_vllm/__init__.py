"""SLIP for vLLM.

Layout (the trust boundary is the package boundary):
  slip_vllm/core/     vLLM-free pure pieces shared by every side (decomposition, manifest, wire codec)
  slip_vllm/protect/  VENDOR, offline: ``slip protect`` reads original weights, writes both halves
  slip_vllm/host/     UNTRUSTED host: the vLLM plugin; only ever holds the public residual
  secure_service/     TRUSTED: the FastAPI service that holds the secret bundle

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process (API
server, engine core, workers), so it is idempotent, opens no connection and imports nothing heavy
until vLLM itself is imported.
"""

__version__ = "0.1.0"


def register() -> None:
    from slip_vllm.host.plugin import register as _register

    _register()
