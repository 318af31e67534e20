"""Attention kernel choice (fallback with a notice, never an error) and FP8 per-head scaling (float64 refs)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from flux_dist.errors import FluxDistError
from flux_dist.parallel import kernels
from flux_dist.parallel.kernels import FP8_MAX, Kernel, quantize_per_head, resolve


def test_resolve_on_cpu_falls_back_with_one_notice(caplog):
    assert resolve("auto", False, "cpu", torch.float32) == Kernel("sdpa", False)
    kernels._RESOLVED.clear()
    with caplog.at_level(logging.WARNING, logger="flux_dist"):
        k = resolve("fa3", True, "cpu", torch.float32)
        assert resolve("fa3", True, "cpu", torch.float32) is k  # resolved once per process
    assert k == Kernel("sdpa", False)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("'fa3' does not run on cpu" in m for m in msgs), msgs
    assert any("FP8 attention needs the FA3 kernel" in m for m in msgs), msgs
    assert len(msgs) == 2 and all("\n" not in m for m in msgs)


def test_unknown_kernel_is_an_error():
    with pytest.raises(FluxDistError, match="unknown attention kernel 'fa4'"):
        resolve("fa4", False, "cpu", torch.float32)


def test_kernels_agree_with_reference_on_views():
    """The ``[B, H, S, D]`` views the Ulysses path hands over (``[B, S, H, D]`` memory) give SDPA's result."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 9, 3, 16, dtype=torch.float64).float().transpose(1, 2) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = kernels.attention(q, k, v, Kernel("sdpa"))
    o2, lse = kernels.attention_lse(q, k, v, Kernel("sdpa"))
    s = (q.double() @ k.double().transpose(-1, -2)) * 16 ** -0.5
    for o in (out, o2):
        assert (o.double() - ref).abs().max().item() < 1e-5
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max().item() < 1e-5


def _e4m3_grid() -> torch.Tensor:
    """Every finite non-negative E4M3 value, in float64."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return v[torch.isfinite(v) & (v >= 0)].unique()


def test_quantize_per_head_against_float64():
    torch.manual_seed(1)
    # [B, S, H, D] with heads five orders of magnitude apart: a tensor-wide scale would flush the small ones
    gains = torch.tensor([1e-3, 1.0, 30.0, 1e2], dtype=torch.float64)
    x64 = torch.randn(2, 33, 4, 16, dtype=torch.float64) * gains[None, None, :, None]
    q, scale = quantize_per_head(x64.float())
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 4) and scale.dtype == torch.float32
    amax = x64.abs().amax(dim=(1, 3))
    assert torch.allclose(scale.double(), amax / FP8_MAX, rtol=1e-6)
    # every value is the nearest grid point of x / scale (to float32 rounding of the division)
    grid = _e4m3_grid()
    y = (x64.float() / scale[:, None, :, None]).double()
    nearest = grid[(y.abs()[..., None] - grid).abs().argmin(-1)] * y.sign()
    deq = q.double()
    assert torch.equal(deq, nearest)
    # relative error per head is E4M3's (3 mantissa bits: <= 2^-4 of the value in the normal range)
    back = deq * scale.double()[:, None, :, None]
    normal = y.abs() >= 2.0 ** -6
    assert ((back - x64).abs()[normal] / x64.abs()[normal]).max().item() <= 2.0 ** -4 + 1e-7
    per_head = (back - x64).norm(dim=(1, 3)) / x64.norm(dim=(1, 3))
    assert per_head.max().item() < 0.04  # the 1e-3 head keeps E4M3's precision too


def test_fp8_attention_inputs_error_is_bounded():
    """What FA3 sees with ``--attention-fp8`` (dequantized inputs) against float64 attention: E4M3-sized.

    FLUX.2's q/k come out of RMSNorm (unit RMS per head vector), then RoPE; v is a plain projection.
    """
    torch.manual_seed(2)
    b, s, h, d = 1, 256, 4, 64
    q, k = (F.rms_norm(torch.randn(b, s, h, d, dtype=torch.float64), (d,)) for _ in range(2))
    v = torch.randn(b, s, h, d, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    deq = [(lambda qq, sc: qq.double() * sc.double()[:, None, :, None])(*quantize_per_head(t.float()))
           for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in deq))
    err = ((out - ref).norm() / ref.norm()).item()
    assert 1e-3 < err < 5e-2, err  # nonzero (it is quantized) and E4M3-sized


def _fake_probes(monkeypatch, failing: dict[str, str]):
    kernels._RESOLVED.clear()
    monkeypatch.setattr(kernels, "_probe", lambda name, device: failing.get(name))


def test_gpu_order_and_fallback_without_a_gpu(monkeypatch, caplog):
    """On CUDA in bf16: FA3 first; a kernel that does not run gives one notice and the next one."""
    _fake_probes(monkeypatch, {})
    assert resolve("auto", True, "cuda:0", torch.bfloat16) == Kernel("fa3", True, "cudnn")
    _fake_probes(monkeypatch, {"fa3": "ModuleNotFoundError: No module named 'fa3_fwd_interface'"})
    with caplog.at_level(logging.WARNING, logger="flux_dist"):
        k = resolve("fa3", True, "cuda:0", torch.bfloat16)
    assert k == Kernel("cudnn", False, "flash")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("fa3 unavailable (ModuleNotFoundError" in m for m in msgs), msgs
    assert any("FP8 attention needs the FA3 kernel" in m for m in msgs), msgs
    _fake_probes(monkeypatch, {"fa3": "x", "cudnn": "y", "flash": "z"})
    assert resolve("auto", False, "cuda:0", torch.bfloat16) == Kernel("sdpa", False, "sdpa")
    _fake_probes(monkeypatch, {})
    assert resolve("auto", False, "cuda:0", torch.float32).name == "sdpa"  # FA3/cuDNN: half precision only
    kernels._RESOLVED.clear()


def test_fa3_falls_back_for_head_sizes_it_has_no_kernel_for():
    """Tiny test models (head dim 16) never reach FA3, whatever was resolved."""
    q = torch.randn(1, 2, 8, 16)
    k = kernels._concrete(Kernel("fa3", True, "sdpa"), q)
    assert k == Kernel("sdpa")
    out = kernels.attention(q, q, q, Kernel("fa3", True, "sdpa"))
    assert torch.allclose(out, F.scaled_dot_product_attention(q, q, q))
