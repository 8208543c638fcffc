"""Additive weight decomposition W = W_C + W_D with subspace blinding (brief §3).

Owns the numerics of one matrix: rank choice, SVD, blinding, the exactness check, the blinding
randomness (:class:`BlindingRng`) and the two attacks on one public residual that need nothing but
W_D (:func:`subspace_attack`, :func:`spectral_gap_attack`). It runs on the vendor's / evaluator's
machine inside ``slip protect`` and the evaluation, never on the host.

Why blinding: the exact residual W - U_k S_k V_k^T has span(V_k) as its null space and span(U_k)
as its left null space, so anyone holding it reads the secret subspaces off its weakest singular
directions. The first fix (scheme ``"block"``, kept only so the evaluation can show what it leaked)
was

    W_C = U_k (S_k - R) V_k^T,   R = Q1 diag(rho) Q2^T,   W_D = W - W_C = U_k R V_k^T + U_t S_t V_t^T

with rho drawn from W's own tail spectrum. Its residual is block diagonal in W's singular basis: the
tail values sigma_{k+1}, ... survive unchanged and k values rho are inserted between them, every
singular pair of W_D lies wholly in the secret block or in the tail, and i.i.d. inserted values do
not repel their neighbours the way a trained matrix's singular values do. A prior-free test on the
gaps between singular values (:func:`spectral_gap_attack`) therefore picked the secret pairs at about
3x chance.

The shipped scheme ``"mixed"`` keeps the rank and the exactness and removes the block structure.
Protocol (per matrix, thin SVD W = U S V^T, r = min(m, n), t = r - k), all randomness from a
:class:`BlindingRng` (SHAKE-256 stream keyed from ``os.urandom``):
  1. rho (k values) from a continuous interpolation of the tail's quantile function; Q1, Q2
     Haar-orthogonal k x k; R = Q1 diag(rho) Q2^T (as in ``"block"``);
  2. couplings F [t, k] and H [k, t] between the secret pairs and the tail pairs (``_mixing``):
     each secret pair i with its ``MIX_WINDOW`` nearest tail pairs in value, Gaussian gains of
     ``MIX_LOCAL_GAIN`` x their local gap, plus a dense random rank-k coupling with every tail pair at
     ``MIX_GLOBAL_GAIN`` x tail values;
  3. left = U_k (S_k - R) + U_t F [m, k], right = V_k^T + S_k^-1 H V_t^T [k, n], W_C = left @ right,
     W_D = W - W_C.
In W's basis W_D = [[R, -(1 - R S_k^-1) H], [-F, S_t - F S_k^-1 H]]: every secret pair is coupled to
the tail on both sides, so no singular value of W survives unchanged and no singular pair of W_D lies
in either block; the local coupling (about two gaps) makes the secret values repel their neighbours
as genuine singular values do, which is what a test on the spacing reads, while moving the pairs'
energies so little that the weakest and strongest directions stay at chance too; the norm of W_D
stays at tail level (measured <= 1.05 x sigma_{k+1} on the reference model). Measured (fresh
blindings of every protected matrix, ``evaluation/audits.py`` ``spectral_gap_audit``): the
spectral-gap attack picks the secret directions at ~3.7x chance under ``"block"`` and at chance
(<= 1.5x on every matrix) under ``"mixed"``, on the reference model and on the fine-tuned
public-prior checkpoint (docs/SECURITY_EVAL.md).
The secret keeps rank k and is stored as two factors.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

RECONSTRUCTION_TOLERANCE = 1e-6


@dataclass(frozen=True)
class RankPolicy:
    """How many singular components go to the secret part of a matrix.

    Exactly one of ``absolute``, ``fraction`` (of min(m, n)) or ``energy`` (share of the squared
    Frobenius norm held by the top components) is set.
    """

    absolute: int | None = None
    fraction: float | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.absolute, self.fraction, self.energy)]
        if sum(given) != 1:
            raise ValueError("a rank policy sets exactly one of absolute, fraction, energy")
        if self.absolute is not None and self.absolute < 1:
            raise ValueError(f"absolute rank must be >= 1, got {self.absolute}")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ValueError(f"rank fraction must be in (0, 1), got {self.fraction}")
        if self.energy is not None and not 0.0 < self.energy < 1.0:
            raise ValueError(f"energy target must be in (0, 1), got {self.energy}")

    @classmethod
    def from_dict(cls, data: dict) -> "RankPolicy":
        unknown = set(data) - {"absolute", "fraction", "energy"}
        if unknown:
            raise ValueError(f"unknown rank policy keys {sorted(unknown)}")
        return cls(**data)

    def describe(self) -> str:
        if self.absolute is not None:
            return f"absolute {self.absolute}"
        if self.fraction is not None:
            return f"fraction {self.fraction}"
        return f"energy {self.energy}"

    def choose(self, singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
        """Rank for a matrix with these singular values, clamped to [1, min(m, n) - 1].

        The upper clamp keeps at least one tail value to draw the blinding spectrum from.
        """
        full = min(shape)
        if full < 2:
            raise ValueError(f"matrix of shape {shape} is too small to split")
        if self.absolute is not None:
            k = self.absolute
        elif self.fraction is not None:
            k = math.ceil(self.fraction * full)
        else:
            energy = singular_values.double() ** 2
            cumulative = torch.cumsum(energy, 0) / energy.sum().clamp_min(1e-300)
            k = int(torch.searchsorted(cumulative, torch.tensor(self.energy, dtype=torch.float64)).item()) + 1
        return max(1, min(int(k), full - 1))


@dataclass
class SplitMatrix:
    """One protected matrix, in [out, in] orientation."""

    left: torch.Tensor    # [m, k] float32, secret
    right: torch.Tensor   # [k, n] float32, secret
    public: torch.Tensor  # [m, n] float32, the residual W_D
    rank: int
    relative_error: float  # ||(left @ right + public) - W|| / ||W||, computed in float64

    def secret(self) -> torch.Tensor:
        return self.left @ self.right


class BlindingRng:
    """The blinding randomness: a SHAKE-256 output stream under a 256-bit key, read as uniforms and
    Gaussians (float64).

    ``BlindingRng()`` (or ``fresh()``) keys it from ``os.urandom``: the default of ``slip protect``.
    ``BlindingRng.from_seed(seed)`` derives the key from an integer, for reproducible tests and the
    evaluation only (whoever knows the seed recomputes the blinding). Block j of the stream is
    SHAKE-256(key || j); every draw takes fresh blocks, so no output is ever reused.
    """

    SEED_DOMAIN = b"slip-blinding-seed-v2|"

    def __init__(self, key: bytes | None = None):
        if key is None:
            key = os.urandom(32)
        if not isinstance(key, (bytes, bytearray)) or len(key) < 32:
            raise ValueError("a blinding key is at least 32 bytes")
        self._key = bytes(key)
        self._block = 0

    @classmethod
    def fresh(cls) -> "BlindingRng":
        return cls(os.urandom(32))

    @classmethod
    def from_seed(cls, seed: int) -> "BlindingRng":
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"a blinding seed is an int, got {type(seed).__name__}")
        return cls(hashlib.shake_256(cls.SEED_DOMAIN + str(seed).encode()).digest(32))

    def _words(self, n: int) -> np.ndarray:
        data = hashlib.shake_256(self._key + self._block.to_bytes(8, "little")).digest(8 * n)
        self._block += 1
        return np.frombuffer(data, dtype="<u8")

    def uniform(self, n: int) -> torch.Tensor:
        """n floats, uniform on the open interval (0, 1), 53 random bits each."""
        words = self._words(int(n)) >> np.uint64(11)
        return torch.from_numpy((words.astype(np.float64) + 0.5) / float(1 << 53))

    def normal(self, *shape: int) -> torch.Tensor:
        """Standard Gaussians (Box-Muller) of the given shape."""
        n = int(np.prod(shape)) if shape else 1
        half = (n + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        z = torch.cat([radius * torch.cos(2 * math.pi * u2), radius * torch.sin(2 * math.pi * u2)])[:n]
        return z.reshape(shape)


def _require_rng(rng) -> BlindingRng:
    if isinstance(rng, BlindingRng):
        return rng
    raise TypeError(f"blinding randomness must be a BlindingRng (a CSPRNG stream), got {type(rng).__name__}; "
                    "use BlindingRng() for a fresh key or BlindingRng.from_seed(n) in tests")


def random_orthonormal(rows: int, cols: int, rng: BlindingRng) -> torch.Tensor:
    """Haar-distributed ``rows x cols`` matrix with orthonormal columns (float64), cols <= rows."""
    rng = _require_rng(rng)
    gaussian = rng.normal(rows, cols)
    q, r = torch.linalg.qr(gaussian)
    d = torch.diagonal(r)
    # Sign fix makes the distribution Haar rather than biased by QR's sign convention.
    return q * torch.sign(d).where(d != 0, torch.ones_like(d))


def random_orthogonal(k: int, rng: BlindingRng) -> torch.Tensor:
    """Haar-distributed orthogonal k x k matrix (float64)."""
    return random_orthonormal(k, k, rng)


def sample_tail_spectrum(tail: torch.Tensor, k: int, rng: BlindingRng) -> torch.Tensor:
    """k values drawn from a continuous interpolation of the tail's quantile function."""
    rng = _require_rng(rng)
    ordered = torch.sort(tail.double()).values
    if ordered.numel() == 1:
        return ordered.repeat(k)
    u = rng.uniform(k) * (ordered.numel() - 1)
    lo = torch.floor(u).long().clamp(max=ordered.numel() - 2)
    hi = lo + 1
    frac = u - lo.double()
    return ordered[lo] * (1 - frac) + ordered[hi] * frac


