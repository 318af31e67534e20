"""Issue 14: FLOPs and bytes of the LoRA bank per FLUX.2 [dev] pass (1024x1024, 1 GPU, FP8), by linear, for the
first bank ("v1") and the in-place / SwiGLU-fused bank, against the base FP8 GEMMs. CPU only, no torch.

  python bench/lora_count.py [RANK] [ADAPTERS] [RES]        # default 64 1 1024

Each kernel costs max(FLOP / peak, bytes / HBM) (H200: bf16 ~700 TFLOP/s at these shapes, FP8 ~1250, HBM ~4 TB/s);
bf16 activations (2 bytes). Per targeted linear, rank-space width R = adapters x rank x pieces (the fused q/k/v's
B is block diagonal over its 3 pieces):

* A GEMM: reads x (M x K), writes h (M x R); the per-slot scale: a pass over h (small).
* v1: the B GEMM writes the delta d (M x N), and compiled the add ``y + d`` is a kernel of its own that reads y and
  d and writes the sum (inductor realizes it: it feeds an extern kernel, e.g. attention; on CPU it does the same)
  -> 4 passes over M x N. (Out-of-place ``addmm``, which inductor forms for 2-D inputs, is the same 4: ATen copies
  y into the result, then the GEMM reads and writes it.)
* in place (``ops.lora_addmm_``): one GEMM with beta = 1 reads and writes y -> 2 passes.
* SwiGLU-fused (``ops.lora_swiglu``; the MLP inputs: double ff_in, single qkv_mlp's MLP columns): the delta is
  computed inside the activation's kernel, which reads y anyway -> 0 passes (its FLOPs counted as not overlapped).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from bench.gemm.shapes import DIM, MLP, pass_linears

BF16, FP8, HBM = 700e12, 1250e12, 4.0e12
MEASURED = {"no LoRA": 297.7, "v1 one adapter": 335.2}  # BENCHMARKS.md, issue 14 (one H200, full stack)


@dataclass
class Row:
    name: str
    M: int
    K: int
    N: int
    count: int
    fp8: bool
    pieces: int = 1
    swiglu_cols: int = 0  # output columns that feed a SwiGLU (delta fused into it)


def rows(res: int) -> list[Row]:
    out = []
    for lin in pass_linears(res, 1):
        pieces = 3 if lin.name.endswith(".qkv") and lin.name.startswith("double") else 1
        sw = 2 * MLP if lin.name.endswith("ff_in") or lin.name == "single.qkv_mlp" else 0
        out.append(Row(lin.name, lin.M, lin.K, lin.N, lin.count, lin.fp8, pieces, sw))
    return out


def t(flop: float, byts: float, peak: float = BF16) -> float:
    return max(flop / peak, byts / HBM)


def count(r: Row, rank: int, adapters: int) -> dict:
    M, K, N = r.M, r.K, r.N
    R = adapters * rank * r.pieces
    base_flop = 2 * M * K * N
    base_bytes = (3 * M * K + M * K + N * K + 2 * M * N) if r.fp8 else (2 * M * K + 2 * N * K + 2 * M * N)
    a_flop, a_bytes = 2 * M * K * R, 2 * M * K + 2 * K * R + 2 * M * R
    s_bytes = 4 * M * R
    b_flop, b_small = 2 * M * R * N, 2 * M * R + 2 * N * R
    waste = b_flop * (1 - 1 / r.pieces)
    side = t(a_flop, a_bytes) + t(0, s_bytes)
    v1 = side + t(b_flop, b_small + 2 * M * N) + t(0, 6 * M * N)
    inplace_cols = N - r.swiglu_cols
    new = side + t(2 * M * R * inplace_cols, b_small + 4 * M * inplace_cols) + (
        2 * M * R * r.swiglu_cols / BF16 if r.swiglu_cols else 0.0)
    return {"base_flop": base_flop, "base_ms": 1e3 * t(base_flop, base_bytes, FP8 if r.fp8 else BF16),
            "lora_flop": a_flop + b_flop, "waste_flop": waste, "v1_bytes": a_bytes + s_bytes + b_small + 8 * M * N,
            "new_bytes": a_bytes + s_bytes + b_small + 4 * M * inplace_cols,
            "a_ms": 1e3 * side, "v1_ms": 1e3 * v1, "new_ms": 1e3 * new}


def main(rank: int = 64, adapters: int = 1, res: int = 1024) -> dict:
    tot: dict[str, float] = {}
    print(f"FLUX.2 [dev] {res}x{res}, 1 GPU, FP8 base; {adapters} adapter(s) of rank {rank} on every block linear; "
          f"per pass (x count). hidden {DIM}")
    print(f"{'linear':17s} {'MxKxN':>19s} {'x':>3s} {'base GF':>8s} {'base ms':>7s} {'LoRA GF':>8s} {'zeros':>6s} "
          f"{'v1 GB':>6s} {'v1 ms':>6s} {'new GB':>6s} {'new ms':>6s}")
    for r in rows(res):
        c = count(r, rank, adapters)
        for k, v in c.items():
            tot[k] = tot.get(k, 0.0) + v * r.count
        print(f"{r.name:17s} {r.M:5d}x{r.K:5d}x{r.N:5d} {r.count:3d} {c['base_flop'] * r.count / 1e9:8.0f} "
              f"{c['base_ms'] * r.count:7.2f} {c['lora_flop'] * r.count / 1e9:8.0f} "
              f"{c['waste_flop'] * r.count / 1e9:6.0f} {c['v1_bytes'] * r.count / 1e9:6.1f} "
              f"{c['v1_ms'] * r.count:6.2f} "
              f"{c['new_bytes'] * r.count / 1e9:6.1f} {c['new_ms'] * r.count:6.2f}")
    print(f"{'total':17s} {'':19s} {'':3s} {tot['base_flop'] / 1e9:8.0f} {tot['base_ms']:7.2f} "
          f"{tot['lora_flop'] / 1e9:8.0f} {tot['waste_flop'] / 1e9:6.0f} {tot['v1_bytes'] / 1e9:6.1f} "
          f"{tot['v1_ms']:6.2f} {tot['new_bytes'] / 1e9:6.1f} {tot['new_ms']:6.2f}")
    base = MEASURED["no LoRA"]
    cal = (MEASURED["v1 one adapter"] - base) / tot["v1_ms"] if (rank, adapters, res) == (64, 1, 1024) else 1.0
    print(f"A side (A GEMM + scale) {tot['a_ms']:.2f} ms of it. Model v1 {tot['v1_ms']:.1f} ms"
          + (f" vs measured {MEASURED['v1 one adapter'] - base:.1f} ms (x{cal:.2f})" if cal != 1.0 else ""))
    print(f"predicted new bank: {tot['new_ms']:.1f} ms model, {tot['new_ms'] * cal:.1f} ms calibrated = "
          f"{100 * tot['new_ms'] * cal / base:.1f}% of the {base} ms pass (goal <= 5%)")
    return tot


if __name__ == "__main__":
    a = [int(v) for v in sys.argv[1:4]]
    main(*a)
