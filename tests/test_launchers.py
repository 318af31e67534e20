"""The three launchers for real, each with the same config and the same image, and none of them hangs.

torchrun across two simulated nodes (c10d rendezvous on 127.0.0.1), the project's sbatch scripts on
a real one-node Slurm cluster (tests/slurm_localhost.sh), and a real local Ray cluster. A rank that
raises or dies mid-denoise (FLUX_DIST_FAULT) must end the job within 60 s, non-zero, with its error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dist_utils import ROOT, TINY, cli_env, fault_time, free_port, png, torchrun

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FAST_FAIL_S = 60.0


def _same_image(a: Path | bytes, b: Path | bytes) -> None:
    x, y = png(a), png(b)
    assert x.shape == y.shape == (64, 64, 3)
    assert np.array_equal(x, y), f"max pixel difference {np.abs(x - y).max()}"


# -- torchrun -----------------------------------------------------------------------------------

def test_torchrun_two_nodes_simulated_same_png(tmp_path, torchrun_ref):
    """Two `launch/torchrun.sh` invocations, one rank each, meeting at a c10d endpoint on 127.0.0.1."""
    port = free_port()
    procs = []
    for node in (0, 1):
        env = cli_env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{port}",
                      RDZV_ID=f"test-{port}")
        out = tmp_path / f"node{node}.png"
        procs.append(subprocess.Popen(["bash", "launch/torchrun.sh", *TINY, "--output", str(out), "--metrics", ""],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # whichever node the rendezvous made rank 0 wrote the image
    written = [tmp_path / f"node{n}.png" for n in (0, 1) if (tmp_path / f"node{n}.png").exists()]
    assert len(written) == 1
    _same_image(written[0], torchrun_ref)


def test_launcher_sigterm_stops_the_ranks_in_one_line(tmp_path):
    """SIGTERM to `launch/torchrun.py` (a scheduler stopping the job): torchrun forwards it to the ranks and
    the launcher exits 128 + 15 with one line, not torchrun's exit 1 and SignalException traceback."""
    import signal

    cmd = [sys.executable, "launch/torchrun.py", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "flux_dist", "generate", *TINY, "--output", str(tmp_path / "x.png"), "--metrics", ""]
    p = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(FLUX_DIST_FAULT="rank=1,step=1,kind=sleep,seconds=60"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, deadline = "", time.time() + 180
    while "FLUX_DIST_FAULT" not in seen and time.time() < deadline:  # the ranks are mid-denoise
        seen += p.stderr.readline()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, err[-3000:])
    assert "flux-dist: launcher stopped by signal SIGTERM; ranks stopped" in err, err[-3000:]
    assert "Traceback" not in seen + err, (seen + err)[-3000:]


def test_torchrun_rank_raises_mid_denoise_ends_job(tmp_path):
    t0 = time.time()
    r = torchrun(2, "generate", *TINY, "--output", str(tmp_path / "x.png"), "--metrics", "",
                 env=cli_env(FLUX_DIST_FAULT="rank=1,step=1,kind=raise"), timeout=240)
    end = time.time()
    assert r.returncode != 0
    fired = fault_time(r.stderr)
    assert t0 < fired and end - fired < FAST_FAIL_S, f"job took {end - fired:.1f} s to end after the fault"
    assert "[rank1] flux-dist: internal error" in r.stderr and "InjectedFault" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "x.png").exists()


# -- Slurm --------------------------------------------------------------------------------------

def _need_slurm() -> None:
    if shutil.which("sbatch") is None:
        if IN_CI:
            pytest.fail("CI must run the Slurm test: sbatch is not on PATH (did tests/slurm_localhost.sh run?)")
        pytest.skip("sbatch is not on PATH (run tests/slurm_localhost.sh as root to bring up a local Slurm)")


def sbatch(script: str, sbatch_args: list[str], args: list[str], log: Path, timeout: float = 300,
           **env: str) -> subprocess.CompletedProcess:
    cmd = ["sbatch", "--wait", "--output", str(log), *sbatch_args, script, *args]
    r = subprocess.run(cmd, cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)
    r.stderr += "\n--- job log ---\n" + (log.read_text() if log.exists() else "(no log)")
    return r


