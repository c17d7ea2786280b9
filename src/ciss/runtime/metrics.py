"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from dataclasses import dataclass

# Latency buckets in seconds: small CPU models answer in milliseconds, big ones in seconds.
SHARES = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
DEVIATIONS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)  # novelty's units
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ServerMetrics:
    """Counters, histograms and gauges named after KServe's/Triton's where one exists."""

    registry: object
    requests: object
    failures: object
    latency: object
    queue: object
    compute: object
    inflight: object
    served_step: object
    model_info: object
    gate_runs: object
    gate_passed: object
    gate_mean_drop: object
    swaps: object
    shadow_agreement: object
    shadow_samples: object
    shadow_skipped: object
    shadow_alarms: object
    scores: dict
    collected: object

    @classmethod
    def create(cls) -> ServerMetrics:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = CollectorRegistry()
        return cls(
            registry=r,
            requests=Counter("ciss_requests", "HTTP requests by endpoint and status code.",
                             ["endpoint", "code"], registry=r),
            failures=Counter("ciss_request_failures", "Requests answered with an error, by "
                             "endpoint and reason (client = 4xx, server = 5xx).",
                             ["endpoint", "reason"], registry=r),
            latency=Histogram("ciss_request_duration_seconds", "End-to-end request latency.",
                              ["endpoint"], buckets=BUCKETS, registry=r),
            queue=Histogram("ciss_queue_duration_seconds", "Time waiting for an engine slot.",
                            buckets=BUCKETS, registry=r),
            compute=Histogram("ciss_compute_duration_seconds", "Engine run time per batch.",
                              buckets=BUCKETS, registry=r),
            inflight=Gauge("ciss_inflight_requests", "Requests being handled now.", registry=r),
            served_step=Gauge("ciss_served_step", "The store step being served.", registry=r),
            model_info=Gauge("ciss_model_info", "1 for the served step/engine.",
                             ["step", "engine", "version"], registry=r),
            gate_runs=Counter("ciss_gate_runs", "Retention-gate runs by result.", ["result"],
                              registry=r),
            gate_passed=Gauge("ciss_gate_last_passed", "1 if the last gate run passed.",
                              registry=r),
            gate_mean_drop=Gauge("ciss_gate_last_mean_old_drop_points", "Mean old-class IoU "
                                 "drop (points) measured by the last gate run.", registry=r),
            swaps=Counter("ciss_model_swaps", "Attempts to switch the served engine, by outcome.",
                          ["outcome"], registry=r),
            shadow_agreement=Gauge("ciss_shadow_agreement", "Share of the previous step's "
                                   "pixels of each old class the served step also assigns "
                                   "to it (sliding window of shadowed requests).", ["cls"],
                                   registry=r),
            shadow_samples=Counter("ciss_shadow_samples", "Requests shadowed by the previous "
                                   "step.", registry=r),
            shadow_skipped=Counter("ciss_shadow_skipped", "Sampled requests not shadowed, by "
                                   "reason (in_flight: one run already; queue: requests "
                                   "waiting).", ["reason"], registry=r),
            shadow_alarms=Counter("ciss_shadow_alarms", "Retention alarms raised on live "
                                  "traffic.", registry=r),
            scores={
                "uncertainty": Histogram("ciss_score_uncertainty", "Per-image uncertainty: "
                                         "mean pixel entropy / log K.", buckets=SHARES,
                                         registry=r),
                "novelty": Histogram("ciss_score_novelty", "Per-image novelty: the mean "
                                     "standardised novelty signal of its 2 % most unusual "
                                     "pixels, in retention standard deviations.",
                                     buckets=DEVIATIONS, registry=r),
                "novel_share": Histogram("ciss_score_novel_share", "Share of an image's "
                                         "pixels past the calibrated pixel threshold.",
                                         buckets=SHARES, registry=r),
                "largest_region": Histogram("ciss_score_largest_region", "Share of an image "
                                            "covered by its largest connected novel region.",
                                            buckets=SHARES, registry=r),
            },
            collected=Counter("ciss_collect", "Scored images seen by --collect, by outcome "
                              "(kept_novelty, kept_uncertainty, kept_random, not_selected, "
                              "duplicate, cap_minute, cap_hour, cap_day, cap_disk, dropped, "
                              "failed).", ["outcome"], registry=r),
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def endpoint_label(path: str) -> str:
    """A low-cardinality metrics label for a request path."""
    if path.startswith("/v2/models/"):
        return "infer" if path.endswith("/infer") else "model"
    if path.startswith("/admin/"):
        return "admin"
    if path in ("/v1/segment", "/v1/status", "/metrics", "/v2", "/v2/health/live",
                "/v2/health/ready"):
        return path.strip("/").replace("/", "_") or "root"
    return "other"


class MeteredASGI:
    """ASGI middleware: request counts by endpoint and status, latency, in-flight gauge."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = endpoint_label(scope["path"])
        code = ["500"]

        async def send_status(message):
            if message["type"] == "http.response.start":
                code[0] = str(message["status"])
            await send(message)

        t0 = time.perf_counter()
        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(label, code[0]).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)
