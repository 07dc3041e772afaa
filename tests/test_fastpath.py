"""Every way tpusim runs a step gives the plain path's results, byte for byte, on every shipped
training workload (issue 13: speed must not change a number).

The plain path is the library as a notebook calls it: compile, simulate with the simpy reference
engine (``simulate(..., plain=True)``, one event per op, transfer and condition), summarize. The
others are the ones tuned for speed: the default engine (tpusim.sim.fastengine: callback state
machines, links timed in closed form, merged compute runs), the ``tpusim`` command (which imports
only what it needs), a sweep's row with ``--exact`` and a sweep in worker processes against a serial
one (a sweep's row by default is the step extrapolated in its layer count: equal to float rounding,
tests/test_periodic.py). Only
``sim_wall_s`` (a wall time) and ``events`` (the engine's own count of its work, which is what the
fast engine cuts) may differ.

The engines are compared on more than the summary: every timeline row (start and end floats
included) and every link's bytes and busy time, on every shipped training and measured workload,
with stragglers (several device classes), over DCN (multi-slice), with host offload (PCIe, served
in order), and on imported HLO programs (one with collective-permutes, which drive one direction
of a link: the unpaired links).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tpusim.api import compile_workload
from tpusim.cli import main
from tpusim.sim.engine import simulate
from tpusim.analysis.summary import summarize
from tpusim.explore.sweep import make_sweep, run_sweep, summary_columns

# tpu-recipes' remat_policy custom (v6e Llama 3.1): the layer input and the q/k/v/out projections offloaded
RECIPES_CUSTOM = {k: "offload" for k in ("decoder_layer_input", "query_proj", "key_proj", "value_proj", "out_proj")}

ROOT = Path(__file__).resolve().parents[1]
TRAINING = sorted(p for p in (ROOT / "workloads").glob("*.yaml")
                  if not p.name.startswith("serve_") and p.name != "models.yaml")
MEASURED = sorted(p for p in (ROOT / "workloads" / "measured").glob("*.yaml") if p.name != "measured.yaml")
WALL = ("sim_wall_s", "events")  # the engine's wall time and its own event count: the only fields allowed to differ


def _canon(fields: dict) -> str:
    return json.dumps({k: v for k, v in fields.items() if k not in WALL}, sort_keys=True)


def plain(path: Path) -> dict:
    _, topo, program = compile_workload(path)
    return summarize(simulate(program, topo, plain=True))


def assert_same_simulation(program, topo, **kw) -> None:
    """The fast engine and the simpy reference give the same summary, timeline and link statistics."""
    from tpusim.analysis.timeline import timeline_frame

    ref, fast = simulate(program, topo, plain=True, **kw), simulate(program, topo, **kw)
    assert _canon(summarize(fast)) == _canon(summarize(ref))
    a, b = timeline_frame(ref), timeline_frame(fast)
    assert len(a) == len(b) and a.equals(b)  # exact floats, row for row (after the timeline's sort)
    assert fast.link_stats == ref.link_stats and fast.step_time_s == ref.step_time_s
    assert fast.events < ref.events


def cli(path: Path) -> dict:
    out = CliRunner().invoke(main, ["run", str(path), "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def engine(path: Path) -> dict:
    _, topo, program = compile_workload(path)
    return summarize(simulate(program, topo))


PATHS = {"fast engine": engine, "tpusim run --json": cli}


def test_shipped_workloads_are_found():
    assert len(TRAINING) >= 6, TRAINING


@pytest.mark.parametrize("path", TRAINING, ids=[p.stem for p in TRAINING])
def test_fast_paths_match_the_plain_path(path):
    expected = plain(path)
    for name, run in PATHS.items():
        assert _canon(run(path)) == _canon(json.loads(json.dumps(expected))), name
    # A sweep's row with --exact holds the same fields, flattened (summary_columns) and through a DataFrame;
    # without it the step is extrapolated in its layers, equal to float rounding (tests/test_periodic.py).
    rows = run_sweep(make_sweep(path, {"mode": ("calibrated",)}, exact=True), workers=1).rows.to_dict("records")
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    want = summary_columns(json.loads(json.dumps(expected)))
    assert _canon({k: rows[0][k] for k in want}) == _canon(want)


def test_sweep_in_worker_processes_matches_serial():
    """The same grid serially and in two worker processes: the same rows (apart from the wall time)."""
    path = ROOT / "workloads" / "fsdp_70b.yaml"
    vary = {"per_device_batch_size": (1, 2), "ici_tensor_parallelism": (1, 2)}
    serial = run_sweep(make_sweep(path, vary, topology="v5e:4x4"), workers=1).rows
    pooled = run_sweep(make_sweep(path, vary, topology="v5e:4x4"), workers=2).rows
    drop = [c for c in WALL if c in serial.columns]
    assert serial.drop(columns=drop).to_json() == pooled.drop(columns=drop).to_json()


@pytest.mark.parametrize("path", TRAINING + MEASURED, ids=[p.stem for p in TRAINING + MEASURED])
def test_fast_engine_matches_the_reference_engine(path):
    _, topo, program = compile_workload(path)
    assert_same_simulation(program, topo)


def test_fast_engine_with_stragglers():
    """Three device classes: each its own compute stream; a collective starts when the slowest is there."""
    _, topo, program = compile_workload(ROOT / "workloads" / "fsdp_70b.yaml")
    assert_same_simulation(program, topo, stragglers={5: 1.5, 17: 1.07})
    _, topo, program = compile_workload(ROOT / "workloads" / "llama3_8b_2slice_dp.yaml")
    assert_same_simulation(program, topo, stragglers={0: 2.0})


@pytest.mark.parametrize("overrides", [
    {"quantization": "int8"},  # 8-bit matmuls: the op cost memo must tell them from bf16 ones
    {"ici_pipeline_parallelism": 2, "pipeline_schedule": "1f1b", "num_pipeline_microbatches": 4,
     "remat_policy": "full", "per_device_batch_size": 8, "base_num_decoder_layers": 8},  # stages, each with its links
    {"ici_pipeline_parallelism": 4, "num_pipeline_repeats": 2, "num_pipeline_microbatches": 8,
     "pipeline_schedule": "interleaved", "remat_policy": "full", "per_device_batch_size": 16,
     "base_num_decoder_layers": 8},  # permutes both ways around a ring
], ids=["int8", "pipeline-1f1b", "pipeline-interleaved"])
def test_fast_engine_with_quantization_and_pipelines(overrides):
    _, topo, program = compile_workload(ROOT / "workloads" / "llama3_8b_fsdp_tp.yaml", overrides=overrides)
    assert_same_simulation(program, topo)


def test_fast_engine_with_host_offload():
    """Saved activations copied over PCIe (a FIFO link each way) and back before each layer's backward."""
    from tpusim.compiler import compile_program
    from tpusim.model.workload import workload_from_dict
    from tpusim.sim.topology import parse_topology

    w = workload_from_dict({"model": {"base_emb_dim": 2048, "base_num_query_heads": 16, "head_dim": 128,
                                      "base_mlp_dim": 8192, "base_num_decoder_layers": 4, "vocab_size": 32000},
                            "step": {"per_device_batch_size": 2, "max_target_length": 1024,
                                     "remat_policy": "custom", **RECIPES_CUSTOM}}, source="test")
    topo = parse_topology("v6e:2x4")
    program = compile_program(w, topo)
    assert program.host_ops
    assert_same_simulation(program, topo, mode="datasheet")


