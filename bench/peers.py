"""Peer rows: what a user would run instead of flux-dist, on the same random FLUX.2 [dev] weights
(``flux2-dev`` preset), the same inputs (``bench.common.pass_inputs``) and the same timing.

  python bench/peers.py single OUT.json [2048]
      diffusers eager bf16 (the baseline), then diffusers + torchao FP8 row-wise
      (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())) + regional compile
  torchrun --nproc-per-node 2 bench/peers.py ulysses OUT.json [2048]
      diffusers native context parallel (ContextParallelConfig(ulysses_degree=2)) eager, then the
      same model rebuilt with torchao FP8 + regional compile (bench/anchors/anchor3.py's order)
  torchrun --nproc-per-node 2 bench/peers.py xdit OUT.json [2048]
      xDiT (xfuser) USP, Ulysses 2: xFuserFlux2Transformer2DWrapper, the class xfuser's FLUX.2 runner
      loads for every non-PipeFusion layout, holding the preset's weights

``2048`` adds 2048x2048 rows (the FP8 + compile one recompiles for the new shape: minutes).

Every row runs in its own try/except: a row that fails is written as ``{"error": ..., "traceback":
...}`` and the next row still runs. Rank 0 rewrites OUT.json after every row, so a call killed in
the middle (device time limit, a hung collective) keeps the rows finished before it. Each row is a
``time_ms`` dict (median/min/max ms) plus the row's own numbers (first call s, quantize s, relative
error); ``bench/report.py`` turns any set of these JSONs into a table and a chart.

Environment: PEERS_DIFFUSERS_BACKEND (diffusers attention backend, default ``native``, as the
anchors), PEERS_XDIT_BACKEND (xfuser ``AttentionBackendType`` name, e.g. ``CUDNN``; default: xfuser's
own choice, which is cuDNN on an H200 without flash_attn).
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch

from bench.common import log, pass_inputs, time_ms, write_json

H = W = 1024
BIG = 2048
DIFFUSERS_BACKEND = os.environ.get("PEERS_DIFFUSERS_BACKEND", "native")
XDIT_BACKEND = os.environ.get("PEERS_XDIT_BACKEND") or None


# ----------------------------------------------------------------------------------------------
# rows


class Skip(RuntimeError):
    """A row that cannot run because an earlier step failed."""


def _error(e: BaseException) -> dict:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": tb[-4000:]}


def _versions() -> dict:
    from importlib import metadata

    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for pkg in ("diffusers", "torchao", "xfuser", "yunchang"):
        try:
            out[pkg] = metadata.version(pkg)
        except Exception:  # noqa: BLE001 - absent is an answer
            out[pkg] = None
    return out


def _device_name() -> str:
    try:
        return torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    except Exception as e:  # noqa: BLE001 - a broken driver is recorded, not raised
        return f"unknown ({type(e).__name__}: {e})"


def _set_local_device() -> torch.device:
    """This rank's GPU (torchrun's LOCAL_RANK), made current before anything touches CUDA."""
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(dev)
    return dev


class Rows:
    """One mode's rows, in order. Rank 0 writes the JSON after each row and prints the table."""

    def __init__(self, out: str, mode: str):
        self.out = out
        self.rank = int(os.environ.get("RANK", "0"))
        self.data: dict = {"meta": {
            "mode": mode, "argv": sys.argv[1:], "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "device": _device_name(), "diffusers_attention_backend": DIFFUSERS_BACKEND, **_versions()}}
        self.rows: list[str] = []

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        """Run one row (or set-up step) and record its dict, or its error; never raises."""
        t0 = time.perf_counter()
        try:
            row = dict(fn())
        except Exception as e:  # noqa: BLE001 - every failure becomes the row's text
            row = _error(e)
            print(f"[rank{self.rank}] {name} FAILED: {row['error']}", file=sys.stderr, flush=True)
            if not isinstance(e, Skip):
                print(row["traceback"], file=sys.stderr, flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row.setdefault("step_s", round(time.perf_counter() - t0, 3))
        self.data[name] = row
        self.rows.append(name)
        self.flush()
        log(f"{name}: {_line(row)}")
        return row

    def flush(self) -> None:
        if self.rank == 0:
            write_json(self.out, self.data)

    def finish(self) -> None:
        if torch.cuda.is_available():
            self.data["meta"]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.flush()
        log(f"--- {self.data['meta']['mode']} -> {self.out}")
        for name in self.rows:
            log(f"{name:<44} {_line(self.data[name])}")


def _line(row: dict) -> str:
    if "error" in row:
        return "ERROR " + row["error"].splitlines()[0][:160]
    parts = []
    if "median_ms" in row:
        parts.append(f"{row['median_ms']:.1f} ms (min {row['min_ms']:.1f}, max {row['max_ms']:.1f})")
    for k, fmt in (("first_call_s", "first call {:.1f} s"), ("quantize_s", "quantize {:.1f} s"),
                   ("rel_err_vs_bf16_eager", "rel err vs bf16 eager {:.3g}"),
                   ("rel_err_vs_1gpu_eager", "rel err vs 1 GPU eager {:.3g}"), ("build_s", "build {:.1f} s")):
        if row.get(k) is not None:
            parts.append(fmt.format(row[k]))
    return ", ".join(parts) or "ok"


def need(st: dict, key: str):
    if st.get(key) is None:
        raise Skip(f"skipped: {key!r} is unavailable because an earlier step failed")
    return st[key]


def rel_err(out: torch.Tensor, ref: torch.Tensor | None) -> float | None:
    if ref is None:
        return None
    out = out.float()
    return ((out - ref).norm() / ref.norm()).item()


def _sync_s(t0: float) -> float:
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _timing(res: int) -> dict:
    return {"warm": 2, "rep": 5} if res == H else {"warm": 1, "rep": 3}


def _free(st: dict, *keys: str) -> None:
    for k in keys:
        st.pop(k, None)
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# diffusers (+ torchao)


def build(dev: torch.device):
    """The ``flux2-dev`` preset's transformer: a plain diffusers ``Flux2Transformer2DModel``."""
    from flux_dist.models.presets import build_preset

    tr = build_preset("flux2-dev", dtype=torch.bfloat16, device=dev, seed=0).transformer.eval()
    tr.set_attention_backend(DIFFUSERS_BACKEND)
    return tr


def diffusers_fn(tr, dev: torch.device, res: int):
    kw = pass_inputs(dev, res, res)
    return lambda: tr(**kw, return_dict=False)[0]


def torchao_fp8(tr) -> float:
    """torchao FP8 row-wise dynamic quantization of every linear (anchor2/anchor3); seconds taken."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    t0 = time.perf_counter()
    quantize_(tr, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return _sync_s(t0)


def regional_compile(tr) -> None:
    """``torch.compile(fullgraph=True)`` on each of the 8 double and 48 single blocks (diffusers'
    ``compile_repeated_blocks``: every module whose class is in ``_repeated_blocks``)."""
    tr.compile_repeated_blocks(fullgraph=True)


def eager_row(st: dict, dev: torch.device, res: int, ref_key: str | None = None) -> dict:
    fn = diffusers_fn(need(st, "tr"), dev, res)
    row = time_ms(fn, **_timing(res))
    out = fn().float()
    if ref_key is None:
        st[f"ref{res}"] = out
    else:
        row["rel_err_vs_1gpu_eager"] = rel_err(out, st.get(f"{ref_key}{res}"))
    row["res"] = res
    return row


def compiled_row(st: dict, dev: torch.device, res: int, ref_name: str) -> dict:
    """First call (compile) timed on its own, then the usual timing; error vs the bf16 reference."""
    fn = diffusers_fn(need(st, "tr"), dev, res)
    t0 = time.perf_counter()
    out = fn().float()
    first = _sync_s(t0)
    row = time_ms(fn, **_timing(res))
    row.update(first_call_s=first, res=res)
    row[ref_name] = rel_err(out, st.get(f"ref{res}"))
    return row


@torch.inference_mode()
def single(out: str, big: bool) -> None:
    dev = _set_local_device()
    rows = Rows(out, "single")
    st: dict = {}
    res_list = [H, BIG] if big else [H]

    def setup():
        t0 = time.perf_counter()
        st["tr"] = build(dev)
        return {"build_s": _sync_s(t0)}

    rows.run("setup-build", setup)
    for res in res_list:
        rows.run("diffusers-eager" + ("" if res == H else f"-{res}"),
                 lambda res=res: eager_row(st, dev, res))

    def fp8():
        tr = need(st, "tr")
        st["tr"] = None  # a failure half-way leaves no usable model for the 2048 row
        q = torchao_fp8(tr)
        regional_compile(tr)
        st["tr"] = tr
        row = compiled_row(st, dev, H, "rel_err_vs_bf16_eager")
        row["quantize_s"] = q
        return row

    rows.run("diffusers-torchao-fp8-compile", fp8)
    if big:
        rows.run(f"diffusers-torchao-fp8-compile-{BIG}",
                 lambda: compiled_row(st, dev, BIG, "rel_err_vs_bf16_eager"))
    rows.finish()


# ----------------------------------------------------------------------------------------------
# diffusers native context parallel (Ulysses)


@torch.inference_mode()
def ulysses(out: str, big: bool) -> None:
    from flux_dist import distributed

    dev, ws = _set_local_device(), int(os.environ.get("WORLD_SIZE", "1"))
    rows = Rows(out, "ulysses")
    st: dict = {}
    res_list = [H, BIG] if big else [H]
    tag = f"diffusers-ulysses{ws}"
    rows.run("setup-dist", lambda: {"rank": distributed.init("cuda").rank})

    def parallelize(tr) -> None:
        from diffusers import ContextParallelConfig

        tr.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ws))

    def setup():
        if "error" in rows.data["setup-dist"]:
            raise Skip("skipped: no process group (setup-dist failed)")
        t0 = time.perf_counter()
        st["tr"] = tr = build(dev)
        for res in res_list:  # the 1-GPU diffusers output on the full inputs: the correctness reference
            st[f"ref{res}"] = diffusers_fn(tr, dev, res)().float()
        parallelize(tr)
        return {"build_s": _sync_s(t0)}

    rows.run("setup-build", setup)
    for res in res_list:
        rows.run(f"{tag}-eager" + ("" if res == H else f"-{res}"),
                 lambda res=res: eager_row(st, dev, res, ref_key="ref"))

    def fp8():
        # A fresh model, as anchor3.py: quantize -> enable_parallelism -> regional compile (the
        # attention backend is set in build(); anchor3 sets it after quantizing: same thing).
        need(st, "tr")
        _free(st, "tr")
        t0 = time.perf_counter()
        tr = build(dev)
        b = _sync_s(t0)
        q = torchao_fp8(tr)
        parallelize(tr)
        regional_compile(tr)
        st["tr"] = tr
        row = compiled_row(st, dev, H, "rel_err_vs_bf16_eager")
        row.update(quantize_s=q, build_s=b)
        return row

    rows.run(f"{tag}-torchao-fp8-compile", fp8)
    if big:
        rows.run(f"{tag}-torchao-fp8-compile-{BIG}",
                 lambda: compiled_row(st, dev, BIG, "rel_err_vs_bf16_eager"))
    rows.finish()
    distributed.shutdown()


# ----------------------------------------------------------------------------------------------
# xDiT (xfuser) USP


def xfuser_api(sequence_parallel: bool = True) -> dict:
    """The xfuser names the xdit mode uses; an ImportError says what is missing and where to look.

    ``import xfuser`` runs its package ``__init__``, which imports every pipeline wrapper: that is
    where optional packages bite. Hard requirements seen in xfuser 0.7.0's source: diffusers, einops
    (``core/distributed/ssta.py``), yunchang for any sequence parallel degree > 1
    (``config/config.py`` raises ImportError without it), and a CUDA device (yunchang's process
    groups are only imported when CUDA is available). flash_attn, PyAV, aiter, sageattention and
    transformer_engine are optional (probed inside try/except by ``xfuser/envs.py``).
    """
    try:
        from xfuser.config import xFuserArgs
        from xfuser.core.distributed import (
            get_runtime_state,
            get_sequence_parallel_world_size,
            get_ulysses_parallel_world_size,
            init_distributed_environment,
            initialize_model_parallel,
            initialize_runtime_state,
            model_parallel_is_initialized,
        )
        from xfuser.envs import PACKAGES_CHECKER
        from xfuser.model_executor.models.transformers.transformer_flux2 import xFuserFlux2Transformer2DWrapper
    except Exception as e:
        raise ImportError(
            f"xfuser could not be imported ({type(e).__name__}: {e}); on the device machine install the "
            "peers wheels (xfuser 0.7.0, yunchang 0.6.4, distvae 0.1.0) into /tmp/site and set PYTHONPATH"
        ) from e
    if sequence_parallel and not PACKAGES_CHECKER.get_packages_info().get("has_long_ctx_attn"):
        raise ImportError("xfuser found no usable yunchang (needed for any Ulysses/ring degree > 1); "
                          "xfuser only probes for it when CUDA is available")
    return dict(xFuserArgs=xFuserArgs, get_runtime_state=get_runtime_state,
                get_sequence_parallel_world_size=get_sequence_parallel_world_size,
                get_ulysses_parallel_world_size=get_ulysses_parallel_world_size,
                init_distributed_environment=init_distributed_environment,
                initialize_model_parallel=initialize_model_parallel,
                initialize_runtime_state=initialize_runtime_state,
                model_parallel_is_initialized=model_parallel_is_initialized,
                Wrapper=xFuserFlux2Transformer2DWrapper)


class _PipelineStub:
    """What xfuser's ``initialize_runtime_state`` reads from a pipeline: ``.transformer`` (its config's
    head count, checked against the Ulysses degree) and ``vae_scale_factor``. The runner passes a
    diffusers ``Flux2Pipeline`` there, whose denoising loop never touches the runtime state."""

    vae_scale_factor = 8

    def __init__(self, transformer):
        self.transformer = transformer


def xdit_setup(api: dict, ulysses_degree: int, ring_degree: int = 1, backend: str | None = None,
               attention_backend: str | None = None):
    """xfuser's start-up as its runner does it (``runner_models/base_model.py: initialize``):
    ``init_distributed_environment`` (torchrun's env://), the engine config from ``xFuserArgs``,
    the model-parallel groups (here explicitly, before the model exists) -> the engine config."""
    api["init_distributed_environment"](backend=backend)
    args = api["xFuserArgs"](model="flux2-dev-random", ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                             attention_backend=attention_backend)
    engine_config, _ = args.create_config()
    if not api["model_parallel_is_initialized"]():
        api["initialize_model_parallel"](sequence_parallel_degree=ulysses_degree * ring_degree,
                                         ulysses_degree=ulysses_degree, ring_degree=ring_degree, backend=backend)
    return engine_config


def xdit_transformer(api: dict, tr, engine_config):
    """``xFuserFlux2Transformer2DWrapper`` holding ``tr``'s weights (the same tensors, no copy).

    xfuser's FLUX.2 runner builds this class with ``from_pretrained`` for every layout without
    PipeFusion (``runner_models/flux.py: _load_model``) and hands it to a stock diffusers
    ``Flux2Pipeline``. The wrapper (a ``Flux2Transformer2DModel`` subclass) splits the image and text
    tokens and their ids over the sequence-parallel ranks, runs diffusers' forward with xfuser's
    processors (USP: Ulysses all-to-all of q/k/v, one combined all-to-all in the single blocks) and
    all-gathers the output. Built on the meta device, then given ``tr``'s tensors with
    ``load_state_dict(assign=True)``, as ``from_pretrained`` would load a checkpoint.
    """
    names = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
             "num_attention_heads", "joint_attention_dim", "timestep_guidance_channels", "mlp_ratio",
             "axes_dims_rope", "rope_theta", "eps", "guidance_embeds")
    cfg = {k: tr.config[k] for k in names if k in tr.config}
    with torch.device("meta"):
        w = api["Wrapper"](**cfg)
    w.load_state_dict(tr.state_dict(), strict=True, assign=True)
    w.eval().requires_grad_(False)
    meta = [n for n, t in [*w.named_parameters(), *w.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"xDiT wrapper left on the meta device: {meta[:5]}")
    api["initialize_runtime_state"](_PipelineStub(w), engine_config)
    return w


def xdit_fn(w, dev: torch.device, res: int):
    kw = pass_inputs(dev, res, res)
    return lambda: w(**kw, return_dict=False)[0]


@torch.inference_mode()
def xdit(out: str, big: bool) -> None:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    _set_local_device()  # before `import xfuser`, whose package probes touch the current GPU
    rows = Rows(out, "xdit")
    st: dict = {}
    res_list = [H, BIG] if big else [H]
    tag = f"xdit-ulysses{ws}"

    def setup_xfuser():
        st["api"] = api = xfuser_api(sequence_parallel=ws > 1)
        st["engine_config"] = xdit_setup(api, ulysses_degree=ws, attention_backend=XDIT_BACKEND)
        st["dev"] = torch.device("cuda", torch.cuda.current_device())
        return {"sp_world_size": api["get_sequence_parallel_world_size"](),
                "ulysses_world_size": api["get_ulysses_parallel_world_size"]()}

    def setup_build():
        api, dev = need(st, "api"), need(st, "dev")
        engine_config = need(st, "engine_config")
        t0 = time.perf_counter()
        tr = build(dev)
        for res in res_list:  # 1-GPU diffusers output on the full inputs, before the wrapper shares the weights
            st[f"ref{res}"] = diffusers_fn(tr, dev, res)().float()
        st["w"] = xdit_transformer(api, tr, engine_config)
        del tr
        backend = api["get_runtime_state"]().attention_backend
        st["backend"] = rows.data["meta"]["xdit_attention_backend"] = getattr(backend, "name", str(backend))
        return {"build_s": _sync_s(t0), "attention_backend": st["backend"]}

    def row(res: int):
        fn = xdit_fn(need(st, "w"), need(st, "dev"), res)
        t0 = time.perf_counter()
        out = fn().float()
        first = _sync_s(t0)
        r = time_ms(fn, **_timing(res))
        r.update(first_call_s=first, res=res, rel_err_vs_1gpu_eager=rel_err(out, st.get(f"ref{res}")),
                 attention_backend=st.get("backend"))
        return r

    rows.run("setup-xfuser", setup_xfuser)
    rows.run("setup-build", setup_build)
    for res in res_list:
        rows.run(f"{tag}-eager" + ("" if res == H else f"-{res}"), lambda res=res: row(res))
    if "error" in rows.data[f"{tag}-eager"] and XDIT_BACKEND is None and st.get("w") is not None:
        # xfuser's own pick (cuDNN on an H200) failed: one more try with plain SDPA, torch's choice.
        def sdpa():
            st["api"]["get_runtime_state"]().set_attention_backend("SDPA")
            st["backend"] = "SDPA"
            return row(H)

        rows.run(f"{tag}-eager-sdpa", sdpa)
    rows.finish()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


MODES = {"single": single, "ulysses": ulysses, "xdit": xdit}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in MODES:
        raise SystemExit(f"usage: bench/peers.py {{{'|'.join(MODES)}}} OUT.json [2048]")
    MODES[argv[0]](argv[1], big=str(BIG) in argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
