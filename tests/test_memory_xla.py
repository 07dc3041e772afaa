"""The memory model against XLA's own buffer assignment, and against the runs that ran.

``traces/aot_memory.py`` compiles a MaxText-like train step (scanned layers, splash attention, AdamW,
donated state) ahead of time for v5e, v5p and v6e slices with libtpu and records
``compiled.memory_analysis()``; the outputs are committed in ``traces/xla_aot_memory/``. The goal
(issue 11, part 5): tpusim's peak HBM per device within 5% of XLA's peak on every case, and no
published run that ran (``workloads/measured/``) refused as not fitting.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from tpusim.compiler import compile_program
from tpusim.sim.topology import parse_topology
from tpusim.model.workload import workload_from_dict

AOT = REPO / "traces" / "xla_aot_memory"
CASES = sorted(AOT.glob("*.json"))
BUDGET = 0.05  # issue 11: within 5% of XLA's peak


def _load(path):
    return json.loads(path.read_text())


def _tpusim_memory(case: dict):
    w = workload_from_dict(case["config"], source=case["case"])
    return compile_program(w, parse_topology(case["config"]["topology"]), check_memory=False).memory


def test_the_cases_span_policies_batches_meshes_and_chips():
    """At least 12 compiled configurations: remat none / full / minimal-like / offloaded, two or more
    batch sizes, FSDP-only and FSDP x tensor meshes, float32 and bfloat16 weights, v5e, v5p and v6e."""
    cfgs = [_load(p)["config"] for p in CASES]
    assert len(cfgs) >= 12
    policies = {c["remat_policy"] for c in cfgs}
    assert {"none", "full", "minimal"} <= policies
    assert policies & {"minimal_offloaded", "qkv_proj_offloaded", "custom"}
    assert len({c["per_device_batch_size"] for c in cfgs}) >= 2
    assert {c["ici_tensor_parallelism"] > 1 for c in cfgs} == {True, False}
    assert {c["weight_dtype"] for c in cfgs} == {"float32", "bfloat16"}
    assert {c["topology"].split(":")[0] for c in cfgs} >= {"v5e", "v5p", "v6e"}


def _offloads(path) -> bool:
    return _load(path)["memory_analysis"]["host_temp_size_in_bytes"] > 0


ON_DEVICE = [p for p in CASES if not _offloads(p)]
OFFLOADING = [p for p in CASES if _offloads(p)]


# Cases the model misses, each with why (strict: a fix shows up as an unexpected pass).
KNOWN_MISSES = {
    "v5e_1b_tp2_full_bf16": "-7.5% (0.21 GB short): here XLA's peak also holds a logits-sized bf16 buffer "
                            "(524 MB, from the loss's backward) while the backward loop runs, i.e. it schedules "
                            "the unembedding's weight gradient late; the model has no such schedule-dependent term",
    "v6e_4b_full": "-8.2% (0.52 GB short): XLA's backward loop holds about one more layer of gathered bf16 weights "
                   "(0.49 GB) at this small batch (2 sequences); the model counts no gathered weights, which fits the "
                   "larger-batch cases, so the scheduler's prefetch depth (it varies with the room left) is not modelled",
    "v4_22b_full_b4": "-8.7% (1.39 GB short): XLA hoists the bf16 cast of every layer's weights out of the scanned "
                      "loops and carries the bf16[48, ...] stacks through both (0.79 GB on this device, loop operands of "
                      "the HLO's while.43/44); the model counts no compute-dtype weight copies with remat; the rest "
                      "(0.6 GB) is not attributed",
    "v5e_16b_full": "+9.2% (0.86 GB over): XLA's buffer report has five F-wide bf16[6,2048,28672] slots (0.70 GB "
                    "each) where the model counts six F-wide tensors in one layer's backward under full remat (gate, "
                    "up, SiLU's three intermediates, the product): about one F-wide tensor fewer; the rest (0.16 GB) "
                    "is not attributed",
}


def _params(paths):
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[p.stem])]
                         if p.stem in KNOWN_MISSES else []) for p in paths]


@pytest.mark.parametrize("path", _params(ON_DEVICE))
def test_peak_hbm_within_5_percent_of_xla(path):
    case = _load(path)
    xla = case["memory_analysis"]["peak_memory_in_bytes"]
    ours = _tpusim_memory(case).total
    assert abs(ours / xla - 1) <= BUDGET, f"tpusim {ours / 1e9:.3f} GB, XLA {xla / 1e9:.3f} GB"


@pytest.mark.parametrize("path", ON_DEVICE, ids=[p.stem for p in ON_DEVICE])
def test_xla_peak_excludes_the_generated_code(path):
    """XLA's peak is the buffers' (arguments, outputs, temporaries), not the program's code: the code
    is reported apart, and the peak never exceeds the buffers' sum."""
    ma = _load(path)["memory_analysis"]
    buffers = (ma["argument_size_in_bytes"] + ma["output_size_in_bytes"] - ma["alias_size_in_bytes"]
               + ma["temp_size_in_bytes"])
    assert ma["peak_memory_in_bytes"] <= buffers
    assert ma["generated_code_size_in_bytes"] > 0


