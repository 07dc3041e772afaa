"""Every way tpusim runs a step gives the plain path's results, byte for byte, on every shipped
training workload (issue 13: speed must not change a number).

The plain path is the library as a notebook calls it: compile, simulate, summarize. The others are
the ones tuned for speed: the ``tpusim`` command (which imports only what it needs), a sweep's task
(what worker processes and Ray run) and a sweep in worker processes. A future fast path (an engine
that merges events, shared compiled programs) joins ``PATHS`` and must pass the same comparison.
Only ``sim_wall_s``, a wall time, may differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tpusim.api import compile_workload
from tpusim.cli import main
from tpusim.sim.engine import simulate
from tpusim.analysis.summary import summarize
from tpusim.explore.sweep import make_sweep, run_sweep, summary_columns

ROOT = Path(__file__).resolve().parents[1]
TRAINING = sorted(p for p in (ROOT / "workloads").glob("*.yaml")
                  if not p.name.startswith("serve_") and p.name != "models.yaml")
WALL = ("sim_wall_s",)  # wall-clock fields: the only ones allowed to differ


def _canon(fields: dict) -> str:
    return json.dumps({k: v for k, v in fields.items() if k not in WALL}, sort_keys=True)


def plain(path: Path) -> dict:
    _, topo, program = compile_workload(path)
    return summarize(simulate(program, topo))


def cli(path: Path) -> dict:
    out = CliRunner().invoke(main, ["run", str(path), "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def sweep_task(path: Path) -> dict:
    """The row a sweep writes for this workload, unflattened back to the summary's fields."""
    rows = run_sweep(make_sweep(path, {"mode": ("calibrated",)}), workers=1).rows.to_dict("records")
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    return rows[0]


PATHS = {"tpusim run --json": cli}


def test_shipped_workloads_are_found():
    assert len(TRAINING) >= 6, TRAINING


@pytest.mark.parametrize("path", TRAINING, ids=[p.stem for p in TRAINING])
def test_fast_paths_match_the_plain_path(path):
    expected = plain(path)
    for name, run in PATHS.items():
        assert _canon(run(path)) == _canon(json.loads(json.dumps(expected))), name
    # A sweep's row holds the same fields, flattened (summary_columns) and through a DataFrame.
    row = sweep_task(path)
    want = summary_columns(json.loads(json.dumps(expected)))
    got = {k: row[k] for k in want}
    assert _canon(got) == _canon(want)


def test_sweep_in_worker_processes_matches_serial():
    """The same grid serially and in two worker processes: the same rows (apart from the wall time)."""
    path = ROOT / "workloads" / "fsdp_70b.yaml"
    vary = {"per_device_batch_size": (1, 2), "ici_tensor_parallelism": (1, 2)}
    serial = run_sweep(make_sweep(path, vary, topology="v5e:4x4"), workers=1).rows
    pooled = run_sweep(make_sweep(path, vary, topology="v5e:4x4"), workers=2).rows
    drop = [c for c in WALL if c in serial.columns]
    assert serial.drop(columns=drop).to_json() == pooled.drop(columns=drop).to_json()
