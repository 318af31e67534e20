"""Regional compile: fullgraph blocks (collectives inside) give the eager result and never recompile."""

from __future__ import annotations

import dataclasses

import torch
import torch._dynamo

from flux_dist.config import load_config
from flux_dist.engine import Engine

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


def test_step_cache_causes_no_recompiles():
    """TeaCache decides outside the compiled blocks: skipping steps must not retrace anything."""
    torch._dynamo.reset()
    cfg = _cfg(steps=6)
    cfg.cache = dataclasses.replace(cfg.cache, mode="teacache", threshold=2.0,
                                    coefficients=[1.04582360e02, -6.87605554e00, -8.61659379e-02, 5.37600252e-02])
    eng = Engine(cfg)
    first = eng.generate(cfg.request, decode=False)
    assert first.metrics["cache_skipped_steps"] > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = eng.generate(dataclasses.replace(cfg.request, seed=9), decode=False)
    assert second.metrics["cache_skipped_steps"] > 0
