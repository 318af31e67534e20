"""The flow-matching Euler update, written out because it is elementwise and runs on each shard
(the schedule itself is the model's: ``models/flux2/pipeline.py``)."""

from __future__ import annotations

import torch


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """``x + (sigma_next - sigma) * v`` in float32, cast to the model dtype (diffusers' rounding)."""
    return (x.to(torch.float32) + (sigma_next - sigma) * v).to(v.dtype)
