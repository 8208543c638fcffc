"""FastAPI application of the secure service: the control plane, and the HTTP data plane.

Endpoints:
  GET  /healthz            200 once the bundle is loaded and validated
  GET  /v1/info            protocol, model, bundle hash, data planes offered, the instance id of
                           this process (and for shielded the KV epoch and whether an engine
                           holds the service): public facts only
  GET  /v1/stats           counters: calls, rows, bytes in/out, rejected requests, channels, per
                           licence usage (summed from the registry of /metrics)
  GET  /metrics            Prometheus text format (``secure_service.metrics``)
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

Licences (``SLIP_LICENCES_FILE``): the data plane and the channel attach then take a licence key as
bearer credential instead of the service token, and every call is admitted, budgeted and metered
by ``secure_service.metering`` (usage log ``SLIP_USAGE_LOG``).  ``serve`` refuses a non-loopback
bind without credentials (licences or a token) and TLS unless ``insecure`` (``check_bind``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets

from fastapi import FastAPI
from fastapi.responses import Response

from secure_service.body_limits import body_limits
from secure_service.bundle import Bundle
from secure_service.data_plane import DataPlane
from secure_service.transport import ChannelServer, attach_route, error_response, mount_http

log = logging.getLogger("slip.service")


def make_metering(cfg, manifest_sha256: str, instance: int):
    """The service's ``Metering`` from the settings: licences file, usage log and its HMAC key,
    alarm policy.  Without a licences file: the anonymous account, logged only if SLIP_USAGE_LOG."""
    from secure_service.licences import LicenceStore
    from secure_service.metering import Metering, UsageLog, load_key

    store = LicenceStore(cfg.licences_file, poll_s=cfg.licences_poll_s) if cfg.licences_file else None
    log_path = cfg.usage_log or (cfg.licences_file + ".usage.jsonl" if cfg.licences_file else "")
    usage = None
    if log_path:
        key_path = cfg.usage_key_file or (cfg.licences_file + ".key" if cfg.licences_file else "")
        if not key_path:
            raise ValueError("SLIP_USAGE_LOG needs SLIP_USAGE_KEY_FILE (the vendor's HMAC key of the log)")
        usage = UsageLog(log_path, load_key(key_path, create=True))
    return Metering(manifest_sha256=manifest_sha256, store=store, usage_log=usage, flush_s=cfg.usage_flush_s,
                    session_idle_s=cfg.licence_session_idle_s, alarm_limit=cfg.alarm_limit,
                    alarm_window_s=cfg.alarm_window_s, alarm_lockout_s=cfg.alarm_lockout_s, instance=instance)


def create_app(bundle: Bundle, *, token: str = "", max_body_bytes: int | None = None,
               shielded_options: dict | None = None, channel: bool | None = None) -> FastAPI:
    """shielded_options: keyword arguments of ``ShieldedService`` (num_blocks, block_size,
    timeout_s, pool_rows); defaults from the settings.  channel: offer the colocated shared-memory
    data plane (default: ``SLIP_CHANNEL``); its capacity per direction is max_body_bytes.
    max_body_bytes: None or 0 sizes it from the model (``body_limits``: SLIP_MAX_STEP_TOKENS x the
    widest row an endpoint carries), unless ``SLIP_MAX_BODY_BYTES`` sets it.  Licences, usage log
    and alarm policy come from the settings (``make_metering``)."""
    from slip_vllm.settings import settings

    from secure_service.metrics import StateCollector

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
        from secure_service.logits_policy import LogitsPolicy
        from secure_service.shielded_api import ShieldedService

        policy = LogitsPolicy(cfg.shielded_logits_policy, cfg.shielded_logits_topk)  # a bad value: ValueError
        opts = {"logits_policy": policy, "num_blocks": cfg.shielded_kv_blocks, "block_size": cfg.shielded_block_size,
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
    metering = make_metering(cfg, bundle.manifest_sha256, instance)
    if metering.store is not None:
        metering.store.start()
        resources.append(metering.store.close)
        token = ""  # with licences the bearer credential is a licence key
    metering.start()
    resources.append(metering.close)
    plane = DataPlane(bundle, shielded, instance, metering=metering)
    app.state.plane = plane
    info = {**info, "licences": metering.licensed}
    channels = None
    if cfg.channel if channel is None else channel:
        channels = ChannelServer(plane, manifest_sha256=bundle.manifest_sha256, capacity=max_body_bytes,
                                 spin_s=cfg.channel_spin_us * 1e-6, socket_dir=cfg.channel_dir or None)
        channels.start()
        app.state.channels = channels
        resources.insert(0, channels.close)
    info = {**info, "data_planes": ["http"] + (["shm"] if channels is not None else [])}

    plane.stats.metrics.registry.register(StateCollector(shielded=shielded, channels=channels, metering=metering))

    def reject(status: int, message: str):
        plane.stats.count_rejected("attach", status)
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
        snap["licences"] = metering.snapshot()
        return snap

    @app.get("/metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(plane.stats.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    attach_route(app, channels, token, reject)
    mount_http(app, plane, token=token, max_body_bytes=max_body_bytes)
    return app


class UnsafeBind(ValueError):
    """A non-loopback bind without credentials or TLS (see ``check_bind``)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, *, licences: bool, token: bool, tls: bool, insecure: bool) -> None:
    """Safe defaults: a non-loopback address needs licences (or a token) and TLS, unless insecure."""
    if is_loopback(host) or insecure:
        return
    missing = []
    if not (licences or token):
        missing.append("credentials: a licences file (SLIP_LICENCES_FILE, see slip license issue) or a bearer "
                       "token (SLIP_SERVICE_TOKEN)")
    if not tls:
        missing.append("TLS: a certificate and key (--ssl-certfile/--ssl-keyfile or SLIP_SSL_CERTFILE/SLIP_SSL_KEYFILE)")
    if missing:
        raise UnsafeBind(f"refusing to serve on {host}, which is not a loopback address, without "
                         + " and without ".join(missing)
                         + "; provide them, bind 127.0.0.1, or pass --insecure (SLIP_INSECURE=1) if this network "
                           "is trusted")


