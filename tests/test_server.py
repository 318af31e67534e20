"""The HTTP server for real: 2 gloo ranks on the tiny preset, a real HTTP client, real images."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from server_utils import SMALL, Server, call, decode_png, read_png, server_with_cli_image

GEN = "/v1/images/generations"
PROMPT = "a red fox standing in fresh snow at dawn"
GOOD = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": 2, "seed": 7}
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def metric(text: str, name: str, default: float | None = None) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    if m is None and default is not None:
        return default
    assert m, f"{name} not in metrics:\n{text}"
    return float(m.group(1))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """torchrun, 2 ranks, Ulysses 2, no API key, a roomy queue; the CLI's image for GOOD made beside it."""
    with server_with_cli_image(tmp_path_factory.mktemp("srv"), ["--max-queue", "64"], PROMPT, 7) as s:
        yield s


def test_image_equals_cli_and_n_uses_consecutive_seeds(server):
    code, headers, body = call(server.port, "POST", GEN, GOOD)
    assert code == 200, body
    assert headers["Content-Type"] == "application/json"
    r = json.loads(body)
    assert set(r) >= {"created", "data", "timings"} and len(r["data"]) == 1
    img = decode_png(r["data"][0]["b64_json"])
    cli = read_png(server.cli_png)
    assert img.shape == (64, 64, 3)
    assert np.abs(img - cli).max() <= 1
    t = r["timings"]
    assert t["total_s"] > 0 and t["images"][0]["denoise_s"] > 0 and t["images"][0]["cache_skipped_steps"] == 0

    code, _, body = call(server.port, "POST", GEN, {**GOOD, "n": 2})
    assert code == 200, body
    data = json.loads(body)["data"]
    assert [d["seed"] for d in data] == [7, 8]
    a, b = decode_png(data[0]["b64_json"]), decode_png(data[1]["b64_json"])
    assert np.array_equal(a, img)  # seed 7 again: the same image
    assert np.abs(a - b).max() > 10  # seed 8: another one


def test_concurrent_requests_all_answered(server):
    seeds = [1, 2, 3, 1, 2, 3]

    def one(seed: int) -> tuple[int, bytes]:
        code, _, body = call(server.port, "POST", GEN, {**GOOD, "seed": seed})
        return code, body

    with ThreadPoolExecutor(len(seeds)) as ex:
        out = list(ex.map(one, seeds))
    assert all(code == 200 for code, _ in out), [b[:200] for c, b in out if c != 200]
    imgs = [decode_png(json.loads(b)["data"][0]["b64_json"]) for _, b in out]
    for i in range(3):
        assert np.array_equal(imgs[i], imgs[i + 3])  # the same seed under concurrency: the same image
    assert np.abs(imgs[0] - imgs[1]).max() > 10


BAD: list[tuple[object, str]] = [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({**GOOD, "size": "60x64"}, "multiple of 16"),
    ({**GOOD, "size": "64"}, "WIDTHxHEIGHT"),
    ({**GOOD, "size": 64}, "must be a string"),
    ({**GOOD, "size": "4096x4096"}, "exceeds the limit"),
    ({**GOOD, "prompt": ""}, "'prompt' is required"),
    ({**GOOD, "prompt": "   "}, "'prompt' is required"),
    ({**GOOD, "prompt": 5}, "'prompt' must be a string"),
    ({k: v for k, v in GOOD.items() if k != "prompt"}, "'prompt' is required"),
    ({**GOOD, "n": 0}, "'n' must be in 1..4"),
    ({**GOOD, "n": 99}, "'n' must be in 1..4"),
    ({**GOOD, "n": "2"}, "'n' must be an integer"),
    ({**GOOD, "n": True}, "'n' must be an integer"),
    ({**GOOD, "seed": -1}, "'seed' must be in"),
    ({**GOOD, "seed": 1.5}, "'seed' must be an integer"),
    ({**GOOD, "num_inference_steps": 0}, "'num_inference_steps' must be in"),
    ({**GOOD, "num_inference_steps": 5000}, "steps must be an integer in 1..1000"),
    ({**GOOD, "guidance_scale": -1}, "finite number"),
    ({**GOOD, "guidance_scale": "high"}, "finite number"),
    ({**GOOD, "response_format": "url"}, "not supported"),
    ({**GOOD, "negative_prompt": "blurry"}, "only used by models with true CFG"),
    ({**GOOD, "style": "vivid"}, "unknown field"),
]


