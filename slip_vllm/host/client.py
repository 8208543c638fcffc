"""Data-plane client of protocol ``split``, one per vLLM worker process.

Created lazily on first use inside the worker (never in ``register``: that runs in every vLLM
process), over the worker's transport (``host.transport``: a shared-memory channel for
``shm://`` addresses, keep-alive HTTP for ``http://``).  ``submit`` posts the batch and returns at
once, so the caller computes the public GEMM while the service computes the secret term; on shared
memory no thread is involved (the request is written into the channel and the service is woken),
over HTTP one background thread carries the call.  ``Pending.result()`` then returns the secret term,
on shared memory as a view of the reply area (valid until the next ``submit``: the caller adds it
to its output at once).

Failures: every call has a timeout that grows with its rows (``timeout_s + rows *
timeout_per_row_s``).  A call that could not be delivered (connection refused, channel broken) is
retried a bounded number of times (each retry is a new frame with a new sequence number, on a fresh
channel); a call that timed out is not (a hung service would only be waited for again), nor is a
refusal (4xx).  Then the call raises ``ServiceUnavailable``, and a short circuit breaker makes the
calls of the next moment fail at once (the running step skips its remaining calls anyway:
``host.failure``).

Identity: every reply carries the answering service's instance id; a change (the service
restarted) is logged.  Protocol split keeps no state in the service between calls, so nothing
computed before the restart depends on it.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass

import torch

from slip_vllm.core.wire import EP_SPLIT_APPLY, WireError, decode_reply, reply_instance, request_header
from slip_vllm.host.transport import ServiceRefused, TransportError, TransportTimeout, open_transport

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it
BREAKER_OPEN_S = 1.0


class ServiceUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class ClientConfig:
    url: str
    manifest_sha256: str = ""
    token: str = ""
    timeout_s: float = 10.0
    timeout_per_row_s: float = 0.0
    retries: int = 2
    backoff_s: float = 0.2
    spin_s: float = 50e-6


class Pending:
    """A call in flight; ``result()`` waits for it (and retries it if it failed)."""

    __slots__ = ("client", "args")

    def __init__(self, client: "ServiceClient", args: tuple):
        self.client, self.args = client, args

    def result(self) -> torch.Tensor:
        return self.client._finish(*self.args)


class ServiceClient:
    def __init__(self, config: ClientConfig):
        self.config = config
        self.transport = open_transport(config.url, config.manifest_sha256, token=config.token,
                                        timeout_s=config.timeout_s, spin_s=config.spin_s)
        self._seq = itertools.count(1)
        self._open_until = 0.0
        self.instance = 0  # of the service that answered last
        self.calls = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def _send(self, kind: int, tensor_ids: tuple[int, ...], payload: torch.Tensor, timeout: float,
              ranges=None) -> None:
        header, payload = request_header(kind, tensor_ids, payload, self.transport.session, next(self._seq),
                                         ranges=ranges)
        self.transport.send(EP_SPLIT_APPLY, header, payload, timeout)
        self.bytes_sent += len(header) + payload.numel() * payload.element_size()

    def submit(self, kind: int, tensor_ids: tuple[int, ...], payload: torch.Tensor, rows: int,
               cols: int, *, ranges=None) -> Pending:
        """ranges: this rank's block of each tensor (tensor parallelism), see ``core.wire``."""
        if time.monotonic() < self._open_until:
            raise ServiceUnavailable(f"secure service at {self.config.url} failed moments ago; skipping call")
        payload = payload.detach()
        if payload.device.type != "cpu":
            payload = payload.to("cpu")
        error = None
        timeout = self.config.timeout_s + rows * self.config.timeout_per_row_s
        try:
            self._send(kind, tensor_ids, payload, timeout, ranges)
        except (TransportError, ServiceRefused) as exc:
            error = exc
        return Pending(self, (kind, tensor_ids, payload, rows, cols, timeout, error, ranges))

    def _finish(self, kind, tensor_ids, payload, rows, cols, timeout, error, ranges=None) -> torch.Tensor:
        delay = self.config.backoff_s
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
                try:
                    self._send(kind, tensor_ids, payload, timeout, ranges)
                    error = None
                except (TransportError, ServiceRefused) as exc:
                    error = exc
            if error is None:
                try:
                    body = self.transport.receive(timeout)
                    result = decode_reply(body, expect_rows=rows, expect_cols=cols, copy=False)
                    self._note_instance(reply_instance(body))
                    self.calls += 1
                    self.bytes_received += len(body)
                    return result
                except (TransportError, ServiceRefused, WireError) as exc:
                    error = exc
            if isinstance(error, ServiceRefused) and 400 <= error.status < 500:
                # The service understood and refused: retrying the same frame cannot help.
                raise ServiceUnavailable(f"secure service refused a call ({error.status}): {error.message[:300]}")
            if isinstance(error, TransportTimeout):
                break  # a hung service: retrying would wait again
        self._open_until = time.monotonic() + BREAKER_OPEN_S
        raise ServiceUnavailable(f"secure service at {self.config.url} did not answer: {error}")

    def _note_instance(self, instance: int) -> None:
        if instance != self.instance:
            if self.instance:
                log.warning("SLIP: the secure service restarted (instance %#x -> %#x); protocol split keeps no "
                            "state there, nothing to reset", self.instance, instance)
            self.instance = instance

    def close(self) -> None:
        self.transport.close()


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
