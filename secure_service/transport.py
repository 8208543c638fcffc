"""TRUSTED side: the transports that carry the data plane's bytes to ``DataPlane.handle``.

What this module owns
---------------------
* ``mount_http(app, plane, ...)``: the HTTP data-plane endpoints (``POST /v1/split/apply``,
  ``/v1/shielded/step``, ``/v1/shielded/gemm``, ``/v1/shielded/logits``) for a service that is not
  colocated with vLLM: bearer credential on every call (the service token, or with licences a
  licence key, ``secure_service.licences``), body size capped before it is read.
* ``ChannelServer``: the colocated data plane (``slip_vllm.core.channel``): one shared-memory
  channel per vLLM worker process, attached in two steps so that the control plane (FastAPI) stays
  the only place that checks credentials:

  1. control plane, ``POST /v1/channel/attach`` (bearer token, or with licences a licence key that
     must be usable and have room for one more session; JSON ``manifest_sha256`` must be the
     bundle's, optional ``capacity``): the service answers a one-time ticket (valid
     ``TICKET_TTL_S``), the session id, the capacity and the path of its Unix socket (in a
     directory of mode 0700 made for this process);
  2. the host connects to that socket and sends the ticket; the service creates the segment (a
     memfd), sends its descriptor with SCM_RIGHTS and serves the channel from a thread of its own:
     wait for a request (spin, then sleep on the socket), ``DataPlane.handle`` reading the request
     in place and writing the reply straight into the reply area, post the reply.

  The channel's sequence words must rise by one per request (409 otherwise); frames must carry the
  channel's session (403); a length beyond the capacity answers 413; every refusal leaves the
  channel usable.  Closing the socket (or exiting) detaches; the service then drops the channel.

Neither transport knows what a frame means; the protocol code above does not know which transport
carried it.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from secure_service.data_plane import DataPlane, Rejected
from secure_service.licences import hash_key
from secure_service.metering import Refused
from slip_vllm.core.channel import (
    ALIGN, W_REP_LEN, W_REP_OFF, W_REP_SEQ, W_REP_STATUS, W_REQ_EP, W_REQ_LEN, W_REQ_OFF, W_REQ_SEQ, Channel,
    ChannelClosed,
)
from slip_vllm.core.wire import REPLY_HEADER_BYTES
from slip_vllm.core.wire import ENDPOINT_PATHS

log = logging.getLogger("slip.service")
OCTET = "application/octet-stream"
TICKET_TTL_S = 30.0
TICKET_BYTES = 64  # hex characters


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def bearer_ok(token: str, header: str) -> bool:
    if not token:
        return True
    return hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


def credential_of(plane: DataPlane, header: str) -> Optional[str]:
    """With licences: the SHA-256 of the bearer licence key (None without one); else None."""
    if not plane.metering.licensed or not header.startswith("Bearer "):
        return None
    key = header[len("Bearer "):].strip()
    return hash_key(key) if key else None


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


def mount_http(app: FastAPI, plane: DataPlane, *, token: str, max_body_bytes: int) -> None:
    async def read_body(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > max_body_bytes:
                    raise Rejected(413, f"body of {declared} bytes exceeds the {max_body_bytes}-byte limit")
            except ValueError:
                raise Rejected(400, "bad Content-Length") from None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise Rejected(413, f"body exceeds the {max_body_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    def route(endpoint: int):
        async def call(request: Request) -> Response:
            header = request.headers.get("authorization", "")
            try:
                if not bearer_ok(token, header):
                    raise Rejected(401, "missing or wrong bearer token")
                credential = credential_of(plane, header)
                body = await read_body(request)
            except Rejected as exc:  # refused before the data plane saw it
                plane.stats.count_rejected("http", exc.status)
                return error_response(exc.status, exc.message)
            out: list[bytearray] = []

            def sink(n: int) -> memoryview:
                out.append(bytearray(n))
                return memoryview(out[-1])

            try:
                n = await run_in_threadpool(plane.handle, endpoint, memoryview(body), sink, credential=credential)
            except Rejected as exc:  # counted by the data plane
                return error_response(exc.status, exc.message)
            return Response(content=memoryview(out[-1])[:n], media_type=OCTET)

        return call

    for endpoint, path in ENDPOINT_PATHS.items():
        app.add_api_route(path, route(endpoint), methods=["POST"])


# ---------------------------------------------------------------------------------------------
# the shared-memory channel
# ---------------------------------------------------------------------------------------------


class ChannelServer:
    """See the module docstring.  capacity: the largest (and default) bytes per direction."""

    def __init__(self, plane: DataPlane, *, manifest_sha256: str, capacity: int, spin_s: float,
                 max_channels: int = 64, socket_dir: Optional[str] = None):
        self.plane = plane
        self.manifest_sha256 = manifest_sha256
        self.capacity = int(capacity)
        self.spin_s = float(spin_s)
        self.max_channels = int(max_channels)
        self._socket_dir = socket_dir
        self._own_dir: Optional[str] = None
        self.path: Optional[str] = None
        self._listener: Optional[socket.socket] = None
        self._tickets: dict[str, tuple[int, int, float, Optional[str]]] = {}  # ticket -> (session, capacity,
        #                                                                     expiry, licence credential)
        self._channels: dict[int, Channel] = {}
        self._lock = threading.Lock()
        self._stop = False
        self.attached_total = 0

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._listener is not None:
            return
        if self._socket_dir:
            os.makedirs(self._socket_dir, mode=0o700, exist_ok=True)
            base = self._socket_dir
        else:
            base = self._own_dir = tempfile.mkdtemp(prefix="slip-service-")
        os.chmod(base, 0o700)
        self.path = os.path.join(base, f"channel-{os.getpid()}.sock")
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="slip-channel-accept", daemon=True).start()

    def close(self) -> None:
        self._stop = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            channels = list(self._channels.values())
        for ch in channels:
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def stats(self) -> dict:
        with self._lock:
            return {"attached": len(self._channels), "attached_total": self.attached_total}

    # -- step 1: the control plane's attach ----------------------------------------------------

    def attach(self, manifest_sha256: str, capacity: Optional[int], session: Optional[int] = None,
               credential: Optional[str] = None) -> dict:
        """session: a host re-attaching after its channel broke asks for its old session id again
        (it keeps its sequence numbers and, in shielded, its hold on the service); a live channel
        of that session is then shut down when the new one is handed over.  credential: the
        SHA-256 of the licence key (with licences): the channel's calls are that licence's."""
        if self._listener is None:
            raise Rejected(503, "the colocated channel is not running on this service")
        if not isinstance(manifest_sha256, str) or not hmac.compare_digest(manifest_sha256, self.manifest_sha256):
            raise Rejected(403, "the channel is refused: this service holds the bundle of another artifact")
        if capacity is None:
            capacity = self.capacity
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 4096:
            raise Rejected(422, "capacity must be an integer of at least 4096 bytes")
        if capacity > self.capacity:
            raise Rejected(413, f"capacity {capacity} exceeds the service's limit of {self.capacity} bytes per direction")
        if session is not None and (isinstance(session, bool) or not isinstance(session, int)
                                    or not 0 < session < 2**62):
            raise Rejected(422, "session must be the integer id of an earlier channel")
        now = time.monotonic()
        with self._lock:
            if len(self._channels) >= self.max_channels:
                raise Rejected(503, f"{self.max_channels} channels are attached already")
            for t in [t for t, entry in self._tickets.items() if entry[2] < now]:
                del self._tickets[t]
            ticket = secrets.token_hex(TICKET_BYTES // 2)
            if session is None:
                session = secrets.randbits(62) | 1
        if self.plane.metering.licensed:  # usable, and room for this session (max_sessions)
            try:
                self.plane.metering.resolve(credential, session)
            except Refused as exc:
                raise Rejected(exc.status, exc.message) from None
        with self._lock:
            self._tickets[ticket] = (session, capacity, now + TICKET_TTL_S, credential)
        return {"socket": self.path, "ticket": ticket, "session": session, "capacity": capacity, "version": 1}

    # -- step 2: the Unix socket ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(conn,), name="slip-channel-handshake",
                             daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5.0)
            raw = b""
            while len(raw) < TICKET_BYTES:
                chunk = conn.recv(TICKET_BYTES - len(raw))
                if not chunk:
                    break
                raw += chunk
            ticket = raw.decode("ascii", "replace")
            with self._lock:
                entry = self._tickets.pop(ticket, None)
            if entry is None or entry[2] < time.monotonic():
                conn.sendall(b"NO unknown or expired ticket")
                conn.close()
                return
            session, capacity, _, credential = entry
            fd = Channel.create_segment(capacity, session)
            try:
                socket.send_fds(conn, [b"OK"], [fd])
                conn.settimeout(None)
                ch = Channel(os.dup(fd), conn, "service", spin_s=self.spin_s)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            log.warning("channel handshake failed: %s", exc)
            conn.close()
            return
        with self._lock:
            old = self._channels.get(ch.session)
            self._channels[ch.session] = ch
            self.attached_total += 1
        if old is not None:  # the same host re-attached: wake the old channel's thread, which ends
            try:
                old.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        log.info("channel %#x attached (%d bytes per direction)", ch.session, ch.capacity)
        account = None
        if self.plane.metering.licensed:  # the channel holds its session against max_sessions
            try:
                account = self.plane.metering.resolve(credential, ch.session, pin=True)
            except Refused:
                account = None  # its calls are refused with the reason
        threading.Thread(target=self._serve, args=(ch, credential, account), name=f"slip-channel-{ch.session:x}",
                         daemon=True).start()

    def _serve(self, ch: Channel, credential: Optional[str] = None, account=None) -> None:
        plane = self.plane
        request_area, reply_area, capacity = ch.request_area, ch.reply_area, ch.capacity
        rep_off = (ALIGN - REPLY_HEADER_BYTES) % ALIGN  # split replies: payload on a 64-byte boundary

        def sink(n: int) -> memoryview:
            if rep_off + n > capacity:
                raise Rejected(413, f"the reply of {n} bytes exceeds the channel's {capacity}-byte capacity")
            return reply_area[rep_off:rep_off + n]

        def error(status: int, message: str, counted: bool = False) -> tuple[int, int]:
            if not counted:  # refused by the channel itself, before the data plane saw it
                plane.stats.count_rejected("channel", status)
            body = json.dumps({"error": message}).encode()[:capacity - rep_off]
            reply_area[rep_off:rep_off + len(body)] = body
            return status, len(body)

        last = 0
        try:
            while not self._stop:
                seq = ch.wait(W_REQ_SEQ, last, timeout=None)
                # each word is read once into an int: the host may change them while we work
                endpoint, length, offset = ch.word(W_REQ_EP), ch.word(W_REQ_LEN), ch.word(W_REQ_OFF)
                if seq != last + 1:
                    status, n = error(409, f"channel sequence {seq} after {last}: replayed or out of order")
                elif not 0 <= offset < ALIGN:
                    status, n = error(400, f"request offset {offset} outside 0..{ALIGN - 1}")
                elif not 0 < length <= capacity - offset:
                    status, n = error(413 if length > capacity - offset else 400,
                                      f"request length {length} outside 1..{capacity - offset}")
                else:
                    try:
                        n = plane.handle(endpoint, request_area[offset:offset + length], sink, in_place=True,
                                         session=ch.session, credential=credential)
                        status = 200
                    except Rejected as exc:
                        status, n = error(exc.status, exc.message, counted=True)
                    except Exception:
                        log.exception("channel %#x: internal error", ch.session)
                        status, n = error(500, "internal error (see the service log)")
                last = seq
                ch.set_word(W_REP_STATUS, status)
                ch.set_word(W_REP_LEN, n)
                ch.set_word(W_REP_OFF, rep_off)
                ch.set_word(W_REP_SEQ, seq)
                ch.ring()
        except ChannelClosed:
            pass
        finally:
            with self._lock:
                if self._channels.get(ch.session) is ch:
                    del self._channels[ch.session]
            if account is not None:
                plane.metering.unpin(account, ch.session)
            ch.close()
            log.info("channel %#x detached", ch.session)


def attach_route(app: FastAPI, server: Optional[ChannelServer], token: str,
                 reject: Callable[[int, str], JSONResponse]) -> None:
    """``POST /v1/channel/attach`` on the control plane (step 1 of the module docstring)."""

    @app.post("/v1/channel/attach")
    async def channel_attach(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        if not bearer_ok(token, header):
            return reject(401, "missing or wrong bearer token")
        if server is None:
            return reject(404, "this service offers no colocated channel (started with the channel disabled)")
        try:
            body = json.loads(await request.body() or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return reject(400, "the attach body must be a JSON object")
        try:
            return JSONResponse(server.attach(body.get("manifest_sha256"), body.get("capacity"), body.get("session"),
                                              credential=credential_of(server.plane, header)))
        except Rejected as exc:
            return reject(exc.status, exc.message)
