"""Protocol ``split`` on the trusted side: S(x) = W_C x for a whole batch of token rows.

For a fused vLLM layer (qkv, gate_up) the request names several tensors that share one input; their
right factors are stacked once and cached, so the batch costs one [T, n] x [n, sum k] product plus
one small product per tensor. Embedding requests carry token ids and return rows of W_C.
"""

from __future__ import annotations

import threading

import torch

from secure_service.bundle import Bundle, SecretTensor, is_embedding
from slip_vllm.core.wire import KIND_EMBED, KIND_LINEAR, Request


class RequestRejected(ValueError):
    """A well-formed frame that asks for something this bundle cannot do; carries an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SplitExecutor:
    def __init__(self, bundle: Bundle):
        self.tensors: list[SecretTensor] = bundle.tensors
        self._fused: dict[tuple[int, ...], tuple[torch.Tensor, list[SecretTensor]]] = {}
        self._lock = threading.Lock()

    def _plan(self, ids: tuple[int, ...]) -> tuple[torch.Tensor, list[SecretTensor]]:
        plan = self._fused.get(ids)
        if plan is not None:
            return plan
        parts = []
        for i in ids:
            if i >= len(self.tensors):
                raise RequestRejected(404, f"unknown tensor id {i} (bundle has {len(self.tensors)})")
            parts.append(self.tensors[i])
        widths = {p.entry.shape[1] for p in parts}
        if len(widths) != 1:
            raise RequestRejected(422, f"tensors {ids} do not share one input width")
        right = torch.cat([p.right for p in parts], 0).contiguous() if len(parts) > 1 else parts[0].right
        with self._lock:
            self._fused[ids] = (right, parts)
        return right, parts

    def output_width(self, ids: tuple[int, ...]) -> int:
        return sum(self.tensors[i].entry.shape[0] for i in ids)

    def run(self, req: Request) -> torch.Tensor:
        if req.kind == KIND_EMBED:
            return self._embed(req)
        if req.kind != KIND_LINEAR:
            raise RequestRejected(400, f"unknown request kind {req.kind}")
        right, parts = self._plan(req.tensor_ids)
        x = req.payload
        if x.shape[1] != right.shape[1]:
            raise RequestRejected(422, f"rows have {x.shape[1]} features; tensors {req.tensor_ids} take "
                                       f"{right.shape[1]}")
        xf = x.to(torch.float32)
        if not torch.isfinite(xf).all():
            raise RequestRejected(422, "input rows hold NaN or Inf")
        z = xf @ right.T  # [T, sum k]
        outs, start = [], 0
        for p in parts:
            k = p.entry.rank
            outs.append(z[:, start:start + k] @ p.left.T)
            start += k
        y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return y.to(x.dtype)

    def _embed(self, req: Request) -> torch.Tensor:
        if len(req.tensor_ids) != 1:
            raise RequestRejected(422, "an embedding request names exactly one tensor")
        (tid,) = req.tensor_ids
        if tid >= len(self.tensors):
            raise RequestRejected(404, f"unknown tensor id {tid}")
        t = self.tensors[tid]
        if not is_embedding(t):
            raise RequestRejected(422, f"tensor {tid} ({t.entry.name}) is not a token embedding")
        ids = req.payload.long()
        vocab = t.entry.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise RequestRejected(422, f"token ids must lie in [0, {vocab})")
        return t.left[ids] @ t.right
