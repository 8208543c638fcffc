"""Prime-field arithmetic for protocol ``shielded``: primes and the exact mod-p GEMM.

What this module owns
---------------------
* ``is_prime`` (deterministic Miller-Rabin) and ``choose_prime`` (the smallest prime above a
  bound, below ``MAX_P`` = 2^48), plus ``min_modulus`` (the bound 2*n*max|W_q|*max|x_q| of the brief);
* ``field_matmul(x_masked, w_q, p)``: ``(x_masked @ w_q.T) mod p`` in [0, p), exact, on the device
  of the inputs, with one backend per device, for int8 and int16 weights;
* ``FieldWeight``: a weight prepared once (packed / transposed per backend, plus a per-channel
  correction vector), because the host multiplies the same weight at every step;
* ``split_int16``: the two balanced int8 digit planes of an int16 weight;
* ``select_cpu_backend``: which exact CPU backend to use on this machine, by measurement (used by
  the host's GEMMs and the service's mask precompute alike).

Where it runs and what it holds
-------------------------------
This code is the host's half of ``shielded``: it runs on the untrusted host (vLLM's process, the
GPU).  It sees only public data: the int8/int16 weight W_q (public by the protocol's threat model;
the per-channel scales stay with the service and are not needed here), the public prime p, and
masked activations X~ that are uniform in Z_p.  It holds no secret and needs none; nothing here
may ever receive a mask r, the Freivalds vector u or an unmasked activation.

Exactness argument (read this before the code)
----------------------------------------------
Inputs: 0 <= x < p < MAX_P = 2^48; every GEMM the backends run has int8 weights w in [-128, 127]
(so |w| <= 2^7) and an inner dimension K <= MAX_N = 2^16.

int16 weights.  W (|W| <= 32639) is written as balanced base-256 digits W = 256*W_hi + W_lo with
W_lo in [-128, 127] and W_hi in [-127, 127] (``split_int16``; 127*256 + 127 = 32639 is why the
int16 grid stops there).  For n <= MAX_N / 2 the planes are stacked along the inner dimension,
W8 = [W_hi | W_lo] (int8 [m, 2n]), and multiplied with x' = [(256 x) mod p | x] (each entry in
[0, p); 256 x < 2^56 in int64): W8 x' = W_hi (256 x mod p) + W_lo x == W x (mod p), one int8-limb
GEMM with K = 2n <= 2^16 that reads 2 bytes per weight and needs no output combination.  A wider
int16 layer (n > 2^15) keeps the planes as two FieldWeights (K = n each) and combines
(256 (W_hi x mod p) + (W_lo x mod p)) mod p, < 2^56 + 2^48 in int64.  Everything below is about
one int8 GEMM with K <= 2^16.

* ``reference``: Python big integers on the original (int8 or int16) W; exact by construction
  (tests only).
* ``cpu_int8``, ``naive_int8`` and ``triton`` (CUDA) use balanced base-256 digits.  With
  L = ceil(bits(p-1)/8) <= 6 limbs, write the bytes of x as b_j in [0, 256) and d_j = b_j - 128 in
  [-128, 127] (the int8 reinterpretation of b_j XOR 0x80).  Then x = sum_j 256^j d_j + c_L with
  c_L = 128*sum_j 256^j, so
      W x = sum_j 256^j (W d_j) + c_L * rowsum(W).
  - each limb product acc_j = W d_j is an int8 x int8 GEMM with int32 accumulation: every term has
    |w*d| <= 2^14, so every partial sum, in any order, has |.| <= K*2^14 <= 2^30 < 2^31: no int32
    overflow, whatever order the library or the tensor cores add in;
  - the limbs are recombined in int64 by Horner's rule from the top limb, t <- 256 t + acc_j.
    For L <= 5 (p <= 2^40) no reduction is needed: |t| <= 2^30 (256^5 - 1)/255 < 2^62.01 < 2^63
    (with split-K, the partial recombinations of disjoint K ranges add up to the same bounded
    total).  For L = 6 (2^40 < p < 2^48) the value after limbs 5..1 is the same bounded t
    (< 2^62.01); it is reduced mod p to [0, p) once, then 256 t + acc_0 < 2^56 + 2^30 (on CUDA
    with split-K each split is reduced this way and the finalizer adds at most 2^15 values below
    2^48).  So the 8-bit path for p < 2^40 runs exactly the code it ran before, and a larger p
    costs one more limb product and one reduction;
  - the correction c_L*rowsum(W) mod p is precomputed per output channel (|rowsum| <= 2^23; c_L mod
    p is taken in 12-bit digits by Horner's rule, r <- (r*2^12 + rowsum*c_k) mod p, so no int64
    value exceeds 2^60 + 2^35), then one reduction mod p maps the result to [0, p): on CPU an
    integer ``torch.remainder``; in the CUDA epilogue two float64 quotient estimates q (they only
    choose q) with the remainder t - q*p computed exactly in int64 (|q*p| <= |t|(1 + 2^-50) + p
    < 2^63), then exact compare-and-add fix-ups from (-2p, 2p) into [0, p), so rounding in the
    estimate can never change the result.
* ``f64`` (any device): for p <= 2^40, x = a + 2^20 b with a, b in [0, 2^20): every partial sum of
  the two float64 GEMMs has |.| <= K * 2^7 * (2^20 - 1) < 2^43 < 2^53, so each is exact in float64
  whatever the summation order; (A mod p) + ((B mod p) << 20) < 2^61 in int64.  For p > 2^40,
  x = a + 2^24 b with a, b in [0, 2^24): partial sums < K * 2^7 * 2^24 = 2^47 < 2^53, still exact;
  (B mod p) * 2^24 is formed in two steps of 2^12, each reduced mod p (< 2^60).
  The brief's worst layer, n = 2^16 with 16-bit weights and activations, needs p > 2^47 - 2^33:
  below MAX_P, so every layer width up to MAX_N fits at 16 bits.

The bounds need n <= 2^16 (the largest Llama-family inner dimension is 53248); larger n raises.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field as _dc_field
from typing import Callable, Dict, Optional, Tuple, Union

import torch

__all__ = [
    "MAX_P",
    "MAX_N",
    "is_prime",
    "choose_prime",
    "min_modulus",
    "limb_count",
    "split_int16",
    "FieldWeight",
    "field_matmul",
    "field_matmul_reference",
    "reference_entries",
    "available_backends",
    "default_backend",
]

MAX_P = 1 << 48  # p must be below this (6 limbs; see the exactness argument)
MAX_N = 1 << 16  # inner dimension bound of the exactness argument
INT16_QMAX = 127 * 256 + 127  # largest |W| of an int16 weight (two balanced int8 digits)
_P40 = 1 << 40  # up to here the limb recombination needs no intermediate reduction

# ---------------------------------------------------------------------------------------------
# primes
# ---------------------------------------------------------------------------------------------

_SMALL_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
# Miller-Rabin with the first 13 primes as bases is deterministic for n < 3.317e24 (Sorenson and
# Webster 2015); 2^48 is far inside.
_MR_DETERMINISTIC_LIMIT = 3317044064679887385961981


def is_prime(n: int) -> bool:
    """Deterministic primality test (Miller-Rabin with fixed bases) for 0 <= n < 3.3e24."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"is_prime expects an int, got {type(n).__name__}")
    if n < 2:
        return False
    if n >= _MR_DETERMINISTIC_LIMIT:
        raise ValueError("is_prime is deterministic only below 3.317e24")
    for q in _SMALL_PRIMES:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _SMALL_PRIMES:
        y = pow(a, d, n)
        if y == 1 or y == n - 1:
            continue
        for _ in range(s - 1):
            y = y * y % n
            if y == n - 1:
                break
        else:
            return False
    return True


