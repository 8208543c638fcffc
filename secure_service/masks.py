"""TRUSTED side: one-time masks of protocol ``shielded`` and where they come from.

What this module owns
---------------------
* ``csprng_field_elements``: exactly uniform elements of Z_p from the operating system's CSPRNG;
* ``MaskBatch``: the masks r [rows, n] of one step of one layer with their images
  W_q r mod p [rows, m], used once and then overwritten;
* ``MaskProvider``: the one replaceable object that says where masks come from (like CrypTen's
  provider of correlated randomness): ``take(layer_id, rows) -> MaskBatch``;
* ``PooledMaskProvider``: fresh pairs precomputed by a background thread into a bounded pool per
  layer, computed on demand when the pool is empty;
* ``MaskAuditRecorder``: an optional keyed fingerprint of every mask row handed out, so a test or an
  evaluation can prove that no row was ever handed out twice.

Where it runs and what it holds
-------------------------------
Inside the secure service only.  Masks are secrets: anyone who holds r and sees x~ = x_q + r learns
x_q.  Nothing here is ever sent to the host; the host sees only x~, which is uniform in Z_p^n
whatever x_q is, because r is.  This package must never import vLLM.

Rules this code enforces (brief §6)
-----------------------------------
* Fresh, full-dimensional masks: every row of r is n independent uniform draws from Z_p, made from
  the OS CSPRNG, used for exactly one token row of one layer, then overwritten.
* Never reuse and never combine: a pooled pair is handed out once (the pool's copy is zeroed as it
  is handed out); when the pool is empty the pair is computed on demand instead of reusing or
  mixing stored ones.  Forming masks as linear combinations of a stored basis (to save the
  O(m*n) work of W_q r) is the flaw of arXiv 2602.11088: the masked traffic then lives in a
  low-dimensional affine subspace and the host recovers the basis and the plaintexts algebraically.
  The precompute cost O(m*n) per row is the price of information-theoretic hiding, and is reported
  by ``stats()``.

Why the OS CSPRNG and not ``torch.randint`` with a seed
--------------------------------------------------------
torch's CPU generator is MT19937 (CUDA: Philox with a 64-bit seed); neither is a cryptographic
generator.  The host can make x_q known or constant (chosen prompts, zero padding rows, a layer whose
input it can predict), which turns x~ into raw generator output; MT19937's state follows from 624
consecutive 32-bit outputs and a 64-bit seed can be searched, after which every later mask, and so
every plaintext, is known.  ``torch.randint(0, p)`` also reduces a 64-bit draw modulo p, which is
slightly non-uniform.  Here each element is ceil(log2 p) bits of ``os.urandom`` (getrandom(2),
ChaCha20 in the kernel), accepted if below p and redrawn otherwise (rejection sampling), which is
exactly uniform on [0, p).

Memory hygiene is best effort: mask tensors are zeroed when handed out or destroyed, but Python
and torch may have made transient copies (the random bytes object, GEMM limb buffers) that are freed
without being overwritten.
"""

from __future__ import annotations

import abc
import hashlib
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from slip_vllm.core.quantize import PublicWeight
from slip_vllm.settings import settings

__all__ = [
    "csprng_field_elements",
    "MaskBatch",
    "MaskProvider",
    "PooledMaskProvider",
    "MaskAuditRecorder",
    "MaskStats",
]


# ---------------------------------------------------------------------------------------------
# uniform field elements from the CSPRNG
# ---------------------------------------------------------------------------------------------


def csprng_field_elements(shape: Union[int, Tuple[int, ...]], p: int) -> torch.Tensor:
    """int64 tensor of the given shape, i.i.d. exactly uniform on [0, p), from ``os.urandom``.

    Rejection sampling: draw b = bits(p-1) random bits per candidate (8 bytes read, top bits
    masked off), keep candidates below p.  Each candidate is accepted with probability
    p / 2^b > 1/2; accepted values are uniform on [0, p) and independent of the rejected ones.
    """
    if isinstance(p, bool) or not isinstance(p, int) or not 2 <= p < (1 << 62):
        raise ValueError(f"p must be an int in [2, 2^62), got {p!r}")
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    need = int(np.prod(shape, dtype=np.int64)) if shape else 1
    out = np.empty(need, dtype=np.int64)
    bits = (p - 1).bit_length()
    keep = np.uint64((1 << bits) - 1)
    accept = p / float(1 << bits)
    filled = 0
    while filled < need:
        left = need - filled
        draw = int(left / accept * 1.05) + 16
        cand = np.frombuffer(os.urandom(8 * draw), dtype="<u8") & keep
        cand = cand[cand < np.uint64(p)]
        k = min(left, cand.shape[0])
        out[filled:filled + k] = cand[:k].astype(np.int64)
        filled += k
        cand.fill(0)
    return torch.from_numpy(out).reshape(shape)


