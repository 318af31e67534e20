"""Presets, tiny tokenizers and local loading: deterministic, runnable offline, round-trippable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2

from flux_dist.models import full, presets
from flux_dist.models import tokenizers as tok_mod
from flux_dist.models.loading import load_pretrained
from flux_dist.models.presets import PRESETS, build_preset, save_components, to_diffusers_pipeline
from flux_dist.models.tokenizers import MISTRAL_SPECIAL_TOKENS, QWEN_SPECIAL_TOKENS, train_bpe

TINY = ("flux2-tiny", "flux2-klein-tiny")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the hub: the machines that run these tests have no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _state(c: presets.Components) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, m in (("transformer", c.transformer), ("vae", c.vae), ("text_encoder", c.text_encoder)):
        if m is not None:
            out.update({f"{prefix}.{k}": v for k, v in m.state_dict().items()})
    return out


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _public(config: dict) -> dict:
    """Config entries without diffusers' bookkeeping (e.g. _use_default_values)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _generate(c: presets.Components, prompt: str = "a red fox", **kw) -> np.ndarray:
    pipe = to_diffusers_pipeline(c)
    args = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.0, output_type="np")
    args.update(kw)
    return pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **args).images


@pytest.fixture(scope="module")
def tiny() -> dict[str, presets.Components]:
    return {name: build_preset(name) for name in TINY}


# ---------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_is_deterministic_per_seed(name: str, tiny: dict[str, presets.Components]) -> None:
    again = build_preset(name, seed=0)
    _assert_same_state(_state(tiny[name]), _state(again))
    other = build_preset(name, seed=1)
    a, b = _state(tiny[name]), _state(other)
    differing = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert any(k.startswith("transformer.") for k in differing)
    assert any(k.startswith("text_encoder.") for k in differing)
    assert any(k.startswith("vae.") for k in differing)


