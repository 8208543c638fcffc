"""Fixed-point numerics of protocol ``shielded``: quantization, the prime bound, the centered lift,
and the bit-exact reference of one protected linear.

What this module owns
---------------------
* ``quantize_weight``: per-output-channel symmetric quantization of the public residual W_D [m, n]
  to int8 (default, |W_q| <= 127) or int16 (|W_q| <= 32639, see below), scales float32 [m];
* ``quantize_activations``: per-token (per-row) symmetric fixed point of x [T, n] to int64 values
  in [-(2^(b-1)-1), 2^(b-1)-1] (b = 16 by default), scales float64 [T];
* ``centered_lift`` (Z_p -> signed integers) and ``dequantize``;
* ``LowRankFactors`` / ``low_rank_term``: the secret term W_C x of a (fused) protected linear, with
  its factors held once in the compute precision (float32, see "Precision of W_C x" below) and the
  left factor of a fused GEMM kept as one block per part instead of a dense block-diagonal matrix;
* ``required_modulus`` / ``select_prime`` / ``check_prime``: the prime of brief §6,
  p > 2*n*max|W_q|*max|x_q| for every layer, refused with a ValueError when it cannot be below
  ``field.MAX_P`` = 2^48 (the limit of the host's exact field GEMM);
* ``PublicWeight``: the quantized public weight prepared for the exact mod-p product on either side
  (exactly ``field.field_matmul`` for int8 and int16 weights, see below);
* ``shielded_linear_reference``: the bit-exact fixed-point specification of one protected linear
  (no masks, no field), including the GEMM's lock where it has one (``slip_vllm.core.lock``): the
  masked protocol must reproduce its integers exactly and, running the same float code on them,
  its floats bit for bit.

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

Precision of W_C x
------------------
``low_rank_term`` computes W_C x = left (right x) in float32 from float32 factors, converted once
(``LowRankFactors``; ``decompose.split_matrix`` already stores them in float32), not in float64
from factors converted on every call (Llama-3-8B gate_up shape, one decode row, one CPU thread
of the shared 2-core dev box: 240-310 ms with the per-call conversion, 25-30 ms with float64
factors converted once, 13 ms in float32 with per-part blocks; ``python
benchmarks/bench_shielded_steps.py --parts low_rank``).  float32 also halves the service's memory
for the factors (Llama-3-8B at rank 1/8, LM head included: 5.1 GB instead of 10.3 GB).
float32 is enough here because
* the model being served is a float32 (or lower-precision) model: its own x @ W^T is a float32
  product, x arrives in float32 and the layer's result is cast to float32 at the end, so float32
  accumulation of the W_C x term (relative error about sqrt(K + n) * 2^-24 for the typical case,
  K + n terms) is of the order of the rounding the original model itself makes;
* it is far below the error the protocol already accepts in the same sum: the W_D x term carries
  the int8 weight quantization (about 2^-8 / sqrt(12) relative per weight) and the 16-bit
  activation fixed point (2^-16 relative per row);
* exactness of the protocol does not depend on it: the masked protocol and this module's reference
  call the same ``low_rank_term`` on the same float32 factors and the same x, so they agree bit for
  bit whatever the precision (the integers y_q are exact either way).
Measured: relative (Frobenius) error 3e-7 against the float64 product, inside the forward error
bound gamma_n |x||R^T||L^T| + gamma_K |z||L^T| entry by entry (``test_shielded_quantize``).  The
price: a row's last float32 bit may depend on how many rows share the BLAS product (the kernel is
chosen by shape), which the float64 path only hid behind its final cast; so a row's logits are
bit-exact for the same request (protocol == reference), and equal across other groupings of rows
to float32 rounding (measured <= 4.8e-7 at |logits| <= 4.5).
The rest of the finishing sum (dequantize, + W_C x, + bias) stays in float64 (exact for the
integers, O(m) per row) and is cast to ``out_dtype`` once.

int16 weights.  The host's limb GEMMs multiply int8 digits (their bounds need |w| <= 2^7), so an
int16 weight is used through two balanced base-256 digit planes W_q = 256*W_hi + W_lo with W_lo in
[-128, 127] and W_hi in [-127, 127] (``field.split_int16``, stacked into one int8 GEMM of inner
dimension 2n: ``field``'s "int16 weights"); that needs |W_q| <= 127*256 + 127 = 32639, which is
why the int16 grid stops there instead of at 32767.  The bound: 2*n*32639*32767 < 2^47 for every
n <= 2^16, so with p < 2^48 (``field.MAX_P``) int16 weights with 16-bit activations fit every layer
width the field GEMM takes (the prime is about 2^37 + log2(n) bits; int8 weights keep p < 2^40 and
the 5-limb GEMM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch

from slip_vllm.core.field import (
    INT16_QMAX, MAX_N, MAX_P, FieldWeight, choose_prime, field_matmul, min_modulus, split_int16,
)
from slip_vllm.core.lock import GemmLock

__all__ = [
    "WEIGHT_QMAX",
    "DEFAULT_ACT_BITS",
    "act_qmax",
    "QuantizedWeight",
    "quantize_weight",
    "quantize_activations",
    "centered_lift",
    "dequantize",
    "LOW_RANK_DTYPE",
    "LowRankFactors",
    "as_low_rank",
    "low_rank_term",
    "required_modulus",
    "select_prime",
    "check_prime",
    "PublicWeight",
    "shielded_linear_reference_int",
    "shielded_linear_reference",
]

WEIGHT_QMAX = {8: 127, 16: INT16_QMAX}  # int16 stops at 32639: see "int16 weights" above
DEFAULT_ACT_BITS = 16

LowRank = Tuple[torch.Tensor, torch.Tensor]  # (left [m, k], right [k, n]): W_C = left @ right (one part)


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


# ---------------------------------------------------------------------------------------------
# the secret low-rank term W_C x
# ---------------------------------------------------------------------------------------------

LOW_RANK_DTYPE = torch.float32  # the compute precision of W_C x: see "Precision of W_C x" above


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``LOW_RANK_DTYPE`` copy of t in new (allocator-aligned) storage."""
    out = torch.empty(tuple(t.shape), dtype=LOW_RANK_DTYPE)
    out.copy_(t.detach())
    return out


