"""The quantized linear: FP8 (Hopper, Ada) and NVFP4 (Blackwell) weights, activations per token.

FP8: E4M3 weights with one scale per output channel, activations quantized per token at run time (or,
where a calibrated checkpoint gives one, with its static per-tensor ``input_scale``),
one ``torch._scaled_mm`` (row-wise scales, bf16 out) per linear. NVFP4: E2M1 values, one E4M3 scale
per 16 elements and one FP32 scale per tensor; its GEMM exists only on sm_100+ (``torch._scaled_mm``
with ``float4_e2m1fn_x2``). Where a kernel cannot run (CPU, or NVFP4 before Blackwell) the layer can
*emulate* it — dequantize and multiply in high precision — which is for validating numerics only:
it is slower than bf16 and says so loudly; ``auto`` never picks it.

This module knows linears only: which linears of a model are quantized is the model adapter's plan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..config import QuantMode, choices
from ..errors import FluxDistError, NotSupportedError
from .numerics import (
    BLOCK,
    dequantize_fp8,
    dequantize_nvfp4,
    quantize_fp8_rowwise,
    quantize_fp8_static,
    quantize_nvfp4,
    to_blocked,
)

log = logging.getLogger("flux_dist")

MODES = choices(QuantMode)
RESOLVED_MODES = tuple(m for m in MODES if m != "auto")  # what resolve_mode returns: a layer's format


class QuantLinear(nn.Module):
    """A linear whose weight is stored quantized; activations are quantized per call: per token, or with
    the static per-tensor ``input_scale`` buffer where one is set (``set_input_scale``; FP8: the E4M3
    scale, NVFP4: the global scale over dynamic 16-element block scales)."""

    # FP8 GEMM accumulation: cuBLAS' fast mode was 2-11% faster at FLUX.2's shapes on an H200 for 2.4e-3 /
    # 3.7e-3 relative error against 1.7e-3 (a tenth of FP8 rounding; BENCHMARKS.md, issue 17). ``set_fast_accum``.
    fast_accum: bool = False

    def __init__(self, lin: nn.Linear, mode: str) -> None:
        super().__init__()
        self.mode, self.in_features, self.out_features = mode, lin.in_features, lin.out_features
        self.out_dtype = lin.weight.dtype
        if mode.endswith("-emulate"):
            mode = mode.removesuffix("-emulate")
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)
        self.register_buffer("input_scale", None)
        w = lin.weight.detach()
        if mode.startswith("fp8"):
            q, s = quantize_fp8_rowwise(w)
            self.register_buffer("weight_q", q)
            self.register_buffer("weight_scale", s.reshape(1, -1).contiguous())  # [1, N] for scale_b
        else:
            p, bs, g = quantize_nvfp4(w)
            self.register_buffer("weight_q", p)
            self.register_buffer("weight_block_scale", bs)
            self.register_buffer("weight_global", g)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        s = self.input_scale
        if self.mode == "fp8":
            xq, xs = quantize_fp8_rowwise(x2) if s is None else quantize_fp8_static(x2, s)
            y = torch._scaled_mm(xq, self.weight_q.t(), scale_a=xs, scale_b=self.weight_scale,
                                 bias=self.bias, out_dtype=self.out_dtype, use_fast_accum=self.fast_accum)
        elif self.mode == "fp8-emulate":
            w = dequantize_fp8(self.weight_q, self.weight_scale.reshape(-1, 1))
            y = dequantize_fp8(*(quantize_fp8_rowwise(x2) if s is None else quantize_fp8_static(x2, s))) @ w.t()
            y = (y if self.bias is None else y + self.bias.float()).to(self.out_dtype)
        elif self.mode == "nvfp4":
            y = self._nvfp4_gemm(x2)
        else:  # nvfp4-emulate
            w = dequantize_nvfp4(self.weight_q, self.weight_block_scale, self.weight_global)
            y = dequantize_nvfp4(*quantize_nvfp4(x2, per_row=True, global_scale=s)) @ w.t()
            y = (y if self.bias is None else y + self.bias.float()).to(self.out_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _nvfp4_gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """Blackwell path: FP4 x FP4 with swizzled E4M3 block scales; the two global scales after."""
        xp, xbs, xg = quantize_nvfp4(x2, per_row=True, global_scale=self.input_scale)
        fp4 = torch.float4_e2m1fn_x2
        y = torch._scaled_mm(xp.view(fp4), self.weight_q.view(fp4).t(), scale_a=to_blocked(xbs),
                             scale_b=to_blocked(self.weight_block_scale), out_dtype=torch.bfloat16)
        y = y * (xg * self.weight_global)
        return (y if self.bias is None else y + self.bias).to(self.out_dtype)


def slice_linear(lin: nn.Module, rows: slice | None = None, cols: slice | None = None) -> nn.Module:
    """A new linear holding a block of ``lin``'s weight: output rows and/or input columns (same format).

    Used to split a fused projection so its halves can run at different times (overlap with
    communication). Row slices keep per-row scales; column slices keep them too (the scales are per
    output channel), and NVFP4 column slices must fall on 16-element blocks.
    """
    rows = rows or slice(None)
    cols = cols or slice(None)
    if isinstance(lin, nn.Linear):
        w = lin.weight.detach()[rows, cols].contiguous()
        out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None and cols == slice(None),
                        device=w.device, dtype=w.dtype)
        out.weight.data.copy_(w)
        if out.bias is not None:
            out.bias.data.copy_(lin.bias.detach()[rows])
        return out.requires_grad_(False)
    if not isinstance(lin, QuantLinear):
        raise TypeError(f"cannot slice {type(lin).__name__}")
    new = QuantLinear.__new__(QuantLinear)
    nn.Module.__init__(new)
    new.mode, new.out_dtype = lin.mode, lin.out_dtype
    keep_bias = lin.bias is not None and cols == slice(None)
    new.bias = nn.Parameter(lin.bias.detach()[rows], requires_grad=False) if keep_bias else None
    new.register_buffer("input_scale", lin.input_scale)  # per tensor: the same for any block of the weight
    if lin.mode.startswith("fp8"):
        new.register_buffer("weight_q", lin.weight_q[rows, cols].contiguous())
        new.register_buffer("weight_scale", lin.weight_scale[:, rows].contiguous())
    else:
        c0, c1 = cols.start or 0, lin.in_features if cols.stop is None else cols.stop
        if c0 % BLOCK or c1 % BLOCK:
            raise FluxDistError(f"NVFP4 column slices must fall on {BLOCK}-element blocks, got {c0}:{c1}")
        new.register_buffer("weight_q", lin.weight_q[rows, c0 // 2:c1 // 2].contiguous())
        new.register_buffer("weight_block_scale", lin.weight_block_scale[rows, c0 // BLOCK:c1 // BLOCK].contiguous())
        new.register_buffer("weight_global", lin.weight_global)
    new.out_features = new.weight_q.shape[0]
    new.in_features = new.weight_q.shape[1] * (2 if lin.mode.startswith("nvfp4") else 1)
    return new


def concat_linears(lins: list[nn.Module]) -> nn.Module | None:
    """One linear computing ``cat([lin(x) for lin in lins], -1)`` (exact: scales are per output row),
    or None where the format does not allow it (NVFP4 has one global scale per weight tensor)."""
    if all(isinstance(m, nn.Linear) for m in lins):
        w = torch.cat([m.weight.detach() for m in lins])
        out = nn.Linear(w.shape[1], w.shape[0], bias=lins[0].bias is not None, device=w.device, dtype=w.dtype)
        out.weight.data.copy_(w)
        if out.bias is not None:
            out.bias.data.copy_(torch.cat([m.bias.detach() for m in lins]))
        return out.requires_grad_(False)
    if not all(isinstance(m, QuantLinear) and m.mode.startswith("fp8") for m in lins):
        return None
    scales = [m.input_scale for m in lins]
    if any(s is not None for s in scales) and not all(s is not None and torch.equal(s, scales[0]) for s in scales):
        return None  # different static input scales: one GEMM cannot give each linear's numbers
    new = slice_linear(lins[0])
    new.weight_q = torch.cat([m.weight_q for m in lins])
    new.weight_scale = torch.cat([m.weight_scale for m in lins], dim=1)
    if new.bias is not None:
        new.bias = nn.Parameter(torch.cat([m.bias.detach() for m in lins]), requires_grad=False)
    new.out_features = new.weight_q.shape[0]
    return new


def quantize_linears(module: nn.Module, names: Iterable[str], mode: str) -> int:
    """Swap ``module``'s ``nn.Linear`` submodules named in ``names`` (relative names) for QuantLinear.

    Returns how many were swapped; names that are absent or not plain linears are left alone.
    """
    if mode not in RESOLVED_MODES:
        raise FluxDistError(f"cannot quantize to '{mode}': pass a mode from resolve_mode ({', '.join(RESOLVED_MODES)})")
    if mode == "none":
        return 0
    wanted, n = set(names), 0
    for name, mod in list(module.named_modules()):
        if isinstance(mod, nn.Linear) and name in wanted:
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent), leaf, QuantLinear(mod, mode))
            n += 1
    return n


def set_fast_accum(module: nn.Module, on: bool) -> int:
    """FP8 GEMMs of ``module``'s quantized linears with fast (or precise) accumulation; returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, QuantLinear):
            m.fast_accum = bool(on)
            n += 1
    return n


