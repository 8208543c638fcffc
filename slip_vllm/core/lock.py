"""The lock of protocol ``shielded``: secret invertible transforms on both sides of one public GEMM.

What this module owns
---------------------
* ``make_lock(out_features, in_features, kind, block, seed)``: the lock of one GEMM, drawn from a
  keyed CSPRNG stream (``hashlib.shake_256`` of ``seed``; the vendor passes a fresh ``os.urandom``
  key per artifact, mixed with the GEMM's name, so locks are independent per GEMM);
* ``GemmLock``: what the vendor applies to the public weight before quantization
  (``lock_weight``), what the secure service applies to the activations before quantization and
  masking (``lock_input``) and to the dequantized product afterwards (``unlock_output``), and its
  serialisation for the secret bundle (``to_tensors`` / ``from_tensors``);
* ``gemm_seed`` / ``make_locks``: one independent lock per GEMM of a model from one artifact key;
* ``parse_lock`` / ``LockSpec``: the ``--lock none|perm|block[:b]`` option.

Where it runs and what it holds
-------------------------------
vLLM-free, stateless apart from the lock's own secret (permutations and orthogonal blocks).  The
vendor uses it at protect time, the secure service per step.  The host never sees a lock: it only
holds the quantized locked weight quant(A W_D B).

Convention (row-vector activations, as in every linear of the model)
--------------------------------------------------------------------
A layer computes y = x W^T for x [T, n] and W [m, n] (out, in).  A lock is a pair of orthogonal
matrices, M_in [n, n] (input side) and M_out [m, m] (output side), and

    lock_weight(W)    = W' = M_out @ W @ M_in            (the host's weight, then quantized)
    lock_input(x)     = x' = x @ M_in                    ([T, n]; = x B^{-T} with B = M_in orthogonal)
    unlock_output(y') = y  = y' @ M_out                  ([T, m]; = y' A^{-T} with A = M_out orthogonal)

so that unlock_output(lock_input(x) @ lock_weight(W)^T) = x M_in M_in^T W^T M_out^T M_out = x W^T.
Every transform is orthogonal, so the inverse of each side is its transpose and no matrix is ever
inverted.

Kinds
-----
* ``none``: M_in = I, M_out = I (the lock of an unlocked artifact; every method returns its input).
* ``perm``: M = a uniformly random permutation matrix per side (rows and columns of W relabelled).
  Exact in every precision: lock_input / unlock_output are gathers, so a perm-locked protocol
  computes exactly the same integers and floats as the unlocked one (per-row weight scales and
  per-token activation scales are permutation invariant).
* ``block`` with block size b: M = P_1 @ blockdiag(Q_1, ..., Q_K) @ P_2 per side, P_1, P_2 random
  permutations, Q_j Haar-random orthogonal b x b (K = ceil(d / b); when b does not divide d the
  last block is a Haar-random orthogonal r x r, r = d mod b, padded with the identity).  As row
  operations: x @ M = gather(perm_1) -> per-block product -> gather(perm_2).  Costs O(b d) per row
  and side (``benchmarks/bench_lock.py``), against the m*n of a mask image W_q r.  Precision:
  ``lock_input`` is float64, because its result is quantized next: a last-bit difference (BLAS
  picks its kernel by the number of rows, so a row's bits can depend on how many rows share the
  product) would flip a 16-bit rounding now and then, a 2^-16-relative jump (measured 2.4e-5 on
  logits between two groupings of the same rows with float32 here); in float64 such a flip needs
  a tie within 2^-52.  ``unlock_output`` runs after the integers are fixed and is float32
  (``BLOCK_DTYPE``): its rounding, about sqrt(b) 2^-24 relative, is far below the 16-bit
  activations (2^-16) and int8 weights (2^-8) of the same sum, and float32 products run about
  5x faster than float64 here.  The weight is locked in float64 at protect time
  (``lock_weight``).  A block lock changes the rounding of W_D x, so it is part of the
  fixed-point specification (``quantize.shielded_linear_reference(..., lock=...)``), which calls
  the same functions.

Randomness
----------
One key per lock: K = b"slip-lock/v1" || len(seed) || seed || m || n || b || kind; its i-th piece
of randomness is shake_256(K || i) (i = 0, 1, ... in drawing order: output side, then input side).
Permutations: argsort of 64-bit words of the stream (ties, of probability < d^2 / 2^65, broken by
index: still a permutation).  Gaussians for Haar blocks: Box-Muller on 53-bit uniforms of the
stream, then QR with the signs of R's diagonal moved into Q (Mezzadri 2007), in float64.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["LOCK_KINDS", "DEFAULT_LOCK", "LockSpec", "parse_lock", "SideTransform", "GemmLock", "make_lock",
           "gemm_seed", "make_locks", "seed_lock_key"]

LOCK_KINDS = ("none", "perm", "block")
BLOCK_DTYPE = torch.float32  # the precision of unlock_output's block products (module docstring, "Kinds")
DEFAULT_LOCK = "block:32"  # see docs/BENCHMARKS.md "Lock" for the cost and quality that chose it
_DOMAIN = b"slip-lock/v1"


@dataclass(frozen=True)
class LockSpec:
    """A parsed ``--lock`` value: kind and block size (1 for ``none`` / ``perm``)."""

    kind: str
    block: int = 1

    def __str__(self) -> str:
        return f"block:{self.block}" if self.kind == "block" else self.kind


def parse_lock(text: str) -> LockSpec:
    """``none`` | ``perm`` | ``block`` | ``block:B`` (B an int >= 2; ``block`` alone means the
    default block size of ``DEFAULT_LOCK``).  ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"lock must be a string, got {text!r}")
    t = text.strip().lower()
    if t in ("none", "perm"):
        return LockSpec(t)
    m = re.fullmatch(r"block(?::(\d+))?", t)
    if not m:
        raise ValueError(f"unknown lock {text!r}: use none, perm or block[:B]")
    b = int(m.group(1)) if m.group(1) else int(DEFAULT_LOCK.split(":")[1])
    if b < 2:
        raise ValueError(f"lock block size must be >= 2, got {b}")
    return LockSpec("block", b)


