"""HTTP body -> image requests, checked on rank 0 before anything reaches the other ranks.

Pure functions (no torch, no sockets) so every rule is unit-tested without a server, and so the
batch mode's JSONL lines obey the same field rules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import MAX_SEED, RequestConfig
from ..errors import FluxDistError
from ..validation import sized

MAX_BODY_BYTES = 1 << 20  # a prompt is text: a megabyte is already absurd
# ASCII digits only, no spaces: "９６x９６" and " 64 x 64 " are refused (one spelling, as OpenAI's enum).
SIZE_RE = re.compile(r"([0-9]{1,6})[xX]([0-9]{1,6})", re.ASCII)

# 2048x2048 x 50 steps x 1 image (or 1024x1024 x 50 steps x 4 images): pixels x steps x images.
DEFAULT_MAX_WORK = 2048 * 2048 * 50


class BadRequest(FluxDistError):
    """The client's fault: a 400 with this message; nothing was broadcast. ``param``: the field, if one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class GenerationJob:
    """What one POST asks for: ``n`` requests that differ only in the seed (seed, seed+1, ...)."""

    requests: list[RequestConfig]
    response_format: str = "b64_json"


def _int(body: dict, key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRequest(f"'{key}' must be an integer, got {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be in {lo}..{hi}, got {v}", key)
    return v


def _str(body: dict, key: str) -> str | None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise BadRequest(f"'{key}' must be a string, got {type(v).__name__}", key)
    return v


def _text(body: dict, key: str) -> str | None:
    """A prompt: a string of valid Unicode (no lone surrogate, which JSON's \\ud800 can carry) and no NUL."""
    v = _str(body, key)
    if v is None:
        return None
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"'{key}' is not valid Unicode: a lone surrogate at index {e.start}", key) from None
    if "\x00" in v:
        raise BadRequest(f"'{key}' contains a NUL character (index {v.index(chr(0))})", key)
    return v


def parse_size(size: Any) -> tuple[int, int]:
    """``"WxH"`` -> (width, height)."""
    if not isinstance(size, str):
        raise BadRequest(f"'size' must be a string like \"1024x1024\", got {type(size).__name__}", "size")
    m = SIZE_RE.fullmatch(size)
    if not m:
        raise BadRequest(f"'size' must look like \"WIDTHxHEIGHT\" in ASCII digits, no spaces (e.g. \"1024x768\"), "
                         f"got {size!r}", "size")
    return int(m.group(1)), int(m.group(2))


def request_fields(body: dict, *, true_cfg: bool) -> dict[str, Any]:
    """The per-image fields shared by the HTTP API and batch JSONL lines, as RequestConfig keys.

    Accepts the OpenAI / diffusers names (``num_inference_steps``, ``guidance_scale``, ``size``) and
    the config names (``steps``, ``guidance``, ``height``/``width``).
    """
    out: dict[str, Any] = {}
    prompt = _text(body, "prompt")
    if prompt is None or not prompt.strip():
        raise BadRequest("'prompt' is required and must be a non-empty string", "prompt")
    out["prompt"] = prompt
    neg = _text(body, "negative_prompt")
    if neg is not None:
        if not true_cfg:
            raise BadRequest("'negative_prompt' is only used by models with true CFG ([klein] base); this model is "
                             "guidance-distilled", "negative_prompt")
        out["negative_prompt"] = neg
    if "size" in body and ("height" in body or "width" in body):
        raise BadRequest("give either 'size' or 'height'/'width', not both", "size")
    if "size" in body:
        out["width"], out["height"] = parse_size(body["size"])
    for key in ("height", "width"):
        v = _int(body, key, 1, 1 << 20)
        if v is not None:
            out[key] = v
    for names, dest in ((("num_inference_steps", "steps"), "steps"), (("guidance_scale", "guidance"), "guidance")):
        given = [k for k in names if k in body]
        if len(given) > 1:
            raise BadRequest(f"give one of {' / '.join(repr(k) for k in names)}, not both", names[0])
        if not given:
            continue
        key = given[0]
        if dest == "steps":
            out[dest] = _int(body, key, 1, 1 << 20)
        else:
            g = body[key]
            if not isinstance(g, int | float) or isinstance(g, bool) or not math.isfinite(g) or g < 0:
                raise BadRequest(f"'{key}' must be a finite number >= 0, got {g!r}", key)
            out[dest] = float(g)
    seed = _int(body, "seed", 0, MAX_SEED)
    if seed is not None:
        out["seed"] = seed
    if "lora" in body:  # adapter names loaded at start -> scale; names and ranges checked by Engine.validate
        lora = body["lora"]
        if not isinstance(lora, dict) or not all(isinstance(k, str) for k in lora):
            raise BadRequest(f"'lora' must be an object of adapter name -> scale, got {lora!r}", "lora")
        out["lora"] = dict(lora)
    return {k: v for k, v in out.items() if v is not None}