def test_slurm_tasks_mode_same_png(tmp_path, torchrun_ref):
    """slurm/multi-node.sbatch, one task per rank: ranks from SLURM_PROCID / SLURM_NTASKS."""
    _need_slurm()
    out = tmp_path / "slurm.png"
    r = sbatch("slurm/multi-node.sbatch", ["--nodes", "1", "--ntasks", "2"],
               [*TINY, "--output", str(out), "--metrics", str(tmp_path / "slurm.json")], tmp_path / "job.log",
               MODE="tasks")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "mode=tasks" in r.stderr
    _same_image(out, torchrun_ref)


def test_slurm_rank_dies_ends_job(tmp_path):
    """slurm/one-node.sbatch (srun + torchrun): rank 1's process dies; the job fails fast, naming it."""
    _need_slurm()
    t0 = time.time()
    r = sbatch("slurm/one-node.sbatch", [], [*TINY, "--output", str(tmp_path / "x.png"), "--metrics", ""],
               tmp_path / "job.log", NPROC_PER_NODE="2", FLUX_DIST_FAULT="rank=1,step=1,kind=exit")
    end = time.time()
    assert r.returncode != 0, r.stderr[-4000:]
    fired = fault_time(r.stderr)
    assert t0 < fired and end - fired < FAST_FAIL_S, f"job took {end - fired:.1f} s to end after the fault"
    # torchrun's own record, srun's, or launch/torchrun.py's line (whichever rank's failure was recorded first)
    assert any(s in r.stderr for s in ("exitcode  : 43", "exit code 43", "rank 1 failed (exit 43)")), r.stderr[-4000:]


# -- Ray ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    try:
        import ray
    except ImportError:
        if IN_CI:
            pytest.fail("CI must run the Ray tests: ray is not installed (launch/env.sh installs .[test,ray])")
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def _ray_cfg(tmp_path: Path):
    from flux_dist.cli import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["generate", *TINY, "--output", str(tmp_path / "r.png")]))


def _all_gone(pids: list[int], within_s: float = 15.0) -> list[int]:
    deadline = time.time() + within_s
    alive = list(pids)
    while alive and time.time() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.2)
    return alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_ray_two_actors_same_png(tmp_path, torchrun_ref, ray_cluster):
    from flux_dist.launch_ray import ray_generate

    res = ray_generate(_ray_cfg(tmp_path))
    _same_image(res.png, torchrun_ref)
    assert res.metrics["layout"]["world_size"] == 2
    assert res.metrics["launcher"]["strategy"] == "STRICT_PACK" and res.metrics["launcher"]["nodes"] == 1
    assert len(res.pids) == 2 and not _all_gone(res.pids)


def test_ray_dead_actor_stops_everything(tmp_path, ray_cluster, capfd):
    from flux_dist.launch_ray import RankFailedError, ray_generate

    ray = ray_cluster
    t0 = time.time()
    with pytest.raises(RankFailedError) as ei:
        ray_generate(_ray_cfg(tmp_path), env={"FLUX_DIST_FAULT": "rank=1,step=1,kind=exit"}, timeout_s=240)
    end = time.time()
    err = ei.value
    assert err.rank == 1 and str(err).startswith("rank 1 died"), str(err)
    assert not _all_gone(err.pids), "an actor is still running"
    # the actors' output reaches the driver through Ray's log monitor, a moment later
    text = ""
    for _ in range(50):
        text += capfd.readouterr().err
        if "FLUX_DIST_FAULT" in text:
            break
        time.sleep(0.1)
    fired = fault_time(text)
    assert t0 < fired and end - fired < FAST_FAIL_S, f"driver took {end - fired:.1f} s to raise after the fault"
    # the placement group is gone too: the cluster's CPUs are free again
    deadline = time.time() + 15
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_ray_stopped_store_host_rank_ends_within_60s(tmp_path, ray_cluster, capfd):
    """Rank 0 (the rendezvous store's host) SIGSTOPs itself mid-denoise: rank 1's watchdog names it, kills
    its process (same machine) and exits; the driver raises and no actor is left (issue 12, Ray)."""
    import dataclasses

    from flux_dist.launch_ray import RankFailedError, ray_generate

    cfg = _ray_cfg(tmp_path)
    cfg.dist = dataclasses.replace(cfg.dist, watchdog_s=8.0)
    t0 = time.time()
    with pytest.raises(RankFailedError) as ei:
        ray_generate(cfg, env={"FLUX_DIST_FAULT": "rank=0,step=1,kind=stop"}, timeout_s=240)
    end = time.time()
    assert not _all_gone(ei.value.pids), "an actor is still running"
    text = ""
    for _ in range(50):
        text += capfd.readouterr().err
        if "stopped answering" in text and "FLUX_DIST_FAULT" in text:
            break
        time.sleep(0.1)
    assert "[rank1] flux-dist: error: rank 0 stopped answering" in text, text[-3000:]
    assert "killed its process" in text, text[-3000:]
    fired = fault_time(text)
    assert t0 < fired and end - fired < FAST_FAIL_S, f"driver took {end - fired:.1f} s to raise after the fault"


