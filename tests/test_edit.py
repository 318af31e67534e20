"""Editing with reference images (FLUX.2 multi-reference): 1 process equals diffusers' pipelines called
with ``image=[...]``; every layout equals 1 process, TeaCache's decisions included; bad images fail early."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from flux_dist.config import LimitsConfig, RequestConfig, load_config
from flux_dist.engine import Engine
from flux_dist.errors import FluxDistError
from flux_dist.images import read_images
from flux_dist.models.flux2 import FLUX2_DEV_TEACACHE
from flux_dist.models.flux2 import pipeline as flux2_pipeline
from flux_dist.models.presets import build_preset, to_diffusers_pipeline
from flux_dist.parallel.sharding import ShardPlan
from flux_dist.validation import check_request, output_size, reference_size

from dist_utils import png, run_distributed, single, torchrun

REL = 1e-5


def picture(w: int, h: int, seed: int) -> Image.Image:
    """A smooth RGB test image (gradients and a seeded tint), like a photo more than noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    tint = np.random.default_rng(seed).uniform(0.2, 1.0, 3)
    a = np.stack([x / w * tint[0], y / h * tint[1], (np.sin(x / 7 + y / 5) * 0.5 + 0.5) * tint[2]], -1)
    return Image.fromarray((a * 255).astype(np.uint8))


# Two references, one not square: the output takes the first one's size (96x64: 24 target tokens; 40
# reference tokens). One reference with an explicit, uneven output size (80x48: 15 target tokens, 24
# reference tokens, 13 text tokens): shards that mix target, reference and padding tokens.
TWO = dict(images=(("96x64", 1), ("64x64", 2)), max_sequence_length=16)
ONE = dict(images=(("64x96", 3),), height=80, width=48, max_sequence_length=13)
# Over 8 steps this skips 3 of the 6 free steps of each cached job below, every accumulated value at least 0.4
# from the threshold (in the polynomial's units), so a layout's float64 sums in another order cannot flip one.
TEACACHE = {"mode": "teacache", "threshold": 3.5, "coefficients": list(FLUX2_DEV_TEACACHE)}


def request(shape: dict) -> dict:
    imgs = [picture(*map(int, wh.split("x")), seed) for wh, seed in shape["images"]]
    return {**shape, "images": imgs}


def make_cfg(model: str, shape: dict, u: int = 1, r: int = 1, c: int = 1, cache: dict | None = None):
    cfg = load_config(None, {"model.model": model, "parallel.ulysses": u, "parallel.ring": r,
                             "parallel.cfg_parallel": c})
    cfg.request = dataclasses.replace(cfg.request, prompt="the fox from the picture, in the snow",
                                      steps=8 if cache else 4, guidance=4.0, seed=7, **request(shape))
    if cache:
        cfg.cache = dataclasses.replace(cfg.cache, **cache)
    return cfg


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def decisions(res) -> list[bool]:
    return [d["skip"] for d in res.metrics["cache"]["decisions"]] if "cache" in res.metrics else []


# -- 1 process against diffusers --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["flux2-tiny", "flux2-klein-tiny"])
@pytest.mark.parametrize("shape", [TWO, ONE], ids=["two-refs", "one-ref-uneven"])
def test_one_process_equals_diffusers(model, shape):
    cfg = make_cfg(model, shape)
    req = cfg.request
    eng = Engine(cfg)
    ours = eng.generate(req)
    pipe = to_diffusers_pipeline(build_preset(model, seed=cfg.model.seed))
    kw = dict(prompt=req.prompt, image=list(req.images), height=req.height, width=req.width,
              num_inference_steps=req.steps, guidance_scale=req.guidance, max_sequence_length=req.max_sequence_length)
    lat = pipe(**kw, generator=torch.Generator("cpu").manual_seed(req.seed), output_type="latent").images
    height, width = ours.metrics["request"]["height"], ours.metrics["request"]["width"]
    mine = ours.latents
    if lat.ndim == 4:  # Flux2KleinPipeline returns the VAE's input for output_type="latent"
        ids = eng.model.noise(height, width, req.seed, torch.float32)[1]
        mine = flux2_pipeline.vae_latents(eng.c, ours.latents, ids)
    assert mine.shape == lat.shape
    assert rel(mine, lat) < REL
    img = pipe(**kw, generator=torch.Generator("cpu").manual_seed(req.seed), output_type="np").images[0]
    pixels = np.asarray(ours.image, dtype=np.float64) / 255.0
    assert pixels.shape == img.shape == (height, width, 3)
    assert np.abs(pixels - img).max() <= 1 / 255 + 1e-6
    if shape is TWO:  # no size given: the first reference's
        assert (width, height) == (96, 64)
    m = ours.metrics
    assert m["tokens"]["image"] == height * width // 256 and m["tokens"]["reference"] == sum(
        w * h // 256 for w, h in m["request"]["references"])
    # the references change the image (they are not ignored)
    plain = eng.generate(dataclasses.replace(req, images=[], height=height, width=width), decode=False)
    assert rel(plain.latents, ours.latents) > 1e-2


