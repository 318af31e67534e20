"""FP8 (e4m3) GEMM with row-wise scales in Triton for Hopper: persistent, TMA descriptors, fused epilogue.

``fp8_linear(xq, x_scale, w_q, w_scale)`` computes what flux-dist's quantized linear computes with
``torch._scaled_mm(xq, w_q.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=...)``:
``out[m, n] = (sum_k xq[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n] (+ bias[n])``, accumulated in
fp32, rounded once to ``out_dtype``. ``gate`` / ``residual`` fuse a FLUX.2 block's
``residual + gate * out`` into the same epilogue (one pass over the output instead of three).

``quantize_rows(x)`` is the per-token activation quantization as one Triton kernel (one read of x,
one write of the FP8 values and scales), bit-identical to ``flux_dist.quant.numerics.quantize_fp8_rowwise``.

Written for issue 17's shoot-out (``bench/gemm/shootout.py``), informed by Triton's persistent-matmul
tutorial (TMA descriptors, grouped tile order, epilogue sub-tiling) and CUTLASS / DeepGEMM's FP8
practice (promote the tensor-core accumulator to fp32 every 128 K elements unless fast accumulation
is asked for). Needs Triton >= 3.4 (host-side ``TensorDescriptor``) and sm_90.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

FP8 = torch.float8_e4m3fn
FP8_MAX = tl.constexpr(448.0)


@dataclass(frozen=True)
class Cfg:
    BM: int = 128
    BN: int = 256
    BK: int = 128
    stages: int = 3
    warps: int = 8
    group_m: int = 8
    persistent: bool = True
    subtile: bool = True  # store the output tile in two halves (less shared memory, fewer registers)
    flatten: bool = False  # flatten the persistent loop nest (lets the pipeliner cross tiles)
    ws: bool = False  # Triton's automatic warp specialization of the persistent loop
    promote: int = 128  # precise mode: fp32 promotion every this many K elements (<= BK; cuBLAS: 128)

    @property
    def name(self) -> str:
        s = f"{'p' if self.persistent else 'np'}{self.BM}x{self.BN}x{self.BK}s{self.stages}w{self.warps}g{self.group_m}"
        s += ("" if self.subtile else "-nosub") + ("-flat" if self.flatten else "") + ("-ws" if self.ws else "")
        return s + ("" if self.promote == 128 else f"-prom{self.promote}")


# Candidate configs swept by the shoot-out (fp8 operand tiles: BM*BK + BN*BK bytes a stage).
CANDIDATES: list[Cfg] = [
    Cfg(128, 256, 128, 3, 8),
    Cfg(128, 256, 128, 3, 8, flatten=True),
    Cfg(128, 256, 128, 4, 8),
    Cfg(128, 256, 64, 4, 8),
    Cfg(128, 128, 128, 4, 8),
    Cfg(128, 128, 128, 5, 4),
    Cfg(256, 128, 128, 3, 8),
    Cfg(128, 256, 128, 3, 8, subtile=False),
    Cfg(128, 256, 128, 3, 8, ws=True),
    Cfg(64, 256, 128, 4, 4),
    Cfg(64, 128, 128, 6, 4),
    Cfg(128, 256, 128, 3, 8, persistent=False),
    Cfg(256, 128, 128, 4, 8),
    Cfg(256, 128, 128, 3, 8, group_m=4),
    Cfg(256, 128, 128, 3, 8, group_m=16),
    Cfg(256, 128, 128, 3, 8, ws=True),
    Cfg(256, 128, 128, 3, 8, subtile=False),
    Cfg(128, 128, 256, 3, 8),
    Cfg(256, 128, 128, 3, 8, persistent=False),
    Cfg(128, 128, 256, 3, 8, promote=256),  # half the promotions: between precise and fast numerics
]

# Picked per shape by the shoot-out on one H200 (bench/results/issue17-shootout-call2.json, the
# 1024x1024 pass's shapes; 2048x2048 shapes picked DEFAULT in call 1). Keyed by (K, N), then the
# smallest M bucket >= M; ``pick`` falls back to DEFAULT, the winner at 27 of 38 shapes.
DEFAULT = Cfg(256, 128, 128, 3, 8)
_S4 = Cfg(256, 128, 128, 4, 8)
TABLE: dict[tuple[int, int], list[tuple[int, Cfg]]] = {
    (6144, 18432): [(512, Cfg(128, 128, 256, 3, 8, promote=256)), (4096, _S4)],
    (6144, 36864): [(512, Cfg(128, 128, 256, 3, 8, promote=256))],
    (6144, 55296): [(4608, Cfg(256, 128, 128, 3, 8, group_m=4))],
    (6144, 6144): [(2048, DEFAULT), (4096, DEFAULT), (4608, _S4)],
    (18432, 6144): [(512, _S4)],
}

# Where this kernel (fast accumulation) beat cuBLAS row-wise with fast accumulation in both device
# calls on one H200: the K = 18432 projections (FF out, single-block MLP out) at >= 4096 tokens,
# +2-8%. Elsewhere cuBLAS is level or faster: keep ``torch._scaled_mm`` there.
PREFER_TRITON_FAST = {(4096, 18432, 6144), (4608, 18432, 6144)}


def prefer_triton(M: int, K: int, N: int, fast_accum: bool) -> bool:
    """Whether the shoot-out says to run this kernel instead of cuBLAS at this shape."""
    return fast_accum and (M, K, N) in PREFER_TRITON_FAST


def pick(M: int, K: int, N: int) -> Cfg:
    for m_max, cfg in TABLE.get((K, N), []):
        if M <= m_max:
            return cfg
    return DEFAULT


@triton.jit
def _tile_pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, om, on, M, N, xs_ptr, ws_ptr, bias_ptr, gate_ptr, r_desc, c_desc,
              BM: tl.constexpr, BNE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
    offs_m = om + tl.arange(0, BM)
    offs_n = on + tl.arange(0, BNE)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if GATED:
        g = tl.load(gate_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        r = r_desc.load([om, on]).to(tl.float32)
        y = r + g[None, :] * y
    c_desc.store([om, on], y.to(c_desc.dtype))


@triton.jit
def _fp8_gemm_kernel(a_desc, b_desc, c_desc, r_desc, xs_ptr, ws_ptr, bias_ptr, gate_ptr, M, N, K,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                     NUM_SMS, SUBTILE: tl.constexpr, FLATTEN: tl.constexpr, WS: tl.constexpr,
                     PROMOTE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
    start_pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    tile_id_c = start_pid - NUM_SMS  # the epilogue's own counter (as in Triton's tutorial)
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WS):
        pid_m, pid_n = _tile_pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            ok = ki * BK
            a = a_desc.load([om, ok])
            b = b_desc.load([on, ok])
            if PROMOTE > 0:  # promote the tensor-core partial sums to fp32 every PROMOTE K elements
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=PROMOTE)
            else:
                acc = tl.dot(a, b.T, acc)
        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_pid(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        if SUBTILE:
            acc = tl.reshape(acc, (BM, 2, BN // 2))
            acc = tl.permute(acc, (0, 2, 1))
            acc0, acc1 = tl.split(acc)
            _epilogue(acc0, om, on, M, N, xs_ptr, ws_ptr, bias_ptr, gate_ptr, r_desc, c_desc,
                      BM, BN // 2, HAS_BIAS, GATED)
            _epilogue(acc1, om, on + BN // 2, M, N, xs_ptr, ws_ptr, bias_ptr, gate_ptr, r_desc, c_desc,
                      BM, BN // 2, HAS_BIAS, GATED)
        else:
            _epilogue(acc, om, on, M, N, xs_ptr, ws_ptr, bias_ptr, gate_ptr, r_desc, c_desc,
                      BM, BN, HAS_BIAS, GATED)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
             gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             cfg: Cfg | None = None, precise: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """``xq`` [M, K] e4m3 row-major, ``x_scale`` [M, 1] fp32, ``w_q`` [N, K] e4m3 row-major,
    ``w_scale`` [1, N] (or [N]) fp32. With ``gate`` [N] and ``residual`` [M, N] (out_dtype) the
    result is ``residual + gate * (xq @ w_q.T * scales + bias)``."""
    M, K = xq.shape
    N, K2 = w_q.shape
    if K != K2 or xq.dtype != FP8 or w_q.dtype != FP8:
        raise ValueError(f"fp8_gemm: want e4m3 [M,K] x [N,K], got {tuple(xq.shape)} {xq.dtype} and "
                         f"{tuple(w_q.shape)} {w_q.dtype}")
    if not (xq.is_contiguous() and w_q.is_contiguous()):
        raise ValueError("fp8_gemm: xq and w_q must be contiguous (K-major)")
    cfg = cfg or pick(M, K, N)
    if out is None:
        out = torch.empty((M, N), device=xq.device, dtype=out_dtype)
    bne = cfg.BN // 2 if cfg.subtile else cfg.BN
    a_desc = TensorDescriptor(xq, [M, K], [K, 1], [cfg.BM, cfg.BK])
    b_desc = TensorDescriptor(w_q, [N, K], [K, 1], [cfg.BN, cfg.BK])
    c_desc = TensorDescriptor(out, [M, N], [out.stride(0), 1], [cfg.BM, bne])
    gated = gate is not None
    if gated:
        if residual is None or residual.dtype != out.dtype or residual.stride(1) != 1:
            raise ValueError("fp8_gemm: gate needs a residual [M, N] of out_dtype with unit last stride")
        r_desc = TensorDescriptor(residual, [M, N], [residual.stride(0), 1], [cfg.BM, bne])
    else:
        r_desc = c_desc
    tiles = triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN)
    n_prog = min(_num_sms(xq.device.index or 0), tiles) if cfg.persistent else tiles
    xs = x_scale.reshape(-1)
    ws = w_scale.reshape(-1)
    _fp8_gemm_kernel[(n_prog,)](
        a_desc, b_desc, c_desc, r_desc, xs, ws,
        bias if bias is not None else xs, gate.reshape(-1) if gated else xs,
        M, N, K,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.group_m, NUM_SMS=n_prog,
        SUBTILE=cfg.subtile, FLATTEN=cfg.flatten, WS=cfg.ws,
        PROMOTE=min(cfg.promote, cfg.BK) if precise else 0,
        HAS_BIAS=bias is not None, GATED=gated,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return out


def fp8_linear(xq: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
               fast_accum: bool = False, gate: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for ``torch._scaled_mm(xq, w_q.t(), scale_a=x_scale, scale_b=w_scale, bias=bias,
    out_dtype=out_dtype, use_fast_accum=fast_accum)`` (row-wise scales; without ``fast_accum`` the
    fp32 promotion every 128 K that cuBLAS also does), with the per-shape config from ``TABLE``.
    ``gate`` [N] and ``residual`` [M, N] fuse ``residual + gate * out`` into the epilogue."""
    return fp8_gemm(xq, x_scale, w_q, w_scale, bias, out_dtype, gate=gate, residual=residual,
                    precise=not fast_accum)


