"""``POST /v1/images/edits`` bodies as OpenAI defines them (``multipart/form-data`` with ``image`` or ``image[]``
files), or JSON whose ``image`` is a base64 string or a list of them: the fields as a generations body, and
the encoded images (decoded and checked on rank 0 by ``images.decode_image``; only tensors travel)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from ..config import LimitsConfig
from ..errors import FluxDistError
from ..images import decode_image
from .protocol import BadRequest

EDITS = "/v1/images/edits"
IMAGE_FIELDS = ("image", "image[]")
_INTS, _FLOATS = ("n", "seed", "num_inference_steps"), ("guidance_scale",)


def _form_value(key: str, value: str) -> Any:
    """A form field's text as the JSON body would carry it."""
    try:
        if key in _INTS:
            return int(value)
        if key in _FLOATS:
            return float(value)
        if key == "lora":
            return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        raise BadRequest(f"'{key}' must be {'an integer' if key in _INTS else 'a number' if key in _FLOATS else 'a JSON object'}, got {value!r}", key) from None  # noqa: E501
    return value


async def read_edit(request: Any, raw: bytes, kind: str) -> tuple[dict, list[bytes]]:
    """``(body fields, encoded images in order)`` of an edits request whose media type is ``kind``."""
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=64, max_fields=64)
        except Exception as e:  # noqa: BLE001 - python-multipart's parse errors are the client's
            raise BadRequest(f"malformed multipart body: {e}") from None
        body: dict[str, Any] = {}
        images: list[bytes] = []
        for key, value in form.multi_items():
            if key in IMAGE_FIELDS:
                if isinstance(value, str):
                    raise BadRequest(f"'{key}' must be a file upload", "image")
                images.append(await value.read())
            elif isinstance(value, str):
                if key in body:
                    raise BadRequest(f"field '{key}' given twice", key)
                body[key] = _form_value(key, value)
            else:
                raise BadRequest(f"field '{key}' is a file; only 'image' / 'image[]' are", key)
        return body, images
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
    given = body.pop("image", [])
    given = [given] if isinstance(given, str) else given
    if not isinstance(given, list) or not all(isinstance(g, str) for g in given):
        raise BadRequest("'image' must be a base64 string or a list of them", "image")
    try:
        return body, [base64.b64decode(g.split(",", 1)[-1], validate=True) for g in given]
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"'image' is not valid base64: {e}", "image") from None


def decode_references(encoded: list[bytes], lim: LimitsConfig) -> list:
    """Rank 0 decodes and checks the uploads (count first, then each image's header before its pixels)."""
    if not encoded:
        raise BadRequest("an edits request needs at least one 'image'", "image")
    if len(encoded) > lim.max_references:
        raise BadRequest(f"{len(encoded)} reference images: over the limit of {lim.max_references} "
                         "(--max-references)", "image")
    try:
        return [decode_image(data, lim, f"image {i + 1}") for i, data in enumerate(encoded)]
    except FluxDistError as e:
        raise BadRequest(str(e), "image") from None