_COMPARED = [p for p in ON_DEVICE if p.stem not in KNOWN_MISSES]


@pytest.mark.xfail(len(_COMPARED) < 12, strict=True,
                   reason=f"issue 11 asks for 12 configurations within 5%; {len(_COMPARED)} on-device cases compiled "
                   "are (each took 7-25 min on the shared 2 cores), and the offloading ones have no HBM peak "
                   "to compare: add cases to traces/aot_memory.py")
def test_at_least_12_configurations_within_5_percent_on_hbm():
    assert len(_COMPARED) >= 12


def _host_bytes(case: dict) -> float:
    """tpusim's bytes per device offloaded to host memory: every layer's offloaded tensors."""
    from tpusim.compiler.memory import layer_activation_bytes
    from tpusim.compiler.shapes import derive_shapes, offloaded_tensors
    from tpusim.model.mesh import resolve_mesh

    w = workload_from_dict(case["config"], source=case["case"])
    topo = parse_topology(case["config"]["topology"])
    sh = derive_shapes(w, resolve_mesh(w.parallelism, topo, source=w.source), topo.num_chips)
    return w.model.num_layers * layer_activation_bytes(w, sh, kept=offloaded_tensors(w.step))


@pytest.mark.parametrize("path", OFFLOADING, ids=[p.stem for p in OFFLOADING])
def test_offloaded_bytes_within_5_percent_of_xla_host_memory(path):
    """With host offload, XLA's host temporaries are the saved tensors of every layer: ours to 5%."""
    case = _load(path)
    xla = case["memory_analysis"]["host_temp_size_in_bytes"]
    assert abs(_host_bytes(case) / xla - 1) <= BUDGET


@pytest.mark.parametrize("path", OFFLOADING, ids=[p.stem for p in OFFLOADING])
def test_offloading_peak_hbm_within_xla_device_allocation(path):
    """XLA's HBM for an offloading step: its arguments, outputs and device temporaries bound the peak
    from above; ours must not exceed it. (The Llama-3.1 8B recipe without collective matmul was over it,
    20.6 GB against 15.5, while the model counted the logits' gradient beside the logits: XLA's largest
    temporary there is one bf16 logits buffer.)"""
    case = _load(path)
    ma = case["memory_analysis"]
    device = ma["argument_size_in_bytes"] + ma["output_size_in_bytes"] - ma["alias_size_in_bytes"] + ma["temp_size_in_bytes"]
    assert _tpusim_memory(case).total <= device


@pytest.mark.parametrize("path", OFFLOADING, ids=[p.stem for p in OFFLOADING])
def test_offloading_peak_is_arguments_plus_host_memory(path):
    """For a step that offloads to host, memory_analysis()'s peak is its arguments plus its host
    temporaries, exactly: a figure over both memories, not HBM's (hence the xfail below)."""
    ma = _load(path)["memory_analysis"]
    assert ma["peak_memory_in_bytes"] == pytest.approx(ma["argument_size_in_bytes"] + ma["host_temp_size_in_bytes"],
                                                       rel=1e-3)


@pytest.mark.xfail(strict=True, reason="memory_analysis() gives no HBM-only peak for a step that offloads to host "
                   "(its peak is arguments + host temporaries), so ours (HBM only) cannot be held against it")
