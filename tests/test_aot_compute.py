"""Compute fidelity against XLA itself: the analytic compiler and the HLO importer on the same step.

The same LLaMA-style train step (traces/model.py) at training sizes (D=2048, F=8192, V=32768, T=1024,
4 sequences per fsdp shard: every activation is far larger than VMEM) is compiled ahead of time by
libtpu for v5e:4x4, v5p:2x2x4 and v6e:4x4 (traces/aot_compile.py --chip; committed in
traces/xla_aot_chips/<chip>/). For each, the workload in config.yaml (`tpusim run`) and XLA's
compiled program (`tpusim run --hlo`) must agree:

* MXU FLOPs, per layer and per step: within 1% (the same einsums; XLA writes the grouped-query
  attention as convolutions, which the importer counts over the taps they touch).
* HBM bytes of the vector and copy work (norms, activations, casts, softmax, the loss, the update,
  layout copies, XLA's async HBM<->VMEM DMAs): within 5% of the step divided by the share of the
  step those ops take. Those ops are HBM-bound, so that budget is what keeps the step time within
  the 5% goal; it is not a fit to today's difference.
* Step time, calibrated mode: within 5% (the issue's goal).

What the analytic model does not know, and why it can still agree: which buffers XLA keeps in VMEM
(up to 128 MiB; the importer counts only HBM arrays, see tpusim.compiler.hlo.importer.hbm_array_bytes) and
the accumulators of XLA's windowed-einsum loops (FSDP collective matmuls read and write their output
once per step of the loop). These move bytes between categories more than they change the total.
"""

from __future__ import annotations

import json

import pytest

from tpusim.api import compile_workload
from tpusim.sim.costmodel import bound_by, compute_params, op_time
from tpusim.sim.engine import simulate
from tpusim.compiler.hlo.importer import import_hlo, read_hlo
from tpusim.analysis.summary import summarize

from conftest import REPO

CHIPS = REPO / "traces" / "xla_aot_chips"
CASES = sorted(p.parent for p in CHIPS.glob("*/*_L2/optimized_hlo.txt.gz"))
MXU = ("matmul", "attention")
STEP_BUDGET = 0.05


def _known(kind):
    """Cases whose check fails for a reason outside the compute model: a strict xfail that says why."""
    out = []
    for p in CASES:
        reason = KNOWN_GAPS.get((p.parent.name, p.name, kind))
        out.append(pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=reason)) if reason else p)
    return out


# Why the step times part on v5p (measured with `tpusim run` vs `tpusim run --hlo`, 18.3 vs 19.8 ms;
# the compute streams agree, 16.3 ms each): XLA's compile with default flags issues the weight
# all-gathers as 27 synchronous all-gathers that the next op waits for (2.84 ms exposed; on v5e the
# same kind of gathers hide behind 2.3x longer compute), plus two all-to-alls that reshard the token
# embedding (0.43 ms). tpusim's program prefetches each gather one layer ahead, as MaxText's
# async-collective-fusion flags make XLA do, and has no embedding all-to-all (MaxText's runs use
# iota embeddings). The per-collective fixed cost, which this reason used to blame, is now the
# in-step one (5.5 us) and the windowed-einsum permutes expose 0.18 ms.
WINDOWED_PERMUTES = ("XLA's default-flag compile makes 27 weight all-gathers synchronous (2.84 ms exposed on v5p) "
                     "and reshards the embedding with all-to-alls (0.43 ms); tpusim prefetches gathers one layer "
                     "ahead as MaxText's async-collective-fusion flags do")
ACCUMULATORS = ("XLA's FSDP windowed-einsum loops read and write each matmul's output once per loop step "
                "(16 steps per weight; about 3 GB on v5e, 7 GB on v5p per step) and its memory-space "
                "assignment adds HBM<->VMEM DMAs; tpusim's program has one pass per matmul. The time still "
                "agrees because those matmuls are MXU-bound (see the compute-time test)")
VMEM_TP = ("with tensor parallelism each device's activations are 1/4 as large and XLA keeps most of "
           "them in VMEM (its HBM traffic is 2.1 GB; tpusim prices every elementwise op through HBM: 3.5 GB), "
           "so tpusim's compute is 8% slower; tpusim has no VMEM residency model")
KNOWN_GAPS = {
    ("v5p", "big_fsdp_L2", "step"): WINDOWED_PERMUTES,
    ("v5e", "big_fsdp_remat_L2", "bytes"): ACCUMULATORS,
    ("v5p", "big_fsdp_L2", "bytes"): ACCUMULATORS,
    ("v6e", "big_fsdp_tp_L2", "bytes"): VMEM_TP,
    ("v6e", "big_fsdp_tp_L2", "compute"): VMEM_TP,
    ("v6e", "big_fsdp_tp_L2", "step"): VMEM_TP + "; and XLA's tensor-parallel all-reduces are exposed longer "
                                                  "(2.4 ms) than tpusim's all-gathers + reduce-scatters",
    ("v6e", "big_fsdp_tp_L2", "cost_analysis"): "the importer counts 8.1 GB where XLA's cost analysis counts 10.3 GB "
                                                 "(-22%): not yet explained op by op",
}


def _load(case_dir):
    w, topo, prog = compile_workload(case_dir / "config.yaml")[:3]
    hlo = import_hlo(read_hlo(case_dir / "optimized_hlo.txt.gz"), topo, name=case_dir.name)
    return w, topo, prog, hlo


_cache: dict = {}


def programs(case_dir):
    if case_dir not in _cache:
        _cache[case_dir] = _load(case_dir)
    return _cache[case_dir]


def _mxu_flops(prog, layers_only):
    return sum(o.flops for o in prog.compute_ops if o.category in MXU and (o.layer >= 0 or not layers_only))


