"""The custom ops through which every protected layer computes ``W_D x + S(x)``.

vLLM compiles the forward with ``fullgraph=True``, so a network call cannot sit in traced code: each
protected layer calls ``torch.ops.slip.protected_linear`` / ``protected_embedding``, opaque to Dynamo
and Inductor (they see only the fake implementation, which gives the output shape). Inside the op,
in plain eager Python:

  1. post the whole batch of rows (or token ids) to the service (``host.client``: written into the
     shared-memory channel, or sent over HTTP from a background thread); the call is in flight;
  2. compute the public part with vLLM's own quantization method (packed CPU GEMM, etc.);
  3. wait for the secret term and add it in place to the public output (only the first
     ``secret_width`` columns: the LM head's output is padded to a multiple of 64 by vLLM).

Under tensor parallelism each rank runs the same op on its own block (``LayerPlan.ranges``): a
column-parallel layer adds its own rows of ``W_C x``; a row-parallel layer adds ``L (R_r x_r)`` to
its partial output before vLLM's all-reduce (vLLM adds the bias on rank 0 only; the secret
partials, like the public ones, sum to the whole); a vocab-parallel embedding rank receives ids
already shifted into its shard (out-of-shard ids are 0 there) and asks for ``L[start + id] R`` of
its own vocab rows: vLLM zeroes the out-of-shard rows after the op and all-reduces, so every token
gets exactly its owner's secret row.  (One rank cannot supply the whole embedding term: inside the
op it only sees ids already masked to its shard.)

One call per protected layer per engine step, for every token of the mixed prefill/decode batch.
If the secret term cannot be had (service down, hung, refusing), the op does not raise (that would
kill vLLM's engine): it records the failure for the running step (``host.failure``), whose requests
then end with an error, and the step's remaining layers skip the service.
vLLM's warm-up forward (no attention metadata) skips the service: its output is discarded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from slip_vllm.core.wire import KIND_EMBED, KIND_LINEAR
from slip_vllm.host.client import ServiceUnavailable, get_client
from slip_vllm.host.failure import record_failure, step_failed

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it


@dataclass
class LayerPlan:
    """What one vLLM layer needs at run time; filled in by the slip loader."""

    prefix: str
    kind: str                                   # "linear" | "embedding"
    local_width: int                            # width of the layer's own output (padded vocab)
    public: Callable                            # the unprotected computation of vLLM
    dtype: torch.dtype = torch.float32          # output dtype (the model's)
    tensor_ids: tuple[int, ...] = ()            # manifest ids, in fused-row order
    # under tensor parallelism: this rank's (row0, row1, col0, col1) of each tensor id (a sliced
    # request, ``core.sharding``); None: whole tensors
    ranges: tuple[tuple[int, int, int, int], ...] | None = None
    secret_width: int = 0                       # columns the service returns
    # (shard id, checkpoint name, (row map, col map)) recorded while vLLM loaded the weights
    loaded: list[tuple[object, str, tuple]] = field(default_factory=list)
    ready: bool = False


PLANS: list[LayerPlan] = []


def new_plan(plan: LayerPlan) -> int:
    PLANS.append(plan)
    return len(PLANS) - 1


_forward_context = None


def _is_warmup() -> bool:
    global _forward_context
    if _forward_context is None:
        from vllm import forward_context as _fc

        _forward_context = _fc
    fc = _forward_context
    return fc.is_forward_context_available() and fc.get_forward_context().attn_metadata is None


def _check_ready(plan: LayerPlan) -> None:
    if not plan.ready:
        raise RuntimeError(f"SLIP layer {plan.prefix} was not prepared by the slip loader: serve the "
                           f"artifact with `--load-format slip`")


_SKIPPED = ServiceUnavailable("an earlier call of this step failed")


def _submit(plan: LayerPlan, kind: int, payload: torch.Tensor, rows: int):
    if step_failed():
        return _SKIPPED  # the step's requests fail anyway: a dead service costs one timeout per step
    try:
        return get_client().submit(kind, plan.tensor_ids, payload, rows, plan.secret_width, ranges=plan.ranges)
    except ServiceUnavailable as exc:
        return exc


def _add_secret(plan: LayerPlan, public_out: torch.Tensor, pending) -> torch.Tensor:
    """Add the secret term in place to the public output (a fresh tensor of this op)."""
    try:
        if isinstance(pending, ServiceUnavailable):
            raise pending
        secret = pending.result()  # on shared memory: a view of the reply area, used at once
    except ServiceUnavailable as exc:
        if pending is not _SKIPPED:
            record_failure(f"layer {plan.prefix}: {exc}")
        return public_out
    if secret.device != public_out.device:
        secret = secret.to(public_out.device, non_blocking=False)
    if not public_out.is_contiguous():
        public_out = public_out.contiguous()
    out = public_out.view(-1, public_out.shape[-1])
    if plan.secret_width != out.shape[1]:
        out = out[:, : plan.secret_width]
    out.add_(secret)
    return public_out


def protected_linear(x: torch.Tensor, bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    plan = PLANS[handle]
    _check_ready(plan)
    if not plan.tensor_ids or x.numel() == 0 or _is_warmup():
        return plan.public(x, bias)
    rows = x.reshape(-1, x.shape[-1])
    pending = _submit(plan, KIND_LINEAR, rows, rows.shape[0])
    return _add_secret(plan, plan.public(x, bias), pending)


def protected_linear_fake(x: torch.Tensor, bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], PLANS[handle].local_width))


def protected_embedding(ids: torch.Tensor, handle: int) -> torch.Tensor:
    plan = PLANS[handle]
    _check_ready(plan)
    if not plan.tensor_ids or ids.numel() == 0 or _is_warmup():
        return plan.public(ids)
    flat = ids.reshape(-1)
    pending = _submit(plan, KIND_EMBED, flat, flat.shape[0])
    return _add_secret(plan, plan.public(ids), pending)


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
