"""Local attention kernels on ``[B, H, S, D]`` tensors: plain, and with the log-sum-exp (for the ring).

The ring merges partial results through the log-sum-exp, which SDPA's public API does not return;
the aten entry points of the flash / cuDNN / CPU-flash kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out, lse)`` with ``lse`` float32 ``[B, H, S]`` (natural log)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        return out, lse.float()
    if q.dtype in (torch.float16, torch.bfloat16):
        try:
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, False, False
            )
            return res[0], res[1].float().reshape(q.shape[:-1])
        except RuntimeError:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
            return res[0], res[1].float()
    return _math_lse(q, k, v)


def _math_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path (float32 on GPU): scores materialized, fine for tests, slow for real shapes."""
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype)
    return out, lse
