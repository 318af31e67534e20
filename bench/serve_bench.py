"""Issue 15: requests per minute of one `flux-dist serve` on one GPU, before and after replica groups.

  python3 bench/serve_bench.py OUT.json LABEL=PYTHONPATH[=EXTRA ARGS] ...   # run in the order given

Each entry starts a real server (`python3 -m flux_dist serve`, one process, the code on that PYTHONPATH, e.g. a
tree of the commit before replica groups and today's tree with `--replicas 1`), waits for `/health`, sends 2
warm-up requests (compile and graph capture at the shape), then REQUESTS requests from CLIENTS concurrent clients
(the queue never runs dry), and stops it with SIGTERM. Row: requests per minute over the timed batch (first send
to last reply), median latency, and the median `timings.compute_s` the server reports. Entries can repeat (A B A B)
to show the spread. The model: FLUX.2 [dev] full-size random weights, full stack (FP8, compile, CUDA graphs, FA3
FP8 attention), 512x512, STEPS steps, no text encoder (random prompt embeddings).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REQUESTS, CLIENTS, STEPS, SIZE = 12, 4, 20, 512
MODEL = """  model: flux2-dev
  dtype: bfloat16
  device: cuda
  quant: fp8
  compile: true
  cuda_graphs: true
  attention: auto
  attention_fp8: true
"""
if os.environ.get("SERVE_BENCH_SMOKE"):  # CPU: the tiny preset, to check the script
    REQUESTS, CLIENTS, STEPS, SIZE = 4, 2, 2, 64
    MODEL = "  model: flux2-tiny\n  device: cpu\n"
CONFIG = f"""model:
{MODEL}request:
  height: {SIZE}
  width: {SIZE}
  steps: {STEPS}
  max_sequence_length: 512
"""


RUN = "import sys, flux_dist; print(flux_dist.__file__, flush=True); from flux_dist.cli import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 300) -> tuple[float, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t, out


def wait_health(port: int, proc: subprocess.Popen, limit: float = 300) -> float:
    t = time.perf_counter()
    while time.perf_counter() - t < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server not healthy in time")


def one(label: str, path: str, extra: list[str], cfg: str, log_dir: str) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{path}:{os.environ.get('PYTHONPATH', '')}"}
    log = open(os.path.join(log_dir, f"{label}.log"), "a")
    cmd = [sys.executable, "-c", RUN, "serve", "--config", cfg, "--port", str(port),
           "--compile-cache-dir", os.path.join(tempfile.gettempdir(), f"fdcache-{label.rsplit('-', 1)[0]}"), *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=path, stdout=log, stderr=subprocess.STDOUT,  # -m: cwd first
                            start_new_session=True)
    row: dict = {"label": label, "args": extra}
    try:
        row["healthy_s"] = round(wait_health(port, proc), 1)
        body = {"prompt": "a red fox in snow", "size": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS}
        t = time.perf_counter()
        for i in range(2):
            post(port, {**body, "seed": i})
        row["warmup_s"] = round(time.perf_counter() - t, 1)
        lat: list[float] = []
        totals: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        todo = list(range(REQUESTS))

        def client() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                try:
                    dt, out = post(port, {**body, "seed": 100 + i})
                    with lock:
                        lat.append(dt)
                        tim = out.get("timings") or {}
                        if tim.get("compute_s") is not None:
                            totals.append(float(tim["compute_s"]))
                except Exception as e:  # noqa: BLE001 - counted, the row says so
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")

        t = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        row.update(requests=len(lat), errors=errors[:3], wall_s=round(wall, 2),
                   requests_per_min=round(60 * len(lat) / wall, 2),
                   median_latency_s=round(statistics.median(lat), 3) if lat else None,
                   median_compute_s=round(statistics.median(totals), 3) if totals else None)
    except Exception as e:  # noqa: BLE001 - one entry failing keeps the others
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        row["exit"] = proc.returncode
    print(json.dumps(row), flush=True)
    return row


def main(out: str, entries: list[str]) -> None:
    d = tempfile.mkdtemp(prefix="serve_bench_")
    cfg = os.path.join(d, "serve.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG)
    log_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(log_dir, exist_ok=True)
    rows = []
    for e in entries:
        label, path, *extra = e.split("=", 2)
        rows.append(one(f"{label}-{len(rows)}", os.path.abspath(path), extra[0].split() if extra else [], cfg,
                        log_dir))
        with open(out, "w") as f:
            json.dump({"size": SIZE, "steps": STEPS, "requests": REQUESTS, "clients": CLIENTS, "rows": rows}, f,
                      indent=1)
    print("\n| run | args | healthy s | req/min | median latency s | server compute s |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {' '.join(r['args'])} | {r.get('healthy_s')} | {r.get('requests_per_min')} | "
              f"{r.get('median_latency_s')} | {r.get('median_compute_s')} |" + (f" {r['error']}" if "error" in r
                                                                                       else ""))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
