"""Prometheus text-format metrics, kept by hand (no client library: one small dependency less)."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class Metrics:
    """Counters, gauges and one latency histogram; thread-safe (the HTTP threads and the loop write)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.responses: Counter[str] = Counter()  # by HTTP status code, every endpoint
        self.generation_requests = 0
        self.failures = 0  # 500s: the model failed (bad requests are counted by code, not here)
        self.images = 0
        self.cache_skipped_steps = 0
        self.steps = 0
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def response(self, code: int) -> None:
        with self._lock:
            self.responses[str(code)] += 1

    def generation(self) -> None:
        with self._lock:
            self.generation_requests += 1

    def failure(self) -> None:
        with self._lock:
            self.failures += 1

    def job_done(self, latency_s: float, images: int, steps: int, skipped: int) -> None:
        with self._lock:
            self.images += images
            self.steps += steps
            self.cache_skipped_steps += skipped
            self.latency_sum += latency_s
            self.latency_count += 1
            for i, le in enumerate(LATENCY_BUCKETS):
                if latency_s <= le:
                    self.latency_buckets[i] += 1

    def render(self, *, queue_length: int, queue_limit: int, ready: bool) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_fmt(v)}" for labels, v in samples)

        with self._lock:
            metric("flux_dist_http_responses_total", "counter", "HTTP responses by status code.",
                   [(f'{{code="{c}"}}', n) for c, n in sorted(self.responses.items())])
            metric("flux_dist_requests_total", "counter", "Image generation requests received.",
                   [("", self.generation_requests)])
            metric("flux_dist_request_failures_total", "counter",
                   "Generation requests that failed inside the model (HTTP 500).", [("", self.failures)])
            metric("flux_dist_images_total", "counter", "Images generated.", [("", self.images)])
            metric("flux_dist_denoise_steps_total", "counter", "Denoising steps run or skipped.", [("", self.steps)])
            metric("flux_dist_cache_skipped_steps_total", "counter",
                   "Denoising steps the step cache skipped.", [("", self.cache_skipped_steps)])
            metric("flux_dist_queue_length", "gauge", "Jobs waiting in the FIFO queue.", [("", queue_length)])
            metric("flux_dist_queue_limit", "gauge", "Queue length over which requests get 429.",
                   [("", queue_limit)])
            metric("flux_dist_ready", "gauge", "1 when every rank is serving.", [("", int(ready))])
            name = "flux_dist_request_latency_seconds"
            lines.append(f"# HELP {name} Successful generation requests, arrival to result (queue wait included).")
            lines.append(f"# TYPE {name} histogram")
            for le, n in zip(LATENCY_BUCKETS, self.latency_buckets, strict=True):
                lines.append(f'{name}_bucket{{le="{_fmt(le)}"}} {n}')
            lines.append(f'{name}_bucket{{le="+Inf"}} {self.latency_count}')
            lines.append(f"{name}_sum {_fmt(round(self.latency_sum, 6))}")
            lines.append(f"{name}_count {self.latency_count}")
        return "\n".join(lines) + "\n"