BLINDING_SCHEMES = ("mixed", "block")
DEFAULT_BLINDING_SCHEME = "mixed"  # what split_matrix ships; cached evaluation artifacts record it
MIX_WINDOW = 8        # tail pairs each secret pair is coupled with: its nearest neighbours in value
MIX_LOCAL_GAIN = 2.0  # local coupling, in units of the mean tail gap around those neighbours
MIX_GLOBAL_GAIN = 0.1  # dense coupling with every tail pair, in units of tail singular values


def _mixing(tail: torch.Tensor, rho: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor,
            rng: BlindingRng) -> tuple[torch.Tensor, torch.Tensor]:
    """The couplings F [t, k] (tail rows, secret input columns) and H [k, t] of the ``mixed`` scheme.

    Secret pair i (value rho_i, directions U_k q1_i, V_k q2_i) is coupled (a) with the ``MIX_WINDOW``
    tail pairs nearest to rho_i in value, by Gaussian gains of ``MIX_LOCAL_GAIN`` x their mean gap:
    strong enough to make it repel its spectral neighbours as genuine singular values do (the
    spacing is what the spectral-gap attack reads), local so the pairs' energies hardly move (the
    weakest / strongest directions stay at chance); and (b) with every tail pair through a random
    rank-k map with gains ``MIX_GLOBAL_GAIN`` x tail values, so no tail pair stays uncoupled.
    """
    t, k = int(tail.numel()), int(rho.numel())
    if t > 1:
        gaps = torch.cat([tail[:-1] - tail[1:], tail[-2:-1] - tail[-1:]])
    else:
        gaps = tail.clone()
    win = min(MIX_WINDOW, t)
    near = torch.argsort((tail[None, :] - rho[:, None]).abs(), dim=1)[:, :win]   # [k, win]
    scale = MIX_LOCAL_GAIN * gaps[near].mean(dim=1, keepdim=True)                  # [k, 1]
    f_local = torch.zeros(k, t, dtype=torch.float64).scatter_(1, near, scale * rng.normal(k, win))
    h_local = torch.zeros(k, t, dtype=torch.float64).scatter_(1, near, scale * rng.normal(k, win))
    cols = min(k, t)
    f_dense = (random_orthonormal(t, cols, rng) @ torch.diag(MIX_GLOBAL_GAIN * sample_tail_spectrum(tail, cols, rng))
               @ random_orthonormal(k, cols, rng).T)
    h_dense = (random_orthonormal(k, cols, rng) @ torch.diag(MIX_GLOBAL_GAIN * sample_tail_spectrum(tail, cols, rng))
               @ random_orthonormal(t, cols, rng).T)
    return f_local.T @ q2.T + f_dense, q1 @ h_local + h_dense


