"""Which block of each protected weight a vLLM rank holds, and the segments it asks the service for.

What this module owns (pure code, no vLLM)
------------------------------------------
Under tensor parallelism every rank holds a block of each weight: column-parallel layers (fused
qkv, GQA kv heads possibly replicated on several ranks, gate_up, the LM head's vocab shard) some of
its output rows, row-parallel layers (o, down) some of its input columns, the vocab-parallel
embedding some vocab rows followed by zero padding.  Rather than a per-model table of how vLLM
shards each layer, the slip loader runs vLLM's own weight loader a second and third time, on
*index-encoding* tensors (every element holds its checkpoint row number + 1, then its column
number + 1, exact in float32 below 2^24) into a zeroed float32 scratch copy of the parameter, and
reads back where each checkpoint row and column landed (``read_probe``).  Whatever the loader did
(narrowing by rank, GQA replica arithmetic, fused checkpoint tensors split into q/k/v, vocab
padding), the scratch records it; the steps here then turn that into segments:

  1. ``read_probe``: the touched area must be a rectangle (touched rows x touched columns) and
     every row (column) must carry one checkpoint row (column) number; gives ``row_map`` /
     ``col_map`` (local index -> checkpoint index, -1 where untouched);
  2. ``segments_for_load``: the touched local rows are cut into maximal runs whose checkpoint rows
     are consecutive (one run per tensor for vLLM's usual layouts; three for a fused checkpoint
     tensor such as GPT-2's c_attn); the touched columns must be one such run;
  3. ``layer_segments``: the segments of all tensors loaded into one layer, in local row order,
     must tile the layer's output rows from 0 without gaps (only vocab padding may follow) and
     read the same input columns, which must be all the layer's local input columns, in order.
     If every segment is a whole tensor named once (TP 1, replicated layers) the layer sends
     plain ``SLQ1`` frames; otherwise its frames carry the ranges (``SLQ2``, ``core.wire``).

A layout that fails a step (a permuted or strided shard) is refused at start with ``ShardingError``
rather than served with wrong rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROBE_LIMIT = 2**24  # float32 holds every integer below this exactly


class ShardingError(ValueError):
    pass


@dataclass(frozen=True)
class Segment:
    """Local output rows [local_row, local_row + r1 - r0) of a layer are checkpoint rows [r0, r1)
    of tensor ``tensor_id``, computed from checkpoint input columns [c0, c1), which are the layer's
    local input columns [local_col, local_col + c1 - c0)."""

    tensor_id: int
    local_row: int
    r0: int
    r1: int
    local_col: int
    c0: int
    c1: int

    @property
    def range(self) -> tuple[int, int, int, int]:
        return (self.r0, self.r1, self.c0, self.c1)


def index_probe(shape: tuple[int, int], dim: int) -> torch.Tensor:
    """A [m, n] float32 view (no memory beyond one row or column) whose elements hold their index
    along ``dim`` plus one (0 stays free for "untouched")."""
    m, n = shape
    if max(m, n) >= PROBE_LIMIT:
        raise ShardingError(f"a {m} x {n} weight is too large to probe exactly in float32")
    idx = torch.arange(1, shape[dim] + 1, dtype=torch.float32)
    return (idx[:, None] if dim == 0 else idx[None, :]).expand(m, n)


def read_probe(rows_probe: torch.Tensor, cols_probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_map, col_map) from the scratch parameters filled from the row and column probes."""
    if rows_probe.dim() != 2 or rows_probe.shape != cols_probe.shape:
        raise ShardingError("probe scratch must be two matrices of one shape")
    rows_probe, cols_probe = rows_probe.float().cpu(), cols_probe.float().cpu()
    touched = rows_probe > 0
    rows_t, cols_t = touched.any(1), touched.any(0)
    if not torch.equal(touched, rows_t[:, None] & cols_t[None, :]) or not torch.equal(touched, cols_probe > 0):
        raise ShardingError("the loader filled a region that is not a block of whole rows and columns")
    big = torch.tensor(float(PROBE_LIMIT))
    rmax = torch.where(touched, rows_probe, -big).amax(1)
    rmin = torch.where(touched, rows_probe, big).amin(1)
    cmax = torch.where(touched, cols_probe, -big).amax(0)
    cmin = torch.where(touched, cols_probe, big).amin(0)
    if not (torch.equal(rmax[rows_t], rmin[rows_t]) and torch.equal(cmax[cols_t], cmin[cols_t])):
        raise ShardingError("the loader mixed checkpoint rows or columns inside one parameter row or column")
    row_map = torch.where(rows_t, rmax - 1, torch.tensor(-1.0)).long()
    col_map = torch.where(cols_t, cmax - 1, torch.tensor(-1.0)).long()
    return row_map, col_map


def _runs(mapping: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs (local_start, source_start, length) where local and source both step by one."""
    local = torch.nonzero(mapping >= 0).flatten().tolist()
    src = mapping[mapping >= 0].tolist()
    runs: list[list[int]] = []
    for p, s in zip(local, src):
        if runs and p == runs[-1][0] + runs[-1][2] and s == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([p, s, 1])
    return [tuple(r) for r in runs]


def segments_for_load(tensor_id: int, row_map: torch.Tensor, col_map: torch.Tensor) -> list[Segment]:
    col_runs = _runs(col_map)
    if len(col_runs) != 1:
        raise ShardingError(f"tensor {tensor_id}: the rank's input columns are not one consecutive run "
                            f"of checkpoint columns ({len(col_runs)} runs)")
    (lc, c0, width), = col_runs
    segs = [Segment(tensor_id, lr, r0, r0 + n, lc, c0, c0 + width) for lr, r0, n in _runs(row_map)]
    if not segs:
        raise ShardingError(f"tensor {tensor_id}: the loader put none of its rows on this rank")
    return segs


def layer_segments(segments: list[Segment], out_width: int, in_width: int, shapes: dict[int, tuple[int, int]],
                   *, padding_ok: bool = False) -> tuple[tuple[int, ...], tuple | None, int]:
    """(tensor ids, ranges or None, secret width) of one layer.  shapes: tensor id -> (m, n) of the
    whole tensor.  padding_ok: rows after the segments may stay without secret (vocab padding)."""
    segs = sorted(segments, key=lambda s: s.local_row)
    at = 0
    for s in segs:
        if s.local_row != at:
            raise ShardingError(f"local rows [{at}, {s.local_row}) of the layer receive no protected row "
                                f"(partly protected or overlapping shards are not supported)")
        at += s.r1 - s.r0
    if at > out_width or (at != out_width and not padding_ok):
        raise ShardingError(f"protected rows cover {at} of the layer's {out_width} local outputs")
    cols = {(s.local_col, s.c0, s.c1) for s in segs}
    if len(cols) != 1:
        raise ShardingError("the tensors of one fused layer read different input columns")
    (lc, c0, c1), = cols
    if lc != 0 or c1 - c0 != in_width:
        raise ShardingError(f"the rank's input columns [{lc}, {lc + c1 - c0}) are not its {in_width} local inputs")
    ids = tuple(s.tensor_id for s in segs)
    whole = len(set(ids)) == len(ids) and all(
        (s.r0, s.r1, s.c0, s.c1) == (0, shapes[s.tensor_id][0], 0, shapes[s.tensor_id][1]) for s in segs)
    return ids, (None if whole else tuple(s.range for s in segs)), at