# -- every layout against 1 process -----------------------------------------------------------------------------
_ONE_PROCESS: dict = {}


def one_process(model: str, shape: dict, cache: dict | None):
    key = (model, id(shape), bool(cache))
    if key not in _ONE_PROCESS:
        eng = Engine(make_cfg(model, shape, cache=cache))
        res = eng.generate(eng.cfg.request, decode=False)
        _ONE_PROCESS[key] = (res.latents, decisions(res))
    return _ONE_PROCESS[key]


def _layouts(rank: int, world: int, jobs):
    out = []
    for model, u, r, c, shape, cache in jobs:
        eng = Engine(make_cfg(model, shape, u, r, c, cache))
        res = eng.generate(eng.cfg.request, decode=False)
        out.append((res.latents, decisions(res)))
    return out


JOBS_2 = [
    ("flux2-tiny", 1, 2, 1, TWO, None), ("flux2-tiny", 2, 1, 1, ONE, None),
    ("flux2-tiny", 1, 2, 1, ONE, TEACACHE), ("flux2-tiny", 2, 1, 1, TWO, TEACACHE),
    ("flux2-klein-tiny", 1, 1, 2, ONE, None),
]
JOBS_4 = [
    ("flux2-tiny", 2, 2, 1, ONE, TEACACHE), ("flux2-klein-tiny", 2, 1, 2, TWO, None),
    ("flux2-klein-tiny", 2, 1, 2, ONE, TEACACHE),
]


@pytest.mark.parametrize("world,jobs", [(2, JOBS_2), (4, JOBS_4)], ids=["world2", "world4"])
def test_layouts_equal_one_process(world, jobs):
    """ulysses 2, ring 2, ulysses 2 x ring 2, cfg 2 (x ulysses 2): the 1-process latents, and with TeaCache the
    1-process decisions (which skip some steps), on every rank."""
    results = run_distributed(_layouts, world, jobs, timeout=600)
    for job_no, (model, u, r, c, shape, cache) in enumerate(jobs):
        want, want_skips = one_process(model, shape, cache)
        if cache:
            assert any(want_skips) and not all(want_skips), want_skips
        for rank_out in results:
            lat, skips = rank_out[job_no]
            assert rel(lat, want) < REL, (model, u, r, c, rel(lat, want))
            assert skips == want_skips, (model, u, r, c)
            assert torch.equal(lat, results[0][job_no][0])


def test_compiled_with_references_equals_eager_and_never_recompiles():
    """Regional compile with references and TeaCache: eager's decisions and latents; a second request of the same
    shapes (other prompt, seed and reference pixels) compiles nothing new."""
    import torch._dynamo

    eager = Engine(make_cfg("flux2-tiny", ONE, cache=TEACACHE))
    want = eager.generate(eager.cfg.request, decode=False)
    torch._dynamo.reset()
    cfg = make_cfg("flux2-tiny", ONE, cache=TEACACHE)
    cfg.model = dataclasses.replace(cfg.model, compile=True, compile_backend="aot_eager")
    eng = Engine(cfg)
    got = eng.generate(cfg.request, decode=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        eng.generate(dataclasses.replace(cfg.request, prompt="a cat", seed=9, images=[picture(64, 96, 11)]),
                     decode=False)
    assert decisions(got) == decisions(want) and any(decisions(got))
    assert rel(got.latents, want.latents) < REL


def test_shard_plan_keeps_targets_a_prefix():
    """[target, references, padding] as one stream: each shard's target tokens lead it."""
    plan = ShardPlan(txt_len=13, img_len=15, sp=4, ulysses=2, ref_len=24)  # 39 image-stream tokens -> 10 a shard
    assert plan.img_loc == 10 and plan.padded
    assert [plan.n_target(s) for s in range(4)] == [10, 5, 0, 0]
    assert plan.target_mask(1).flatten().tolist() == [True] * 5 + [False] * 5
    assert int(plan.valid(3)[plan.txt_loc:].sum()) == 9  # the last shard's padding
    assert ShardPlan(13, 15, 4).target_mask(0) is None  # no references: every real token is a target
    x = torch.arange(39.0).view(1, 39, 1)
    assert plan.shard(x, "img", 1).flatten().tolist() == list(range(10, 20))


# -- request checks (torch-free) and the CLI --------------------------------------------------------------------
def test_reference_size_and_default_output_size_are_diffusers():
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    for w, h in ((96, 64), (1500, 1000), (4000, 500), (1024, 1024), (1100, 70)):
        img = Image.new("RGB", (w, h))
        if w * h > 1024 * 1024:
            img = Flux2ImageProcessor._resize_to_target_area(img, 1024 * 1024)
        assert reference_size(w, h, 16) == (img.size[0] // 16 * 16, img.size[1] // 16 * 16)
    req = RequestConfig(prompt="x", images=[picture(1500, 1000, 0)])
    assert output_size(req) == (832, 1248)
    assert output_size(dataclasses.replace(req, height=64)) == (64, 1248)
    assert output_size(RequestConfig(prompt="x")) == (64, 64)
    arr = np.zeros((80, 96, 3), np.uint8)  # decoded arrays (what a server broadcasts) are sized HxWxC
    assert output_size(RequestConfig(prompt="x", images=[arr])) == (80, 96)


@pytest.mark.parametrize("images,match", [
    ([picture(64, 48, 0)], "at least 64 px"),
    ([picture(600, 64, 0)], "aspect ratio"),
    ([picture(64, 64, 0)] * 3, "more than the limit of 2"),
    (["a.png"], "is a path"),
    ([np.zeros((64, 64), np.uint8)], "uint8 HxWxC"),
    ([picture(200, 200, 0)], "over the limit of 10000"),
])
def test_bad_reference_images(images, match):
    lim = LimitsConfig(max_references=2, max_reference_pixels=10_000)
    with pytest.raises(FluxDistError, match=match):
        check_request(RequestConfig(prompt="x", images=images), lim)


def test_read_images(tmp_path):
    lim = LimitsConfig()
    picture(96, 64, 1).save(tmp_path / "a.png")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:200])
    req = read_images(RequestConfig(prompt="x", images=[str(tmp_path / "a.png")]), lim)
    assert req.images[0].size == (96, 64) and np.array_equal(np.asarray(req.images[0]), np.asarray(picture(96, 64, 1)))
    for name, match in (("missing.png", "not found"), ("text.png", "cannot read"), ("cut.png", "cannot read")):
        with pytest.raises(FluxDistError, match=match):
            read_images(RequestConfig(prompt="x", images=[str(tmp_path / name)]), lim)
    with pytest.raises(FluxDistError, match="over the limit"):  # from the header, before decoding
        read_images(RequestConfig(prompt="x", images=[str(tmp_path / "a.png")]),
                    LimitsConfig(max_reference_pixels=1000))


