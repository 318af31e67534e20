"""TeaCache / First-Block Cache: one decision on every rank, equal to the 1-process decisions."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from flux_dist.cache import StepCache, fit_coefficients
from flux_dist.config import load_config
from flux_dist.engine import Engine
from flux_dist.errors import FluxDistError
from flux_dist.models.flux2 import FLUX2_DEV_TEACACHE

from dist_utils import run_distributed

REL = 1e-5
SHAPE = dict(height=80, width=48, max_sequence_length=13)  # uneven image and text on 2 and 4 ranks
# Random tiny weights change a lot per step; these thresholds skip about a third of 10 steps.
TEACACHE = {"cache.mode": "teacache", "cache.threshold": 2.0, "cache.coefficients": list(FLUX2_DEV_TEACACHE)}
FBCACHE = {"cache.mode": "fbcache", "cache.threshold": 0.9}


def make(model: str, cache: dict, u: int = 1, r: int = 1, c: int = 1, steps: int = 10):
    cfg = load_config(None, {"model.model": model, "parallel.ulysses": u, "parallel.ring": r,
                             "parallel.cfg_parallel": c, **cache})
    cfg.request = dataclasses.replace(cfg.request, prompt="a red fox in the snow", steps=steps, seed=3, **SHAPE)
    return cfg


def run(cfg):
    eng = Engine(cfg)
    res = eng.generate(cfg.request, decode=False)
    skips = [d["skip"] for d in res.metrics["cache"]["decisions"]] if "cache" in res.metrics else []
    return res.latents, skips, res.metrics


def _layouts(rank, world, jobs, perturb_rank=None):
    if perturb_rank is not None and rank == perturb_rank:
        orig = StepCache._sums

        def skewed(self, cur, prev):  # this rank's local signal is off: the decision must still be shared
            local = orig(self, cur, prev)
            return local * local.new_tensor([1.7, 1.0])

        StepCache._sums = skewed
    out = []
    for model, cache, u, r, c in jobs:
        lat, skips, _ = run(make(model, cache, u, r, c))
        out.append((lat, skips))
    return out


_REF: dict = {}


def ref(model, cache):
    key = (model, tuple(sorted((k, str(v)) for k, v in cache.items())))
    if key not in _REF:
        _REF[key] = run(make(model, cache))[:2]
    return _REF[key]


JOBS = {
    2: [("flux2-tiny", TEACACHE, 2, 1, 1), ("flux2-tiny", TEACACHE, 1, 2, 1),
        ("flux2-klein-tiny", TEACACHE, 1, 1, 2), ("flux2-tiny", FBCACHE, 2, 1, 1),
        ("flux2-klein-tiny", FBCACHE, 1, 1, 2)],
    4: [("flux2-tiny", TEACACHE, 2, 2, 1), ("flux2-klein-tiny", TEACACHE, 2, 1, 2),
        ("flux2-klein-tiny", FBCACHE, 1, 2, 2)],
}


@pytest.mark.parametrize("world", [2, 4])
def test_decisions_and_latents_equal_one_process(world):
    jobs = JOBS[world]
    results = run_distributed(_layouts, world, jobs, timeout=600)
    for j, (model, cache, *_dims) in enumerate(jobs):
        want_lat, want_skips = ref(model, cache)
        assert any(want_skips), (model, cache, "the threshold must skip something")
        for rank_out in results:
            lat, skips = rank_out[j]
            assert skips == want_skips, (jobs[j], skips, want_skips)
            assert ((lat - want_lat).norm() / want_lat.norm()).item() < REL, jobs[j]


def test_perturbed_rank_still_shares_one_decision():
    jobs = [("flux2-tiny", TEACACHE, 2, 1, 1), ("flux2-klein-tiny", TEACACHE, 1, 1, 2)]
    results = run_distributed(_layouts, 2, jobs, 1)
    for j in range(len(jobs)):
        assert results[0][j][1] == results[1][j][1]  # every rank took the same decisions
        assert torch.equal(results[0][j][0], results[1][j][0])


@pytest.mark.parametrize("mode", ["teacache", "fbcache"])
def test_threshold_zero_is_no_cache(mode):
    base = run(make("flux2-tiny", {}))[0]
    lat, skips, m = run(make("flux2-tiny", {"cache.mode": mode, "cache.threshold": 0.0}))
    assert not any(skips) and m["cache_skipped_steps"] == 0
    assert torch.equal(lat, base)


def test_warmup_and_cutoff_are_always_computed():
    _, skips, m = run(make("flux2-tiny", {**TEACACHE, "cache.threshold": 1e9, "cache.warmup_steps": 3,
                                          "cache.cutoff_steps": 2}))
    assert skips == [False] * 3 + [True] * 5 + [False] * 2
    assert m["cache"]["skipped_steps"] == [3, 4, 5, 6, 7]


def test_fit_recovers_a_known_polynomial():
    true = [120.0, -7.5, 0.3, 0.05]
    x = np.linspace(0.01, 0.4, 60)
    y = np.polyval(true, x)
    got = fit_coefficients(list(x), list(y), degree=3)
    assert np.allclose(got, true, rtol=1e-6, atol=1e-8)
    with pytest.raises(FluxDistError, match="more than"):
        fit_coefficients([0.1, 0.2], [1.0, 2.0], degree=4)


def test_bad_cache_config():
    with pytest.raises(FluxDistError, match="unknown cache mode"):
        Engine(make("flux2-tiny", {"cache.mode": "magic"}))
    with pytest.raises(FluxDistError, match="no published TeaCache coefficients"):
        Engine(make("flux2-klein-tiny", {"cache.mode": "teacache"}))
    with pytest.raises(FluxDistError, match="comma-separated"):
        Engine(make("flux2-tiny", {"cache.mode": "teacache", "cache.coefficients": "nope"}))


def test_calibrate_cache_cli_writes_coefficients_that_generate_reads(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na lighthouse at dusk\n")
    out = tmp_path / "klein.yaml"
    common = ["--model", "flux2-klein-tiny", "--height", "64", "--width", "64", "--max-sequence-length", "16"]
    r = subprocess.run([sys.executable, "-m", "flux_dist", "calibrate-cache", *common, "--steps", "8",
                        "--prompts-file", str(prompts), "--coefficients-file", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = yaml.safe_load(out.read_text())
    assert data["pairs"] == 2 * 7 and len(data["coefficients"]) == 5
    r = subprocess.run([sys.executable, "-m", "flux_dist", "generate", *common, "--prompt", "a cat", "--steps", "4",
                        "--cache", "teacache", "--cache-coefficients", str(out), "--output", str(tmp_path / "a.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
