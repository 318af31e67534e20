"""The engine against diffusers (1 process) and every parallel layout against 1 process (gloo, float32)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flux_dist.config import RequestConfig, RunConfig, load_config
from flux_dist.engine import Engine
from flux_dist.errors import FluxDistError
from flux_dist.models.flux2 import pipeline as flux2_pipeline
from flux_dist.models.presets import build_preset, to_diffusers_pipeline

from dist_utils import run_distributed

REL = 1e-5
# even: 128x128 -> 64 image tokens, 16 text tokens; uneven: 80x48 -> 15 image tokens, 13 text tokens
EVEN = dict(height=128, width=128, max_sequence_length=16)
UNEVEN = dict(height=80, width=48, max_sequence_length=13)


def make_cfg(model: str, ulysses: int = 1, ring: int = 1, cfg: int = 1, **req) -> RunConfig:
    c = load_config(None, {"model.model": model, "parallel.ulysses": ulysses, "parallel.ring": ring,
                           "parallel.cfg_parallel": cfg})
    c.request = dataclasses.replace(c.request, prompt="a red fox in the snow", steps=3, guidance=4.0, seed=7, **req)
    return c


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


_REFS: dict = {}


def reference(model: str, shape: dict) -> torch.Tensor:
    """1-process latents (cached across tests in this pytest process)."""
    key = (model, tuple(sorted(shape.items())))
    if key not in _REFS:
        eng = Engine(make_cfg(model, **shape))
        _REFS[key] = eng.generate(eng.cfg.request, decode=False).latents
    return _REFS[key]


@pytest.mark.parametrize("model,guidance", [("flux2-tiny", 4.0), ("flux2-klein-tiny", 4.0)])
def test_one_process_equals_diffusers(model, guidance):
    cfg = make_cfg(model, **EVEN)
    req = cfg.request
    eng = Engine(cfg)
    ours = eng.generate(req)
    pipe = to_diffusers_pipeline(build_preset(model, seed=cfg.model.seed))
    kw = dict(prompt=req.prompt, height=req.height, width=req.width, num_inference_steps=req.steps,
              guidance_scale=guidance, max_sequence_length=req.max_sequence_length)
    lat = pipe(**kw, generator=torch.Generator("cpu").manual_seed(req.seed), output_type="latent").images
    if lat.ndim == 4:  # Flux2KleinPipeline returns the VAE's input for output_type="latent"
        vs = flux2_pipeline.vae_scale(eng.c)
        h, w = req.height // (2 * vs), req.width // (2 * vs)
        ids = eng.model.noise(req.height, req.width, req.seed, torch.float32)[1]
        assert ids.shape[1] == h * w
        lat, mine_lat = lat, flux2_pipeline.vae_latents(eng.c, ours.latents, ids)
    else:
        mine_lat = ours.latents
    assert rel(mine_lat, lat) < REL
    img = pipe(**kw, generator=torch.Generator("cpu").manual_seed(req.seed), output_type="np").images[0]
    mine = np.asarray(ours.image, dtype=np.float64) / 255.0
    assert mine.shape == img.shape
    assert np.abs(mine - img).max() <= 1 / 255 + 1e-6
    assert ours.metrics["step_ms"] and len(ours.metrics["step_ms"]) == req.steps
    assert np.asarray(ours.image).std() > 1.0  # not a flat image


def _layouts(rank: int, world: int, jobs: list[tuple[str, int, int, int, dict]]):
    out = []
    for model, u, r, c, shape in jobs:
        eng = Engine(make_cfg(model, ulysses=u, ring=r, cfg=c, **shape))
        res = eng.generate(eng.cfg.request, decode=False)
        out.append(((model, u, r, c, tuple(shape.values())), res.latents))
    return out


def _check(results, jobs):
    for rank_out in results:
        for (key, lat), job in zip(rank_out, jobs, strict=True):
            err = rel(lat, reference(job[0], job[4]))
            assert err < REL, (key, err)
    # every rank ends with the same latents
    for rank_out in results[1:]:
        for (_, a), (_, b) in zip(rank_out, results[0], strict=True):
            assert torch.equal(a, b)


JOBS_2 = [
    ("flux2-tiny", 2, 1, 1, EVEN), ("flux2-tiny", 1, 2, 1, EVEN),
    ("flux2-tiny", 2, 1, 1, UNEVEN), ("flux2-tiny", 1, 2, 1, UNEVEN),
    ("flux2-klein-tiny", 1, 1, 2, EVEN), ("flux2-klein-tiny", 1, 1, 2, UNEVEN),
]
JOBS_4 = [
    ("flux2-tiny", 2, 2, 1, EVEN), ("flux2-tiny", 2, 2, 1, UNEVEN),
    ("flux2-klein-tiny", 2, 1, 2, EVEN), ("flux2-klein-tiny", 1, 2, 2, UNEVEN),
    ("flux2-tiny", 4, 1, 1, UNEVEN),
]


@pytest.mark.parametrize("world,jobs", [(2, JOBS_2), (4, JOBS_4)], ids=["world2", "world4"])
def test_layouts_equal_one_process(world, jobs):
    _check(run_distributed(_layouts, world, jobs, timeout=600), jobs)


def test_ring_three_ranks_uneven():
    jobs = [("flux2-tiny", 1, 3, 1, EVEN)]  # 64 image tokens over 3 ranks
    _check(run_distributed(_layouts, 3, jobs), jobs)


@pytest.mark.parametrize("field,value,match", [
    ("height", 120, "multiple of 16"), ("width", 0, "multiple of 16"), ("prompt", "", "prompt is required"),
    ("prompt", None, "prompt is required"), ("height", 4096, "exceeds the limit"), ("steps", 0, "steps"),
])
def test_bad_requests(field, value, match):
    eng = Engine(make_cfg("flux2-tiny", **EVEN))
    req = dataclasses.replace(eng.cfg.request, **{field: value})
    if field == "height" and value == 4096:
        req = dataclasses.replace(req, width=4096)
    with pytest.raises(FluxDistError, match=match):
        eng.generate(req)


def test_bad_model_and_layout():
    with pytest.raises(FluxDistError, match="unknown model"):
        Engine(make_cfg("flux2-nope"))
    with pytest.raises(FluxDistError, match="cannot load model directory"):
        Engine(make_cfg("/nonexistent/flux2"))
    with pytest.raises(FluxDistError, match="world size"):
        Engine(make_cfg("flux2-tiny", ulysses=2))


def test_same_seed_same_image_and_seed_changes_it():
    eng = Engine(make_cfg("flux2-tiny", **EVEN))
    a = eng.generate(eng.cfg.request, decode=False).latents
    b = eng.generate(eng.cfg.request, decode=False).latents
    c = eng.generate(dataclasses.replace(eng.cfg.request, seed=8), decode=False).latents
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_default_request_dataclass():
    assert RequestConfig().prompt is None


def test_cuda_graphs_refused_before_the_model_loads(monkeypatch):
    """--cuda-graphs on CPU (or with fbcache) fails at once, before a possibly long model load."""
    from flux_dist import engine as engine_mod
    from flux_dist.errors import NotSupportedError

    monkeypatch.setattr(engine_mod, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    cfg = make_cfg("flux2-tiny", **EVEN)
    cfg.model = dataclasses.replace(cfg.model, cuda_graphs=True)
    with pytest.raises(NotSupportedError, match="needs a CUDA device"):
        Engine(cfg)


def _placements(rank: int, world: int, jobs):
    out = []
    for model, u, c, placement in jobs:
        cfg = make_cfg(model, ulysses=u, cfg=c, **EVEN)
        cfg.model = dataclasses.replace(cfg.model, text_encoder_placement=placement, prompt_cache_mb=8.0)
        eng = Engine(cfg)
        first = eng.generate(eng.cfg.request, decode=False)
        again = eng.generate(eng.cfg.request, decode=False)  # a prompt-cache hit: the encoder is skipped
        out.append((first.latents, again.latents, first.metrics["text"], again.metrics["text"]))
    return out


def test_text_encoder_placements_give_the_every_image():
    """first / shard / offload (= first on CPU) on 2 ranks equal the 1-process image; a cache hit too."""
    jobs = [(m, u, c, p) for m, u, c in (("flux2-tiny", 2, 1), ("flux2-klein-tiny", 1, 2))
            for p in ("first", "shard", "offload")]
    results = run_distributed(_placements, 2, jobs, timeout=600)
    for rank, rank_out in enumerate(results):
        for (model, _, _, placement), (lat, again, m1, m2) in zip(jobs, rank_out, strict=True):
            assert rel(lat, reference(model, EVEN)) < REL, (model, placement)
            assert torch.equal(lat, again)
            assert m1["placement"] == ("first" if placement == "offload" else placement)
            assert m1["prompt_cache"]["misses"] == 1 and m2["prompt_cache"]["hits"] == 1
            if placement != "shard" and rank == 1:
                assert m1["text_encoder_bytes"] == 0  # only rank 0 holds the encoder
    shard_bytes = [r[1][2]["text_encoder_bytes"] for r in results]  # flux2-tiny, shard, per rank
    first_bytes = results[0][0][2]["text_encoder_bytes"]  # flux2-tiny, first: the whole cut encoder on rank 0
    assert all(b < 0.75 * first_bytes for b in shard_bytes), (shard_bytes, first_bytes)
