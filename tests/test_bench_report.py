"""bench/report.py: rows, ratios against the baseline of the same file set, the PNG chart."""

import json
import re

import pytest
from PIL import Image

from bench import report


def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def files(tmp_path):
    peers = _write(tmp_path / "peers.json", {
        "meta": {"mode": "single", "device": "NVIDIA H200", "world_size": 1},
        "setup-build": {"build_s": 3.0},
        "diffusers-eager": {"median_ms": 500.0, "min_ms": 490.0, "max_ms": 510.0, "n": 5, "res": 1024},
        "diffusers-eager-2048": {"median_ms": 2400.0, "min_ms": 2390.0, "max_ms": 2410.0, "n": 3, "res": 2048},
        "diffusers-torchao-fp8-compile": {"median_ms": 250.0, "min_ms": 249.0, "max_ms": 260.0, "n": 5,
                                          "res": 1024, "first_call_s": 205.0, "quantize_s": 3.5},
        "xdit-ulysses2-eager": {"error": "ImportError: no xfuser\nmore", "traceback": "..."},
    })
    ours = _write(tmp_path / "ours.json", {
        "fp8-linear-check": {"fp8-real-vs-fp64": 0.037},  # a dict without median_ms: not a row
        "ours-1gpu-compile-first-call-s": 17.2,  # a loose number: not a row
        "ours-1gpu-fp8-compile": {"median_ms": 200.0, "min_ms": 199.0, "max_ms": 201.0, "n": 5},
        "ours-1gpu-fp8-compile-graphs-2048": {"median_ms": 1200.0, "min_ms": 1199.0, "max_ms": 1201.0, "n": 3},
        "ours-ulysses2-fp8/4096": {"median_ms": 900.0},  # no baseline at 4096: n/a
    })
    return tmp_path, peers, ours


def _table(md):
    """row name -> (median ms, speed-up cell)."""
    rows = {}
    for line in md.splitlines():
        m = re.match(r"\| `([^`]+)` \| ([\d.]+) \| ([^|]+) \|", line)
        if m:
            rows[m[1]] = (float(m[2]), m[3].strip())
    return rows


def test_markdown_rows_and_ratios(files):
    tmp, peers, ours = files
    md = report.main([str(tmp / "out.md"), str(tmp / "out.png"), peers, ours])
    assert (tmp / "out.md").read_text() == md
    rows = _table(md)
    assert list(rows) == ["diffusers-eager", "diffusers-eager-2048", "diffusers-torchao-fp8-compile",
                          "ours-1gpu-fp8-compile", "ours-1gpu-fp8-compile-graphs-2048", "ours-ulysses2-fp8/4096"]
    assert rows["diffusers-eager"] == (500.0, "1.00x")
    assert rows["diffusers-torchao-fp8-compile"] == (250.0, "2.00x")
    assert rows["ours-1gpu-fp8-compile"] == (200.0, "2.50x")
    assert rows["diffusers-eager-2048"] == (2400.0, "1.00x")  # its own resolution's baseline
    assert rows["ours-1gpu-fp8-compile-graphs-2048"] == (1200.0, "2.00x")  # vs diffusers-eager-2048
    assert rows["ours-ulysses2-fp8/4096"] == (900.0, "n/a")
    assert "first_call_s 205" in md and "quantize_s 3.5" in md
    assert "`xdit-ulysses2-eager` (peers.json): ImportError: no xfuser" in md
    assert "fp8-linear-check" not in md and "first-call-s" not in md


def test_png_is_written(files):
    tmp, peers, ours = files
    png = tmp / "sub" / "chart.png"
    report.main([str(tmp / "out.md"), str(png), peers, ours])
    assert png.stat().st_size > 0
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100
        assert len(im.convert("RGB").getcolors(1 << 20)) > 2  # something was drawn


def test_baseline_flag_and_missing_baseline(files, capsys):
    tmp, peers, ours = files
    md = report.main(["--baseline", "ours-1gpu-fp8-compile", "-", str(tmp / "b.png"), peers, ours])
    assert capsys.readouterr().out == md
    rows = _table(md)
    assert rows["ours-1gpu-fp8-compile"][1] == "1.00x"
    assert rows["diffusers-eager"][1] == "0.40x"
    assert rows["diffusers-eager-2048"][1] == "n/a"  # no ours-1gpu-fp8-compile-2048 in the set
    with pytest.raises(SystemExit, match="baseline 'diffusers-eager' is not a row"):
        report.main([str(tmp / "c.md"), str(tmp / "c.png"), ours])


def test_duplicate_keys_keep_both_rows(tmp_path):
    a = _write(tmp_path / "a.json", {"diffusers-eager": {"median_ms": 400.0}})
    b = _write(tmp_path / "b.json", {"diffusers-eager": {"median_ms": 500.0}, "x": {"median_ms": 100.0}})
    rows = _table(report.main(["-", str(tmp_path / "d.png"), a, b]))
    assert rows == {"diffusers-eager": (400.0, "1.00x"), "diffusers-eager (b.json)": (500.0, "0.80x"),
                    "x": (100.0, "4.00x")}
