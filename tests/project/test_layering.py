"""The architecture holds: imports flow one way, ``kernels`` <- ``workbench`` <- ``probes`` <-
``app``, and the kernels' own modules never import their benchmark. Every import counts, also
those inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Layers from the bottom up; a module may import its own layer and those below it.
LAYERS = ("kernels", "workbench", "probes", "app")


def imports_of(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every absolute import in ``source`` (relative imports stay inside
    their package, so they cannot cross a layer)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(root: Path) -> list[str]:
    """``file:line imports module`` for each import that goes up a layer, and each import of
    ``kernels.benchmark`` from the kernels' own modules."""
    bad = []
    for layer_index, layer in enumerate(LAYERS):
        for file in sorted((root / layer).rglob("*.py")):
            where = file.relative_to(root)
            in_benchmark = where.parts[:2] == ("kernels", "benchmark")
            for line, module in imports_of(file.read_text()):
                top = module.split(".")[0]
                if top in LAYERS and LAYERS.index(top) > layer_index:
                    bad.append(f"{where}:{line} imports {module} (a higher layer)")
                if layer == "kernels" and not in_benchmark and module.startswith("kernels.benchmark"):
                    bad.append(f"{where}:{line} imports {module} (the benchmark sits beside the kernels)")
    return bad


def test_no_import_goes_up_a_layer():
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    "layer, module",
    [
        ("kernels", "workbench.errors"),
        ("workbench", "probes.ablation"),
        ("probes", "app.state"),
        ("kernels", "kernels.benchmark.measure"),
    ],
)
def test_an_upward_import_is_caught_also_inside_a_function(tmp_path, layer, module):
    for name in LAYERS:
        (tmp_path / name).mkdir()
    (tmp_path / layer / "bad.py").write_text(f"def f():\n    import {module}\n")
    (tmp_path / "app" / "ok.py").write_text("from kernels import attention\nfrom workbench import record\n")
    assert violations(tmp_path) == [
        f"{Path(layer) / 'bad.py'}:2 imports {module} "
        f"({'the benchmark sits beside the kernels' if module.startswith('kernels') else 'a higher layer'})"
    ]
