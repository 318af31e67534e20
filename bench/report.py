"""Turn benchmark JSONs (bench/peers.py, bench/fast_bench.py, bench/pass_bench.py, ...) into a Markdown
table and a PNG bar chart of the speed-up of every row over one baseline row.

  python bench/report.py [--baseline KEY] OUT.md OUT.png a.json [b.json ...]     (OUT.md "-": stdout)

A row is any top-level key whose value is a dict with a numeric ``median_ms``; everything else
(``meta``, ``fp8-linear-check``, loose numbers) is context, not a row. Rows whose dict has an
``error`` are listed under the table. The baseline (default ``diffusers-eager``, the key peers.py
single writes; fast_bench.py's is ``diffusers-eager-1gpu``) must be one of the rows of the files
given: ratios are only ever taken against a baseline measured in the same set of files.

Resolution: a row measured at another resolution than the baseline is compared with the baseline
measured at that resolution. A row's resolution is its ``res`` field, or a trailing ``-NNNN`` /
``/NNNN`` in its key (``...-2048``, ``.../2048``), or else 1024 (every bench's default, 1024x1024);
the baseline's likewise. For baseline ``diffusers-eager`` a ``...-2048`` row is compared with
``diffusers-eager-2048`` (or ``diffusers-eager/2048``); if that is not among the rows its ratio is
"n/a" and it is left out of the chart.

Speed-up = baseline median ms / row median ms (higher is faster).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

_RES = re.compile(r"^(?P<stem>.*?)[-/](?P<res>\d{3,5})$")
DEFAULT_RES = 1024
_TIMING = {"median_ms", "min_ms", "max_ms", "n", "res", "step_s", "traceback"}


@dataclass
class Row:
    name: str
    ms: float
    src: str
    res: int | None
    info: dict = field(default_factory=dict)
    ratio: float | None = None
    vs: str | None = None  # the baseline row the ratio is against


def split_res(key: str) -> tuple[str, int | None]:
    m = _RES.match(key)
    return (m["stem"], int(m["res"])) if m else (key, None)


def load(paths: list[str]) -> tuple[list[Row], list[tuple[str, str, str]], list[tuple[str, dict]]]:
    """Rows in file order, failed rows (name, file, error) and each file's ``meta``."""
    rows: list[Row] = []
    failed: list[tuple[str, str, str]] = []
    metas: list[tuple[str, dict]] = []
    seen: set[str] = set()
    for path in paths:
        src = os.path.basename(path)
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise SystemExit(f"{path}: expected a JSON object of rows, got {type(data).__name__}")
        if isinstance(data.get("meta"), dict):
            metas.append((src, data["meta"]))
        for key, val in data.items():
            if not isinstance(val, dict):
                continue
            if "error" in val and "median_ms" not in val:
                failed.append((key, src, str(val["error"]).splitlines()[0] if val["error"] else ""))
                continue
            ms = val.get("median_ms")
            if not isinstance(ms, int | float) or isinstance(ms, bool) or not math.isfinite(ms) or ms <= 0:
                continue
            name, i = key, 1
            while name in seen:
                name, i = f"{key} ({src}{'' if i == 1 else f' #{i}'})", i + 1
            seen.add(name)
            res = val.get("res") if isinstance(val.get("res"), int) else split_res(key)[1]
            info = {k: v for k, v in val.items() if k not in _TIMING and isinstance(v, int | float | str)}
            rows.append(Row(name, float(ms), src, res, info))
    return rows, failed, metas


