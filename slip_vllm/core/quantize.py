"""Fixed-point numerics of protocol ``shielded``: quantization, the prime bound, the centered lift,
and the bit-exact reference of one protected linear.

What this module owns
---------------------
* ``quantize_weight``: per-output-channel symmetric quantization of the public residual W_D [m, n]
  to int8 (default, |W_q| <= 127) or int16 (|W_q| <= 32639, see below), scales float32 [m];
* ``quantize_activations``: per-token (per-row) symmetric fixed point of x [T, n] to int64 values
  in [-(2^(b-1)-1), 2^(b-1)-1] (b = 16 by default), scales float64 [T];
* ``centered_lift`` (Z_p -> signed integers) and ``dequantize``;
* ``required_modulus`` / ``select_prime`` / ``check_prime``: the prime of brief §6,
  p > 2*n*max|W_q|*max|x_q| for every layer, refused with a ValueError when it cannot be below
  2^40 (the limit of the host's exact field GEMM);
* ``PublicWeight``: the quantized public weight prepared for the exact mod-p product on either side
  (int8: exactly ``field.field_matmul``; int16: two int8 digit planes, see below);
* ``shielded_linear_reference``: the bit-exact fixed-point specification of one protected linear
  (no masks, no field): the masked protocol must reproduce its integers exactly and, running the
  same float code on them, its floats bit for bit.

Where it runs and what it holds
-------------------------------
vLLM-free and stateless; it holds no secret.  The vendor uses it at protect time (weights, prime),
the secure service per step (activations, lift, dequantization), the host only through
``PublicWeight``.  Quantization scales are public-looking numbers but are kept by the service
(brief §6); nothing here decides where a value travels.

Exactness argument
------------------
With |W_q| <= qw, |x_q| <= qx and n terms, every entry of the integer product y = W_q x_q has
|y| <= n*qw*qx.  If p > 2*n*qw*qx (the brief's bound) then y mod p determines y: the centered lift
of v in [0, p) is v for v <= (p-1)/2 and v - p otherwise, and |y| <= n*qw*qx < p/2 puts y in the
lift's range.  The reference computes y itself in int64 (|y| < 2^46 for n <= 2^16 and 16-bit
operands, far from 2^63), so "protocol == reference" tests the whole field path: masking, the host's
mod-p GEMM, unmasking and the lift.

int16 weights.  ``field.field_matmul`` multiplies by int8 weights only (its limb bounds need
|w| <= 2^7).  An int16 weight is used through two balanced base-256 digit planes
W_q = 256*W_hi + W_lo with W_lo in [-128, 127] and W_hi in [-127, 127]; that needs
|W_q| <= 127*256 + 127 = 32639, which is why the int16 grid stops there instead of at 32767.  The
mod-p product is (256*(W_hi x mod p) + (W_lo x mod p)) mod p, exact in int64 (< 2^49).
Note the bound: 2*n*32639*32767 exceeds 2^40 for n > 514, so int16 weights with 16-bit
activations only fit tiny layers; with ``act_bits=8`` they fit n up to about 2^17.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Tuple, Union

import torch

from slip_vllm.core.field import MAX_N, MAX_P, FieldWeight, choose_prime, field_matmul, min_modulus

__all__ = [
    "WEIGHT_QMAX",
    "DEFAULT_ACT_BITS",
    "act_qmax",
    "QuantizedWeight",
    "quantize_weight",
    "quantize_activations",
    "centered_lift",
    "dequantize",
    "low_rank_term",
    "required_modulus",
    "select_prime",
    "check_prime",
    "PublicWeight",
    "shielded_linear_reference_int",
    "shielded_linear_reference",
]

WEIGHT_QMAX = {8: 127, 16: 127 * 256 + 127}  # int16 stops at 32639: see "int16 weights" above
DEFAULT_ACT_BITS = 16

LowRank = Tuple[torch.Tensor, torch.Tensor]  # (left [m, k], right [k, n]): W_C = left @ right


def act_qmax(bits: int = DEFAULT_ACT_BITS) -> int:
    """Largest |x_q| of ``bits``-bit symmetric fixed point: 2^(bits-1) - 1."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be an int in [2, 16], got {bits!r}")
    return (1 << (bits - 1)) - 1


