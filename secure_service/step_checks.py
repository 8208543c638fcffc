"""TRUSTED side: the checks that bind a shielded step's metadata before the service acts on it.

What this module owns
---------------------
The host's scheduler (vLLM's) is the source of truth for the batch layout of every step: which
tokens, at which positions, written to which KV slots, reading which blocks.  The host is the
adversary (brief §2), and a buggy host is no better, so the service takes none of it on trust.  This
module holds the checks, the limits they use, and the refusal they raise:

* ``StepRejected(status, message)``: a shielded request the service refuses (a clear 4xx; the
  service stays healthy and the next valid step is answered exactly);
* ``StepLimits``: the caps of one service: KV blocks and block size, ``max_model_len`` (the
  model's ``max_position_embeddings``, or ``SLIP_SHIELDED_MAX_MODEL_LEN``), tokens per step
  (``SLIP_MAX_STEP_TOKENS``), the vocabulary;
* ``check_step(frame, limits)``: the stateless checks of a step frame, run by
  ``ShieldedService.start_step`` before anything else (before the step in flight is aborted, before
  any mask is drawn or any KV slot written);
* ``check_rows(payload, n, limits)``: the rows of a logits request (MSG_ROWS), run by
  ``ShieldedService.logits`` before the LM head is asked;
* ``PrefixTags`` and ``check_kv_reads``: which KV slots a step may read (run by the executor at the
  start of the step, after the step in flight was rolled back, with the cache's per-slot records);
  ``PagedKVCache`` (``shielded_executor``) keeps the records and rolls them back with the K/V.

Checks of ``check_step``, in order, and the attack each one stops
-----------------------------------------------------------------
1. N tokens <= the KV cache's slots (422) and <= ``max_step_tokens`` (413): one frame cannot make
   the service allocate activations, masks and logits for an unbounded batch (memory exhaustion).
2. block-table width <= ceil(max_model_len / block_size) (413): the table is gathered per layer;
   a huge table is a memory and time bomb.
3. logits_indices: at most N of them, each in [0, N) (422): no logits of rows that do not exist,
   no reply larger than the step.
4. query_start_loc within [0, N], starting at 0, rising by >= 1 per sequence, ending at N (422):
   every sequence has a query token; values outside the range could also wrap int64 arithmetic.
5. q_len <= seq_len <= max_model_len (422): a sequence cannot claim fewer tokens than its queries
   (negative context) or more than the model's positions (RoPE tables, the position records and
   attention sized by an attacker).
6. the table has ceil(seq_len / block_size) columns for each sequence, and every entry lies in
   [0, num_blocks) (422): no gather outside the cache (the padding columns too, since the padded
   attention reads them, masked).
7. token ids in [0, vocab) (422): no embedding lookup outside the table.
8. the query tokens of sequence s have positions seq_len - q .. seq_len - 1, in order (422): RoPE
   and the causal mask use the same positions the KV is filed under.
9. slot_mapping[i] == block_tables[s, pos // block_size] * block_size + pos % block_size for every
   query token i of sequence s (422): a token's K/V is written exactly where its own sequence reads
   it back; a host that writes into another sequence's block, or reads a slot other than the one
   written, is refused.

Which slots a step may read (``check_kv_reads``, stateful)
----------------------------------------------------------
Per KV slot the cache records, in the current KV epoch (``PagedKVCache.reset`` starts a new one):
the position it was written for (-1: never written), the prefix tag of the token written there and
the prefix tag of its predecessor at the time.  The prefix tag of position j of a sequence is
T_j = sum_{i <= j} A[token_i] * C[i] mod P, in two independent components (P = 2^31 - 1, A and C
tables drawn from the CSPRNG at start, secret, never sent), so it names the whole prefix 0..j.  A
step's sequence s reads its context positions 0 .. c - 1 (c = seq_len - q) through its block
table; every one of those slots must hold (a) a write for exactly that position ("never written
(or written for another position)") and (b) a predecessor tag equal to the tag of the slot the
same table gives for the position before ("written for another prefix"): the chain of slots the
table names is one that was written in order, for one token prefix.  Attacks stopped: reading
never-written or stale slots (after a service restart or a KV epoch change), reading a slot filled
for another position, splicing blocks of different sequences (or a block freed and rewritten) into
one context.  Legitimate sharing (vLLM's prefix caching: identical prefixes, identical tags) passes.
Two query tokens of one step that write the same slot, or a query token that rewrites a slot this
step reads as context, must do so for the same prefix and position (vLLM recomputes the last token
of a fully cached prompt into its cached block); otherwise 422.  A host that does not know A and C
makes two different prefixes collide with probability at most about 4 / P^2 ~ 2^-60 per attempt
(each component is a nonzero degree-2 polynomial in the secret table entries: Schwartz-Zippel), and
every failed attempt is a refused step.

Where it runs: inside the secure service only; it imports neither vLLM nor the host package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["StepRejected", "StepLimits", "model_max_len", "check_step", "check_rows", "PrefixTags",
           "check_kv_reads", "TAG_PRIME"]

TAG_PRIME = (1 << 31) - 1  # each component of a prefix tag lies in [0, P); two components per int64


class StepRejected(Exception):
    """A shielded request the service refuses; carries the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StepLimits:
    """The caps a service puts on every step (see the module docstring)."""

    num_blocks: int
    block_size: int
    max_model_len: int
    max_step_tokens: int
    vocab: int

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_model_len", "max_step_tokens", "vocab"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def max_blocks_per_seq(self) -> int:
        """ceil(max_model_len / block_size): the widest block table a step may carry."""
        return -(-self.max_model_len // self.block_size)


def model_max_len(config, override: int = 0) -> int:
    """max_model_len of a model: ``override`` if > 0 (``SLIP_SHIELDED_MAX_MODEL_LEN``), else the
    config's ``max_position_embeddings``; a model without one needs the override."""
    if override < 0:
        raise ValueError(f"SLIP_SHIELDED_MAX_MODEL_LEN must be >= 0, got {override}")
    if override:
        return int(override)
    value = getattr(config, "max_position_embeddings", None)
    if not value or int(value) < 1:
        raise ValueError("the model config has no max_position_embeddings; set SLIP_SHIELDED_MAX_MODEL_LEN")
    return int(value)


def _first(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask.reshape(-1))[0])


