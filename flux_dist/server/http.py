"""Rank 0's HTTP front end (standard library only): parse, check, queue, wait, answer.

The HTTP threads never touch the model or a collective: they validate a request, put a ``Job`` on
a bounded FIFO queue (full -> 429) and wait on its future; the serving loop on the main thread
takes jobs one at a time and broadcasts them to every rank.
"""

from __future__ import annotations

import base64
import hmac
import io
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..config import RequestConfig
from .loop import Job, JobOutcome
from .metrics import Metrics
from .protocol import MAX_BODY_BYTES, BadRequest, parse_generation

log = logging.getLogger("flux_dist")

GENERATIONS = "/v1/images/generations"


@dataclass
class ServeOptions:
    """Front-end knobs (the CLI's ``serve`` flags; other launchers pass the same)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 16
    max_images: int = 4
    request_timeout_s: float = 600.0


class HTTPError(Exception):
    def __init__(self, code: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code, self.message, self.kind = code, message, kind


class FrontEnd:
    """The listening socket, the job queue, health state and metrics (rank 0 only)."""

    def __init__(self, opts: ServeOptions, defaults: RequestConfig, *, validate: Callable[[RequestConfig], None],
                 true_cfg: bool, model_name: str) -> None:
        self.opts = opts
        self.defaults = defaults
        self.validate = validate
        self.true_cfg = true_cfg
        self.model_name = model_name
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max(1, opts.max_queue))
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.down_reason: str | None = None
        self.stopping = threading.Event()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        front = self

        class Handler(_Handler):
            fe = front

        self.httpd = ThreadingHTTPServer((opts.host, opts.port), Handler, bind_and_activate=False)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 128  # a burst of clients must reach us to be told 429, not be refused
        try:
            self.httpd.server_bind()
            self.httpd.server_activate()
        except BaseException:
            self.httpd.server_close()
            raise

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]  # type: ignore[return-value]

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="flux-dist-http", daemon=True)
        self._thread.start()

    def mark_ready(self) -> None:
        self.ready.set()

    def mark_down(self, reason: str) -> None:
        """Not ready from now on (a rank died, or shutting down); queued jobs are answered 503."""
        self.down_reason = reason
        self.ready.clear()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            job.future.cancel()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def next_id(self) -> int:
        return next(self._ids)


def _png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Handler(BaseHTTPRequestHandler):
    fe: FrontEnd
    protocol_version = "HTTP/1.1"
    server_version = "flux-dist"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s " + format, self.address_string(), *args)

    # -- plumbing ----------------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.fe.metrics.response(code)
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json", headers)

    def _error(self, e: HTTPError, headers: dict[str, str] | None = None) -> None:
        self._json(e.code, {"error": {"message": e.message, "type": e.kind, "code": e.code}}, headers)

    def _authorize(self) -> None:
        key = self.fe.opts.api_key
        if not key:
            return
        got = self.headers.get("Authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise HTTPError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error")

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise HTTPError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, f"bad Content-Length {length!r}") from None
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True
            raise HTTPError(413, f"body of {n} bytes is over the limit of {MAX_BODY_BYTES}")
        return self.rfile.read(n)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except HTTPError as e:
            extra = {"WWW-Authenticate": "Bearer"} if e.code == 401 else None
            if e.code == 429:
                extra = {"Retry-After": "1"}
            self._error(e, extra)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a front-end bug answers 500, the server keeps serving
            log.exception("HTTP handler failed")
            self._error(HTTPError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    # -- routes ------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._guard(self._get)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._guard(self._post)

    def _get(self) -> None:
        if self.command == "GET" and self.headers.get("Content-Length") not in (None, "0"):
            self.close_connection = True  # we do not read GET bodies
        self._authorize()
        path = self.path.split("?", 1)[0]
        fe = self.fe
        if path == "/health":
            if fe.stopping.is_set() and fe.down_reason is None:
                self._json(503, {"status": "stopping", "reason": "shutting down"})
            elif fe.ready.is_set():
                self._json(200, {"status": "ready", "model": fe.model_name, "queue_length": fe.jobs.qsize()})
            else:
                self._json(503, {"status": "down" if fe.down_reason else "starting", "reason": fe.down_reason})
        elif path == "/metrics":
            text = fe.metrics.render(queue_length=fe.jobs.qsize(), queue_limit=fe.jobs.maxsize,
                                     ready=fe.ready.is_set() and not fe.stopping.is_set())
            self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            raise HTTPError(404, f"no route GET {path}")

    def _post(self) -> None:
        arrived = time.perf_counter()
        fe = self.fe
        try:
            self._authorize()
        except HTTPError:
            self.close_connection = True  # the body stays unread
            raise
        raw = self._body()
        path = self.path.split("?", 1)[0]
        if path != GENERATIONS:
            raise HTTPError(404, f"no route POST {path}")
        fe.metrics.generation()
        if not fe.ready.is_set() or fe.stopping.is_set():
            reason = fe.down_reason or ("shutting down" if fe.stopping.is_set() else "starting")
            raise HTTPError(503, f"not ready: {reason}", "server_error")
        try:
            spec = parse_generation(raw, fe.defaults, true_cfg=fe.true_cfg, max_images=fe.opts.max_images,
                                    validate=fe.validate)
        except BadRequest as e:
            raise HTTPError(400, str(e)) from None
        job = Job(fe.next_id(), spec.requests)
        try:
            fe.jobs.put_nowait(job)
        except queue.Full:
            raise HTTPError(429, f"the queue is full ({fe.jobs.maxsize} waiting); retry later",
                            "rate_limit_error") from None
        try:
            outcome: JobOutcome = job.future.result(timeout=fe.opts.request_timeout_s)
        except FutureTimeout:
            job.future.cancel()
            raise HTTPError(504, f"no result within {fe.opts.request_timeout_s:g} s", "server_error") from None
        except CancelledError:
            raise HTTPError(503, f"not served: {fe.down_reason or 'cancelled'}", "server_error") from None
        except Exception as e:  # FatalError: the ranks are gone
            raise HTTPError(503, f"the server is going down: {e}", "server_error") from None
        if not outcome.ok:
            msg = "; ".join(outcome.errors) or "generation failed"
            if outcome.bad_request:
                raise HTTPError(400, msg)
            fe.metrics.failure()
            raise HTTPError(500, f"generation failed: {msg}", "server_error")
        done = time.perf_counter()
        ms = [r.metrics for r in outcome.results]
        skipped = sum(int(m.get("cache_skipped_steps", 0) or 0) for m in ms)
        fe.metrics.job_done(done - arrived, len(ms), sum(r.steps for r in spec.requests), skipped)
        data = [{"b64_json": _png_b64(r.image), "seed": q.seed} for r, q in zip(outcome.results, spec.requests,
                                                                                 strict=True)]
        timings = {
            "queue_s": round(job.started - job.enqueued, 4),
            "compute_s": round(done - job.started, 4),
            "total_s": round(time.perf_counter() - arrived, 4),
            "images": [{k: m[k] for k in ("text_encode_s", "denoise_s", "decode_s", "total_s") if k in m}
                       | {"cache_skipped_steps": int(m.get("cache_skipped_steps", 0) or 0)} for m in ms],
        }
        self._json(200, {"created": int(time.time()), "data": data, "timings": timings,
                         "layout": ms[0].get("layout") if ms else None})