@pytest.mark.parametrize("path", OFFLOADING, ids=[p.stem for p in OFFLOADING])
def test_offloading_peak_hbm_within_5_percent_of_xla(path):
    case = _load(path)
    xla = case["memory_analysis"]["peak_memory_in_bytes"]
    assert abs(_tpusim_memory(case).total / xla - 1) <= BUDGET


MEASURED = sorted(p for p in (REPO / "workloads" / "measured").glob("*.yaml") if p.name != "measured.yaml")


@pytest.mark.parametrize("path", MEASURED, ids=[p.stem for p in MEASURED])
def test_runs_that_ran_are_not_refused(path):
    """Every published run in the development set ran, so it fits: the memory check accepts it."""
    from tpusim.api import workload_and_topology

    w, topo = workload_and_topology(path)
    prog = compile_program(w, topo, check_memory=True)
    assert prog.memory.total <= topo.chip.hbm_bytes


def test_over_the_hbm_xla_rematerialises_transients_not_saved_tensors():
    """MaxText v4 22B would hold 33.1 GB at its peak, over v4's 32 GB; only the backward's transients
    shrink (XLA's rematerialisation under its HBM limit): the peak becomes the capacity, with a note."""
    from tpusim.api import workload_and_topology
    from tpusim.compiler import local_parameter_counts
    from tpusim.compiler.memory import peak_memory
    from tpusim.compiler.shapes import derive_shapes
    from tpusim.model.mesh import resolve_mesh

    w, topo = workload_and_topology(REPO / "workloads" / "measured" / "maxtext_v4_22b.yaml")
    sh = derive_shapes(w, resolve_mesh(w.parallelism, topo, source=w.source), topo.num_chips)
    local, layer, table = local_parameter_counts(w, sh)
    natural = peak_memory(w, sh, local_params=local, gathered_layer_params=layer, gathered_table_params=table,
                          fsdp=True)
    prog = compile_program(w, topo)
    assert natural.total > topo.chip.hbm_bytes
    assert prog.memory.total == pytest.approx(topo.chip.hbm_bytes, rel=1e-12)
    assert prog.memory.activations == natural.activations and prog.memory.working < natural.working
    assert any("rematerialises" in n for n in prog.notes)


@pytest.mark.libtpu
def test_recompiling_a_case_gives_the_committed_numbers(tmp_path):
    """libtpu's compile is deterministic: one case recompiled gives the committed memory analysis."""
    jax = pytest.importorskip("jax")
    case = "v5e_1b_full"
    committed = _load(AOT / f"{case}.json")
    if committed["versions"]["jax"] != jax.__version__:
        pytest.skip(f"committed with jax {committed['versions']['jax']}, installed {jax.__version__}")
    subprocess.run([sys.executable, str(REPO / "traces" / "aot_memory.py"), "--case", case, "--out", str(tmp_path)],
                   check=True, timeout=1800)
    fresh = _load(tmp_path / f"{case}.json")
    for key in ("peak_memory_in_bytes", "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                "alias_size_in_bytes", "host_temp_size_in_bytes"):
        assert fresh["memory_analysis"][key] == committed["memory_analysis"][key], key


def table() -> str:
    """The VALIDATION.md table: ``python tests/test_memory_xla.py``."""
    lines = ["| case | chip | fsdp x tensor | batch/device | remat | weights | XLA peak (GB) | tpusim (GB) | error "
             "| XLA host (GB) | tpusim host (GB) | XLA code (MB) |",
             "| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for path in CASES:
        case = _load(path)
        c, ma = case["config"], case["memory_analysis"]
        xla, ours = ma["peak_memory_in_bytes"], _tpusim_memory(case).total
        host = ma["host_temp_size_in_bytes"]
        err = f"{ours / xla - 1:+.1%}" if not host else "n/a: XLA's peak = arguments + host"
        ours_host = f"{_host_bytes(case) / 1e9:.3f}" if host else "0"
        lines.append(f"| {case['case']} | {c['topology']} | {c['ici_fsdp_parallelism']} x {c['ici_tensor_parallelism']} "
                     f"| {c['per_device_batch_size']} | {c['remat_policy']} | {c['weight_dtype']} | {xla / 1e9:.3f} "
                     f"| {ours / 1e9:.3f} | {err} | {host / 1e9:.3f} | {ours_host} "
                     f"| {ma['generated_code_size_in_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)



if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    print(table())