GENERATION_FIELDS = {"prompt", "n", "size", "response_format", "seed", "num_inference_steps", "guidance_scale",
                     "negative_prompt", "model", "user", "lora"}


def check_body(body: Any, *, true_cfg: bool, max_images: int) -> tuple[int, dict[str, Any], str]:
    """A decoded ``POST /v1/images/generations`` body -> ``(n, request fields, response_format)``.

    Every rule on the body itself (object, known fields, types, ranges, text, size spelling); the
    server's pydantic model runs this first so its messages are these.
    """
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - GENERATION_FIELDS)
    if unknown:
        known = ", ".join(sorted(GENERATION_FIELDS))
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))} (known: {known})", unknown[0])
    _str(body, "model")  # accepted for OpenAI clients; one server serves one model
    _str(body, "user")
    fmt = _str(body, "response_format") or "b64_json"
    if fmt != "b64_json":
        raise BadRequest(f"'response_format' {fmt!r} is not supported: this server returns 'b64_json' only",
                         "response_format")
    n = _int(body, "n", 1, max_images) or 1
    fields = request_fields(body, true_cfg=true_cfg)
    if fields.get("seed", 0) + n - 1 > MAX_SEED:
        raise BadRequest("'seed' + n - 1 overflows the seed range", "seed")
    return n, fields, fmt


def work(requests: list[RequestConfig]) -> int:
    """A request's work: pixels x steps, summed over its images."""
    return sum(r.width * r.height * r.steps for r in requests)


def build_requests(
    n: int,
    fields: dict[str, Any],
    defaults: RequestConfig,
    *,
    validate: Callable[[RequestConfig], None],
    max_work: int | None = None,
) -> list[RequestConfig]:
    """``n`` requests (seeds seed, seed+1, ...) from checked fields, the server's defaults, ``validate``
    (``Engine.validate``: the checks ``generate`` repeats on every rank, run here first so a bad request
    never reaches a collective) and the work limit."""
    # The server's fixed knobs (max_sequence_length) come from the config; a missing seed is drawn here
    # (rank 0) and travels with the request, so every rank still uses the same one.
    fields = {"seed": secrets.randbelow(2**31), **fields}
    base = dataclasses.replace(defaults, **fields)
    try:
        validate(base)
    except FluxDistError as e:
        raise BadRequest(str(e)) from None
    base = sized(base)  # a size left unset (an edit): its first reference's, as it will run
    reqs = [dataclasses.replace(base, seed=base.seed + i) for i in range(n)]
    if max_work is not None and work(reqs) > max_work:
        raise BadRequest(f"{base.width}x{base.height} x {base.steps} steps x {n} image(s) = {work(reqs)} pixel-steps "
                         f"is over this server's work limit of {max_work} (--max-work); ask for fewer pixels, "
                         "steps or images")
    return reqs


def parse_generation(
    raw: bytes,
    defaults: RequestConfig,
    *,
    true_cfg: bool,
    max_images: int,
    validate: Callable[[RequestConfig], None],
    max_work: int | None = None,
) -> GenerationJob:
    """``POST /v1/images/generations`` body bytes -> a job, or ``BadRequest`` with a message a client can act on."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    n, fields, fmt = check_body(body, true_cfg=true_cfg, max_images=max_images)
    return GenerationJob(build_requests(n, fields, defaults, validate=validate, max_work=max_work), fmt)
