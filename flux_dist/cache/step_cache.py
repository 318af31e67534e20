"""Step caches (TeaCache, First-Block Cache): skip whole block-stack passes when the input barely
changed, with one decision that every rank shares (``decision.SharedDecision``).

Model-agnostic: the adapter hands over its pieces (``CacheHooks``: the signal, the sums, the block
stack and, for the First-Block Cache, the stack split after its first block). A skipped step
returns a ``stack.Reuse``, which the adapter's head adds back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import CacheConfig
from ..errors import FluxDistError
from ..parallel.mesh import Mesh
from ..parallel.sharding import ShardPlan
from ..stack import BlockStack, Reuse
from .decision import SharedDecision


@dataclass(frozen=True)
class CacheHooks:
    """The model's pieces a step cache calls (each may be a compiled region or a CUDA-graph replay)."""

    signal: Callable  # (tr, img, mods) -> TeaCache's signal tensor
    change: Callable  # (cur, prev, n) -> float64 [sum |cur - prev|, sum |prev|] over the first n tokens
    stack: BlockStack  # the whole stack
    first_block: Callable  # (tr, img, txt, mods, rope) -> (txt, img) after the first block
    rest: Callable  # (tr, img, txt, mods, rope) -> image tokens after the other blocks


def resolve_coefficients(cfg: CacheConfig, published: list[float] | None, model: str) -> list[float] | None:
    """The TeaCache polynomial: given inline, read from a calibration YAML, or the model's published one."""
    c = cfg.coefficients
    if cfg.mode != "teacache":
        return None
    if c is None:
        if published is not None:
            return list(published)
        raise FluxDistError(
            f"no published TeaCache coefficients for {model}: run `flux-dist calibrate-cache` "
            "and pass its YAML with --cache-coefficients (or give the polynomial inline)"
        )
    if isinstance(c, str):
        if Path(c).is_file():
            data = yaml.safe_load(Path(c).read_text()) or {}
            c = data.get("coefficients") if isinstance(data, dict) else None
            if c is None:
                raise FluxDistError(f"{cfg.coefficients}: no 'coefficients' list in the file")
        else:
            try:
                c = [float(v) for v in c.split(",")]
            except ValueError as e:
                raise FluxDistError(f"--cache-coefficients: not a file nor a comma-separated list: {c!r}") from e
    if not isinstance(c, list | tuple) or not c or not all(isinstance(v, int | float) for v in c):
        raise FluxDistError(f"cache coefficients must be a non-empty list of numbers, got {c!r}")
    return [float(v) for v in c]


