"""UNTRUSTED side: the transports of the data plane, as a vLLM worker process sees them.

What this module owns
---------------------
``open_transport(url, ...)`` gives the worker's transport to the secure service; the address says
which (``slip_vllm.core.channel.parse_service_url``):

* ``shm://HOST:PORT`` -> ``ShmTransport``: a colocated shared-memory channel.  Attached lazily on
  first use: ``POST /v1/channel/attach`` on the control plane (bearer token, the artifact's
  manifest hash) answers a one-time ticket and a Unix socket path; the ticket is sent on that
  socket, which answers the segment's descriptor (SCM_RIGHTS).  Requests are written straight into
  the request area; replies are read in place from the reply area.  A broken channel (service
  restarted, timeout) is dropped and the next call attaches a new one, asking for the same session
  id (the service grants it again: the session's sequence numbers and, in shielded, its hold on the
  service carry over).
* ``http://HOST:PORT`` -> ``HttpTransport``: one keep-alive HTTP/1.1 connection (httpx, TCP_NODELAY),
  for a service that is not on the same machine.

Both offer the same calls, so the protocol code above (``host.client`` for split,
``host.shielded_client`` for shielded) never knows which one carries its frames:

* ``send(endpoint, header, payload)``: post one request (a frame's header bytes and its payload
  tensor, written without joining them on shared memory); the call is then in flight, and the caller
  may compute meanwhile (split overlaps the public GEMM with it);
* ``receive(timeout)``: wait for the reply body, a memoryview valid until the next ``send``;
* ``call(...)``: both, for protocols that have nothing to overlap.

Refusals raise ``ServiceRefused`` (HTTP status semantics on both transports); an unreachable or
broken service raises ``TransportError``, one that does not answer in time ``TransportTimeout``.  Neither is retried here: retry policy is the caller's.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import httpx
import torch

from slip_vllm.core.channel import (
    ALIGN, W_REP_LEN, W_REP_OFF, W_REP_SEQ, W_REP_STATUS, W_REQ_EP, W_REQ_LEN, W_REQ_OFF, W_REQ_SEQ, Channel,
    ChannelClosed, ChannelTimeout, aligned_offset, parse_service_url,
)
from slip_vllm.core.wire import ENDPOINT_PATHS, tensor_bytes_view

log = logging.getLogger("vllm.slip")  # under "vllm" so vLLM's log handlers format it
OCTET = "application/octet-stream"

__all__ = ["TransportError", "TransportTimeout", "ServiceRefused", "Transport", "HttpTransport", "ShmTransport", "open_transport"]


class TransportError(ConnectionError):
    """The service could not be reached, or the channel broke."""


class TransportTimeout(TransportError):
    """The service did not answer in time (it may be hung: retrying would wait again)."""


class ServiceRefused(RuntimeError):
    """The service answered a call with an error status (4xx: the request is wrong; 5xx: it failed)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"secure service answered {status}: {message}")
        self.status = status
        self.message = message


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", body[:300]))
    except (ValueError, AttributeError):
        return bytes(body[:300]).decode("utf-8", "replace")


def _payload_nbytes(payload: Optional[torch.Tensor]) -> int:
    return 0 if payload is None else payload.numel() * payload.element_size()


