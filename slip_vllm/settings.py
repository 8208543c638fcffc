"""The one table of every ``SLIP_*`` environment variable.

Nothing else in the project reads ``os.environ`` for SLIP settings: code asks ``settings()``.
Each entry has a type, a default and a one-line meaning; ``slip settings`` prints the table with the
values in force. Values are read when ``settings()`` is first called in a process (vLLM spawns its
workers, which inherit the environment), and ``settings(refresh=True)`` re-reads them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (1/0/true/false), got {text!r}")


@dataclass(frozen=True)
class Settings:
    service_url: str = field(
        default="http://127.0.0.1:8400",
        metadata={"env": "SLIP_SERVICE_URL", "help": "address of the secure service, as seen from vLLM"},
    )
    service_token: str = field(
        default="",
        metadata={
            "env": "SLIP_SERVICE_TOKEN",
            "help": "bearer token the service requires on data-plane calls (empty: none); never logged",
        },
    )
    service_timeout_s: float = field(
        default=10.0,
        metadata={"env": "SLIP_SERVICE_TIMEOUT_S",
                  "help": "vLLM side: how long a data-plane call waits for the service's reply, seconds, plus "
                          "SLIP_SERVICE_TIMEOUT_PER_ROW_MS per token row (a hung service fails the step after this)"},
    )
    service_timeout_per_row_ms: float = field(
        default=1.0,
        metadata={"env": "SLIP_SERVICE_TIMEOUT_PER_ROW_MS",
                  "help": "vLLM side: extra reply wait per token row of the call (big prefills take longer)"},
    )
    service_retries: int = field(
        default=2,
        metadata={"env": "SLIP_SERVICE_RETRIES",
                  "help": "split: retries of a data-plane call that could not be delivered (never of a timed-out "
                          "call, nor of a shielded step) before the step fails"},
    )
    service_retry_backoff_s: float = field(
        default=0.2,
        metadata={"env": "SLIP_SERVICE_RETRY_BACKOFF_S", "help": "first retry delay (doubles each retry)"},
    )
    startup_wait_s: float = field(
        default=10.0,
        metadata={"env": "SLIP_STARTUP_WAIT_S", "help": "how long vLLM's loader waits for the service at start"},
    )
    max_body_bytes: int = field(
        default=0,
        metadata={"env": "SLIP_MAX_BODY_BYTES",
                  "help": "largest data-plane request body the service accepts; also the bytes per direction of a "
                          "shared-memory channel (virtual: only the pages a message touches are used); 0: sized from "
                          "the model (SLIP_MAX_STEP_TOKENS x the widest row an endpoint carries, see /v1/info)"},
    )
    max_step_tokens: int = field(
        default=8192,
        metadata={"env": "SLIP_MAX_STEP_TOKENS",
                  "help": "service: most token rows one engine step (or one split call) may carry; sizes the body "
                          "cap, and a larger shielded step is refused (413)"},
    )
    channel: bool = field(
        default=True,
        metadata={"env": "SLIP_CHANNEL",
                  "help": "service: offer the colocated shared-memory data plane (vLLM selects it with SLIP_SERVICE_URL=shm://HOST:PORT)"},
    )
    channel_spin_us: float = field(
        default=50.0,
        metadata={"env": "SLIP_CHANNEL_SPIN_US",
                  "help": "shared-memory channel: microseconds a waiting side spins before it sleeps on the doorbell (0: never spin)"},
    )
    channel_dir: str = field(
        default="",
        metadata={"env": "SLIP_CHANNEL_DIR",
                  "help": "service: directory (made with mode 0700) for the channel's Unix socket; empty: a fresh private temp dir"},
    )
    service_threads: int = field(
        default=0,
        metadata={"env": "SLIP_SERVICE_THREADS", "help": "torch threads in the service (0: torch's default)"},
    )
    mask_pool_concurrent_rows: int = field(
        default=32,
        metadata={"env": "SLIP_MASK_POOL_CONCURRENT_ROWS",
                  "help": "shielded: token rows one engine step is expected to carry through each masked GEMM "
                          "(e.g. the most concurrent decode sequences); sizes the mask pools"},
    )
    mask_pool_steps: int = field(
        default=4,
        metadata={"env": "SLIP_MASK_POOL_STEPS",
                  "help": "shielded: engine steps of headroom the mask pools hold (pool rows per layer = "
                          "SLIP_MASK_POOL_CONCURRENT_ROWS x SLIP_MASK_POOL_STEPS)"},
    )
    mask_pool_rows: int = field(
        default=-1,
        metadata={
            "env": "SLIP_MASK_POOL_ROWS",
            "help": "shielded: one-time mask pairs (r, W_q r) kept ready per layer, 8*(n+m) bytes each, overriding "
                    "the product above (-1: use the product; 0: on demand only)",
        },
    )
    mask_precompute_chunk: int = field(
        default=128,
        metadata={"env": "SLIP_MASK_PRECOMPUTE_CHUNK",
                  "help": "shielded: mask rows the background thread makes per batch (one GEMM; see benchmarks/bench_masks.py)"},
    )
    mask_precompute_backend: str = field(
        default="auto",
        metadata={"env": "SLIP_MASK_PRECOMPUTE_BACKEND",
                  "help": "shielded: field GEMM backend making W_q r for the masks (auto: fastest measured at start; "
                          "or f64, cpu_int8, naive_int8)"},
    )
    mask_precompute_nice: int = field(
        default=10,
        metadata={"env": "SLIP_MASK_PRECOMPUTE_NICE",
                  "help": "shielded: nice increment of the mask precompute thread, so the online path runs first (0: none)"},
    )
    mask_audit: bool = field(
        default=False,
        metadata={"env": "SLIP_MASK_AUDIT",
                  "help": "shielded: fingerprint every mask row handed out (keyed hash) and report repeats in /v1/stats"},
    )
    shielded_kv_blocks: int = field(
        default=512,
        metadata={"env": "SLIP_SHIELDED_KV_BLOCKS",
                  "help": "shielded: KV-cache blocks the service allocates (must cover the host scheduler's blocks)"},
    )
    shielded_block_size: int = field(
        default=32,
        metadata={"env": "SLIP_SHIELDED_BLOCK_SIZE",
                  "help": "shielded: tokens per KV-cache block, vLLM's and the service's (vLLM's CPU attention needs a multiple of 32)"},
    )
    shielded_max_model_len: int = field(
        default=0,
        metadata={"env": "SLIP_SHIELDED_MAX_MODEL_LEN",
                  "help": "shielded: longest sequence a step may hold (seq_len cap, block-table width cap); 0: the "
                          "model's max_position_embeddings"},
    )
    shielded_step_timeout_per_row_ms: float = field(
        default=1.0,
        metadata={"env": "SLIP_SHIELDED_STEP_TIMEOUT_PER_ROW_MS",
                  "help": "shielded: the step timeout grows by this per token row of the ask awaiting the host's "
                          "answer (SLIP_SHIELDED_STEP_TIMEOUT_S + rows x this)"},
    )
    shielded_step_timeout_s: float = field(
        default=60.0,
        metadata={"env": "SLIP_SHIELDED_STEP_TIMEOUT_S",
                  "help": "shielded: a step whose host answer does not come within this time is aborted"},
    )
    shielded_owner_lease_s: float = field(
        default=60.0,
        metadata={"env": "SLIP_SHIELDED_OWNER_LEASE_S",
                  "help": "shielded: one engine holds the service (its KV mirror); another engine's claim is "
                          "refused (409) until the holder has been silent this long"},
    )
    log_level: str = field(
        default="INFO",
        metadata={"env": "SLIP_LOG_LEVEL", "help": "log level of the plugin and the service"},
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None:
                continue
            try:
                if f.type in ("bool", bool):
                    values[f.name] = _bool(raw)
                elif f.type in ("int", int):
                    values[f.name] = int(raw)
                elif f.type in ("float", float):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise ValueError(f"bad value for {f.metadata['env']}: {exc}") from None
        return cls(**values)

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, value in force, meaning) rows; secrets are masked."""
        rows = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "service_token" and value:
                value = "***"
            rows.append((f.metadata["env"], str(value), f.metadata["help"]))
        return rows

    def mask_pool_rows_per_layer(self) -> int:
        """Capacity of each layer's mask pool: SLIP_MASK_POOL_ROWS if >= 0, else
        SLIP_MASK_POOL_CONCURRENT_ROWS x SLIP_MASK_POOL_STEPS."""
        if self.mask_pool_rows >= 0:
            return self.mask_pool_rows
        if self.mask_pool_rows != -1 or self.mask_pool_concurrent_rows < 0 or self.mask_pool_steps < 0:
            raise ValueError("SLIP_MASK_POOL_ROWS must be -1 or >= 0, and SLIP_MASK_POOL_CONCURRENT_ROWS and "
                             "SLIP_MASK_POOL_STEPS >= 0")
        return self.mask_pool_concurrent_rows * self.mask_pool_steps


_cached: Settings | None = None


def settings(refresh: bool = False) -> Settings:
    global _cached
    if _cached is None or refresh:
        _cached = Settings.from_env()
    return _cached
