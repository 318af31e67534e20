"""Triton kernel of ``swiglu.swiglu_fp8`` (CUDA, bf16 / fp16 ``y``).

One program per ``BLOCK_M`` rows, two sweeps over the ``F`` activation columns in ``BLOCK_N`` tiles: the first
computes each row's largest ``|act|``, the second recomputes ``act`` (the gate and up tiles again, from L2 where
the rows are few) and writes ``act / scale`` as E4M3 and, with ``a``, accumulates ``act @ a.T`` on tensor cores.
``act`` is rounded to ``y``'s dtype before both, as a stored activation would be. The rank-``R`` correction
``h @ b.T`` (tensor cores, float32) is added to the gate and up tiles, rounded to ``y``'s dtype, in both sweeps.
Without a correction or a projection a program takes ``ROWS_PLAIN`` rows (one sweep's bytes stay in L2); with
them 16 (the smallest tensor-core tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PLAIN, ROWS_DOT, N_PLAIN, N_DOT = 2, 16, 1024, 128
FP8_MAX = tl.constexpr(448.0)  # a global a jit function reads must be a constexpr


@triton.jit
def _act(y_ptr, rm, rn, m_ok, n_ok, F, stride_y, hr, b_ptr, stride_b, rr, r_ok,
         HAS_DELTA: tl.constexpr, DOT_F32: tl.constexpr):
    tile = m_ok[:, None] & n_ok[None, :]
    g = tl.load(y_ptr + rm[:, None] * stride_y + rn[None, :], mask=tile, other=0.0)
    u = tl.load(y_ptr + rm[:, None] * stride_y + (rn[None, :] + F), mask=tile, other=0.0)
    dt = g.dtype
    gf = g.to(tl.float32)
    uf = u.to(tl.float32)
    if HAS_DELTA:
        bg = tl.load(b_ptr + rn[None, :] * stride_b + rr[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        bu = tl.load(b_ptr + (rn[None, :] + F) * stride_b + rr[:, None], mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if DOT_F32:
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        gf = (gf + tl.dot(hr, bg)).to(dt).to(tl.float32)
        uf = (uf + tl.dot(hr, bu)).to(dt).to(tl.float32)
    act = (gf * tl.sigmoid(gf) * uf).to(dt)
    return tl.where(tile, act, 0.0)


@triton.jit
def _swiglu_fp8_kernel(y_ptr, q_ptr, s_ptr, h_ptr, b_ptr, a_ptr, p_ptr, M, F, R, R2,
                       stride_y, stride_q, stride_h, stride_b, stride_a, stride_p,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_R2: tl.constexpr,
                       HAS_DELTA: tl.constexpr, HAS_PROJ: tl.constexpr, DOT_F32: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rm = rm.to(tl.int64)  # M x the row stride can pass 2**31
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    hr = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_DELTA:
        hr = tl.load(h_ptr + rm[:, None] * stride_h + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_F32:
            hr = hr.to(tl.float32)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, F, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        act = _act(y_ptr, rm, rn, m_ok, rn < F, F, stride_y, hr, b_ptr, stride_b, rr, r_ok, HAS_DELTA, DOT_F32)
        amax = tl.maximum(amax, tl.max(tl.abs(act.to(tl.float32)), axis=1))
    scale = tl.maximum(amax, 1e-12) / FP8_MAX
    tl.store(s_ptr + rm, scale, mask=m_ok)
    r2 = tl.arange(0, BLOCK_R2)
    r2_ok = r2 < R2
    acc = tl.zeros((BLOCK_M, BLOCK_R2), dtype=tl.float32)
    for n0 in range(0, F, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < F
        act = _act(y_ptr, rm, rn, m_ok, n_ok, F, stride_y, hr, b_ptr, stride_b, rr, r_ok, HAS_DELTA, DOT_F32)
        v = tl.minimum(tl.maximum(act.to(tl.float32) / scale[:, None], -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + rm[:, None] * stride_q + rn[None, :], v.to(q_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
        if HAS_PROJ:
            at = tl.load(a_ptr + r2[None, :] * stride_a + rn[:, None], mask=n_ok[:, None] & r2_ok[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(act.to(tl.float32), at.to(tl.float32), acc)
            else:
                acc = tl.dot(act, at, acc)
    if HAS_PROJ:
        tl.store(p_ptr + rm[:, None] * stride_p + r2[None, :], acc, mask=m_ok[:, None] & r2_ok[None, :])


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def swiglu_fp8_cuda(y: torch.Tensor, col: int, f: int, h: torch.Tensor | None, b: torch.Tensor | None,
                    a: torch.Tensor | None, dot_f32: bool = False, q_dtype: torch.dtype = torch.float8_e4m3fn,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``swiglu.swiglu_fp8`` for 2-D ``y`` (unit last stride), ``h`` ``[M, R]``, ``b`` ``[2F, R]``, ``a``
    ``[R2, F]``. ``dot_f32`` / ``q_dtype`` (float32: the values before the E4M3 rounding) are for Triton's CPU
    interpreter, whose float8 conversion is not the hardware's round-to-nearest-even."""
    M = y.shape[0]
    delta, proj = h is not None and b is not None, a is not None
    for t in (y, h, b, a):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("swiglu_fp8 needs a unit last stride in every operand")
    q = torch.empty(M, f, dtype=q_dtype, device=y.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=y.device)
    p = torch.empty(M, a.shape[0] if proj else 0, dtype=torch.float32, device=y.device)
    R, R2 = (h.shape[1] if delta else 0), (a.shape[0] if proj else 0)
    bm = ROWS_DOT if (delta or proj) else ROWS_PLAIN
    yv = y[:, col:]
    _swiglu_fp8_kernel[(triton.cdiv(M, bm),)](
        yv, q, scale, h if delta else y, b if delta else y, a if proj else y, p, M, f, R, R2,
        y.stride(0), q.stride(0), h.stride(0) if delta else 0, b.stride(0) if delta else 0,
        a.stride(0) if proj else 0, p.stride(0) if proj else 0,
        BLOCK_M=bm, BLOCK_N=N_PLAIN if bm == ROWS_PLAIN else N_DOT, BLOCK_R=_pow2(R), BLOCK_R2=_pow2(R2),
        HAS_DELTA=delta, HAS_PROJ=proj,
        DOT_F32=dot_f32, num_warps=4 if bm == ROWS_PLAIN else 8)
    return q, scale, p