class LowRankFactors:
    """W_C = blockdiag(left_1, ..., left_P) @ right of one (fused) protected linear, held in
    ``LOW_RANK_DTYPE`` (converted once, here).

    right [K, n] stacks the right factors of the P fused parts (q, k, v or gate, up; P = 1 for an
    unfused layer); part i owns output rows ``rows[i]`` = (r0, r1) and columns ``cols[i]`` = (c0, c1)
    of the stack, and its left factor ``lefts[i]`` is [r1 - r0, c1 - c0].  ``apply(x)`` is then one
    [T, n] x [n, K] product followed by one small product per part written into its output rows,
    instead of a product with a dense, mostly zero [m, K] left factor.  ``dense_left()`` rebuilds
    the dense block-diagonal left factor (the secret bundle's on-disk form).

    The factors, and x in ``apply``, are copied into freshly allocated storage: BLAS results can
    depend on the operands' memory alignment (measured: a one-row product differs in its last bit
    between a factor read in place from a safetensors buffer, at a 40-byte offset, and an aligned
    copy), and a bundle's factors must give what the checkpoint's give, bit for bit.
    """

    def __init__(self, lefts: Sequence[torch.Tensor], right: torch.Tensor,
                 cols: Optional[Sequence[Tuple[int, int]]] = None):
        if not isinstance(right, torch.Tensor) or right.dim() != 2:
            raise ValueError("right must be a 2-D tensor [K, n]")
        if not lefts or any(not isinstance(l, torch.Tensor) or l.dim() != 2 for l in lefts):
            raise ValueError("lefts must be one or more 2-D tensors [m_i, k_i]")
        if cols is None:
            bounds, c = [], 0
            for left in lefts:
                bounds.append((c, c + int(left.shape[1])))
                c += int(left.shape[1])
            cols = bounds
        cols = tuple((int(a), int(b)) for a, b in cols)
        k = int(right.shape[0])
        if len(cols) != len(lefts) or cols[0][0] != 0 or cols[-1][1] != k or any(
                a > b for a, b in cols) or any(cols[i][1] != cols[i + 1][0] for i in range(len(cols) - 1)):
            raise ValueError(f"the parts' columns {cols} do not tile the {k} rows of right")
        if any(int(l.shape[1]) != b - a for l, (a, b) in zip(lefts, cols)):
            raise ValueError("a left block's width differs from its column range")
        rows, r = [], 0
        for left in lefts:
            rows.append((r, r + int(left.shape[0])))
            r += int(left.shape[0])
        self.lefts = tuple(_fresh(l) for l in lefts)
        self.right = _fresh(right)
        self.rows, self.cols = tuple(rows), cols
        self.m, self.n, self.rank = r, int(right.shape[1]), k

    @classmethod
    def block_diagonal(cls, left: torch.Tensor, right: torch.Tensor, parts: Sequence[int]) -> "LowRankFactors":
        """From a dense left [m, K] that is block diagonal over the fused parts (output sizes
        ``parts``, in order) and the stacked right [K, n].

        The column range of each part is read off the zero pattern: part i ends after its last
        column with a nonzero entry (at least where part i - 1 ended; the last part ends at K).  A
        nonzero entry outside the blocks so found raises ValueError.  Because the ranges come from
        the values alone, the same dense left always gives the same blocks, which is what makes
        ``from_bundle`` (dense left on disk) and ``from_checkpoint`` bit-identical; an all-zero
        column at a boundary (a zero secret direction) is simply counted in the next part, where it
        adds nothing.
        """
        parts = [int(x) for x in parts]
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0] or sum(parts) != left.shape[0]:
            raise ValueError(f"left {tuple(left.shape)} / right {tuple(right.shape)} do not fit the parts {parts}")
        k = int(left.shape[1])
        lefts, cols, r0, c0 = [], [], 0, 0
        for i, mi in enumerate(parts):
            block = left[r0:r0 + mi]
            nz = torch.nonzero(block.ne(0).any(dim=0)).flatten()
            if nz.numel() and int(nz[0]) < c0:
                raise ValueError(f"part {i} (rows {r0}:{r0 + mi}) has nonzero entries left of its block: "
                                 "the left factor is not block diagonal over the parts")
            c1 = k if i == len(parts) - 1 else max(c0, int(nz[-1]) + 1 if nz.numel() else c0)
            lefts.append(block[:, c0:c1])
            cols.append((c0, c1))
            r0, c0 = r0 + mi, c1
        return cls(lefts, right, cols)

    def dense_left(self) -> torch.Tensor:
        """The block-diagonal left factor [m, K] (float32), built on demand."""
        out = torch.zeros(self.m, self.rank, dtype=LOW_RANK_DTYPE)
        for left, (r0, r1), (c0, c1) in zip(self.lefts, self.rows, self.cols):
            out[r0:r1, c0:c1] = left
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """W_C x for x [T, n]: float32 [T, m]."""
        if x.dim() != 2 or x.shape[1] != self.n:
            raise ValueError(f"x must be [T, {self.n}]")
        z = _fresh(x) @ self.right.t()                                # [T, K]
        if len(self.lefts) == 1:
            return z @ self.lefts[0].t()
        out = torch.empty(int(x.shape[0]), self.m, dtype=LOW_RANK_DTYPE)
        for left, (r0, r1), (c0, c1) in zip(self.lefts, self.rows, self.cols):
            out[:, r0:r1] = z[:, c0:c1] @ left.t()
        return out


