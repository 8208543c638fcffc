"""TRUSTED side: how large a data-plane message may be, computed from the model's shapes.

What this module owns
---------------------
``body_limits(bundle, max_step_tokens, ...)``: the largest request or reply any data-plane endpoint
of this bundle carries for a step of ``max_step_tokens`` token rows, and the widths it came from.
The service uses it (``app.create_app``) as the HTTP body cap and as the shared-memory channel's
capacity per direction (virtual memory: only the pages a message touches are used), unless
``SLIP_MAX_BODY_BYTES`` overrides it; ``/v1/info`` reports ``max_step_tokens`` and
``max_body_bytes`` so the host can check at start that its batches fit.

Why from the shapes: a fixed cap is wrong both ways.  256 MiB refused a 7B-class prefill answer
(2 048 tokens x 28 672 gate_up outputs x 8 bytes = 470 MB), and a cap far above what the model can
ever need lets one request make the service buffer that much.

The widest row, per protocol (every size is per token row):
* ``split``: the input rows (float32, 4 bytes per feature; bfloat16/float16 are smaller) and the
  reply (same dtype) of a linear; a request may fuse the tensors of one module that share an input
  (q, k, v; gate, up), so the output width is the sum over such a group; an embedding request
  carries one int32 token id per row and answers float32 rows of the model's width.
* ``shielded``: x~ and y~ are int64 field elements (8 bytes) of each masked GEMM's input and output
  width, the LM head's y~ (8 x vocabulary) included, which makes it the widest row of a Llama-3-class
  model; the logits are float32 over the vocabulary; a step frame carries, per token, input_ids,
  positions, slot_mapping, logits_indices, query_start_loc and seq_lens (at most one sequence per
  token) and a block-table row of at most ceil(max_model_len / block_size) int64 entries; a
  MSG_ROWS request one int64 per row.
Cap = max_step_tokens x the widest row + ``HEADER_BYTES`` (room for every frame header, the
tensor-id list, layer keys and the identity fields of the headers).
"""

from __future__ import annotations

from typing import Dict, Optional

from secure_service.bundle import Bundle, is_embedding

__all__ = ["HEADER_BYTES", "body_limits"]

HEADER_BYTES = 4096


def _split_row_bytes(bundle: Bundle) -> Dict[str, int]:
    groups: Dict[tuple, int] = {}
    widest_in = widest_embed = 0
    for t in bundle.tensors:
        m, n = (int(x) for x in t.entry.shape)
        if is_embedding(t):
            widest_embed = max(widest_embed, n)
            continue
        widest_in = max(widest_in, n)
        module = t.entry.name.rsplit(".", 2)[0] if t.entry.name.count(".") >= 2 else t.entry.name
        groups[(module, n)] = groups.get((module, n), 0) + m
    widest_out = max([widest_embed, *groups.values()], default=0)
    return {"input": 4 * widest_in, "output": 4 * widest_out}


def _shielded_row_bytes(bundle: Bundle, max_blocks_per_seq: int) -> Dict[str, int]:
    widest = 0
    vocab = 0
    for e in bundle.manifest.tensors:
        m, n = (int(x) for x in e.shape)
        widest = max(widest, m, n)
        if e.name == "lm_head":
            vocab = m
    return {"masked_gemm": 8 * widest, "logits": 4 * vocab, "step_frame": 8 * (6 + max_blocks_per_seq),
            "logits_rows": 8}


def body_limits(bundle: Bundle, max_step_tokens: int, *, max_blocks_per_seq: Optional[int] = None) -> dict:
    """{"max_step_tokens", "max_body_bytes", "row_bytes": {what: bytes per row}} for this bundle.
    max_blocks_per_seq: the shielded service's block-table width cap (required for shielded)."""
    if max_step_tokens < 1:
        raise ValueError(f"SLIP_MAX_STEP_TOKENS must be >= 1, got {max_step_tokens}")
    if bundle.protocol == "shielded":
        if max_blocks_per_seq is None:
            raise ValueError("a shielded bundle's body cap needs the block-table width cap")
        rows = _shielded_row_bytes(bundle, int(max_blocks_per_seq))
    else:
        rows = _split_row_bytes(bundle)
    widest = max(rows.values())
    return {"max_step_tokens": int(max_step_tokens), "max_body_bytes": int(max_step_tokens) * widest + HEADER_BYTES,
            "row_bytes": rows}
