"""Reference images from files, for the front ends that take paths (the CLI, batch files, the Ray driver).

Torch-free, and run before the model loads: a missing, unreadable or oversized file is one clear
``FluxDistError``. The engine itself never reads a path; it gets the decoded images (``RequestConfig.images``).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

from PIL import Image

from .config import LimitsConfig, RequestConfig
from .errors import FluxDistError
from .validation import check_references, check_request


def decode_image(data: bytes, lim: LimitsConfig, what: str = "reference image") -> Image.Image:
    """An encoded image (PNG, JPEG, ...) decoded in memory; its size is checked against
    ``lim.max_reference_pixels`` from the header, before the pixels are decoded (no decompression bomb).
    What an HTTP front end calls on an uploaded file too (then broadcasts the image, never a path)."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > lim.max_reference_pixels:
            raise FluxDistError(f"{what} is {w}x{h} = {w * h} pixels: over the limit of "
                                f"{lim.max_reference_pixels} (--max-reference-pixels)")
        img.load()
    except FluxDistError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # not an image, truncated
        raise FluxDistError(f"cannot read {what}: {e}") from e
    return img


def read_image(path: str | Path, lim: LimitsConfig) -> Image.Image:
    """One image file, read and decoded in memory (the file is closed again)."""
    p = Path(path)
    if not p.is_file():
        raise FluxDistError(f"reference image not found: {path}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FluxDistError(f"cannot read reference image {path}: {e}") from e
    return decode_image(data, lim, f"reference image {path}")


def read_images(req: RequestConfig, lim: LimitsConfig) -> RequestConfig:
    """``req`` with every path in ``images`` read (decoded images are kept), then checked."""
    images: Any = req.images
    if isinstance(images, str):  # one path where a list was meant (a YAML scalar)
        images = [images]
    if isinstance(images, list | tuple):
        if len(images) > lim.max_references:  # before reading any file
            check_references(images, lim)
        images = [read_image(i, lim) if isinstance(i, str | Path) else i for i in images]
    check_references(images, lim)
    return dataclasses.replace(req, images=list(images))


def checked_request(req: RequestConfig, lim: LimitsConfig) -> RequestConfig:
    """A front end's request before anything heavy is imported or loaded: images read, everything checked."""
    req = read_images(req, lim)
    check_request(req, lim)
    return req
