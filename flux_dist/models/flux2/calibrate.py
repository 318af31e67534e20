"""Calibration data for ModelOpt: prompts through flux-dist's denoise loop, on the *unfused* transformer.

The engine's parallelize step fuses q/k/v into one new linear (``fuse_qkv``) and splits the single
blocks' projections (``split_out`` / ``split_for_overlap``); those new modules would be plain linears
built from the weights, bypassing the quantizers ModelOpt put on diffusers' own ``to_q`` / ``to_k`` /
... So calibration runs the adapter's request pieces (encode, noise, schedule, prepare, the step, the
Euler update) on one process with diffusers' own attention processors and no fusion or split: every
linear the plan quantizes is the very module ModelOpt wrapped, and sees the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...parallel.cfg import guided
from ..components import Components
from . import Flux2Adapter


@dataclass(frozen=True)
class CalibRequest:
    height: int = 1024
    width: int = 1024
    steps: int = 28
    guidance: float = 4.0
    max_seq_len: int = 512
    seed: int = 0


def calibration_loop(c: Components, prompts: list[str], req: CalibRequest, device: torch.device,
                     dtype: torch.dtype) -> Callable[[nn.Module], None]:
    """ModelOpt's ``forward_loop``: every prompt denoised for ``req.steps`` steps (prompt ``i`` with seed
    ``req.seed + i``); under true CFG ([klein] base) the negative branch runs too."""
    adapter = Flux2Adapter(c, device)
    fns = adapter.step_fns

    def loop(tr: nn.Module) -> None:
        if tr is not adapter.tr:
            raise ValueError("calibration_loop: ModelOpt handed another module than the transformer")
        for i, prompt in enumerate(prompts):
            seed = req.seed + i
            cfg = adapter.true_cfg and req.guidance > 1.0
            enc = adapter.encode([prompt, ""] if cfg else [prompt], req.max_seq_len, seed, dtype)
            x, img_ids = adapter.noise(req.height, req.width, seed, enc[0][0].dtype)
            timesteps, sigmas = adapter.schedule(req.steps, x.shape[1])
            branches = [adapter.prepare(e, ids, img_ids, req.guidance) for e, ids in enc]
            for k, t in enumerate(timesteps):
                ts = t.expand(1).to(x.dtype) / 1000
                v = adapter.forward(x, ts, branches[0], adapter.stack, fns)
                if cfg:
                    v = guided(v, adapter.forward(x, ts, branches[1], adapter.stack, fns), req.guidance)
                x = fns.update(x, v, sigmas[k], sigmas[k + 1])

    return loop
