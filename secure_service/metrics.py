"""TRUSTED side: the service's Prometheus metrics (``GET /metrics``), and ``/v1/stats`` derived from them.

What this module owns
---------------------
``ServiceMetrics``: one ``prometheus_client`` registry per service app (never the process-global
one, so several apps in one process keep their own counts), holding

* data plane, per endpoint (``split/apply``, ``shielded/step``, ``shielded/gemm``,
  ``shielded/logits``): ``slip_data_plane_calls_total``, ``slip_data_plane_rows_total``,
  ``slip_data_plane_bytes_in_total``, ``slip_data_plane_bytes_out_total``,
  ``slip_data_plane_call_seconds`` (histogram), and ``slip_data_plane_rejected_total`` per
  endpoint (``attach``, ``http`` or ``channel`` for refusals before the data plane) and status;
* read at scrape time from their owners (``StateCollector``): shielded steps by outcome
  (``slip_shielded_steps_total{outcome=started|completed|aborted|refused}``, so
  ``outcome="aborted"`` is the steps aborted), ``slip_integrity_alarms_total``, the mask pools
  (``slip_mask_pool_rows`` level now, ``slip_mask_pool_capacity_rows``,
  ``slip_mask_pool_min_level_rows``, ``slip_mask_refill_rows_per_second`` and
  ``slip_mask_demand_rows_per_second`` over the last 10 s, ``slip_mask_rows_on_demand_total``),
  attached channels, licence lock-outs, and per licence (label ``licence``; ``-`` when no
  licences are configured) ``slip_licence_<counter>_total`` for every counter of
  ``secure_service.metering`` plus ``slip_licence_usable`` (1 valid, 0 revoked / expired /
  locked).

``stats_snapshot(metrics)`` sums the same registry's samples into the JSON of ``/v1/stats``
(calls, rows, bytes_in, bytes_out, rejected, compute_s), so the two never disagree.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from slip_vllm.core.wire import ENDPOINT_PATHS

ENDPOINT_LABELS = {ep: path.removeprefix("/v1/") for ep, path in ENDPOINT_PATHS.items()}
LATENCY_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 0.5,
                   1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter("slip_data_plane_calls", "data-plane calls answered", ["endpoint"], registry=r)
        self.rows = Counter("slip_data_plane_rows", "token rows carried by answered calls", ["endpoint"], registry=r)
        self.bytes_in = Counter("slip_data_plane_bytes_in", "request bytes of answered calls", ["endpoint"], registry=r)
        self.bytes_out = Counter("slip_data_plane_bytes_out", "reply bytes of answered calls", ["endpoint"], registry=r)
        self.rejected = Counter("slip_data_plane_rejected", "refused calls", ["endpoint", "status"], registry=r)
        self.latency = Histogram("slip_data_plane_call_seconds", "service time of answered calls", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.started = time.time()
        # labelled children resolved once (a label lookup per call costs more than the increment)
        self._children = {ep: (self.calls.labels(name), self.rows.labels(name), self.bytes_in.labels(name),
                               self.bytes_out.labels(name), self.latency.labels(name))
                          for ep, name in ENDPOINT_LABELS.items()}

    def record(self, endpoint: int, rows: int, bytes_in: int, bytes_out: int, seconds: float) -> None:
        calls, rws, bin_, bout, lat = self._children[endpoint]
        calls.inc()
        if rows:
            rws.inc(rows)
        bin_.inc(bytes_in)
        bout.inc(bytes_out)
        lat.observe(seconds)

    def count_rejected(self, endpoint, status: int) -> None:
        name = ENDPOINT_LABELS.get(endpoint, endpoint if isinstance(endpoint, str) else "unknown")
        self.rejected.labels(name, str(status)).inc()


def _sum(metric, suffix: str) -> float:
    return sum(s.value for fam in metric.collect() for s in fam.samples if s.name.endswith(suffix))


def stats_snapshot(metrics: ServiceMetrics) -> dict:
    return {"calls": int(_sum(metrics.calls, "_total")), "rows": int(_sum(metrics.rows, "_total")),
            "bytes_in": int(_sum(metrics.bytes_in, "_total")), "bytes_out": int(_sum(metrics.bytes_out, "_total")),
            "rejected": int(_sum(metrics.rejected, "_total")),
            "compute_s": round(_sum(metrics.latency, "_sum"), 6),
            "uptime_s": round(time.time() - metrics.started, 3)}


class StateCollector:
    """Metrics whose owners keep the numbers (read when scraped; see the module docstring)."""

    def __init__(self, *, shielded=None, channels=None, metering=None):
        self.shielded, self.channels, self.metering = shielded, channels, metering

    def describe(self):
        return []

    def collect(self):
        if self.shielded is not None:
            st = self.shielded.stats()
            steps = CounterMetricFamily("slip_shielded_steps", "shielded engine steps by outcome", labels=["outcome"])
            for outcome in ("started", "completed", "aborted", "refused"):
                steps.add_metric([outcome], st.get(f"steps_{outcome}", 0))
            yield steps
            yield CounterMetricFamily("slip_integrity_alarms", "integrity alarms (Freivalds or range failures)",
                                      value=st.get("integrity_alarms", 0))
            masks = st.get("masks") or {}
            if masks:
                for name, key, help_ in (
                        ("slip_mask_pool_rows", "pooled_rows", "one-time mask rows ready now (all layers)"),
                        ("slip_mask_pool_capacity_rows", "pool_capacity_rows", "mask pool capacity (all layers)"),
                        ("slip_mask_pool_min_level_rows", "pool_level_min", "lowest layer pool level now"),
                        ("slip_mask_refill_rows_per_second", "refill_rows_per_s",
                         "mask rows made ahead of demand per second (last 10 s)"),
                        ("slip_mask_demand_rows_per_second", "demand_rows_per_s",
                         "mask rows taken per second (last 10 s)")):
                    yield GaugeMetricFamily(name, help_, value=float(masks.get(key) or 0))
                yield CounterMetricFamily("slip_mask_rows_on_demand", "mask rows made on demand (pool empty)",
                                          value=masks.get("pool_misses", 0))
        if self.channels is not None:
            yield GaugeMetricFamily("slip_channels_attached", "shared-memory channels attached",
                                    value=self.channels.stats()["attached"])
        if self.metering is not None:
            snap = self.metering.snapshot()
            from secure_service.metering import COUNTERS

            for counter in COUNTERS:
                fam = CounterMetricFamily(f"slip_licence_{counter}", f"per licence: {counter.replace('_', ' ')}",
                                          labels=["licence"])
                for lid, d in snap.items():
                    fam.add_metric([lid], d.get(counter, 0))
                yield fam
            usable = GaugeMetricFamily("slip_licence_usable", "1 if the licence is valid and not locked out",
                                       labels=["licence"])
            for lid, d in snap.items():
                usable.add_metric([lid], 1.0 if d.get("state", "valid") == "valid" and not d.get("locked") else 0.0)
            yield usable
            yield CounterMetricFamily("slip_licence_lockouts", "licences locked out by the alarm policy",
                                      value=self.metering.lockouts_total)