# ---------------------------------------------------------------------------------------------
# batches, the interface, the audit hook
# ---------------------------------------------------------------------------------------------


@dataclass
class MaskBatch:
    """One-time masks of one step of one layer.

    r: int64 [rows, n], uniform in [0, p); wr: int64 [rows, m] = (r @ W_q^T) mod p.  Row t masks
    token row t of this step only.  ``destroy()`` overwrites both; a destroyed batch cannot be read.
    """

    layer_id: Hashable
    r: torch.Tensor
    wr: torch.Tensor
    _destroyed: bool = field(default=False, repr=False)

    @property
    def rows(self) -> int:
        return int(self.r.shape[0])

    def destroy(self) -> None:
        if not self._destroyed:
            self.r.zero_()
            self.wr.zero_()
            self._destroyed = True

    @property
    def destroyed(self) -> bool:
        return self._destroyed


class MaskAuditRecorder:
    """Keyed fingerprints of every mask row handed out, to prove that no row was used twice.

    A fingerprint is BLAKE2b-128 keyed with a random per-recorder key, so the audit log reveals
    nothing about the masks (a plain hash of a short row could be inverted by search).  A repeat
    of any row, in any layer, is recorded in ``duplicates``.  For tests and evaluations: it costs
    one hash per row.
    """

    def __init__(self, key: Optional[bytes] = None):
        self._key = key if key is not None else os.urandom(32)
        self._seen: Dict[bytes, Hashable] = {}
        self._lock = threading.Lock()
        self.rows_recorded = 0
        self.duplicates: List[Tuple[Hashable, Hashable]] = []  # (first layer, repeating layer)
        self.rows_per_layer: Dict[Hashable, int] = {}

    def fingerprint(self, row: torch.Tensor) -> bytes:
        data = row.detach().to(torch.int64).contiguous().numpy().tobytes()
        return hashlib.blake2b(data, key=self._key, digest_size=16).digest()

    def record(self, layer_id: Hashable, r: torch.Tensor) -> None:
        fps = [self.fingerprint(row) for row in r]
        with self._lock:
            for fp in fps:
                if fp in self._seen:
                    self.duplicates.append((self._seen[fp], layer_id))
                else:
                    self._seen[fp] = layer_id
            self.rows_recorded += len(fps)
            self.rows_per_layer[layer_id] = self.rows_per_layer.get(layer_id, 0) + len(fps)

    @property
    def unique_rows(self) -> int:
        with self._lock:
            return len(self._seen)


@dataclass
class MaskStats:
    pool_hits: int = 0            # rows served from the precomputed pool
    pool_misses: int = 0          # rows computed on demand because the pool was empty
    rows_generated: int = 0       # rows made (background + on demand)
    precompute_seconds: float = 0.0  # background thread time spent making pairs
    on_demand_seconds: float = 0.0   # time takers spent making pairs themselves
    pooled_rows: int = 0          # rows in the pools now

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class MaskProvider(abc.ABC):
    """Where masks come from: one replaceable object.

    ``take(layer_id, rows)`` returns a ``MaskBatch`` that no other call ever returns (not in full,
    not in part, not combined).  Implementations must draw every row fresh from a CSPRNG.
    """

    p: int

    @abc.abstractmethod
    def take(self, layer_id: Hashable, rows: int) -> MaskBatch: ...

    @abc.abstractmethod
    def shape(self, layer_id: Hashable) -> Tuple[int, int]:
        """(m, n) of the layer's public weight."""

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# the pooled provider
# ---------------------------------------------------------------------------------------------


class _Chunk:
    __slots__ = ("r", "wr", "offset")

    def __init__(self, r: torch.Tensor, wr: torch.Tensor):
        self.r, self.wr, self.offset = r, wr, 0

    @property
    def remaining(self) -> int:
        return int(self.r.shape[0]) - self.offset