def as_low_rank(low_rank: Union[LowRank, LowRankFactors]) -> LowRankFactors:
    """A ``LowRankFactors`` as is; a pair (left [m, k], right [k, n]) as one part (converted now)."""
    if isinstance(low_rank, LowRankFactors):
        return low_rank
    left, right = low_rank
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
        raise ValueError("low-rank factors must be left [m, k] and right [k, n]")
    return LowRankFactors([left], right)


def low_rank_term(x: torch.Tensor, low_rank: Union[LowRank, LowRankFactors]) -> torch.Tensor:
    """W_C x (x [T, n]) in ``LOW_RANK_DTYPE``: float32 [T, m].  Pass a ``LowRankFactors`` built once;
    a (left, right) pair is converted on every call."""
    return as_low_rank(low_rank).apply(x)


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
    """The smallest prime p above every layer's bound; ValueError if none exists below 2^48.

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
                f"{act_qmax(act_bits)} = {bound} is not below 2^48; no prime p < 2^48 works "
                f"(use int8 weights or fewer activation bits)")
        if bound > worst:
            worst_name, worst = name, bound
    try:
        return choose_prime(worst)
    except ValueError as exc:
        raise ValueError(f"layer {worst_name!r}: {exc}") from None


def check_prime(p: int, layers: Union[Mapping[str, LayerSpec], Iterable[LayerSpec]],
                act_bits: int = DEFAULT_ACT_BITS) -> None:
    """Raise ValueError unless p is a prime below 2^48 above every layer's bound (protect/load time)."""
    from slip_vllm.core.field import is_prime

    if isinstance(p, bool) or not isinstance(p, int) or not 2 < p < MAX_P or not is_prime(p):
        raise ValueError(f"p={p!r} is not an odd prime below 2^48")
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


