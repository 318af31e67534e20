"""The HTTP API as one FastAPI app: routes, health, Prometheus metrics (models and errors: ``schema.py``).

``create_app(opts, validator, jobs)`` builds it from the server's options, a ``RequestValidator``
(body -> image requests, refused before anything reaches a rank) and a ``JobQueue`` (what computes
them); it knows nothing of ranks or sockets, so another transport (a replica group, Ray Serve) can
mount the same app. ``FrontEnd`` (``http.py``) runs it under uvicorn on rank 0.

Every 4xx / 5xx body is ``{"error": {"message", "type", "param", "code"}}``, FastAPI's own 404 /
405 / 422 included (422 is answered 400).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from ..config import LimitsConfig, RequestConfig
from ..lockstep import CANCELLED, DEADLINE, SHUTDOWN, FatalError, JobOutcome
from .door import FrontDoor
from .edits import EDITS, decode_references, read_edit
from .jobs import Job, JobQueue, NotReady, QueueFull
from .metrics import CONTENT_TYPE, Metrics
from .protocol import BadRequest, build_requests, check_body
from .schema import (
    APIError,
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ImageTimings,
    ServeOptions,
    Timings,
    error_body,
    error_response,
)

__all__ = ["RequestValidator", "ServeOptions", "create_app"]

log = logging.getLogger("flux_dist")

GENERATIONS = "/v1/images/generations"
CLIENT_GONE = 499  # counted in the metrics, never sent: the client left before the answer


# -- request checks ----------------------------------------------------------------------------------
@dataclass
class RequestValidator:
    """A decoded body -> the image requests, or ``BadRequest``: every check before anything is queued.

    ``validate`` is the engine's (``Engine.validate``), the same check every rank repeats.
    """

    defaults: RequestConfig
    validate: Callable[[RequestConfig], None]
    true_cfg: bool
    model_name: str
    adapters: list[dict] = field(default_factory=list)  # the LoRA adapters loaded at start (GET /v1/models)
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # reference images' count and pixels (edits)

    def requests(self, body: Any, *, max_images: int, max_work: int | None,
                 images: list | None = None) -> list[RequestConfig]:
        """``images``: an edits request's decoded references (its output size defaults to the first one's)."""
        n, fields, _ = check_body(body, true_cfg=self.true_cfg, max_images=max_images)  # our messages first
        try:
            ImageGenerationRequest.model_validate(body)  # the declared schema (what OpenAPI shows)
        except ValidationError as e:
            err = e.errors()[0]
            raise BadRequest(f"{'.'.join(map(str, err['loc']))}: {err['msg']}", str(err["loc"][0])) from None
        defaults = self.defaults
        if images is not None:
            fields["images"] = images
            defaults = dataclasses.replace(defaults, height=None, width=None)  # as diffusers: the first reference's
        return build_requests(n, fields, defaults, validate=self.validate, max_work=max_work)


# -- the app -----------------------------------------------------------------------------------------
def _png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (call once the body is read: then only a disconnect arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(opts: ServeOptions, validator: RequestValidator, jobs: JobQueue, *,
               metrics: Metrics | None = None) -> FastAPI:
    """The whole HTTP API. ``app.state.metrics`` is its Prometheus registry; a transport may set
    ``app.state.connections`` (a callable: open connections) for the connection cap and the gauge."""
    metrics = metrics or Metrics()
    app = FastAPI(title="flux-dist", summary="FLUX.2 images, every rank computing each request",
                  docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.connections = None

    def open_connections() -> int:
        fn = app.state.connections
        return fn() if fn is not None else 0

    app.add_middleware(FrontDoor, opts=opts, metrics=metrics, connections=open_connections)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif e.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return error_response(APIError(e.status_code, detail, headers=getattr(e, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        err = (e.errors() or [{"loc": ("body",), "msg": "invalid request"}])[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        return error_response(APIError(400, f"{'.'.join(loc) or 'body'}: {err.get('msg')}",
                                       param=loc[0] if loc else None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("HTTP handler failed")
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> JSONResponse:
        ok, state, reason = jobs.status()
        if ok:
            return JSONResponse({"status": "ready", "model": validator.model_name, "queue_length": jobs.qsize()})
        body = {"status": state, "reason": reason, **error_body(503, f"not ready: {reason or state}")}
        return JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        """OpenAI's model list: the one model this server runs, with its LoRA adapters (names, ranks; no paths)."""
        return JSONResponse({"object": "list", "data": [{"id": validator.model_name, "object": "model",
                                                         "owned_by": "flux-dist", "lora": validator.adapters}]})

    @app.get("/metrics")
    async def prometheus() -> Response:
        ok, _, _ = jobs.status()
        text = metrics.render(queue_length=jobs.qsize(), queue_limit=jobs.maxsize, ready=ok,
                              connections=open_connections())
        return Response(text, media_type=CONTENT_TYPE)

    errors = {s: {"model": ErrorResponse} for s in (400, 401, 408, 413, 415, 429, 500, 503, 504)}
    body_schema = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": ImageGenerationRequest.model_json_schema()}}}}

    @app.post(GENERATIONS, response_model=ImagesResponse, responses=errors, openapi_extra=body_schema)
    async def generations(request: Request) -> JSONResponse:
        return await _handle(request, edit=False)

    @app.post(EDITS, response_model=ImagesResponse, responses=errors)
    async def edits(request: Request) -> JSONResponse:
        """OpenAI's edits: multipart ``image`` / ``image[]`` files, or JSON with base64 ``image``(s)."""
        return await _handle(request, edit=True)

    async def _handle(request: Request, edit: bool) -> JSONResponse:
        arrived, t0 = time.perf_counter(), time.monotonic()
        metrics.generation()
        ctype = request.headers.get("content-type")
        kind = ctype.split(";")[0].strip().lower() if ctype else "application/json"
        if kind not in ("application/json", *(("multipart/form-data",) if edit else ())):
            allowed = "application/json or multipart/form-data" if edit else "application/json (or absent)"
            raise APIError(415, f"Content-Type must be {allowed}, got {ctype!r}", headers={"Connection": "close"})
        try:
            raw = await request.body()  # FrontDoor: size limit (413) and read deadline (408)
        except ClientDisconnect:
            return JSONResponse(error_body(CLIENT_GONE, "the client left"), status_code=CLIENT_GONE)
        ok, state, reason = jobs.status()
        if not ok:
            raise APIError(503, f"not ready: {reason or state}")
        try:
            images = None
            if edit:
                body, encoded = await read_edit(request, raw, kind)
                images = await run_in_threadpool(decode_references, encoded, validator.limits)
            else:
                try:
                    body = json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise BadRequest(f"body is not valid JSON: {e}") from None
            reqs = validator.requests(body, max_images=opts.max_images, max_work=opts.max_work, images=images)
            job = jobs.submit(reqs, deadline=t0 + opts.request_timeout_s)
        except BadRequest as e:
            raise APIError(400, str(e), param=e.param) from None
        except QueueFull as e:
            raise APIError(429, str(e), headers={"Retry-After": "1"}) from None
        except NotReady as e:
            raise APIError(503, f"not ready: {e}") from None
        outcome = await _wait(job, request.receive)
        if outcome is None:
            return JSONResponse(error_body(CLIENT_GONE, "the client left"), status_code=CLIENT_GONE)
        return await _reply(job, outcome, arrived)

    async def _wait(job: Job, receive: Receive) -> JobOutcome | None:
        """The job's outcome; None when the client left first (the job is cancelled: dropped from the
        queue, or stopped at the next step). Past the deadline a queued job is dropped (504); a running
        one is stopped by the serving loop at the next step, which answers."""
        fut = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_client_gone(receive))
        expired = False
        try:
            while True:
                timeout = None if expired else max(0.0, (job.deadline or 0.0) - time.monotonic())
                done, _ = await asyncio.wait({fut, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if fut in done:
                    break
                if gone in done:
                    job.client_gone.set()  # running: rank 0 stops it at the next step, every rank together
                    job.future.cancel()  # queued: dropped
                    metrics.stopped(CANCELLED)
                    log.info("job %d: the client left; cancelled", job.id)
                    return None
                expired = True
                if job.future.cancel():
                    metrics.stopped(DEADLINE)
                    raise APIError(504, f"no result within {opts.request_timeout_s:g} s (--request-timeout): "
                                   "the request was still queued")
        except asyncio.CancelledError:  # the transport dropped the handler (Ray Serve does when the client leaves)
            if not job.future.done():
                job.client_gone.set()
                job.future.cancel()
                metrics.stopped(CANCELLED)
                log.info("job %d: its handler was cancelled; cancelled", job.id)
            raise
        finally:
            gone.cancel()
        if job.future.cancelled():
            _, state, reason = jobs.status()
            raise APIError(503, f"not served: {reason or state}")
        exc = job.future.exception()
        if exc is not None:
            if isinstance(exc, FatalError):
                raise APIError(503, f"the server is going down: {exc}")
            raise exc
        return job.future.result()

    async def _reply(job: Job, outcome: JobOutcome, arrived: float) -> JSONResponse:
        if outcome.stopped:
            metrics.stopped(outcome.stopped)
            where = f"before denoise step {outcome.stopped_step}"
            if outcome.stopped == DEADLINE:
                raise APIError(504, f"no result within {opts.request_timeout_s:g} s (--request-timeout): stopped "
                               f"{where}")
            if outcome.stopped == SHUTDOWN:
                raise APIError(503, f"the server is shutting down: stopped {where}", code="shutting_down")
            return JSONResponse(error_body(CLIENT_GONE, "the client left"), status_code=CLIENT_GONE)
        if not outcome.ok:
            msg = "; ".join(outcome.errors) or "generation failed"
            if outcome.bad_request:
                raise APIError(400, msg)
            metrics.failure()
            raise APIError(500, f"generation failed: {msg}")
        done = time.perf_counter()
        ms = [r.metrics for r in outcome.results]
        skipped = sum(int(m.get("cache_skipped_steps", 0) or 0) for m in ms)
        metrics.job_done(done - arrived, len(ms), sum(r.steps for r in job.requests), skipped)
        images = await run_in_threadpool(lambda: [_png_b64(r.image) for r in outcome.results])
        reply = ImagesResponse(
            created=int(time.time()),
            data=[ImageData(b64_json=b, seed=q.seed) for b, q in zip(images, job.requests, strict=True)],
            timings=Timings(
                queue_s=round(job.started - job.enqueued, 4), compute_s=round(done - job.started, 4),
                total_s=round(time.perf_counter() - arrived, 4),
                images=[ImageTimings(**{k: m[k] for k in ("text_encode_s", "denoise_s", "decode_s", "total_s")
                                        if k in m}, cache_skipped_steps=int(m.get("cache_skipped_steps", 0) or 0))
                        for m in ms],
                replica=job.replica, layout=job.layout or None, start=round(job.start, 4) or None,
                end=round(job.end, 4) or None),
            layout=ms[0].get("layout") if ms else None)
        return JSONResponse(reply.model_dump())

    return app