def _weight_qmax(bits: int) -> int:
    if bits not in WEIGHT_QMAX:
        raise ValueError(f"weight bits must be 8 or 16, got {bits!r}")
    return WEIGHT_QMAX[bits]


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.is_floating_point(t):
        raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}")
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf")


# ---------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedWeight:
    """W_D ~= w_q * scale[:, None]: w_q int8/int16 [m, n], scale float32 [m] (kept by the service)."""

    w_q: torch.Tensor
    scale: torch.Tensor
    bits: int

    @property
    def max_abs(self) -> int:
        return int(self.w_q.abs().max()) if self.w_q.numel() else 0


def quantize_weight(w: torch.Tensor, bits: int = 8) -> QuantizedWeight:
    """Per-output-channel symmetric quantization of a float weight [m, n] (out, in).

    scale_i = max_j |w_ij| / qmax (float32, stored) and w_q = round(w / scale_i) computed against the
    stored float32 scale, clamped to [-qmax, qmax]; an all-zero row gets scale 1 and zeros.
    """
    qmax = _weight_qmax(bits)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise TypeError("w must be a 2-D float tensor [m, n]")
    _check_finite(w, "weight")
    w64 = w.detach().to(torch.float64)
    amax = w64.abs().amax(dim=1) if w64.shape[1] else torch.zeros(w64.shape[0], dtype=torch.float64)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # float32 underflow of tiny rows
    q = torch.round(w64 / scale.to(torch.float64)[:, None]).clamp_(-qmax, qmax)
    dtype = torch.int8 if bits == 8 else torch.int16
    return QuantizedWeight(w_q=q.to(dtype).contiguous(), scale=scale, bits=bits)


