"""Shared fixtures: paths to the reference material kept in the project (tests/data, traces/real).

The tests never read ../shared: a fresh clone must pass them on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
REAL_TRACES = REPO / "traces" / "real"


@pytest.fixture(scope="session")
def book_cases() -> dict[str, dict]:
    """The book's worked cases (tests/data/book-cases.yaml), by id."""
    path = DATA / "book-cases.yaml"
    return {case["id"]: case for case in yaml.safe_load(path.read_text())}


@pytest.fixture(scope="session")
def tpu_specs() -> dict:
    """The book's hardware numbers (tests/data/tpu-specs.yaml): {value, unit, src, note} leaves."""
    return yaml.safe_load((DATA / "tpu-specs.yaml").read_text())


def value(case: dict, section: str, key: str) -> float:
    """A number from a book case (YAML may hold it as a string like '4.5e10')."""
    return float(case[section][key]["value"])


def xprof_hlo_stats() -> list[dict]:
    """xprof's hlo_stats tool on the v6e capture (traces/real/tpu-v6e-host-offload), one dict per HLO op."""
    doc = json.loads((REAL_TRACES / "tpu-v6e-host-offload" / "tpu_inference_2.hlo_stats.json").read_text())
    cols = [c["id"] for c in doc["cols"]]
    return [dict(zip(cols, (c["v"] for c in row["c"]), strict=True)) for row in doc["rows"]]


def xprof_avg_s(name: str) -> float:
    """xprof's average self time of one HLO op of the v6e capture, in seconds (over 4 devices x runs)."""
    (row,) = [r for r in xprof_hlo_stats() if r["hlo_op_name"] == name]
    return row["avg_self_time"] * 1e-6


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many generated inputs the fuzz tests (tests/test_fuzz.py) drove through the CLI."""
    counts, ok = getattr(config, "tpusim_fuzz_counts", ({}, {}))
    if counts:
        detail = ", ".join(f"{k} {v} ({ok.get(k, 0)} ok)" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"fuzz: {sum(counts.values()):,} generated inputs through the CLI ({detail})")


def copy_run_folder(run_dir: Path, dest: Path) -> Path:
    """A copy of a run folder (``tpusim run --out``), subfolders included."""
    import shutil

    shutil.copytree(run_dir, dest)
    return dest


def reseal_run_folder(folder: Path) -> None:
    """Rewrite ``manifest.json`` with the sizes of the files it lists as they are now: a folder that is
    complete but whose contents are wrong (what the content checks of ``tpusim compare`` are for, once
    the manifest check has passed)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {name: (folder / name).stat().st_size for name in manifest["files"] if (folder / name).is_file()}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def waited_at_once(ops, op) -> bool:
    """Whether the first compute op after ``op`` in its program waits for it (a synchronous collective)."""
    from tpusim.sim.program import COMPUTE

    return op.index in next(o for o in ops[op.index + 1:] if o.stream == COMPUTE).deps


def fsdp_gradient_reductions(ops, *, layers_only: bool = False) -> list[tuple]:
    """Each weight gradient's reduction over fsdp in a compiled program: (collective, the wgrad matmul it
    reduces); ``layers_only`` leaves out the embedding's and the unembedding's."""
    from tpusim.sim.program import COLLECTIVE

    wgrads = {op.index: op for op in ops if op.name.endswith("/wgrad") and (op.layer >= 0 or not layers_only)}
    out = [(op, wgrads[next(d for d in op.deps if d in wgrads)]) for op in ops
           if op.stream == COLLECTIVE and "fsdp" in op.mesh_axes and set(op.deps) & set(wgrads)]
    assert len(out) == len(wgrads), "a weight gradient without its reduction, or one reduced twice"
    return out
