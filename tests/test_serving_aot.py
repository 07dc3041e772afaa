"""Serving steps against XLA itself: a decode step and a prefill step of the same model, mesh and
sizes, compiled ahead of time by libtpu (traces/aot_serving.py, committed in traces/xla_aot_serving/),
simulated by ``tpusim run --hlo``, against the serving step compiler's time for that step.

LLaMA-2-7B dims with 2 layers, 8-way tensor parallelism on v5e:2x4, bf16 weights and KV cache:
decode = 64 sequences at a 2048-position cache, prefill = one 2048-token prompt. Budget: 5% on the
step time, the training check's (tests/test_aot_compute.py) and the issue's goal.
"""

from __future__ import annotations

import json

import pytest

from tpusim.analysis.summary import summarize
from tpusim.compiler.hlo.importer import import_hlo, read_hlo
from tpusim.serving.compiler import StepModel
from tpusim.serving.workload import load_serve_workload
from tpusim.sim.engine import simulate
from tpusim.sim.topology import parse_topology

from conftest import REPO

ROOT = REPO / "traces" / "xla_aot_serving"
BUDGET = 0.05


def _case(name):
    d = ROOT / name
    summary = json.loads((d / "summary.json").read_text())
    step = summary["step"]
    sw = load_serve_workload(d / "config.yaml")
    topo = parse_topology(summary["topology"])
    model = StepModel(sw, topo, "calibrated")
    hlo = import_hlo(read_hlo(d / "optimized_hlo.txt.gz"), topo, name=name)
    return step, model, hlo, topo


def _step_args(step) -> dict:
    """The step's shape as StepModel.cost / program take it: decode (one new token per sequence over
    the cache) or a prefill of the whole prompt (causal pairs, one token sampled)."""
    b, s, t = step["batch"], step["cache"], step["tokens"]
    if t == 1:
        return dict(n_decode=b, decode_ctx=b * s)
    return dict(n_decode=0, decode_ctx=0, prefill_tokens=t, prefill_pairs=t * (t + 1) / 2, prefill_ctx=0, n_logits=1)


@pytest.mark.parametrize("name", ["decode", "prefill"])
def test_all_reduces_match_xla(name):
    """2 per layer (attention and MLP outputs) plus 1 for the vocab-split embedding lookup, each of
    M x D bf16: XLA's collectives of the same step (the sampling's gathers aside: XLA all-reduces the
    argmax's value and index, we gather them; a few bytes either way)."""
    step, model, hlo, _ = _case(name)
    big = [o for o in hlo.collective_ops if o.category == "all-reduce" and o.bytes >= 1024]
    ours = [o for o in model.program(**_step_args(step)).collective_ops if o.category == "all-reduce"]
    assert len(ours) == len(big) == 2 * model.model.num_layers + 1
    assert sorted(o.bytes for o in ours) == sorted(o.bytes for o in big)


@pytest.mark.parametrize("name", ["decode", "prefill"])
def test_step_time_hlo_and_serving_compiler_agree(name):
    step, model, hlo, topo = _case(name)
    ours = model.cost(**_step_args(step)).time_s
    xla = summarize(simulate(hlo, topo, mode="calibrated"))["step_time_s"]
    assert ours == pytest.approx(xla, rel=BUDGET), f"serving step {ours * 1e3:.3f} ms, --hlo {xla * 1e3:.3f} ms"


@pytest.mark.libtpu
def test_recompile_matches_committed(tmp_path):
    """``TPUSIM_JAX_PYTHON=/work/venvs/jax/bin/python pytest -m libtpu tests/test_serving_aot.py``."""
    import os
    import subprocess
    import sys

    python = os.environ.get("TPUSIM_JAX_PYTHON", sys.executable)
    subprocess.run([python, str(REPO / "traces" / "aot_serving.py"), "--case", "decode", "--out", str(tmp_path)],
                   check=True, env=dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
    topo = parse_topology("v5e:2x4")
    fresh = import_hlo(read_hlo(tmp_path / "decode" / "optimized_hlo.txt.gz"), topo)
    committed = _case("decode")[2]
    assert sum(o.hbm_bytes for o in fresh.compute_ops) == pytest.approx(sum(o.hbm_bytes for o in committed.compute_ops),
                                                                          rel=0.01)
