"""Start-up: each command imports only what it needs (issue 13). Not timed (timings live in
``python -m tpusim.bench``): these check which heavy modules a command loads, which does not depend on
how busy the machine is. pandas + pyarrow, altair, networkx and vl-convert cost 0.1-2.4 s each to
import, simpy (the reference engine) and tqdm (a progress bar, shown on a terminal only) 0.03-0.09 s;
``tpusim --help`` and ``tpusim run`` without ``--out`` need none of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("pandas", "pyarrow", "altair", "networkx", "vl_convert", "simpy", "tqdm", "tpusim.explore.sweep",
         "tpusim.analysis.plots")

_CHILD = """
import json, os, sys
{prelude}
from tpusim.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
sys.stdout.flush()
print("\\n@@" + json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}
                                  or m in {heavy!r})))
"""


def _loaded(*args: str, expect: str = "", prelude: str = "") -> set[str]:
    code = _CHILD.format(heavy=set(HEAVY) | {m.split(".")[0] for m in HEAVY if not m.startswith("tpusim")},
                         prelude=prelude)
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    printed, mods = out.stdout.rsplit("@@", 1)
    assert expect in printed, out.stdout + out.stderr  # the command ran to its end
    mods = json.loads(mods)
    return {m for m in mods if m in HEAVY or m.split(".")[0] in {"pandas", "pyarrow", "altair", "networkx",
                                                                   "vl_convert", "simpy", "tqdm"}}


def test_help_imports_nothing_heavy():
    assert _loaded("--help", expect="Commands:") == set()


def test_sweep_help_imports_nothing_heavy():
    assert _loaded("sweep", "--help", expect="--vary") == set()


def test_run_without_out_imports_nothing_heavy():
    assert _loaded("run", "workloads/fsdp_70b.yaml", "--topology", "16x16", expect="step time") == set()


def test_sweep_help_names_the_grid_limit():
    """cli/sweep writes the limit without importing tpusim.explore.sweep; it must be the one sweep enforces."""
    from tpusim.explore.sweep import MAX_GRID

    out = subprocess.run([sys.executable, "-m", "tpusim", "sweep", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert f"more than {MAX_GRID:,}" in " ".join(out.split())


def test_run_out_writes_its_report_without_altair(tmp_path):
    """``run --out`` draws report.html's charts itself (tpusim.analysis.svgcharts): altair (0.3-0.45 s
    to import, 2.2 s where jupyterlab installed rfc3987-syntax) and vl-convert (a JavaScript runtime,
    ~1 s) are not loaded at all."""
    mods = _loaded("run", "workloads/fsdp_70b.yaml", "--topology", "16x16", "--out", str(tmp_path / "run"),
                   expect="step time")
    assert not mods & {"altair", "vl_convert", "tpusim.analysis.plots", "simpy", "tqdm"}, mods
    assert (tmp_path / "run" / "report.html").stat().st_size > 0


def test_run_out_imports_no_pandas(tmp_path):
    """``run --out`` writes every file without pandas 3 (~0.35 s to import): the timeline as column lists,
    the Parquet file by pyarrow alone (tests/test_runout.py: the same bytes). Without ``os.fork`` the
    trace writers run in the command's own process, so this sees what both processes import."""
    mods = _loaded("run", "workloads/fsdp_70b.yaml", "--topology", "16x16", "--out", str(tmp_path / "run"),
                   expect="step time", prelude="del os.fork")
    from importlib.metadata import version

    pandas_3 = int(version("pandas").split(".")[0]) >= 3  # an older pandas writes the Parquet itself (timeline.py)
    assert any(m.split(".")[0] == "pandas" for m in mods) != pandas_3, sorted(mods)
    assert {"pyarrow", "pyarrow.parquet"} <= mods  # it did write the Parquet file
    assert (tmp_path / "run" / "plugins" / "profile" / "tpusim" / "simulated.xplane.pb").stat().st_size > 0