class PublicWeight:
    """A quantized public weight W_q [m, n] (int8 or int16) and p, ready for ``matmul``.

    ``matmul(x)`` = (x @ W_q^T) mod p in [0, p) for int64 x in [0, p): exactly
    ``field.field_matmul`` with the ``FieldWeight`` ``field`` (the host's whole step; an int16 W_q
    is multiplied as its two int8 digit planes inside it).  The service uses the same object for
    the mask images W_q r and the Freivalds keys.
    """

    def __init__(self, w_q: torch.Tensor, p: int):
        if not isinstance(w_q, torch.Tensor) or w_q.dim() != 2 or w_q.dtype not in (torch.int8, torch.int16):
            raise TypeError("w_q must be a 2-D int8 or int16 tensor [m, n]")
        self.w_q = w_q.contiguous()
        self.p = p
        self.m, self.n = (int(s) for s in w_q.shape)
        self.bits = 8 if w_q.dtype == torch.int8 else 16
        self.field = FieldWeight(self.w_q, p)
        self._planes = (self.field,)
        self.max_abs = int(self.w_q.abs().max()) if self.w_q.numel() else 0

    @property
    def shape(self) -> Tuple[int, int]:
        return self.m, self.n

    def transposed(self) -> "PublicWeight":
        """W_q^T as a PublicWeight (for u^T W_q = (W_q^T u)^T)."""
        return PublicWeight(self.w_q.t().contiguous(), self.p)

    def matmul(self, x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
        return field_matmul(x, self.field, self.p, backend=backend)


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
                              act_bits: int = DEFAULT_ACT_BITS,
                              low_rank: Optional[Union[LowRank, LowRankFactors]] = None,
                              bias: Optional[torch.Tensor] = None,
                              out_dtype: torch.dtype = torch.float32,
                              lock: Optional["GemmLock"] = None) -> torch.Tensor:
    """The fixed-point specification of one protected linear, y ~= x @ (W_C + W_D)^T + b.

    y = dequantize(W_q x_q) [+ W_C x] [+ b] in float64, with W_C x computed by ``low_rank_term`` in
    float32 (see "Precision of W_C x"), cast to ``out_dtype`` at the end.  The masked protocol
    (``secure_service.shielded_linear``) must return the same integers y_q and, running the same
    float steps on them, the same floats bit for bit.

    lock (``slip_vllm.core.lock.GemmLock``; W_q, w_scale are then those of the locked weight
    quant(M_out W_D M_in)): x_q = quantize(lock_input(x)), and the dequantized product is unlocked
    (y' @ M_out, float64) before W_C x (of the plain x) and b are added.
    """
    y_q, x_scale = shielded_linear_reference_int(x_float if lock is None else lock.lock_input(x_float), w_q, p,
                                                 act_bits)
    y = dequantize(y_q, w_scale, x_scale)
    if lock is not None:
        y = lock.unlock_output(y)
    if low_rank is not None:
        y = y + low_rank_term(x_float, low_rank).to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)[None, :]
    return y.to(out_dtype)
