"""Regional compile: fullgraph blocks (collectives inside) and the step regions outside them give the eager
result and never recompile."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from flux_dist.config import load_config
from flux_dist.engine import Engine
from flux_dist.models.flux2 import FLUX2_DEV_TEACACHE

from dist_utils import run_distributed


def _cfg(u=1, r=1, compile_=True, backend="aot_eager", **req):
    c = load_config(None, {"model.model": "flux2-tiny", "model.compile": compile_, "model.compile_backend": backend,
                           "parallel.ulysses": u, "parallel.ring": r})
    c.request = dataclasses.replace(c.request, **{"prompt": "a fox", "height": 64, "width": 64, "steps": 2,
                                                  "max_sequence_length": 16, **req})
    return c


def _run(rank, world, layouts):
    out = []
    for u, r in layouts:
        torch._dynamo.reset()
        eng = Engine(_cfg(u, r))
        first = eng.generate(eng.cfg.request, decode=False).latents
        with torch._dynamo.config.patch(error_on_recompile=True):  # same shape: no recompile, ever
            second = eng.generate(dataclasses.replace(eng.cfg.request, seed=5, prompt="a cat"), decode=False).latents
        out.append((first, second))
    return out


def test_compiled_equals_eager_and_no_recompiles():
    eager = Engine(_cfg(compile_=False))
    want = eager.generate(eager.cfg.request, decode=False).latents
    want2 = eager.generate(dataclasses.replace(eager.cfg.request, seed=5, prompt="a cat"), decode=False).latents
    (got, got2), = _run(0, 1, [(1, 1)])
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert ((got2 - want2).norm() / want2.norm()).item() < 1e-5


def test_compiled_collectives_under_ulysses_and_ring():
    eager = Engine(_cfg(compile_=False))
    want = eager.generate(eager.cfg.request, decode=False).latents
    for rank_out in run_distributed(_run, 2, [(2, 1), (1, 2)], timeout=600):
        for got, _ in rank_out:
            assert ((got - want).norm() / want.norm()).item() < 1e-5


# Thresholds that skip 3 of 6 steps of the tiny 64x64 request (two of them in a row), far from the edge.
TEACACHE = {"mode": "teacache", "threshold": 4.0, "coefficients": list(FLUX2_DEV_TEACACHE)}
FBCACHE = {"mode": "fbcache", "threshold": 0.9}
REGIONS = {"teacache": 6, "fbcache": 5}  # fbcache takes no TeaCache signal


def _cached(compile_: bool, cache: dict, u: int = 1, **req):
    cfg = _cfg(u, compile_=compile_, steps=6, **req)
    cfg.cache = dataclasses.replace(cfg.cache, **cache)
    return cfg


def _decisions(res) -> list[tuple[int, bool, str]]:
    """Per step: skipped?, and the shared ratio to the bit (``float.hex``; step 0 has none: nan)."""
    return [(d["step"], d["skip"], d["rel"].hex()) for d in res.metrics["cache"]["decisions"]]


@pytest.mark.parametrize("cache", [TEACACHE, FBCACHE], ids=["teacache", "fbcache"])
def test_cached_steps_compiled_equal_eager_and_never_recompile(cache):
    """Skipped steps run only the compiled step regions: eager's decisions and latents, and one graph per
    region and block type serves every step of two requests (timesteps, sigmas, residuals are tensors)."""
    reqs = [{}, {"seed": 9, "prompt": "a cat"}]
    eager = Engine(_cached(False, cache))
    want = [eager.generate(dataclasses.replace(eager.cfg.request, **r), decode=False) for r in reqs]
    torch._dynamo.reset()
    counters.clear()
    eng = Engine(_cached(True, cache))
    with torch._dynamo.config.patch(error_on_recompile=True):  # not within a request, nor across
        got = [eng.generate(dataclasses.replace(eng.cfg.request, **r), decode=False) for r in reqs]
    assert counters["stats"]["unique_graphs"] == REGIONS[cache["mode"]] + 2  # + double and single block
    for g, w in zip(got, want, strict=True):
        assert w.metrics["cache_skipped_steps"] >= 2
        assert g.metrics["cache"]["skipped_steps"] == w.metrics["cache"]["skipped_steps"]
        assert ((g.latents - w.latents).norm() / w.latents.norm()).item() < 1e-5


def _cached_sp(rank, world, cache):
    eng = Engine(_cached(True, cache, u=world, height=80, width=48))
    res = eng.generate(eng.cfg.request, decode=False)
    return res.latents, _decisions(res)


def test_compiled_cache_decision_is_shared_under_ulysses():
    """Padded shards (15 image tokens on 2 ranks): compiled sums, one decision, bit-identical on both ranks."""
    eager = Engine(_cached(False, TEACACHE, height=80, width=48))
    want = eager.generate(eager.cfg.request, decode=False)
    (lat0, dec0), (lat1, dec1) = run_distributed(_cached_sp, 2, TEACACHE, timeout=600)
    assert dec0 == dec1  # the same ratios, to the bit, and so the same skips
    assert [s for _, s, _ in dec0] == [s for _, s, _ in _decisions(want)] and any(s for _, s, _ in dec0)
    assert ((lat0 - want.latents).norm() / want.latents.norm()).item() < 1e-5


def test_compile_cache_dir_wins_over_inductors_default(tmp_path, monkeypatch):
    """Inductor writes its default dir into the variable on first use; an explicit flag must still win."""
    import os

    from flux_dist.compile import enable_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_default")
    enable_cache(str(tmp_path / "cc"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc") and (tmp_path / "cc").is_dir()