def set_input_scale(lin: QuantLinear, scale: torch.Tensor | None) -> None:
    """Give ``lin`` a static per-tensor activation scale (0-d float32), or None for per-token ones."""
    lin.input_scale = None if scale is None else scale.detach().float().reshape(()).to(lin.weight_q.device)


def activation_scaling(modules: nn.Module | Iterable[nn.Module]) -> str:
    """How the quantized linears in ``modules`` scale activations: static, dynamic, mixed, or none (none quantized)."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    kinds = {"static" if m.input_scale is not None else "dynamic" for r in roots for m in r.modules()
             if isinstance(m, QuantLinear)}
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "none"


def loaded_mode(module: nn.Module) -> str:
    """The mode ``module``'s quantized linears run (one, or ``mixed``), ``none`` if it has none."""
    modes = {m.mode for m in module.modules() if isinstance(m, QuantLinear)}
    return modes.pop() if len(modes) == 1 else "mixed" if modes else "none"


def count_quantized(module: nn.Module) -> int:
    return sum(isinstance(m, QuantLinear) for m in module.modules())


def set_mode(module: nn.Module, mode: str, out_dtype: torch.dtype) -> None:
    """Give every QuantLinear of ``module`` the mode this device runs and the dtype its outputs take."""
    for m in module.modules():
        if isinstance(m, QuantLinear):
            m.mode, m.out_dtype = mode, out_dtype


