"""Ray Serve (issue 15 item 3) on a real local Ray cluster, CPU and gloo: 2 replicas x 2 ranks (Ulysses 2), deployed
from configs/ray-serve-tiny.yaml's args, answer concurrent requests with torchrun's images (the same layout), from
both replicas; bad input is a 400 and the replica serves on; a replica whose rank dies answers 503, fails its
health check, and Ray Serve starts another while the survivor serves.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from server_utils import ROOT, SMALL, call, decode_png, read_png

from dist_utils import TINY, cli_env, free_port

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PROMPTS = [("a red fox standing in fresh snow", 11), ("a lighthouse at night", 12), ("a bowl of ramen", 13),
           ("a paper boat on a pond", 14)]
HEADER = "x-flux-dist-replica"


def _serve():
    try:
        from ray import serve
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"CI must run the Ray Serve tests: ray.serve does not import ({e}); launch/env.sh installs "
                        ".[test,ray]")
        pytest.skip(f"ray.serve does not import ({e}): pip install -e '.[ray]'")
    return serve


def _args() -> dict:
    """The documented config's application args, at the tests' size, two replicas, each at most 2 requests."""
    app = yaml.safe_load((ROOT / "configs" / "ray-serve-tiny.yaml").read_text())["applications"][0]
    assert app["import_path"] == "flux_dist.serve_ray:build"
    flags = dict(zip(SMALL[::2], SMALL[1::2], strict=True))
    small = {"request." + k[2:].replace("-", "_"): int(v) for k, v in flags.items()}
    return {**app["args"], "overrides": {**app["args"]["overrides"], **small}, "min_replicas": 2, "max_replicas": 2,
            "max_ongoing_requests": 2, "health_check_period_s": 1.0}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    serve = _serve()
    import ray

    from flux_dist.serve_ray import build

    d = tmp_path_factory.mktemp("ray_serve")
    lines = d / "prompts.jsonl"
    lines.write_text("\n".join(json.dumps({"prompt": p, "seed": s}) for p, s in PROMPTS) + "\n")
    ref = subprocess.Popen(  # torchrun's images (2 ranks, batch mode), made while the replicas start
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "flux_dist", "generate", *TINY, "--prompts-file", str(lines), "--output-dir", str(d / "torchrun")],
        cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=open(d / "torchrun.log", "wb"))  # noqa: SIM115
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(_args()), name="flux", route_prefix="/")
        assert ref.wait(timeout=240) == 0, (d / "torchrun.log").read_text()[-3000:]
        yield port, d / "torchrun"
    finally:
        if ref.poll() is None:
            ref.kill()
        serve.shutdown()
        ray.shutdown()


def _generate(port: int, prompt: str, seed: int) -> tuple[int, str, dict]:
    code, headers, body = call(port, "POST", "/v1/images/generations", {"prompt": prompt, "seed": seed}, timeout=180)
    return code, headers.get(HEADER, ""), json.loads(body)


def test_two_replicas_answer_concurrent_requests_with_the_torchrun_images(app):
    port, ref = app
    code, headers, body = call(port, "GET", "/health")
    assert code == 200 and json.loads(body)["status"] == "ready" and headers.get(HEADER)
    code, _, body = call(port, "GET", "/v1/models")
    assert code == 200 and json.loads(body)["data"][0]["id"] == "flux2-tiny"
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        futs = [pool.submit(_generate, port, p, s) for p, s in PROMPTS]
        bad = pool.submit(call, port, "POST", "/v1/images/generations", {"prompt": "x", "size": "120x64"})
        replies = [f.result() for f in futs]
        bad_code, bad_headers, bad_body = bad.result()
    # bad input: the torchrun server's validator and error body, from a replica that keeps serving
    assert bad_code == 400, bad_body
    assert "multiple of 16" in json.loads(bad_body)["error"]["message"]
    for i, (code, replica, body) in enumerate(replies):
        assert code == 200, body
        assert replica, "no replica header"
        assert body["layout"]["world_size"] == 2 and body["layout"]["ulysses"] == 2
        got, want = decode_png(body["data"][0]["b64_json"]), read_png(ref / f"{i:05d}.png")
        assert got.shape == want.shape == (64, 64, 3)
        assert np.array_equal(got, want), f"{PROMPTS[i]}: max pixel difference {np.abs(got - want).max()}"
    assert len({r for _, r, _ in replies}) == 2, [r for _, r, _ in replies]  # both replicas served
    code, _, text = call(port, "GET", "/metrics")
    assert code == 200 and b"flux_dist_images" in text


def test_replica_whose_rank_dies_is_replaced(app):
    """SIGKILL one rank of one replica: that replica is down at once (a 503 if a request still reaches it), fails
    its health check, and Serve starts a replacement; meanwhile the other replica answers."""
    serve = _serve()
    port, ref = app
    handle = serve.get_app_handle("flux")
    victim = handle.describe.remote().result()
    os.kill(victim["pids"][1], signal.SIGKILL)
    t0 = time.monotonic()
    states: dict = {}
    while time.monotonic() - t0 < 60:
        states = {str(k): v for k, v in serve.status().applications["flux"].deployments["FluxDist"]
                  .replica_states.items()}
        if any("STARTING" in k or "PENDING" in k for k in states):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no replacement replica within 60 s of killing a rank of {victim['replica']}: {states}")
    for _ in range(20):  # the proxy may route to the dead replica until it hears: that one answers 503, at once
        code, replica, body = _generate(port, *PROMPTS[0])
        if not (code == 503 and replica == victim["replica"]):
            break
        assert "a rank failed" in body["error"]["message"], body
        time.sleep(0.5)
    assert code == 200 and replica and replica != victim["replica"], (code, replica, body)
    assert np.array_equal(decode_png(body["data"][0]["b64_json"]), read_png(ref / "00000.png"))


def test_autoscaling_adds_a_replica_under_load_and_removes_it_when_idle(app):
    """Last (it redeploys the app): min 1, max 2 replicas, a target of 1 request per replica, short delays. Four
    clients sending without pause (the load never dips while a replica starts) take Serve from 1
    running replica to 2 (every request answered); once they stop it goes back to 1, which answers with the
    torchrun image."""
    import threading

    serve = _serve()
    from flux_dist.serve_ray import build

    port, ref = app
    args = {**_args(), "min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 1,
            "upscale_delay_s": 1.0, "downscale_delay_s": 6.0, "look_back_period_s": 11.0}  # > Serve's 10 s metrics
    serve.run(build(args), name="flux", route_prefix="/")

    def states() -> dict:
        got = serve.status().applications["flux"].deployments["FluxDist"].replica_states
        return {getattr(k, "value", str(k)): v for k, v in got.items() if v}

    def wait_for(n: int, limit: float) -> float:
        """Seconds until exactly ``n`` replicas run and none starts or stops."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if states() == {"RUNNING": n}:
                return time.monotonic() - t0
            time.sleep(0.5)
        pytest.fail(f"not {n} running replicas within {limit} s: {states()}")

    wait_for(1, 120)
    stop, codes = threading.Event(), []

    def client() -> None:
        while not stop.is_set():
            codes.append(_generate(port, *PROMPTS[0])[0])

    clients = [threading.Thread(target=client) for _ in range(4)]
    for c in clients:
        c.start()
    try:
        up = wait_for(2, 240)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=180)
    assert codes and all(c == 200 for c in codes), codes
    down = wait_for(1, 120)
    code, _, body = _generate(port, *PROMPTS[0])
    assert code == 200 and np.array_equal(decode_png(body["data"][0]["b64_json"]), read_png(ref / "00000.png"))
    print(f"autoscaling: 1 -> 2 replicas in {up:.0f} s under load ({len(codes)} requests), 2 -> 1 in {down:.0f} s")
