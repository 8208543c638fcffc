"""Registration with vLLM (called from the ``vllm.general_plugins`` entry point in every process).

Registers, once per process:
  * the ``slip`` quantization config (selected by the artifact's config.json),
  * the ``slip`` load format (``--load-format slip``),
  * the custom ops used inside the forward pass,
  * the scheduler end of the step-failure path (``host.failure``: a failed step's requests end with
    an error); the worker end is installed by the slip loader, in the processes that load a model,
  * the ``SlipShieldedForCausalLM`` architecture (lazily, by name) that serves shielded artifacts,
  * engine-argument fixes: synchronous scheduling for SLIP artifacts (pipeline parallelism and
    --async-scheduling refused; shielded artifacts refused with --tensor-parallel-size > 1), so a failed step is known before the next one; on GPU platforms, eager mode for SLIP artifacts (a captured CUDA graph
    would replay decode steps without calling the secure service); for shielded artifacts also the
    KV-cache geometry the secure service mirrors (block size, number of blocks from the
    SLIP_SHIELDED_* settings, refused if the command line asks for something else) and eager mode.
Nothing here opens a connection or starts a thread.
"""

from __future__ import annotations

import logging

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it
_REGISTERED = False
SHIELDED_TP_REFUSAL = ("SLIP shielded artifacts are served with --tensor-parallel-size 1 only (asked for {tp}): the "
                       "secure service runs the shielded model's glue and KV cache for one engine rank; use protocol "
                       "split for tensor parallelism, or one shielded engine (and service) per GPU "
                       "(README, Deployment)")


def _artifact_protocol(model: str) -> str | None:
    """The SLIP protocol named by a local model directory's config.json (None: not a SLIP artifact)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "slip":
        return None
    return str(quant.get("protocol", "split"))


def _pin_shielded_cache(args) -> None:
    """The secure service mirrors vLLM's paged KV cache: same block size, at least as many blocks."""
    from slip_vllm.settings import settings

    cfg = settings()
    if args.block_size is not None and int(args.block_size) != cfg.shielded_block_size:
        raise ValueError(f"--block-size {args.block_size} differs from SLIP_SHIELDED_BLOCK_SIZE="
                         f"{cfg.shielded_block_size}, the block size of the secure service's KV cache")
    if args.num_gpu_blocks_override is not None and int(args.num_gpu_blocks_override) > cfg.shielded_kv_blocks:
        raise ValueError(f"--num-gpu-blocks-override {args.num_gpu_blocks_override} exceeds SLIP_SHIELDED_KV_BLOCKS="
                         f"{cfg.shielded_kv_blocks}, the blocks of the secure service's KV cache")
    args.block_size = cfg.shielded_block_size
    if args.num_gpu_blocks_override is None:
        args.num_gpu_blocks_override = cfg.shielded_kv_blocks
    args.enforce_eager = True  # nothing to compile: the model is service round trips


def _fix_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, "_slip_wrapped", False):
        return
    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        from vllm.platforms import current_platform

        if self.load_format == "slip":
            if self.async_scheduling:
                raise ValueError("SLIP artifacts need synchronous scheduling: a failed engine step must end its "
                                 "requests before the next step is scheduled; drop --async-scheduling")
            if int(self.pipeline_parallel_size or 1) > 1:
                raise ValueError("SLIP serving does not support pipeline parallelism (--pipeline-parallel-size); "
                                 "use tensor parallelism")
            self.async_scheduling = False  # None would let vLLM turn it on (its default on GPUs)
            if _artifact_protocol(self.model) == "shielded" and int(self.tensor_parallel_size or 1) > 1:
                raise ValueError(SHIELDED_TP_REFUSAL.format(tp=self.tensor_parallel_size))
            if _artifact_protocol(self.model) == "shielded":
                _pin_shielded_cache(self)
            if not current_platform.is_cpu() and not self.enforce_eager:
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
    from vllm import ModelRegistry
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
    from slip_vllm.host.shielded_model import ARCHITECTURE

    ModelRegistry.register_model(ARCHITECTURE, f"slip_vllm.host.shielded_model:{ARCHITECTURE}")
    install_scheduler_hook()
    _fix_engine_args()
    _REGISTERED = True
