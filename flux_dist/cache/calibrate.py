"""TeaCache calibration: compute every step of some prompts, pair the signal's change with the
block stack output's change, and fit the rescaling polynomial ``--cache-coefficients`` reads."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import FluxDistError

log = logging.getLogger("flux_dist")


def fit_coefficients(x: list[float], y: list[float], degree: int = 4) -> list[float]:
    """Least-squares polynomial ``y ~ poly(x)`` (highest power first), as TeaCache's rescaling expects."""
    if len(x) != len(y) or len(x) <= degree:
        raise FluxDistError(f"calibration needs more than {degree} (signal, output) pairs, got {len(x)}")
    return [float(c) for c in np.polyfit(np.asarray(x, np.float64), np.asarray(y, np.float64), degree)]


def write_calibration(path: str, coefficients: list[float], pairs: list[tuple[float, float]], model: str) -> None:
    """The YAML that ``--cache-coefficients`` reads."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = {"model": model, "degree": len(coefficients) - 1, "pairs": len(pairs), "coefficients": coefficients,
            "note": "TeaCache rescaling polynomial, highest power first: output change ~ poly(signal change)"}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def calibrate(engine: Any, prompts: list[str], output: str, degree: int = 4) -> list[float]:
    """Run every prompt (seeds ``seed, seed + 1, ...``) on an engine built with ``cache.mode:
    calibrate`` (every rank), fit the polynomial, and write it from rank 0. Returns the coefficients."""
    if engine.cfg.cache.mode != "calibrate":
        raise FluxDistError("calibration needs an engine built with cache.mode = 'calibrate'")
    base = engine.cfg.request
    pairs: list = []
    for i, p in enumerate(prompts):
        res = engine.generate(dataclasses.replace(base, prompt=p, seed=base.seed + i), decode=False)
        pairs += res.metrics["cache"]["calibration_pairs"]
    coeffs = fit_coefficients([x for x, _ in pairs], [y for _, y in pairs], degree)
    if engine.dist.is_main:
        write_calibration(output, coeffs, pairs, engine.model.name)
        log.info("fitted %d pairs from %d prompts -> %s: %s", len(pairs), len(prompts), output, coeffs)
    return coeffs
