"""Published end-to-end runs (workloads/measured/) against the simulator: the issue's budget, 10% of
the measured step time both ways, for every run of the development set (the issue's 10, and the one
multi-slice training point of measured-dev-2.yaml: Qwen3-0.6B on 3 v5e-16 slices, whose step is
mostly its cross-slice gradient all-reduce; measured 0.159-0.166 s per step, so +-2.5% of its own).

Nothing is fitted on these runs. A run still outside the budget is a strict xfail that says why
(docs/VALIDATION.md). The issue's goal is tighter: each of its 10 runs within 8%, the median within 4%
(test_the_issues_goal).

The multi-slice series (the 16B step on 1 to 32 v5e-256 slices) is also judged by its growth,
T_N / T_1 - 1, within 3 percentage points of the measured one. The measured step times are derived
from TFLOP/s per chip published to 3 digits (about +-0.7 pp on a growth), so 3 pp is the goal, not
the uncertainty.
"""

from __future__ import annotations

import statistics

import pytest

from tpusim.validate import compare_measured, scaling_growth

BUDGET = 0.10  # the issue's aim: within 10% of the measured step time, both ways
GROWTH_BUDGET_PP = 3.0

GOAL, GOAL_MEDIAN = 0.08, 0.04  # the issue's "done": each of its 10 runs within 8%, the median within 4%
ISSUE_RUNS = ["maxtext_v5e_16b", "maxtext_v5p_32b", "maxtext_v4_22b", "recipes_v6e8_llama31_8b",
              "recipes_v6e64_llama31_70b", *(f"maxtext_v5e_16b_{n}slices" for n in (2, 4, 8, 16, 32))]

RUNS = [
    *ISSUE_RUNS,  # (the 16B on 32 slices inside the budget though its growth with slices is not reproduced)
    pytest.param("maxtext_qwen3_0.6b_3slices", marks=pytest.mark.xfail(strict=True, reason=(
        "a small model on 3 slices under Pathways, its step mostly the cross-slice gradient all-reduce: -10.3%, "
        "with DCN at the efficiency borrowed from the v6e psum microbenchmark (datasheet DCN: -45%); the source "
        "says fixed per-step costs dominate it, which tpusim does not model (no sourced figure)"))),
]


@pytest.fixture(scope="module")
def rows():
    return {r["name"]: r for r in compare_measured("calibrated")}


def test_the_development_set_is_all_there(rows):
    assert len(rows) == 11  # the issue's 10, and the DCN-bound Qwen3-0.6B on 3 v5e-16 slices (measured-dev-2)
    assert sorted(r["slices"] for r in rows.values() if r["name"].startswith("maxtext_v5e_16b")) == [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("name", RUNS)
def test_step_time_within_budget(rows, name):
    r = rows[name]
    print(f"{name}: measured {r['measured_step_s']:.3f} s, simulated {r['simulated_step_s']:.3f} s ({r['error']:+.1%})")
    assert abs(r["error"]) <= BUDGET


def test_the_issues_goal_median(rows):
    """The median |error| over the issue's 10 runs within 4%."""
    assert len(ISSUE_RUNS) == 10
    assert statistics.median(abs(rows[n]["error"]) for n in ISSUE_RUNS) <= GOAL_MEDIAN


@pytest.mark.parametrize("name", ISSUE_RUNS)
def test_the_issues_goal_each_run(rows, name):
    """Each of the issue's 10 runs within 8% of its measured step."""
    assert abs(rows[name]["error"]) <= GOAL


def test_tensor_parallel_run_is_compute_bound(rows):
    """The one run with a tensor axis (v5p 32B, 71.5% MFU measured) is compute-bound: its tensor-parallel
    reduce-scatters and backward gathers run as collective matmuls beside their matmuls, as libtpu compiles
    them at its 49,152 tokens per tensor group (tests/test_collective_matmul.py); while tpusim kept them
    synchronous it was communication-bound, +7.2%."""
    assert rows["maxtext_v5p_32b"]["bottleneck"].startswith("compute")


_GROWTH_GAP = ("growth not reproduced: with XLA's schedule (each layer's cross-slice gradient all-reduce overlapped "
               "with the next backward layer) and DCN at the v6e psum microbenchmark's rate, the cross-slice "
               "reduction of the 16B model (3.3 MB per chip per layer, 3-6 ms against ~240 ms of compute) is hidden; "
               "what grows with the slice count (per-layer cross-slice waits on host-mediated DCN transfers, "
               "stragglers, fabric) has no sourced parameter in the project's data (docs/VALIDATION.md)")


@pytest.mark.parametrize("slices", [
    2, 4,  # measured +2.6%: within 3 pp of zero, so these pass even with no growth at all
    pytest.param(8, marks=pytest.mark.xfail(strict=True, reason=_GROWTH_GAP + "; measured +4.3%")),
    pytest.param(16, marks=pytest.mark.xfail(strict=True, reason=_GROWTH_GAP + "; measured +8.1%")),
    pytest.param(32, marks=pytest.mark.xfail(strict=True, reason=_GROWTH_GAP + "; measured +11.1%")),
])
def test_multislice_growth(rows, slices):
    """Simulated T_N / T_1 - 1 of the 16B series within 3 percentage points of the measured one."""
    growth = {g["slices"]: g for g in scaling_growth(list(rows.values()))}
    g = growth[slices]
    print(f"{slices} slices: measured {g['measured_growth']:+.2%}, simulated {g['simulated_growth']:+.2%}")
    assert abs(g["difference_pp"]) <= GROWTH_BUDGET_PP
