"""Shared pieces of the device benchmarks: timing with CUDA events, FLUX.2 [dev] pass inputs."""

from __future__ import annotations

import json
import os
import statistics

import torch


def log(*a) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, flush=True)


def time_ms(fn, warm: int = 2, rep: int = 5) -> dict:
    """Median / min / max of ``rep`` calls after ``warm`` warm-ups, timed with CUDA events."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "n": rep}


def pass_inputs(device, h: int, w: int, txt: int = 512, dim: int = 15360, guidance: bool = True) -> dict:
    """The anchor script's inputs (bench/anchors/anchor_bench.py): packed latents, random embeddings."""
    lh, lw = h // 16, w // 16
    n = lh * lw
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, n, 128, device=device, dtype=torch.bfloat16, generator=g)
    e = torch.randn(1, txt, dim, device=device, dtype=torch.bfloat16, generator=g)
    ii = torch.zeros(lh, lw, 4, device=device)
    ii[..., 1] = torch.arange(lh, device=device)[:, None]
    ii[..., 2] = torch.arange(lw, device=device)[None, :]
    txt_ids = torch.zeros(1, txt, 4, device=device)
    txt_ids[..., 3] = torch.arange(txt, device=device)
    return dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.full((1,), 0.5, device=device,
                dtype=torch.bfloat16), guidance=torch.full((1,), 4.0, device=device, dtype=torch.bfloat16)
                if guidance else None, img_ids=ii.reshape(1, n, 4), txt_ids=txt_ids)


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
