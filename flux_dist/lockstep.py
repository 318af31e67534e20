"""Lock-step helpers shared by every multi-rank mode (the server, batch): one message from rank 0,
one job computed by every rank, one agreed outcome, and a stop that every rank takes at the same step.

- ``broadcast(msg, device)``: rank 0's message on every rank.
- ``run_together(engine, requests, control=None)``: every rank generates the same requests, then the
  ranks agree on the outcome (one ``all_reduce``), so a failure on one rank is the job's failure on
  all of them and nobody is left waiting in a collective.
- ``step_control(device, check)``: the ``control(step)`` callable ``Engine.generate`` calls before every
  denoise step on every rank. Rank 0's ``check()`` names a stop reason (deadline, client gone, shutdown);
  one ``all_reduce(MAX)`` of a small code per step gives every rank the same verdict at the same step,
  and every rank raises the same ``RequestStopped``.

Each takes an optional ``team``: the ranks that run the job together (anything with ``group``, a process
group, and ``ranks``, its global ranks, the first one leading: a ``Mesh`` of one replica group). None is
every rank on the default group.

Failure types: ``FatalError`` (the ranks can no longer be trusted to be in step: end the process),
``RequestStopped`` (the request was stopped on purpose, every rank at the same step; the ranks stay in
step and serve on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .errors import FluxDistError

log = logging.getLogger("flux_dist")

# Stop reasons, in increasing precedence (the agreed code is the MAX over ranks): index + 1 is the code.
DEADLINE, CANCELLED, SHUTDOWN = "deadline", "cancelled", "shutdown"
STOP_REASONS = (DEADLINE, CANCELLED, SHUTDOWN)


class FatalError(RuntimeError):
    """The ranks can no longer be trusted to be in step: end the server (or the batch)."""


class RequestStopped(Exception):
    """Raised by ``control(step)`` on every rank at the same step: the request is abandoned on purpose.

    ``reason`` is one of ``STOP_REASONS``; ``step`` the denoise step that was not run.
    """

    def __init__(self, reason: str, step: int) -> None:
        super().__init__(f"stopped before denoise step {step}: {reason}")
        self.reason, self.step = reason, step


@dataclass
class JobOutcome:
    """What every rank knows after a job: all ranks succeeded (results on rank 0) or the errors."""

    ok: bool
    results: list[Any]  # engine Results (rank 0 holds the images)
    errors: list[str]  # one line per failing rank, "rank R: message"
    bad_request: bool = False  # every failing rank raised FluxDistError: the input's fault (400)
    stopped: str | None = None  # a STOP_REASONS entry when the job was stopped at a step boundary
    stopped_step: int | None = field(default=None)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _team(team: Any) -> tuple[Any, list[int]]:
    """``(process group, global ranks)`` of a team; None: the default group, every rank."""
    if team is None:
        return None, list(range(world_size()))
    return team.group, list(team.ranks)


def broadcast(msg: tuple | None, device: torch.device, team: Any = None) -> tuple:
    """The team leader's (rank 0's) ``msg`` on every rank of the team (``msg`` is ignored elsewhere)."""
    group, ranks = _team(team)
    if len(ranks) == 1:
        assert msg is not None
        return msg
    box = [msg]
    dist.broadcast_object_list(box, src=ranks[0], group=group, device=device if device.type == "cuda" else None)
    return box[0]


Control = Callable[[int], None]


def step_control(device: torch.device, check: Callable[[], str | None] | None, team: Any = None) -> Control:
    """``control(step)`` for ``Engine.generate``: call it on every rank, before every denoise step.

    ``check()`` (the leader's; None elsewhere) returns a ``STOP_REASONS`` entry or None. With more than one
    process every call is one ``all_reduce(MAX)`` of one int32 on the team's group, so every rank
    reaches the same verdict at the same step and raises the same ``RequestStopped``. One process: no
    collective. A failed collective raises ``torch.distributed.DistError`` (``run_together`` makes it fatal).
    """
    group, ranks = _team(team)
    flag = torch.zeros(1, dtype=torch.int32, device=device) if len(ranks) > 1 else None

    def control(step: int) -> None:
        reason = check() if check is not None else None
        code = STOP_REASONS.index(reason) + 1 if reason else 0
        if flag is not None:
            flag.fill_(code)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            code = int(flag.item())
        if code:
            raise RequestStopped(STOP_REASONS[code - 1], step)

    return control


def run_together(engine: Any, requests: list[Any], control: Control | None = None, team: Any = None) -> JobOutcome:
    """Generate ``requests`` on every rank (of the team), then agree on the outcome (call on every one of
    them, same requests).

    An exception on one rank is caught there; the agreement makes it a failure of the job everywhere.
    ``RequestStopped`` (raised by ``control`` on every rank at the same step) is a stopped job, not a
    failure. A failed collective (``torch.distributed.DistError``) is re-raised as ``FatalError``.
    """
    results: list[Any] = []
    err: BaseException | None = None
    stopped: RequestStopped | None = None
    try:
        for r in requests:
            results.append(engine.generate(r) if control is None else engine.generate(r, control=control))
    except dist.DistError as e:
        raise FatalError(f"a collective failed during a job: {e}") from e
    except RequestStopped as e:
        stopped = e
        log.info("job %s", e)
    except Exception as e:  # noqa: BLE001 - any model failure must be reported, not kill the rank
        err = e
        log.error("job failed on this rank: %s: %s", type(e).__name__, e)
    code = STOP_REASONS.index(stopped.reason) + 1 if stopped else 0
    group, ranks = _team(team)
    if len(ranks) == 1:
        failed, model_failed = err is not None, err is not None and not isinstance(err, FluxDistError)
        errors = [f"rank {ranks[0]}: {err}"] if err is not None else []
    else:
        try:
            flags = torch.tensor([int(err is not None), int(err is not None and not isinstance(err, FluxDistError)),
                                  code], device=engine.dist.device, dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
            failed, model_failed, code = (int(v) for v in flags.tolist())
            errors = []
            if failed:  # rare path: every rank knows it is taken, so this collective is matched too
                gathered: list[Any] = [None] * len(ranks)
                dist.all_gather_object(gathered, None if err is None else f"{type(err).__name__}: {err}", group=group)
                errors = [f"rank {r}: {m}" for r, m in zip(ranks, gathered, strict=True) if m is not None]
        except Exception as e:
            raise FatalError(f"the ranks could not agree on a job's outcome: {e}") from e
    if failed:
        return JobOutcome(False, [], errors, bad_request=not model_failed)
    if code:
        reason = STOP_REASONS[code - 1]
        step = stopped.step if stopped else None
        return JobOutcome(False, [], [f"stopped before denoise step {step}: {reason}"], stopped=reason,
                          stopped_step=step)
    return JobOutcome(True, results, [])