def check_step(frame, limits: StepLimits) -> None:
    """Checks 1-9 of the module docstring on a decoded step frame (``wire.ShieldedStep``); raises
    ``StepRejected`` (413 for the size caps, 422 otherwise) naming the first violation."""
    ids, pos, slots = frame.input_ids, frame.positions, frame.slot_mapping
    qsl, lens, bt = frame.query_start_loc, frame.seq_lens, frame.block_tables
    n, s, width = int(ids.shape[0]), int(lens.shape[0]), int(bt.shape[1])
    bs = limits.block_size
    if n > limits.num_blocks * bs:
        raise StepRejected(422, f"a step holds at most {limits.num_blocks * bs} tokens (the KV cache's slots); "
                                f"this one has {n}")
    if n > limits.max_step_tokens:
        raise StepRejected(413, f"a step carries at most {limits.max_step_tokens} tokens (SLIP_MAX_STEP_TOKENS); "
                                f"this one has {n}")
    if width > limits.max_blocks_per_seq:
        raise StepRejected(413, f"block table of {width} columns; at most ceil(max_model_len / block_size) = "
                                f"{limits.max_blocks_per_seq}")
    if pos.shape != (n,) or slots.shape != (n,) or qsl.shape != (s + 1,) or bt.shape != (s, width) or not 1 <= s <= n:
        raise StepRejected(422, "a step has N >= 1 tokens (input_ids, positions, slot_mapping [N]) and 1 <= S <= N "
                                "sequences (query_start_loc [S+1], seq_lens [S], block_tables [S, B])")
    li = frame.logits_indices
    if li is not None and (int(li.shape[0]) > n or bool(((li < 0) | (li >= n)).any())):
        raise StepRejected(422, f"logits_indices: at most {n} rows, each in [0, {n})")
    q = qsl.diff()
    if bool(((qsl < 0) | (qsl > n)).any()) or int(qsl[0]) != 0 or int(qsl[-1]) != n or bool((q < 1).any()):
        raise StepRejected(422, f"query_start_loc must start at 0, rise by at least 1 per sequence (every sequence "
                                f"has a query token) and end at the step's {n} tokens")
    if bool((lens < q).any()):
        i = _first(lens < q)
        raise StepRejected(422, f"seq_lens[{i}] = {int(lens[i])} is shorter than its {int(q[i])} query tokens")
    if bool((lens > limits.max_model_len).any()):
        i = _first(lens > limits.max_model_len)
        raise StepRejected(422, f"seq_lens[{i}] = {int(lens[i])} exceeds max_model_len {limits.max_model_len}")
    need = (lens + bs - 1) // bs
    if bool((need > width).any()):
        i = _first(need > width)
        raise StepRejected(422, f"sequence {i} of {int(lens[i])} tokens needs {int(need[i])} block-table columns; "
                                f"the table has {width}")
    bad = (bt < 0) | (bt >= limits.num_blocks)
    if bool(bad.any()):
        i = _first(bad)
        r, c = divmod(i, width)
        used = "" if c < int(need[r]) else " (a padding column: the padded attention reads it too)"
        raise StepRejected(422, f"block_tables[{r}, {c}] = {int(bt[r, c])} is not a block of this service "
                                f"[0, {limits.num_blocks}){used}")
    if bool(((ids < 0) | (ids >= limits.vocab)).any()):
        raise StepRejected(422, f"token ids must lie in [0, {limits.vocab})")
    seq_of = torch.repeat_interleave(torch.arange(s), q)
    want_pos = (lens - q)[seq_of] + torch.arange(n) - qsl[:-1][seq_of]
    if not torch.equal(pos, want_pos):
        i = _first(pos != want_pos)
        raise StepRejected(422, f"positions[{i}] = {int(pos[i])}: the query tokens of sequence {int(seq_of[i])} "
                                f"must have positions seq_len - q .. seq_len - 1 in order (expected {int(want_pos[i])})")
    want_slot = bt[seq_of, pos // bs] * bs + pos % bs
    if not torch.equal(slots, want_slot):
        i = _first(slots != want_slot)
        raise StepRejected(422, f"slot_mapping[{i}] = {int(slots[i])} is not the block-table slot {int(want_slot[i])} "
                                f"of sequence {int(seq_of[i])} at position {int(pos[i])}")


def check_rows(payload: torch.Tensor, n: int, limits: StepLimits) -> torch.Tensor:
    """The rows of a MSG_ROWS request for a ready step of ``n`` token rows: one row of at most n
    indices, each in [0, n) (422); returns them flat."""
    rows = payload.reshape(-1)
    if payload.dim() != 2 or payload.shape[0] != 1:
        raise StepRejected(422, f"rows must be one row of token indices in [0, {n})")
    if int(rows.shape[0]) > n:
        raise StepRejected(413, f"a logits request asks for at most the ready step's {n} rows, not {int(rows.shape[0])}")
    if bool(((rows < 0) | (rows >= n)).any()):
        raise StepRejected(422, f"rows must be one row of token indices in [0, {n})")
    return rows


class PrefixTags:
    """The secret tables A [vocab] and C [max_len] (two components each, entries in [1, P)) of the
    prefix tags (see "Which slots a step may read").  ``tokens(ids, positions)`` -> the two
    components of A[id] * C[pos] mod P per token, int64 [2, N]."""

    def __init__(self, vocab: int, max_len: int):
        from secure_service.masks import csprng_field_elements

        if vocab < 1 or max_len < 1:
            raise ValueError("vocab and max_len must be >= 1")
        self.vocab, self.max_len = int(vocab), int(max_len)
        self._a = csprng_field_elements((2, self.vocab), TAG_PRIME - 1) + 1
        self._c = csprng_field_elements((2, self.max_len), TAG_PRIME - 1) + 1

    def tokens(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._a[:, ids] * self._c[:, positions] % TAG_PRIME  # < 2^62: exact in int64


def _pack(h: torch.Tensor) -> torch.Tensor:
    return h[0] * (1 << 31) + h[1]


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t >> 31, t & TAG_PRIME])


