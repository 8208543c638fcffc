"""Registration with vLLM (called from the ``vllm.general_plugins`` entry point in every process).

Registers, once per process:
  * the ``slip`` quantization config (selected by the artifact's config.json),
  * the ``slip`` load format (``--load-format slip``),
  * the custom ops used inside the forward pass,
  * the scheduler hook that turns service outages into request errors (engine-core process),
  * on GPU platforms, eager mode for SLIP artifacts: a captured CUDA graph would replay decode steps
    without calling the secure service.
Nothing here opens a connection or starts a thread.
"""

from __future__ import annotations

import logging

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it
_REGISTERED = False


def _force_safe_graph_mode() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, "_slip_wrapped", False):
        return
    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        from vllm.platforms import current_platform

        if self.load_format == "slip" and not current_platform.is_cpu() and not self.enforce_eager:
            log.warning("SLIP: enabling --enforce-eager: CUDA graphs would replay steps without the "
                        "secure service's contribution")
            self.enforce_eager = True
        return original(self, *args, **kwargs)

    create_engine_config._slip_wrapped = True
    EngineArgs.create_engine_config = create_engine_config


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader

    from slip_vllm.core.manifest import QUANT_METHOD
    from slip_vllm.host.failure import install_scheduler_hook
    from slip_vllm.host.loader import SlipModelLoader
    from slip_vllm.host.ops import register_ops
    from slip_vllm.host.quant import SlipConfig

    from slip_vllm.settings import settings

    logging.getLogger("vllm.slip").setLevel(settings().log_level.upper())
    register_quantization_config(QUANT_METHOD)(SlipConfig)
    register_model_loader("slip")(SlipModelLoader)
    register_ops()
    install_scheduler_hook()
    _force_safe_graph_mode()
    _REGISTERED = True
