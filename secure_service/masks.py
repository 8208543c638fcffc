"""TRUSTED side: one-time masks of protocol ``shielded`` and where they come from.

What this module owns
---------------------
* re-exports ``csprng_field_elements`` (``slip_vllm.core.csprng``): exactly uniform elements of Z_p
  from the operating system's CSPRNG;
* ``MaskBatch``: the masks r [rows, n] of one step of one layer with their images
  W_q r mod p [rows, m], used once and then overwritten;
* ``MaskProvider``: the one replaceable object that says where masks come from (like CrypTen's
  provider of correlated randomness): ``take(layer_id, rows) -> MaskBatch``;
* ``PooledMaskProvider``: fresh pairs precomputed by a background thread into a bounded pool per
  layer (sized from the expected load: ``SLIP_MASK_POOL_CONCURRENT_ROWS`` x ``SLIP_MASK_POOL_STEPS``
  rows, or ``SLIP_MASK_POOL_ROWS``), refilled in large batches, computed on demand when the pool
  is empty, with demand and refill rates in ``stats()``;
* ``select_precompute_backend``: which exact CPU field GEMM of ``slip_vllm.core.field`` makes the
  images W_q r fastest on this machine (measured once per process);
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
slightly non-uniform.  Here each element is b = bits(p-1) bits of ``os.urandom`` (getrandom(2),
ChaCha20 in the kernel), taken from ceil(b/8) bytes, accepted if below p and redrawn otherwise
(rejection sampling), which is exactly uniform on [0, p).

Sizing the pool for load
------------------------
Every token row of every masked GEMM consumes one pair, so a pool that covers the expected load
holds, per layer, the rows one engine step carries (``SLIP_MASK_POOL_CONCURRENT_ROWS``, e.g. the
largest number of concurrently decoding sequences) times the steps of headroom
(``SLIP_MASK_POOL_STEPS``); ``SLIP_MASK_POOL_ROWS`` >= 0 overrides the product.  A pooled row takes
8*(n+m) bytes (int64 r and W_q r); the provider logs the total when it starts and ``stats()``
reports it.  Demand above the pool (a long prefill) is made on demand, in the taker's thread.

The background filler
---------------------
* Batches: the images are one GEMM per batch, whose rows/s grows with the batch up to about 128
  rows and falls again at 512 (``benchmarks/bench_masks.py``, per backend and batch size, measured
  on an AVX2 EPYC and an AMX Xeon: docs/BENCHMARKS.md), hence ``SLIP_MASK_PRECOMPUTE_CHUNK`` = 128;
  the backend is chosen by ``select_precompute_backend``.  A layer is refilled when its pool
  (ready + being made) falls to the low-water mark capacity - min(chunk, capacity/2), so while
  demand continues a refill is min(chunk, capacity/2) rows or more (capped only by a layer's
  ``max_gemm_rows``, which bounds one GEMM's temporaries to 256 MiB: the LM head of a 128k-token
  vocabulary gets about 30 rows per GEMM); a layer whose pool has not been drawn from for
  ``_TOPUP_IDLE_S`` (1 s) is topped up to full in any batch size, so a burst after a pause finds
  full pools.  The emptiest pool (by fraction of its capacity) goes first.  A taker that pushes a
  pool to the low-water mark (or takes from a full one) wakes the filler at once.
* No lock is held while computing: the filler reserves rows under the layer's lock, makes them
  without any lock, then publishes the finished batch under the lock.  Takers never wait for the
  filler: they claim what is ready and compute the rest themselves.
* Priority: the filler lowers its own OS scheduling priority (``SLIP_MASK_PRECOMPUTE_NICE``,
  default +10; per thread on Linux, and the OpenMP workers it starts inherit it), so on a busy
  machine the online path (unmask, glue, mask) runs first and the filler uses the idle cycles.  It
  does not change torch's thread count: ``torch.set_num_threads`` also sets the default of every
  thread that has not yet run a parallel operation (the service's request threads), so the filler
  uses the service's torch thread count (``threads`` of configs/service.yaml).

Memory hygiene is best effort: mask tensors are zeroed when handed out or destroyed, but Python
and torch may have made transient copies (the random bytes object, GEMM limb buffers) that are freed
without being overwritten.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from slip_vllm.core.csprng import csprng_field_elements
from slip_vllm.core.field import limb_count, select_cpu_backend
from slip_vllm.core.quantize import PublicWeight
from slip_vllm.settings import settings

__all__ = [
    "csprng_field_elements",
    "MaskBatch",
    "MaskProvider",
    "PooledMaskProvider",
    "MaskAuditRecorder",
    "MaskStats",
    "select_precompute_backend",
    "pair_bytes",
]

log = logging.getLogger("slip.service")


# ---------------------------------------------------------------------------------------------
# batches, the interface, the audit hook
# ---------------------------------------------------------------------------------------------


def pair_bytes(m: int, n: int) -> int:
    """Bytes of one stored pair (r [n], W_q r [m]) as int64: 8*(n+m)."""
    return 8 * (int(n) + int(m))


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
    """Counters since the provider started (``PooledMaskProvider.stats`` adds rates and levels)."""

    pool_hits: int = 0            # rows served from the precomputed pool
    pool_misses: int = 0          # rows computed on demand because the pool was empty
    rows_generated: int = 0       # rows made (background + prefill + on demand)
    rows_precomputed: int = 0     # rows made ahead of demand (background thread and prefill)
    precompute_batches: int = 0   # batches those rows were made in
    precompute_seconds: float = 0.0  # wall time spent making pairs ahead of demand (the niced filler's
    #                                  batches include the time the online path preempted them)
    on_demand_seconds: float = 0.0   # time takers spent making pairs themselves (on the critical path)
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
# which field GEMM makes W_q r
# ---------------------------------------------------------------------------------------------

def _f64_copy_bytes(weights: Mapping[Hashable, PublicWeight]) -> int:
    """Bytes of the float64 copies of W_q the ``f64`` backend caches (one per int8 digit plane)."""
    return sum(8 * w.m * w.n * (1 if w.bits == 8 else 2) for w in weights.values())


def select_precompute_backend(weights: Mapping[Hashable, PublicWeight], p: int,
                              requested: str = "auto") -> Tuple[str, str]:
    """(backend, why) for making the mask images W_q r of these CPU weights: ``field.select_cpu_backend``
    (the fastest exact backend measured on this machine, ``f64`` skipped when its float64 copies of
    the weights would exceed a quarter of the physical memory)."""
    return select_cpu_backend(limb_count(p), _f64_copy_bytes(weights), requested)


# ---------------------------------------------------------------------------------------------
# rates over a recent window
# ---------------------------------------------------------------------------------------------

_WINDOW_S = 10.0         # the recent window of the rates and level ranges in stats()
_BUCKETS = 20            # the window is kept in this many buckets (so it is exact to 1/20)
_TOPUP_IDLE_S = 1.0      # a pool not drawn from for this long is topped up to full in any batch size
#                         (longer than a typical engine step, so steady decoding refills in big batches)
_CHUNK_TEMP_BYTES = 256 << 20  # rows per GEMM call are capped so its temporaries stay below this
_FILLER_POLL_S = 1.0     # the filler re-checks its state at least this often


class _Rate:
    """Sum of values added in the last ``window`` seconds, in fixed buckets (caller locks)."""

    def __init__(self, window: float = _WINDOW_S, buckets: int = _BUCKETS):
        self.width = window / buckets
        self.buckets = buckets
        self.data: deque = deque()  # [bucket index, sum]

    def add(self, value: float, now: float) -> None:
        i = int(now / self.width)
        if self.data and self.data[-1][0] == i:
            self.data[-1][1] += value
        else:
            self.data.append([i, value])
            self._prune(i)

    def _prune(self, i: int) -> None:
        while self.data and self.data[0][0] <= i - self.buckets:
            self.data.popleft()

    def total(self, now: float) -> float:
        self._prune(int(now / self.width))
        return sum(v for _, v in self.data)


class _LevelRange:
    """Lowest and highest pool level in the last ``window`` seconds, in buckets (caller locks)."""

    def __init__(self, level: int, window: float = _WINDOW_S, buckets: int = _BUCKETS):
        self.width = window / buckets
        self.buckets = buckets
        self.data: deque = deque()  # [bucket index, min, max]
        self.level = level

    def note(self, level: int, now: float) -> None:
        self.level = level
        i = int(now / self.width)
        if self.data and self.data[-1][0] == i:
            b = self.data[-1]
            b[1], b[2] = min(b[1], level), max(b[2], level)
        else:
            self.data.append([i, level, level])
            while self.data[0][0] <= i - self.buckets:
                self.data.popleft()

    def range(self, now: float) -> Tuple[int, int]:
        i = int(now / self.width)
        lo = hi = self.level
        for j, a, b in self.data:
            if j > i - self.buckets:
                lo, hi = min(lo, a), max(hi, b)
        return lo, hi


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
    def __init__(self, layer_id: Hashable, weight: PublicWeight):
        self.layer_id = layer_id
        self.weight = weight
        self.chunks: deque = deque()
        self.level = 0      # rows ready in chunks
        self.reserved = 0   # rows being made right now (counted against the capacity)
        self.last_take = -math.inf  # time.monotonic() of the last take that drew from this pool
        self.levels = _LevelRange(0)
        self.levels.note(0, time.monotonic())
        self.lock = threading.Lock()
        m, n = weight.shape
        # rows per GEMM call: the f64 backend's temporaries are about 8*(2n + 7m) bytes per row
        self.max_gemm_rows = max(1, _CHUNK_TEMP_BYTES // (8 * (2 * n + 7 * m) + pair_bytes(m, n)))


class PooledMaskProvider(MaskProvider):
    """Fresh (r, W_q r mod p) pairs, precomputed ahead of demand, on demand when the pool is empty.

    weights: layer id -> ``PublicWeight`` (or an int8/int16 W_q [m, n], wrapped for p).
    pool_rows: capacity of every layer's pool in rows (default: ``settings().mask_pool_rows_per_layer()``,
    i.e. ``SLIP_MASK_POOL_ROWS`` if >= 0, else ``SLIP_MASK_POOL_CONCURRENT_ROWS`` x
    ``SLIP_MASK_POOL_STEPS``; 0: on demand only, no thread).  chunk_rows: rows per background batch
    (default ``SLIP_MASK_PRECOMPUTE_CHUNK``).  backend: the field GEMM backend for W_q r, or "auto"
    (default ``SLIP_MASK_PRECOMPUTE_BACKEND``; see ``select_precompute_backend``).  nice: the
    filler's priority increment (default ``SLIP_MASK_PRECOMPUTE_NICE``; 0: unchanged).
    recorder: an optional ``MaskAuditRecorder``.  start: start the background thread now.

    ``pool_rows`` and ``chunk_rows`` are plain attributes read at every decision, so they may be
    changed after construction (e.g. before ``prefill``).  Refill policy, priority and locking: see
    the module docstring ("The background filler").  ``take`` claims rows of the pool under the
    layer's lock (each row is claimed by exactly one caller), copies them out and overwrites the
    pool's copy, and computes the rest on demand in the caller's thread.  Memory: 8*(n+m) bytes
    per pooled row, logged at start.
    """

    def __init__(self, weights: Mapping[Hashable, Union[PublicWeight, torch.Tensor]], p: int, *,
                 pool_rows: Optional[int] = None, chunk_rows: Optional[int] = None,
                 recorder: Optional[MaskAuditRecorder] = None, start: bool = True,
                 backend: Optional[str] = None, nice: Optional[int] = None):
        cfg = settings()
        self.p = p
        self.pool_rows = cfg.mask_pool_rows_per_layer() if pool_rows is None else int(pool_rows)
        self.chunk_rows = cfg.mask_precompute_chunk if chunk_rows is None else int(chunk_rows)
        if self.pool_rows < 0 or self.chunk_rows < 1:
            raise ValueError("pool_rows must be >= 0 and chunk_rows >= 1")
        self.nice = cfg.mask_precompute_nice if nice is None else int(nice)
        self.recorder = recorder
        self._layers: Dict[Hashable, _LayerPool] = {}
        for lid, w in weights.items():
            pw = w if isinstance(w, PublicWeight) else PublicWeight(w, p)
            if pw.p != p:
                raise ValueError(f"layer {lid!r}: weight prepared for p={pw.p}, provider uses p={p}")
            self._layers[lid] = _LayerPool(lid, pw)
        requested = backend or cfg.mask_precompute_backend
        if self._layers:
            self.backend, self.backend_reason = select_precompute_backend(
                {k: v.weight for k, v in self._layers.items()}, p, requested)
        else:
            self.backend, self.backend_reason = (None if requested == "auto" else requested), "no layers"
        self._stats = MaskStats()
        self._stats_lock = threading.Lock()
        self._started = time.monotonic()
        self._demand = _Rate()      # rows taken
        self._refill = _Rate()      # rows made ahead of demand
        self._on_demand = _Rate()   # rows made by takers
        self._on_demand_s = _Rate()  # seconds takers spent making them
        self._cv = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None  # set if the background thread died
        if self._layers:
            per_row = sum(pair_bytes(*pool.weight.shape) for pool in self._layers.values())
            log.info("mask pools: %d layers x %d rows each, %.1f MiB when full (%d B per row across the "
                     "layers); precompute backend %s (%s); batches of %d rows, low water %d rows; filler nice +%d",
                     len(self._layers), self.pool_rows, per_row * self.pool_rows / 2**20, per_row, self.backend,
                     self.backend_reason, self.chunk_rows, self.low_water(), self.nice)
        if start:
            self.start()

    # -- public API ---------------------------------------------------------------------------

    def shape(self, layer_id: Hashable) -> Tuple[int, int]:
        return self._layer(layer_id).weight.shape

    def low_water(self) -> int:
        """A layer is refilled when ready + reserved rows fall to this: capacity - min(chunk, capacity/2)."""
        cap = self.pool_rows
        return cap - max(1, min(self.chunk_rows, cap // 2)) if cap > 0 else 0

    def pool_memory_bytes(self) -> int:
        """Bytes all pools hold when full: capacity x 8*(n+m) summed over the layers."""
        return self.pool_rows * sum(pair_bytes(*pool.weight.shape) for pool in self._layers.values())

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
        wake = False
        with pool.lock:  # bookkeeping only: claim rows [lo, hi) of pooled chunks for this caller
            was_full = pool.level + pool.reserved >= self.pool_rows
            while got < rows and pool.chunks:
                chunk = pool.chunks[0]
                k = min(rows - got, chunk.remaining)
                claimed.append((chunk, chunk.offset, chunk.offset + k))
                chunk.offset += k
                if chunk.remaining == 0:
                    pool.chunks.popleft()
                got += k
                pool.level -= k
            if rows:
                now = time.monotonic()
                pool.last_take = now
                pool.levels.note(pool.level, now)
                wake = self.pool_rows > 0 and (was_full or pool.level + pool.reserved <= self.low_water())
        if wake:
            with self._cv:
                self._cv.notify_all()  # the filler sleeps until woken or an idle top-up is due
        # claimed rows belong to this caller alone (no one else reads below a chunk's offset and
        # the filler never writes into existing chunks), so they are copied out without the lock
        # and then overwritten in the pool: they can never be handed out again
        parts_r = [c.r[lo:hi] for c, lo, hi in claimed]
        parts_wr = [c.wr[lo:hi] for c, lo, hi in claimed]
        missing = rows - got
        dt = 0.0
        if missing:
            t0 = time.perf_counter()
            r_new, wr_new = self._make(pool.weight, missing, pool.max_gemm_rows)
            dt = time.perf_counter() - t0
            parts_r.append(r_new)
            parts_wr.append(wr_new)
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
        if rows:
            now = time.monotonic()
            with self._stats_lock:
                self._stats.pool_hits += got
                self._demand.add(rows, now)
                if missing:
                    self._stats.pool_misses += missing
                    self._stats.rows_generated += missing
                    self._stats.on_demand_seconds += dt
                    self._on_demand.add(missing, now)
                    self._on_demand_s.add(dt, now)
        if self.recorder is not None:
            self.recorder.record(layer_id, r)
        return MaskBatch(layer_id=layer_id, r=r, wr=wr)

    def stats(self) -> dict:
        """Counters (``MaskStats``), rates over the last ``_WINDOW_S`` seconds, pool levels.

        Besides the counters: rows_taken (= pool_hits + pool_misses); demand_rows_per_s,
        refill_rows_per_s (rows made ahead of demand), on_demand_rows_per_s and
        on_demand_seconds_per_s (the fraction of wall time takers spent making pairs) over
        ``window_s`` (the last 10 s, or the time since start if shorter); pool_rows_per_layer
        (capacity), pool_low_water_rows, chunk_rows, pool_capacity_rows (all layers),
        pool_memory_bytes (all pools full); pool_level_min / pool_level_max (rows ready now, over
        the layers); layers: per layer (by str(id)) level, capacity and the lowest / highest level
        within the window; backend (and why), filler_nice, filler_running.
        """
        now = time.monotonic()
        with self._stats_lock:
            s = MaskStats(**self._stats.as_dict())
            window = max(1e-3, min(_WINDOW_S, now - self._started))
            demand = self._demand.total(now) / window
            refill = self._refill.total(now) / window
            on_demand = self._on_demand.total(now) / window
            on_demand_s = self._on_demand_s.total(now) / window
        layers = {}
        for lid, pool in self._layers.items():
            with pool.lock:
                lo, hi = pool.levels.range(now)
                layers[str(lid)] = {"level": pool.level, "capacity": self.pool_rows,
                                    "min_level": lo, "max_level": hi}
        s.pooled_rows = sum(v["level"] for v in layers.values())
        d = s.as_dict()
        d["rows_taken"] = s.pool_hits + s.pool_misses
        d["seconds_per_row_precompute"] = s.precompute_seconds / s.rows_precomputed if s.rows_precomputed else None
        d["seconds_per_row_on_demand"] = s.on_demand_seconds / s.pool_misses if s.pool_misses else None
        d.update(
            window_s=window,
            demand_rows_per_s=demand,
            refill_rows_per_s=refill,
            on_demand_rows_per_s=on_demand,
            on_demand_seconds_per_s=on_demand_s,
            pool_rows_per_layer=self.pool_rows,
            pool_low_water_rows=self.low_water(),
            chunk_rows=self.chunk_rows,
            pool_capacity_rows=self.pool_rows * len(self._layers),
            pool_memory_bytes=self.pool_memory_bytes(),
            pool_level_min=min((v["level"] for v in layers.values()), default=0),
            pool_level_max=max((v["level"] for v in layers.values()), default=0),
            layers=layers,
            backend=self.backend,
            backend_reason=self.backend_reason,
            filler_nice=self.nice,
            filler_running=self._thread is not None and self._thread.is_alive(),
            background_error=None if self.error is None else repr(self.error),
        )
        return d

    def prefill(self) -> None:
        """Fill every pool to pool_rows in the calling thread (e.g. before accepting traffic)."""
        for pool in self._layers.values():
            while self._refill_once(pool, self._batch_rows(pool)):
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

    def _make(self, weight: PublicWeight, rows: int,
              gemm_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """rows fresh pairs: r uniform in Z_p^n from the CSPRNG, wr = W_q r mod p (exact), the GEMM
        in pieces of at most gemm_rows rows (the layer's ``max_gemm_rows``: bounded temporaries)."""
        r = csprng_field_elements((rows, weight.n), self.p)
        if gemm_rows is None or rows <= gemm_rows:
            return r, weight.matmul(r, backend=self.backend)
        wr = torch.empty((rows, weight.m), dtype=torch.int64)
        for i in range(0, rows, gemm_rows):
            wr[i:i + gemm_rows] = weight.matmul(r[i:i + gemm_rows], backend=self.backend)
        return r, wr

    def _batch_rows(self, pool: _LayerPool) -> int:
        return max(1, min(self.chunk_rows, pool.max_gemm_rows))

    def _refill_once(self, pool: _LayerPool, max_rows: int) -> bool:
        """Make up to max_rows rows for pool if it is below pool_rows; False if it was full.

        Rows are reserved under the layer's lock, made without any lock, then published."""
        with pool.lock:
            rows = min(max_rows, self.pool_rows - pool.level - pool.reserved)
            if rows <= 0:
                return False
            pool.reserved += rows
        try:
            t0 = time.perf_counter()
            r, wr = self._make(pool.weight, rows, pool.max_gemm_rows)
            dt = time.perf_counter() - t0
        except BaseException:
            with pool.lock:
                pool.reserved -= rows
            raise
        now = time.monotonic()
        with pool.lock:
            pool.chunks.append(_Chunk(r, wr))
            pool.level += rows
            pool.reserved -= rows
            pool.levels.note(pool.level, now)
        with self._stats_lock:
            self._stats.rows_generated += rows
            self._stats.rows_precomputed += rows
            self._stats.precompute_batches += 1
            self._stats.precompute_seconds += dt
            self._refill.add(rows, now)
        return True

    def _next_refill(self, now: float) -> Tuple[Optional[_LayerPool], int, float]:
        """(pool, rows) to refill next, or (None, 0, seconds to sleep).

        Due: pools at or below the low-water mark (a full batch, capped by the free space), then
        pools not drawn from for ``_TOPUP_IDLE_S`` that are not full (whatever is free, up to a
        batch); the emptiest by fraction of capacity first.  Reads levels without the layers'
        locks: a stale read only delays or shrinks a refill, ``_refill_once`` re-checks."""
        cap, low = self.pool_rows, self.low_water()
        best, best_key, wait = None, None, _FILLER_POLL_S
        for pool in self._layers.values():
            filled = pool.level + pool.reserved
            if filled >= cap:
                continue
            if filled > low:
                idle_at = pool.last_take + _TOPUP_IDLE_S
                if idle_at > now:
                    wait = min(wait, idle_at - now)
                    continue
            key = filled / cap
            if best_key is None or key < best_key:
                best, best_key = pool, key
        if best is None:
            return None, 0, max(wait, 1e-3)
        return best, self._batch_rows(best), 0.0

    def _lower_priority(self) -> None:
        """Raise this thread's nice value by ``self.nice`` (Linux: per thread; elsewhere a no-op,
        because there PRIO_PROCESS would lower the whole service)."""
        if self.nice <= 0 or not sys.platform.startswith("linux"):
            return
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.nice))
        except OSError as exc:  # pragma: no cover - e.g. a seccomp profile that forbids it
            log.warning("mask filler: could not lower its priority: %s", exc)

    def _fill_loop(self) -> None:
        try:
            self._lower_priority()
            while True:
                with self._cv:
                    while True:
                        if self._stop:
                            return
                        pool, rows, wait = self._next_refill(time.monotonic())
                        if pool is not None:
                            break
                        self._cv.wait(wait)
                self._refill_once(pool, rows)
                with self._cv:
                    self._cv.notify_all()  # wait_filled
        except BaseException as exc:  # pragma: no cover - surfaced through .error and on-demand takes
            self.error = exc
            log.error("mask filler stopped: %r (takes continue on demand)", exc)