def split_matrix(weight: torch.Tensor, policy: RankPolicy, rng: BlindingRng,
                 blind: bool = True, *, scheme: str = DEFAULT_BLINDING_SCHEME) -> SplitMatrix:
    """Split ``weight`` [m, n] into secret factors and a public residual.

    ``rng`` is the blinding randomness (:class:`BlindingRng`; a ``torch.Generator`` is refused).
    ``scheme``: ``"mixed"`` (shipped, module docstring) or ``"block"`` (the earlier construction, whose
    residual keeps an exact block structure; evaluation only). ``blind=False`` produces the leaky
    textbook split; it exists only so the evaluation can show the subspace attack succeeding against it.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(weight.shape)}")
    if scheme not in BLINDING_SCHEMES:
        raise ValueError(f"unknown blinding scheme {scheme!r} (one of {', '.join(BLINDING_SCHEMES)})")
    if blind:
        rng = _require_rng(rng)
    w64 = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(w64).all():
        raise ValueError("matrix holds NaN or Inf values")
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    k = policy.choose(s, tuple(w64.shape))
    left64 = u[:, :k] * s[:k]
    right64 = vh[:k, :]
    if blind:
        tail = s[k:]
        rho = sample_tail_spectrum(tail, k, rng)
        q1, q2 = random_orthogonal(k, rng), random_orthogonal(k, rng)
        r_core = q1 @ torch.diag(rho) @ q2.T
        if scheme == "block":
            left64 = left64 - u[:, :k] @ r_core
        else:
            f_mix, h_mix = _mixing(tail, rho, q1, q2, rng)
            # W_D = W - left @ right with left = U_k (S_k - R) + U_t F, right = V_k^T + S_k^-1 H V_t^T:
            # in W's basis W_D = [[R, -(1 - R S_k^-1) H], [-F, S_t - F S_k^-1 H]] (module docstring).
            left64 = left64 - u[:, :k] @ r_core + u[:, k:] @ f_mix
            right64 = right64 + (h_mix / s[:k, None].clamp_min(torch.finfo(torch.float64).tiny)) @ vh[k:, :]
    left = left64.to(torch.float32)
    right = right64.to(torch.float32).contiguous()
    # Subtract the product of the factors as stored, so only the residual's float32 rounding remains.
    public64 = w64 - left.double() @ right.double()
    public = public64.to(torch.float32)
    norm = torch.linalg.norm(w64).item()
    err = torch.linalg.norm(left.double() @ right.double() + public.double() - w64).item()
    relative = err / norm if norm > 0 else err
    if relative > RECONSTRUCTION_TOLERANCE:
        raise ArithmeticError(f"decomposition not exact: relative error {relative:.3e} > {RECONSTRUCTION_TOLERANCE}")
    return SplitMatrix(left=left.contiguous(), right=right, public=public.contiguous(), rank=k,
                       relative_error=relative)


@dataclass(frozen=True)
class SubspaceAttackResult:
    overlap: float          # mean squared cosine between recovered and true secret directions (0..1)
    chance: float           # expected overlap of a random guess, k / min(m, n)
    side: str               # "left" (output space) or "right" (input space): the better side for the attacker
    p_value: float          # probability of an overlap this large by chance (hypergeometric model)


def subspace_attack(original: torch.Tensor, public: torch.Tensor, k: int) -> SubspaceAttackResult:
    """The null-space attack of brief §3: guess the secret subspaces as the k weakest singular
    directions of the public residual and measure how well they match the k strongest of W.

    Against an unblinded split the overlap is ~1; against a blinded one it should be no better than
    chance. The p-value models the guess as k directions drawn from min(m, n) of which k are secret.
    """
    from scipy.stats import hypergeom

    w = original.detach().double()
    d = public.detach().double()
    u_w, _, vh_w = torch.linalg.svd(w, full_matrices=False)
    u_d, _, vh_d = torch.linalg.svd(d, full_matrices=False)
    r = min(w.shape)
    best = None
    for side, true_basis, guess_basis in (
        ("left", u_w[:, :k], u_d[:, -k:]),
        ("right", vh_w[:k, :].T, vh_d[-k:, :].T),
    ):
        overlap = float((true_basis.T @ guess_basis).pow(2).sum().item() / k)
        if best is None or overlap > best[1]:
            best = (side, overlap)
    side, overlap = best
    hits = overlap * k
    p_value = float(hypergeom.sf(math.ceil(hits - 1e-9) - 1, r, k, k))
    return SubspaceAttackResult(overlap=overlap, chance=k / r, side=side, p_value=p_value)


# --------------------------------------------------------------------------------------------------
# the prior-free spectral-gap attack


SPECTRAL_GAP_WINDOW = 6  # gaps on each side used as the local typical gap


def spectral_gap_select(singular_values: torch.Tensor, k: int, *, window: int = SPECTRAL_GAP_WINDOW) -> list[int]:
    """The attacker's guess of which k singular values of W_D were inserted among the tail's.

    Prior-free: it uses nothing but W_D's spectrum. A trained matrix's singular values repel each
    other, so locally they are about evenly spaced (in log scale); a value inserted between two of
    them splits one gap into two, and removing it restores a typical gap, while removing a genuine
    value leaves a gap about twice the typical one. Greedy, k times: among the values still present
    (interior ones: each has a neighbour on both sides), remove the one whose removal leaves the
    merged gap log s_{j-1} - log s_{j+1} smallest relative to the median of the ``window`` gaps on
    each side of it. Returns the chosen indices into ``singular_values`` (sorted descending).
    """
    values = torch.sort(singular_values.detach().double().flatten(), descending=True)
    x = torch.log(values.values.clamp_min(1e-300)).tolist()
    order = values.indices.tolist()
    alive = list(range(len(x)))
    chosen: list[int] = []
    for _ in range(min(k, max(0, len(x) - 2))):
        gaps = [x[alive[i]] - x[alive[i + 1]] for i in range(len(alive) - 1)]
        best, best_score = None, math.inf
        for j in range(1, len(alive) - 1):
            around = gaps[max(0, j - 1 - window):j - 1] + gaps[j + 1:j + 1 + window]
            typical = float(np.median(around)) if around else 1.0
            merged = gaps[j - 1] + gaps[j]
            score = merged / max(typical, 1e-300)
            if score < best_score:
                best, best_score = j, score
        chosen.append(order[alive.pop(best)])
    return chosen


@dataclass(frozen=True)
class SpectralGapResult:
    chosen: tuple[int, ...]   # indices of W_D's singular pairs (descending order) the attacker picked
    overlap: float            # mean squared cosine of the picked singular vectors with the secret subspace
    chance: float             # the same for k random directions: k / min(m, n)
    side: str                 # the best (side, target) for the attacker, e.g. "left/top-k of W"


def _overlap(basis: torch.Tensor, guess: torch.Tensor) -> float:
    """Mean squared cosine of the guess's columns with span(basis) (orthonormalised)."""
    q, _ = torch.linalg.qr(basis.double())
    return float((q.T @ guess.double()).pow(2).sum().item() / guess.shape[1])


