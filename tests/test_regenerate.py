"""`-m libtpu`: the committed XLA outputs (traces/xla_aot, traces/cpu) are what the scripts make today.

The default run checks tpusim against the committed outputs (tests/test_xla_aot.py,
tests/test_cpu_capture.py, tests/test_profiles.py); these tests remake one of them with jax and
libtpu and compare, so that a committed output that no longer matches its script is caught. They
need the pinned jax[tpu] (traces/requirements-jax.txt) in the interpreter that runs pytest, or in
the one ``TPUSIM_JAX_PYTHON`` names (e.g. ``TPUSIM_JAX_PYTHON=/work/venvs/jax/bin/python``):

    python -m pytest -m libtpu

One ahead-of-time compile for v5e:4x4 and one 8-device CPU capture: under a minute each on an idle
2-core machine, several minutes on a busy one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TRACES = REPO / "traces"
PINNED = {line.split("==")[0]: line.split("==")[1].strip()
          for line in (TRACES / "requirements-jax.txt").read_text().splitlines() if "==" in line}

pytestmark = pytest.mark.libtpu


@pytest.fixture(scope="module")
def jax_python() -> str:
    """The interpreter with the pinned jax[tpu]; a clear failure when there is none (the marker was asked for)."""
    python = os.environ.get("TPUSIM_JAX_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import importlib.metadata as m, json; "
                            "print(json.dumps({p: m.version(p) for p in ('jax', 'jaxlib', 'libtpu')}))"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.fail(f"-m libtpu needs jax[tpu] in {python} (pip install -r traces/requirements-jax.txt, "
                    "or set TPUSIM_JAX_PYTHON to an interpreter that has it)")
    versions = json.loads(probe.stdout)
    want = {p: PINNED[p] for p in versions}
    assert versions == want, f"{python} has {versions}; the committed outputs were made with {want}"
    return python


# What depends on the machine or the moment, not on the compiled program.
VOLATILE = {"lower_wall_s", "compile_wall_s", "warmup_step_wall_s", "profiled_step_wall_s", "xla_memory_usage_report",
            "profile", "profile_files", "losses"}


def _stable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in VOLATILE}


def test_aot_compile_gives_the_committed_outputs(jax_python, tmp_path):
    """libtpu compiles the fsdp case (windowed einsum off, 2 layers) to the same collectives, opcode
    counts, cost and memory analysis as committed; only the wall times and dump names may differ."""
    case = "fsdp_no_windowed_einsum_L2"
    # libtpu takes a machine-wide lock file unless told that other processes may load it too (another
    # compile running beside the tests); an ahead-of-time compile drives no TPU, so sharing is safe.
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    subprocess.run([jax_python, str(TRACES / "aot_compile.py"), "--case", "fsdp_no_windowed_einsum",
                    "--layers", "2", "--out", str(tmp_path)], check=True, timeout=900, cwd=REPO, env=env)
    new = json.loads((tmp_path / case / "summary.json").read_text())
    old = json.loads((TRACES / "xla_aot" / case / "summary.json").read_text())
    assert _stable(new) == _stable(old)


def test_cpu_capture_gives_the_committed_collectives(jax_python, tmp_path):
    """The 8-device CPU capture of the fsdp case compiles to the same collectives and counts; the
    profile's events (host threads, timings) are the machine's, but its collective events are not."""
    subprocess.run([jax_python, str(TRACES / "capture_cpu.py"), "--case", "fsdp", "--out", str(tmp_path)],
                   check=True, timeout=900, cwd=REPO)
    new = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    old = json.loads((TRACES / "cpu" / "fsdp" / "summary.json").read_text())
    assert _stable(new) == _stable(old)
    for key in ("collective_events_by_kind", "collective_events_by_name"):
        assert new["profile"][key] == old["profile"][key], key
