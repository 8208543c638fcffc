"""TRUSTED side: the secure service's protocol steps for ONE protected linear in ``shielded``.

What this module owns
---------------------
``ShieldedLinear``: masking a batch of activations for the host and unmasking, verifying and
finishing the host's answer.  It does not own transport, batching across layers or the nonlinear
glue (the service executor does), nor the host's product (``PublicWeight.matmul`` /
``field.field_matmul``, untrusted side).

Where it runs and what it holds
-------------------------------
Inside the secure service.  It holds secrets: the quantization scales, the low-rank factors
W_C = left @ right, the bias, the Freivalds key, the GEMM's lock (``slip_vllm.core.lock``) and,
between ``mask`` and ``unmask``, the step's plaintext activations and masks.  Only x~ (uniform in
Z_p) leaves it.

Protocol (one layer y = (W_C + W_D) x + b for a batch of T token rows; W_D ~= diag(s_w) W_q)
-------------------------------------------------------------------------------------------
With a lock (M_out, M_in orthogonal, secret): the host's weight is W_q = quant(M_out W_D M_in)
with scales s_w of that locked matrix, and the steps below marked [lock] act on it; without one
(``none``) they are the identity.  Row-vector form: x [T, n], y = x W^T.
Offline, once per layer (protect time / service start):
  0. p prime with p > 2 n max|W_q| max|x_q| (``quantize.check_prime``); secret Freivalds vectors u
     and a = u^T W_q mod p (``integrity.FreivaldsKey``).  In the background, all the time: fresh
     mask pairs (r, W_q r mod p) from the ``MaskProvider`` pool.
Online, per step:
  1. ``mask(x)``, service:  [lock] x' = x M_in (a gather for ``perm``; float64 for ``block``);
     x_q, s_x = quantize_per_token(x') (16-bit fixed point);
     take T fresh rows r (one per token row, never used before, never again);
     x~ = (x_q + r) mod p, uniform in Z_p^n; overwrite r.  Keep (x~, x, s_x, W_q r) under a
     one-time ticket; send x~.
  2. host:  y~ = W_q x~ mod p (``field_matmul``); send y~ back.
  3. ``unmask(ticket, y~)``, service:
     a. redeem the ticket (unknown or already redeemed: ``ReplayError``, alarm);
     b. verify y~ is int64 [T, m] in [0, p) and u . y~ == a . x~ (mod p) for every row, with the
        service's own x~; on any failure: alarm, destroy the masks, raise ``IntegrityError``
        (fail closed: the whole step is refused, nothing unmasked);
     c. y_q = centered_lift((y~ - W_q r) mod p), exact integers (= W_q x_q by the bound on p);
     d. y' = y_q * s_w * s_x in float64; [lock] y = y' M_out (float64; a gather for ``perm``);
        + W_C x of the plain x (float32, from the factors converted once at construction,
        ``quantize.LowRankFactors``; why float32: "Precision of W_C x" in
        ``slip_vllm.core.quantize``), + b; cast.  Steps 1-3d are ``quantize.shielded_linear_reference``
        (lock included) bit for bit;
     e. overwrite the masks.
Costs: step 1 and 3c-3d are O(n + m) per row online (a ``block:b`` lock adds O(b (n + m)),
``benchmarks/bench_lock.py``); 3b is O(t (n + m)) per row; the background
precompute of W_q r is O(m n) per row (the price of information-theoretic hiding); W_C x is
O(k (m + n)) per row.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Tuple, Union

import torch

from secure_service.integrity import AlarmCounter, FreivaldsKey, IntegrityError, ReplayError
from secure_service.masks import MaskBatch, MaskProvider
from slip_vllm.core.lock import GemmLock
from slip_vllm.core.quantize import (
    DEFAULT_ACT_BITS,
    LowRank,
    LowRankFactors,
    PublicWeight,
    as_low_rank,
    centered_lift,
    check_prime,
    dequantize,
    low_rank_term,
    quantize_activations,
)

__all__ = ["Ticket", "ShieldedLinear"]


@dataclass(frozen=True)
class Ticket:
    """Handle of one masked step: redeemable exactly once.  Holds no secret (the state stays inside
    the ``ShieldedLinear``)."""

    id: str
    layer_id: Hashable
    rows: int


@dataclass
class _Pending:
    x_masked: torch.Tensor   # the service's own copy of what the host got
    x: Optional[torch.Tensor]  # plaintext activations (for W_C x; None without low-rank factors)
    x_scale: torch.Tensor    # float64 [T]
    masks: MaskBatch


class ShieldedLinear:
    """Trusted-side steps of one protected linear (see the module docstring for the protocol).

    layer_id: the layer's id (also the mask provider's key); weight: the public ``PublicWeight``
    (W_q and p); w_scale: float [m] per-channel scales; masks: the ``MaskProvider`` (registered
    with the same W_q); key: the layer's ``FreivaldsKey`` (None: a fresh one); alarms: the
    service's ``AlarmCounter`` (None: a private one); low_rank: W_C as a ``LowRankFactors`` (a
    fused layer's per-part factors) or a pair (left [m, k], right [k, n]) with W_C = left @ right,
    held from here on in the precision W_C x is computed in; bias: float [m]; act_bits: activation
    fixed-point bits (16); lock: the GEMM's ``GemmLock`` (``weight`` and ``w_scale`` are then
    those of the locked weight; None: no lock).
    """

    def __init__(self, layer_id: Hashable, weight: PublicWeight, w_scale: torch.Tensor, masks: MaskProvider, *,
                 key: Optional[FreivaldsKey] = None, alarms: Optional[AlarmCounter] = None,
                 low_rank: Optional[Union[LowRank, LowRankFactors]] = None, bias: Optional[torch.Tensor] = None,
                 act_bits: int = DEFAULT_ACT_BITS, out_dtype: torch.dtype = torch.float32,
                 lock: Optional[GemmLock] = None):
        if not isinstance(weight, PublicWeight):
            raise TypeError("weight must be a PublicWeight")
        self.layer_id = layer_id
        self.weight = weight
        self.p = weight.p
        self.m, self.n = weight.shape
        self.act_bits = act_bits
        check_prime(self.p, {layer_id: weight}, act_bits)
        if masks.p != self.p or tuple(masks.shape(layer_id)) != (self.m, self.n):
            raise ValueError(f"mask provider does not serve layer {layer_id!r} with shape {(self.m, self.n)} mod p")
        if w_scale.shape != (self.m,):
            raise ValueError(f"w_scale must be [{self.m}]")
        self.w_scale = w_scale.detach().to(torch.float64)
        self.masks = masks
        self.key = key if key is not None else FreivaldsKey(weight, layer_id=layer_id)
        if (self.key.p, self.key.m, self.key.n) != (self.p, self.m, self.n):
            raise ValueError("Freivalds key does not match the layer")
        self.alarms = alarms if alarms is not None else AlarmCounter()
        if low_rank is not None:
            low_rank = as_low_rank(low_rank)  # converted once, not per step
            if (low_rank.m, low_rank.n) != (self.m, self.n):
                raise ValueError(f"low-rank factors must be [{self.m}, k] and [k, {self.n}]")
        self.low_rank: Optional[LowRankFactors] = low_rank
        if bias is not None and bias.shape != (self.m,):
            raise ValueError(f"bias must be [{self.m}]")
        self.bias = bias
        self.out_dtype = out_dtype
        if lock is not None:
            if not isinstance(lock, GemmLock) or (lock.m, lock.n) != (self.m, self.n):
                raise ValueError(f"lock must be a GemmLock of [{self.m}, {self.n}]")
            if lock.is_identity:
                lock = None
        self.lock: Optional[GemmLock] = lock
        self._pending: Dict[str, _Pending] = {}
        self._lock = threading.Lock()

    # -- step 1 -------------------------------------------------------------------------------

    def mask(self, x: torch.Tensor) -> Tuple[torch.Tensor, Ticket]:
        """x float [T, n] -> (x~ int64 [T, n] in [0, p) for the host, one-time ticket)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.n:
            raise ValueError(f"x must be a float tensor [T, {self.n}]")
        x_q, x_scale = quantize_activations(x if self.lock is None else self.lock.lock_input(x), self.act_bits)
        batch = self.masks.take(self.layer_id, int(x.shape[0]))
        if batch.r.shape != x_q.shape or batch.wr.shape != (x_q.shape[0], self.m):
            batch.destroy()
            raise RuntimeError("mask provider returned a batch of the wrong shape")
        x_masked = torch.remainder(x_q + batch.r, self.p)  # |x_q| < 2^15, r < 2^40: no overflow
        batch.r.zero_()  # r itself is not needed again (unmasking uses W_q r): overwrite it now
        ticket = Ticket(id=secrets.token_hex(16), layer_id=self.layer_id, rows=int(x.shape[0]))
        # x is kept (as a copy: the caller may reuse its buffer) only if W_C x is needed
        keep_x = x.detach().clone() if self.low_rank is not None else None
        with self._lock:
            self._pending[ticket.id] = _Pending(x_masked=x_masked.clone(), x=keep_x, x_scale=x_scale, masks=batch)
        return x_masked, ticket

    # -- step 3 -------------------------------------------------------------------------------

    def _redeem(self, ticket: Ticket) -> _Pending:
        with self._lock:
            state = self._pending.pop(getattr(ticket, "id", None), None)
        if state is None or ticket.layer_id != self.layer_id:
            if state is not None:  # a ticket of another layer: refuse and burn it
                state.masks.destroy()
            self.alarms.raise_alarm(self.layer_id, "unknown or replayed ticket")
            raise ReplayError(f"layer {self.layer_id!r}: unknown or already used ticket", layer_id=self.layer_id)
        return state

    def unmask_quantized(self, ticket: Ticket, y_masked: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 3a-3c: (y_q int64 [T, m] = W_q x_q exactly, x_scale float64 [T], x float [T, n] or
        None when the layer has no low-rank factors).  With a lock, y_q and x_scale are those of the
        locked product (x_q = quantize(x M_in)); x is the plain input."""
        state = self._redeem(ticket)
        try:
            try:
                self.key.verify(state.x_masked, y_masked)
            except IntegrityError as exc:
                self.alarms.raise_alarm(self.layer_id, str(exc))
                raise
            y = torch.remainder(y_masked - state.masks.wr, self.p)
            return centered_lift(y, self.p), state.x_scale, state.x
        finally:
            state.masks.destroy()
            state.x_masked.zero_()

    def unmask(self, ticket: Ticket, y_masked: torch.Tensor) -> torch.Tensor:
        """Steps 3a-3e: the layer's output y [T, m] in ``out_dtype``; IntegrityError if the host cheated."""
        y_q, x_scale, x = self.unmask_quantized(ticket, y_masked)
        y = dequantize(y_q, self.w_scale, x_scale)
        if self.lock is not None:
            y = self.lock.unlock_output(y)
        if self.low_rank is not None:
            y = y + low_rank_term(x, self.low_rank).to(torch.float64)
        if self.bias is not None:
            y = y + self.bias.to(torch.float64)[None, :]
        return y.to(self.out_dtype)

    def discard(self, ticket: Ticket) -> bool:
        """Drop a step that will not be unmasked (aborted request); its masks are overwritten."""
        with self._lock:
            state = self._pending.pop(ticket.id, None)
        if state is None:
            return False
        state.masks.destroy()
        return True

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def host_step(self, x_masked: torch.Tensor) -> torch.Tensor:
        """What an honest host computes (tests and demos): W_q x~ mod p."""
        return self.weight.matmul(x_masked)