def test_mixed_stream_of_good_and_bad_requests(server):
    """220 requests, 20 good and 200 bad, interleaved and 4 at a time: every one gets its own answer."""
    _, _, before = call(server.port, "GET", "/metrics")
    stream: list[tuple[object, str | None]] = []
    for i in range(220):
        if i % 11 == 0:
            stream.append(({**GOOD, "seed": 100 + i}, None))
        else:
            stream.append(BAD[i % len(BAD)])

    def one(item: tuple[object, str | None]) -> tuple[int, dict, str | None]:
        code, _, body = call(server.port, "POST", GEN, item[0])
        return code, json.loads(body), item[1]

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as ex:
        out = list(ex.map(one, stream))
    good = [r for r in out if r[2] is None]
    bad = [r for r in out if r[2] is not None]
    assert len(good) == 20 and len(bad) == 200
    for code, body, _ in good:
        assert code == 200, body
        assert len(body["data"]) == 1 and decode_png(body["data"][0]["b64_json"]).shape == (64, 64, 3)
    for code, body, want in bad:
        assert code == 400, (want, body)
        assert want in body["error"]["message"], (want, body)
    assert time.monotonic() - t0 < 120
    assert call(server.port, "GET", "/health")[0] == 200
    assert call(server.port, "POST", GEN, GOOD)[0] == 200
    _, _, after = call(server.port, "GET", "/metrics")
    b, a = before.decode(), after.decode()
    c400 = 'flux_dist_http_responses_total{code="400"}'
    assert metric(a, c400) - metric(b, c400, default=0) == 200
    assert metric(a, "flux_dist_request_latency_seconds_count") - metric(
        b, "flux_dist_request_latency_seconds_count") == 21
    assert metric(a, "flux_dist_request_failures_total") == 0


def test_health_metrics_and_routes(server):
    code, _, body = call(server.port, "GET", "/health")
    assert code == 200 and json.loads(body)["status"] == "ready"
    code, headers, body = call(server.port, "GET", "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in ("flux_dist_requests_total", "flux_dist_queue_length", "flux_dist_cache_skipped_steps_total",
                 'flux_dist_request_latency_seconds_bucket{le="+Inf"}', "flux_dist_ready"):
        assert re.search(rf"^{re.escape(name)} ", text, re.M), name
    assert metric(text, "flux_dist_ready") == 1 and metric(text, "flux_dist_cache_skipped_steps_total") == 0
    assert metric(text, "flux_dist_queue_limit") == 64
    assert call(server.port, "GET", "/nope")[0] == 404
    assert call(server.port, "POST", "/v1/other", GOOD)[0] == 404


def test_sigterm_on_rank0_stops_every_rank_cleanly(server):
    t0 = time.monotonic()
    os.kill(server.rank_pid(0), signal.SIGTERM)
    codes = server.wait(timeout=60)
    assert codes == [0], (codes, server.log())  # torchrun: every worker exited 0
    assert time.monotonic() - t0 < 60
    with pytest.raises(OSError):
        call(server.port, "GET", "/health", timeout=5)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """Plain processes with the rendezvous in the environment (as an sbatch script starts them), an API key
    from the environment, and a queue of one."""
    d = tmp_path_factory.mktemp("keyed")
    s = Server(["--config", "configs/tiny.yaml", *SMALL, "--max-queue", "1"], launcher="env",
               extra_env={"FLUX_DIST_API_KEY": KEY}, log_path=d / "server.log")
    try:
        s.wait_ready(headers=AUTH)
        yield s
    finally:
        s.stop()


def test_api_key_enforced(keyed):
    assert call(keyed.port, "GET", "/health")[0] == 401
    code, headers, body = call(keyed.port, "POST", GEN, GOOD)
    assert code == 401 and "API key" in json.loads(body)["error"]["message"]
    assert headers.get("WWW-Authenticate") == "Bearer"
    assert call(keyed.port, "POST", GEN, GOOD, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert call(keyed.port, "GET", "/metrics", headers={"Authorization": KEY})[0] == 401  # no scheme
    assert call(keyed.port, "GET", "/health", headers=AUTH)[0] == 200
    code, _, body = call(keyed.port, "POST", GEN, GOOD, headers=AUTH)
    assert code == 200 and len(json.loads(body)["data"]) == 1


def test_queue_limit_gives_429(keyed):
    """Queue of one: one job runs, one waits, the rest of a simultaneous burst is told 429."""
    slow = {**GOOD, "size": "128x128", "num_inference_steps": 10}
    go = threading.Barrier(8)

    def one(i: int) -> tuple[int, tuple]:
        go.wait(timeout=30)
        code, headers, body = call(keyed.port, "POST", GEN, {**slow, "seed": i}, headers=AUTH)
        return code, (headers, body)

    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(one, range(8)))
    codes = sorted(c for c, _ in out)
    assert set(codes) <= {200, 429}, codes
    assert 1 <= codes.count(200) <= 4 and codes.count(429) >= 4, codes
    headers, body = next(r for c, r in out if c == 429)
    assert headers["Retry-After"] == "1" and b"queue is full" in body
    assert call(keyed.port, "GET", "/health", headers=AUTH)[0] == 200
    assert call(keyed.port, "POST", GEN, GOOD, headers=AUTH)[0] == 200


def test_dead_rank_ends_the_server(keyed):
    """Kill rank 1 (no torchrun agent to clean up after it): rank 0's next collective fails, /health stops
    saying ready, and rank 0 exits non-zero by itself."""
    s = keyed
    t0 = time.monotonic()
    s.procs[1].send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while s.procs[0].poll() is None and time.monotonic() < deadline:
        try:
            code, _, _ = call(s.port, "GET", "/health", headers=AUTH, timeout=5)
            assert code in (200, 503)  # 200 until the next heartbeat finds the peer gone
        except OSError:
            pass
        time.sleep(0.2)
    assert s.procs[0].wait(timeout=30) not in (0, None), s.log()
    assert time.monotonic() - t0 < 60
    assert "serving loop ended" in s.log()
