"""The API's shapes: the server's options, pydantic request / response models, OpenAI's error body.

What a client sends and gets, and what the operator sets; nothing here touches torch or a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import FluxDistError
from .protocol import DEFAULT_MAX_WORK, MAX_BODY_BYTES, MAX_SEED


@dataclass
class ServeOptions:
    """Front-end knobs (the CLI's ``serve`` flags; other launchers pass the same)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 16
    max_images: int = 4
    request_timeout_s: float = 600.0  # deadline from arrival: stopped at the next step after it, 504
    max_work: int | None = DEFAULT_MAX_WORK  # pixels x steps x images a request may ask for (None: no limit)
    read_timeout_s: float = 10.0  # request head (and idle keep-alive), and the body, each within this
    max_connections: int = 64  # open connections over this: 503; over twice this: closed at accept
    max_body_bytes: int = MAX_BODY_BYTES
    max_upload_bytes: int = 32 << 20  # an edits body (reference images): 32 MiB

    def check(self) -> None:
        """Refuse nonsense before anything is loaded (raises ``FluxDistError``)."""
        if not 0 <= self.port <= 65535:
            raise FluxDistError(f"--port must be in 0..65535, got {self.port}")
        if self.max_queue < 1 or self.max_images < 1:
            raise FluxDistError("--max-queue and --max-images must be at least 1")
        if not self.request_timeout_s > 0:
            raise FluxDistError(f"--request-timeout must be > 0 seconds, got {self.request_timeout_s}")
        if not self.read_timeout_s > 0:
            raise FluxDistError(f"--read-timeout must be > 0 seconds, got {self.read_timeout_s}")
        if self.max_work is not None and self.max_work < 1:
            raise FluxDistError(f"--max-work must be at least 1 pixel-step, got {self.max_work}")
        if self.max_connections < 1 or self.max_body_bytes < 1:
            raise FluxDistError("--max-connections and the body limit must be at least 1")


# -- models ------------------------------------------------------------------------------------------
class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations`` (OpenAI's images API, plus the diffusers knobs)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="no NUL, no lone surrogate")
    n: int = Field(1, ge=1, description="1..--max-images; images use seeds seed, seed+1, ...")
    size: str | None = Field(None, pattern=r"^[0-9]{1,6}[xX][0-9]{1,6}$", description="WIDTHxHEIGHT, ASCII")
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="drawn at random when absent")
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    negative_prompt: str | None = Field(None, description="true-CFG models only")
    lora: dict[str, float] | None = Field(None, description="adapters preloaded with serve --lora: name -> scale")
    model: str | None = Field(None, description="accepted, ignored: one server serves one model")
    user: str | None = Field(None, description="accepted, ignored")


class ImageData(BaseModel):
    b64_json: str
    seed: int


class ImageTimings(BaseModel):
    text_encode_s: float | None = None
    denoise_s: float | None = None
    decode_s: float | None = None
    total_s: float | None = None
    cache_skipped_steps: int = 0


class Timings(BaseModel):
    queue_s: float
    compute_s: float
    total_s: float
    images: list[ImageTimings]
    replica: int | None = Field(None, description="the replica group that computed it (0..replicas-1)")
    layout: str | None = Field(None, description="the layout it ran on: REPLICASxDEGREE, e.g. 2x4")
    start: float | None = Field(None, description="Unix seconds: its compute started")
    end: float | None = Field(None, description="Unix seconds: its compute ended")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    timings: Timings
    layout: dict[str, Any] | None = None  # the mesh: world_size, ulysses, ring, cfg


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- errors ------------------------------------------------------------------------------------------
_TYPES = {401: "authentication_error", 429: "rate_limit_error"}
_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
          413: "body_too_large", 415: "unsupported_media_type", 429: "queue_full", 500: "generation_failed",
          503: "unavailable", 504: "deadline_exceeded"}


class APIError(Exception):
    """Answered as ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code or _CODES.get(status)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status)}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)
