"""A rank that stops answering ends the job within 60 s, on every rank, naming it (issue 12, item 1).

The watchdog (``flux_dist/watchdog.py``): every rank beats into the rendezvous store and reads every
peer's beat from its own threads. A stopped process (SIGSTOP), a frozen one, or a stopped store host
ends every rank; a slow but live main thread does not. After start-up every process group, the
mesh's subgroups included, gets ``dist.timeout_s``, so a deadlock with live heartbeats ends too.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import yaml

from dist_utils import ROOT, TINY, cli_env, fault_time, run_distributed, torchrun

FAST_FAIL_S = 60.0


# -- the watchdog in one process (two ranks over one in-memory store) --------------------------

def _pair(window_s: float):
    import torch.distributed as dist

    from flux_dist.watchdog import Watchdog

    store = dist.HashStore()
    alarms: list[str] = []
    dogs = [Watchdog(dist.PrefixStore("t/", store), r, 2, window_s, on_alarm=alarms.append) for r in (0, 1)]
    return dogs, alarms


def test_watchdog_names_a_silent_peer():
    dogs, alarms = _pair(1.0)
    for d in dogs:
        d.start()
    time.sleep(0.5)
    assert dogs[0].silent_ranks() == [] and alarms == []
    dogs[1].stop(clean=False)  # rank 1 goes silent without saying it is done
    t = time.monotonic()
    while not alarms and time.monotonic() - t < 5:
        time.sleep(0.02)
    assert alarms and "[rank0] flux-dist: error: rank 1 stopped answering (last heartbeat" in alarms[0], alarms
    assert 0.8 <= time.monotonic() - t < 4  # the window (1 s), less up to one beat, plus scheduling
    assert dogs[0].silent_ranks(older_than_s=0.5) == [1]
    dogs[0].stop()


def test_watchdog_propagates_the_alarm_naming_the_same_rank():
    import torch.distributed as dist

    from flux_dist.watchdog import Watchdog

    store = dist.HashStore()
    alarms: list[str] = []
    # rank 1 would wait 4 s itself: it ends because rank 0 told it, naming the same rank
    dogs = [Watchdog(dist.PrefixStore("t/", store), r, 3, w, on_alarm=alarms.append) for r, w in enumerate((1, 4, 1))]
    for d in dogs:
        d.start()
    time.sleep(0.3)
    dogs[2].stop(clean=False)
    t = time.monotonic()
    while len(alarms) < 2 and time.monotonic() - t < 5:
        time.sleep(0.02)
    for d in dogs:
        d.stop()
    assert time.monotonic() - t < 3
    assert len(alarms) == 2 and all("rank 2 stopped answering" in a for a in alarms), alarms
    assert alarms[1].startswith("[rank1]") and alarms[1].endswith("reported by rank 0); ending the job"), alarms


def test_watchdog_clean_stop_and_slow_main_thread_are_no_alarm():
    dogs, alarms = _pair(1.0)
    for d in dogs:
        d.start()
    # The main thread busy for 3 windows (a compile, a long step): the beats come from another thread.
    busy = threading.Thread(target=lambda: sum(i * i for i in range(3_000_000)))
    busy.start()
    time.sleep(3.0)
    busy.join()
    dogs[1].stop()  # done: rank 1 finished, its silence from now on is no hang
    time.sleep(2.5)
    dogs[0].stop()
    assert alarms == []


# -- every group gets the short timeout after start-up ------------------------------------------

def _stuck_peer_in_subgroup(rank: int, world: int) -> float | None:
    import torch
    import torch.distributed as dist

    from flux_dist import distributed

    sub = dist.new_group([0, 1])  # as the mesh's Ulysses group: created during start-up
    distributed.set_timeout(3.0)
    if rank == 1:
        time.sleep(8)  # alive but never joins: no watchdog notices, only the collective timeout does
        return None
    t = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=sub)
    except RuntimeError:
        return time.monotonic() - t
    return float("inf")


def test_set_timeout_reaches_subgroups():
    waited, _ = run_distributed(_stuck_peer_in_subgroup, 2, timeout=120)
    assert 2.5 < waited < 7, waited


# -- the CLI under torchrun, real processes -----------------------------------------------------

def _config(tmp_path: Path, **dist_keys: float) -> list[str]:
    data = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    data["dist"] = dist_keys
    p = tmp_path / "tiny-dist.yaml"
    p.write_text(yaml.safe_dump(data))
    return [a if a != "configs/tiny.yaml" else str(p) for a in TINY]


def _run(tmp_path: Path, fault: str, args: list[str] = TINY):
    t0 = time.time()
    r = torchrun(2, "generate", *args, "--output", str(tmp_path / "x.png"), "--metrics", "",
                 env=cli_env(FLUX_DIST_FAULT=fault), timeout=180)
    return r, t0, time.time()


def test_torchrun_rank1_stopped_mid_denoise_ends_job(tmp_path):
    """`kill -STOP` rank 1 in the middle of the Ulysses all-to-alls: the job ends, naming rank 1."""
    r, t0, end = _run(tmp_path, "rank=1,step=1,kind=stop")
    assert r.returncode != 0
    fired = fault_time(r.stderr)
    assert t0 < fired and end - fired < FAST_FAIL_S, f"job took {end - fired:.1f} s to end after SIGSTOP"
    assert "[rank0] flux-dist: error: rank 1 stopped answering (last heartbeat" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "x.png").exists()


def test_torchrun_rank0_stopped_mid_denoise_ends_job(tmp_path):
    r, t0, end = _run(tmp_path, "rank=0,step=1,kind=stop")
    assert r.returncode != 0
    fired = fault_time(r.stderr)
    assert t0 < fired and end - fired < FAST_FAIL_S, f"job took {end - fired:.1f} s to end after SIGSTOP"
    assert "[rank1] flux-dist: error: rank 0 stopped answering (last heartbeat" in r.stderr, r.stderr[-3000:]


def test_torchrun_slow_but_live_rank_is_no_alarm(tmp_path):
    """Rank 1's main thread sleeps 2.5 watchdog windows mid-denoise: the job waits and succeeds."""
    args = _config(tmp_path, watchdog_s=4)
    r, _, _ = _run(tmp_path, "rank=1,step=1,kind=sleep,seconds=10", args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped answering" not in r.stderr
    assert (tmp_path / "x.png").exists()


def test_torchrun_deadlock_with_live_heartbeats_ends_on_the_collective_timeout(tmp_path):
    """Rank 1's main thread never reaches the next all-to-all (on the Ulysses subgroup) but its
    heartbeat goes on: rank 0's collective fails after dist.timeout_s and the job ends."""
    args = _config(tmp_path, timeout_s=6)
    r, t0, end = _run(tmp_path, "rank=1,step=1,kind=hang", args)
    assert r.returncode != 0
    fired = fault_time(r.stderr)
    assert t0 < fired and end - fired < 6 + 30, f"job took {end - fired:.1f} s to end after the hang"
    assert "stopped answering" not in r.stderr


# -- the server: an idle rank stopped ------------------------------------------------------------

def _stopped_server_ends(tmp_path: Path, launcher: str, stopped: int) -> None:
    import signal

    from server_utils import SMALL, Server

    s = Server(["--config", "configs/tiny.yaml", *SMALL], launcher=launcher, log_path=tmp_path / "server.log")
    try:
        s.wait_ready()
        t0 = time.monotonic()
        import os

        os.kill(s.rank_pid(stopped), signal.SIGSTOP)
        if stopped == 1:  # rank 0 still answers HTTP: /health turns 503 before the watchdog ends the job
            from server_utils import call

            seen = None
            while seen is None and time.monotonic() - t0 < FAST_FAIL_S:
                try:
                    status, _, body = call(s.port, "GET", "/health", timeout=2)
                except OSError:
                    break  # the job already ended
                if status == 503:
                    seen = body.decode()
                time.sleep(0.3)
            assert seen is not None and "rank(s) 1 not answering" in seen, (seen, s.log())
        codes = s.wait(FAST_FAIL_S)
        took = time.monotonic() - t0
        assert all(c not in (0, None) for c in codes), (codes, s.log())
        assert took < FAST_FAIL_S, took
        other = 1 - stopped
        assert f"[rank{other}] flux-dist: error: rank {stopped} stopped answering" in s.log(), s.log()
        if launcher == "env":  # no launcher to end the stopped rank: the watchdog kills it
            assert "killed its process" in s.log(), s.log()
    finally:
        s.stop()


def test_serve_idle_rank1_stopped_ends_server_under_torchrun(tmp_path):
    _stopped_server_ends(tmp_path, "torchrun", 1)


def test_serve_rank0_store_host_stopped_ends_server(tmp_path):
    """Ranks started as plain processes (as Slurm's tasks mode or Ray do): rank 0 hosts the rendezvous
    store, so stopping it stops the store too; rank 1 still ends, naming rank 0, and kills it."""
    _stopped_server_ends(tmp_path, "env", 0)
