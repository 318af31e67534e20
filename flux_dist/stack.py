"""The block-stack interface: the one signature the adapter's stack, the CUDA-graph stack and the
step cache share, so each can stand in for another.

A block stack takes this rank's image tokens at model width, the text tokens, the step's
modulation vectors and the RoPE tables of the local ``[text, image]`` sequence, and returns the
image tokens after every block — or, from a step cache that skips the blocks, a ``Reuse``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Reuse:
    """A skipped block stack: the head's region adds ``residual`` to ``img`` (one fused region)."""

    img: torch.Tensor
    residual: torch.Tensor


class BlockStack(Protocol):
    def __call__(self, tr: torch.nn.Module, img: torch.Tensor, txt: torch.Tensor, mods: tuple[torch.Tensor, ...],
                 rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | Reuse: ...
