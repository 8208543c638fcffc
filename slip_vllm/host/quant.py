"""The ``slip`` quantization config and its layer methods (registered by the general plugin).

A public artifact's config.json selects ``quant_method: slip``. vLLM then asks ``SlipConfig`` for a
method for every layer, and every projection of every supported model funnels through it:
``LinearBase`` layers (fused QKV and gate_up included, GPT-2's fused c_attn) get
``SlipLinearMethod``; the token embedding and LM head (``VocabParallelEmbedding`` /
``ParallelLMHead``) get ``SlipEmbeddingMethod``. Both keep vLLM's own weight creation, loading and
post-processing for the public residual (on CPU it is repacked and ``layer.weight`` may be removed,
so the public part is always computed through the parent method), and add the secret term through
the custom ops of ``slip_vllm.host.ops``.

Tensor parallelism: every rank's layer is bound to its own block of the secret (see
``host.ops`` and ``core.sharding``); vLLM's CUDA fused vocab-parallel embedding kernel, which would
bypass the method's ``embedding``, is switched off for SLIP embeddings.  Unsupported cases fail
loudly at model construction: MoE experts (and shielded artifacts, which never reach these layers).
"""

from __future__ import annotations

from typing import Any

import torch

from vllm.model_executor.layers.linear import (
    LinearBase, UnquantizedLinearMethod, register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod, VocabParallelEmbedding

from slip_vllm.core.manifest import QUANT_METHOD
from slip_vllm.host import ops


@register_weight_loader_v2_supported_method
class SlipLinearMethod(UnquantizedLinearMethod):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.handle = -1

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                               output_size, params_dtype, **extra_weight_attrs)
        self.bind(layer, sum(output_partition_sizes), params_dtype)

    def bind(self, layer, local_width: int, dtype: torch.dtype) -> None:
        parent_apply = super().apply
        plan = ops.LayerPlan(prefix=self.prefix, kind="linear", local_width=local_width,
                             public=lambda x, bias: parent_apply(layer, x, bias),
                             dtype=dtype)
        self.handle = ops.new_plan(plan)
        layer.slip_plan = plan

    @classmethod
    def adopt(cls, layer, prefix: str) -> None:
        """Take over a layer that the model built without a quantization config."""
        method = cls(prefix)
        method.bind(layer, layer.weight.shape[0], layer.weight.dtype)
        layer.quant_method = method

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.slip.protected_linear(x, bias, self.handle)

class SlipEmbeddingMethod(UnquantizedEmbeddingMethod):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.handle = -1

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                               output_size, params_dtype, **extra_weight_attrs)
        # vLLM (CUDA, TP > 1) would look a shard up with its fused kernel, never calling embedding()
        layer.use_fused_embedding = False
        self.bind(layer, input_size_per_partition, sum(output_partition_sizes), params_dtype)

    @classmethod
    def adopt(cls, layer, prefix: str) -> None:
        """Take over an embedding that the model built without a quantization config (BERT)."""
        method = cls(prefix)
        method.bind(layer, layer.weight.shape[1], layer.weight.shape[0], layer.weight.dtype)
        layer.quant_method = method
        layer.use_fused_embedding = False

    def bind(self, layer, embedding_dim: int, rows: int, dtype: torch.dtype) -> None:
        parent = super()
        # The same layer serves the lookup (token ids) and, for an LM head or a tied embedding,
        # the logits GEMM; each gets its own plan and handle.
        lookup = ops.LayerPlan(prefix=self.prefix, kind="embedding", local_width=embedding_dim,
                               public=lambda ids: parent.embedding(layer, ids.long()),
                               dtype=dtype)
        logits = ops.LayerPlan(prefix=self.prefix, kind="linear", local_width=rows,
                               public=lambda x, bias: parent.apply(layer, x, bias),
                               dtype=dtype)
        self.handle = ops.new_plan(lookup)
        self.logits_handle = ops.new_plan(logits)
        layer.slip_plan = lookup
        layer.slip_logits_plan = logits

    def embedding(self, layer, input_: torch.Tensor) -> torch.Tensor:
        return torch.ops.slip.protected_embedding(input_, self.handle)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.slip.protected_linear(x, bias, self.logits_handle)

    def tie_weights(self, layer, embed_tokens):
        layer.weight = embed_tokens.weight
        # The LM head now shares the embedding's residual, so it must share its secret too; the
        # embedding's plan may not exist yet (adopted at load time), so keep the module.
        layer.slip_tied_module = embed_tokens
        return layer

class SlipConfig(QuantizationConfig):
    """Selected by ``quantization_config: {quant_method: slip, ...}`` in the artifact."""

    def __init__(self, protocol: str = "split", manifest_sha256: str = "", manifest: str = ""):
        super().__init__()
        self.protocol = protocol
        self.manifest_sha256 = manifest_sha256
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"SlipConfig(protocol={self.protocol}, manifest={self.manifest_sha256[:16]})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SlipConfig":
        protocol = config.get("protocol", "split")
        if protocol not in ("split", "shielded"):
            raise ValueError(f"unknown SLIP protocol {protocol!r} (this plugin serves 'split' and 'shielded')")
        return cls(protocol=protocol, manifest_sha256=str(config.get("manifest_sha256", "")),
                   manifest=str(config.get("manifest", "")))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if self.protocol == "shielded":
            raise ValueError(f"a shielded SLIP artifact is served by the SlipShieldedForCausalLM architecture "
                             f"(config.json 'architectures'), not by vLLM's own layers (layer {prefix}); "
                             f"re-run `slip protect --protocol shielded`")
        if isinstance(layer, LinearBase):
            return SlipLinearMethod(prefix)
        if isinstance(layer, VocabParallelEmbedding):
            return SlipEmbeddingMethod(prefix)
        if type(layer).__name__ == "FusedMoE":
            raise NotImplementedError(f"SLIP does not protect MoE experts yet (layer {prefix})")
        return None