# -- per-token activation quantization ----------------------------------------------------------
@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
    scale = amax / FP8_MAX
    q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _swiglu_quant_kernel(h_ptr, q_ptr, s_ptr, H, stride_h, stride_q, BLOCK: tl.constexpr):
    """silu(h[:, :H]) * h[:, H:2H], rounded to bf16 as diffusers' eager SwiGLU would leave it, quantized."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    a = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + row * stride_h + H + offs, mask=mask, other=0.0).to(tl.float32)
    y = (a / (1.0 + tl.exp(-a))).to(tl.bfloat16).to(tl.float32) * b
    y = y.to(tl.bfloat16).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12)
    scale = amax / FP8_MAX
    q = tl.clamp(tl.math.div_rn(y, scale), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _modnorm_quant_kernel(x_ptr, shift_ptr, scale_ptr, q_ptr, s_ptr, K, stride_x, stride_q, eps,
                          BLOCK: tl.constexpr):
    """LayerNorm (no affine) then ``* (1 + scale) + shift`` (FLUX.2's modulation), quantized per token."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / K
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / K
    n = (d * tl.math.rsqrt(var + eps)).to(tl.bfloat16).to(tl.float32)
    sc = tl.load(scale_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (n * (1.0 + sc) + sh).to(tl.bfloat16).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12)
    s = amax / FP8_MAX
    q = tl.clamp(tl.math.div_rn(y, s), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + row, s)


def _row_launch(K: int) -> tuple[int, int]:
    block = triton.next_power_of_2(K)
    return block, (16 if block >= 16384 else 8 if block >= 4096 else 4)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row E4M3 with fp32 scales [M, 1]: ``x ~ q * scale`` (``x`` [M, K], unit last stride)."""
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=FP8)
    s = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    block, warps = _row_launch(K)
    _quant_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block, num_warps=warps)
    return q, s


def swiglu_quantize(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(silu(h[:, :H]) * h[:, H:])`` in one pass; ``h`` [M, 2H] may be a column slice."""
    M, H2 = h.shape
    H = H2 // 2
    q = torch.empty((M, H), device=h.device, dtype=FP8)
    s = torch.empty((M, 1), device=h.device, dtype=torch.float32)
    block, warps = _row_launch(H)
    _swiglu_quant_kernel[(M,)](h, q, s, H, h.stride(0), q.stride(0), BLOCK=block, num_warps=warps)
    return q, s


def modnorm_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=FP8)
    s = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    block, warps = _row_launch(K)
    _modnorm_quant_kernel[(M,)](x, shift, scale, q, s, K, x.stride(0), q.stride(0), eps,
                                BLOCK=block, num_warps=warps)
    return q, s


def cfg_dict(cfg: Cfg) -> dict:
    return asdict(cfg) | {"name": cfg.name}
