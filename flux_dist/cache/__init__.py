"""Step caches with one skip decision for every rank: ``decision`` (the shared ratio),
``step_cache`` (TeaCache, First-Block Cache, calibration recording), ``calibrate`` (the fit)."""

from .calibrate import calibrate, fit_coefficients, write_calibration
from .decision import SharedDecision
from .step_cache import CacheHooks, StepCache, make_cache, resolve_coefficients

__all__ = ["CacheHooks", "SharedDecision", "StepCache", "calibrate", "fit_coefficients", "make_cache",
           "resolve_coefficients", "write_calibration"]
