"""Data-plane client of the secure service, one per vLLM worker process.

Created lazily on first use inside the worker (never in ``register``: that runs in every vLLM
process), over one keep-alive HTTP/1.1 connection with TCP_NODELAY (httpx sets it), so a call costs
one small round trip. ``submit`` sends the batch from a background thread and returns a future, so
the caller computes the public GEMM while the service computes the secret term.

Failures: every call has a timeout and a bounded number of retries (each retry is a new frame with
a new sequence number). When the service stays unreachable the call raises ``ServiceUnavailable``
and a short circuit breaker makes the remaining calls of the same step fail at once instead of each
waiting out its own retries.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch

from slip_vllm.core.wire import WireError, decode_reply, encode_request

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it
APPLY_PATH = "/v1/split/apply"
BREAKER_OPEN_S = 1.0


class ServiceUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str = ""
    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.2


class ServiceClient:
    def __init__(self, config: ClientConfig):
        self.config = config
        headers = {"content-type": "application/octet-stream"}
        if config.token:
            headers["authorization"] = f"Bearer {config.token}"
        self._http = httpx.Client(base_url=config.url, headers=headers,
                                  timeout=httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 5.0)),
                                  limits=httpx.Limits(max_keepalive_connections=1, max_connections=2))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slip-client")
        self.session = secrets.randbits(63)
        self._seq = itertools.count(1)
        self._seq_lock = threading.Lock()
        self._open_until = 0.0
        self.calls = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def _next_seq(self) -> int:
        with self._seq_lock:
            return next(self._seq)

    def _call(self, kind: int, tensor_ids: tuple[int, ...], payload: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        if time.monotonic() < self._open_until:
            raise ServiceUnavailable(f"secure service at {self.config.url} failed moments ago; skipping call")
        delay = self.config.backoff_s
        last_error: Exception | None = None
        for attempt in range(self.config.retries + 1):
            body = encode_request(kind, tensor_ids, payload, self.session, self._next_seq())
            try:
                response = self._http.post(APPLY_PATH, content=body)
            except httpx.HTTPError as exc:
                last_error = exc
            else:
                if response.status_code == 200:
                    self.calls += 1
                    self.bytes_sent += len(body)
                    self.bytes_received += len(response.content)
                    try:
                        return decode_reply(response.content, expect_rows=rows, expect_cols=cols)
                    except WireError as exc:
                        last_error = exc
                elif 400 <= response.status_code < 500:
                    # The service understood and refused: retrying the same frame cannot help.
                    raise ServiceUnavailable(f"secure service refused a call ({response.status_code}): "
                                             f"{response.text[:300]}")
                else:
                    last_error = RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            if attempt < self.config.retries:
                time.sleep(delay)
                delay *= 2
        self._open_until = time.monotonic() + BREAKER_OPEN_S
        raise ServiceUnavailable(f"secure service at {self.config.url} unreachable after "
                                 f"{self.config.retries + 1} attempts: {last_error}")

    def submit(self, kind: int, tensor_ids: tuple[int, ...], payload: torch.Tensor, rows: int,
               cols: int) -> Future:
        payload = payload.detach().to("cpu").contiguous()
        return self._pool.submit(self._call, kind, tensor_ids, payload, rows, cols)

    def info(self) -> dict:
        response = self._http.get("/v1/info")
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._http.close()


_clients: dict[int, ServiceClient] = {}
_config: ClientConfig | None = None


def configure(config: ClientConfig) -> None:
    """Set the address the worker's client uses (called by the loader, in the worker)."""
    global _config
    _config = config
    stale = _clients.pop(os.getpid(), None)
    if stale is not None:
        stale.close()


def get_client() -> ServiceClient:
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        if _config is None:
            raise ServiceUnavailable("the SLIP client is not configured: the model must be loaded with "
                                     "--load-format slip")
        client = _clients[pid] = ServiceClient(_config)
    return client
