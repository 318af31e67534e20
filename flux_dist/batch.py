"""Batch mode: one launch, one model load, every line of a prompts file an image.

Rank 0 reads the file and broadcasts the parsed lines, so every rank walks the same list; each
line is checked with ``Engine.validate`` before any collective (the same verdict on every rank,
so all ranks skip a bad line together) and run with the lock-step agreement (``lockstep.run_together``),
so a model failure on one line is reported and the rest still run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import FluxDistError
from .images import read_images
from .lockstep import broadcast, run_together
from .server.protocol import request_fields

log = logging.getLogger("flux_dist")

LINE_FIELDS = {"prompt", "negative_prompt", "seed", "size", "height", "width", "steps", "num_inference_steps",
               "guidance", "guidance_scale", "lora", "images"}
EXIT_SOME_FAILED = 3


def parse_lines(text: str, *, jsonl: bool, true_cfg: bool) -> list[tuple[int, dict[str, Any] | str]]:
    """``(line number, request fields)`` per request line, or ``(line number, error message)``.

    Plain text: one prompt a line. JSONL: one object a line with ``prompt`` and optionally ``seed``,
    ``size`` ("WxH") or ``height``/``width``, ``steps``, ``guidance``, ``negative_prompt``, ``lora``
    (``{"NAME": scale}`` of adapters loaded at start; replaces the ``--lora`` default, ``{}`` for none),
    ``images`` (reference image paths, in order; relative to the working directory). Blank lines and lines
    starting with ``#`` are skipped in both.
    """
    out: list[tuple[int, dict[str, Any] | str]] = []
    for no, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not jsonl:
            out.append((no, {"prompt": s}))
            continue
        try:
            obj = json.loads(s)
            if not isinstance(obj, dict):
                raise FluxDistError(f"a line must be a JSON object, got {type(obj).__name__}")
            unknown = sorted(set(obj) - LINE_FIELDS)
            if unknown:
                raise FluxDistError(f"unknown field(s) {', '.join(map(repr, unknown))} "
                                    f"(known: {', '.join(sorted(LINE_FIELDS))})")
            images = obj.pop("images", [])
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise FluxDistError("'images' must be a list of image file paths")
            out.append((no, {**request_fields(obj, true_cfg=true_cfg), **({"images": images} if images else {})}))
        except json.JSONDecodeError as e:
            out.append((no, f"not valid JSON: {e}"))
        except FluxDistError as e:
            out.append((no, str(e)))
    return out


def _read_line_images(item: dict[str, Any], cfg: RunConfig) -> list[Any] | str:
    """The decoded reference images of one line, or the error message (a bad file skips only its line)."""
    try:
        return read_images(dataclasses.replace(cfg.request, images=item["images"]), cfg.limits).images
    except FluxDistError as e:
        return str(e)


def _request(cfg: RunConfig, engine: Any, item: dict[str, Any]) -> Any:
    """The line's request, or why it is skipped: the same verdict on every rank, before any collective."""
    try:
        req = dataclasses.replace(cfg.request, **item)
        engine.validate(req)
        return req
    except (FluxDistError, TypeError) as e:
        return str(e)


def _entry(no: int, name: str, req: Any, paths: list, metrics: dict, time_s: float) -> dict[str, Any]:
    return {"line": no, "file": name, "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": req.seed,
            "width": metrics["request"]["width"], "height": metrics["request"]["height"], "images": paths,
            "steps": req.steps, "guidance": req.guidance, "lora": req.lora, "time_s": round(time_s, 4),
            "denoise_s": metrics.get("denoise_s"), "cache_skipped_steps": metrics.get("cache_skipped_steps", 0)}


