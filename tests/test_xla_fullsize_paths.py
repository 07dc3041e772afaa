"""The issue's check that tpusim's two paths agree, at the development set's own sizes: ``tpusim run`` on
a published MaxText run's workload against ``tpusim run --hlo`` on libtpu's ahead-of-time compile of the
same step at full size (``traces/aot_memory.py`` cases ``*_full``: the run's mesh, dims, batch, remat
policy, splash attention and LIBTPU flags), calibrated. Budget 5% (the issue's). What each compile shows
is in docs/VALIDATION.md ("MaxText v4 22B compiled at full size", "MaxText v5p 32B and v5e 16B compiled
at full size").
"""

from __future__ import annotations

import pytest
from conftest import REPO

from tpusim.api import workload_and_topology
from tpusim.compiler import compile_program
from tpusim.compiler.hlo.importer import import_hlo, read_hlo
from tpusim.sim.engine import simulate

AOT = REPO / "traces" / "xla_aot_memory"
CASES = [
    ("maxtext_v4_22b", "v4_22b_full"),
    ("maxtext_v5e_16b", "v5e_16b_full"),
    pytest.param("maxtext_v5p_32b", "v5p_32b_full", marks=pytest.mark.xfail(strict=True, reason=(
        "both programs run the tensor-parallel activation collectives as collective matmuls, but XLA's rings "
        "send whole 201 MB shards, three one way and two the other after O, which on tpusim's links outlast the "
        "matmul chunks (0.96 s of permutes exposed), where tpusim's collective matmul runs its balanced "
        "bidirectional ring beside them and hides it (-14.8%; -6.4% while tpusim's were synchronous); the "
        "measured step (7.30 s) is tpusim's (-2.3%), not XLA's as priced (+14.6%)"))),
    ("recipes_v6e8_llama31_8b", "v6e8_llama31_8b_no_cm"),  # (collective matmul off, as the recipe ran)
    ("recipes_v6e64_llama31_70b", "v6e64_llama31_70b"),
]
MEASURED_BUDGET = 0.10  # the test budget for the development set (tests/test_measured.py)


@pytest.mark.parametrize("run,case", CASES)
def test_run_and_run_hlo_agree_at_full_size(run, case):
    w, topo = workload_and_topology(REPO / "workloads" / "measured" / f"{run}.yaml")
    ours = simulate(compile_program(w, topo), topo).step_time_s
    xla = simulate(import_hlo(read_hlo(AOT / f"{case}.hlo.txt.gz"), topo, name=case), topo).step_time_s
    print(f"{run}: run {ours:.3f} s, run --hlo {xla:.3f} s ({ours / xla - 1:+.1%})")
    assert ours == pytest.approx(xla, rel=0.05)


@pytest.mark.parametrize("run,case", [
    ("maxtext_v4_22b", "v4_22b_full"), ("maxtext_v5e_16b", "v5e_16b_full"),
    pytest.param("maxtext_v5p_32b", "v5p_32b_full", marks=pytest.mark.xfail(strict=True, reason=(
        "+14.6%: XLA's tensor-parallel collective matmuls (permute rings of 201 MB shards beside the matmul "
        "chunks) priced on tpusim's links expose 1.46 s; the measured step says the hardware hides most of it"))),
    ("recipes_v6e8_llama31_8b", "v6e8_llama31_8b_no_cm"), ("recipes_v6e64_llama31_70b", "v6e64_llama31_70b"),
])
def test_xlas_own_program_priced_by_tpusim_against_the_measured_step(run, case):
    """Out of sample (nothing is fitted on these runs): XLA's full-size compile of each published run,
    imported and simulated with tpusim's calibrated cost model, against the measured step time, within
    the issue's 10%. The v6e compiles use the MaxText v5p run's flags (the recipes' are not in the
    reference material), the 8B with collective matmul off as its recipe ran."""
    from tpusim.config import read_yaml

    measured = float(read_yaml(REPO / "workloads" / "measured" / "measured.yaml")[run]["step_time_s"])
    _w, topo = workload_and_topology(REPO / "workloads" / "measured" / f"{run}.yaml")
    xla = simulate(import_hlo(read_hlo(AOT / f"{case}.hlo.txt.gz"), topo, name=case), topo).step_time_s
    print(f"{run}: measured {measured:.3f} s, XLA's program {xla:.3f} s ({xla / measured - 1:+.1%})")
    assert abs(xla / measured - 1) <= MEASURED_BUDGET
