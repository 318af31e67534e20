"""One skip decision for every rank.

Under sequence parallelism each rank sees one shard, so a per-rank decision can differ near the
threshold; ranks that disagree run different collectives and hang. Here every rank contributes its
shard's two sums (padding excluded) to one all-gather of ``2 x world`` numbers; every rank then
adds the sums of the first cfg group's shards in the same fixed order, in float64, and reaches the
same boolean bit for bit — one small collective per step, across the ``cfg`` axis too, so both
guidance branches skip together (each keeps its own cached residual). The collective is over the rank's
replica group (``mesh.group``: every rank when there is one group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel.collectives import all_gather
from ..parallel.mesh import Mesh


class SharedDecision:
    """Turns each rank's local ``(numerator, denominator)`` into one global ratio, identical everywhere."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        # Signals are taken from cfg rank 0's group (group ranks 0 .. sp-1, cfg is the outer axis).
        self.sources = list(range(mesh.dims.sp))

    def ratio(self, local: torch.Tensor) -> float:
        """``local``: this rank's ``[numerator, denominator]`` (float64); the result is the same on every rank."""
        size = self.mesh.dims.world
        if size == 1:
            table = local[None]
        else:
            table = all_gather(local, 0, self.mesh.group or dist.group.WORLD).view(size, 2)
        rows = table.cpu().tolist()  # the one host sync per step: the boolean needs it
        n = sum(rows[r][0] for r in self.sources)
        d = sum(rows[r][1] for r in self.sources)
        return n / d if d > 0 else float("inf")
