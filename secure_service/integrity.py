"""TRUSTED side: integrity of the host's masked products in protocol ``shielded`` (Freivalds).

What this module owns
---------------------
* ``FreivaldsKey``: per layer, t secret vectors u_1..u_t uniform in Z_p^m (CSPRNG) and their
  images a_j = u_j^T W_q mod p in Z_p^n; ``check`` / ``verify`` test a host answer y~ for the
  service's own masked input x~ row by row: u_j . y~_t == a_j . x~_t (mod p) for every j;
* ``key_images``: the images u_j^T W_q, built in chunks of W_q's rows so that any output width
  (a 128 256-token vocabulary) stays within the field GEMM's exactness bound;
* ``IntegrityError`` (a wrong, out-of-range or replayed answer: the step fails closed) and
  ``AlarmCounter`` (counts them; the service stays up).

Where it runs and what it holds
-------------------------------
Inside the secure service only.  u is a secret and is never sent: a host that knew u could choose
errors e with u . e = 0.  The check always uses the service's copy of x~ (kept with the step's
ticket), never an echo from the host.

Soundness
---------
Let the host return y~' = y~ + e for one row with e != 0 mod p.  Some e_i != 0, so for u uniform
on Z_p^m the value u . e is uniform on Z_p and the check passes with probability exactly 1/p; with
t independent vectors, p^-t.  The default t is the smallest with p^-t <= 2^-64 (t = 2 for the
usual p ~ 2^35..2^40).  u is fixed per layer and reused across steps: that is safe because the
host's view (uniform x~, and its own answers) is independent of u, except that each tampered step
tells it "rejected"; after q tampered steps its chance of one success is at most q * p^-t, and every
rejection raises the alarm.

Exact arithmetic
----------------
The dot products have up to m (or n) terms of field elements < p, i.e. products near 2^80 (2^96
for p < 2^48), which int64 cannot hold.  They are computed as one float64 GEMM on limbs, exact by
bounds.  For p <= 2^40:
  * the operand a in [0, p) (y~ or x~) is split into 20-bit limbs a = a_0 + 2^20 a_1 (in float64:
    a_1 = floor(a * 2^-20), a_0 = a - 2^20 a_1, exact since all are integers below 2^53);
  * the key vectors v in [0, p) are split into 14-bit limbs v = v_0 + 2^14 v_1 + 2^28 v_2 (42 bits);
  * every limb product is < 2^20 * 2^14 = 2^34, and the inner dimension is processed in chunks of
    at most 2^18 terms, so every partial sum, in any order, is < 2^52 < 2^53: exact in float64;
  * chunk results are reduced mod p in int64 and the limbs recombined by Horner steps
    (acc * 2^14 + c < 2^54 + 2^52, acc * 2^20 + c < 2^60 + 2^40), all exact in int64.
For 2^40 < p < 2^48 (16-bit public weights, ``field.MAX_P``) the same steps with 24-bit operand
limbs, four 12-bit key limbs (48 bits) and chunks of 2^16 terms: limb products < 2^36, partial
sums < 2^52; Horner steps acc * 2^12 + c < 2^60 + 2^48, and acc * 2^24 taken as two steps of
2^12, each reduced mod p (< 2^60).  ``_plan(p)`` gives the limb widths.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Union

import torch

from slip_vllm.core.csprng import csprng_field_elements, freivalds_vector_count
from slip_vllm.core.field import MAX_N
from slip_vllm.core.quantize import PublicWeight

__all__ = ["IntegrityError", "ReplayError", "AlarmCounter", "FreivaldsKey", "dot_mod", "key_images"]

_A_BITS = 20        # limb width of the operand (y~ or x~)
_V_BITS = 14        # limb width of the key vectors
_V_LIMBS = 3        # 3 * 14 = 42 >= 40 bits
_CHUNK = 1 << 18    # inner-dimension chunk: 2^18 * 2^34 = 2^52 < 2^53
_P40 = 1 << 40
_PLAN_WIDE = (24, 12, 4, 1 << 16)  # p < 2^48: 2^16 * 2^24 * 2^12 = 2^52 < 2^53


def _plan(p: Optional[int]):
    """(operand limb bits, key limb bits, key limbs, chunk) for the prime p (module docstring)."""
    if p is None or p <= _P40:
        return _A_BITS, _V_BITS, _V_LIMBS, _CHUNK
    if p >= 1 << 48:
        raise ValueError(f"p={p}: the Freivalds dot products are exact for p < 2^48 only")
    return _PLAN_WIDE


def _mul_pow2_mod(v: torch.Tensor, bits: int, p: int) -> torch.Tensor:
    """(v * 2^bits) mod p for int64 v in [0, p), in steps of at most 62 - bits(p) bits (exact)."""
    step = 62 - (p - 1).bit_length()
    while bits > 0:
        s = min(step, bits)
        v = torch.remainder(v * (1 << s), p)
        bits -= s
    return v


class IntegrityError(RuntimeError):
    """The host's answer failed verification (wrong values, out of range, wrong shape): fail closed."""

    def __init__(self, message: str, *, layer_id: Hashable = None, rows: Optional[List[int]] = None):
        super().__init__(message)
        self.layer_id = layer_id
        self.rows = rows or []


