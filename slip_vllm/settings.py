"""The one table of every ``SLIP_*`` environment variable.

Nothing else in the project reads ``os.environ`` for SLIP settings: code asks ``settings()``.
Each entry has a type, a default and a one-line meaning; ``slip settings`` prints the table with the
values in force. Values are read when ``settings()`` is first called in a process (vLLM spawns its
workers, which inherit the environment), and ``settings(refresh=True)`` re-reads them.

Every setting can also come from a YAML file (``configs/service.yaml``; ``slip secure-service
--config FILE`` installs it with ``settings(refresh=True, yaml_file=FILE)``): its keys are the
settings' names (the variable without ``SLIP_``, lower case; ``host``, ``port`` and ``threads`` are
accepted for service_host, service_port and service_threads).  Precedence: command-line flags, then
the environment, then the file, then the defaults.  Parsing and validation are pydantic-settings'
(a model built from this table, with its YAML source); an unknown key or a bad value is an error
that names it.
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
    shielded_logits_policy: str = field(
        default="topk",
        metadata={"env": "SLIP_SHIELDED_LOGITS_POLICY",
                  "help": "shielded: what the service returns of the LM head: topk (the top-K logits of each row, "
                          "the rest -inf: greedy unchanged, sampling top-K truncated, log-probs beyond K unavailable) "
                          "or full (every float32 logit: the host can run the logit-matrix attack; docs/SECURITY.md)"},
    )
    shielded_logits_topk: int = field(
        default=20,
        metadata={"env": "SLIP_SHIELDED_LOGITS_TOPK",
                  "help": "shielded: K of the topk logits policy (>= 1; keep it below the hidden size)"},
    )
    log_level: str = field(
        default="INFO",
        metadata={"env": "SLIP_LOG_LEVEL", "help": "log level of the plugin and the service"},
    )
    service_host: str = field(
        default="127.0.0.1",
        metadata={"env": "SLIP_SERVICE_HOST",
                  "help": "service: bind address (a non-loopback address needs licences or a token, and TLS, "
                          "unless SLIP_INSECURE)"},
    )
    service_port: int = field(
        default=8400, metadata={"env": "SLIP_SERVICE_PORT", "help": "service: port"},
    )
    insecure: bool = field(
        default=False,
        metadata={"env": "SLIP_INSECURE",
                  "help": "service: allow a non-loopback bind without credentials or TLS (never in production)"},
    )
    ssl_certfile: str = field(
        default="", metadata={"env": "SLIP_SSL_CERTFILE", "help": "service: TLS certificate (PEM) given to uvicorn"},
    )
    ssl_keyfile: str = field(
        default="", metadata={"env": "SLIP_SSL_KEYFILE", "help": "service: TLS private key (PEM) given to uvicorn"},
    )
    ssl_ca_certs: str = field(
        default="",
        metadata={"env": "SLIP_SSL_CA_CERTS",
                  "help": "service: CA bundle; when set, clients must present a certificate it signed (mutual TLS)"},
    )
    licences_file: str = field(
        default="",
        metadata={"env": "SLIP_LICENCES_FILE",
                  "help": "service: the licences file (slip license ...); empty: no licences (a bearer token at most)"},
    )
    licences_poll_s: float = field(
        default=0.5,
        metadata={"env": "SLIP_LICENCES_POLL_S",
                  "help": "service: how often the licences file is checked for changes (revocations take effect "
                          "within this plus one engine step)"},
    )
    licence_session_idle_s: float = field(
        default=60.0,
        metadata={"env": "SLIP_LICENCE_SESSION_IDLE_S",
                  "help": "service: a licence's engine session counts against its max_sessions until it has been "
                          "silent this long (an attached channel counts until it detaches)"},
    )
    usage_log: str = field(
        default="",
        metadata={"env": "SLIP_USAGE_LOG",
                  "help": "service: append-only JSON-lines usage log (empty: LICENCES_FILE.usage.jsonl with licences, "
                          "else none)"},
    )
    usage_key_file: str = field(
        default="",
        metadata={"env": "SLIP_USAGE_KEY_FILE",
                  "help": "service: the vendor's HMAC key of the usage log (empty: LICENCES_FILE.key, made if missing)"},
    )
    usage_flush_s: float = field(
        default=1.0,
        metadata={"env": "SLIP_USAGE_FLUSH_S",
                  "help": "service: usage not yet in the log is written (and the log fsynced) this often; calls "
                          "that return logits are written before their reply"},
    )
    alarm_limit: int = field(
        default=3,
        metadata={"env": "SLIP_ALARM_LIMIT",
                  "help": "service: this many integrity alarms of one licence within SLIP_ALARM_WINDOW_S lock it "
                          "out (0: never; without licences alarms are only counted)"},
    )
    alarm_window_s: float = field(
        default=60.0, metadata={"env": "SLIP_ALARM_WINDOW_S", "help": "service: window of the alarm limit, seconds"},
    )
    alarm_lockout_s: float = field(
        default=3600.0,
        metadata={"env": "SLIP_ALARM_LOCKOUT_S",
                  "help": "service: how long a locked-out licence stays refused (kept across restarts in the usage log)"},
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, yaml_file: str | None = None) -> "Settings":
        """The environment (or ``environ``) over the YAML file (if any) over the defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None:
                continue
            if f.type in ("bool", bool):
                try:
                    raw = _bool(raw)
                except ValueError as exc:
                    raise ValueError(f"bad value for {f.metadata['env']}: {exc}") from None
            values[f.name] = raw
        from pydantic import ValidationError

        try:
            model = _pydantic_model(yaml_file)(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err.get("loc") else "?"
            env = {f.name: f.metadata["env"] for f in dataclasses.fields(cls)}.get(name)
            where = f"{env} (or {name!r} in {yaml_file})" if env and yaml_file else (env or f"{name!r} in {yaml_file}")
            raise ValueError(f"bad value for {where}: {err['msg']}") from None
        return cls(**model.model_dump())

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, value in force, meaning) rows; secrets are masked."""
        rows = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("service_token",) and value:
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


_YAML_ALIASES = {"service_host": "host", "service_port": "port", "service_threads": "threads"}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _pydantic_model(yaml_file: str | None):
    """A pydantic-settings model of the table above whose only sources are its keyword arguments
    (the environment, read above) and the YAML file; unknown YAML keys are refused."""
    from pydantic import AliasChoices, Field, create_model
    from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

    fields = {}
    for f in dataclasses.fields(Settings):
        names = [f.name] + ([_YAML_ALIASES[f.name]] if f.name in _YAML_ALIASES else [])
        fields[f.name] = (_TYPES[f.type] if isinstance(f.type, str) else f.type,
                          Field(default=f.default, description=f.metadata["help"],
                                validation_alias=AliasChoices(*names)))

    class _Base(BaseSettings):
        model_config = SettingsConfigDict(extra="forbid", yaml_file=yaml_file, populate_by_name=True)

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            return (init_settings,) + ((YamlConfigSettingsSource(settings_cls),) if yaml_file else ())

    if yaml_file and not os.path.isfile(yaml_file):
        raise ValueError(f"config file {yaml_file} does not exist")
    return create_model("SlipSettings", __base__=_Base, **fields)


_cached: Settings | None = None


def settings(refresh: bool = False, yaml_file: str | None = None) -> Settings:
    """The settings in force; ``refresh`` re-reads them (with ``yaml_file``: the environment over
    that YAML file)."""
    global _cached
    if _cached is None or refresh:
        _cached = Settings.from_env(yaml_file=yaml_file)
    return _cached
