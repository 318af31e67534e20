"""FP8 and NVFP4 numerics: quantize, dequantize, and the block-scale layout Blackwell's GEMM reads.

Plain tensor functions (no modules, no models): the quantized linear, the checkpoint formats and
the tests' float64 references all build on these.
"""

from __future__ import annotations

import torch

from ..errors import FluxDistError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
BLOCK = 16


# -- FP8 -----------------------------------------------------------------------------------------
def quantize_fp8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) E4M3 with float32 scales ``[..., 1]``: ``x ~ q * scale``."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 with one calibrated per-tensor scale (a checkpoint's ``input_scale``), saturating; returns
    ``(q, scale as [rows, 1])`` so the row-wise GEMM takes it like a per-token scale."""
    q = (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.float().reshape(1, 1).expand(*x.shape[:-1], 1).contiguous()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


# -- NVFP4 ---------------------------------------------------------------------------------------
def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 magnitude index (0..7) of ``|v| <= 6`` (ties to the even code, as hardware does)."""
    grid = FP4_GRID.to(v.device)
    d = (v.abs().unsqueeze(-1) - grid).abs()
    idx = d.argmin(dim=-1)
    # argmin picks the lower index on ties; move to the even code where the upper one is even
    up = d.gather(-1, (idx + 1).clamp(max=7).unsqueeze(-1)).squeeze(-1)
    tie = (up == d.gather(-1, idx.unsqueeze(-1)).squeeze(-1)) & (idx < 7)
    return torch.where(tie & (idx % 2 == 1), idx + 1, idx)


def quantize_nvfp4(x: torch.Tensor, per_row: bool = False,
                   global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed uint8 [..., K/2], block scales e4m3 [..., K/16], global fp32 scale)``.

    ``x ~ e2m1 * block_scale * global``; global = amax / (448 * 6) so block scales fill E4M3's range.
    Weights take one global scale per tensor; activations one per token (``per_row``), so a token
    quantizes the same whichever rank holds it and the result does not depend on the layout.
    ``global_scale``: a calibrated per-tensor one (a checkpoint's ``input_scale``), block scales saturate.
    """
    if x.shape[-1] % BLOCK:
        raise FluxDistError(f"NVFP4 needs the inner dimension to be a multiple of {BLOCK}, got {x.shape[-1]}")
    xf = x.float()
    if global_scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True) if per_row else xf.abs().amax().reshape(())
        g = amax.clamp(min=1e-12) / (FP8_MAX * FP4_MAX)
    else:
        g = global_scale.float().reshape(())
    blocks = xf.reshape(*x.shape[:-1], -1, BLOCK)
    bs = (blocks.abs().amax(-1) / FP4_MAX / g).clamp(max=FP8_MAX).to(FP8)  # E4M3 block scale
    denom = (bs.float() * g).unsqueeze(-1)
    v = torch.where(denom > 0, blocks / denom.clamp(min=1e-30), torch.zeros_like(blocks)).clamp(-FP4_MAX, FP4_MAX)
    code = _round_e2m1(v) | ((v < 0).to(torch.int64) << 3)
    code = code.reshape(*x.shape[:-1], -1).to(torch.uint8)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)  # low nibble first, as float4_e2m1fn_x2
    return packed, bs, g


def dequantize_nvfp4(packed: torch.Tensor, bs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0xF, packed >> 4
    code = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1).long()
    mag = FP4_GRID.to(packed.device)[code & 7]
    val = torch.where(code >= 8, -mag, mag)
    blocks = val.reshape(*val.shape[:-1], -1, BLOCK) * (bs.float() * g).unsqueeze(-1)
    return blocks.reshape(*val.shape)


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Swizzle ``[rows, K/16]`` E4M3 scales into cuBLAS' 128x4 tiled layout (sm_100 block-scaled GEMM)."""
    rows, cols = scales.shape
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = scales.new_zeros(pr, pc)
    padded[:rows, :cols] = scales
    tiles = padded.view(pr // 128, 128, pc // 4, 4).permute(0, 2, 1, 3)
    return tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()
