"""FastAPI application of the secure service: the control plane, and the HTTP data plane.

Endpoints:
  GET  /healthz            200 once the bundle is loaded and validated
  GET  /v1/info            protocol, model, bundle hash, data planes offered, the instance id of
                           this process (and for shielded the KV epoch and whether an engine
                           holds the service): public facts only
  GET  /v1/stats           counters: calls, rows, bytes in/out, rejected requests, channels
  POST /v1/channel/attach  step 1 of attaching a colocated shared-memory channel (bearer token,
                           the artifact's manifest hash); see secure_service.transport
  POST /v1/split/apply     data plane of protocol ``split`` over HTTP (binary frames, see
                           slip_vllm.core.wire)
  POST /v1/shielded/step, /v1/shielded/gemm, /v1/shielded/logits
                           data plane of protocol ``shielded`` over HTTP (see
                           secure_service.shielded_api)

Runs on the TRUSTED side (the secure service); it never imports vLLM.  The data plane itself
(``secure_service.data_plane``) is the same whichever transport carries it
(``secure_service.transport``: HTTP here, or the shared-memory channel).

Every malformed request answers 4xx and leaves the service healthy: body size is capped before it is
read, frames are decoded strictly, ids/shapes/values are checked against the bundle, and each
session's sequence numbers must increase (replays and reordering answer 409).
"""

from __future__ import annotations

import contextlib
import logging
import secrets

from fastapi import FastAPI

from secure_service.body_limits import body_limits
from secure_service.bundle import Bundle
from secure_service.data_plane import DataPlane
from secure_service.transport import ChannelServer, attach_route, error_response, mount_http

log = logging.getLogger("slip.service")


def create_app(bundle: Bundle, *, token: str = "", max_body_bytes: int | None = None,
               shielded_options: dict | None = None, channel: bool | None = None) -> FastAPI:
    """shielded_options: keyword arguments of ``ShieldedService`` (num_blocks, block_size,
    timeout_s, pool_rows); defaults from the settings.  channel: offer the colocated shared-memory
    data plane (default: ``SLIP_CHANNEL``); its capacity per direction is max_body_bytes.
    max_body_bytes: None or 0 sizes it from the model (``body_limits``: SLIP_MAX_STEP_TOKENS x the
    widest row an endpoint carries), unless ``SLIP_MAX_BODY_BYTES`` sets it."""
    from slip_vllm.settings import settings

    cfg = settings()
    resources: list = []

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        for close in resources:  # the channel server, then the shielded service
            close()

    app = FastAPI(title="SLIP secure service", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    instance = secrets.randbits(63) | 1  # this process: a restarted service has another
    info = {**bundle.info(), "instance": instance}
    shielded = None
    if bundle.protocol == "shielded":
        from secure_service.shielded_api import ShieldedService

        opts = {"num_blocks": cfg.shielded_kv_blocks, "block_size": cfg.shielded_block_size,
                "timeout_s": cfg.shielded_step_timeout_s, "mask_audit": cfg.mask_audit,
                "owner_lease_s": cfg.shielded_owner_lease_s, "instance": instance,
                "timeout_per_row_s": cfg.shielded_step_timeout_per_row_ms * 1e-3,
                "max_model_len": cfg.shielded_max_model_len, "max_step_tokens": cfg.max_step_tokens,
                **(shielded_options or {})}
        try:
            shielded = ShieldedService(bundle, **opts)  # the bundle loaded (and hashed) once
        except (ValueError, KeyError) as exc:
            from secure_service.bundle import BundleError

            raise BundleError(f"the shielded bundle cannot be served: {exc}") from None
        info = {**info, **shielded.info()}
        app.state.shielded = shielded
        resources.append(shielded.close)
    sized = body_limits(bundle, shielded.limits.max_step_tokens if shielded is not None else cfg.max_step_tokens,
                        max_blocks_per_seq=shielded.limits.max_blocks_per_seq if shielded is not None else None)
    max_body_bytes = int(max_body_bytes or cfg.max_body_bytes or sized["max_body_bytes"])
    info = {**info, "max_step_tokens": sized["max_step_tokens"], "max_body_bytes": max_body_bytes}
    plane = DataPlane(bundle, shielded, instance)
    app.state.plane = plane
    channels = None
    if cfg.channel if channel is None else channel:
        channels = ChannelServer(plane, manifest_sha256=bundle.manifest_sha256, capacity=max_body_bytes,
                                 spin_s=cfg.channel_spin_us * 1e-6, socket_dir=cfg.channel_dir or None)
        channels.start()
        app.state.channels = channels
        resources.insert(0, channels.close)
    info = {**info, "data_planes": ["http"] + (["shm"] if channels is not None else [])}

    def reject(status: int, message: str):
        plane.stats.count_rejected()
        return error_response(status, message)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info")
    def v1_info() -> dict:
        return info if shielded is None else {**info, **shielded.identity()}

    @app.get("/v1/stats")
    def v1_stats() -> dict:
        snap = plane.stats.snapshot()
        if channels is not None:
            snap["channels"] = channels.stats()
        if shielded is not None:
            snap["shielded"] = shielded.stats()
        return snap

    attach_route(app, channels, token, reject)
    mount_http(app, plane, token=token, max_body_bytes=max_body_bytes)
    return app


def serve(bundle_dir: str, host: str = "127.0.0.1", port: int = 8400, *, token: str = "",
          max_body_bytes: int = 0, threads: int = 0, log_level: str = "info") -> None:
    """Load and validate the bundle, then serve until interrupted.  max_body_bytes: 0 sizes the
    body cap from the model (see ``create_app``)."""
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
