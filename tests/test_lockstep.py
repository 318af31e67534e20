"""lockstep: every rank takes rank 0's stop verdict at the same step (2 gloo processes, a fake engine:
this module imports no model code, so the spawned ranks start fast)."""

from __future__ import annotations

from dist_utils import run_distributed


def _stop_at_step(rank: int, world: int, stop_at: int) -> dict:
    """A fake engine that runs 10 "steps" calling control(step); rank 0 alone says stop at ``stop_at``."""
    import torch

    from flux_dist.lockstep import run_together, step_control

    class FakeEngine:
        class dist:  # noqa: N801 - the engine's attribute name
            device = torch.device("cpu")

        ran: list[int] = []

        def generate(self, req, control=None):
            for i in range(10):
                control(i)
                self.ran.append(i)
            return "done"

    eng = FakeEngine()
    check = (lambda: "deadline" if len(eng.ran) >= stop_at else None) if rank == 0 else None
    stopped = run_together(eng, ["req"], control=step_control(eng.dist.device, check))
    eng.ran.clear()
    finished = run_together(eng, ["req"], control=step_control(eng.dist.device, None))  # still in step
    return {"stopped": (stopped.ok, stopped.stopped, stopped.stopped_step), "ran": len(eng.ran),
            "finished": (finished.ok, finished.results)}


def test_step_control_stops_every_rank_at_the_same_step():
    r0, r1 = run_distributed(_stop_at_step, 2, 3, timeout=120)
    assert r0["stopped"] == r1["stopped"] == (False, "deadline", 3)  # rank 1 never saw the deadline itself
    assert r0["finished"] == r1["finished"] == (True, ["done"]) and r0["ran"] == r1["ran"] == 10


def test_step_control_on_one_process_needs_no_process_group():
    r = _stop_at_step(0, 1, 5)
    assert r["stopped"] == (False, "deadline", 5) and r["finished"] == (True, ["done"]) and r["ran"] == 10
