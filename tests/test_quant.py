"""FP8 / NVFP4 quantization against float64 references, and quantized models under every layout."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flux_dist.config import load_config
from flux_dist.engine import Engine
from flux_dist.errors import FluxDistError, NotSupportedError
from flux_dist.models.flux2 import quantize_transformer
from flux_dist.models.presets import build_preset
from flux_dist.quant import (
    QuantLinear,
    dequantize_fp8,
    dequantize_nvfp4,
    quantize_fp8_rowwise,
    quantize_nvfp4,
    resolve_mode,
)

from dist_utils import run_distributed


def ref_e4m3(y: float) -> float:
    """Round a float64 to the nearest E4M3 value (ties to even), saturating at 448."""
    a = abs(y)
    if a == 0:
        return 0.0
    e = max(math.floor(math.log2(a)), -6)  # subnormals share exponent -6
    step = 2.0 ** (e - 3)
    q = a / step
    r = math.floor(q)
    r = r + 1 if (q - r > 0.5 or (q - r == 0.5 and r % 2 == 1)) else r
    return math.copysign(min(r * step, 448.0), y)


GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def ref_e2m1(v: float) -> float:
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(GRID[i] - a), i % 2))  # nearest, ties to the even code
    return math.copysign(GRID[best], v)


def _data(rows=8, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x[0, :5] = torch.tensor([0.0, 1e-9, -3.0, 1e4, 7.5])  # zeros, tiny, large outliers
    return x.float()


def test_fp8_matches_float64_reference():
    x = _data()
    q, s = quantize_fp8_rowwise(x)
    got = dequantize_fp8(q, s).double()
    for r in range(x.shape[0]):
        sc = float(s[r, 0])
        scaled = (x[r] / s[r, 0]).tolist()  # the division in float32, as the kernel does it
        want = torch.tensor([ref_e4m3(v) * sc for v in scaled], dtype=torch.float64)
        assert torch.allclose(got[r], want, rtol=1e-6, atol=0), r
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 in the normal range
    normal = x.abs() >= s * 2.0**-6
    rel = ((got - x.double()).abs() / x.double().abs().clamp(min=1e-30))[normal]
    assert rel.max() <= 2.0**-4 + 1e-7


def test_nvfp4_matches_float64_reference():
    x = _data(4, 64, seed=1)
    p, bs, g = quantize_nvfp4(x)
    assert p.dtype == torch.uint8 and p.shape == (4, 32) and bs.shape == (4, 4) and bs.dtype == torch.float8_e4m3fn
    got = dequantize_nvfp4(p, bs, g).double()
    gd = float(x.abs().max()) / (448 * 6)
    for r in range(4):
        for b in range(4):
            blk = x[r, b * 16:(b + 1) * 16].double()
            scale = ref_e4m3(float(blk.abs().max()) / 6 / gd) * gd
            want = torch.tensor([ref_e2m1(float(v) / scale) * scale if scale > 0 else 0.0 for v in blk],
                                dtype=torch.float64)
            assert torch.allclose(got[r, b * 16:(b + 1) * 16], want, rtol=1e-5, atol=1e-12), (r, b)
    # error per element is at most half the largest grid step (1.0) times the block scale
    y = torch.randn(16, 256)
    d = dequantize_nvfp4(*quantize_nvfp4(y))
    assert ((d - y).norm() / y.norm()).item() < 0.12


@pytest.mark.parametrize("mode,bound", [("fp8-emulate", 0.06), ("nvfp4-emulate", 0.2)])
def test_quant_linear_emulation_error(mode, bound):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=True)
    x = torch.randn(4, 10, 128)
    ref = (x.double() @ lin.weight.double().t() + lin.bias.double())
    y = QuantLinear(lin, mode)(x)
    assert y.shape == (4, 10, 96)
    assert ((y.double() - ref).norm() / ref.norm()).item() < bound


def test_quantize_transformer_keeps_nvidia_high_precision_layers():
    c = build_preset("flux2-tiny")
    n = quantize_transformer(c.transformer, "fp8-emulate")
    tr = c.transformer
    assert n == 8 * len(tr.transformer_blocks) + 2 * len(tr.single_transformer_blocks)
    b = tr.transformer_blocks[0]
    assert isinstance(b.attn.to_q, QuantLinear) and isinstance(b.ff_context.linear_in, QuantLinear)
    for keep in (b.attn.add_q_proj, b.attn.add_k_proj, b.attn.add_v_proj, b.attn.to_add_out, tr.x_embedder,
                 tr.context_embedder, tr.proj_out, tr.double_stream_modulation_img.linear):
        assert type(keep) is torch.nn.Linear


def test_quantize_after_the_ulysses_split_counts_the_same():
    from flux_dist.models.flux2 import split_for_overlap

    c = build_preset("flux2-tiny")
    for b in c.transformer.single_transformer_blocks:
        split_for_overlap(b.attn)
    n = quantize_transformer(c.transformer, "fp8-emulate")  # qkv, mlp-in, and to_out's two column blocks
    assert n == 8 * len(c.transformer.transformer_blocks) + 4 * len(c.transformer.single_transformer_blocks)


def test_modes_resolve_per_device():
    cpu = torch.device("cpu")
    assert resolve_mode("auto", cpu) == "none"
    with pytest.raises(NotSupportedError, match="Blackwell"):
        resolve_mode("nvfp4", cpu)
    with pytest.raises(NotSupportedError, match="sm_89"):
        resolve_mode("fp8", cpu)
    with pytest.raises(FluxDistError, match="unknown quantization"):
        resolve_mode("int3", cpu)


def _cfg(u=1, r=1, quant="nvfp4-emulate"):
    c = load_config(None, {"model.model": "flux2-tiny", "model.quant": quant, "parallel.ulysses": u,
                           "parallel.ring": r})
    c.request = dataclasses.replace(c.request, prompt="a fox", height=80, width=48, steps=3,
                                    max_sequence_length=13)
    return c


def _quant_layouts(rank, world, layouts):
    out = []
    for u, r in layouts:
        eng = Engine(_cfg(u, r))
        out.append(eng.generate(eng.cfg.request, decode=False).latents)
    return out


def test_quantized_model_same_in_every_layout():
    eng = Engine(_cfg())
    ref = eng.generate(eng.cfg.request, decode=False).latents
    base = Engine(_cfg(quant="none"))
    plain = base.generate(base.cfg.request, decode=False).latents
    assert not torch.equal(ref, plain)  # quantization really happened
    for rank_out in run_distributed(_quant_layouts, 2, [(2, 1), (1, 2)]):
        for lat in rank_out:
            assert ((lat - ref).norm() / ref.norm()).item() < 1e-5


def test_quantize_once_save_and_load(tmp_path):
    """`flux-dist quantize` writes a directory that `--model DIR` loads to the same quantized model."""
    import subprocess
    import sys

    d = tmp_path / "tiny-nvfp4"
    r = subprocess.run([sys.executable, "-m", "flux_dist", "quantize", "flux2-tiny", str(d), "--quant",
                        "nvfp4-emulate", "--dtype", "float32", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (d / "transformer" / "flux_dist_quant.json").is_file()
    loaded = Engine(dataclasses.replace(_cfg(quant="none"), model=dataclasses.replace(
        _cfg().model, model=str(d), quant="none")))
    fresh = Engine(_cfg())
    n_quant = sum(isinstance(m, QuantLinear) for m in fresh.model.tr.modules())
    assert n_quant > 0 and sum(isinstance(m, QuantLinear) for m in loaded.model.tr.modules()) == n_quant
    a = loaded.generate(loaded.cfg.request, decode=False).latents
    b = fresh.generate(fresh.cfg.request, decode=False).latents
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["none", "fp8-emulate", "nvfp4-emulate"])
def test_fused_qkv_is_exact_where_the_format_allows(mode):
    """q/k/v fused into one GEMM give the three outputs exactly (per-row scales); NVFP4 keeps them apart."""
    from flux_dist.quant import concat_linears

    torch.manual_seed(3)
    lins = [torch.nn.Linear(32, 48, bias=False) for _ in range(3)]
    if mode != "none":
        lins = [QuantLinear(m, mode) for m in lins]
    fused = concat_linears(lins)
    if mode.startswith("nvfp4"):
        assert fused is None
        return
    x = torch.randn(5, 32)
    assert torch.equal(fused(x), torch.cat([m(x) for m in lins], dim=-1))
    assert fused.out_features == 144


@pytest.mark.parametrize("cap,auto", [((10, 0), "nvfp4"), ((12, 0), "nvfp4"), ((9, 0), "fp8"), ((8, 9), "fp8"),
                                      ((8, 0), "none"), ((7, 5), "none")])
def test_auto_picks_by_compute_capability(monkeypatch, cap, auto):
    """``auto``: NVFP4 on sm_100+, FP8 on sm_89/90, none elsewhere; an explicit mode the chip lacks is an error."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    gpu = torch.device("cuda", 0)
    assert resolve_mode("auto", gpu) == auto
    if cap < (10, 0):
        with pytest.raises(NotSupportedError, match="NVFP4 GEMMs need Blackwell"):
            resolve_mode("nvfp4", gpu)
    if cap < (8, 9):
        with pytest.raises(NotSupportedError, match="FP8 GEMMs need sm_89"):
            resolve_mode("fp8", gpu)
    else:
        assert resolve_mode("fp8", gpu) == "fp8"


def test_fp8_fast_accum_reaches_every_quantized_linear_and_the_metrics():
    """--fp8-fast-accum sets every QuantLinear, the fused and split ones the layout made too."""
    cfg = _cfg(quant="fp8-emulate")
    cfg.model = dataclasses.replace(cfg.model, fp8_fast_accum=True)
    eng = Engine(cfg)
    lins = [m for m in eng.model.tr.modules() if isinstance(m, QuantLinear)]
    assert lins and all(m.fast_accum for m in lins)
    assert any(".fd_" in n for n, m in eng.model.tr.named_modules() if isinstance(m, QuantLinear))
    assert eng.generate(eng.cfg.request, decode=False).metrics["fp8_fast_accum"] is True
    assert not any(m.fast_accum for m in Engine(_cfg(quant="fp8-emulate")).model.tr.modules()
                   if isinstance(m, QuantLinear))
