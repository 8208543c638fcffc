"""Additive weight decomposition W = W_C + W_D with subspace blinding (brief §3).

Owns the numerics of one matrix: rank choice, SVD, blinding and the exactness check. It runs on the
vendor's machine inside ``slip protect`` and never on the host.

Why blinding: the exact residual W - U_k S_k V_k^T has span(V_k) as its null space and span(U_k)
as its left null space, so anyone holding it reads the secret subspaces off its weakest singular
directions. We instead keep

    W_C = U_k (S_k - R) V_k^T,   R = Q1 diag(rho) Q2^T,   W_D = W - W_C

with Q1, Q2 random orthogonal k x k and rho drawn from W's own tail spectrum (sigma_{k+1}, ...).
On the secret subspaces W_D then acts as R, whose singular values look like tail values, so the
secret directions hide among the tail directions instead of sitting at zero. rho is sampled from a
continuous interpolation of the tail's quantile function, not by picking tail values, because exact
repeats of a singular value would mark the secret directions as duplicated pairs.
W_C keeps rank k and is stored as two factors: left = U_k (S_k - R) [m, k], right = V_k^T [k, n].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def random_orthogonal(k: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal k x k matrix (float64)."""
    gaussian = torch.randn(k, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Sign fix makes the distribution Haar rather than biased by QR's sign convention.
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(k, dtype=torch.float64))


def sample_tail_spectrum(tail: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k values drawn from a continuous interpolation of the tail's quantile function."""
    ordered = torch.sort(tail.double()).values
    if ordered.numel() == 1:
        return ordered.repeat(k)
    u = torch.rand(k, generator=generator, dtype=torch.float64) * (ordered.numel() - 1)
    lo = torch.floor(u).long()
    hi = torch.clamp(lo + 1, max=ordered.numel() - 1)
    frac = u - lo.double()
    return ordered[lo] * (1 - frac) + ordered[hi] * frac


def split_matrix(weight: torch.Tensor, policy: RankPolicy, generator: torch.Generator,
                 blind: bool = True) -> SplitMatrix:
    """Split ``weight`` [m, n] into secret factors and a public residual.

    ``blind=False`` produces the leaky textbook split; it exists only so the evaluation can show the
    subspace attack succeeding against it.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(weight.shape)}")
    w64 = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(w64).all():
        raise ValueError("matrix holds NaN or Inf values")
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    k = policy.choose(s, tuple(w64.shape))
    core = torch.diag(s[:k])
    if blind:
        rho = sample_tail_spectrum(s[k:], k, generator)
        q1 = random_orthogonal(k, generator)
        q2 = random_orthogonal(k, generator)
        core = core - q1 @ torch.diag(rho) @ q2.T
    left = (u[:, :k] @ core).to(torch.float32)
    right = vh[:k, :].to(torch.float32).contiguous()
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
