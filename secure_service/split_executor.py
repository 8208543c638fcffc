"""Protocol ``split`` on the trusted side: S(x) = W_C x for a whole batch of token rows.

For a fused vLLM layer (qkv, gate_up) the request names several tensors that share one input; their
right factors are stacked once and cached, so the batch costs one [T, n] x [n, sum k] product plus
one small product per tensor, each written straight into its columns of the reply.  Embedding
requests carry token ids and return rows of W_C.

Precision.  The factors are kept in float32 and S(x) is always computed in float32, whatever the
model's compute dtype (float32, bfloat16 or float16, the dtype the rows arrive in); the result is
rounded once to that dtype for the reply.  A reduced-precision model therefore gets a secret term
carrying one rounding (as stock vLLM's own GEMM output does), not the four of a product done in
bfloat16/float16 (rounded factors, rounded intermediate, rounded output): measured on a blinded
rank-16 split of a 256 x 128 matrix, the layer's mean relative error against float64 was 2.2e-3 for
stock bfloat16, 2.2e-3 for float32-computed-then-cast and 3.6e-3 for the product in bfloat16
(float16: 2.8e-4, 2.7e-4, 4.3e-4).  Tested per layer in ``tests/service/test_split_precision.py``
(one rounding per element; a protected layer within sqrt(2) x stock's error) and end to end
against stock vLLM in ``tests/serving/test_split_serving.py::test_other_families_identical_to_stock``.  A float32 model
pays nothing extra; a 16-bit one pays the [T, n] up-cast and a [T, m] float32 intermediate per
call.  ``run`` writes into an output tensor the transport provides (the reply area of a
shared-memory channel, or an HTTP body).

Tensor parallelism (sliced ``SLQ2`` requests, ``slip_vllm.core.wire``): a vLLM rank holds a block
of each weight, so it asks for segments ``L_i[row0:row1] (R_i[:, col0:col1] x)``.  A
column-parallel rank (fused qkv with GQA-replicated kv heads, gate_up, the LM head's vocab shard)
names its own output rows and all input columns; a row-parallel rank (o, down) all output rows and
its input columns, and its reply is a partial sum that vLLM's all-reduce adds to the other ranks'
(the secret partials sum to ``L R x`` exactly as the public ones sum to ``W_D x``); an embedding
shard names its vocab rows and sends ids counted from row0.  The slices are copied out of the
bundle once, the first time a combination of segments is asked for, and then cached with the
whole-tensor plans: no call slices anything.  The cache is bounded in bytes (``PLAN_BUDGET_FACTOR``
times the bundle's factors, least recently used evicted), so a host that asks for arbitrary
ranges costs itself rebuilds, never the service unbounded memory.  A legitimate TP-t deployment
needs about (t + 1) times the factors (each column-parallel rank keeps the whole right factor, each
row-parallel rank the whole left factor); replicas of one TP size share the same slices.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
import torch

from secure_service.bundle import Bundle, SecretTensor, is_embedding
from slip_vllm.core.wire import KIND_EMBED, KIND_LINEAR, Request


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in the CPU tensor ``x``, checked in numpy (measured 6 us for 32 x 1024
    float32 where ``torch.isfinite(x).all()`` took 90 us here).  bfloat16 has no numpy type: an
    element is not finite iff its 8 exponent bits are all ones."""
    if x.dtype == torch.bfloat16:
        exponent = np.right_shift(x.contiguous().view(torch.int16).numpy(), 7) & 0xFF
        return not bool((exponent == 0xFF).any())
    return bool(np.isfinite(x.numpy()).all())