def attach_ratios(rows: list[Row], baseline: str) -> Row:
    """Set every row's speed-up over the baseline at its resolution; the baseline row is returned."""
    by_name = {r.name: r for r in rows}
    base = by_name.get(baseline)
    if base is None:
        have = ", ".join(r.name for r in rows) or "none"
        raise SystemExit(f"baseline {baseline!r} is not a row of the given files (rows: {have}); "
                         "pass --baseline KEY with a row measured in the same set of files")
    if any(r.name.startswith(f"{baseline} (") for r in rows):
        print(f"warning: {baseline!r} appears in more than one file; using the one from {base.src}",
              file=sys.stderr)
    stem, key_res = split_res(baseline)
    base_res = base.res or key_res or DEFAULT_RES
    for r in rows:
        ref: Row | None = base
        res = r.res or DEFAULT_RES
        if res != base_res:
            ref = by_name.get(f"{stem}-{res}") or by_name.get(f"{stem}/{res}")
        if ref is not None:
            r.ratio, r.vs = ref.ms / r.ms, ref.name
    return base


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 or abs(v) >= 1000 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def markdown(rows: list[Row], failed: list, metas: list, base: Row) -> str:
    lines = [f"Baseline: `{base.name}`, {base.ms:.1f} ms ({base.src}). Speed-up = baseline ms / row ms; "
             "a row at another resolution is compared with the baseline at that resolution.", ""]
    for src, m in metas:
        bits = [f"{k} {m[k]}" for k in ("mode", "device", "world_size", "date_utc", "torch", "diffusers",
                                          "torchao", "xfuser") if m.get(k) is not None]
        lines.append(f"- `{src}`: " + ", ".join(bits))
    if metas:
        lines.append("")
    lines += ["| row | median ms | speed-up | vs | file | notes |", "| --- | ---: | ---: | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "n/a"
        notes = ", ".join(f"{k} {_fmt(v)}" for k, v in r.info.items()).replace("|", "/")
        vs = "" if r.vs in (None, base.name) else f"`{r.vs}`"
        lines.append(f"| `{r.name}` | {r.ms:.1f} | {ratio} | {vs} | {r.src} | {notes} |")
    if failed:
        lines += ["", "Rows that failed:"]
        lines += [f"- `{name}` ({src}): {err}" for name, src, err in failed]
    return "\n".join(lines) + "\n"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, AttributeError):  # older Pillow / no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _nice_step(top: float) -> float:
    raw = top / 6
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def chart(rows: list[Row], base: Row, path: str) -> None:
    """Horizontal bars of speed-up (baseline = 1.0x, drawn as a dashed line), one per row with a ratio."""
    from PIL import Image, ImageDraw

    shown = [r for r in rows if r.ratio is not None]
    font, small = _font(15), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str, f=font) -> int:
        x0, _, x1, _ = probe.textbbox((0, 0), text, font=f)
        return int(x1 - x0)

    values = [f"{r.ratio:.2f}x  {r.ms:.1f} ms" + ("" if r.vs == base.name else f"  (vs {r.vs})") for r in shown]
    pad, bar_h, gap = 16, 22, 10
    label_w = max([width(r.name) for r in shown] + [60])
    value_w = max([width(v) for v in values] + [60])
    plot_w = 560
    top, bottom = 48, 36
    W = pad + label_w + pad + plot_w + pad + value_w + pad
    H = top + len(shown) * (bar_h + gap) + bottom
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 14), f"Speed-up over {base.name} ({base.ms:.1f} ms); higher is faster", fill="black", font=font)

    x0 = pad + label_w + pad
    vmax = max([r.ratio for r in shown] + [1.0]) * 1.05
    step = _nice_step(vmax)

    def x_of(v: float) -> int:
        return x0 + round(plot_w * v / vmax)

    axis_y = top + len(shown) * (bar_h + gap)
    t = 0.0
    while t <= vmax + 1e-9:
        x = x_of(t)
        d.line([(x, top - 6), (x, axis_y)], fill=(225, 225, 225))
        lab = f"{t:g}x"
        d.text((x - width(lab, small) // 2, axis_y + 6), lab, fill=(90, 90, 90), font=small)
        t += step
    for i, r in enumerate(shown):
        y = top + i * (bar_h + gap)
        colour = (150, 150, 150) if r.name == r.vs else ((46, 110, 180) if r.ratio >= 1 else (200, 90, 60))
        d.rectangle([x0, y, max(x_of(r.ratio), x0 + 1), y + bar_h], fill=colour)
    x1 = x_of(1.0)
    for y in range(top - 6, axis_y, 8):
        d.line([(x1, y), (x1, min(y + 4, axis_y))], fill=(40, 40, 40), width=2)
    d.line([(x0, axis_y), (x0 + plot_w, axis_y)], fill=(90, 90, 90))
    for i, (r, v) in enumerate(zip(shown, values, strict=True)):
        y = top + i * (bar_h + gap)
        d.text((x0 - pad - width(r.name), y + 3), r.name, fill="black", font=font)
        tx = x_of(r.ratio) + 8
        bx0, _, bx1, _ = d.textbbox((tx, y + 3), v, font=font)
        d.rectangle([bx0 - 3, y - 2, bx1 + 3, y + bar_h + 2], fill="white")  # over the 1x line
        d.text((tx, y + 3), v, fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path, format="PNG")


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="diffusers-eager", help="row key of the baseline (default: %(default)s)")
    ap.add_argument("out_md", help="Markdown output file, or - for stdout")
    ap.add_argument("out_png", help="PNG bar chart output file")
    ap.add_argument("jsons", nargs="+", help="result JSON files")
    a = ap.parse_args(argv)
    rows, failed, metas = load(a.jsons)
    base = attach_ratios(rows, a.baseline)
    md = markdown(rows, failed, metas, base)
    if a.out_md == "-":
        sys.stdout.write(md)
    else:
        os.makedirs(os.path.dirname(a.out_md) or ".", exist_ok=True)
        with open(a.out_md, "w") as f:
            f.write(md)
    chart(rows, base, a.out_png)
    return md


if __name__ == "__main__":
    main()
