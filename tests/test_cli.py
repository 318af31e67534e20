"""The CLI for real: torchrun with 2 gloo ranks, bad input on every rank, --model PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--height", "64", "--width", "64", "--steps", "2", "--max-sequence-length", "16"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(free_port()), "-m", "flux_dist", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def single(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flux_dist", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _png(p: Path) -> np.ndarray:
    return np.asarray(Image.open(p), dtype=np.int16)


def test_torchrun_two_ranks_matches_one_process(tmp_path):
    two = torchrun(2, "generate", "--config", "configs/tiny.yaml", *SMALL, "--output", str(tmp_path / "u2.png"),
                   "--metrics", str(tmp_path / "u2.json"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = single("generate", "--config", "configs/tiny.yaml", *SMALL, "--ulysses", "1",
                 "--output", str(tmp_path / "one.png"), "--metrics", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _png(tmp_path / "u2.png"), _png(tmp_path / "one.png")
    assert a.shape == (64, 64, 3)
    assert np.abs(a - b).max() <= 1
    m = json.loads((tmp_path / "u2.json").read_text())
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
def test_bad_input_fails_every_rank_fast(args, match):
    t0 = time.time()
    r = torchrun(2, "generate", "--config", "configs/tiny.yaml", *SMALL, *args, "--output", "/dev/null",
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
    assert np.array_equal(_png(tmp_path / "a.png"), _png(tmp_path / "b.png"))
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
