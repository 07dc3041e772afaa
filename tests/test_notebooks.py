"""Every notebook in notebooks/ runs from top to bottom, at its small size, without raising.

The notebooks are stored without outputs; each has a cell tagged ``parameters`` and the tests add a
cell after it that sets ``SIZE = "small"`` (papermill's convention), then execute the notebook with
nbclient in a fresh kernel, from notebooks/ as Jupyter would.

``python tests/test_notebooks.py`` runs them at full size and writes their main charts to docs/
(the screenshots the README shows).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 120  # per cell


def execute(path: Path, **params) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` with ``params`` set after its parameters cell; returns it with outputs."""
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{path.name}: needs exactly one cell tagged 'parameters', has {len(tagged)}")
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def test_there_are_five_notebooks_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["1_quickstart.ipynb", "2_sharding_tradeoffs.ipynb",
                                           "3_real_profile.ipynb", "4_topology_congestion.ipynb", "5_serving.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs stored"
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, path.name
        assert any("SIZE" in c.source for c in code if "parameters" in c.metadata.get("tags", [])), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = execute(path, SIZE="small")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    charts = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "vegaEmbed" in o.get("data", {}).get("text/html", "") or any("vegalite" in k for k in o.get("data", {}))
              or "image/svg+xml" in o.get("data", {})]
    assert charts, f"{path.name} showed no chart"


if __name__ == "__main__":
    docs = REPO / "docs"
    for p in NOTEBOOKS:
        print(f"{p.name} -> {docs}/", file=sys.stderr)
        execute(p, SIZE="full", SAVE_TO=str(docs))
