"""The layers point down only: processing ← wsi_clip ← wsi_llava ← scripts. Every import statement of the three
packages is read (lazy imports inside functions included), so a higher layer cannot creep into a lower one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("processing", "wsi_clip", "wsi_llava")  # lowest first


def _imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_module_imports_a_higher_layer(layer):
    higher = set(LAYERS[LAYERS.index(layer) + 1 :]) | {"scripts"}
    offenders = {
        str(path.relative_to(REPO)): sorted(_imported_packages(path) & higher)
        for path in sorted((REPO / layer).rglob("*.py"))
        if _imported_packages(path) & higher
    }
    assert not offenders, offenders


def test_the_scan_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from wsi_llava import x\n    import importlib\n    importlib.import_module('scripts.y')\n"
    )
    assert {"wsi_llava", "scripts"} <= _imported_packages(probe)