class StepCache:
    """Per-request cache state; ``stack(branch)`` replaces the model's block stack for one branch."""

    def __init__(self, cfg: CacheConfig, mesh: Mesh, plan: ShardPlan, steps: int,
                 coefficients: list[float] | None, hooks: CacheHooks, shared: SharedDecision | None = None) -> None:
        self.cfg, self.plan, self.steps, self.hooks = cfg, plan, steps, hooks
        self.poly = np.poly1d(coefficients) if coefficients else None
        self.shared = shared or SharedDecision(mesh)
        # The signal's sums cover this shard's target (noisy) image tokens only, a prefix of its image shard
        # (ShardPlan: [target, references, padding]). Reference tokens (editing) are the same input at every
        # step: their signal changes only with the timestep's modulation, not with the image being denoised,
        # so they would dilute the relative change the threshold and the fitted polynomial are about.
        self.n_valid = plan.n_target(mesh.sp_rank)
        self.prev: torch.Tensor | None = None
        self.residual: dict[int, torch.Tensor] = {}
        self.acc = 0.0
        self.step = -1
        self.skip: bool | None = None
        self.log: list[dict] = []
        self.pairs: list[tuple[float, float]] = []  # calibration (signal change, output change)

    # -- decision ---------------------------------------------------------------------------------
    def begin_step(self, i: int) -> None:
        self.step, self.skip = i, None

    def _sums(self, cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """``[sum |cur - prev|, sum |prev|]`` over this shard's target image tokens (float64)."""
        return self.hooks.change(cur, prev, self.n_valid)

    def _decide(self, cur: torch.Tensor) -> bool:
        forced = self.prev is None or self.step < self.cfg.warmup_steps or \
            self.step >= self.steps - self.cfg.cutoff_steps
        rel = float("nan")
        if self.prev is not None:  # every rank has a prev, or none has: same collective count everywhere
            rel = self.shared.ratio(self._sums(cur, self.prev))
        if forced:
            skip = False
            self.acc = 0.0
        elif self.poly is not None:  # TeaCache: accumulate the rescaled change
            self.acc += max(float(self.poly(rel)), 0.0)
            skip = self.acc < self.cfg.threshold
            if not skip:
                self.acc = 0.0
        else:  # First-Block Cache: the change itself
            skip = rel < self.cfg.threshold
        self.log.append({"step": self.step, "rel": rel, "acc": self.acc, "skip": skip})
        return skip

    # -- the block stack ----------------------------------------------------------------------------
    def stack(self, branch: int) -> BlockStack:
        fn = {"teacache": self._teacache, "fbcache": self._fbcache, "calibrate": self._record}[self.cfg.mode]
        return functools.partial(fn, branch=branch)

    def _record(self, tr, img, txt, mods, rope, branch: int = 0) -> torch.Tensor:
        """Calibration: compute every step; pair the signal's change with the block stack output's change."""
        first = self.skip is None
        if first:
            sig = self.hooks.signal(tr, img, mods)
            self.x = self.shared.ratio(self._sums(sig, self.prev)) if self.prev is not None else None
            self.prev, self.skip = sig, False
            self.log.append({"step": self.step, "rel": self.x if self.x is not None else float("nan"),
                             "acc": 0.0, "skip": False})
        out = self.hooks.stack(tr, img, txt, mods, rope)
        if first:
            prev_out = self.residual.get(-1)
            if prev_out is not None and self.x is not None:
                y = self.shared.ratio(self._sums(out, prev_out))
                self.pairs.append((self.x, y))
            self.residual[-1] = out
        return out

    def _teacache(self, tr, img, txt, mods, rope, branch: int = 0) -> torch.Tensor | Reuse:
        if self.skip is None:  # first branch of the step: the signal does not depend on the prompt
            sig = self.hooks.signal(tr, img, mods)
            self.skip = self._decide(sig)
            self.prev = sig
        if self.skip:  # the head's region adds the residual
            return Reuse(img, self.residual[branch])
        out = self.hooks.stack(tr, img, txt, mods, rope)
        self.residual[branch] = out - img
        return out

    def _fbcache(self, tr, img, txt, mods, rope, branch: int = 0) -> torch.Tensor | Reuse:
        txt1, img1 = self.hooks.first_block(tr, img, txt, mods, rope)
        if self.skip is None:  # the cond branch's first-block residual decides for both branches
            r1 = img1 - img
            self.skip = self._decide(r1)
            if not self.skip:  # compare with the last computed step, so small changes cannot creep
                self.prev = r1
        if self.skip:
            return Reuse(img1, self.residual[branch])
        out = self.hooks.rest(tr, img1, txt1, mods, rope)
        self.residual[branch] = out - img1
        return out

    def summary(self) -> dict:
        skipped = [e["step"] for e in self.log if e["skip"]]
        out = {"mode": self.cfg.mode, "threshold": self.cfg.threshold, "skipped_steps": skipped,
               "decisions": self.log}
        if self.pairs:
            out["calibration_pairs"] = self.pairs
        return out


def make_cache(cfg: CacheConfig, mesh: Mesh, plan: ShardPlan, steps: int, coefficients: list[float] | None,
               hooks: CacheHooks) -> StepCache | None:
    if cfg.mode == "none":
        return None
    return StepCache(cfg, mesh, plan, steps, coefficients, hooks)
