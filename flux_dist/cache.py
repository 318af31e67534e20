"""Step caches (TeaCache, First-Block Cache) with one skip decision shared by every rank.

Under sequence parallelism each rank sees one shard, so a per-rank decision can differ near the
threshold; ranks that disagree run different collectives and hang. Here every rank contributes its
shard's two sums (padding excluded) to one all-gather of ``2 x world`` numbers; every rank then
adds the sums of the first cfg group's shards in the same fixed order, in float64, and reaches the
same boolean bit for bit — one small collective per step, across the ``cfg`` axis too, so both
guidance branches skip together (each keeps its own cached residual).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from .config import CacheConfig
from .errors import FluxDistError
from .models import flux2
from .parallel.collectives import all_gather
from .parallel.mesh import Mesh
from .parallel.sharding import ShardPlan

log = logging.getLogger("flux_dist")

# FLUX.2 [dev], published by NVIDIA (highest power first); see DESIGN.md.
FLUX2_DEV_TEACACHE = [1.04582360e02, -6.87605554e00, -8.61659379e-02, 5.37600252e-02]
MODES = ("none", "teacache", "fbcache", "calibrate")  # calibrate: compute every step, record pairs


def resolve_coefficients(cfg: CacheConfig, family: str) -> list[float] | None:
    """The TeaCache polynomial: given inline, read from a calibration YAML, or the published [dev] one."""
    c = cfg.coefficients
    if cfg.mode != "teacache":
        return None
    if c is None:
        if family == "dev":
            return list(FLUX2_DEV_TEACACHE)
        raise FluxDistError(
            f"no published TeaCache coefficients for FLUX.2 [{family}]: run `flux-dist calibrate-cache` "
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


def validate(cfg: CacheConfig) -> None:
    if cfg.mode not in MODES:
        raise FluxDistError(f"unknown cache mode '{cfg.mode}' (choose from {', '.join(MODES)})")
    if not isinstance(cfg.threshold, int | float) or cfg.threshold < 0:
        raise FluxDistError(f"cache threshold must be a number >= 0, got {cfg.threshold!r}")
    for name in ("warmup_steps", "cutoff_steps"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 0:
            raise FluxDistError(f"cache {name} must be an integer >= 0, got {v!r}")


class SharedDecision:
    """Turns each rank's local ``(numerator, denominator)`` into one global ratio, identical everywhere."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        # Signals are taken from cfg rank 0's group (global ranks 0 .. sp-1, cfg is the outer axis).
        self.sources = list(range(mesh.dims.sp))

    def ratio(self, local: torch.Tensor) -> float:
        """``local``: this rank's ``[numerator, denominator]`` (float64); the result is the same on every rank."""
        if self.mesh.world_size == 1:
            table = local[None]
        else:
            table = all_gather(local, 0, dist.group.WORLD).view(self.mesh.world_size, 2)
        rows = table.cpu().tolist()  # the one host sync per step: the boolean needs it
        n = sum(rows[r][0] for r in self.sources)
        d = sum(rows[r][1] for r in self.sources)
        return n / d if d > 0 else float("inf")


