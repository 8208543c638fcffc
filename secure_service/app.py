"""FastAPI application of the secure service.

Endpoints:
  GET  /healthz          200 once the bundle is loaded and validated
  GET  /v1/info          protocol, model, bundle hash (public facts only, never secrets)
  GET  /v1/stats         counters: calls, rows, bytes in/out, rejected requests
  POST /v1/split/apply   data plane of protocol ``split`` (binary frames, see slip_vllm.core.wire)
  POST /v1/shielded/step, /v1/shielded/gemm, /v1/shielded/logits
                         data plane of protocol ``shielded`` (mounted only for shielded bundles; see
                         secure_service.shielded_api)

Runs on the TRUSTED side (the secure service); it never imports vLLM.

Every malformed request answers 4xx and leaves the service healthy: body size is capped before it is
read, frames are decoded strictly, ids/shapes/values are checked against the bundle, and each
session's sequence numbers must increase (replays and reordering answer 409).
"""

from __future__ import annotations

import collections
import hmac
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from secure_service.bundle import Bundle
from secure_service.shielded_api import StepRejected
from secure_service.split_executor import RequestRejected, SplitExecutor
from slip_vllm.core.wire import (
    MSG_ANSWER, MSG_ROWS, WireError, decode_request, decode_shielded_message, decode_shielded_step, encode_reply,
)

log = logging.getLogger("slip.service")
OCTET = "application/octet-stream"
MAX_SESSIONS = 4096


class SessionGuard:
    """Refuses replayed or out-of-order frames: seq must strictly increase within a session."""

    def __init__(self) -> None:
        self._last: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def admit(self, session: int, seq: int) -> bool:
        with self._lock:
            last = self._last.get(session)
            if last is not None and seq <= last:
                return False
            self._last[session] = seq
            self._last.move_to_end(session)
            while len(self._last) > MAX_SESSIONS:
                self._last.popitem(last=False)
            return True


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.rows = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.rejected = 0
        self.compute_s = 0.0
        self.started = time.time()

    def snapshot(self) -> dict:
        with self.lock:
            return {"calls": self.calls, "rows": self.rows, "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out, "rejected": self.rejected,
                    "compute_s": round(self.compute_s, 6), "uptime_s": round(time.time() - self.started, 3)}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def create_app(bundle: Bundle, *, token: str = "", max_body_bytes: int = 256 << 20,
               shielded_options: dict | None = None) -> FastAPI:
    """shielded_options: keyword arguments of ``ShieldedService`` (num_blocks, block_size,
    timeout_s, pool_rows); defaults from the settings."""
    app = FastAPI(title="SLIP secure service", docs_url=None, redoc_url=None, openapi_url=None)
    executor = SplitExecutor(bundle)
    sessions = SessionGuard()
    stats = Stats()
    info = bundle.info()
    shielded = None
    if bundle.protocol == "shielded":
        from secure_service.shielded_api import ShieldedService
        from slip_vllm.settings import settings

        cfg = settings()
        opts = {"num_blocks": cfg.shielded_kv_blocks, "block_size": cfg.shielded_block_size,
                "timeout_s": cfg.shielded_step_timeout_s, "mask_audit": cfg.mask_audit, **(shielded_options or {})}
        try:
            shielded = ShieldedService(bundle.path, **opts)
        except (ValueError, KeyError) as exc:
            from secure_service.bundle import BundleError

            raise BundleError(f"the shielded bundle cannot be served: {exc}") from None
        info = {**info, **shielded.info()}
        app.state.shielded = shielded

    def reject(status: int, message: str) -> JSONResponse:
        with stats.lock:
            stats.rejected += 1
        return _error(status, message)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info")
    def v1_info() -> dict:
        return info

    @app.get("/v1/stats")
    def v1_stats() -> dict:
        snap = stats.snapshot()
        if shielded is not None:
            snap["shielded"] = shielded.stats()
        return snap

    def check_token(request: Request) -> bool:
        if not token:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    async def read_body(request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > max_body_bytes:
                    return reject(413, f"body of {declared} bytes exceeds the {max_body_bytes}-byte limit")
            except ValueError:
                return reject(400, "bad Content-Length")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                return reject(413, f"body exceeds the {max_body_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def data_plane_call(request: Request, plane: str, decode, handle) -> Response:
        """Shared prologue and epilogue of every binary data-plane endpoint: token, protocol gate,
        bounded body, strict decoding, handler in the thread pool, counters."""
        if not check_token(request):
            return reject(401, "missing or wrong bearer token")
        closed = shielded is None if plane == "shielded" else bundle.protocol != "split"
        if closed:
            return reject(403, f"this bundle uses protocol {bundle.protocol!r}; the {plane} data plane is closed")
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        try:
            frame = decode(body)
        except WireError as exc:
            return reject(400, f"bad frame: {exc}")
        started = time.perf_counter()
        try:
            reply, rows = await run_in_threadpool(handle, frame)
        except (StepRejected, RequestRejected) as exc:
            return reject(exc.status, str(exc))
        with stats.lock:
            stats.calls += 1
            stats.rows += rows
            stats.bytes_in += len(body)
            stats.bytes_out += len(reply)
            stats.compute_s += time.perf_counter() - started
        return Response(content=reply, media_type=OCTET)

    def start_step(frame) -> tuple[bytes, int]:
        if not sessions.admit(frame.session, frame.seq):
            raise StepRejected(409, f"replayed or out-of-order step (session {frame.session:#x}, seq {frame.seq})")
        return shielded.start_step(frame), 0

    def split_step(frame) -> tuple[bytes, int]:
        if not sessions.admit(frame.session, frame.seq):
            raise RequestRejected(409, f"replayed or out-of-order frame (session {frame.session:#x}, seq {frame.seq})")
        return encode_reply(executor.run(frame)), int(frame.payload.shape[0])

    @app.post("/v1/shielded/step")
    async def shielded_step(request: Request) -> Response:
        return await data_plane_call(request, "shielded", decode_shielded_step, start_step)

    @app.post("/v1/shielded/gemm")
    async def shielded_gemm(request: Request) -> Response:
        return await data_plane_call(request, "shielded",
                                     lambda b: decode_shielded_message(b, expect_kind=MSG_ANSWER),
                                     lambda m: (shielded.answer(m), 0))

    @app.post("/v1/shielded/logits")
    async def shielded_logits(request: Request) -> Response:
        return await data_plane_call(request, "shielded",
                                     lambda b: decode_shielded_message(b, expect_kind=MSG_ROWS),
                                     lambda m: (shielded.logits(m), 0))

    @app.post("/v1/split/apply")
    async def split_apply(request: Request) -> Response:
        return await data_plane_call(request, "split", decode_request, split_step)

    return app


def serve(bundle_dir: str, host: str = "127.0.0.1", port: int = 8400, *, token: str = "",
          max_body_bytes: int = 256 << 20, threads: int = 0, log_level: str = "info") -> None:
    """Load and validate the bundle, then serve until interrupted."""
    import torch
    import uvicorn

    from secure_service.bundle import load_bundle

    if threads > 0:
        torch.set_num_threads(threads)
    bundle = load_bundle(bundle_dir)
    log.info("bundle %s: %d secret tensors, protocol %s, manifest %s", bundle_dir, len(bundle.tensors),
             bundle.protocol, bundle.manifest_sha256[:16])
    app = create_app(bundle, token=token, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False)