def _vector_ops(prog):
    return [o for o in prog.compute_ops if o.category not in MXU and not o.category.endswith("-done")]


def test_three_chips_are_committed():
    assert {p.parent.name for p in CASES} >= {"v5e", "v5p", "v6e"}


@pytest.mark.parametrize("case_dir", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_mxu_flops_match_xla(case_dir):
    w, _, prog, hlo = programs(case_dir)
    L = w.model.num_layers
    ours, xla = _mxu_flops(prog, True) / L, _mxu_flops(hlo, True) / L
    assert ours == pytest.approx(xla, rel=0.01), f"per layer {ours:.4e} vs XLA {xla:.4e}"
    assert _mxu_flops(prog, False) == pytest.approx(_mxu_flops(hlo, False), rel=0.01)


@pytest.mark.parametrize("case_dir", _known("bytes"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_hbm_bytes_match_xla(case_dir):
    """HBM bytes of the step: within 5% of the step divided by the share of XLA's compute that is
    HBM-bound (what keeps the step within the 5% goal)."""
    _, topo, prog, hlo = programs(case_dir)
    cp = compute_params(topo.chip, "calibrated")
    share = sum(op_time(o, cp) for o in hlo.compute_ops if bound_by(o, cp) == "hbm") / \
        sum(op_time(o, cp) for o in hlo.compute_ops)
    budget = STEP_BUDGET / share
    ours, xla = (sum(o.hbm_bytes for o in p.compute_ops) for p in (prog, hlo))
    assert ours == pytest.approx(xla, rel=budget), \
        f"{ours / 1e9:.2f} GB vs XLA {xla / 1e9:.2f} GB (budget {budget:.0%}: {share:.0%} of XLA's compute is HBM-bound)"


@pytest.mark.parametrize("case_dir", _known("compute"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_compute_time_hlo_and_workload_agree(case_dir):
    """The compute stream alone (every compute op priced by the cost model, calibrated): within 5%."""
    _, topo, prog, hlo = programs(case_dir)
    cp = compute_params(topo.chip, "calibrated")
    ours, xla = (sum(op_time(o, cp) for o in p.compute_ops) for p in (prog, hlo))
    assert ours == pytest.approx(xla, rel=STEP_BUDGET), f"tpusim run {ours * 1e3:.2f} ms, --hlo {xla * 1e3:.2f} ms"


@pytest.mark.parametrize("case_dir", _known("step"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_step_time_hlo_and_workload_agree(case_dir):
    _, topo, prog, hlo = programs(case_dir)
    ours = summarize(simulate(prog, topo, mode="calibrated"))["step_time_s"]
    xla = summarize(simulate(hlo, topo, mode="calibrated"))["step_time_s"]
    assert ours == pytest.approx(xla, rel=STEP_BUDGET), f"tpusim run {ours * 1e3:.2f} ms, --hlo {xla * 1e3:.2f} ms"


@pytest.mark.parametrize("case_dir", _known("cost_analysis"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_importer_bytes_follow_xla_cost_analysis(case_dir):
    """Counted the way XLA's cost analysis counts (every memory space, loop bodies once), the
    importer's bytes are XLA's own within 15%: slices of an operand cost the slice, in-place
    updates the update (XLA also prices per-operand utilisation we do not model; hence 15%)."""
    import tpusim.compiler.hlo.hbm as im
    from tpusim.compiler.hlo.importer import FREE, _Analysis, _compute_cost, parse_module

    mod = parse_module(read_hlo(case_dir / "optimized_hlo.txt.gz"))
    an = _Analysis(mod)
    total = 0.0
    saved = im._in_hbm, im.hbm_array_bytes
    im._in_hbm, im.hbm_array_bytes = (lambda t: True), im._plain_bytes
    try:
        def walk(comp):
            nonlocal total
            for ins in mod.computations.get(comp, []):
                if ins.opcode == "while":
                    walk(ins.attrs.get("body", "").lstrip("%"))
                elif not (ins.opcode in FREE or ins.opcode.endswith("-done")):
                    total += _compute_cost(ins, an)[1]
        walk(mod.entry)
    finally:
        im._in_hbm, im.hbm_array_bytes = saved
    xla = json.loads((case_dir / "cost_analysis.json").read_text())["bytes accessed"]
    assert total == pytest.approx(xla, rel=0.15)


@pytest.mark.libtpu
def test_recompile_matches_committed(tmp_path):
    """Recompile the v5e case with libtpu and check the fresh HLO gives the same Program figures
    (``TPUSIM_JAX_PYTHON=/work/venvs/jax/bin/python pytest -m libtpu tests/test_aot_compute.py``)."""
    import os
    import subprocess
    import sys

    case = "big_fsdp_remat"
    out = tmp_path / "v5e"
    out.mkdir()
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    python = os.environ.get("TPUSIM_JAX_PYTHON", sys.executable)  # an interpreter with jax[tpu]
    subprocess.run([python, str(REPO / "traces" / "aot_compile.py"), "--case", case, "--layers", "2",
                    "--out", str(out), "--topology", "v5e:4x4"], check=True, env=env)
    fresh = out / f"{case}_L2"
    _, topo, _, committed = programs(CHIPS / "v5e" / f"{case}_L2")
    hlo = import_hlo(read_hlo(fresh / "optimized_hlo.txt.gz"), topo)
    assert hlo.flops_per_device == pytest.approx(committed.flops_per_device, rel=1e-6)
    assert sum(o.hbm_bytes for o in hlo.compute_ops) == pytest.approx(
        sum(o.hbm_bytes for o in committed.compute_ops), rel=0.01)
