"""The full-size presets' block-by-block build (meta shell, one block materialized and quantized at a
time), checked on a shrunken config in float32 on the CPU against the plain whole-model build."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

from flux_dist.errors import FluxDistError
from flux_dist.models import full, presets
from flux_dist.models.flux2 import QUANTIZED, quantize_transformer
from flux_dist.models.presets import build_preset
from flux_dist.quant import QuantLinear

SEED = 5
TINY_FULL = dict(presets.FULL_TRANSFORMER_CONFIGS["flux2-dev"])
TINY_FULL.update(num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=32,
                 joint_attention_dim=64, in_channels=16, axes_dims_rope=(8, 8, 8, 8))


@pytest.fixture(autouse=True)
def tiny_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """``flux2-dev`` shrunk to 2 + 2 blocks, with a one-block VAE (the default one takes seconds on a CPU)."""
    monkeypatch.setitem(presets.FULL_TRANSFORMER_CONFIGS, "flux2-dev", TINY_FULL)
    one_block = dict(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                     up_block_types=("UpDecoderBlock2D",), layers_per_block=1)
    monkeypatch.setattr(full, "AutoencoderKLFlux2", lambda: AutoencoderKLFlux2(**one_block))


def _blocks(tr: torch.nn.Module) -> list[torch.nn.Module]:
    return [*tr.transformer_blocks, *tr.single_transformer_blocks]


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_blockwise_build_equals_whole_model_build() -> None:
    tr = build_preset("flux2-dev", seed=SEED).transformer
    # today's build: the whole model on the device, then the matrices re-drawn in parameters() order
    with torch.device("cpu"):
        ref = Flux2Transformer2DModel(**TINY_FULL)
    g = torch.Generator("cpu").manual_seed(presets._seed(SEED, presets._TRANSFORMER_SEED))
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.02, generator=g)
    _assert_same_state(tr, ref)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tr.parameters())
    norms = [p for p in tr.parameters() if p.ndim != 2]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    assert not torch.equal(tr.x_embedder.weight, build_preset("flux2-dev", seed=SEED + 1).transformer.x_embedder.weight)


def test_quantized_while_built_equals_quantized_after() -> None:
    after = build_preset("flux2-dev", seed=SEED).transformer
    n_after = quantize_transformer(after, "fp8-emulate")
    built = build_preset("flux2-dev", seed=SEED, quant="fp8-emulate").transformer
    _assert_same_state(built, after)
    n_built = sum(isinstance(m, QuantLinear) for m in built.modules())
    assert n_built == n_after == 8 * 2 + 2 * 2
    # what the engine does next: counts, swaps nothing
    before = [id(m) for m in built.modules()]
    assert quantize_transformer(built, "fp8-emulate") == n_built
    assert [id(m) for m in built.modules()] == before


def test_at_most_one_block_unquantized_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each time a block is quantized: the earlier ones hold only QuantLinear, the later ones are still meta."""
    built: list[torch.nn.Module] = []
    seen: list[int] = []

    def record(**kw):
        built.append(Flux2Transformer2DModel(**kw))
        return built[-1]

    def high_precision(block: torch.nn.Module) -> list[str]:
        return [n for n, m in block.named_modules() if type(m) is torch.nn.Linear and n in QUANTIZED]

    def on_device(block: torch.nn.Module) -> bool:
        devices = {t.device.type for t in [*block.parameters(), *block.buffers()]}
        assert len(devices) == 1
        return devices != {"meta"}

    real = full.quantize_block

    def checked(block: torch.nn.Module, mode: str) -> int:
        blocks = _blocks(built[-1])
        k = next(i for i, b in enumerate(blocks) if b is block)
        seen.append(k)
        assert on_device(block) and high_precision(block)
        for b in blocks[:k]:
            assert on_device(b) and not high_precision(b)
        for b in blocks[k + 1:]:
            assert not on_device(b)
        return real(block, mode)

    monkeypatch.setattr(full, "Flux2Transformer2DModel", record)
    monkeypatch.setattr(full, "quantize_block", checked)
    tr = build_preset("flux2-dev", seed=SEED, quant="fp8-emulate").transformer
    assert seen == list(range(4))
    assert not any(high_precision(b) for b in _blocks(tr))
    assert {p.device.type for p in tr.parameters()} == {"cpu"}


def test_unknown_parameter_or_buffer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """``to_empty`` leaves memory uninitialised: a tensor without a fill rule must fail, not keep garbage."""

    def with_bias(**kw):
        tr = Flux2Transformer2DModel(**kw)
        tr.proj_out.bias = torch.nn.Parameter(torch.empty(tr.proj_out.out_features))
        return tr

    monkeypatch.setattr(full, "Flux2Transformer2DModel", with_bias)
    with pytest.raises(RuntimeError, match=r"no rule for proj_out\.bias"):
        build_preset("flux2-dev", seed=SEED)

    def with_buffer(**kw):
        tr = Flux2Transformer2DModel(**kw)
        tr.pos_embed.register_buffer("table", torch.zeros(3))
        return tr

    monkeypatch.setattr(full, "Flux2Transformer2DModel", with_buffer)
    with pytest.raises(RuntimeError, match="has buffers"):
        build_preset("flux2-dev", seed=SEED)


def test_unresolved_mode_is_refused() -> None:
    with pytest.raises(FluxDistError, match="resolve_mode"):
        build_preset("flux2-dev", quant="auto")


def test_full_size_dev_in_fp8_fits_one_80gb_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On meta (shapes only): the real FLUX.2 [dev] built in FP8 holds ~32 GiB of weights, not 60."""
    monkeypatch.undo()
    c = build_preset("flux2-dev", dtype=torch.bfloat16, device="meta", quant="fp8")
    tr = c.transformer
    gib = sum(t.numel() * t.element_size() for t in [*tr.parameters(), *tr.buffers()]) / 2**30
    assert 30 < gib < 34
    assert sum(isinstance(m, QuantLinear) for m in tr.modules()) == 8 * 8 + 2 * 48