def serve(bundle_dir: str, host: str = "127.0.0.1", port: int = 8400, *, token: str = "",
          max_body_bytes: int = 0, threads: int = 0, log_level: str = "info", insecure: bool = False,
          ssl_certfile: str = "", ssl_keyfile: str = "", ssl_ca_certs: str = "") -> None:
    """Load and validate the bundle, then serve until interrupted.  max_body_bytes: 0 sizes the
    body cap from the model (see ``create_app``).  The bind is checked first (``check_bind``);
    ssl_*: uvicorn's TLS options (ssl_ca_certs: clients must present a certificate it signed)."""
    import ssl

    import torch
    import uvicorn

    from secure_service.bundle import load_bundle
    from slip_vllm.settings import settings

    check_bind(host, licences=bool(settings().licences_file), token=bool(token),
               tls=bool(ssl_certfile and ssl_keyfile), insecure=insecure)
    for path in (ssl_certfile, ssl_keyfile, ssl_ca_certs):
        if path and not os.path.isfile(path):
            raise UnsafeBind(f"TLS file {path} does not exist")
    if threads > 0:
        torch.set_num_threads(threads)
    bundle = load_bundle(bundle_dir)
    log.info("bundle %s: %d secret tensors, protocol %s, manifest %s", bundle_dir, len(bundle.tensors),
             bundle.protocol, bundle.manifest_sha256[:16])
    app = create_app(bundle, token=token, max_body_bytes=max_body_bytes)
    tls = {}
    if ssl_certfile:
        tls = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile or None}
        if ssl_ca_certs:
            tls.update(ssl_ca_certs=ssl_ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False, **tls)