class _LayerPool:
    def __init__(self, weight: PublicWeight):
        self.weight = weight
        self.chunks: deque = deque()
        self.level = 0      # rows ready in chunks
        self.reserved = 0   # rows being made right now (counted against pool_rows)
        self.lock = threading.Lock()


class PooledMaskProvider(MaskProvider):
    """Fresh (r, W_q r mod p) pairs, precomputed ahead of demand, on demand when the pool is empty.

    weights: layer id -> ``PublicWeight`` (or an int8/int16 W_q [m, n], wrapped for p).
    pool_rows: rows kept ready per layer (default ``SLIP_MASK_POOL_ROWS``; 0: on demand only, no
    thread).  chunk_rows: rows per background batch (default ``SLIP_MASK_PRECOMPUTE_CHUNK``).
    recorder: an optional ``MaskAuditRecorder``.  start: start the background thread now.

    One background thread per provider refills the emptiest pool first.  ``take`` claims rows of
    the pool under the layer's lock (each row is claimed by exactly one caller), copies them out and
    overwrites the pool's copy, and computes the rest on demand in the caller's thread.  Memory:
    8*(n+m) bytes per pooled row.
    """

    def __init__(self, weights: Mapping[Hashable, Union[PublicWeight, torch.Tensor]], p: int, *,
                 pool_rows: Optional[int] = None, chunk_rows: Optional[int] = None,
                 recorder: Optional[MaskAuditRecorder] = None, start: bool = True,
                 backend: Optional[str] = None):
        cfg = settings()
        self.p = p
        self.pool_rows = cfg.mask_pool_rows if pool_rows is None else int(pool_rows)
        self.chunk_rows = cfg.mask_precompute_chunk if chunk_rows is None else int(chunk_rows)
        if self.pool_rows < 0 or self.chunk_rows < 1:
            raise ValueError("pool_rows must be >= 0 and chunk_rows >= 1")
        self.recorder = recorder
        self.backend = backend
        self._layers: Dict[Hashable, _LayerPool] = {}
        for lid, w in weights.items():
            pw = w if isinstance(w, PublicWeight) else PublicWeight(w, p)
            if pw.p != p:
                raise ValueError(f"layer {lid!r}: weight prepared for p={pw.p}, provider uses p={p}")
            self._layers[lid] = _LayerPool(pw)
        self._stats = MaskStats()
        self._stats_lock = threading.Lock()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None  # set if the background thread died
        if start:
            self.start()

    # -- public API ---------------------------------------------------------------------------

    def shape(self, layer_id: Hashable) -> Tuple[int, int]:
        return self._layer(layer_id).weight.shape

    def start(self) -> None:
        if self._thread is None and self.pool_rows > 0 and self._layers:
            self._thread = threading.Thread(target=self._fill_loop, name="slip-mask-precompute", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the background thread and overwrite every pooled pair."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for pool in self._layers.values():
            with pool.lock:
                for chunk in pool.chunks:  # rows below offset may be being copied by a taker
                    chunk.r[chunk.offset:].zero_()
                    chunk.wr[chunk.offset:].zero_()
                pool.chunks.clear()
                pool.level = 0

    def take(self, layer_id: Hashable, rows: int) -> MaskBatch:
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"rows must be a non-negative int, got {rows!r}")
        pool = self._layer(layer_id)
        claimed: List[Tuple[_Chunk, int, int]] = []
        got = 0
        with pool.lock:  # bookkeeping only: claim rows [lo, hi) of pooled chunks for this caller
            while got < rows and pool.chunks:
                chunk = pool.chunks[0]
                k = min(rows - got, chunk.remaining)
                claimed.append((chunk, chunk.offset, chunk.offset + k))
                chunk.offset += k
                if chunk.remaining == 0:
                    pool.chunks.popleft()
                got += k
                pool.level -= k
        if got:
            with self._cv:
                self._cv.notify_all()  # wake the filler
        # claimed rows belong to this caller alone (no one else reads below a chunk's offset and
        # the filler never writes into existing chunks), so they are copied out without the lock
        # and then overwritten in the pool: they can never be handed out again
        parts_r = [c.r[lo:hi] for c, lo, hi in claimed]
        parts_wr = [c.wr[lo:hi] for c, lo, hi in claimed]
        missing = rows - got
        if missing:
            t0 = time.perf_counter()
            r_new, wr_new = self._make(pool.weight, missing)
            dt = time.perf_counter() - t0
            parts_r.append(r_new)
            parts_wr.append(wr_new)
        with self._stats_lock:
            self._stats.pool_hits += got
            if missing:
                self._stats.pool_misses += missing
                self._stats.rows_generated += missing
                self._stats.on_demand_seconds += dt
        if not claimed and missing:
            r, wr = parts_r[0], parts_wr[0]  # freshly made for this caller: no copy needed
        elif parts_r:
            r, wr = torch.cat(parts_r), torch.cat(parts_wr)
            for t in parts_r + parts_wr:
                t.zero_()
        else:
            m, n = pool.weight.shape
            r = torch.empty((0, n), dtype=torch.int64)
            wr = torch.empty((0, m), dtype=torch.int64)
        if self.recorder is not None:
            self.recorder.record(layer_id, r)
        return MaskBatch(layer_id=layer_id, r=r, wr=wr)

    def stats(self) -> dict:
        with self._stats_lock:
            s = MaskStats(**self._stats.as_dict())
        s.pooled_rows = sum(pool.level for pool in self._layers.values())
        d = s.as_dict()
        d["seconds_per_row_precompute"] = (s.precompute_seconds / max(1, s.rows_generated - s.pool_misses)
                                           if s.rows_generated > s.pool_misses else None)
        d["seconds_per_row_on_demand"] = s.on_demand_seconds / s.pool_misses if s.pool_misses else None
        d["background_error"] = None if self.error is None else repr(self.error)
        return d

    def prefill(self) -> None:
        """Fill every pool to pool_rows in the calling thread (e.g. before accepting traffic)."""
        for pool in self._layers.values():
            while self._refill_once(pool):
                pass

    def pooled(self, layer_id: Hashable) -> int:
        return self._layer(layer_id).level

    def wait_filled(self, timeout: float = 30.0) -> bool:
        """Block until every layer's pool holds pool_rows rows (True) or the timeout passes."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                if all(pool.level >= self.pool_rows for pool in self._layers.values()):
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None or self._thread is None:
                    return False
                self._cv.wait(min(left, 0.1))

    # -- internals ----------------------------------------------------------------------------

    def _layer(self, layer_id: Hashable) -> _LayerPool:
        try:
            return self._layers[layer_id]
        except KeyError:
            raise KeyError(f"unknown layer {layer_id!r}") from None

    def _make(self, weight: PublicWeight, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """rows fresh pairs: r uniform in Z_p^n from the CSPRNG, wr = W_q r mod p (exact)."""
        r = csprng_field_elements((rows, weight.n), self.p)
        wr = weight.matmul(r, backend=self.backend)
        return r, wr

    def _refill_once(self, pool: _LayerPool) -> bool:
        """Make one chunk for pool if it is below pool_rows; False if it was full."""
        with pool.lock:
            rows = min(self.chunk_rows, self.pool_rows - pool.level - pool.reserved)
            if rows <= 0:
                return False
            pool.reserved += rows
        try:
            t0 = time.perf_counter()
            r, wr = self._make(pool.weight, rows)
            dt = time.perf_counter() - t0
        except BaseException:
            with pool.lock:
                pool.reserved -= rows
            raise
        with pool.lock:
            pool.chunks.append(_Chunk(r, wr))
            pool.level += rows
            pool.reserved -= rows
        with self._stats_lock:
            self._stats.rows_generated += rows
            self._stats.precompute_seconds += dt
        return True

    def _neediest(self) -> Optional[_LayerPool]:
        best, best_level = None, None
        for pool in self._layers.values():
            level = pool.level + pool.reserved
            if level < self.pool_rows and (best_level is None or level < best_level):
                best, best_level = pool, level
        return best

    def _fill_loop(self) -> None:
        try:
            while True:
                with self._cv:
                    if self._stop:
                        return
                    pool = self._neediest()
                    if pool is None:
                        self._cv.wait(0.5)
                        continue
                self._refill_once(pool)
                with self._cv:
                    self._cv.notify_all()
        except BaseException as exc:  # pragma: no cover - surfaced through .error and on-demand takes
            self.error = exc
