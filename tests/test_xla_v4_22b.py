"""MaxText v4 22B compiled at full size: what XLA's program does that tpusim's does not (issue 11).

``traces/aot_memory.py`` compiles the published run's step (v4:4x4x4, FSDP 64, D 6144, 24 heads of 128,
F 24576, 48 scanned layers, 13 sequences of 2048 per chip, full remat, splash attention, AdamW; the loss
untiled) with libtpu and commits the optimized HLO beside the memory analysis: ``v4_22b_full`` (the run)
and ``v4_22b_full_b4`` (the same step at 4 sequences, where HBM is not tight). The facts checked here:
XLA fits the run in v4's HBM by recomputing, beyond the remat policy, three projections and one F-wide
matmul per layer (its rematerialisation pass names them ``*.remat``), and only when HBM is tight; without
those, its matmul FLOPs per layer are tpusim's.
"""

from __future__ import annotations

import functools
import json

import pytest
from conftest import REPO

from tpusim.compiler import compile_program
from tpusim.compiler.hlo.analysis import _Analysis
from tpusim.compiler.hlo.hbm import hbm_bytes
from tpusim.compiler.hlo.importer import import_hlo, read_hlo
from tpusim.compiler.hlo.parse import parse_module
from tpusim.sim.topology import parse_topology

AOT = REPO / "traces" / "xla_aot_memory"
D, N, H, F, V, L, T = 6144, 24, 128, 24576, 32000, 48, 2048
V4_HBM = 32e9  # tests/data/tpu-specs.yaml v4 hbm_capacity (tpus.md)


@functools.cache
def _hlo(case: str) -> str:
    return read_hlo(AOT / f"{case}.hlo.txt.gz")


@functools.cache
def _program(case: str):
    return import_hlo(_hlo(case), parse_topology("v4:4x4x4"))


def _tokens(case: str) -> int:
    return json.loads((AOT / f"{case}.json").read_text())["config"]["per_device_batch_size"] * T


def test_xla_fits_the_run_in_v4s_hbm():
    """The run ran, and XLA's buffer assignment says so: its peak is under v4's 32 GB."""
    peak = json.loads((AOT / "v4_22b_full.json").read_text())["memory_analysis"]["peak_memory_in_bytes"]
    assert peak < V4_HBM


def test_only_when_hbm_is_tight_xla_recomputes_qkv_and_an_f_wide_matmul_per_layer():
    """At 13 sequences XLA's rematerialisation pass recomputes, in each layer's backward, the Q, K and V
    projections (2 tok D N H FLOPs each) and one [tok, F] matmul (2 tok D F), and the logits once
    (2 tok D V): FLOPs no remat policy asked for. At 4 sequences it recomputes nothing."""
    assert not [o for o in _program("v4_22b_full_b4").ops if ".remat" in o.name]
    tok = _tokens("v4_22b_full")
    remat = [o for o in _program("v4_22b_full").ops if ".remat" in o.name]
    in_loop = sum(o.flops for o in remat if o.name.startswith("while"))
    assert in_loop / L == pytest.approx(3 * 2 * tok * D * N * H + 2 * tok * D * F, rel=1e-3)
    assert sum(o.flops for o in remat) - in_loop == pytest.approx(2 * tok * D * V, rel=1e-3)


def test_tpusim_matmul_flops_per_layer_are_xlas_less_its_remat_to_fit():
    """Per layer, tpusim's MXU FLOPs match XLA's loop bodies' once the remat-to-fit ops (both's) are set aside
    (budget 1%: the issue's matmul-FLOP budget); XLA's own total is ~10.6% more."""
    from tpusim.api import workload_and_topology

    w, topo = workload_and_topology(REPO / "workloads" / "measured" / "maxtext_v4_22b.yaml")
    ours = sum(o.flops for o in compile_program(w, topo).ops
               if o.category == "matmul" and o.layer >= 0 and "/remat_to_fit/" not in o.name) / L
    loops = [o for o in _program("v4_22b_full").ops if o.category == "matmul" and o.name.startswith("while")]
    xla = sum(o.flops for o in loops if ".remat" not in o.name) / L
    assert ours == pytest.approx(xla, rel=0.01)
    assert sum(o.flops for o in loops) / L > 1.05 * ours


def test_a_nested_fusions_slice_of_the_stacked_layer_inputs_costs_the_slice():
    """XLA nests the dynamic-slice of one layer's input out of the 15.7 GB stack of saved inputs in a
    kLoop fusion inside the Q projection's convolution fusion: the fusion reads one layer (tok x D bf16)
    and writes Q (tok x N x H bf16); its other operands are in VMEM or SMEM."""
    mod = parse_module(_hlo("v4_22b_full"))
    tok = _tokens("v4_22b_full")
    assert hbm_bytes(mod.by_name["fusion.360.remat"], _Analysis(mod)) == 2 * tok * D + 2 * tok * N * H


def _v4_run(**step):
    from tpusim.api import workload_and_topology

    w, topo = workload_and_topology(REPO / "workloads" / "measured" / "maxtext_v4_22b.yaml")
    if step:
        from dataclasses import replace
        w = replace(w, step=replace(w.step, **step))
    return w, topo, compile_program(w, topo)


def test_tpusim_recomputes_to_fit_only_when_hbm_is_tight():
    """Over v4's HBM (13 sequences), each layer's backward recomputes its widest matmul output, an
    F-wide one (2 tok D F), which covers the shortfall its memory model finds; at 4 sequences, under
    the HBM, nothing (as XLA: its ``*.remat`` ops appear only at 13)."""
    _w, _topo, prog = _v4_run()
    tok = 13 * T
    fit = [o for o in prog.ops if "/remat_to_fit/" in o.name]
    assert len(fit) == L and all(o.category == "matmul" and o.phase == "backward" for o in fit)
    assert all(o.flops == 2 * tok * D * F for o in fit)
    shortfall = float(next(n for n in prog.notes if "rematerialises" in n).split("rematerialises ")[1].split(" GB")[0])
    assert tok * F * 2 >= shortfall * 1e9
    _, _, small = _v4_run(per_device_batch_size=4)
    assert not [o for o in small.ops if "/remat_to_fit/" in o.name]


@pytest.mark.xfail(strict=True, reason=(
    "tpusim recomputes one F-wide matmul per layer (8.04 TFLOP), enough for the 1.11 GB its memory model "
    "finds over the HBM; XLA's pass also recomputes Q, K and V (11.06 TFLOP, 1.80 GB freed): its transients "
    "are counted differently (8.3 GB left at its peak against tpusim's 11.0 GB natural), and which tensors its "
    "cost heuristic picks is not modelled; ~0.7 s of the step"))
def test_recomputed_flops_per_layer_match_xlas():
    _, _, prog = _v4_run()
    ours = sum(o.flops for o in prog.ops if "/remat_to_fit/" in o.name) / L
    xla = sum(o.flops for o in _program("v4_22b_full").ops if ".remat" in o.name and o.name.startswith("while")) / L
    assert ours == pytest.approx(xla, rel=0.05)