def quantize_activations(x: torch.Tensor, bits: int = DEFAULT_ACT_BITS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric fixed point: x [T, n] float -> (x_q int64 [T, n], scale float64 [T]).

    scale_t = max_j |x_tj| / qmax, x_q = round(x / scale_t) in [-qmax, qmax] (qmax = 2^(bits-1)-1);
    an all-zero row gets scale 1 and zeros.  Computed in float64; NaN/Inf are refused.
    """
    qmax = act_qmax(bits)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise TypeError("x must be a 2-D float tensor [T, n]")
    _check_finite(x, "activation")
    x64 = x.detach().to(torch.float64)
    amax = x64.abs().amax(dim=1) if x64.shape[1] else torch.zeros(x64.shape[0], dtype=torch.float64)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # subnormal amax / qmax -> 0
    x_q = torch.round(x64 / scale[:, None]).clamp_(-qmax, qmax).to(torch.int64)
    return x_q, scale


def centered_lift(v: torch.Tensor, p: int) -> torch.Tensor:
    """Z_p -> Z: v in [0, p) to v if v <= (p-1)//2 else v - p (int64)."""
    if v.dtype != torch.int64:
        raise TypeError("centered_lift expects int64 field elements")
    return torch.where(v > (p - 1) // 2, v - p, v)


def dequantize(y_q: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """y = y_q * w_scale[None, :] * x_scale[:, None], in float64 (y_q < 2^53 is exact there)."""
    return y_q.to(torch.float64) * w_scale.to(torch.float64)[None, :] * x_scale.to(torch.float64)[:, None]


def low_rank_term(x: torch.Tensor, low_rank: LowRank) -> torch.Tensor:
    """W_C x = (x @ right^T) @ left^T in float64 (x [T, n], left [m, k], right [k, n])."""
    left, right = low_rank
    x64 = x.detach().to(torch.float64)
    return (x64 @ right.to(torch.float64).t()) @ left.to(torch.float64).t()


# ---------------------------------------------------------------------------------------------
# the prime
# ---------------------------------------------------------------------------------------------

LayerSpec = Union[torch.Tensor, "PublicWeight", Tuple[int, int]]


def _layer_bounds(spec: LayerSpec) -> Tuple[int, int]:
    """(n, max|W_q|) of a layer given as an integer weight, a PublicWeight or (n, max|W_q|)."""
    if isinstance(spec, PublicWeight):
        return spec.n, spec.max_abs
    if isinstance(spec, torch.Tensor):
        if spec.dim() != 2 or spec.dtype not in (torch.int8, torch.int16):
            raise TypeError("a layer weight must be a 2-D int8/int16 tensor [m, n]")
        return int(spec.shape[1]), (int(spec.abs().max()) if spec.numel() else 0)
    n, max_w = spec
    return int(n), int(max_w)


def required_modulus(n: int, max_abs_w: int, act_bits: int = DEFAULT_ACT_BITS) -> int:
    """The brief's bound 2*n*max|W_q|*max|x_q| with max|x_q| = 2^(act_bits-1)-1 (p must exceed it)."""
    return min_modulus(n, max_abs_w, act_qmax(act_bits))


def select_prime(layers: Union[Mapping[str, LayerSpec], Iterable[LayerSpec]],
                 act_bits: int = DEFAULT_ACT_BITS) -> int:
    """The smallest prime p above every layer's bound; ValueError if none exists below 2^40.

    layers: a mapping name -> spec or an iterable of specs; a spec is an int8/int16 weight [m, n],
    a ``PublicWeight`` or a pair (n, max|W_q|).  The activation bound is the worst case
    2^(act_bits-1)-1, since activations are not known at protect time.
    """
    items = list(layers.items()) if isinstance(layers, Mapping) else list(enumerate(layers))
    if not items:
        raise ValueError("select_prime needs at least one layer")
    worst_name, worst = None, -1
    for name, spec in items:
        n, max_w = _layer_bounds(spec)
        if n > MAX_N:
            raise ValueError(f"layer {name!r}: inner dimension {n} exceeds the field GEMM's limit {MAX_N}")
        bound = required_modulus(n, max_w, act_bits)
        if bound >= MAX_P - 1:
            raise ValueError(
                f"layer {name!r}: the exact-lift bound 2*n*max|W_q|*max|x_q| = 2*{n}*{max_w}*"
                f"{act_qmax(act_bits)} = {bound} is not below 2^40; no prime p < 2^40 works "
                f"(use int8 weights or fewer activation bits)")
        if bound > worst:
            worst_name, worst = name, bound
    try:
        return choose_prime(worst)
    except ValueError as exc:
        raise ValueError(f"layer {worst_name!r}: {exc}") from None


def check_prime(p: int, layers: Union[Mapping[str, LayerSpec], Iterable[LayerSpec]],
                act_bits: int = DEFAULT_ACT_BITS) -> None:
    """Raise ValueError unless p is a prime below 2^40 above every layer's bound (protect/load time)."""
    from slip_vllm.core.field import is_prime

    if isinstance(p, bool) or not isinstance(p, int) or not 2 < p < MAX_P or not is_prime(p):
        raise ValueError(f"p={p!r} is not an odd prime below 2^40")
    items = list(layers.items()) if isinstance(layers, Mapping) else list(enumerate(layers))
    for name, spec in items:
        n, max_w = _layer_bounds(spec)
        bound = required_modulus(n, max_w, act_bits)
        if not p > bound:
            raise ValueError(f"layer {name!r}: p={p} does not exceed 2*n*max|W_q|*max|x_q| = {bound}; "
                             "the centered lift would not be exact")


# ---------------------------------------------------------------------------------------------
# the public weight, prepared for exact products mod p
# ---------------------------------------------------------------------------------------------


def split_int16(w_q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """int16 W with |W| <= 32639 -> int8 (hi, lo), W = 256*hi + lo, lo in [-128, 127], hi in [-127, 127]."""
    if w_q.dtype != torch.int16:
        raise TypeError("split_int16 expects int16")
    w = w_q.to(torch.int32)
    if w.numel() and int(w.abs().max()) > WEIGHT_QMAX[16]:
        raise ValueError(f"int16 weights must satisfy |w| <= {WEIGHT_QMAX[16]}")
    lo = ((w + 128) & 255) - 128
    hi = (w - lo) >> 8  # exact: w - lo is a multiple of 256
    return hi.to(torch.int8).contiguous(), lo.to(torch.int8).contiguous()


class PublicWeight:
    """A quantized public weight W_q [m, n] (int8 or int16) and p, ready for ``matmul``.

    ``matmul(x)`` = (x @ W_q^T) mod p in [0, p) for int64 x in [0, p): for int8 it is exactly
    ``field.field_matmul`` (the host's whole step); for int16 it combines two int8 digit planes.
    The service uses the same object for the mask images W_q r and the Freivalds keys.
    """

    def __init__(self, w_q: torch.Tensor, p: int):
        if not isinstance(w_q, torch.Tensor) or w_q.dim() != 2 or w_q.dtype not in (torch.int8, torch.int16):
            raise TypeError("w_q must be a 2-D int8 or int16 tensor [m, n]")
        self.w_q = w_q.contiguous()
        self.p = p
        self.m, self.n = (int(s) for s in w_q.shape)
        self.bits = 8 if w_q.dtype == torch.int8 else 16
        if self.bits == 8:
            self._planes = (FieldWeight(self.w_q, p),)
        else:
            hi, lo = split_int16(self.w_q)
            self._planes = (FieldWeight(hi, p), FieldWeight(lo, p))
        self.max_abs = int(self.w_q.abs().max()) if self.w_q.numel() else 0

    @property
    def shape(self) -> Tuple[int, int]:
        return self.m, self.n

    def transposed(self) -> "PublicWeight":
        """W_q^T as a PublicWeight (for u^T W_q = (W_q^T u)^T)."""
        return PublicWeight(self.w_q.t().contiguous(), self.p)

    def matmul(self, x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
        if len(self._planes) == 1:
            return field_matmul(x, self._planes[0], self.p, backend=backend)
        hi = field_matmul(x, self._planes[0], self.p, backend=backend)
        lo = field_matmul(x, self._planes[1], self.p, backend=backend)
        return torch.remainder(hi * 256 + lo, self.p)  # < 2^48 + 2^40


# ---------------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------------


def shielded_linear_reference_int(x_float: torch.Tensor, w_q: torch.Tensor, p: int,
                                  act_bits: int = DEFAULT_ACT_BITS) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y_q int64 [T, m], x_scale float64 [T]): y_q = W_q x_q over the integers, no field, no masks.

    Checks that p leaves the centered lift exact for these values (|y_q| < p/2) and raises
    ValueError otherwise; with p from ``select_prime`` that cannot happen.
    """
    if w_q.dtype not in (torch.int8, torch.int16) or w_q.dim() != 2:
        raise TypeError("w_q must be a 2-D int8/int16 tensor")
    x_q, x_scale = quantize_activations(x_float, act_bits)
    if x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"x has {x_q.shape[1]} columns, W_q has {w_q.shape[1]}")
    y_q = x_q @ w_q.to(torch.int64).t()  # exact integer GEMM: |terms| < 2^30, n <= 2^16 -> < 2^46
    if y_q.numel() and 2 * int(y_q.abs().max()) >= p:
        raise ValueError(f"|W_q x_q| reaches {int(y_q.abs().max())} >= p/2 = {p / 2}: p is too small")
    return y_q, x_scale


def shielded_linear_reference(x_float: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, p: int, *,
                              act_bits: int = DEFAULT_ACT_BITS, low_rank: Optional[LowRank] = None,
                              bias: Optional[torch.Tensor] = None,
                              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed-point specification of one protected linear, y ~= x @ (W_C + W_D)^T + b.

    y = dequantize(W_q x_q) [+ W_C x] [+ b], all in float64, cast to ``out_dtype`` at the end.  The
    masked protocol (``secure_service.shielded_linear``) must return the same integers y_q and,
    running the same float steps on them, the same floats bit for bit.
    """
    y_q, x_scale = shielded_linear_reference_int(x_float, w_q, p, act_bits)
    y = dequantize(y_q, w_scale, x_scale)
    if low_rank is not None:
        y = y + low_rank_term(x_float, low_rank)
    if bias is not None:
        y = y + bias.to(torch.float64)[None, :]
    return y.to(out_dtype)
