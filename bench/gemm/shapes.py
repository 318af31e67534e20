"""FLUX.2 [dev]'s block linears as GEMM shapes (M tokens x K in x N out), per pass and per layout.

Derived from diffusers 0.42.1 ``Flux2Transformer2DModel`` with the ``flux2-dev`` preset config
(``flux_dist/models/full.py``: 8 double blocks, 48 single blocks, 48 heads x 128 = 6144, mlp_ratio 3
-> MLP hidden 18432, SwiGLU so the MLP input projection is 2 x 18432 = 36864 wide, no biases) and
flux-dist's layouts (``flux_dist/models/flux2/attention.py``):

* double block, image stream (FP8): ``fd_qkv.img`` (to_q/k/v fused) 6144 -> 18432, ``to_out.0``
  6144 -> 6144, ``ff.linear_in`` 6144 -> 36864, ``ff.linear_out`` 18432 -> 6144.
* double block, text stream: ``ff_context.linear_in`` / ``linear_out`` in FP8; the text attention
  projections ``fd_qkv.txt`` (6144 -> 18432) and ``to_add_out`` (6144 -> 6144) stay bf16 (NVIDIA's
  recipe, ``flux_dist/models/flux2/quant_plan.py``).
* single block (text + image tokens): ``to_qkv_mlp_proj`` 6144 -> 18432 + 36864 = 55296 on 1 GPU;
  under Ulysses it is split into ``fd_split.qkv`` 6144 -> 18432 and ``fd_split.mlp`` 6144 -> 36864.
  ``to_out`` (24576 -> 6144) is always split when quantized: ``fd_out.attn`` 6144 -> 6144 and
  ``fd_out.mlp`` 18432 -> 6144.

Tokens: 1024x1024 -> 4096 image tokens (VAE /8 then 2x2 patches: (1024/16)^2), 2048x2048 -> 16384;
512 text tokens. Sharded 2 ways (Ulysses / ring), each rank holds half of each stream's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

DIM, MLP, TXT = 6144, 18432, 512
N_DOUBLE, N_SINGLE = 8, 48


@dataclass(frozen=True)
class Linear:
    name: str  # which linear of which block
    M: int
    K: int
    N: int
    count: int  # how many times one transformer pass runs it
    fp8: bool = True  # False: stays bf16 in flux-dist's quantization plan

    @property
    def flop(self) -> float:
        return 2.0 * self.M * self.K * self.N

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.M, self.K, self.N)


def pass_linears(res: int = 1024, shards: int = 1) -> list[Linear]:
    """The block linears of one transformer pass at ``res`` x ``res`` on one of ``shards`` ranks."""
    img = (res // 16) ** 2 // shards
    txt = TXT // shards
    tok = img + txt
    out = [
        Linear("double.img.qkv", img, DIM, 3 * DIM, N_DOUBLE),
        Linear("double.img.out", img, DIM, DIM, N_DOUBLE),
        Linear("double.img.ff_in", img, DIM, 2 * MLP, N_DOUBLE),
        Linear("double.img.ff_out", img, MLP, DIM, N_DOUBLE),
        Linear("double.txt.ff_in", txt, DIM, 2 * MLP, N_DOUBLE),
        Linear("double.txt.ff_out", txt, MLP, DIM, N_DOUBLE),
        Linear("double.txt.qkv", txt, DIM, 3 * DIM, N_DOUBLE, fp8=False),
        Linear("double.txt.out", txt, DIM, DIM, N_DOUBLE, fp8=False),
    ]
    if shards == 1:
        out.append(Linear("single.qkv_mlp", tok, DIM, 3 * DIM + 2 * MLP, N_SINGLE))
    else:
        out += [Linear("single.qkv", tok, DIM, 3 * DIM, N_SINGLE),
                Linear("single.mlp_in", tok, DIM, 2 * MLP, N_SINGLE)]
    out += [Linear("single.out_attn", tok, DIM, DIM, N_SINGLE),
            Linear("single.out_mlp", tok, MLP, DIM, N_SINGLE)]
    return out


LAYOUTS = {f"{r}x{r}/{s}": (r, s) for r in (1024, 2048) for s in (1, 2)}


def all_layouts() -> dict[str, list[Linear]]:
    return {name: pass_linears(r, s) for name, (r, s) in LAYOUTS.items()}


def unique_shapes(layouts: dict[str, list[Linear]] | None = None, fp8_only: bool = False) -> list[tuple[int, int, int]]:
    seen: dict[tuple[int, int, int], None] = {}
    for lins in (layouts or all_layouts()).values():
        for lin in lins:
            if lin.fp8 or not fp8_only:
                seen.setdefault(lin.key)
    return list(seen)


def pass_flop(lins: list[Linear], fp8_only: bool = False) -> float:
    return sum(lin.flop * lin.count for lin in lins if lin.fp8 or not fp8_only)


if __name__ == "__main__":
    for name, lins in all_layouts().items():
        print(f"{name}: {pass_flop(lins):.3e} FLOP per pass in block linears "
              f"({pass_flop(lins, True):.3e} in FP8)")
        for lin in lins:
            print(f"  {lin.name:20s} M={lin.M:6d} K={lin.K:6d} N={lin.N:6d} x{lin.count:2d} "
                  f"{'fp8' if lin.fp8 else 'bf16'}")
    print(len(unique_shapes(fp8_only=True)), "unique FP8 shapes,", len(unique_shapes()), "in all")
