"""Server pieces without a launcher: request parsing, metrics text, and model failures that stay per request."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flux_dist.config import LimitsConfig, RequestConfig
from flux_dist.server.metrics import Metrics
from flux_dist.server.protocol import BadRequest, parse_generation
from flux_dist.validation import check_request

from dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = RequestConfig(prompt="default", height=64, width=64, steps=2, seed=0, max_sequence_length=16)


def parse(body: object, *, true_cfg: bool = False, max_images: int = 4, max_work: int = 64 * 64 * 8):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_generation(raw, DEFAULTS, true_cfg=true_cfg, max_images=max_images, max_work=max_work,
                            validate=lambda r: check_request(r, LimitsConfig(max_pixels=256 * 256)))


def test_parse_generation_maps_openai_fields():
    job = parse({"prompt": "a fox", "n": 3, "size": "128x64", "seed": 10, "num_inference_steps": 5,
                 "guidance_scale": 2.5, "model": "whatever", "response_format": "b64_json"}, max_work=None)
    assert [r.seed for r in job.requests] == [10, 11, 12]
    r = job.requests[0]
    assert (r.prompt, r.width, r.height, r.steps, r.guidance) == ("a fox", 128, 64, 5, 2.5)
    assert r.max_sequence_length == 16 and r.negative_prompt == ""  # the server's config, not the client's
    a = parse({"prompt": "x"}).requests[0]
    assert (a.height, a.width, a.steps, a.prompt) == (64, 64, 2, "x")
    # no seed: rank 0 draws one (and the reply reports it), so repeated calls differ
    assert len({parse({"prompt": "x"}).requests[0].seed for _ in range(8)}) > 1
    neg = parse({"prompt": "x", "negative_prompt": "blurry"}, true_cfg=True)
    assert neg.requests[0].negative_prompt == "blurry"


@pytest.mark.parametrize("body,match", [
    (b"\xff\xfe", "not valid JSON"),
    ("just a string", "JSON object"),
    ({"prompt": "x", "size": "48x40"}, "height must be a positive multiple of 16"),
    ({"prompt": "x", "size": "512x512"}, "exceeds the limit of 65536"),
    ({"prompt": "x", "size": "0x64"}, "width must be a positive multiple"),
    ({"prompt": "x", "n": 5}, "'n' must be in 1..4"),
    ({"prompt": "x", "guidance_scale": float("inf")}, "finite"),
    ({"prompt": "x", "seed": 2**63 - 1, "n": 2}, "overflows"),
    ({"prompt": None}, "'prompt' is required"),
    ({"prompt": "x", "user": 3}, "'user' must be a string"),
    ({"prompt": "x", "quality": "hd"}, "unknown field(s) 'quality'"),
    ({"prompt": "a \ud800 b"}, "'prompt' is not valid Unicode: a lone surrogate at index 2"),
    ({"prompt": "x", "negative_prompt": "\udfff"}, "'negative_prompt' is not valid Unicode"),
    ({"prompt": "a\x00b"}, "'prompt' contains a NUL character"),
    ({"prompt": "x", "size": "\uff19\uff16x\uff19\uff16"}, "in ASCII digits, no spaces"),  # full-width 96x96
    ({"prompt": "x", "size": " 64 x 64 "}, "in ASCII digits, no spaces"),
    ({"prompt": "x", "size": "64x64", "n": 4, "num_inference_steps": 3}, "64x64 x 3 steps x 4 image(s) = 49152"),
])
def test_parse_generation_rejects_with_a_clear_message(body, match):
    with pytest.raises(BadRequest, match=re.escape(match)):
        parse(body)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}, with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_text_format():
    m = Metrics()
    m.response(200)
    m.response(400)
    m.response(400)
    m.job_done(0.3, images=2, steps=4, skipped=1)
    m.job_done(7.0, images=1, steps=2, skipped=0)
    text = m.render(queue_length=3, queue_limit=8, ready=True)
    got = samples(text)  # parses, or raises
    assert got[("flux_dist_http_responses_total", (("code", "400"),))] == 2
    assert got[("flux_dist_images_total", ())] == 3 and got[("flux_dist_cache_skipped_steps_total", ())] == 1
    assert got[("flux_dist_queue_length", ())] == 3 and got[("flux_dist_ready", ())] == 1
    bucket = "flux_dist_request_latency_seconds_bucket"
    assert got[(bucket, (("le", "0.25"),))] == 0
    assert got[(bucket, (("le", "0.5"),))] == 1
    assert got[(bucket, (("le", "10.0"),))] == 2
    assert got[(bucket, (("le", "+Inf"),))] == 2
    assert got[("flux_dist_request_latency_seconds_count", ())] == 2
    assert got[("flux_dist_requests_stopped_total", (("reason", "deadline"),))] == 0
    for line in text.splitlines():  # every line is a comment or "name[{labels}] number"
        assert line.startswith("# ") or re.fullmatch(r'[a-z_]+(\{[a-z]+="[^"]*"\})? [0-9.e+-]+', line), line


def _serve_with_injected_failures(rank: int, world: int, config: str) -> dict:
    """Real tiny engine, real server on port 0; the client thread runs in rank 0's process."""
    import threading

    from server_utils import call

    from flux_dist.config import load_config
    from flux_dist.engine import Engine
    from flux_dist.server import StopSignal, serve

    cfg = load_config(config, {"request.height": 64, "request.width": 64, "request.steps": 2,
                               "request.max_sequence_length": 16})
    engine = Engine(cfg)
    real_generate, real_decode = engine.generate, engine.decode
    current = {"prompt": ""}

    def generate(req, decode=True, control=None):
        current["prompt"] = req.prompt
        if req.prompt == "fail everywhere":  # a deterministic model error: every rank, before any collective
            raise RuntimeError(f"injected failure on rank {rank}")
        return real_generate(req, decode, control)

    def decode(latents, ids):  # rank 0 alone decodes: a VAE failure there is a one-rank failure
        if current["prompt"] == "fail in rank 0 decode":
            raise RuntimeError("injected VAE failure")
        return real_decode(latents, ids)

    engine.generate, engine.decode = generate, decode
    stop = StopSignal()
    seen: dict = {}

    def client(host: str, port: int) -> None:
        def run() -> None:
            try:
                req = {"prompt": "a fox", "seed": 3, "size": "64x64"}
                for name, body in [("good1", req), ("all", {**req, "prompt": "fail everywhere"}),
                                   ("rank0", {**req, "prompt": "fail in rank 0 decode"}), ("good2", req)]:
                    code, _, raw = call(port, "POST", "/v1/images/generations", body, timeout=120)
                    seen[name] = (code, json.loads(raw))
                code, _, raw = call(port, "GET", "/metrics")
                seen["metrics"] = raw.decode()
                seen["health"] = call(port, "GET", "/health")[0]
            except BaseException as e:  # noqa: BLE001 - reported to the test below
                seen["client_error"] = repr(e)
            finally:
                stop.set()

        threading.Thread(target=run, daemon=True).start()

    code = serve(cfg, engine, "127.0.0.1", 0, stop=stop, on_listening=client, heartbeat_s=1.0)
    return {"code": code, **seen}