def cast_unquantized_(module: nn.Module, dtype: torch.dtype) -> None:
    """Everything outside the QuantLinears to ``dtype``; QuantLinears keep their format and scales, their bias
    and their outputs take ``dtype`` (a checkpoint saved in bf16 runs in the float32 a run asks for)."""
    for m in module.modules():
        if isinstance(m, QuantLinear):
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
            m.out_dtype = dtype
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)


def resolve_mode(mode: str, device: torch.device) -> str:
    """``auto``: NVFP4 on sm_100+, FP8 on sm_89 / sm_90, none elsewhere (never an emulation)."""
    if mode not in MODES:
        raise FluxDistError(f"unknown quantization '{mode}' (choose from {', '.join(MODES)})")
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    if mode == "auto":
        return "nvfp4" if cap >= (10, 0) else "fp8" if cap >= (8, 9) else "none"
    if mode == "fp8" and cap < (8, 9):
        raise NotSupportedError(f"FP8 GEMMs need sm_89+ (Ada/Hopper), this device is {device} sm_{cap[0]}{cap[1]}; "
                                "use --quant fp8-emulate to validate numerics (slow)")
    if mode == "nvfp4" and cap < (10, 0):
        raise NotSupportedError(f"NVFP4 GEMMs need Blackwell (sm_100+), this device is {device} "
                                f"sm_{cap[0]}{cap[1]}; use --quant nvfp4-emulate to validate numerics (slow)")
    if mode.endswith("emulate"):
        log.warning("*** --quant %s EMULATES low-precision GEMMs in high precision: numerics only, SLOWER "
                    "than bf16; never use it for speed ***", mode)
    return mode


def runnable_mode(mode: str, device: torch.device) -> str:
    """``mode`` if this device runs it, else its emulation (with the loud warning): a checkpoint saved
    on a Blackwell machine still loads on a CPU, rather than failing at the first GEMM."""
    try:
        return resolve_mode(mode, device)
    except NotSupportedError:
        return resolve_mode(f"{mode.removesuffix('-emulate')}-emulate", device)