# ---------------------------------------------------------------------------------------------
# randomness
# ---------------------------------------------------------------------------------------------


class _Stream:
    """Pieces of a keyed stream: the i-th ``take`` is shake_256(key || i).digest(n)."""

    def __init__(self, key: bytes):
        self._key = key
        self._i = 0

    def take(self, n: int) -> bytes:
        out = hashlib.shake_256(self._key + struct.pack("<Q", self._i)).digest(n)
        self._i += 1
        return out

    def words(self, n: int) -> np.ndarray:
        return np.frombuffer(self.take(8 * n), dtype="<u8").copy()


def _perm(stream: _Stream, d: int) -> np.ndarray:
    return np.argsort(stream.words(d), kind="stable").astype(np.int64)


def _haar(stream: _Stream, count: int, b: int) -> np.ndarray:
    """count Haar-random orthogonal b x b matrices, float64 [count, b, b]."""
    w = stream.words(count * b * b * 2)
    u = ((w >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]
    u1, u2 = u[0::2], u[1::2]
    g = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    q, r = np.linalg.qr(g.reshape(count, b, b))
    signs = np.sign(np.diagonal(r, axis1=1, axis2=2))
    signs[signs == 0] = 1.0
    return np.ascontiguousarray(q * signs[:, None, :])


# ---------------------------------------------------------------------------------------------
# one side
# ---------------------------------------------------------------------------------------------


def _inverse_perm(p: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel(), dtype=p.dtype)
    return inv


def _check_perm(p: torch.Tensor, d: int, what: str) -> torch.Tensor:
    if not isinstance(p, torch.Tensor) or p.dtype != torch.int64 or tuple(p.shape) != (d,):
        raise ValueError(f"{what} must be an int64 permutation [{d}]")
    if d and not torch.equal(torch.sort(p).values, torch.arange(d)):
        raise ValueError(f"{what} is not a permutation of 0..{d - 1}")
    return p.contiguous()


class SideTransform:
    """An orthogonal M [d, d] given as row operations: x @ M = gather(perm_in) -> blocks -> gather(perm_out).

    perm_in, perm_out: int64 [d] (x[:, perm] is x @ P with P[perm[j], j] = 1); blocks: float64
    [K, b, b] orthogonal with K * b >= d (the vector is zero-padded to K * b for the products; the
    padded coordinates of the last block must be acted on by the identity) or None (a pure
    permutation; then perm_out is the identity and is not stored).
    """

    def __init__(self, d: int, perm_in: torch.Tensor, blocks: Optional[torch.Tensor] = None,
                 perm_out: Optional[torch.Tensor] = None):
        self.d = int(d)
        self.perm_in = _check_perm(perm_in, self.d, "perm_in")
        self.perm_out = None if perm_out is None else _check_perm(perm_out, self.d, "perm_out")
        if blocks is not None:
            if blocks.dtype != torch.float64 or blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
                raise ValueError("blocks must be float64 [K, b, b]")
            k, b = int(blocks.shape[0]), int(blocks.shape[1])
            if k * b < self.d or (k - 1) * b >= self.d or not bool(torch.isfinite(blocks).all()):
                raise ValueError(f"blocks {tuple(blocks.shape)} do not tile {self.d} coordinates")
            eye = torch.eye(b, dtype=torch.float64)
            if float((blocks @ blocks.transpose(1, 2) - eye).abs().max()) > 1e-9:
                raise ValueError("blocks are not orthogonal")
            pad = k * b - self.d
            if pad and not torch.equal(blocks[-1, b - pad:, :], eye[b - pad:]):
                raise ValueError("the padded coordinates of the last block must map by the identity")
            if self.perm_out is None:
                raise ValueError("a block transform needs perm_out")
            blocks = blocks.contiguous()
        elif self.perm_out is not None:
            raise ValueError("a pure permutation has no perm_out")
        self.blocks = blocks
        self.b = 1 if blocks is None else int(blocks.shape[1])
        self._inv_in = _inverse_perm(self.perm_in)
        self._inv_out = None if self.perm_out is None else _inverse_perm(self.perm_out)
        # the products run in BLOCK_DTYPE (float32): copies of the float64 blocks, made once
        self._q = None if blocks is None else blocks.to(BLOCK_DTYPE).contiguous()
        self._q_t = None if blocks is None else blocks.transpose(1, 2).to(BLOCK_DTYPE).contiguous()
        self._blocks_t64 = None if blocks is None else blocks.transpose(1, 2).contiguous()

    @classmethod
    def draw(cls, stream: _Stream, d: int, kind: str, block: int) -> "SideTransform":
        if kind == "perm":
            return cls(d, torch.from_numpy(_perm(stream, d)))
        b = min(int(block), d) if d else 1
        k = -(-d // b) if d else 0
        blocks = np.zeros((k, b, b))
        full = d // b
        if full:
            blocks[:full] = _haar(stream, full, b)
        r = d - full * b
        if r:
            blocks[full] = np.eye(b)
            blocks[full, :r, :r] = _haar(stream, 1, r)[0]
        p_in, p_out = _perm(stream, d), _perm(stream, d)
        return cls(d, torch.from_numpy(p_in), torch.from_numpy(blocks), torch.from_numpy(p_out))

    def _chain(self, x: torch.Tensor, first: torch.Tensor, blocks_t: torch.Tensor, blocks: torch.Tensor,
               last: torch.Tensor) -> torch.Tensor:
        """gather(first) -> per-block products -> gather(last) of x [T, d], in the blocks' dtype,
        computed on the transposed layout [d, T]: both gathers take whole contiguous rows and the
        blocks multiply the contiguous [K, b, T] view (y_k^T = Q_k^T x_k^T) in one batched
        product (for T = 1 as row vectors, y_k = x_k Q_k); the only copies are the transposes in
        and out (none for T = 1).  x @ M: ``blocks_t`` = Q_k^T and ``blocks`` = Q_k (contiguous);
        x @ M^T: the other way round."""
        k, b = int(blocks_t.shape[0]), self.b
        t = int(x.shape[0])
        dtype = blocks_t.dtype
        xt = x.t().to(dtype).contiguous()
        if k * b == self.d:
            z = xt.index_select(0, first)
        else:
            z = torch.zeros(k * b, t, dtype=dtype)
            torch.index_select(xt, 0, first, out=z[:self.d])
        if t == 1:  # a row of vectors: x_k Q_k, the form BLAS runs fastest for one row (about 6x here)
            y = torch.bmm(z.view(k, 1, b), blocks).view(k * b, 1)[:self.d]
        else:
            y = torch.bmm(blocks_t, z.view(k, b, t)).view(k * b, t)[:self.d]
        return y.index_select(0, last).t().contiguous()

    def apply(self, x: torch.Tensor, precise: bool = False) -> torch.Tensor:
        """x @ M for x [T, d]: a block transform computes in ``BLOCK_DTYPE`` (float64 with
        ``precise``: ``lock_weight`` and ``lock_input``); a permutation keeps x's dtype and values."""
        if self.blocks is None:
            return x.index_select(1, self.perm_in)
        if precise:
            return self._chain(x, self.perm_in, self._blocks_t64, self.blocks, self.perm_out)
        return self._chain(x, self.perm_in, self._q_t, self._q, self.perm_out)

    def apply_inverse(self, x: torch.Tensor, precise: bool = False) -> torch.Tensor:
        """x @ M^T for x [T, d] (precision as ``apply``)."""
        if self.blocks is None:
            return x.index_select(1, self._inv_in)
        if precise:
            return self._chain(x, self._inv_out, self.blocks, self._blocks_t64, self._inv_in)
        return self._chain(x, self._inv_out, self._q, self._q_t, self._inv_in)

    def matrix(self) -> torch.Tensor:
        """M as a dense float64 [d, d] (tests)."""
        return self.apply(torch.eye(self.d, dtype=torch.float64), precise=True)


# ---------------------------------------------------------------------------------------------
# the lock of one GEMM
# ---------------------------------------------------------------------------------------------


class GemmLock:
    """The lock of one GEMM y = x W^T, W [m, n] (see the module docstring for the convention).

    out_side: ``SideTransform`` of size m (M_out) or None; in_side: of size n (M_in) or None; None
    on both sides is the ``none`` lock.
    """

    def __init__(self, out_features: int, in_features: int, kind: str, block: int = 1,
                 out_side: Optional[SideTransform] = None, in_side: Optional[SideTransform] = None):
        if kind not in LOCK_KINDS:
            raise ValueError(f"lock kind must be one of {LOCK_KINDS}, got {kind!r}")
        self.m, self.n, self.kind, self.block = int(out_features), int(in_features), kind, int(block)
        if (kind == "none") != (out_side is None and in_side is None) or (kind != "none") != (
                out_side is not None and in_side is not None):
            raise ValueError(f"a {kind!r} lock needs {'no' if kind == 'none' else 'both'} side transforms")
        if kind != "none":
            if out_side.d != self.m or in_side.d != self.n:
                raise ValueError(f"side transforms of sizes {out_side.d}, {in_side.d} do not fit W [{self.m}, {self.n}]")
            if (kind == "perm") != (out_side.blocks is None and in_side.blocks is None):
                raise ValueError(f"the side transforms do not match lock kind {kind!r}")
        self.out_side, self.in_side = out_side, in_side

    @property
    def is_identity(self) -> bool:
        return self.kind == "none"

    @property
    def exact(self) -> bool:
        """True when the lock only relabels coordinates (``none``, ``perm``): no rounding added."""
        return self.kind != "block"

    def __repr__(self) -> str:
        return f"GemmLock({self.m}x{self.n}, {self.kind}{':%d' % self.block if self.kind == 'block' else ''})"

    def _check(self, t: torch.Tensor, cols: int, what: str) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != cols:
            raise ValueError(f"{what} must be a 2-D tensor [T, {cols}], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")

    def lock_weight(self, w: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """W' = M_out @ W @ M_in for W [m, n] (computed in float64 for a block lock, returned in W's
        dtype), ``chunk`` rows (then columns) at a time, so a large LM head needs one float64
        buffer of W's size and no full-size temporaries."""
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or tuple(w.shape) != (self.m, self.n):
            raise ValueError(f"W must be [{self.m}, {self.n}]")
        if self.is_identity:
            return w
        mid = torch.empty(self.m, self.n, dtype=w.dtype if self.exact else torch.float64)
        for r in range(0, self.m, chunk):                                # W @ M_in, rows at a time
            mid[r:r + chunk] = self.in_side.apply(w[r:r + chunk], precise=True)
        out = torch.empty(self.m, self.n, dtype=w.dtype)
        for c in range(0, self.n, chunk):                                # M_out @ (W M_in), columns at a time
            out[:, c:c + chunk] = self.out_side.apply_inverse(mid[:, c:c + chunk].t(), precise=True).t()
        return out

    def lock_input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = x @ M_in for x [T, n] (float64 for a block lock, since it is quantized next; a
        permutation keeps the dtype)."""
        self._check(x, self.n, "x")
        return x if self.is_identity else self.in_side.apply(x, precise=True)

    def unlock_output(self, y: torch.Tensor) -> torch.Tensor:
        """y = y' @ M_out for y' [T, m] (``BLOCK_DTYPE`` for a block lock; a permutation keeps the dtype)."""
        self._check(y, self.m, "y'")
        return y if self.is_identity else self.out_side.apply(y)

    def lock_output(self, y: torch.Tensor) -> torch.Tensor:
        """y' = y @ M_out^T (the inverse of ``unlock_output``; tests and audits)."""
        self._check(y, self.m, "y")
        return y if self.is_identity else self.out_side.apply_inverse(y)

    # -- serialisation ------------------------------------------------------------------------

    def to_tensors(self, prefix: str) -> Dict[str, torch.Tensor]:
        """The secret tensors of this lock, named ``<prefix>.lock.*`` (empty for ``none``)."""
        if self.is_identity:
            return {}
        out: Dict[str, torch.Tensor] = {}
        for side, t in (("out", self.out_side), ("in", self.in_side)):
            out[f"{prefix}.lock.{side}.perm_in"] = t.perm_in.clone()
            if t.blocks is not None:
                out[f"{prefix}.lock.{side}.blocks"] = t.blocks.clone()
                out[f"{prefix}.lock.{side}.perm_out"] = t.perm_out.clone()
        return out

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], prefix: str, out_features: int, in_features: int,
                     kind: str, block: int = 1) -> "GemmLock":
        """Rebuild a lock from ``to_tensors`` output; every tensor is checked (ValueError: a
        wrong shape or dtype, not a permutation, blocks not orthogonal or not of size ``block``)."""
        if kind not in LOCK_KINDS:
            raise ValueError(f"lock kind must be one of {LOCK_KINDS}, got {kind!r}")
        if kind == "none":
            return cls(out_features, in_features, "none")
        sides = []
        for side, d in (("out", out_features), ("in", in_features)):
            name = f"{prefix}.lock.{side}"
            if f"{name}.perm_in" not in tensors:
                raise ValueError(f"lock tensor {name}.perm_in is missing")
            blocks = tensors.get(f"{name}.blocks")
            perm_out = tensors.get(f"{name}.perm_out")
            if kind == "block":
                if blocks is None or perm_out is None:
                    raise ValueError(f"lock tensors {name}.blocks / {name}.perm_out are missing")
                if int(blocks.shape[-1]) != min(int(block), int(d)):
                    raise ValueError(f"{name}.blocks are {int(blocks.shape[-1])} wide, not {min(block, d)}")
            elif blocks is not None or perm_out is not None:
                raise ValueError(f"a perm lock has no {name}.blocks / {name}.perm_out")
            sides.append(SideTransform(int(d), tensors[f"{name}.perm_in"], blocks, perm_out))
        return cls(out_features, in_features, kind, block, out_side=sides[0], in_side=sides[1])

    @staticmethod
    def tensor_names(prefix: str, kind: str) -> Tuple[str, ...]:
        """The names ``to_tensors`` writes for a lock of this kind."""
        if kind == "none":
            return ()
        per = ("perm_in",) if kind == "perm" else ("perm_in", "blocks", "perm_out")
        return tuple(f"{prefix}.lock.{side}.{x}" for side in ("out", "in") for x in per)


def make_lock(out_features: int, in_features: int, kind: str, block: int, seed: bytes) -> GemmLock:
    """The lock of one GEMM W [out_features, in_features], drawn from shake_256 keyed by ``seed``
    (bytes; the vendor's per-GEMM key).  kind: ``none`` | ``perm`` | ``block`` (block size
    ``block`` >= 2, capped at each side's size; ignored for the other kinds)."""
    if kind not in LOCK_KINDS:
        raise ValueError(f"lock kind must be one of {LOCK_KINDS}, got {kind!r}")
    for v, what in ((out_features, "out_features"), (in_features, "in_features")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if kind == "block" and block < 2:
        raise ValueError("a block lock needs block >= 2 (block 1 would be a signed permutation)")
    if not isinstance(seed, (bytes, bytearray)) or len(seed) < 16:
        raise ValueError("seed must be at least 16 bytes of key material")
    if kind == "none":
        return GemmLock(out_features, in_features, "none")
    b = block if kind == "block" else 1
    key = _DOMAIN + struct.pack("<I", len(seed)) + bytes(seed) + struct.pack("<QQI", out_features, in_features, b) \
        + kind.encode()
    stream = _Stream(key)
    out_side = SideTransform.draw(stream, out_features, kind, b)
    in_side = SideTransform.draw(stream, in_features, kind, b)
    return GemmLock(out_features, in_features, kind, b, out_side=out_side, in_side=in_side)


def gemm_seed(master: bytes, name: str) -> bytes:
    """The key of one GEMM's lock: shake_256(b"slip-lock-gemm/v1" || len(master) || master || name),
    32 bytes (independent locks for different names under one artifact key)."""
    if not isinstance(master, (bytes, bytearray)) or len(master) < 16:
        raise ValueError("the artifact's lock key must be at least 16 bytes")
    return hashlib.shake_256(b"slip-lock-gemm/v1" + struct.pack("<I", len(master)) + bytes(master)
                             + name.encode()).digest(32)


def seed_lock_key(seed: int) -> bytes:
    """The artifact lock key that ``slip protect --seed SEED`` uses (tests only: a real artifact's
    key is ``os.urandom(32)``): shake_256(b"slip-lock-key/v1" || decimal SEED), 32 bytes."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return hashlib.shake_256(b"slip-lock-key/v1" + str(seed).encode()).digest(32)


def make_locks(shapes: Dict[str, Tuple[int, int]], spec: LockSpec, master: bytes) -> Dict[str, GemmLock]:
    """One lock per GEMM: name -> ``make_lock(m, n, spec.kind, spec.block, gemm_seed(master, name))``."""
    return {name: make_lock(int(m), int(n), spec.kind, spec.block, gemm_seed(master, name))
            for name, (m, n) in shapes.items()}