def test_ray_bad_layout_is_a_clear_error(tmp_path, ray_cluster):
    """More ranks than the cluster holds: a clear error before any actor starts, nothing left reserved."""
    import dataclasses

    from flux_dist.errors import FluxDistError
    from flux_dist.launch_ray import ray_generate

    cfg = _ray_cfg(tmp_path)
    cfg.parallel = dataclasses.replace(cfg.parallel, ulysses=4)
    with pytest.raises(FluxDistError, match="needs 4 ranks with one CPU each, but the Ray cluster has 2 CPUs"):
        ray_generate(cfg)
    assert ray_cluster.available_resources().get("CPU", 0) == 2


def test_ray_script_bad_request_fails_before_ray_starts():
    """launch/ray_generate.py checks the request first: one clear error line, exit 2."""
    r = subprocess.run([sys.executable, "launch/ray_generate.py", *TINY, "--height", "120", "--output", "/dev/null"],
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "[rank0] flux-dist: error: height must be a positive multiple of 16" in r.stderr, r.stderr[-3000:]


# -- process-group timeout after start-up -------------------------------------------------------

def _stuck_peer(rank: int, world: int) -> float | None:
    import torch.distributed as dist

    from flux_dist import distributed

    distributed.set_timeout(3.0)
    if rank == 1:
        time.sleep(8)  # alive but silent: no launcher notices, only the timeout does
        return None
    t = time.monotonic()
    try:
        dist.barrier()
    except RuntimeError:
        return time.monotonic() - t
    return float("inf")


def test_set_timeout_fails_a_collective_with_a_silent_peer():
    """After start-up the short timeout applies: a collective with a stuck peer fails, it does not wait."""
    from dist_utils import run_distributed

    waited, _ = run_distributed(_stuck_peer, 2, timeout=120)
    assert 2.5 < waited < 10, waited


# -- the environment contract (in process, fast) ------------------------------------------------

def test_slurm_task_variables_give_the_layout(monkeypatch):
    from flux_dist import distributed
    from flux_dist.errors import FluxDistError

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first, so monkeypatch removes what _export_layout writes into os.environ afterwards
        monkeypatch.setenv(k, "0")
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    assert distributed.env_layout() == (0, 1, 0)  # the batch script itself: not a rank of the job
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert distributed.env_layout() == (5, 4, 1)  # srun step: its own task count wins
    with pytest.raises(FluxDistError, match="MASTER_ADDR is not set"):
        distributed._export_layout(5, 4, 1)
    monkeypatch.setenv("MASTER_ADDR", "node001")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    distributed._export_layout(5, 4, 1)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "4", "1")
    assert os.environ["MASTER_PORT"] == "21234"
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert distributed.env_layout()[:2] == (2, 3)  # torchrun's variables win over Slurm's


def test_fault_spec_is_parsed_strictly(monkeypatch):
    from flux_dist import faults
    from flux_dist.errors import FluxDistError

    assert faults.parse("rank=1,step=2,kind=exit") == faults.Fault(1, 2, "exit")
    for bad in ("rank=1", "rank=1,step=2,kind=boom", "rank=x,step=2,kind=raise", "garbage"):
        with pytest.raises(FluxDistError, match="FLUX_DIST_FAULT"):
            faults.parse(bad)
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.maybe_inject(1, 2)  # unset: nothing happens
    monkeypatch.setenv(faults.ENV, "rank=1,step=2,kind=raise")
    faults.maybe_inject(0, 2)
    faults.maybe_inject(1, 1)
    with pytest.raises(faults.InjectedFault):
        faults.maybe_inject(1, 2)
