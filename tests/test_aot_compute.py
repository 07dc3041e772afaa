"""Compute fidelity against XLA itself: the analytic compiler and the HLO importer on the same step.

The same LLaMA-style train step (traces/model.py) at training sizes (D=2048, F=8192, V=32768, T=1024,
4 sequences per fsdp shard: every activation is far larger than VMEM) is compiled ahead of time by
libtpu for v5e:4x4, v5p:2x2x4 and v6e:4x4 (traces/aot_compile.py --chip; committed in
traces/xla_aot_chips/<chip>/), and again with the LIBTPU flags of the published MaxText runs
(aot_compile.py --chip C --maxtext-flags; traces/xla_aot_chips_maxtext/<chip>/; test ids ``maxtext/...``):
the default-flag compiles document XLA's default schedule, the flagged ones the schedule tpusim's program
stands for. On v5p a fourth case, ``big_tp_sharded_residual_L2``, is MaxText's tensor-parallel
sharding (residual D over tensor, D=4096; tests/test_tp_overlap.py checks its TP structure). For each, the workload in config.yaml (`tpusim run`) and XLA's compiled program
(`tpusim run --hlo`) must agree, with the same budgets for both:

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
# The same cases compiled with the LIBTPU flags of the published MaxText runs (aot_compile.py --maxtext-flags):
# the schedule tpusim's program stands for (weight gathers asynchronous, prefetched a layer ahead).
MAXTEXT = REPO / "traces" / "xla_aot_chips_maxtext"
DEFAULT_CASES = sorted(p.parent for p in CHIPS.glob("*/*_L2/optimized_hlo.txt.gz"))
MAXTEXT_CASES = sorted(p.parent for p in MAXTEXT.glob("*/*_L2/optimized_hlo.txt.gz"))
CASES = DEFAULT_CASES + MAXTEXT_CASES
MXU = ("matmul", "attention")
STEP_BUDGET = 0.05


def _id(case_dir):
    """``v5p/big_fsdp_L2`` for the default-flag compile, ``maxtext/v5p/big_fsdp_L2`` for the flagged one."""
    return ("maxtext/" if case_dir.parent.parent == MAXTEXT else "") + f"{case_dir.parent.name}/{case_dir.name}"


def _known(kind):
    """Cases whose check fails for a reason outside the compute model: a strict xfail that says why."""
    out = []
    for p in CASES:
        gaps = MAXTEXT_GAPS if p.parent.parent == MAXTEXT else KNOWN_GAPS
        reason = gaps.get((p.parent.name, p.name, kind))
        out.append(pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=reason)) if reason else p)
    return out


# Why the step times part on v5p with default flags (`tpusim run` 17.4 ms vs `tpusim run --hlo` 20.5 ms;
# the compute streams agree, 16.3 and 16.1 ms): XLA's compile with default flags issues the weight
# all-gathers as 27 synchronous all-gathers that the next op waits for (2.84 ms exposed; on v5e the
# same kind of gathers hide behind 2.3x longer compute). tpusim's program prefetches each gather one
# layer ahead, as MaxText's async-collective-fusion flags make XLA do: with them (maxtext/v5p) the two
# agree. Both reshard the token embedding (jnp.take) with all-to-alls.
WINDOWED_PERMUTES = ("XLA's default-flag compile makes 27 weight all-gathers synchronous (2.84 ms exposed on v5p); "
                     "tpusim prefetches gathers one layer ahead as MaxText's async-collective-fusion flags do "
                     "(compiled with them, maxtext/v5p, the two agree)")
ACCUMULATORS = ("XLA's FSDP windowed-einsum loops read and write each matmul's output once per loop step "
                "(16 steps per weight; about 3 GB on v5e, 7 GB on v5p per step) and its memory-space "
                "assignment adds HBM<->VMEM DMAs; tpusim's program has one pass per matmul. The time still "
                "agrees because those matmuls are MXU-bound (see the compute-time test)")
VMEM_TP = ("with tensor parallelism each device's activations are 1/4 as large and XLA keeps most of "
           "them in VMEM (its HBM traffic is 2.1 GB; tpusim prices every elementwise op through HBM: 3.5 GB), "
           "so tpusim's compute is 16% slower (3.72 vs 3.22 ms); tpusim has no VMEM residency model")
# MaxText's tensor parallelism (residual D over tensor; tests/test_tp_overlap.py, docs/VALIDATION.md
# "Tensor-parallel overlap"): XLA keeps the activation collectives synchronous, as tpusim does; the steps part
# for two other reasons.
TP_PLACEMENT = ("tpusim places tensor as libtpu's mesh does (mesh_utils: the 2x2 xy plane, 0.16 ms per 32 MiB "
                "activation all-gather or reduce-scatter), so its 18 synchronous TP collectives expose 2.94 ms")
TP_FSDP_BYTES = ("XLA's FSDP collective matmuls (windowed einsum, unrolled: each weight gather and gradient "
                 "reduce-scatter split into ring steps, each a partial matmul reading and writing its output) move "
                 "7.6 GB in matmuls against tpusim's 4.5 GB with attention, and memory-space DMAs add 1.2 GB; "
                 "those matmuls are MXU-bound, so the compute time agrees")
KNOWN_GAPS = {
    ("v5p", "big_tp_sharded_residual_L2", "bytes"): TP_FSDP_BYTES,
    ("v5p", "big_tp_sharded_residual_L2", "step"): TP_PLACEMENT + "; XLA's 32 synchronous ones 4.90 ms. XLA's default "
                                                   "flags expose FSDP time tpusim hides: 16 synchronous weight all-gathers "
                                                   "1.21 ms, its windowed-einsum permutes 2.66 ms, 3 gradient "
                                                   "reduce-scatters 0.81 ms (run 18.72 ms, --hlo 24.43 ms)",
    ("v5p", "big_tp_sharded_residual_L2", "cost_analysis"): "the importer counts 18.8 GB where XLA's cost analysis "
                                                            "counts 23.8 GB (-21%): not yet explained op by op",
    ("v5p", "big_fsdp_L2", "step"): WINDOWED_PERMUTES,
    ("v5e", "big_fsdp_remat_L2", "bytes"): ACCUMULATORS,
    ("v5p", "big_fsdp_L2", "bytes"): ACCUMULATORS,
    ("v6e", "big_fsdp_tp_L2", "bytes"): VMEM_TP,
    ("v6e", "big_fsdp_tp_L2", "compute"): VMEM_TP,
    ("v6e", "big_fsdp_tp_L2", "step"): "XLA's default-flag compile makes its 27 weight all-gathers synchronous (1.34 ms "
                                       "exposed; tpusim prefetches them) and its windowed-einsum permutes expose "
                                       "0.57 ms; the tensor-parallel all-reduces expose 3.09 ms, tpusim's all-gathers + "
                                       "reduce-scatters 2.77 ms; and " + VMEM_TP,
    ("v6e", "big_fsdp_tp_L2", "cost_analysis"): "the importer counts 8.1 GB where XLA's cost analysis counts 10.3 GB "
                                                 "(-22%): not yet explained op by op",
}
# With MaxText's flags XLA's schedule is the one tpusim assumes for the weights (v5p: 25 of 27 all-gathers
# asynchronous, 0.36 ms of gathers exposed in all; the compute streams agree, 16.31 vs 16.04 ms), and the
# token embedding is resharded the same way (traces/model.py looks tokens up with jnp.take, MaxText's
# default, use_iota_embed false: XLA partitions the lookup over the table's fsdp-sharded D and reshards
# with two 16.8 MB activation all-to-alls, as tpusim's program does): v5p's steps agree (17.36 vs 18.04 ms,
# -3.8%: XLA's windowed-einsum permutes expose 1.16 ms that tpusim's prefetched gathers hide).
# v6e (`run` 7.17 ms, `--hlo` 7.64 ms, -6.2%): the tensor-parallel collectives agree (XLA's 9 activation
# all-reduces expose 2.79 ms, tpusim's 18 all-gathers + reduce-scatters of the same activations 2.77 ms),
# so do the embedding's all-to-alls (0.61 vs 0.66 ms); what differs is XLA's windowed-einsum permutes and
# gathers (0.91 ms exposed, where tpusim's prefetched FSDP collectives hide whole) and tpusim's compute,
# 0.39 ms longer (VMEM residency).
VMEM_TP_MAXTEXT = ("with tensor parallelism XLA keeps most activations in VMEM (its HBM traffic is 2.33 GB, "
                   "tpusim's 3.54 GB), so tpusim's compute is 12% slower (3.72 vs 3.33 ms); tpusim has no VMEM "
                   "residency model")
MAXTEXT_GAPS = {
    ("v5p", "big_tp_sharded_residual_L2", "step"): TP_PLACEMENT + "; XLA's 3.83 ms (18 synchronous, 14 asynchronous "
                                                   "re-gathers). XLA exposes FSDP time tpusim hides: its windowed-einsum "
                                                   "permutes 2.91 ms, 3 synchronous gradient reduce-scatters 0.82 ms "
                                                   "(run 18.72 ms, --hlo 22.42 ms)",
    ("v5p", "big_tp_sharded_residual_L2", "cost_analysis"): "the importer counts 20.2 GB where XLA's cost analysis "
                                                            "counts 24.4 GB (-17%): not yet explained op by op",
    ("v5p", "big_fsdp_L2", "bytes"): ACCUMULATORS,
    ("v5e", "big_fsdp_remat_L2", "bytes"): ACCUMULATORS,  # the flags leave v5e's compile as it was
    ("v6e", "big_fsdp_tp_L2", "bytes"): VMEM_TP_MAXTEXT,
    ("v6e", "big_fsdp_tp_L2", "compute"): VMEM_TP_MAXTEXT,
    ("v6e", "big_fsdp_tp_L2", "step"): "XLA's windowed-einsum permutes and FSDP gathers expose 0.89 ms that tpusim's "
                                       "prefetched FSDP collectives do not, and tpusim's compute is 0.23 ms longer ("
                                       + VMEM_TP_MAXTEXT + "); the tensor-parallel collectives agree (2.77 vs 2.79 ms), "
                                       "so do the embedding's all-to-alls (0.66 vs 0.61 ms)",
    ("v6e", "big_fsdp_tp_L2", "cost_analysis"): "the importer counts 8.5 GB where XLA's cost analysis counts 10.4 GB "
                                                 "(-19%): not yet explained op by op",
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


def test_maxtext_flag_compiles_use_the_published_runs_flags():
    """The flagged compiles are compiled with exactly the LIBTPU flags the MaxText v5p 32B run publishes
    (tests/data/measured-dev.yaml, ``maxtext-v5p-32b-1xv5p-128``), and v5p and v6e are among them."""
    import yaml

    entries = yaml.safe_load((REPO / "tests" / "data" / "measured-dev.yaml").read_text())["entries"]
    other = next(e for e in entries if e["id"] == "maxtext-v5p-32b-1xv5p-128")["workload"]["other"]
    published = set(other.split("LIBTPU:")[1].split())
    assert {p.parent.name for p in MAXTEXT_CASES} >= {"v5p", "v6e"}
    for case_dir in MAXTEXT_CASES:
        assert set(json.loads((case_dir / "summary.json").read_text())["libtpu_init_args"].split()) == published


@pytest.mark.parametrize("case_dir", CASES, ids=_id)
def test_mxu_flops_match_xla(case_dir):
    w, _, prog, hlo = programs(case_dir)
    L = w.model.num_layers
    ours, xla = _mxu_flops(prog, True) / L, _mxu_flops(hlo, True) / L
    assert ours == pytest.approx(xla, rel=0.01), f"per layer {ours:.4e} vs XLA {xla:.4e}"
    assert _mxu_flops(prog, False) == pytest.approx(_mxu_flops(hlo, False), rel=0.01)


@pytest.mark.parametrize("case_dir", _known("bytes"), ids=_id)
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


@pytest.mark.parametrize("case_dir", _known("compute"), ids=_id)
def test_compute_time_hlo_and_workload_agree(case_dir):
    """The compute stream alone (every compute op priced by the cost model, calibrated): within 5%."""
    _, topo, prog, hlo = programs(case_dir)
    cp = compute_params(topo.chip, "calibrated")
    ours, xla = (sum(op_time(o, cp) for o in p.compute_ops) for p in (prog, hlo))
    assert ours == pytest.approx(xla, rel=STEP_BUDGET), f"tpusim run {ours * 1e3:.2f} ms, --hlo {xla * 1e3:.2f} ms"


@pytest.mark.parametrize("case_dir", _known("step"), ids=_id)
def test_step_time_hlo_and_workload_agree(case_dir):
    _, topo, prog, hlo = programs(case_dir)
    ours = summarize(simulate(prog, topo, mode="calibrated"))["step_time_s"]
    xla = summarize(simulate(hlo, topo, mode="calibrated"))["step_time_s"]
    assert ours == pytest.approx(xla, rel=STEP_BUDGET), f"tpusim run {ours * 1e3:.2f} ms, --hlo {xla * 1e3:.2f} ms"


@pytest.mark.parametrize("case_dir", _known("cost_analysis"), ids=_id)
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
@pytest.mark.parametrize("case_dir", [CHIPS / "v5e" / "big_fsdp_remat_L2", MAXTEXT / "v5p" / "big_fsdp_L2"], ids=_id)
def test_recompile_matches_committed(tmp_path, case_dir):
    """Recompile a committed case with libtpu (its topology and the LIBTPU flags its summary.json records)
    and check the fresh HLO gives the same Program figures
    (``TPUSIM_JAX_PYTHON=/work/venvs/jax/bin/python pytest -m libtpu tests/test_aot_compute.py``)."""
    import os
    import subprocess
    import sys

    summary = json.loads((case_dir / "summary.json").read_text())
    case = summary["case"]
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("LIBTPU_INIT_ARGS", None)
    if summary.get("libtpu_init_args"):
        env["LIBTPU_INIT_ARGS"] = summary["libtpu_init_args"]
    python = os.environ.get("TPUSIM_JAX_PYTHON", sys.executable)  # an interpreter with jax[tpu]
    subprocess.run([python, str(REPO / "traces" / "aot_compile.py"), "--case", case, "--layers", "2",
                    "--out", str(tmp_path), "--topology", summary["topology"],
                    "--chip-config", summary["chip_config_name"]], check=True, env=env)
    fresh = tmp_path / f"{case}_L2"
    _, topo, _, committed = programs(case_dir)
    hlo = import_hlo(read_hlo(fresh / "optimized_hlo.txt.gz"), topo)
    assert hlo.flops_per_device == pytest.approx(committed.flops_per_device, rel=1e-6)
    assert sum(o.hbm_bytes for o in hlo.compute_ops) == pytest.approx(
        sum(o.hbm_bytes for o in committed.compute_ops), rel=0.01)