class ReplayError(IntegrityError):
    """An answer for a ticket that is unknown or was already used."""


@dataclass
class Alarm:
    time: float
    layer_id: Hashable
    reason: str


class AlarmCounter:
    """Thread-safe count of integrity alarms, in total and per layer, with the most recent reasons."""

    def __init__(self, keep: int = 100):
        self._lock = threading.Lock()
        self._keep = keep
        self.count = 0
        self.per_layer: Dict[Hashable, int] = {}
        self.recent: List[Alarm] = []

    def raise_alarm(self, layer_id: Hashable, reason: str) -> int:
        with self._lock:
            self.count += 1
            self.per_layer[layer_id] = self.per_layer.get(layer_id, 0) + 1
            self.recent.append(Alarm(time.time(), layer_id, reason))
            del self.recent[:-self._keep]
            return self.count

    def snapshot(self) -> dict:
        with self._lock:
            return {"count": self.count, "per_layer": dict(self.per_layer),
                    "recent": [(a.time, a.layer_id, a.reason) for a in self.recent]}


# ---------------------------------------------------------------------------------------------
# exact dot products mod p
# ---------------------------------------------------------------------------------------------


def _key_limbs(v: torch.Tensor, p: Optional[int] = None) -> torch.Tensor:
    """v int64 [t, K] in [0, p) -> float64 [K, V t]: column V j + b is limb b of v_j (V limbs of
    ``_plan(p)``; p None or <= 2^40: three 14-bit limbs)."""
    _, v_bits, v_limbs, _ = _plan(p)
    t, K = v.shape
    cols = [((v >> (v_bits * b)) & ((1 << v_bits) - 1)) for b in range(v_limbs)]
    return torch.stack(cols, dim=1).reshape(t * v_limbs, K).t().to(torch.float64).contiguous()


def _operand_limbs(a: torch.Tensor, a_bits: int = _A_BITS) -> torch.Tensor:
    """a int64 [T, K] in [0, 2^(2 a_bits)) -> float64 [2T, K]: rows [a_0; a_1], a = a_0 + 2^a_bits a_1.

    Done in float64, where every step is exact (integers below 2^53, scaling by powers of two):
    a_1 = floor(a * 2^-20), a_0 = a - 2^20 a_1.  Cheaper than integer shifts and masks plus a
    conversion.
    """
    T, K = a.shape
    out = torch.empty((2 * T, K), dtype=torch.float64)
    lo, hi = out[:T], out[T:]
    lo.copy_(a)
    torch.mul(lo, 1.0 / (1 << a_bits), out=hi)
    hi.floor_()
    lo.sub_(hi, alpha=1 << a_bits)
    return out


def dot_mod(a: torch.Tensor, key_limbs: torch.Tensor, p: int) -> torch.Tensor:
    """(a @ v^T) mod p for a int64 [T, K] in [0, p) and key limbs of v [t, K] (``_key_limbs(v, p)``);
    int64 [T, t] in [0, p)."""
    a_bits, v_bits, v_limbs, chunk = _plan(p)
    T, K = a.shape
    t = key_limbs.shape[1] // v_limbs
    limbs = _operand_limbs(a, a_bits)  # [2T, K]
    acc = None
    for s in range(0, K, chunk):
        e = min(K, s + chunk)
        part = torch.remainder(torch.matmul(limbs[:, s:e], key_limbs[s:e]).to(torch.int64), p)  # exact: < 2^52
        acc = part if acc is None else torch.remainder(acc + part, p)
    if acc is None:
        acc = torch.zeros((2 * T, t * v_limbs), dtype=torch.int64)
    acc = acc.view(2 * T, t, v_limbs)
    val = acc[..., v_limbs - 1]
    for b in range(v_limbs - 2, -1, -1):  # Horner over the key limbs
        val = torch.remainder(val * (1 << v_bits) + acc[..., b], p)
    lo, hi = val[:T], val[T:]
    if p <= _P40:
        return torch.remainder(hi * (1 << a_bits) + lo, p)
    return torch.remainder(_mul_pow2_mod(hi, a_bits, p) + lo, p)


# ---------------------------------------------------------------------------------------------
# the key
# ---------------------------------------------------------------------------------------------