@pytest.mark.parametrize("hlo, spec", [
    (ROOT / "traces" / "xla_aot" / "fsdp_L4" / "optimized_hlo.txt.gz", "v5e:4x4"),
    (ROOT / "traces" / "xla_aot" / "fsdp_tp_L4" / "optimized_hlo.txt.gz", "v5e:4x4"),
    (ROOT / "traces" / "real" / "tpu-v6e-host-offload" / "hlo" / "jit_f.hlo.txt", "v6e:2x2"),
], ids=["fsdp_L4 (collective-permutes)", "fsdp_tp_L4", "v6e host offload"])
def test_fast_engine_on_imported_hlo(hlo, spec):
    from tpusim.compiler.hlo.importer import import_hlo, read_hlo
    from tpusim.sim.topology import parse_topology

    topo = parse_topology(spec)
    program = import_hlo(read_hlo(hlo), topo)
    for mode in ("calibrated", "datasheet"):
        assert_same_simulation(program, topo, mode=mode)


def test_a_program_that_cannot_end_is_an_error_on_both_engines():
    """A compute op waiting for a collective issued after it (dependencies that form a cycle, which no
    compiler makes): simpy's run ends with events left waiting; the fast engine says so too, rather
    than return a step cut short."""
    from tpusim.sim.program import COLLECTIVE, COMPUTE, Memory, Op, Program
    from tpusim.sim.topology import parse_topology

    ops = (Op(index=0, name="wait", stream=COMPUTE, category="elementwise", flops=1e9, deps=(1,)),
           Op(index=1, name="ag", stream=COLLECTIVE, category="all-gather", bytes=1e6, mesh_axes=("m",),
              axes=("x",), deps=(2,)),
           Op(index=2, name="later", stream=COMPUTE, category="elementwise", flops=1e9))
    memory = Memory(params=0, grads=0, optimizer=0, activations=0, working=0, gathered_weights=0)
    program = Program(name="cycle", ops=ops, devices=16, model_flops_per_step=1.0, tokens_per_step=1.0,
                      memory=memory, hbm_capacity_bytes=1.0)
    topo = parse_topology("v5e:4x4")
    for plain_path in (True, False):
        with pytest.raises(RuntimeError):
            simulate(program, topo, plain=plain_path)