class Transport:
    """The common calls (see the module docstring)."""

    session: int

    def send(self, endpoint: int, header: bytes, payload: Optional[torch.Tensor] = None,
             timeout: Optional[float] = None) -> None:
        """timeout: of the reply's wait (HTTP: the request's; shared memory: given to receive)."""
        raise NotImplementedError

    def receive(self, timeout: Optional[float] = None) -> memoryview:
        raise NotImplementedError

    def call(self, endpoint: int, header: bytes, payload: Optional[torch.Tensor] = None,
             timeout: Optional[float] = None) -> memoryview:
        self.send(endpoint, header, payload, timeout)
        return self.receive(timeout)

    def connect(self) -> None:
        """Attach now instead of on the first call (the loader does, so that start-up fails with a
        clear message rather than the first request)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HttpTransport(Transport):
    def __init__(self, control_url: str, *, token: str = "", timeout_s: float = 30.0):
        headers = {"content-type": OCTET}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.url = control_url
        self._http = httpx.Client(base_url=control_url, headers=headers,
                                  timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
                                  limits=httpx.Limits(max_keepalive_connections=1, max_connections=2))
        self._pool: Optional[ThreadPoolExecutor] = None
        self._future: Optional[Future] = None
        self.session = secrets.randbits(62) | 1

    def _post(self, endpoint: int, body: bytes, timeout: Optional[float] = None) -> memoryview:
        try:
            if timeout is None:
                response = self._http.post(ENDPOINT_PATHS[endpoint], content=body)
            else:
                response = self._http.post(ENDPOINT_PATHS[endpoint], content=body,
                                           timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)))
        except httpx.TimeoutException as exc:
            raise TransportTimeout(f"secure service at {self.url}: no answer in time ({exc})") from None
        except httpx.HTTPError as exc:
            raise TransportError(f"secure service at {self.url}: {exc}") from None
        if response.status_code != 200:
            raise ServiceRefused(response.status_code, _error_message(response.content))
        return memoryview(response.content)

    @staticmethod
    def _body(header: bytes, payload: Optional[torch.Tensor]) -> bytes:
        if payload is None:
            return header
        return header + tensor_bytes_view(payload).numpy().tobytes()

    def send(self, endpoint, header, payload=None, timeout: Optional[float] = None) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slip-http")
        self._future = self._pool.submit(self._post, endpoint, self._body(header, payload), timeout)

    def receive(self, timeout=None) -> memoryview:
        future, self._future = self._future, None
        if future is None:
            raise RuntimeError("receive() without send()")
        return future.result()  # the request's own timeout (given to send) bounds the wait

    def call(self, endpoint, header, payload=None, timeout=None) -> memoryview:
        return self._post(endpoint, self._body(header, payload), timeout)  # nothing to overlap: no thread hop

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._http.close()


class ShmTransport(Transport):
    """A shared-memory channel to a colocated service (see the module docstring)."""

    def __init__(self, control_url: str, manifest_sha256: str, *, token: str = "", timeout_s: float = 30.0,
                 spin_s: float = 50e-6, capacity: Optional[int] = None):
        self.url = control_url
        self.manifest_sha256 = manifest_sha256
        self.token = token
        self.timeout_s = float(timeout_s)
        self.spin_s = float(spin_s)
        self.capacity_wanted = capacity
        self._ch: Optional[Channel] = None
        self._req_bytes: Optional[torch.Tensor] = None
        self._seq = 0
        self._in_flight = False
        self._session: Optional[int] = None  # kept across re-attaches (the service grants it again)
        self.attaches = 0

    # -- attach --------------------------------------------------------------------------------

    def _attach(self) -> Channel:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        body = {"manifest_sha256": self.manifest_sha256}
        if self.capacity_wanted is not None:
            body["capacity"] = int(self.capacity_wanted)
        if self._session is not None:
            body["session"] = self._session
        try:
            r = httpx.post(self.url + "/v1/channel/attach", json=body, headers=headers, timeout=min(self.timeout_s, 10.0))
        except httpx.TimeoutException as exc:
            raise TransportTimeout(f"secure service at {self.url}: no answer to attach in time ({exc})") from None
        except httpx.HTTPError as exc:
            raise TransportError(f"secure service at {self.url}: {exc}") from None
        if r.status_code != 200:
            raise ServiceRefused(r.status_code, _error_message(r.content))
        grant = r.json()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(10.0)
            sock.connect(grant["socket"])
            sock.sendall(str(grant["ticket"]).encode("ascii"))
            msg, fds, _, _ = socket.recv_fds(sock, 256, 1)
            if msg != b"OK" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise TransportError(f"the service refused the channel: {msg.decode('ascii', 'replace')}")
            sock.settimeout(None)
            ch = Channel(fds[0], sock, "host", spin_s=self.spin_s)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot attach the channel at {grant.get('socket')}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        if ch.session != int(grant["session"]):
            ch.close()
            raise TransportError("the channel's session is not the one granted")
        self._ch = ch
        self._session = ch.session
        self._req_bytes = torch.frombuffer(ch.request_area, dtype=torch.uint8)
        self._seq = 0
        self.attaches += 1
        log.info("SLIP: shared-memory channel to %s attached (session %#x, %d bytes per direction)",
                 self.url, ch.session, ch.capacity)
        return ch

    def _drop(self) -> None:
        ch, self._ch = self._ch, None
        self._req_bytes = None
        self._in_flight = False
        if ch is not None:
            ch.close()

    @property
    def session(self) -> int:
        return (self._ch or self._attach()).session

    def connect(self) -> None:
        if self._ch is None:
            self._attach()

    # -- calls ---------------------------------------------------------------------------------

    def send(self, endpoint, header, payload=None, timeout=None) -> None:
        ch = self._ch or self._attach()
        n_head = len(header)
        size = n_head + _payload_nbytes(payload)
        off = aligned_offset(n_head)
        if off + size > ch.capacity:
            raise ServiceRefused(413, f"a request of {size} bytes exceeds the channel's {ch.capacity}-byte capacity "
                                      f"(raise SLIP_MAX_BODY_BYTES on the service)")
        ch.request_area[off:off + n_head] = header
        if payload is not None and size > n_head:
            self._req_bytes[off + n_head:off + size].copy_(tensor_bytes_view(payload))
        self._seq += 1
        ch.set_word(W_REQ_EP, endpoint)
        ch.set_word(W_REQ_LEN, size)
        ch.set_word(W_REQ_OFF, off)
        ch.set_word(W_REQ_SEQ, self._seq)
        self._in_flight = True
        try:
            ch.ring()
        except ChannelClosed as exc:
            self._drop()
            raise TransportError(str(exc)) from None

    def receive(self, timeout=None) -> memoryview:
        ch = self._ch
        if ch is None or not self._in_flight:
            raise TransportError("no call in flight on the channel")
        self._in_flight = False
        try:
            got = ch.wait(W_REP_SEQ, self._seq - 1, self.timeout_s if timeout is None else timeout)
        except ChannelTimeout as exc:
            self._drop()
            raise TransportTimeout(f"secure service channel: {exc}") from None
        except ChannelClosed as exc:
            self._drop()
            raise TransportError(f"secure service channel: {exc}") from None
        if got != self._seq:
            self._drop()
            raise TransportError(f"channel reply {got} to request {self._seq}")
        status, n, off = ch.word(W_REP_STATUS), ch.word(W_REP_LEN), ch.word(W_REP_OFF)
        if not (0 <= off < ALIGN and 0 <= n <= ch.capacity - off):
            self._drop()
            raise TransportError("channel reply length out of range")
        body = ch.reply_area[off:off + n]
        if status != 200:
            raise ServiceRefused(status, _error_message(bytes(body)))
        return body

    def close(self) -> None:
        self._drop()


def open_transport(url: str, manifest_sha256: str, *, token: str = "", timeout_s: float = 30.0,
                   spin_s: float = 50e-6) -> Transport:
    address = parse_service_url(url)
    if address.colocated:
        return ShmTransport(address.control_url, manifest_sha256, token=token, timeout_s=timeout_s, spin_s=spin_s)
    return HttpTransport(address.control_url, token=token, timeout_s=timeout_s)