def key_images(weight: PublicWeight, u: torch.Tensor, chunk: int = MAX_N) -> torch.Tensor:
    """a_j = u_j^T W_q mod p for W_q [m, n] and u int64 [t, m] in [0, p): int64 [t, n] in [0, p).

    u^T W_q = (W_q^T u)^T is a field GEMM whose inner dimension is m (the layer's output width:
    the vocabulary for the LM head).  The field GEMM is exact only for inner dimensions up to
    ``field.MAX_N`` = 2^16 (its float64/int32 partial sums stay below their bounds), so for m above
    that the rows of W_q are taken in chunks of at most ``chunk`` and the partial images, each in
    [0, p), are added mod p (exact in int64: two values below 2^48).  Llama-3's 128 256-row LM head
    needs two chunks; a smaller layer one, which is the former single product.
    """
    if not 1 <= chunk <= MAX_N:
        raise ValueError(f"chunk must lie in 1..{MAX_N}")
    m = weight.m
    if u.dim() != 2 or u.shape[1] != m:
        raise ValueError(f"u must be [t, {m}]")
    acc = None
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        part = PublicWeight(weight.w_q[s:e].t().contiguous(), weight.p).matmul(u[:, s:e].contiguous())
        acc = part if acc is None else torch.remainder(acc + part, weight.p)
    if acc is None:
        acc = torch.zeros((u.shape[0], weight.n), dtype=torch.int64)
    return acc


default_vectors = freivalds_vector_count  # the smallest t with p^-t <= 2^-security_bits


class FreivaldsKey:
    """Secret Freivalds vectors of one layer and their images under the public weight.

    weight: the layer's ``PublicWeight`` (or int8/int16 W_q [m, n] with ``p``); u: the secret
    vectors int64 [t, m] in [0, p) (None: fresh from the CSPRNG, t from ``security_bits``).
    ``u`` is kept so a bundle writer can store it; it must never leave the trusted side.
    """

    def __init__(self, weight: Union[PublicWeight, torch.Tensor], p: Optional[int] = None, *,
                 u: Optional[torch.Tensor] = None, security_bits: int = 64, layer_id: Hashable = None):
        if not isinstance(weight, PublicWeight):
            if p is None:
                raise ValueError("p is required with a raw weight")
            weight = PublicWeight(weight, p)
        if p is not None and p != weight.p:
            raise ValueError(f"weight prepared for p={weight.p}, key asked for p={p}")
        self.p = weight.p
        self.m, self.n = weight.shape
        self.layer_id = layer_id
        if u is None:
            u = csprng_field_elements((default_vectors(self.p, security_bits), self.m), self.p)
        if u.dtype != torch.int64 or u.dim() != 2 or u.shape[1] != self.m:
            raise ValueError(f"u must be int64 [t, {self.m}]")
        if u.numel() and (int(u.min()) < 0 or int(u.max()) >= self.p):
            raise ValueError("u must lie in [0, p)")
        self.u = u
        self.t = int(u.shape[0])
        self.uw = key_images(weight, u)  # int64 [t, n] in [0, p)
        self._u_limbs = _key_limbs(self.u, self.p)
        self._uw_limbs = _key_limbs(self.uw, self.p)

    @property
    def soundness_bits(self) -> float:
        """-log2 of the chance that one wrong row passes: t * log2(p)."""
        return self.t * math.log2(self.p)

    def _validate(self, x_masked: torch.Tensor, y_masked: torch.Tensor) -> None:
        if not isinstance(y_masked, torch.Tensor) or y_masked.dtype != torch.int64:
            raise IntegrityError("answer must be an int64 tensor", layer_id=self.layer_id)
        if y_masked.dim() != 2 or y_masked.shape != (x_masked.shape[0], self.m):
            raise IntegrityError(f"answer has shape {tuple(y_masked.shape)}, expected "
                                 f"{(int(x_masked.shape[0]), self.m)}", layer_id=self.layer_id)
        if x_masked.dim() != 2 or x_masked.shape[1] != self.n:
            raise ValueError(f"x_masked must be [T, {self.n}]")
        if y_masked.numel() and (int(y_masked.min()) < 0 or int(y_masked.max()) >= self.p):
            raise IntegrityError("answer has values outside [0, p)", layer_id=self.layer_id)

    def check(self, x_masked: torch.Tensor, y_masked: torch.Tensor) -> torch.Tensor:
        """bool [T]: row t passes every vector.  Raises IntegrityError on a malformed answer."""
        self._validate(x_masked, y_masked)
        y = y_masked.cpu()
        x = x_masked.cpu()
        lhs = dot_mod(y, self._u_limbs, self.p)    # u_j . y~_t
        rhs = dot_mod(x, self._uw_limbs, self.p)   # (u_j^T W_q) . x~_t
        return (lhs == rhs).all(dim=1)

    def verify(self, x_masked: torch.Tensor, y_masked: torch.Tensor) -> None:
        """Raise IntegrityError naming the failing rows unless every row passes."""
        ok = self.check(x_masked, y_masked)
        if not bool(ok.all()):
            bad = torch.nonzero(~ok).flatten().tolist()
            raise IntegrityError(f"Freivalds check failed on {len(bad)} of {ok.numel()} rows",
                                 layer_id=self.layer_id, rows=bad)
