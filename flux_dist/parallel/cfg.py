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


def branch_prompts(prompt: str, negative: str, do_cfg: bool, mesh: Mesh) -> list[str]:
    """The prompts this rank encodes: the cond branch, and the uncond one unless cfg rank 1 holds it."""
    if not do_cfg:
        return [prompt]
    if mesh.dims.cfg > 1:
        return [negative] if mesh.cfg_rank == 1 else [prompt]
    return [prompt, negative]
