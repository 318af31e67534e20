"""Triton kernel of ``ops.lora_swiglu`` (CUDA, bf16 / fp16): SwiGLU of a linear's output plus its LoRA delta.

One program per ``[BM, BN]`` tile of the activation: it loads the gate and up tiles of the base output
``y`` (read once, as the plain SwiGLU reads them), the tile's rows of ``h`` ``[BM, R]`` and the
matching rows of ``B`` (both small, from L2), computes the two rank-``R`` products on tensor cores in
float32, rounds ``y + delta`` to the activation dtype (as the unfused path stores it) and writes
``silu(g) * u``. The delta is never written to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 64 x 64 tiles, 8 warps, the rank dimension one static chunk (up to 256): 80 registers at R <= 64, 128 at 128, no
# spills (ptxas, sm_90a), so 3 programs share an SM. A runtime loop over R, or loading y before the products,
# took all 255 registers and spilled.
BM, BN, MAX_R = 64, 64, 256


@triton.jit
def _swiglu_lora_kernel(y_ptr, h_ptr, b_ptr, out_ptr, M, F, R, stride_y, stride_h, stride_b, stride_o,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NR: tl.constexpr,
                        DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < F
    rm = rm.to(tl.int64)  # M x the row stride can pass 2**31 (long sequences, the fused single-block output)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in tl.static_range(NR):
        rr = i * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        h = tl.load(h_ptr + rm[:, None] * stride_h + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        bg = tl.load(b_ptr + rn[None, :] * stride_b + rr[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        bu = tl.load(b_ptr + (rn[None, :] + F) * stride_b + rr[:, None], mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if DOT_F32:  # the Triton interpreter (CPU tests) multiplies no bf16
            h = h.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_g = tl.dot(h, bg, acc_g)
        acc_u = tl.dot(h, bu, acc_u)
    tile = m_ok[:, None] & n_ok[None, :]
    yg = tl.load(y_ptr + rm[:, None] * stride_y + rn[None, :], mask=tile, other=0.0)
    yu = tl.load(y_ptr + rm[:, None] * stride_y + (rn[None, :] + F), mask=tile, other=0.0)
    dt = out_ptr.dtype.element_ty
    g = (yg.to(tl.float32) + acc_g).to(dt).to(tl.float32)
    u = (yu.to(tl.float32) + acc_u).to(dt).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :], out.to(dt), mask=tile)


def swiglu_lora(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, col: int, dot_f32: bool = False) -> torch.Tensor:
    """``silu(g) * u`` of ``[g | u] = y[:, col:col + 2F] + h @ b.T`` for 2-D ``y`` ``[M, *]``, ``h`` ``[M, R]``,
    ``b`` ``[2F, R]`` (rows and the last dimension of each contiguous)."""
    M, R = h.shape
    F = b.shape[0] // 2
    if y.stride(-1) != 1 or h.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError("swiglu_lora needs a unit last stride in y, h and b")
    out = torch.empty(M, F, dtype=y.dtype, device=y.device)
    block_r = min(MAX_R, max(16, triton.next_power_of_2(R)))
    grid = (triton.cdiv(M, BM), triton.cdiv(F, BN))
    _swiglu_lora_kernel[grid](y[:, col:], h, b, out, M, F, R, y.stride(0), h.stride(0), b.stride(0), out.stride(0),
                              BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=block_r, NR=triton.cdiv(R, block_r), DOT_F32=dot_f32,
                              num_warps=8)
    return out