class StepCache:
    """Per-request cache state; ``stack(branch)`` replaces the transformer's block stack for one branch."""

    def __init__(self, cfg: CacheConfig, mesh: Mesh, plan: ShardPlan, steps: int,
                 coefficients: list[float] | None, shared: SharedDecision | None = None,
                 stack_fn: Callable = flux2.image_stack, fns: flux2.StepFns = flux2.EAGER) -> None:
        self.cfg, self.plan, self.steps = cfg, plan, steps
        self.stack_fn = stack_fn  # the full block stack: eager, compiled, or a CUDA graph replay
        self.fns = fns  # the signal and its sums: compiled regions under --compile
        self.poly = np.poly1d(coefficients) if coefficients else None
        self.shared = shared or SharedDecision(mesh)
        valid = plan.valid(mesh.sp_rank)[plan.txt_loc:]  # real image tokens of this shard
        self.n_valid = int(valid.sum())
        if not bool(valid[:self.n_valid].all()):  # the sums slice a prefix (ShardPlan pads at the end)
            raise AssertionError("the shard plan put padding before real image tokens; the cache sums need a prefix")
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
        """``[sum |cur - prev|, sum |prev|]`` over this shard's real image tokens (float64)."""
        return self.fns.change(cur, prev, self.n_valid)

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
    def stack(self, branch: int) -> Callable:
        fn = {"teacache": self._teacache, "fbcache": self._fbcache, "calibrate": self._record}[self.cfg.mode]
        return functools.partial(fn, branch=branch)

    def _record(self, tr, img, txt, mods, rope, branch: int = 0) -> torch.Tensor:
        """Calibration: compute every step; pair the signal's change with the block stack output's change."""
        first = self.skip is None
        if first:
            sig = self.fns.signal(tr, img, mods[1])
            self.x = self.shared.ratio(self._sums(sig, self.prev)) if self.prev is not None else None
            self.prev, self.skip = sig, False
            self.log.append({"step": self.step, "rel": self.x if self.x is not None else float("nan"),
                             "acc": 0.0, "skip": False})
        out = self.stack_fn(tr, img, txt, mods, rope)
        if first:
            prev_out = self.residual.get(-1)
            if prev_out is not None and self.x is not None:
                y = self.shared.ratio(self._sums(out, prev_out))
                self.pairs.append((self.x, y))
            self.residual[-1] = out
        return out

    def _teacache(self, tr, img, txt, mods, rope, branch: int = 0) -> torch.Tensor | flux2.Reuse:
        if self.skip is None:  # first branch of the step: the signal does not depend on the prompt
            sig = self.fns.signal(tr, img, mods[1])
            self.skip = self._decide(sig)
            self.prev = sig
        if self.skip:  # the head's region adds the residual
            return flux2.Reuse(img, self.residual[branch])
        out = self.stack_fn(tr, img, txt, mods, rope)
        self.residual[branch] = out - img
        return out

    def _fbcache(self, tr, img, txt, mods, rope, branch: int = 0) -> torch.Tensor | flux2.Reuse:
        txt1, img1 = flux2.run_blocks(tr, img, txt, mods, rope, only_first=True)
        if self.skip is None:  # the cond branch's first-block residual decides for both branches
            r1 = img1 - img
            self.skip = self._decide(r1)
            if not self.skip:  # compare with the last computed step, so small changes cannot creep
                self.prev = r1
        if self.skip:
            return flux2.Reuse(img1, self.residual[branch])
        out = flux2.run_blocks(tr, img1, txt1, mods, rope, skip_first=True)[:, txt.shape[1]:]
        self.residual[branch] = out - img1
        return out

    def summary(self) -> dict:
        skipped = [e["step"] for e in self.log if e["skip"]]
        return {"mode": self.cfg.mode, "threshold": self.cfg.threshold, "skipped_steps": skipped,
                "decisions": self.log}


def make_cache(cfg: CacheConfig, mesh: Mesh, plan: ShardPlan, steps: int, family: str,
               stack_fn: Callable = flux2.image_stack, fns: flux2.StepFns = flux2.EAGER) -> StepCache | None:
    if cfg.mode == "none":
        return None
    return StepCache(cfg, mesh, plan, steps, resolve_coefficients(cfg, family), stack_fn=stack_fn, fns=fns)


def write_calibration(path: str, coefficients: list[float], pairs: list[tuple[float, float]], model: str) -> None:
    """The YAML that ``--cache-coefficients`` reads."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = {"model": model, "degree": len(coefficients) - 1, "pairs": len(pairs), "coefficients": coefficients,
            "note": "TeaCache rescaling polynomial, highest power first: output change ~ poly(signal change)"}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def fit_coefficients(x: list[float], y: list[float], degree: int = 4) -> list[float]:
    """Least-squares polynomial ``y ~ poly(x)`` (highest power first), as TeaCache's rescaling expects."""
    if len(x) != len(y) or len(x) <= degree:
        raise FluxDistError(f"calibration needs more than {degree} (signal, output) pairs, got {len(x)}")
    return [float(c) for c in np.polyfit(np.asarray(x, np.float64), np.asarray(y, np.float64), degree)]
