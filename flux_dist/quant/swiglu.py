"""SwiGLU fused with the per-token FP8 quantization of the next linear's input: one op from the wide projection's
output to the FP8 activation the next row-wise GEMM reads.

``swiglu_fp8(y, col, h, b, a)``: with ``[g | u] = y[..., col:col + 2F]`` (plus, where ``h`` / ``b`` are given, a
rank-``R`` correction ``h @ b.T`` added to it first, rounded as a stored output would be), the activation
``act = silu(g) * u`` rounded to ``y``'s dtype, then ``(q, scale) = quantize_fp8_rowwise(act)``; where ``a`` is
given also ``p = act @ a.T`` (a rank-``R2`` projection of the activation, float32). Returns ``(q, scale, p)``
(``p`` ``[M, 0]`` without ``a``).

Why: compiled, the SwiGLU and the row-wise quantization of its 18432-wide rows became one inductor reduction that
read the projection's output twice and ran near 2.6 TB/s (BENCHMARKS.md, issue 17's profile: 14 ms of a FLUX.2
[dev] pass). With a low-rank correction on the projection and a low-rank projection of the activation (an
adapter bank, ``flux_dist.lora``) the path was three kernels and a skinny GEMM (about 19 ms). The CUDA kernel
(Triton) takes a block of rows through every column twice — the row maximum first, then the quantized values
(and the projection) — so the activation is never written in bf16 and the second read mostly comes from L2.
Elsewhere (CPU, float32, emulated FP8) the same arithmetic in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .numerics import FP8, FP8_MAX, quantize_fp8_rowwise


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def swiglu_fp8_reference(y: torch.Tensor, col: int, f: int, h: torch.Tensor | None = None,
                         b: torch.Tensor | None = None, a: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's arithmetic in torch (2-D ``y``): what the CUDA kernel computes, and its CPU path."""
    gu = y[:, col:col + 2 * f]
    if h is not None and b is not None:
        gu = torch.addmm(gu, h, b.t()).to(y.dtype)
    g, u = gu.chunk(2, dim=-1)
    act = (F.silu(g.float()) * u.float()).to(y.dtype)
    q, scale = quantize_fp8_rowwise(act)
    p = act.float() @ a.float().t() if a is not None else y.new_empty(y.shape[0], 0, dtype=torch.float32)
    return q, scale, p


@torch.library.custom_op("flux_dist::swiglu_fp8", mutates_args=())
def swiglu_fp8(y: torch.Tensor, col: int, f: int, h: torch.Tensor | None, b: torch.Tensor | None,
               a: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q [M, F] E4M3, scale [M, 1] float32, p [M, R2] float32, R2 = 0 without a)`` for 2-D ``y`` (module docstring);
    ``f`` = F, the activation's width."""
    if y.is_cuda and y.dtype in (torch.bfloat16, torch.float16):
        from .swiglu_kernel import swiglu_fp8_cuda

        return swiglu_fp8_cuda(y, col, f, h, b, a)
    return swiglu_fp8_reference(y, col, f, h, b, a)


@swiglu_fp8.register_fake
def _(y, col, f, h, b, a):
    m = y.shape[0]
    p = y.new_empty(m, a.shape[0] if a is not None else 0, dtype=torch.float32)
    return y.new_empty(m, f, dtype=FP8), y.new_empty(m, 1, dtype=torch.float32), p


__all__ = ["FP8_MAX", "swiglu_fp8", "swiglu_fp8_reference"]