def run_batch(cfg: RunConfig, engine: Any, prompts_file: str, output_dir: str) -> int:
    """Generate every line of ``prompts_file`` into ``output_dir`` (call on every rank). Returns the exit code.

    With replica groups (``--replicas R``) the lines go out in rounds of R, line ``k`` of a round to group
    ``k``; rank 0 gathers each round's images and writes them and the manifest in the file's order.
    """
    main = engine.dist.is_main
    parsed: Any = None
    if main:
        p = Path(prompts_file)
        try:
            text = p.read_text(encoding="utf-8")
            parsed = parse_lines(text, jsonl=p.suffix.lower() in (".jsonl", ".json", ".ndjson"),
                                 true_cfg=engine.true_cfg)
        except (OSError, UnicodeDecodeError) as e:
            parsed = f"cannot read prompts file {prompts_file}: {e}"
    parsed = broadcast(("lines", parsed), engine.dist.device)[1]
    if isinstance(parsed, str):
        raise FluxDistError(parsed)
    if not parsed:
        raise FluxDistError(f"no requests in {prompts_file} (blank lines and '#' comments are skipped)")

    out = Path(output_dir)
    manifest_path = out / "manifest.json"
    manifest: dict[str, Any] = {"prompts_file": str(prompts_file), "model": engine.c.name,
                                "layout": engine.mesh.describe(), "images": [], "errors": []}
    if main:
        out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    failed: list[int] = []  # every rank skips the same lines, so every rank returns the same code

    def fail(no: int, msg: str) -> None:
        failed.append(no)
        if main:
            log.error("%s line %d skipped: %s", prompts_file, no, msg)
            manifest["errors"].append({"line": no, "error": msg})

    def write(i: int, no: int, item: dict[str, Any], image: Any, metrics: dict, time_s: float, **extra: Any) -> None:
        name = f"{i:05d}.png"
        image.save(out / name)
        req = dataclasses.replace(cfg.request, **{**item, "images": []})
        manifest["images"].append({**_entry(no, name, req, item.get("images", []), metrics, time_s), **extra})
        log.info("[%d/%d] wrote %s (%s)", i + 1, len(parsed), out / name, req.prompt[:60])

    if engine.mesh.replicas > 1:
        failed[:] = _run_rounds(cfg, engine, parsed, fail, write, lambda: manifest_path.write_text(
            json.dumps(manifest, indent=2)))
    for i, (no, item) in enumerate(parsed if engine.mesh.replicas == 1 else []):
        if isinstance(item, str):
            fail(no, item)
            continue
        paths = item.get("images", [])
        if paths:  # rank 0 reads the line's images and sends them (or why not): the others never read
            read = _read_line_images(item, cfg) if main else None
            read = broadcast(("images", read), engine.dist.device)[1]
            if isinstance(read, str):
                fail(no, read)
                continue
        req = _request(cfg, engine, {**item, "images": read} if paths else item)
        if isinstance(req, str):
            fail(no, req)
            continue
        t0 = time.perf_counter()
        outcome = run_together(engine, [req])  # FatalError (ranks out of step) ends the batch
        if not outcome.ok:
            fail(no, "; ".join(outcome.errors))
            continue
        if main:
            res = outcome.results[0]
            write(i, no, item, res.image, res.metrics, time.perf_counter() - t0)
        if main:  # rewritten after every image: an interrupted batch still lists what it wrote
            manifest_path.write_text(json.dumps(manifest, indent=2))
    if main:
        manifest["total_s"] = round(time.perf_counter() - t_all, 3)
        manifest_path.write_text(json.dumps(manifest, indent=2))
        n_ok, n_bad = len(manifest["images"]), len(manifest["errors"])
        log.info("batch done: %d image(s), %d line(s) skipped, manifest %s", n_ok, n_bad, manifest_path)
    return EXIT_SOME_FAILED if failed else 0


def _run_rounds(cfg: RunConfig, engine: Any, parsed: list, fail: Any, write: Any, save: Any) -> list[int]:
    """Replica groups: the good lines in rounds of R, line ``k`` of a round on group ``k``; rank 0 gathers
    each round (one ``gather_object`` over every rank) and writes it in the file's order. Returns the lines
    that failed, the same list on every rank."""
    import torch.distributed as dist

    mesh, main, dev = engine.mesh, engine.dist.is_main, engine.dist.device
    good, failed = [], []
    for i, (no, item) in enumerate(parsed):  # lines without images checked here: a bad one takes no group's turn
        why = item if isinstance(item, str) else None if item.get("images") else _request(cfg, engine, item)
        if isinstance(why, str):
            fail(no, why)
            failed.append(no)
        else:
            good.append((i, no, item))
    for first in range(0, len(good), mesh.replicas):
        chunk = good[first:first + mesh.replicas]
        reads: list[Any] = [None] * len(chunk)
        if any(item.get("images") for _, _, item in chunk):  # rank 0 reads the round's images, sends them once
            if main:
                reads = [_read_line_images(item, cfg) if item.get("images") else None for _, _, item in chunk]
            reads = broadcast(("images", reads), dev)[1]
        record: Any = None
        if mesh.replica < len(chunk):  # this group's line of the round
            _, _, item = chunk[mesh.replica]
            read = reads[mesh.replica]
            req = read if isinstance(read, str) else _request(cfg, engine, {**item, "images": read} if read else item)
            if isinstance(req, str):
                record = ("fail", req)
            else:
                t0 = time.perf_counter()
                outcome = run_together(engine, [req], team=mesh)  # FatalError (a group out of step) ends the batch
                res = outcome.results[0] if outcome.ok else None
                record = ("ok", res.image, res.metrics, time.perf_counter() - t0) if res else \
                    ("fail", "; ".join(outcome.errors))
        gathered: list[Any] = [None] * engine.dist.world_size
        dist.gather_object(record if mesh.is_leader else None, gathered if main else None, dst=0)
        if main:
            for k, (i, no, item) in enumerate(chunk):
                rec = gathered[k * mesh.dims.world]  # group k's leader
                if rec[0] == "fail":
                    fail(no, rec[1])
                    failed.append(no)
                else:
                    write(i, no, item, *rec[1:], replica=k)
            save()  # rewritten after every round: an interrupted batch still lists what it wrote
    return broadcast(("failed", sorted(failed)), dev)[1]


def read_prompts(path: str) -> list[str]:
    """The prompts of a batch-mode prompts file (``.txt`` or ``.jsonl``); a bad line is an error here."""
    p = Path(path)
    if not p.is_file():
        raise FluxDistError(f"prompts file not found: {path}")
    out = []
    for n, fields in parse_lines(p.read_text(), jsonl=p.suffix == ".jsonl", true_cfg=True):
        if isinstance(fields, str):
            raise FluxDistError(f"{path}:{n}: {fields}")
        out.append(fields["prompt"])
    if not out:
        raise FluxDistError(f"prompts file {path} has no prompts")
    return out
