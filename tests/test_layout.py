"""The import rule of docs/architecture.md: lower layers never import upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "flux_dist"


def _imports(path: Path) -> set[str]:
    """Absolute names of the flux_dist modules (and third-party roots) a file imports, at any depth."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    pkg = parts if path.name == "__init__.py" else parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
            elif node.module:
                out.add(node.module)
    return out


def _files(*subpaths: str) -> list[Path]:
    files: list[Path] = []
    for sp in subpaths:
        p = PKG / sp
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]
    return files


def _offenders(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in files:
        for name in _imports(f):
            if any(name == x or name.startswith(x + ".") for x in forbidden):
                bad.append(f"{f.relative_to(PKG.parent)} imports {name}")
    return bad


FRONT_ENDS = ("flux_dist.cli", "flux_dist.server", "flux_dist.batch", "flux_dist.launch_ray", "flux_dist.serve_ray",
              "flux_dist.lockstep", "flux_dist.preflight", "flux_dist.cli_args")


def test_torch_free_config_and_validation():
    assert _offenders(_files("errors", "config", "validation", "images", "layouts"),
                      ("torch", "diffusers", "transformers")) == []


def test_lower_layers_know_no_model_cache_or_engine():
    lower = _files("devices", "distributed", "watchdog", "faults", "sampling", "stack", "compile", "graphs", "parallel",
                   "quant", "lora")
    assert _offenders(lower, ("flux_dist.models", "flux_dist.cache", "flux_dist.engine", *FRONT_ENDS)) == []


def test_quant_knows_no_diffusers_and_no_flux2():
    files = _files("quant")
    assert _offenders(files, ("diffusers", "flux_dist.parallel")) == []
    for f in files:
        assert "Flux2" not in f.read_text() and "transformer_blocks" not in f.read_text(), f


def test_lora_knows_no_diffusers_no_flux2_no_quant():
    files = _files("lora")
    assert _offenders(files, ("diffusers", "peft", "flux_dist.parallel", "flux_dist.quant")) == []
    for f in files:
        assert "Flux2" not in f.read_text() and "transformer_blocks" not in f.read_text(), f


def test_parallel_knows_no_cache_no_quant():
    assert _offenders(_files("parallel"), ("flux_dist.cache", "flux_dist.quant")) == []


def test_cache_is_handed_the_adapter_pieces():
    assert _offenders(_files("cache"), ("flux_dist.models", "flux_dist.engine", *FRONT_ENDS)) == []


def test_engine_knows_no_front_end_and_no_pipeline():
    assert _offenders(_files("engine"), (*FRONT_ENDS, "diffusers")) == []
    assert _offenders(_files("models"), ("flux_dist.engine", *FRONT_ENDS)) == []


def test_only_models_import_diffusers_pipelines():
    outside = [f for f in PKG.rglob("*.py") if "models" not in f.relative_to(PKG).parts]
    assert _offenders(outside, ("diffusers.pipelines",)) == []


def test_no_module_over_300_lines():
    lines = {str(f.relative_to(PKG.parent)): len(f.read_text().splitlines()) for f in PKG.rglob("*.py")}
    assert {f: n for f, n in lines.items() if n > 300} == {}