def test_model_failure_is_a_500_and_the_ranks_stay_in_step():
    r0, r1 = run_distributed(_serve_with_injected_failures, 2, str(ROOT / "configs" / "tiny.yaml"), timeout=300)
    assert "client_error" not in r0, r0.get("client_error")
    assert r0["code"] == 0 and r1["code"] == 0
    assert r0["good1"][0] == 200 and r0["good2"][0] == 200
    assert r0["good1"][1]["data"][0]["b64_json"] == r0["good2"][1]["data"][0]["b64_json"]
    code, body = r0["all"]
    assert code == 500
    msg = body["error"]["message"]
    assert "rank 0: RuntimeError: injected failure on rank 0" in msg and "injected failure on rank 1" in msg
    code, body = r0["rank0"]
    assert code == 500 and "rank 0: RuntimeError: injected VAE failure" in body["error"]["message"]
    assert "rank 1" not in body["error"]["message"]
    assert r0["health"] == 200
    assert re.search(r"^flux_dist_request_failures_total 2(\.0)?$", r0["metrics"], re.M)


def test_port_in_use_is_a_clear_error_before_serving():
    import socket

    from flux_dist.config import load_config
    from flux_dist.engine import Engine
    from flux_dist.errors import FluxDistError
    from flux_dist.server import serve

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), {"parallel.ulysses": 1})
    engine = Engine(cfg)  # one process: no process group
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(FluxDistError, match="cannot listen on 127.0.0.1"):
            serve(cfg, engine, "127.0.0.1", busy.getsockname()[1])
    with pytest.raises(FluxDistError, match="at least 1"):
        serve(cfg, engine, "127.0.0.1", 0, max_queue=0)


def test_bad_serve_flags_are_refused_before_loading():
    import subprocess
    import sys

    from server_utils import env

    flags = {"--request-timeout -5": "--request-timeout must be > 0", "--port 99999": "--port must be in 0..65535"}
    procs = {f: subprocess.Popen([sys.executable, "-m", "flux_dist", "serve", "--config", "configs/tiny.yaml",
                                  *f.split()], cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for f in flags}
    for f, p in procs.items():
        out = p.communicate(timeout=120)[0].decode()
        assert p.returncode != 0 and flags[f] in out and "Traceback" not in out, (f, out)
        assert "loading" not in out.lower() and "model flux2-tiny" not in out, out
