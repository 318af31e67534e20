"""A small device mesh with named axes ``cfg x ring x ulysses`` (ulysses innermost).

Ulysses is innermost so its all-to-all stays inside one NVLink island; the ring axis may
cross nodes; the cfg axis only exchanges one noise prediction per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import FluxDistError

AXES = ("cfg", "ring", "ulysses")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each axis; their product is the world size."""

    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    @property
    def world(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: how many shards one sequence is cut into."""
        return self.ring * self.ulysses

    def validate(self, world_size: int) -> None:
        for name in AXES:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise FluxDistError(f"--{name.replace('cfg', 'cfg-parallel')} must be a positive integer, got {v!r}")
        if self.cfg > 2:
            raise FluxDistError(f"--cfg-parallel is 1 or 2 (two guidance branches), got {self.cfg}")
        if self.world != world_size:
            raise FluxDistError(
                f"parallel degrees cfg={self.cfg} x ring={self.ring} x ulysses={self.ulysses} = {self.world} "
                f"do not multiply to the world size {world_size}"
            )


class Mesh:
    """Rank coordinates and one process group per axis (None when the axis has size 1)."""

    def __init__(self, dims: ParallelDims, rank: int = 0, world_size: int = 1) -> None:
        dims.validate(world_size)
        self.dims = dims
        self.rank = rank
        self.world_size = world_size
        # Row-major coordinates with ulysses innermost.
        self.ulysses_rank = rank % dims.ulysses
        self.ring_rank = (rank // dims.ulysses) % dims.ring
        self.cfg_rank = rank // (dims.ulysses * dims.ring)
        self.groups: dict[str, dist.ProcessGroup | None] = {a: None for a in AXES}
        self.sp_group: dist.ProcessGroup | None = None
        if world_size > 1:
            self._build_groups()

    @property
    def sp_rank(self) -> int:
        """Index of this rank's shard within its sequence-parallel group."""
        return self.ring_rank * self.dims.ulysses + self.ulysses_rank

    def _grid(self) -> torch.Tensor:
        d = self.dims
        return torch.arange(self.world_size).reshape(d.cfg, d.ring, d.ulysses)

    def _build_groups(self) -> None:
        # Every rank must call new_group for every group, in the same order.
        grid = self._grid()
        rows = {axis: grid.movedim(i, -1).reshape(-1, grid.shape[i]) for i, axis in enumerate(AXES)}
        rows["sp"] = grid.reshape(self.dims.cfg, -1)
        for axis, table in rows.items():
            if table.shape[1] == 1:
                continue
            for ranks in table.tolist():
                g = dist.new_group(ranks)
                if self.rank in ranks:
                    if axis == "sp":
                        self.sp_group = g
                    else:
                        self.groups[axis] = g

    def describe(self) -> dict:
        return {
            "world_size": self.world_size,
            "cfg": self.dims.cfg,
            "ring": self.dims.ring,
            "ulysses": self.dims.ulysses,
        }
