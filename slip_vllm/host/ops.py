"""The custom ops through which every protected layer computes ``W_D x + S(x)``.

vLLM compiles the forward with ``fullgraph=True``, so a network call cannot sit in traced code: each
protected layer calls ``torch.ops.slip.protected_linear`` / ``protected_embedding``, opaque to Dynamo
and Inductor (they see only the fake implementation, which gives the output shape). Inside the op,
in plain eager Python:

  1. send the whole batch of rows (or token ids) to the service from a background thread;
  2. compute the public part with vLLM's own quantization method (packed CPU GEMM, etc.);
  3. wait for the secret term and add it (only the first ``secret_width`` columns: the LM head's
     output is padded to a multiple of 64 by vLLM).

One call per protected layer per engine step, for every token of the mixed prefill/decode batch.
vLLM's warm-up forward (no attention metadata) skips the service: its output is discarded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from slip_vllm.core.wire import KIND_EMBED, KIND_LINEAR
from slip_vllm.host.client import ServiceUnavailable, get_client
from slip_vllm.host.failure import report_failure

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it


@dataclass
class LayerPlan:
    """What one vLLM layer needs at run time; filled in by the slip loader."""

    prefix: str
    kind: str                                   # "linear" | "embedding"
    local_width: int                            # width of the layer's own output (padded vocab)
    public: Callable                            # the unprotected computation of vLLM
    engine_key: str = ""                        # which engine core to report failures to
    dtype: torch.dtype = torch.float32          # output dtype (the model's)
    tensor_ids: tuple[int, ...] = ()            # manifest ids, in fused-row order
    secret_width: int = 0                       # columns the service returns
    # (shard id, checkpoint name) pairs recorded while vLLM loaded the weights
    loaded: list[tuple[object, str]] = field(default_factory=list)
    ready: bool = False


PLANS: list[LayerPlan] = []


def new_plan(plan: LayerPlan) -> int:
    PLANS.append(plan)
    return len(PLANS) - 1


def _is_warmup() -> bool:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return is_forward_context_available() and get_forward_context().attn_metadata is None


def _check_ready(plan: LayerPlan) -> None:
    if not plan.ready:
        raise RuntimeError(f"SLIP layer {plan.prefix} was not prepared by the slip loader: serve the "
                           f"artifact with `--load-format slip`")


def _add_secret(plan: LayerPlan, public_out: torch.Tensor, future) -> torch.Tensor:
    try:
        secret = future.result()
    except ServiceUnavailable as exc:
        log.error("SLIP layer %s: %s", plan.prefix, exc)
        report_failure(plan.engine_key)
        return public_out
    secret = secret.to(device=public_out.device, dtype=public_out.dtype)
    if plan.secret_width == public_out.shape[-1]:
        return public_out + secret.view(public_out.shape)
    out = public_out.clone()
    out[..., : plan.secret_width] += secret.view(*public_out.shape[:-1], plan.secret_width)
    return out


def protected_linear(x: torch.Tensor, bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    plan = PLANS[handle]
    _check_ready(plan)
    if not plan.tensor_ids or x.numel() == 0 or _is_warmup():
        return plan.public(x, bias)
    rows = x.reshape(-1, x.shape[-1])
    future = get_client().submit(KIND_LINEAR, plan.tensor_ids, rows, rows.shape[0], plan.secret_width)
    return _add_secret(plan, plan.public(x, bias), future)


def protected_linear_fake(x: torch.Tensor, bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], PLANS[handle].local_width))


def protected_embedding(ids: torch.Tensor, handle: int) -> torch.Tensor:
    plan = PLANS[handle]
    _check_ready(plan)
    if not plan.tensor_ids or ids.numel() == 0 or _is_warmup():
        return plan.public(ids)
    flat = ids.reshape(-1)
    future = get_client().submit(KIND_EMBED, plan.tensor_ids, flat, flat.shape[0], plan.secret_width)
    return _add_secret(plan, plan.public(ids), future)


def protected_embedding_fake(ids: torch.Tensor, handle: int) -> torch.Tensor:
    plan = PLANS[handle]
    return torch.empty((*ids.shape, plan.local_width), dtype=plan.dtype, device=ids.device)


_lib = None


def register_ops() -> None:
    """Define the ops once per process (defining twice raises)."""
    global _lib
    if _lib is not None:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    _lib = torch.library.Library("slip", "FRAGMENT")
    direct_register_custom_op("protected_linear", protected_linear, mutates_args=[],
                              fake_impl=protected_linear_fake, target_lib=_lib)
    direct_register_custom_op("protected_embedding", protected_embedding, mutates_args=[],
                              fake_impl=protected_embedding_fake, target_lib=_lib)
