"""Local attention kernels on ``[B, H, S, D]`` tensors: plain, and with the log-sum-exp (for the ring).

Which kernel runs is chosen once per process (``resolve``): on Hopper in bf16 FA3's forward kernel
(the ``fa3-fwd`` wheel) is the fastest measured (697 TFLOP/s, cuDNN 587, SDPA flash 341; docs/facts.md),
and it also takes FP8 inputs (857-921 TFLOP/s) with one descale per (batch, head). A kernel that is
not installed or does not run here falls back to the next-best with a one-line notice, never an error.
The ring merges partial results through the log-sum-exp, which SDPA's public API does not return;
FA3 and the aten entry points of the flash / cuDNN / CPU-flash kernels do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AttentionBackend, choices
from ..errors import FluxDistError

log = logging.getLogger("flux_dist")

BACKENDS = choices(AttentionBackend)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FA3_HEAD_DIMS = (64, 96, 128, 192, 256)  # the head sizes the fa3-fwd wheel's kernels are built for


@dataclass(frozen=True)
class Kernel:
    """A resolved choice: ``name`` is a concrete backend, or ``auto`` (resolved at the first call)."""

    name: str = "auto"
    fp8: bool = False
    fallback: str = "sdpa"  # for head sizes FA3 has no kernel for (tiny test models)

    @property
    def label(self) -> str:
        """What the log line and the metrics JSON call it, e.g. ``fa3+fp8``."""
        return self.name + ("+fp8" if self.fp8 else "")


# -- choosing --------------------------------------------------------------------------------
_PROBED: dict[tuple[str, str], str | None] = {}  # (backend, device) -> None if it runs, else why not
_RESOLVED: dict[tuple[str, bool, str, torch.dtype], Kernel] = {}


def _probe(name: str, device: torch.device) -> str | None:
    """Run the kernel once on a tiny input (eagerly, never inside a trace); the reason it fails, or None."""
    key = (name, str(device))
    if key not in _PROBED:
        try:
            x = torch.randn(1, 2, 128, 128, device=device, dtype=torch.bfloat16)
            if name == "fa3":
                if torch.cuda.get_device_capability(device)[0] != 9:
                    raise RuntimeError("FA3's kernels are built for Hopper (sm_90)")
                _fa3(x, x, x, fp8=False)
                _fa3(x, x, x, fp8=True)
            elif name == "cudnn":
                torch.ops.aten._scaled_dot_product_cudnn_attention(x, x, x, None, True, 0.0, False, False)
            elif name == "flash":
                torch.ops.aten._scaled_dot_product_flash_attention(x, x, x)
            _PROBED[key] = None
        except Exception as e:  # noqa: BLE001 - any failure means: use the next-best kernel
            _PROBED[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return _PROBED[key]


def resolve(requested: str = "auto", fp8: bool = False, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32) -> Kernel:
    """Pick the kernel for this device and dtype; a missing one gives a notice (once) and the next-best."""
    if requested not in BACKENDS:
        raise FluxDistError(f"unknown attention kernel '{requested}' (choose from {', '.join(BACKENDS)})")
    device = torch.device(device)
    key = (requested, fp8, str(device), dtype)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(requested, fp8, device, dtype)
    return _RESOLVED[key]


def _resolve(requested: str, fp8: bool, device: torch.device, dtype: torch.dtype) -> Kernel:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        order = ["sdpa"]
    else:
        order = ["fa3", "cudnn", "flash", "sdpa"]
    if requested != "auto" and requested not in order:
        log.warning("attention kernel '%s' does not run on %s in %s; using %s", requested, device.type,
                    str(dtype).removeprefix("torch."), order[0])
    start = order.index(requested) if requested in order else 0
    ok = [c for c in order[start:] if (c == "sdpa" or _probe(c, device) is None)]
    name = ok[0]
    for cand in order[start:order.index(name)]:
        why = _probe(cand, device)
        if requested != "auto" or cand != "fa3" or fp8:
            log.warning("attention kernel %s unavailable (%s); using the next-best", cand, why)
        else:
            log.info("attention kernel fa3 unavailable (%s); using the next-best", why)
    if fp8 and name != "fa3":
        log.warning("FP8 attention needs the FA3 kernel (fa3-fwd wheel on Hopper); attention stays %s with %s",
                    str(dtype).removeprefix("torch."), name)
        fp8 = False
    return Kernel(name, fp8, ok[1] if len(ok) > 1 else "sdpa")


def _concrete(kernel: Kernel, q: torch.Tensor) -> Kernel:
    if kernel.name == "auto":
        kernel = resolve("auto", kernel.fp8, q.device, q.dtype)
    if kernel.name == "fa3" and q.shape[-1] not in FA3_HEAD_DIMS:
        return Kernel(kernel.fallback)
    return kernel


# -- FP8 inputs ------------------------------------------------------------------------------
def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, S, H, D]`` -> (E4M3 values, float32 descale ``[B, H]``): one scale per head over all tokens.

    FA3 multiplies the scores by ``q_descale * k_descale`` and the output by ``v_descale``, so a head's
    largest magnitude maps to 448; heads differ by orders of magnitude after QK-norm gains.
    """
    # Two stages, the same maximum: per token and head first (the axis the QK-norm before it reduces over), then
    # over the tokens ([B, S, H], small). Compiled, the kernel that norms, ropes and quantizes q / k went from 12.65
    # to 9.54 ms a [dev] pass on one H200 against one [B, H] reduction over S x D (BENCHMARKS.md, issue 14 profile).
    amax = x.abs().amax(dim=3).amax(dim=1).float().clamp_min(1e-12)  # [B, H]
    scale = amax / FP8_MAX
    q = (x.float() / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FA3 forward on ``[B, H, S, D]`` views (it takes ``[B, S, H, D]`` with any seq / head strides)."""
    import fa3_fwd_interface  # noqa: F401 - registers torch.ops.fa3_fwd (a compile-friendly custom op)

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scales: dict[str, torch.Tensor] = {}
    if fp8:
        (qt, scales["q_descale"]), (kt, scales["k_descale"]), (vt, scales["v_descale"]) = (
            quantize_per_head(t) for t in (qt, kt, vt))
    out, lse = torch.ops.fa3_fwd._flash_attn_forward(qt, kt, vt, **scales)[:2]
    return out.to(q.dtype).transpose(1, 2), lse


# -- running ---------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Kernel = Kernel()) -> torch.Tensor:
    """Full (non-causal) attention; the output may be a ``[B, H, S, D]`` view of a ``[B, S, H, D]`` tensor."""
    kernel = _concrete(kernel, q)
    if kernel.name == "fa3":
        return _fa3(q, k, v, kernel.fp8)[0]
    if kernel.name == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False)[0]
    if kernel.name == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
    return F.scaled_dot_product_attention(q, k, v)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kernel: Kernel = Kernel()) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out, lse)`` with ``lse`` float32 ``[B, H, S]`` (natural log)."""
    kernel = _concrete(kernel, q)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        return out, lse.float()
    if kernel.name == "fa3":
        return _fa3(q, k, v, kernel.fp8)
    if kernel.name == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
        return res[0], res[1].float().reshape(q.shape[:-1])
    if kernel.name == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
        return res[0], res[1].float()
    return _math_lse(q, k, v)


def _math_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path (float32 on GPU): scores materialized, fine for tests, slow for real shapes."""
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype)
    return out, lse
