"""TRUSTED side: what the ``shielded`` service lets out of the LM head (the logits policy).

What this module owns: the parsing of ``SLIP_SHIELDED_LOGITS_POLICY`` / ``SLIP_SHIELDED_LOGITS_TOPK``
and the one function that turns the LM head's float logits into what the host receives
(``LogitsPolicy.apply``), used by ``shielded_api.ShieldedService`` on every MSG_LOGITS reply.

Why: the host names the rows it wants logits for, and full-vocabulary float logits are linear in
the secret final hidden state, z = A h (A = the effective LM head, V x d): a few more than d rows
give span(A) exactly by an SVD, the head up to a d x d map (the logit-matrix attack, Carlini et
al. 2024, "Stealing part of a production language model"), and with the public int8 W_q of the
head the per-row scales follow. Policies (chosen at service start, reported in /v1/info):

* ``full``: the float32 logits of every vocabulary entry (what the evaluation uses to score the
  model's own log-probs);
* ``topk`` (default, K = ``SLIP_SHIELDED_LOGITS_TOPK``, 20): per row only the K largest logits,
  unchanged float32 values (so vLLM's greedy choice, the argmax, is bit-identical: no
  renormalisation that could round two near-equal logits into a tie), every other entry -inf.
  Sampling becomes top-K truncated sampling (renormalised over the K tokens);
  log-probs vLLM reports are renormalised over the K tokens, and the log-prob of a token outside
  the top K (prompt log-probs included) is not available (-inf). With K below the hidden size
  every row holds fewer linear measurements than h has unknowns, so the logit matrix cannot be
  completed (measured: ``evaluation/audits.py`` ``logit_matrix_audit``, docs/SECURITY.md).

Not implemented: sampling inside the service (``sample``): the sampling parameters (temperature,
top-p, seeds, penalties) belong to vLLM's requests and are not part of the step frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

POLICIES = ("full", "topk")
DEFAULT_POLICY = "topk"
DEFAULT_TOPK = 20


@dataclass(frozen=True)
class LogitsPolicy:
    name: str = DEFAULT_POLICY
    k: int = DEFAULT_TOPK

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown logits policy {self.name!r} (one of {', '.join(POLICIES)}; 'sample' is not "
                             f"implemented: vLLM owns the sampling parameters)")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"the logits top-K must be an int >= 1, got {self.k!r}")

    def describe(self) -> str:
        return "full" if self.name == "full" else f"topk:{self.k}"

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """What the host receives for these float logits [R, V] (float32)."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [rows, vocab], got {tuple(logits.shape)}")
        if self.name == "full" or self.k >= logits.shape[1]:
            return logits.to(torch.float32)
        values = logits.to(torch.float32)
        top = torch.topk(values, self.k, dim=-1)
        out = torch.full(values.shape, -math.inf, dtype=torch.float32)
        out.scatter_(1, top.indices, top.values)
        return out
