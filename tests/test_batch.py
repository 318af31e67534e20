"""Batch mode for real: torchrun, 2 ranks, one load, every good line an image, bad lines skipped."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from server_utils import ROOT, SMALL, env, read_png

from flux_dist.batch import EXIT_SOME_FAILED, parse_lines

from dist_utils import free_port


def test_parse_lines_text_and_jsonl():
    txt = parse_lines("a fox\n\n# comment\n  a lighthouse  \n", jsonl=False, true_cfg=False)
    assert txt == [(1, {"prompt": "a fox"}), (4, {"prompt": "a lighthouse"})]
    lines = [
        '{"prompt": "a", "seed": 3, "size": "32x48", "steps": 2, "guidance": 2.5}',
        '{"prompt": "b", "height": 16, "width": 32, "num_inference_steps": 1, "guidance_scale": 1}',
        "{broken",
        '{"prompt": ""}',
        '{"prompt": "c", "colour": "red"}',
        '["a list"]',
        '{"prompt": "d", "negative_prompt": "x"}',
    ]
    out = parse_lines("\n".join(lines), jsonl=True, true_cfg=False)
    assert out[0] == (1, {"prompt": "a", "seed": 3, "width": 32, "height": 48, "steps": 2, "guidance": 2.5})
    assert out[1] == (2, {"prompt": "b", "height": 16, "width": 32, "steps": 1, "guidance": 1.0})
    errors = [e for _, e in out[2:]]
    assert all(isinstance(e, str) for e in errors)
    assert "not valid JSON" in errors[0] and "'prompt' is required" in errors[1]
    assert "unknown field" in errors[2] and "JSON object" in errors[3] and "true CFG" in errors[4]
    assert parse_lines('{"prompt": "d", "negative_prompt": "x"}', jsonl=True, true_cfg=True)[0][1] == {
        "prompt": "d", "negative_prompt": "x"}


def test_batch_mode_writes_every_image_and_the_manifest(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"prompt": "a red fox standing in fresh snow at dawn", "seed": 42}),
        json.dumps({"prompt": "a lighthouse", "size": "60x64"}),  # bad: not a multiple of 16
        "{oops",  # bad: not JSON
        json.dumps({"prompt": "a lighthouse", "seed": 5, "size": "32x64", "steps": 1}),
        "",
        json.dumps({"prompt": "a red fox standing in fresh snow at dawn", "seed": 43}),
    ]) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "flux_dist", "generate", "--config", "configs/tiny.yaml", *SMALL, "--prompts-file", str(prompts),
           "--output-dir", str(out), "--output", str(tmp_path / "single.png"), "--metrics", ""]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    # Some lines were skipped: the others were written, and every rank's exit code says so
    # (torchrun itself then exits 1 and names the workers' code).
    assert r.returncode != 0 and f"exitcode  : {EXIT_SOME_FAILED}" in r.stderr, r.stderr[-3000:]
    assert "line 2 skipped" in r.stderr and "multiple of 16" in r.stderr
    assert "line 3 skipped" in r.stderr and "not valid JSON" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [i["line"] for i in m["images"]] == [1, 4, 6]
    assert [e["line"] for e in m["errors"]] == [2, 3]
    for item in m["images"]:
        img = read_png(out / item["file"])
        assert img.shape == (item["height"], item["width"], 3)
        assert item["time_s"] > 0 and item["prompt"]
    assert (m["images"][1]["width"], m["images"][1]["height"], m["images"][1]["steps"]) == (32, 64, 1)
    assert [i["seed"] for i in m["images"]] == [42, 5, 43]

    a, b = read_png(out / m["images"][0]["file"]), read_png(out / m["images"][2]["file"])
    assert np.abs(a - b).max() > 10  # seeds 42 and 43: two images, not one written twice