def spectral_gap_attack(original: torch.Tensor, public: torch.Tensor, k: int,
                        secret_left: torch.Tensor | None = None, secret_right: torch.Tensor | None = None,
                        *, window: int = SPECTRAL_GAP_WINDOW, chosen: Sequence[int] | None = None) -> SpectralGapResult:
    """Run :func:`spectral_gap_select` on W_D and score the singular vectors it picked (``chosen``:
    score these pair indices instead, e.g. a random pick as the evaluator's chance control).

    The evaluator scores the guess against every subspace whose knowledge reduces the secret to a
    k x k core: the top-k singular subspaces of W (the removed directions; left and right) and, when
    the factors are given, the column space of W_C (span of ``secret_left`` [m, k]) and its row space
    (span of ``secret_right``^T, [k, n]). The best of them for the attacker is reported.
    """
    w = original.detach().double()
    d = public.detach().double()
    u_w, _, vh_w = torch.linalg.svd(w, full_matrices=False)
    u_d, s_d, vh_d = torch.linalg.svd(d, full_matrices=False)
    chosen = spectral_gap_select(s_d, k, window=window) if chosen is None else [int(i) for i in chosen]
    idx = torch.tensor(chosen, dtype=torch.long)
    targets = [("left/top-k of W", u_w[:, :k], u_d[:, idx]), ("right/top-k of W", vh_w[:k].T, vh_d[idx].T)]
    if secret_left is not None:
        targets.append(("left/column space of W_C", secret_left, u_d[:, idx]))
    if secret_right is not None:
        targets.append(("right/row space of W_C", secret_right.T, vh_d[idx].T))
    side, overlap = max(((name, _overlap(basis, guess)) for name, basis, guess in targets), key=lambda t: t[1])
    return SpectralGapResult(chosen=tuple(chosen), overlap=overlap, chance=k / min(w.shape), side=side)
