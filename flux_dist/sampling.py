"""Flow-matching Euler with FLUX.2's resolution-dependent timestep shift (as diffusers computes it).

The schedule comes from the model's own scheduler config, so a fine-tune's scheduler settings are
honoured; the Euler update is written out here because it is elementwise and runs on each shard.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from .errors import NotSupportedError


def schedule(scheduler, steps: int, image_seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)``: ``steps`` timesteps and ``steps + 1`` sigmas ending at 0."""
    if getattr(scheduler.config, "stochastic_sampling", False):
        raise NotSupportedError("stochastic_sampling schedulers are not supported (the step must be deterministic)")
    sched = copy.deepcopy(scheduler)  # set_timesteps mutates; the loaded scheduler stays pristine
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(sched.config, "use_flow_sigmas", False):
        sigmas = None
    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)
    sched.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    return sched.timesteps, sched.sigmas.to(device)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """``x + (sigma_next - sigma) * v`` in float32, cast to the model dtype (diffusers' rounding)."""
    return (x.to(torch.float32) + (sigma_next - sigma) * v).to(v.dtype)