def choose_prime(bound: int) -> int:
    """The smallest prime p > bound; raises ValueError if p would not be below MAX_P = 2^48."""
    if isinstance(bound, bool) or not isinstance(bound, int):
        raise TypeError(f"choose_prime expects an int bound, got {type(bound).__name__}")
    if bound < 1:
        bound = 1
    if bound >= MAX_P - 1:
        raise ValueError(f"no prime above {bound} below 2^48: the field GEMM supports p < 2^48")
    c = bound + 1
    if c > 2 and c % 2 == 0:
        c += 1
    while c < MAX_P:
        if is_prime(c):
            return c
        c += 1 if c == 2 else 2
    raise ValueError(f"no prime above {bound} below 2^48: the field GEMM supports p < 2^48")


def min_modulus(n: int, max_abs_w: int, max_abs_x: int) -> int:
    """2*n*max|W_q|*max|x_q|: p must exceed this so the centered lift of W_q x_q is exact."""
    if min(n, max_abs_w, max_abs_x) < 0:
        raise ValueError("min_modulus takes non-negative sizes and magnitudes")
    return 2 * int(n) * int(max_abs_w) * int(max_abs_x)


def limb_count(p: int) -> int:
    """Number of 8-bit limbs that hold every element of Z_p (1..5 for p <= 2^40, 6 below 2^48)."""
    return max(1, ((int(p) - 1).bit_length() + 7) // 8)


def _check_p(p: int, *, primality: bool = True) -> int:
    if isinstance(p, bool) or not isinstance(p, int):
        raise TypeError(f"p must be an int, got {type(p).__name__}")
    if not 2 <= p < MAX_P:
        raise ValueError(f"p={p} out of range: need 2 <= p < 2^48")
    if primality and not is_prime(p):
        raise ValueError(f"p={p} is not prime")
    return p


# ---------------------------------------------------------------------------------------------
# prepared weight
# ---------------------------------------------------------------------------------------------


def _mod_mul_small(a: torch.Tensor, c: int, p: int) -> torch.Tensor:
    """(a * c) mod p in [0, p) for int64 a with |a| < 2^23 and 0 <= c < p < 2^48, without overflow:
    Horner's rule over the 12-bit digits c_k of c, r <- (r*2^12 + a*c_k) mod p (< 2^60 + 2^35)."""
    digits = []
    while True:
        digits.append(c & 0xFFF)
        c >>= 12
        if not c:
            break
    r = torch.remainder(a * digits[-1], p)
    for ck in reversed(digits[:-1]):
        r = torch.remainder(r * (1 << 12) + a * ck, p)
    return r


def split_int16(w_q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """int16 W with |W| <= 32639 -> int8 (hi, lo), W = 256*hi + lo, lo in [-128, 127], hi in [-127, 127]."""
    if not isinstance(w_q, torch.Tensor) or w_q.dtype != torch.int16:
        raise TypeError("split_int16 expects int16")
    w = w_q.to(torch.int32)
    if w.numel() and int(w.abs().max()) > INT16_QMAX:
        raise ValueError(f"int16 weights must satisfy |w| <= {INT16_QMAX}")
    lo = ((w + 128) & 255) - 128
    hi = (w - lo) >> 8  # exact: w - lo is a multiple of 256
    return hi.to(torch.int8).contiguous(), lo.to(torch.int8).contiguous()


@dataclass
class FieldWeight:
    """An int8 or int16 weight W_q [m, n] and a prime p, prepared once for repeated ``field_matmul``.

    Holds the int8 matrix the backends multiply (``w8``: W_q itself for int8; for int16 the stacked
    digit planes [W_hi | W_lo], [m, 2n], or, for n > MAX_N / 2, two int8 FieldWeights in ``parts``;
    see "int16 weights" in the module docstring), the per-channel correction (c_L * rowsum(w8))
    mod p of the balanced-limb backends, and caches each backend's packed form of ``w8`` (e.g. the
    transposed copy that the CPU int8 GEMM reads fastest, or the float64 copy of the ``f64``
    backend) on first use.  ``w_q``, ``m``, ``n``, ``p``, ``L`` and ``matmul`` mean what they did
    for int8 weights; ``bits`` (8 or 16) and ``k`` (the inner dimension of the int8 GEMM) are added.
    """

    w_q: torch.Tensor
    p: int
    _cache: Dict[str, object] = _dc_field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _check_p(self.p)
        w = self.w_q
        if not isinstance(w, torch.Tensor) or w.dtype not in (torch.int8, torch.int16) or w.dim() != 2:
            raise TypeError("w_q must be a 2-D torch.int8 or torch.int16 tensor [m, n]")
        if w.shape[1] > MAX_N:
            raise ValueError(f"inner dimension n={w.shape[1]} exceeds MAX_N={MAX_N}")
        self.w_q = w.contiguous()
        self.m, self.n = (int(s) for s in w.shape)
        self.bits = 8 if w.dtype == torch.int8 else 16
        self.L = limb_count(self.p)
        self.device = w.device
        self.parts: Optional[Tuple["FieldWeight", "FieldWeight"]] = None
        self.w8: Optional[torch.Tensor] = None
        self.offset: Optional[torch.Tensor] = None
        if self.bits == 8:
            self.w8 = self.w_q
        else:
            hi, lo = split_int16(self.w_q)
            if 2 * self.n <= MAX_N:
                self.w8 = torch.cat([hi, lo], dim=1).contiguous()  # [m, 2n]
            else:
                self.parts = (FieldWeight(hi, self.p), FieldWeight(lo, self.p))
        self.k = int(self.w8.shape[1]) if self.w8 is not None else self.n
        if self.w8 is not None:
            rowsum = self.w8.sum(dim=1, dtype=torch.int64)  # |.| <= 2^23
            c_l = (128 * sum(256**j for j in range(self.L))) % self.p
            self.offset = _mod_mul_small(rowsum, c_l, self.p)  # int64 [m], in [0, p)

    def packed(self, key: str, make: Callable[[], object]) -> object:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def matmul(self, x_masked: torch.Tensor, *, backend: Optional[str] = None, **kw) -> torch.Tensor:
        return field_matmul(x_masked, self, self.p, backend=backend, **kw)


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------


def field_matmul_reference(x_masked: torch.Tensor, w_q: torch.Tensor, p: int) -> torch.Tensor:
    """Pure-Python big-integer reference (slow: tests only). Returns int64 [T, m] on x's device."""
    xs = x_masked.detach().cpu().tolist()
    ws = w_q.detach().cpu().tolist()
    out = [[sum(a * b for a, b in zip(xr, wr)) % p for wr in ws] for xr in xs]
    return torch.tensor(out, dtype=torch.int64).reshape(len(xs), len(ws)).to(x_masked.device)


def reference_entries(x_masked: torch.Tensor, w_q: torch.Tensor, p: int, rows, cols) -> list:
    """Big-integer values of selected output entries (rows[i], cols[i]): for spot checks."""
    out = []
    for t, i in zip(rows, cols):
        xr = x_masked[int(t)].detach().cpu().tolist()
        wr = w_q[int(i)].detach().cpu().tolist()
        out.append(sum(a * b for a, b in zip(xr, wr)) % p)
    return out


def _balanced_limbs(x: torch.Tensor, L: int) -> torch.Tensor:
    """int64 [T, n] in [0, 256^L) -> int8 [L, T, n], limb j = byte_j(x) - 128."""
    T, n = x.shape
    if sys.byteorder == "little" and not x.is_cuda:
        # byte j of every element, copied into plane j (a fresh buffer: x is never written),
        # then XOR 0x80 turns byte b into the int8 b - 128
        xb = x.contiguous().view(torch.uint8).view(T, n, 8)
        out = torch.empty((L, T, n), dtype=torch.uint8)
        for j in range(L):
            out[j].copy_(xb[:, :, j])
        return out.bitwise_xor_(0x80).view(torch.int8)
    return torch.stack([(((x >> (8 * j)) & 255) - 128).to(torch.int8) for j in range(L)])


def _recombine(acc: torch.Tensor, offset: torch.Tensor, p: int) -> torch.Tensor:
    """acc int32 [L, T, m] of limb products -> (sum_j 256^j acc_j + offset) mod p, int64 [T, m]."""
    L = acc.shape[0]
    tot = acc[L - 1].to(torch.int64)
    for j in range(L - 2, -1, -1):  # Horner; every intermediate is within the final bound
        if j == 0 and L == 6:  # 6 limbs: |tot| < 2^62.01 here, reduce once (the module docstring)
            torch.remainder(tot, p, out=tot)
        torch.add(acc[j], tot, alpha=256, out=tot)
    tot.add_(offset)
    return torch.remainder(tot, p, out=tot)  # few passes: each parallel op costs on a busy box


def _cpu_int8(x: torch.Tensor, fw: FieldWeight) -> torch.Tensor:
    T = x.shape[0]
    wt = fw.packed("cpu_int8", lambda: fw.w8.t().contiguous())  # [k, m]
    limbs = _balanced_limbs(x, fw.L).view(fw.L * T, fw.k)
    acc = torch._int_mm(limbs, wt).view(fw.L, T, fw.m)  # one GEMM: W read once for all limbs
    return _recombine(acc, fw.offset, fw.p)


def _naive_int8(x: torch.Tensor, fw: FieldWeight) -> torch.Tensor:
    """Baseline: one library int8 GEMM per limb + int64 element-wise work."""
    T, n, m = x.shape[0], fw.k, fw.m
    wt = fw.w8.t()  # column-major view of W^T: the layout cuBLAS int8 wants
    Tp, n_p, m_p = T, n, m
    if x.is_cuda:  # torch._int_mm on CUDA: more than 16 rows, inner and output sizes multiples of 8
        Tp, n_p, m_p = max(32, -(-T // 8) * 8), -(-n // 8) * 8, -(-m // 8) * 8
        if (n_p, m_p) != (n, m):
            wt = torch.nn.functional.pad(fw.w8, (0, n_p - n, 0, m_p - m)).t()
    tot = torch.zeros((T, m), dtype=torch.int64, device=x.device)
    for j in range(fw.L - 1, -1, -1):  # Horner from the top limb, as ``_recombine``
        limb = (((x >> (8 * j)) & 255) - 128).to(torch.int8)
        if (Tp, n_p) != (T, n):
            limb = torch.nn.functional.pad(limb, (0, n_p - n, 0, Tp - T))
        acc = torch._int_mm(limb, wt)[:T, :m]
        if j == 0 and fw.L == 6:
            tot = torch.remainder(tot, fw.p)
        tot = tot * 256 + acc.to(torch.int64)
    return torch.remainder(tot + fw.offset, fw.p)


def _f64(x: torch.Tensor, fw: FieldWeight) -> torch.Tensor:
    T = x.shape[0]
    wt = fw.packed("f64", lambda: fw.w8.t().to(torch.float64).contiguous())  # [k, m]
    if fw.p <= _P40:
        a = torch.cat([x & ((1 << 20) - 1), x >> 20]).to(torch.float64)  # [2T, k], limbs < 2^20
        prod = torch.matmul(a, wt).to(torch.int64)  # exact: |partial| < 2^43
        lo = torch.remainder(prod[:T], fw.p)
        hi = torch.remainder(prod[T:], fw.p)
        return torch.remainder(lo + (hi << 20), fw.p)
    a = torch.cat([x & ((1 << 24) - 1), x >> 24]).to(torch.float64)  # [2T, k], limbs < 2^24
    prod = torch.matmul(a, wt).to(torch.int64)  # exact: |partial| < 2^47
    lo = torch.remainder(prod[:T], fw.p)
    hi = torch.remainder(prod[T:], fw.p)
    hi = torch.remainder(hi << 12, fw.p)  # (hi * 2^24) mod p in two steps, each < 2^60
    return torch.remainder(lo + torch.remainder(hi << 12, fw.p), fw.p)


def _triton(x: torch.Tensor, fw: FieldWeight, **kw) -> torch.Tensor:
    from slip_vllm.core import field_kernels_cuda as fk  # lazy: CPU machines never import triton

    return fk.field_matmul_triton(x, fw, **kw)


def _reference(x: torch.Tensor, fw: FieldWeight) -> torch.Tensor:
    return field_matmul_reference(x, fw.w_q, fw.p)  # the original int8/int16 W, not its planes


_BACKENDS: Dict[str, Callable[..., torch.Tensor]] = {
    "reference": _reference,
    "cpu_int8": _cpu_int8,
    "naive_int8": _naive_int8,
    "f64": _f64,
    "triton": _triton,
}


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available()


def available_backends(device: Union[str, torch.device]) -> list:
    dev = torch.device(device)
    if dev.type == "cuda":
        names = ["naive_int8", "f64", "reference"]
        return (["triton"] if _triton_available() else []) + names
    return ["cpu_int8", "naive_int8", "f64", "reference"]


def default_backend(device: Union[str, torch.device]) -> str:
    """Fastest exact backend for the device (measured: see docs/BENCHMARKS.md)."""
    return available_backends(device)[0]


def field_matmul(
    x_masked: torch.Tensor,
    w_q: Union[torch.Tensor, FieldWeight],
    p: int,
    *,
    backend: Optional[str] = None,
    validate: bool = False,
    **backend_kw,
) -> torch.Tensor:
    """``(x_masked @ w_q.T) mod p`` in [0, p), exact.

    x_masked: int64 [T, n] (or [n]) with values in [0, p); w_q: int8 or int16 [m, n] (|w| <= 32639)
    or a ``FieldWeight`` prepared for the same p; both on one device.  Returns int64 [T, m] (or [m])
    on that device.  backend: None picks by device (CUDA: the Triton kernel, one int8 tensor-core
    product per limb with W read once and mod p in its epilogue; CPU: one int8 GEMM over the
    stacked limbs); "reference", "cpu_int8", "naive_int8", "f64", "triton" force one.  An int16
    weight is multiplied as its stacked digit planes (module docstring, "int16 weights") by the same
    backends.  validate=True also checks the value range of x (costs a device sync).
    """
    fw = w_q if isinstance(w_q, FieldWeight) else FieldWeight(w_q, p)
    if fw.p != p:
        raise ValueError(f"FieldWeight was prepared for p={fw.p}, called with p={p}")
    if not isinstance(x_masked, torch.Tensor) or x_masked.dtype != torch.int64:
        raise TypeError("x_masked must be a torch.int64 tensor")
    squeeze = x_masked.dim() == 1
    x = x_masked.unsqueeze(0) if squeeze else x_masked
    if x.dim() != 2 or x.shape[1] != fw.n:
        raise ValueError(f"x_masked must be [T, {fw.n}], got {tuple(x_masked.shape)}")
    if x.device != fw.w_q.device:
        raise ValueError(f"x_masked on {x.device} but weight on {fw.w_q.device}")
    if validate and x.numel() and (int(x.min()) < 0 or int(x.max()) >= p):
        raise ValueError("x_masked has values outside [0, p)")
    name = backend or default_backend(x.device)
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(_BACKENDS)}")
    if name == "triton" and not x.is_cuda:
        raise ValueError("backend 'triton' needs CUDA tensors")
    if name == "cpu_int8" and x.is_cuda:
        raise ValueError("backend 'cpu_int8' needs CPU tensors")
    if x.shape[0] == 0:
        out = torch.empty((0, fw.m), dtype=torch.int64, device=x.device)
    elif name == "reference":
        out = _reference(x, fw)
    elif fw.parts is not None:  # a wide int16 layer: two int8 planes, (256 hi + lo) mod p
        hi = field_matmul(x, fw.parts[0], p, backend=name, **backend_kw)
        lo = field_matmul(x, fw.parts[1], p, backend=name, **backend_kw)
        out = torch.remainder(hi * 256 + lo, p)  # < 2^56 + 2^48
    else:
        x = x.contiguous()
        if fw.bits == 16:  # x' = [(256 x) mod p | x] for the stacked planes [W_hi | W_lo]
            x = torch.cat([torch.remainder(x * 256, p), x], dim=1)
        out = _BACKENDS[name](x, fw, **backend_kw) if backend_kw else _BACKENDS[name](x, fw)
    return out[0] if squeeze else out


# ---------------------------------------------------------------------------------------------
# which exact CPU backend is fastest here (measured, because it differs by up to 100x)
# ---------------------------------------------------------------------------------------------

_PROBE_SHAPE = (1024, 1024)  # (m, n) of the probe weight
_PROBE_ROWS = (4, 64)        # stage 1 (every candidate) and stage 2 (the survivors) batch rows
_PROBE_KEEP = 4.0            # stage 1 keeps the candidates at most this many times slower than the best


def _physical_memory_bytes() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=8)
def measured_cpu_backends(limbs: int) -> Tuple[Tuple[str, float], ...]:
    """((backend, rows/s), ...) of the exact CPU backends for a random int8 1024 x 1024 probe,
    fastest first; measured once per process and limb count (the int8 limb backends' cost grows
    with the 8-bit limbs of p; ``f64`` always uses two limbs), with the smallest prime of that
    many limbs.  Measured on this repository's machines: ``f64`` wins on an AVX2-only AMD EPYC
    (whose int8 GEMM has no VNNI: 10-100x slower), ``cpu_int8`` on a Xeon with AVX512-VNNI/AMX (2-4x
    faster than ``f64``); so the choice is made on the machine that computes.

    Stage 1 times every candidate on 4 rows (after one warm-up call, which also builds its packed
    copy of W); stage 2 times the candidates within 4x of the best on 64 rows (best of two).  The
    probe's rows come from a seeded non-cryptographic generator: they are only timed, never used.
    """
    p = choose_prime(256 ** (limbs - 1))
    g = torch.Generator().manual_seed(0)
    m, n = _PROBE_SHAPE
    fw = FieldWeight(torch.randint(-127, 128, (m, n), generator=g, dtype=torch.int8), p)
    x = torch.randint(0, p, (_PROBE_ROWS[-1], n), generator=g, dtype=torch.int64)
    candidates = [b for b in available_backends("cpu") if b != "reference"]

    def rate(backend: str, rows: int, reps: int) -> float:
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fw.matmul(x[:rows], backend=backend)
            best = min(best, time.perf_counter() - t0)
        return rows / max(best, 1e-9)

    stage1 = {}
    for b in candidates:
        fw.matmul(x[:1], backend=b)  # warm-up: packed copies, kernels
        stage1[b] = rate(b, _PROBE_ROWS[0], 1)
    top = max(stage1.values())
    stage2 = {b: rate(b, _PROBE_ROWS[1], 2) for b, r in stage1.items() if r * _PROBE_KEEP >= top}
    ranked = sorted(stage2.items(), key=lambda kv: -kv[1]) + sorted(
        ((b, r) for b, r in stage1.items() if b not in stage2), key=lambda kv: -kv[1])
    return tuple(ranked)


def select_cpu_backend(limbs: int, f64_bytes: int, requested: str = "auto") -> Tuple[str, str]:
    """(backend, why) for exact CPU field GEMMs with this many limbs of p.

    requested: a backend of ``available_backends("cpu")`` (used as is) or "auto": the fastest by
    ``measured_cpu_backends``, except that ``f64`` is skipped when its float64 copies of the weights
    (``f64_bytes``) would exceed a quarter of the machine's physical memory.
    """
    names = [b for b in available_backends("cpu") if b != "reference"]
    if requested != "auto":
        if requested not in names + ["reference"]:
            raise ValueError(f"unknown CPU field backend {requested!r}; known: auto, {', '.join(names)}")
        return requested, "requested"
    ranked = measured_cpu_backends(limbs)
    phys = _physical_memory_bytes()
    skipped = ""
    for backend, _ in ranked:
        if backend == "f64" and phys is not None and 4 * f64_bytes > phys:
            skipped = f"; f64 skipped: its float64 weight copies would take {f64_bytes / 2**30:.1f} GiB"
            continue
        probe = ", ".join(f"{b} {r:.0f}" for b, r in ranked)
        return backend, f"auto: fastest on a {_PROBE_SHAPE[0]}x{_PROBE_SHAPE[1]} probe (rows/s: {probe}){skipped}"
    return ranked[0][0], "auto: no backend fits the memory rule, fastest used"  # pragma: no cover
