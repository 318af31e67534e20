"""Functional collectives (traceable by torch.compile) with explicit waits, across torch 2.9 .. 2.14."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor


def wait(t: torch.Tensor) -> torch.Tensor:
    """Resolve an async result now (an explicit wait, so no collective is left unwaited)."""
    return fc.wait_tensor(t) if isinstance(t, fc.AsyncCollectiveTensor) else t


def all_gather(t: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    return wait(_gather(t.contiguous(), dim, group))


def all_to_all(t: torch.Tensor, group: dist.ProcessGroup, out_splits: list[int] | None = None,
               in_splits: list[int] | None = None) -> torch.Tensor:
    """All-to-all along dim 0; left async so the caller can overlap it (the first use waits)."""
    return fc.all_to_all_single(t.contiguous(), out_splits, in_splits, group)