def check_kv_reads(cache, tags: PrefixTags, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                   block_tables) -> Tuple[torch.Tensor, torch.Tensor]:
    """The stateful check (module docstring) on an already validated int64 batch: raises ValueError
    naming the first bad read; returns the (tag, predecessor tag) each query token's slot will
    record, for ``PagedKVCache.mark_written``."""
    bs = cache.block_size
    q = query_start_loc.diff()
    ctx = seq_lens - q                                       # context tokens read from the cache
    s = int(ctx.shape[0])
    width = int(ctx.max()) if s else 0
    read: Optional[torch.Tensor] = None
    if width > 0:
        # [S, width] padded: slot of context position j of sequence s (valid where j < ctx[s])
        j = torch.arange(width)
        valid = j[None, :] < ctx[:, None]
        slots = block_tables.index_select(1, j // bs) * bs + j % bs
        got = cache.written_pos[slots]
        bad = valid & (got != j[None, :])
        if bool(bad.any()):
            r, c = divmod(_first(bad), width)
            held = int(got[r, c])
            raise ValueError(f"read of a KV slot never written (or written for another position): sequence {r} "
                             f"reads slot {int(slots[r, c])} for position {c}, which holds "
                             + ("nothing" if held < 0 else f"position {held}"))
        tag, prev = cache.tag[slots], cache.prev[slots]
        bad = valid[:, 1:] & (prev[:, 1:] != tag[:, :-1])
        bad0 = valid[:, 0] & (prev[:, 0] != 0)
        if bool(bad.any()) or bool(bad0.any()):
            r, c = divmod(_first(torch.cat([bad0[:, None], bad], 1)), width)
            raise ValueError(f"read of a KV slot written for another prefix: sequence {r} reads slot "
                             f"{int(slots[r, c])} for position {c}, but it follows another chain of tokens "
                             f"(a block of another sequence, or one rewritten since)")
        read = slots[valid]
    # tags of the query tokens: the context's last tag plus the running sum within the sequence
    f = tags.tokens(input_ids, positions)                    # [2, N]
    last = (ctx - 1).clamp(min=0)
    last_slot = block_tables[torch.arange(s), last // bs] * bs + last % bs
    base = torch.where(ctx > 0, cache.tag[last_slot], torch.zeros((), dtype=torch.int64))
    seq_of = torch.repeat_interleave(torch.arange(s), q)
    run = f.cumsum(1)
    before = (run - f)[:, query_start_loc[:-1]]              # running sum before each sequence's first token
    h = (_unpack(base)[:, seq_of] + run - before[:, seq_of]) % TAG_PRIME
    tag_new = _pack(h)
    prev_new = _pack((h - f) % TAG_PRIME)
    # one slot written twice in this step: only for one prefix and position
    order = torch.argsort(slot_mapping, stable=True)
    ss, ts, ps = slot_mapping[order], tag_new[order], positions[order]
    dup = ss[1:] == ss[:-1]
    if bool((dup & ((ts[1:] != ts[:-1]) | (ps[1:] != ps[:-1]))).any()):
        i = _first(dup & ((ts[1:] != ts[:-1]) | (ps[1:] != ps[:-1])))
        raise ValueError(f"two query tokens of the step write KV slot {int(ss[i])} for different prefixes or positions")
    # a slot this step reads as context, rewritten by a query token: only for the same prefix and position
    if read is not None:
        is_read = torch.zeros(cache.num_slots, dtype=torch.bool)
        is_read[read] = True
        hit = is_read[slot_mapping]
        if bool(hit.any()):
            hs = slot_mapping[hit]
            if not (torch.equal(cache.tag[hs], tag_new[hit]) and torch.equal(cache.written_pos[hs], positions[hit])):
                raise ValueError("a query token rewrites a KV slot this step reads as context, for another prefix "
                                 "or position")
    return tag_new, prev_new
