"""Issue 14/17: ``quant.swiglu.swiglu_fp8``'s CUDA kernel at FLUX.2 [dev]'s single-block shape (4608 tokens, F =
18432, rank-64 correction and projection), against its torch path: scale and E4M3 agreement, and CUDA-event
medians of the kernel with the bandwidth of one read of its input (the compiled path's time is in the pass
profile).

  python3 bench/swiglu_check.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import time_ms  # noqa: E402
from flux_dist.quant.swiglu import swiglu_fp8_reference  # noqa: E402
from flux_dist.quant.swiglu_kernel import swiglu_fp8_cuda  # noqa: E402


def main() -> None:
    dev, M, F, R, col = torch.device("cuda"), 4608, 18432, 64, 18432
    g = torch.Generator(device=dev).manual_seed(0)
    y = torch.randn(M, col + 2 * F, generator=g, device=dev).bfloat16()
    h = (torch.randn(M, R, generator=g, device=dev) * 0.5).bfloat16()
    b = (torch.randn(2 * F, R, generator=g, device=dev) * 0.02).bfloat16()
    a = (torch.randn(R, F, generator=g, device=dev) * 0.01).bfloat16()
    print("| case | scale max rel diff | E4M3 values differing | kernel ms | bytes / kernel time |")
    print("| --- | --- | --- | --- | --- |")
    for name, args in (("plain", (None, None, None)), ("lora in + out", (h, b, a))):
        q0, s0, p0 = swiglu_fp8_reference(y, col, F, *args)
        q1, s1, p1 = swiglu_fp8_cuda(y, col, F, *args)
        sd = ((s0 - s1).abs() / s0).max().item()
        qd = (q0.float() != q1.float()).float().mean().item()
        tk = time_ms(lambda args=args: swiglu_fp8_cuda(y, col, F, *args), warm=3, rep=20)["median_ms"]
        byts = M * 2 * F * 2 + M * F
        print(f"| {name} | {sd:.2e} | {100 * qd:.3f}% | {tk:.3f} | {byts / tk / 1e9:.2f} TB/s (one read) |")
        if p0.numel():
            print(f"|   projection max rel diff | {((p0 - p1).abs().max() / p0.abs().max()).item():.2e} | | | |")


if __name__ == "__main__":
    main()