class RequestRejected(ValueError):
    """A well-formed frame that asks for something this bundle cannot do; carries an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


PLAN_BUDGET_FACTOR = 16  # cached plans may hold this many times the bundle's factor bytes


class _Plan:
    """The float32 factors of one tensor-id combination (optionally sliced).

    ``right`` stacks each distinct (tensor, column range) once, so a tensor named by several
    segments (a fused checkpoint tensor split into runs) costs one product ``x R^T``; ``segments``
    maps each output block to its left slice and its columns of ``z = x right^T``."""

    __slots__ = ("right", "lefts", "widths", "ranks", "z_offsets", "in_width", "nbytes")

    def __init__(self, parts: list[SecretTensor], ranges=None):
        dtype = torch.float32  # every dtype's S(x) is computed in float32 (module docstring)
        if ranges is None:
            ranges = [(0, int(p.entry.shape[0]), 0, int(p.entry.shape[1])) for p in parts]
        rights, z_of = [], {}
        self.lefts, self.widths, self.ranks, self.z_offsets = [], [], [], []
        k_total = 0
        for p, (r0, r1, c0, c1) in zip(parts, ranges):
            key = (int(p.entry.id), c0, c1)
            if key not in z_of:
                z_of[key] = k_total
                rights.append(p.right[:, c0:c1])
                k_total += int(p.entry.rank)
            self.lefts.append(p.left[r0:r1].to(dtype).contiguous())  # [rows_i, k_i]
            self.widths.append(r1 - r0)
            self.ranks.append(int(p.entry.rank))
            self.z_offsets.append(z_of[key])
        self.right = torch.cat(rights, 0).to(dtype).contiguous()  # [sum k (distinct), cols]
        self.in_width = int(self.right.shape[1])
        self.nbytes = (self.right.numel() + sum(l.numel() for l in self.lefts)) * self.right.element_size()


class SplitExecutor:
    def __init__(self, bundle: Bundle):
        self.tensors: list[SecretTensor] = bundle.tensors
        self._plans: collections.OrderedDict[tuple, _Plan] = collections.OrderedDict()
        self._plan_bytes = 0
        self._plan_budget = PLAN_BUDGET_FACTOR * 4 * sum(
            t.left.numel() + t.right.numel() for t in self.tensors if t.left is not None)
        self._embeds: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _parts(self, ids: tuple[int, ...]) -> list[SecretTensor]:
        parts = []
        for i in ids:
            if i >= len(self.tensors):
                raise RequestRejected(404, f"unknown tensor id {i} (bundle has {len(self.tensors)})")
            parts.append(self.tensors[i])
        return parts

    @staticmethod
    def _check_ranges(parts: list[SecretTensor], ranges) -> None:
        """Each segment inside its tensor; every segment reads the same number of input columns."""
        if ranges is None:
            return
        for p, (r0, r1, c0, c1) in zip(parts, ranges):
            m, n = (int(v) for v in p.entry.shape)
            if r1 > m or c1 > n:
                raise RequestRejected(422, f"range rows [{r0}, {r1}) cols [{c0}, {c1}) lies outside tensor "
                                           f"{p.entry.id} of shape {m} x {n}")
        if len({c1 - c0 for _, _, c0, c1 in ranges}) != 1:
            raise RequestRejected(422, "the segments of one request read different numbers of input columns")

    def _plan(self, ids: tuple[int, ...], ranges=None) -> _Plan:
        key = (ids, ranges)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        parts = self._parts(ids)
        if ranges is None and len(set(ids)) != len(ids):
            raise RequestRejected(422, f"tensor ids {ids} repeat (only a sliced request may name one twice)")
        if ranges is None and len({p.entry.shape[1] for p in parts}) != 1:
            raise RequestRejected(422, f"tensors {ids} do not share one input width")
        if any(is_embedding(p) for p in parts) and len(parts) > 1:
            raise RequestRejected(422, "an embedding is never fused with other tensors")
        self._check_ranges(parts, ranges)
        plan = _Plan(parts, ranges)
        with self._lock:
            if key not in self._plans:
                self._plans[key] = plan
                self._plan_bytes += plan.nbytes
            while self._plan_bytes > self._plan_budget and len(self._plans) > 1:
                _, old = self._plans.popitem(last=False)
                self._plan_bytes -= old.nbytes
        return plan

    def output_shape(self, req: Request) -> tuple[int, int]:
        """(rows, cols) of the reply to ``req`` (checks the tensor ids and ranges)."""
        if req.kind == KIND_EMBED:
            t = self._embed_tensor(req)
            if req.ranges is not None:
                self._check_ranges([t], req.ranges)
                _, _, c0, c1 = req.ranges[0]
                return int(req.payload.shape[0]), c1 - c0
            return int(req.payload.shape[0]), int(t.entry.shape[1])
        if req.kind != KIND_LINEAR:
            raise RequestRejected(400, f"unknown request kind {req.kind}")
        parts = self._parts(req.tensor_ids)
        if req.ranges is not None:
            self._check_ranges(parts, req.ranges)
            return int(req.payload.shape[0]), sum(r1 - r0 for r0, r1, _, _ in req.ranges)
        return int(req.payload.shape[0]), sum(int(p.entry.shape[0]) for p in parts)

    def output_width(self, ids: tuple[int, ...]) -> int:
        return sum(self.tensors[i].entry.shape[0] for i in ids)

    def run(self, req: Request, out: torch.Tensor | None = None) -> torch.Tensor:
        """S(x) for the request, written into ``out`` ([rows, cols] of ``output_shape``, the
        request's dtype) if given.  Computed in float32, rounded once to the request's dtype."""
        if req.kind == KIND_EMBED:
            return self._embed(req, out)
        if req.kind != KIND_LINEAR:
            raise RequestRejected(400, f"unknown request kind {req.kind}")
        x = req.payload
        plan = self._plan(req.tensor_ids, req.ranges)
        if x.shape[1] != plan.in_width:
            raise RequestRejected(422, f"rows have {x.shape[1]} features; tensors {req.tensor_ids} take "
                                       f"{plan.in_width}")
        if not all_finite(x):
            raise RequestRejected(422, "input rows hold NaN or Inf")
        if out is None:
            out = torch.empty(x.shape[0], sum(plan.widths), dtype=x.dtype)
        z = torch.mm(x if x.dtype == torch.float32 else x.float(), plan.right.t())  # [T, sum k], float32
        if len(plan.lefts) == 1:
            if out.dtype == torch.float32:
                torch.mm(z, plan.lefts[0].t(), out=out)
            else:
                out.copy_(torch.mm(z, plan.lefts[0].t()))  # the one rounding to the serving dtype
            return out
        c0 = 0
        for left, k, m, k0 in zip(plan.lefts, plan.ranks, plan.widths, plan.z_offsets):
            out[:, c0:c0 + m] = torch.mm(z[:, k0:k0 + k], left.t())  # cast on assignment
            c0 += m
        return out

    def _embed_tensor(self, req: Request) -> SecretTensor:
        if len(req.tensor_ids) != 1:
            raise RequestRejected(422, "an embedding request names exactly one tensor")
        (tid,) = req.tensor_ids
        if tid >= len(self.tensors):
            raise RequestRejected(404, f"unknown tensor id {tid}")
        t = self.tensors[tid]
        if not is_embedding(t):
            raise RequestRejected(422, f"tensor {tid} ({t.entry.name}) is not a token embedding")
        return t

    def _embed(self, req: Request, out: torch.Tensor | None) -> torch.Tensor:
        t = self._embed_tensor(req)
        ids = req.payload.long()
        vocab = t.entry.shape[0]
        left, right = t.left, t.right
        if req.ranges is not None:  # a vocab shard: ids count from its first row
            self._check_ranges([t], req.ranges)
            left, right = self._embed_slice(t, req.ranges[0])
            vocab = left.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise RequestRejected(422, f"token ids must lie in [0, {vocab})")
        # embeddings answer in float32 (token ids carry no dtype): the host casts to its own
        if out is None:
            return left[ids] @ right
        torch.mm(left[ids], right, out=out)
        return out

    def _embed_slice(self, t: SecretTensor, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """The vocab rows and output columns of one embedding shard (views of the bundle's
        factors: no copy, so they need no budget)."""
        key = (int(t.entry.id), tuple(rng))
        got = self._embeds.get(key)
        if got is None:
            r0, r1, c0, c1 = rng
            got = (t.left[r0:r1], t.right[:, c0:c1].contiguous())
            with self._lock:
                if len(self._embeds) >= 4 * len(self.tensors) + 64:
                    self._embeds.clear()
                self._embeds[key] = got
        return got
