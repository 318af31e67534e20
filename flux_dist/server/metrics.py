"""The server's Prometheus metrics (``prometheus_client``), in a registry of their own per server."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..lockstep import STOP_REASONS

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes


class Metrics:
    """Counters, gauges and one latency histogram (thread-safe: the event loop and the serving loop write)."""

    def __init__(self) -> None:
        # No "<name>_created" series: they double the text and nothing here reads them. (Process-wide switch.)
        prometheus_client.disable_created_metrics()
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._responses = Counter("flux_dist_http_responses", "HTTP responses by status code (499: the client left "
                                  "before the answer).", ["code"], registry=r)
        self._requests = Counter("flux_dist_requests", "Image generation requests received.", registry=r)
        self._failures = Counter("flux_dist_request_failures",
                                 "Generation requests that failed inside the model (HTTP 500).", registry=r)
        self._stopped = Counter("flux_dist_requests_stopped", "Generation requests stopped at a step boundary or "
                                "dropped from the queue, by reason (deadline, cancelled, shutdown).", ["reason"],
                                registry=r)
        for reason in STOP_REASONS:
            self._stopped.labels(reason=reason)  # present (at 0) from the start
        self._images = Counter("flux_dist_images", "Images generated.", registry=r)
        self._steps = Counter("flux_dist_denoise_steps", "Denoising steps run or skipped.", registry=r)
        self._skipped = Counter("flux_dist_cache_skipped_steps", "Denoising steps the step cache skipped.", registry=r)
        self._queue_length = Gauge("flux_dist_queue_length", "Jobs waiting in the FIFO queue.", registry=r)
        self._queue_limit = Gauge("flux_dist_queue_limit", "Queue length over which requests get 429.", registry=r)
        self._ready = Gauge("flux_dist_ready", "1 when every rank is serving.", registry=r)
        self._connections = Gauge("flux_dist_http_connections", "Open HTTP connections.", registry=r)
        self._latency = Histogram("flux_dist_request_latency_seconds",
                                  "Successful generation requests, arrival to result (queue wait included).",
                                  buckets=LATENCY_BUCKETS, registry=r)

    def response(self, code: int) -> None:
        self._responses.labels(code=str(code)).inc()

    def generation(self) -> None:
        self._requests.inc()

    def failure(self) -> None:
        self._failures.inc()

    def stopped(self, reason: str) -> None:
        self._stopped.labels(reason=reason).inc()

    def job_done(self, latency_s: float, images: int, steps: int, skipped: int) -> None:
        self._images.inc(images)
        self._steps.inc(steps)
        self._skipped.inc(skipped)
        self._latency.observe(latency_s)

    def render(self, *, queue_length: int, queue_limit: int, ready: bool, connections: int = 0) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        self._queue_length.set(queue_length)
        self._queue_limit.set(queue_limit)
        self._ready.set(int(ready))
        self._connections.set(connections)
        return prometheus_client.generate_latest(self.registry).decode()
