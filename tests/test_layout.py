"""The package's folders are its architecture, and imports point one way (docs/ARCHITECTURE.md).

Each module may import from its own layer and the layers below it, never from a layer above: the
simulation core knows nothing of Transformers, compilers nothing of reports, analysis nothing of
sweeps, and the command line sits on top. Imports inside functions count too (a lazy import is
still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tpusim"

# Lowest first. A module is in the first layer whose prefix matches its dotted name.
LAYERS = [
    ("foundation", ["tpusim", "tpusim.errors", "tpusim.limits", "tpusim.safeio", "tpusim.units", "tpusim.config",
                    "tpusim.data", "tpusim.runfolder"]),
    ("sim", ["tpusim.sim"]),
    ("model", ["tpusim.model"]),
    ("compiler", ["tpusim.compiler"]),
    ("api", ["tpusim.api"]),
    ("analysis", ["tpusim.analysis"]),
    ("serving", ["tpusim.serving"]),
    ("explore", ["tpusim.explore"]),
    ("entry points", ["tpusim.cli", "tpusim.bench", "tpusim.validate", "tpusim.fit", "tpusim.__main__"]),
]


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "tpusim" and module.startswith(prefix + ".")):
                return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to docs/ARCHITECTURE.md")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("tpusim")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tpusim") and not node.level:
            names.add(node.module)
            # `from tpusim.analysis import plots` imports the module tpusim.analysis.plots
            names |= {f"{node.module}.{a.name}" for a in node.names
                      if (PACKAGE.parent / Path(*node.module.split("."), a.name)).with_suffix(".py").exists()}
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_down(path):
    me = module_name(path)
    upward = [f"{name} ({LAYERS[layer_of(name)][0]})" for name in sorted(imported(path))
              if name != "tpusim" and layer_of(name) > layer_of(me)]
    assert not upward, f"{me} ({LAYERS[layer_of(me)][0]}) imports from a layer above it: {', '.join(upward)}"


def test_command_modules_do_not_import_each_other():
    """cli/run, cli/serve and cli/sweep share tpusim.cli.common only (cli.py and cli_sweep.py used to import each other)."""
    for path in (PACKAGE / "cli").glob("*.py"):
        if path.name in ("__init__.py", "common.py"):
            continue
        others = {n for n in imported(path) if n.startswith("tpusim.cli.") and n != "tpusim.cli.common"}
        assert not others, f"{path.name} imports {others}"
