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
        "XLA writes the tensor-parallel activation reduce-scatters (and the backward's gathers) as collective "
        "matmuls: bidirectional permute rings of one 201 MB shard beside the matmul chunks, which on tpusim's "
        "links expose slightly more than its synchronous ring collectives (1.46 vs 1.35 s) plus 0.19 s of "
        "partial-sum adds; tpusim's program has no collective matmul (-5.3%)"))),
]


@pytest.mark.parametrize("run,case", CASES)
def test_run_and_run_hlo_agree_at_full_size(run, case):
    w, topo = workload_and_topology(REPO / "workloads" / "measured" / f"{run}.yaml")
    ours = simulate(compile_program(w, topo), topo).step_time_s
    xla = simulate(import_hlo(read_hlo(AOT / f"{case}.hlo.txt.gz"), topo, name=case), topo).step_time_s
    print(f"{run}: run {ours:.3f} s, run --hlo {xla:.3f} s ({ours / xla - 1:+.1%})")
    assert ours == pytest.approx(xla, rel=0.05)
