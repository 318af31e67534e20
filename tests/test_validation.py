"""Issue 12, items 4-8 and 10: every bad input refused before any work, as one line; per-shape caches bounded."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
import zlib

import pytest
import torch

from flux_dist.config import MAX_SEED, RequestConfig, load_config
from flux_dist.errors import FluxDistError
from flux_dist.server.schema import ServeOptions
from flux_dist.validation import check_outputs, check_request

from dist_utils import ROOT, SMALL, TINY, cli_env, single, torchrun

LOADED = "INFO model "  # rank 0 logs this once the model is loaded


# -- item 8: types and ranges checked when the config is built -----------------------------------
@pytest.mark.parametrize("overrides,match", [
    ({"request.steps": True}, "config key 'request.steps' must be an integer, got True"),
    ({"request.height": "64"}, "config key 'request.height' must be an integer or null, got '64'"),
    ({"dist.timeout_s": "soon"}, "config key 'dist.timeout_s' must be a finite number, got 'soon'"),
    ({"dist.timeout_s": -5}, "config key 'dist.timeout_s' must be > 0"),
    ({"model.device": "tpu"}, "unknown device 'tpu' for config key 'model.device'"),
    ({"model.compile": "yes"}, "config key 'model.compile' must be true or false"),
    ({"output.output": 5}, "config key 'output.output' must be a string, got 5"),
    ({"request.seed": 2**64}, "config key 'request.seed' must be in 0..9223372036854775807"),
    ({"parallel.ulysses": 0}, "config key 'parallel.ulysses' must be >= 1"),
    ({"cache.coefficients": [1, "a"]}, "config key 'cache.coefficients' must be a list of numbers"),
    ({"cache.mode": "magic"}, "unknown cache mode 'magic'"),
])
def test_config_types_and_ranges(overrides, match):
    with pytest.raises(FluxDistError, match=match.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides)


def test_config_accepts_what_it_should():
    c = load_config(None, {"request.guidance": 4, "cache.coefficients": [1, 2.5], "output.metrics": None,
                           "request.seed": MAX_SEED})
    assert c.request.guidance == 4.0 and isinstance(c.request.guidance, float)
    assert c.cache.coefficients == [1, 2.5] and c.request.seed == MAX_SEED


def test_config_file_errors(tmp_path):
    with pytest.raises(FluxDistError, match="is a directory, not a file"):
        load_config(str(tmp_path))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("request:\n  prompt: caf\xe9\n".encode("latin-1"))
    with pytest.raises(FluxDistError, match="is not UTF-8 text"):
        load_config(str(bad))
    nested = tmp_path / "out5.yaml"
    nested.write_text("output:\n  output: 5\n")
    with pytest.raises(FluxDistError, match="config key 'output.output' must be a string"):
        load_config(str(nested))
    top = tmp_path / "top5.yaml"
    top.write_text("output: 5\n")
    with pytest.raises(FluxDistError, match="config section 'output' must be a mapping"):
        load_config(str(top))


# -- item 4: output paths ---------------------------------------------------------------------
def test_check_outputs(tmp_path):
    out = load_config(None, {}).output
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (dict(output=str(tmp_path)), "is a directory, not a file"),
        (dict(output=str(tmp_path / "img")), "suffix names the image format"),
        (dict(output=str(tmp_path / "img.xyz")), "suffix names the image format"),
        (dict(output=str(a_file / "img.png")), "is a file, not a directory"),
        (dict(output=str(tmp_path / "a.png"), metrics=str(a_file / "deeper" / "m.json")), "is a file, not a directory"),
        (dict(output=str(tmp_path / "a.png"), metrics=str(tmp_path)), "--metrics .* is a directory"),
    ]
    for kw, match in cases:
        with pytest.raises(FluxDistError, match=match):
            check_outputs(dataclasses.replace(out, **kw))
    check_outputs(dataclasses.replace(out, output=str(tmp_path / "new" / "dir" / "a.PNG"), metrics=""))
    with pytest.raises(FluxDistError, match="--output-dir .* is a file, not a directory"):
        check_outputs(output_dir=str(a_file))
    check_outputs(output_dir=str(tmp_path / "batch"))


@pytest.mark.parametrize("port,timeout,match", [(99999, 600.0, "--port must be in 0..65535"),
                                                (-1, 600.0, "--port must be in 0..65535"),
                                                (8000, -5.0, "--request-timeout must be"),
                                                (8000, float("nan"), "--request-timeout must be")])
def test_check_serve(port, timeout, match):
    with pytest.raises(FluxDistError, match=match):
        ServeOptions("127.0.0.1", port, request_timeout_s=timeout).check()


# -- item 6: one seed range -------------------------------------------------------------------
def test_seed_range_checked_and_random_embeddings_never_overflow():
    req = RequestConfig(prompt="a fox")
    check_request(dataclasses.replace(req, seed=MAX_SEED), load_config(None, {}).limits)
    with pytest.raises(FluxDistError, match="seed must be an integer in 0..9223372036854775807"):
        check_request(dataclasses.replace(req, seed=MAX_SEED + 1), load_config(None, {}).limits)
    from flux_dist.models.flux2.pipeline import encode_prompt
    from flux_dist.models.presets import build_preset

    c = dataclasses.replace(build_preset("flux2-tiny"), text_encoder=None)  # the full presets' random embeddings
    for seed in (0, 7, 10**13 * 2, MAX_SEED):  # 2e13: overflowed manual_seed before
        e = encode_prompt(c, "a fox", 8, seed, torch.device("cpu"), torch.float32)
        assert e.shape[1] == 8 and torch.isfinite(e).all()
    # a seed that worked before draws the same embedding as before
    g = torch.Generator("cpu").manual_seed(7 * 1_000_003 + zlib.crc32(b"a fox"))
    old = torch.randn(1, 8, c.transformer.config.joint_attention_dim, generator=g)
    assert torch.equal(encode_prompt(c, "a fox", 8, 7, torch.device("cpu"), torch.float32), old)


# -- item 8: the CLI refuses a negative prompt on a guidance-distilled model --------------------
def test_negative_prompt_refused_on_distilled_model():
    from flux_dist.engine import Engine

    cfg = load_config(None, {"model.model": "flux2-tiny"})
    eng = Engine(cfg)
    req = dataclasses.replace(cfg.request, prompt="a fox", negative_prompt="blurry")
    with pytest.raises(FluxDistError, match="guidance-distilled"):
        eng.validate(req)


# -- items 4, 6, 7, 8 end to end: one line, exit 2, nothing loaded --------------------------------
def _yaml(tmp_path, name: str, text: str | bytes) -> str:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def test_cli_refuses_before_loading(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    png = str(tmp_path / "a.png")
    cases = [
        (["generate", *TINY, "--ulysses", "1", "--output", str(tmp_path)], "is a directory, not a file"),
        (["generate", *TINY, "--ulysses", "1", "--output", str(tmp_path / "a")], "suffix names the image format"),
        (["generate", *TINY, "--ulysses", "1", "--output", png, "--metrics", str(a_file / "m.json")],
         "is a file, not a directory"),
        (["generate", *TINY, "--ulysses", "1", "--prompts-file", str(a_file), "--output-dir", str(a_file)],
         "--output-dir .* is a file"),
        (["generate", *TINY, "--ulysses", "1", "--seed", str(2**64), "--output", png], "request.seed"),
        (["generate", *TINY, "--device", "tpu", "--output", png], "unknown device 'tpu'"),
        (["generate", "--config", _yaml(tmp_path, "s.yaml", "request:\n  steps: true\n"), "--output", png],
         "'request.steps' must be an integer, got True"),
        (["generate", "--config", _yaml(tmp_path, "h.yaml", "request:\n  height: '64'\n"), "--output", png],
         "'request.height' must be an integer or null, got '64'"),
        (["generate", "--config", _yaml(tmp_path, "t.yaml", "dist:\n  timeout_s: soon\n"), "--output", png],
         "'dist.timeout_s' must be a finite number"),
        (["generate", "--config", _yaml(tmp_path, "o.yaml", "output:\n  output: 5\n")], "'output.output' must be"),
        (["generate", "--config", _yaml(tmp_path, "l.yaml", b"request:\n  prompt: caf\xe9\n")], "not UTF-8"),
        (["generate", "--config", str(tmp_path), "--output", png], "is a directory, not a file"),
        (["serve", *TINY, "--ulysses", "1", "--port", "99999"], "--port must be in 0..65535"),
        (["serve", *TINY, "--ulysses", "1", "--port", "-1"], "--port must be in 0..65535"),
        (["serve", *TINY, "--ulysses", "1", "--request-timeout", "-5"], "--request-timeout must be"),
    ]
    for args, match in cases:
        r = single(*args, "--prompt", "a fox")
        err = r.stderr
        assert r.returncode == 2, (args, err[-2000:])
        lines = [ln for ln in err.splitlines() if "flux-dist: error:" in ln]
        assert len(lines) == 1 and re.search(match, lines[0]), (args, err[-2000:])
        assert "Traceback" not in err and LOADED not in err, (args, err[-2000:])


def test_fault_spec_and_port_in_use_refused_before_loading(tmp_path):
    env = cli_env(FLUX_DIST_FAULT="rank=1,step=two,kind=raise")
    r = subprocess.run([sys.executable, "-m", "flux_dist", "generate", *TINY, "--ulysses", "1", "--prompt", "x",
                        "--output", str(tmp_path / "a.png")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "FLUX_DIST_FAULT" in r.stderr and LOADED not in r.stderr, r.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = single("serve", *TINY, "--ulysses", "1", "--port", str(port))
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr[-2000:]
    assert LOADED not in r.stderr and "Traceback" not in r.stderr
    r = single("generate", *TINY, "--ulysses", "1", "--prompt", "x", "--negative-prompt", "blurry",
               "--output", str(tmp_path / "n.png"))
    assert r.returncode == 2 and "guidance-distilled" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_bad_output_fails_every_rank_before_loading(tmp_path):
    r = torchrun(2, "generate", *TINY, "--prompt", "x", "--output", str(tmp_path), timeout=120)
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}] flux-dist: error: --output {tmp_path} is a directory" in r.stderr, r.stderr[-3000:]
    assert LOADED not in r.stderr


def test_bad_transformer_config_names_the_file(tmp_path):
    d = tmp_path / "m"
    assert single("save-preset", "flux2-tiny", str(d)).returncode == 0
    cfg = d / "transformer" / "config.json"
    for text in ('{"num_layers": ', '{"num_layers": "x"}'):
        cfg.write_text(text)
        r = single("generate", "--model", str(d), "--prompt", "x", *SMALL, "--output", str(tmp_path / "a.png"))
        assert r.returncode == 2 and str(cfg) in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# -- item 5: a quantized directory loads in the requested dtype and says it is quantized ----------
def test_quantized_directory_runs_in_requested_dtype(tmp_path):
    d = tmp_path / "q"
    r = single("quantize", "flux2-tiny", str(d), "--quant", "fp8-emulate")  # bfloat16 by default
    assert r.returncode == 0, r.stderr[-2000:]
    m = tmp_path / "m.json"
    r = single("generate", *TINY, "--ulysses", "1", "--model", str(d), "--output", str(tmp_path / "a.png"),
               "--metrics", str(m))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(m.read_text())
    assert metrics["quant"] == "fp8-emulate" and metrics["dtype"] == "float32"
    assert "quant=fp8-emulate (12 linears," in r.stderr


def test_quantized_layers_keep_format_rest_takes_dtype(tmp_path):
    from flux_dist.models.source import load_model, quantize_model
    from flux_dist.quant import QuantLinear

    quantize_model("flux2-tiny", str(tmp_path / "q"), quant="fp8-emulate", dtype="bfloat16",
                   device=torch.device("cpu"))
    c = load_model(str(tmp_path / "q"), dtype=torch.float32, device="cpu")
    assert c.quant == "fp8-emulate"
    q = [m for m in c.transformer.modules() if isinstance(m, QuantLinear)]
    assert q and all(m.out_dtype == torch.float32 and m.weight_q.dtype == torch.float8_e4m3fn for m in q)
    assert all(p.dtype == torch.float32 for n, p in c.transformer.named_parameters() if "weight_q" not in n)
    with pytest.raises(FluxDistError, match="cannot re-quantize"):
        load_model(str(tmp_path / "q"), dtype=torch.float32, device="cpu", quant="nvfp4-emulate")


# -- item 7: ray-generate's driver prints the rank's one line ---------------------------------------
def test_ray_bad_input_is_one_line():
    ray = pytest.importorskip("ray")
    from flux_dist.launch_ray import RankFailedError, _describe, watch

    err = ray.exceptions.RayTaskError("run", "Traceback ...\nlong", FluxDistError("cannot load model directory 'x'"))
    assert _describe(err) == (False, "error: cannot load model directory 'x'")

    class FakeRay:
        def wait(self, pending, num_returns=1, timeout=None):
            return list(pending), []

        def get(self, ref):
            raise err

    with pytest.raises(RankFailedError) as e:
        watch(FakeRay(), {"a": 0, "b": 1}, [1, 2], 10.0, 0.01, 0.01)
    assert str(e.value) == "cannot load model directory 'x' (rank(s) 0, 1; all ranks stopped)"


# -- item 7: the torchrun launcher keeps the exit codes, one line per failed rank --------------------
def test_torchrun_launcher_keeps_exit_codes(tmp_path):
    env = cli_env(NPROC_PER_NODE="2")
    r = subprocess.run(["bash", "launch/torchrun.sh", *TINY, "--height", "120", "--prompt", "x", "--output",
                        str(tmp_path / "a.png")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "ChildFailedError" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    for rank in (0, 1):
        assert f"flux-dist: rank {rank} failed (exit 2): height must be a positive multiple of 16" in r.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a fox"}\n{"prompt": "x", "height": 120}\n')
    r = subprocess.run(["bash", "launch/torchrun.sh", *TINY, "--steps", "1", "--prompts-file", str(prompts),
                        "--output-dir", str(tmp_path / "batch")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "flux-dist: rank 0 failed (exit 3): some batch lines failed" in r.stderr
    assert "ChildFailedError" not in r.stderr and (tmp_path / "batch" / "00000.png").exists()


# -- item 10: per-shape caches bounded, memory flat over many sizes -----------------------------------
def test_plan_and_graph_caches_are_bounded(monkeypatch):
    from flux_dist import engine as engine_mod
    from flux_dist.graphs import GraphedStack

    eng = engine_mod.Engine(load_config(None, {"model.model": "flux2-tiny"}))
    for n in range(3 * engine_mod.PLAN_CACHE_SIZE):
        eng.plan(16, n + 1)
    assert len(eng._plans) == engine_mod.PLAN_CACHE_SIZE
    assert eng.plan(16, 3 * engine_mod.PLAN_CACHE_SIZE) is eng.plan(16, 3 * engine_mod.PLAN_CACHE_SIZE)

    class FakeGraph:
        def replay(self):
            pass

    g = GraphedStack(lambda *a: None, max_graphs=3)
    monkeypatch.setattr(g, "_capture", lambda tr, flat, n: ([t.clone() for t in flat], flat[0], FakeGraph()))
    for n in range(10):
        g(None, torch.zeros(1, n + 1), torch.zeros(1, 2), (), ())
    assert len(g.graphs) == 3 and list(g.graphs)[-1][0][0] == torch.Size([1, 10])


MEMORY_PROBE = """
import dataclasses, torch
torch.set_num_threads(1)
from flux_dist.config import load_config
from flux_dist.engine import Engine
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
c = load_config(None, {"model.model": "flux2-tiny"})
c.request = dataclasses.replace(c.request, prompt="a fox", steps=1, max_sequence_length=8)
e = Engine(c)
marks = []
for i in range(200):  # 200 distinct sizes, each decoded (the VAE's per-shape CPU kernels)
    e.generate(dataclasses.replace(c.request, height=16 * (1 + i % 20), width=16 * (1 + i // 20)))
    if i in (139, 199):
        marks.append(rss())
print("RSS", marks[0], marks[1], len(e._plans))
"""


def test_memory_flat_over_many_image_sizes():
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE], cwd=ROOT, env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    before, after, plans = r.stdout.split("RSS")[1].split()
    # Unbounded (oneDNN's default cache), the last 60 sizes added ~115 MB; bounded, the cache is full by then.
    assert float(after) - float(before) < 40, r.stdout
    assert int(plans) <= 32