def test_build_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_preset("flux2-klein-tiny", seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_bpe_training_is_deterministic_across_processes() -> None:
    """Ranks train their own tokenizer, so a fresh process (other hash seed) must agree."""
    tok_mod._trained_bpe.cache_clear()
    here = {st: train_bpe(st) for st in (QWEN_SPECIAL_TOKENS, MISTRAL_SPECIAL_TOKENS)}
    tok_mod._trained_bpe.cache_clear()
    assert train_bpe(QWEN_SPECIAL_TOKENS) == here[QWEN_SPECIAL_TOKENS]
    code = (
        "import json; from flux_dist.models.tokenizers import train_bpe, QWEN_SPECIAL_TOKENS as q, "
        "MISTRAL_SPECIAL_TOKENS as m; print(json.dumps([train_bpe(q), train_bpe(m)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout)
    for st, (vocab, merges) in zip((QWEN_SPECIAL_TOKENS, MISTRAL_SPECIAL_TOKENS), theirs, strict=True):
        assert vocab == here[st][0]
        assert [tuple(m) for m in merges] == here[st][1]
    vocab, _ = here[QWEN_SPECIAL_TOKENS]
    assert 300 <= len(vocab) <= 500
    assert [vocab[t] for t in QWEN_SPECIAL_TOKENS] == list(range(len(QWEN_SPECIAL_TOKENS)))


# ---------------------------------------------------------------------------------------------
# tokenizers as the pipelines call them


def test_qwen_tokenizer_follows_the_klein_pipeline_contract(tiny: dict[str, presets.Components]) -> None:
    c = tiny["flux2-klein-tiny"]
    tok = c.tokenizer
    assert type(tok).__name__ in ("Qwen2TokenizerFast", "Qwen2Tokenizer")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a red fox"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    enc = tok(text, return_tensors="pt", padding="max_length", truncation=True, max_length=64)
    ids, mask = enc["input_ids"][0], enc["attention_mask"][0]
    assert ids.shape == (64,) and 0 < int(mask.sum()) < 64
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # specials are matched whole
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert tok.decode(ids[mask == 1]) == text
    assert c.text_encoder.config.vocab_size == len(tok)
    long = tok("fox " * 2000, padding="max_length", truncation=True, max_length=512)["input_ids"]
    assert len(long) == 512


def test_pixtral_processor_follows_the_dev_pipeline_contract(tiny: dict[str, presets.Components]) -> None:
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    c = tiny["flux2-tiny"]
    proc = c.tokenizer
    assert type(proc).__name__ == "PixtralProcessor"
    messages = format_input(prompts=["a red fox", "a blue whale"], system_message="Describe images.")
    enc = proc.apply_chat_template(
        messages,
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=48,
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (2, 48)
    tok = proc.tokenizer
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids[mask == 0] == tok.pad_token_id).all()
    first = tok.decode(ids[0][mask[0] == 1])
    assert first == "<s>[SYSTEM_PROMPT]Describe images.[/SYSTEM_PROMPT][INST]a red fox[/INST]"
    assert c.text_encoder.config.text_config.vocab_size == len(tok)
    assert c.text_encoder.config.image_token_index == tok.convert_tokens_to_ids("[IMG]")


# ---------------------------------------------------------------------------------------------
# the stock diffusers pipelines run on the tiny presets


@pytest.mark.parametrize("name", TINY)
def test_diffusers_pipeline_runs_offline(name: str, tiny: dict[str, presets.Components]) -> None:
    c = tiny[name]
    image = _generate(c)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05  # not a flat image
    assert ((image > 0.0) & (image < 1.0)).mean() > 0.9  # and not saturated
    # the prompt reaches the image (through the text encoder and the joint attention)
    assert np.abs(image - _generate(c, prompt="a blue whale in the ocean")).max() > 1e-3


def test_klein_tiny_runs_true_cfg(tiny: dict[str, presets.Components]) -> None:
    c = tiny["flux2-klein-tiny"]
    assert not c.is_distilled and c.family == "klein" and c.text_layers == (9, 18, 27)
    pipe = to_diffusers_pipeline(c)
    assert pipe.config.is_distilled is False
    calls = []
    hook = c.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with_cfg = _generate(c, guidance_scale=4.0)
        n_cfg = len(calls)
        calls.clear()
        no_cfg = _generate(c, guidance_scale=1.0)
    finally:
        hook.remove()
    assert n_cfg == 2 * len(calls) == 4  # cond + uncond per step
    assert np.abs(with_cfg - no_cfg).max() > 1e-3


def test_dev_tiny_is_guidance_distilled(tiny: dict[str, presets.Components]) -> None:
    c = tiny["flux2-tiny"]
    assert c.is_distilled and c.family == "dev" and c.text_layers == (10, 20, 30)
    assert c.transformer.config.guidance_embeds
    assert type(to_diffusers_pipeline(c)).__name__ == "Flux2Pipeline"


@pytest.mark.parametrize("name", TINY)
def test_tiny_shapes(name: str, tiny: dict[str, presets.Components]) -> None:
    c = tiny[name]
    cfg = c.transformer.config
    assert cfg.num_attention_heads % 4 == 0  # Ulysses 2 and 4
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert cfg.in_channels == 4 * c.vae.config.latent_channels == c.vae.bn.num_features
    te_cfg = getattr(c.text_encoder.config, "text_config", c.text_encoder.config)
    assert cfg.joint_attention_dim == len(c.text_layers) * te_cfg.hidden_size
    assert te_cfg.num_hidden_layers > max(c.text_layers)
    assert to_diffusers_pipeline(c).vae_scale_factor == 8  # as the real VAE
    assert not torch.allclose(c.vae.bn.running_mean, torch.zeros(()))
    assert not torch.allclose(c.vae.bn.running_var, torch.ones(()))


# ---------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("name", TINY)
def test_save_then_load_round_trips(name: str, tiny: dict[str, presets.Components], tmp_path) -> None:
    c = tiny[name]
    path = str(tmp_path / name)
    save_components(c, path)
    assert os.path.isfile(os.path.join(path, "model_index.json"))
    loaded = load_pretrained(path, dtype=torch.float32)
    assert (loaded.family, loaded.is_distilled, loaded.text_layers) == (c.family, c.is_distilled, c.text_layers)
    assert loaded.name == path
    assert type(loaded.tokenizer).__name__ == type(c.tokenizer).__name__
    assert _public(loaded.scheduler.config) == _public(c.scheduler.config)
    _assert_same_state(_state(c), _state(loaded))
    np.testing.assert_array_equal(_generate(loaded), _generate(c))


@pytest.mark.parametrize("name", TINY)
def test_bf16_preset_equals_its_fp32_copy_loaded_in_bf16(
    name: str, tiny: dict[str, presets.Components], tmp_path
) -> None:
    """Casting a built preset must match from_pretrained(dtype=bf16), RoPE buffers included."""
    save_components(tiny[name], str(tmp_path))
    loaded = load_pretrained(str(tmp_path), dtype=torch.bfloat16)
    built = build_preset(name, dtype=torch.bfloat16)
    assert loaded.transformer.dtype == loaded.vae.dtype == loaded.text_encoder.dtype == torch.bfloat16
    _assert_same_state(_state(built), _state(loaded))
    image = _generate(built, num_inference_steps=1)  # bf16 matmuls are slow on CPUs
    assert np.isfinite(image).all() and image.std() > 0.05
    np.testing.assert_array_equal(image, _generate(loaded, num_inference_steps=1))


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError) as e:
        build_preset("flux3-huge")
    for name in PRESETS:
        assert name in str(e.value)
    assert "flux3-huge" in str(e.value)


def test_load_missing_directory(tmp_path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not found") as e:
        load_pretrained(missing, dtype=torch.float32)
    assert missing in str(e.value)


def test_load_directory_without_model_index(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model_index.json") as e:
        load_pretrained(str(tmp_path), dtype=torch.float32)
    assert str(tmp_path) in str(e.value)


def test_load_wrong_pipeline_class(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline") as e:
        load_pretrained(str(tmp_path), dtype=torch.float32)
    assert "Flux2Pipeline" in str(e.value) and str(tmp_path) in str(e.value)


def test_load_missing_component(tiny: dict[str, presets.Components], tmp_path) -> None:
    save_components(tiny["flux2-klein-tiny"], str(tmp_path))
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_pretrained(str(tmp_path), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# full-size presets: shapes only (meta), plus the build path itself on a shrunken config


def test_flux2_dev_full_size_on_meta() -> None:
    c = build_preset("flux2-dev", dtype=torch.bfloat16, device="meta")
    cfg = c.transformer.config
    assert (cfg.num_layers, cfg.num_single_layers) == (8, 48)
    assert (cfg.num_attention_heads, cfg.attention_head_dim) == (48, 128)
    assert (cfg.joint_attention_dim, cfg.in_channels, cfg.guidance_embeds) == (15360, 128, True)
    assert tuple(cfg.axes_dims_rope) == (32, 32, 32, 32) and cfg.rope_theta == 2000
    n = sum(p.numel() for p in c.transformer.parameters())
    assert abs(n - 32.2e9) / 32.2e9 < 0.005
    assert c.transformer.device.type == "meta" and c.transformer.dtype == torch.bfloat16
    assert c.text_encoder is None and c.tokenizer is None and c.is_distilled
    assert c.vae.config.latent_channels * 4 == cfg.in_channels
    sched = c.scheduler.config
    assert sched.use_dynamic_shifting and sched.shift == 3.0 and sched.time_shift_type == "exponential"
    assert torch.get_default_dtype() == torch.float32


def test_flux2_klein_4b_full_size_on_meta() -> None:
    c = build_preset("flux2-klein-4b", dtype=torch.bfloat16, device="meta")
    cfg = c.transformer.config
    assert (cfg.num_layers, cfg.num_single_layers) == (5, 20)
    assert (cfg.num_attention_heads, cfg.attention_head_dim) == (24, 128)
    assert (cfg.joint_attention_dim, cfg.guidance_embeds) == (7680, False)
    assert c.family == "klein" and not c.is_distilled and c.text_encoder is None
    n = sum(p.numel() for p in c.transformer.parameters())
    assert 3.5e9 < n < 4.5e9
    assert type(to_diffusers_pipeline(c)).__name__ == "Flux2KleinPipeline"


def test_full_size_build_path_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    """The on-device build (default dtype + seeded re-draw), exercised on a shrunken config."""
    small = dict(presets.FULL_TRANSFORMER_CONFIGS["flux2-klein-4b"])
    small.update(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=128)
    small.update(joint_attention_dim=96)
    monkeypatch.setitem(presets.FULL_TRANSFORMER_CONFIGS, "flux2-klein-4b", small)
    # The default 84M-parameter VAE takes seconds to initialise on a CPU; one block shows the path.
    one_block = dict(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",))
    one_block.update(up_block_types=("UpDecoderBlock2D",), layers_per_block=1)
    monkeypatch.setattr(full, "AutoencoderKLFlux2", lambda: AutoencoderKLFlux2(**one_block))
    a = build_preset("flux2-klein-4b", dtype=torch.bfloat16, seed=3)
    b = build_preset("flux2-klein-4b", dtype=torch.bfloat16, seed=3)
    assert torch.get_default_dtype() == torch.float32
    assert a.transformer.dtype == a.vae.dtype == torch.bfloat16
    _assert_same_state(_state(a), _state(b))
    w = a.transformer.x_embedder.weight.float()
    assert abs(w.std().item() - 0.02) < 0.002
    c = build_preset("flux2-klein-4b", dtype=torch.bfloat16, seed=4)
    assert not torch.equal(a.transformer.x_embedder.weight, c.transformer.x_embedder.weight)
