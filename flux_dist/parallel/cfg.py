"""Classifier-free guidance across the ``cfg`` axis: cond on cfg rank 0, uncond on cfg rank 1."""

from __future__ import annotations

import torch

from .collectives import all_gather
from .mesh import Mesh


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """diffusers' formula, written once so every path (and every rank) rounds the same way."""
    return uncond + scale * (cond - uncond)


def cfg_parallel_combine(pred: torch.Tensor, mesh: Mesh, scale: float) -> torch.Tensor:
    """Exchange the two branches' predictions and combine them; identical on both cfg ranks."""
    both = all_gather(pred, 0, mesh.groups["cfg"])
    cond, uncond = both.chunk(2, dim=0)
    return guided(cond, uncond, scale)


def my_branches(branches: list, mesh: Mesh) -> list:
    """This rank's guidance branches of ``[cond, uncond]``: both, or the one its cfg rank holds."""
    if len(branches) == 2 and mesh.dims.cfg > 1:
        return [branches[mesh.cfg_rank]]
    return branches