CLI = ["--model", "flux2-tiny", "--prompt", "a fox", "--steps", "2", "--max-sequence-length", "16"]


def test_cli_bad_images_fail_every_rank_before_the_load(tmp_path):
    picture(64, 64, 0).save(tmp_path / "ok.png")
    picture(64, 40, 0).save(tmp_path / "small.png")
    (tmp_path / "bad.png").write_text("not an image")
    cases = [
        (["--image", str(tmp_path / "missing.png")], "reference image not found"),
        (["--image", str(tmp_path / "bad.png")], "cannot read reference image"),
        (["--image", str(tmp_path / "small.png")], "at least 64 px"),
        (["--image", str(tmp_path / "ok.png")] * 2 + ["--max-references", "1"], "more than the limit of 1"),
    ]
    for args, match in cases:
        t0 = time.time()
        r = torchrun(2, "generate", *CLI, "--ulysses", "2", *args, "--output", "/dev/null", timeout=120)
        assert r.returncode != 0 and time.time() - t0 < 120
        for rank in (0, 1):
            assert f"[rank{rank}] flux-dist: error:" in r.stderr, r.stderr[-3000:]
        assert r.stderr.count(match) >= 2, r.stderr[-3000:]
        assert "model flux2-tiny" not in r.stderr  # refused before the model was loaded


def test_cli_image_flags_and_batch_images(tmp_path):
    """``--image`` twice gives the engine's image at the first reference's size; a batch line's ``images``
    too, and a line with a missing image is skipped (exit 3) while the others run."""
    picture(96, 64, 1).save(tmp_path / "a.png")
    picture(64, 64, 2).save(tmp_path / "b.png")
    r = single("generate", *CLI, "--image", str(tmp_path / "a.png"), "--image", str(tmp_path / "b.png"),
               "--output", str(tmp_path / "cli.png"), "--metrics", str(tmp_path / "cli.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "cli.json").read_text())
    assert m["request"]["references"] == [[96, 64], [64, 64]] and m["config"]["request"]["images"][0].endswith("a.png")
    cfg = load_config(None, {"model.model": "flux2-tiny"})
    req = dataclasses.replace(cfg.request, prompt="a fox", steps=2, max_sequence_length=16,
                              images=[str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    want = np.asarray(Engine(cfg).generate(read_images(req, cfg.limits)).image, dtype=np.int16)
    assert want.shape == (64, 96, 3) and np.abs(png(tmp_path / "cli.png") - want).max() <= 1

    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(json.dumps(x) for x in (
        {"prompt": "a fox", "images": [str(tmp_path / "a.png"), str(tmp_path / "b.png")]},
        {"prompt": "a fox", "images": [str(tmp_path / "nope.png")]},
        {"prompt": "a fox", "images": "a.png"},
    )))
    r = single("generate", "--model", "flux2-tiny", "--steps", "2", "--max-sequence-length", "16",
               "--prompts-file", str(lines), "--output-dir", str(tmp_path / "batch"))
    assert r.returncode == 3, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "batch" / "manifest.json").read_text())
    assert [(e["line"], e["width"], e["height"]) for e in manifest["images"]] == [(1, 96, 64)]
    assert np.abs(png(tmp_path / "batch" / "00000.png") - want).max() <= 1
    errors = {e["line"]: e["error"] for e in manifest["errors"]}
    assert "not found" in errors[2] and "list of image file paths" in errors[3]
