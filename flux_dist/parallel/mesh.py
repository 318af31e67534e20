"""A small device mesh with named axes ``replicas x cfg x ring x ulysses`` (ulysses innermost).

Ulysses is innermost so its all-to-all stays inside one NVLink island; the ring axis may
cross nodes; the cfg axis only exchanges one noise prediction per step. Replicas are the outermost
axis: each replica group is a contiguous block of ranks that holds the whole model and serves its
own request (``replicas == 1``: one group of every rank, the default process group).
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

    def validate(self, world_size: int, replicas: int = 1) -> None:
        for name in AXES:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise FluxDistError(f"--{name.replace('cfg', 'cfg-parallel')} must be a positive integer, got {v!r}")
        if self.cfg > 2:
            raise FluxDistError(f"--cfg-parallel is 1 or 2 (two guidance branches), got {self.cfg}")
        if self.world * replicas != world_size:
            lead = f"replicas={replicas} x " if replicas > 1 else ""
            raise FluxDistError(
                f"parallel degrees {lead}cfg={self.cfg} x ring={self.ring} x ulysses={self.ulysses} = "
                f"{self.world * replicas} do not multiply to the world size {world_size}"
            )


class Mesh:
    """Rank coordinates and one process group per axis (None when the axis has size 1), within this
    rank's replica group; ``group`` is the whole replica group's (None for a group of one rank)."""

    def __init__(self, dims: ParallelDims, rank: int = 0, world_size: int = 1, replicas: int = 1) -> None:
        dims.validate(world_size, replicas)
        self.dims = dims
        self.rank = rank
        self.world_size = world_size
        self.replicas = replicas
        self.replica = rank // dims.world
        self.ranks = list(range(self.replica * dims.world, (self.replica + 1) * dims.world))  # this group's ranks
        local = rank - self.ranks[0]
        # Row-major coordinates with ulysses innermost.
        self.ulysses_rank = local % dims.ulysses
        self.ring_rank = (local // dims.ulysses) % dims.ring
        self.cfg_rank = local // (dims.ulysses * dims.ring)
        self.groups: dict[str, dist.ProcessGroup | None] = {a: None for a in AXES}
        self.sp_group: dist.ProcessGroup | None = None
        self.group: dist.ProcessGroup | None = None
        if world_size > 1:
            self._build_groups()

    @property
    def name(self) -> str:
        """``REPLICASxDEGREE``, e.g. ``2x4``: how the world is cut into groups."""
        return f"{self.replicas}x{self.dims.world}"

    @property
    def is_leader(self) -> bool:
        """The group's first rank: it decodes the image (and, serving, takes the group's jobs)."""
        return self.rank == self.ranks[0]

    @property
    def sp_rank(self) -> int:
        """Index of this rank's shard within its sequence-parallel group."""
        return self.ring_rank * self.dims.ulysses + self.ulysses_rank

    def _grid(self) -> torch.Tensor:
        d = self.dims
        return torch.arange(self.world_size).reshape(self.replicas, d.cfg, d.ring, d.ulysses)

    def _build_groups(self) -> None:
        # Every rank must call new_group for every group, in the same order (replica by replica).
        if self.replicas == 1:
            self.group = dist.group.WORLD
        for replica, grid in enumerate(self._grid()):
            if self.replicas > 1 and self.dims.world > 1:
                g = dist.new_group(grid.flatten().tolist())
                if replica == self.replica:
                    self.group = g
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
        out = {
            "world_size": self.world_size,
            "cfg": self.dims.cfg,
            "ring": self.dims.ring,
            "ulysses": self.dims.ulysses,
        }
        if self.replicas > 1:
            out.update(replicas=self.replicas, replica=self.replica)
        return out


def build_meshes(layouts: list[tuple[int, int, int, int]], rank: int, world_size: int) -> dict[str, Mesh]:
    """One ``Mesh`` per layout ``(replicas, cfg, ring, ulysses)``, by name (``2x4``), in the given order.

    Every rank builds every layout's process groups at start (collective: the same order everywhere),
    so a server can switch layouts at a request boundary without creating any group.
    """
    out: dict[str, Mesh] = {}
    for replicas, cfg, ring, ulysses in layouts:
        mesh = Mesh(ParallelDims(cfg, ring, ulysses), rank, world_size, replicas)
        out[mesh.name] = mesh
    return out
