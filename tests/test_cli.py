"""The CLI for real: torchrun with 2 gloo ranks, bad input on every rank, --model PATH."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import yaml

from dist_utils import SMALL, TINY, png, single, torchrun


def test_torchrun_two_ranks_matches_one_process(tmp_path, torchrun_ref):
    one = single("generate", *TINY, "--ulysses", "1", "--output", str(tmp_path / "one.png"),
                 "--metrics", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = png(torchrun_ref), png(tmp_path / "one.png")
    assert a.shape == (64, 64, 3)
    assert np.abs(a - b).max() <= 1
    m = json.loads(torchrun_ref.with_suffix(".json").read_text())
    assert m["layout"] == {"world_size": 2, "cfg": 1, "ring": 1, "ulysses": 2}
    assert len(m["step_ms"]) == 2 and m["denoise_s"] > 0 and m["peak_memory_gib"] > 0
    for k in ("text_encode_s", "decode_s", "tokens"):
        assert k in m


@pytest.mark.parametrize("args,match", [
    (["--height", "120"], "multiple of 16"),
    (["--prompt", ""], "prompt is required"),
    (["--ulysses", "4"], "world size"),
    (["--ulysses", "1", "--cfg-parallel", "2"], "guidance-distilled"),
    (["--model", "flux2-nope"], "unknown model"),
    (["--model", "/no/such/dir"], "cannot load model directory"),
])
def test_bad_input_fails_every_rank_fast(args, match, tmp_path):
    t0 = time.time()
    r = torchrun(2, "generate", "--config", "configs/tiny.yaml", *SMALL, *args, "--output", str(tmp_path / "x.png"),
                 timeout=120)
    assert r.returncode != 0
    assert time.time() - t0 < 120
    # both ranks say why (their lines may interleave in the shared pipe)
    for rank in (0, 1):
        assert f"[rank{rank}] flux-dist: error:" in r.stderr, r.stderr[-3000:]
    assert r.stderr.count(match) >= 2, r.stderr[-3000:]


def test_model_path_loads_local_directory(tmp_path):
    d = tmp_path / "flux2-klein-tiny"
    r = single("save-preset", "flux2-klein-tiny", str(d))
    assert r.returncode == 0, r.stderr[-2000:]
    a = single("generate", "--model", str(d), "--prompt", "a cat", *SMALL, "--output", str(tmp_path / "a.png"))
    b = single("generate", "--model", "flux2-klein-tiny", "--prompt", "a cat", *SMALL,
               "--output", str(tmp_path / "b.png"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    assert np.array_equal(png(tmp_path / "a.png"), png(tmp_path / "b.png"))
    bad = tmp_path / "empty"
    bad.mkdir()
    r = single("generate", "--model", str(bad), "--prompt", "a cat", *SMALL)
    assert r.returncode == 2 and "model_index.json" in r.stderr


def test_config_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  modle: flux2-tiny\n")
    r = single("generate", "--config", str(p), "--prompt", "x")
    assert r.returncode == 2 and "unknown config key 'model.modle'" in r.stderr
    r = single("generate", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_every_shipped_config_loads_and_names_known_choices():
    """configs/*.yaml parse into the dataclasses, and their enum-like values are ones the code accepts."""
    from pathlib import Path

    from flux_dist.config import load_config
    from flux_dist.parallel.kernels import BACKENDS
    from flux_dist.quant import MODES

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        data = yaml.safe_load(f.read_text())
        if "applications" in data:  # a Ray Serve config: each application's run config, as its replicas get it
            from flux_dist.serve_ray import ServeArgs, run_config

            configs = [run_config(ServeArgs.model_validate(app["args"])) for app in data["applications"]]
        else:
            configs = [load_config(str(f), {})]
        for c in configs:
            assert c.model.quant in MODES and c.model.attention in BACKENDS, f
            assert c.model.dtype in ("float32", "bfloat16", "float16"), f


@pytest.mark.parametrize("bad, match", [
    ({"downscale_delay_s": -1}, "Ray Serve args: downscale_delay_s: Input should be greater than or equal to 0"),
    ({"look_back_period_s": 2}, "Ray Serve args: look_back_period_s: Input should be greater than 10"),
    ({"max_replicas": 0}, "Ray Serve args: max_replicas: Input should be greater than or equal to 1"),
    ({"upscale_delay": 1}, "Ray Serve args: upscale_delay: Extra inputs are not permitted"),
])
def test_ray_serve_args_refused_before_any_replica_starts(bad, match):
    """A Serve config's bad app args: one clear error naming the arg, from ``build`` (before Ray is asked for
    anything)."""
    from flux_dist.errors import FluxDistError
    from flux_dist.serve_ray import build

    with pytest.raises(FluxDistError, match=match):
        build({"config": "configs/tiny.yaml", **bad})
