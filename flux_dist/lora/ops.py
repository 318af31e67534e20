"""The bank's two data-path ops, as custom ops so ``torch.compile`` keeps them as they are written.

* ``lora_addmm_(y, h, b, col)``: ``y[..., col:col + out] += h @ b.T`` **in place** — one cuBLAS GEMM with
  ``beta = 1`` that reads and writes the base linear's own output once. Written as ``y + h @ b.T``,
  inductor emits an out-of-place ``addmm`` (ATen copies ``y`` into the result first) or a separate GEMM
  output plus an add that the consumer reads back: 4 passes over the ``[tokens, out]`` output instead
  of 2, which is most of what the first bank cost (``bench/lora_count.py``). Declared as mutating
  ``y``, inductor re-inplaces it onto the base GEMM's buffer (no clone).
* ``lora_swiglu(y, h, b, col)``: ``silu(g) * u`` where ``[g | u] = y[..., col:col + 2F] + h @ b.T``:
  the SwiGLU after a LoRA linear, with the adapters' delta computed inside the activation's kernel
  (CUDA: ``kernels.swiglu_lora``, a Triton kernel), so the widest outputs of a block are read once and
  never written back. Elsewhere (CPU, float32) the same arithmetic in torch.

Both are model-free: a ``LoraLinear``'s output, its ``h = s * (A x)`` and a row block of its ``B``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(y: torch.Tensor) -> torch.Tensor:
    return y.view(-1, y.shape[-1])


@torch.library.custom_op("flux_dist::lora_addmm_", mutates_args=("y",))
def lora_addmm_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, col: int) -> None:
    """``y[..., col:col + b.shape[0]] += h @ b.T`` in place (``y`` contiguous; ``h`` ``[..., R]``, ``b`` ``[n, R]``)."""
    _rows(y)[:, col:col + b.shape[0]].addmm_(_rows(h), b.t())


@lora_addmm_.register_fake
def _(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, col: int) -> None:
    return None


def _swiglu_torch(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, col: int) -> torch.Tensor:
    gu = torch.addmm(_rows(y)[:, col:col + b.shape[0]], _rows(h), b.t())
    g, u = gu.chunk(2, dim=-1)
    return (F.silu(g) * u).view(*y.shape[:-1], b.shape[0] // 2)


@torch.library.custom_op("flux_dist::lora_swiglu", mutates_args=())
def lora_swiglu(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, col: int) -> torch.Tensor:
    """``silu(g) * u`` of ``[g | u] = y[..., col:col + 2F] + h @ b.T`` (``b`` ``[2F, R]``): ``[..., F]``."""
    if y.is_cuda and y.dtype in (torch.bfloat16, torch.float16) and h.dtype == b.dtype == y.dtype:
        from .kernels import swiglu_lora

        return swiglu_lora(_rows(y), _rows(h), b, col).view(*y.shape[:-1], b.shape[0] // 2)
    return _swiglu_torch(y, h, b, col)


@lora_swiglu.register_fake
def _(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, col: int) -> torch.Tensor:
    return y.new_empty(*y.shape[:-1], b.shape[0] // 2)
