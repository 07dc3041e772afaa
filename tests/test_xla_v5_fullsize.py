"""MaxText v5p 32B and v5e 16B compiled at full size: what XLA's program does that tpusim's does not (issue 11).

``traces/aot_memory.py`` compiles the published runs' steps with libtpu and their own LIBTPU flags
(measured-dev.yaml) and commits the optimized HLO beside the memory analysis: ``v5p_32b_full`` (v5p:4x4x4,
tensor 4 x fsdp 16, D 8192, 64 heads of 128, F 28672, 32 scanned layers, 6 sequences of 2048 per chip,
remat minimal) and ``v5e_16b_full`` (v5e:16x16, fsdp 256, D 4096, same heads and F, remat full).
``traces/fullsize_v5.py`` compares them with tpusim's programs (docs/VALIDATION.md "MaxText v5p 32B and
v5e 16B compiled at full size"). The facts checked here, as closed forms in the runs' dimensions.
"""

from __future__ import annotations

import functools
import json
import re

import pytest
from conftest import REPO

from tpusim.compiler import compile_program
from tpusim.compiler.hlo.collectives import extract_collectives
from tpusim.compiler.hlo.importer import import_hlo, read_hlo
from tpusim.sim.topology import parse_topology

AOT = REPO / "traces" / "xla_aot_memory"
N, H, F, V, T = 64, 128, 28672, 32000, 2048
P32 = {"D": 8192, "L": 32, "fsdp": 16, "tp": 4, "pdbs": 6}  # maxtext_v5p_32b.yaml
P16 = {"D": 4096, "L": 32, "fsdp": 256, "tp": 1, "pdbs": 6}  # maxtext_v5e_16b.yaml
HBM = {"v5p": 96e9, "v5e": 16e9}  # tests/data/tpu-specs.yaml hbm_capacity (tpus.md)


@functools.cache
def _hlo(case: str) -> str:
    return read_hlo(AOT / f"{case}.hlo.txt.gz")


@functools.cache
def _meta(case: str) -> dict:
    return json.loads((AOT / f"{case}.json").read_text())


@functools.cache
def _program(case: str):
    return import_hlo(_hlo(case), parse_topology(_meta(case)["config"]["topology"]))


@functools.cache
def _collectives(case: str) -> list[dict]:
    return extract_collectives(_hlo(case))["collectives"]


@functools.cache
def _ours(workload: str):
    from tpusim.api import workload_and_topology

    w, topo = workload_and_topology(REPO / "workloads" / "measured" / workload)
    return compile_program(w, topo)


def _ring(c: dict) -> tuple[int, int]:
    """(cycle length, |first source - its target|) of a collective-permute's source-target pairs; cycle
    length 0 when they are no ring (a shift that drops the ends)."""
    nxt = {int(a): int(b) for a, b in re.findall(r"\{(\d+),(\d+)\}", c["source_target_pairs"])}
    first = next(iter(nxt))
    n, d = 1, nxt[first]
    while d != first:
        if d not in nxt:
            return 0, abs(nxt[first] - first)
        d, n = nxt[d], n + 1
    return n, abs(nxt[first] - first)


def _flags(run_id: str) -> str:
    import yaml

    runs = yaml.safe_load((REPO / "tests" / "data" / "measured-dev.yaml").read_text())["entries"]
    other = next(r for r in runs if r["id"] == run_id)["workload"]["other"]
    return other.split("LIBTPU:")[1].strip()


@pytest.mark.parametrize("case,run_id", [("v5p_32b_full", "maxtext-v5p-32b-1xv5p-128"),
                                         ("v5e_16b_full", "maxtext-v5e-16b-1xv5e-256")])
def test_compiled_with_the_runs_own_libtpu_flags(case, run_id):
    if not (AOT / f"{case}.json").exists():
        pytest.skip(f"{case} not compiled")
    import sys
    sys.path.insert(0, str(REPO / "traces"))
    import aot_memory

    assert aot_memory.CASES[case]["libtpu_flags"].split() == _flags(run_id).split()


# --- v5p 32B ---------------------------------------------------------------------------------------------

def test_v5p_32b_fits_and_tpusims_memory_model_is_within_5_percent():
    """XLA's peak is under v5p's 96 GB, and tpusim's modelled peak is within the memory budget (5%)."""
    peak = _meta("v5p_32b_full")["memory_analysis"]["peak_memory_in_bytes"]
    assert peak < HBM["v5p"]
    assert _ours("maxtext_v5p_32b.yaml").memory.total == pytest.approx(peak, rel=0.05)


def test_v5p_32b_saves_every_dot_output_sharded_over_tensor_as_tpusim_does():
    """Remat minimal keeps each layer's seven matmul outputs, each sharded over tensor (the residual-stream
    ones, O and down, as [b, T, D/tp]): per layer 2 B (b T)(2F + 3NH + 2D)/tp with b = pdbs x tp sequences
    (the batch is sharded over fsdp only). XLA's largest buffers are those stacks over L, and tpusim's saved
    activations are the same bytes."""
    p = P32
    b = p["pdbs"] * p["tp"]
    per_layer = 2 * b * T * (2 * F + 3 * N * H + 2 * p["D"]) // p["tp"]
    stacked = [r for r in _meta("v5p_32b_full")["largest_buffers"]
               if re.search(rf"bf16\[{p['L']},{b},{T},", r["shapes"])]
    shapes = sorted(re.search(r"bf16\[[\d,]+\]", r["shapes"]).group(0) for r in stacked)
    tp = p["tp"]
    assert shapes == sorted([f"bf16[32,{b},{T},{F // tp}]"] * 2 + [f"bf16[32,{b},{T},{N // tp},{H}]"] * 3
                            + [f"bf16[32,{b},{T},{p['D'] // tp}]"] * 2)
    assert sum(r["bytes"] for r in stacked) == p["L"] * per_layer
    assert _ours("maxtext_v5p_32b.yaml").memory.activations == pytest.approx(p["L"] * per_layer, rel=1e-9)


def test_v5p_32b_no_recomputation_beyond_the_policy():
    """Under the HBM, XLA's rematerialisation pass recomputes nothing (no ``*.remat``), and tpusim neither."""
    assert not [o for o in _program("v5p_32b_full").ops if ".remat" in o.name]
    assert not [o for o in _ours("maxtext_v5p_32b.yaml").ops if "/remat_to_fit/" in o.name]


def test_v5p_32b_matmul_flops_per_layer_match_within_1_percent():
    ours = sum(o.flops for o in _ours("maxtext_v5p_32b.yaml").ops if o.category == "matmul" and o.layer >= 0) / 32
    xla = sum(o.flops for o in _program("v5p_32b_full").ops
              if o.category == "matmul" and o.name.startswith("while")) / 32
    assert ours == pytest.approx(xla, rel=0.01)


def _tp_permutes(case: str = "v5p_32b_full") -> list[dict]:
    p = P32
    shard = f"[{p['pdbs'] * p['tp']},{T},"
    return [c for c in _collectives(case) if c["kind"] == "collective-permute" and _ring(c)[0] == p["tp"]
            and shard in c["operand_shapes"][0]]


def test_v5p_32b_tensor_parallel_reduce_scatters_are_collective_matmuls():
    """At full size XLA writes the tensor-parallel activation reduce-scatters (forward after O and after
    down; backward the input gradients of Q/K/V and gate/up) as collective matmuls: asynchronous
    collective-permutes of one [b, T, D/tp] shard around the tensor ring of 4 (both directions), between
    the matmul's chunks. Inside the layer loops there is no tensor-parallel reduce-scatter left."""
    p = P32
    perms = _tp_permutes()
    assert perms and all(c["async"] for c in perms)
    assert {_ring(c)[1] for c in perms} == {1, p["tp"] - 1}  # both directions of the ring
    # every permute moves one activation shard [b, T, D/tp] (as 3 or 4 dims), bf16
    assert all(c["operand_bytes"] == 2 * p["pdbs"] * p["tp"] * T * p["D"] // p["tp"] for c in perms)
    fwd = {re.search(r"/(\w+,\w+->\w+)/", c["op_name"]).group(1) for c in perms
           if "transpose" not in c["op_name"] and c["in_while"]}
    assert fwd == {"btnh,nhd->btd", "btf,fd->btd"}  # after O, after down
    in_loops_rs = [c for c in _collectives("v5p_32b_full") if c["kind"] == "reduce-scatter" and c["in_while"]
                   and f"[{p['pdbs'] * p['tp']},{T}," in c["operand_shapes"][0]]
    assert not in_loops_rs


def test_v5p_32b_forward_all_gathers_before_qkv_and_gate_up_stay_synchronous():
    """The forward all-gathers of the normed residual [b, T, D/tp] -> [b, T, D] over tensor, before Q/K/V and
    before gate/up, are plain synchronous all-gathers, once per layer each (as tpusim's)."""
    p = P32
    b = p["pdbs"] * p["tp"]
    ags = [c for c in _collectives("v5p_32b_full") if c["kind"] == "all-gather" and c["in_while"]
           and "transpose" not in c["op_name"] and c["result_shapes"][0].startswith(f"bf16[{b},{T},{p['D']}]")]
    assert len(ags) == 2 and not any(c["async"] for c in ags)
    assert {c["executed"] for c in ags} == {p["L"]}


def test_v5p_32b_fsdp_gradient_reduce_scatters_are_windowed_einsums():
    """The weight gradients are reduce-scattered over fsdp as windowed einsums: while loops XLA names
    ``windowed_dot_general_body_rs`` whose permutes pass weight-gradient shards [D/fsdp, .../tp] around the
    fsdp ring of 16."""
    p = P32
    loops = extract_collectives(_hlo("v5p_32b_full"))["windowed_einsum_loops"]
    assert loops and all(w["windowed_einsum"] == "reduce-scatter" for w in loops)
    rings = [c for c in _collectives("v5p_32b_full") if c["kind"] == "collective-permute"
             and "windowed_dot_general_body_rs" in c["computation"]]
    assert rings and all(_ring(c)[0] == p["fsdp"] for c in rings)
    assert {c["operand_shapes"][0] for c in rings} >= {f"bf16[{p['D'] // p['fsdp']},{F // p['tp']}]",
                                                        f"bf16[{p['D'] // p['fsdp']},{N // p['tp']},{H}]"}


# --- v5e 16B ---------------------------------------------------------------------------------------------

def test_v5e_16b_fits_and_saves_only_the_layer_inputs():
    """Full remat: XLA's largest buffer is the stack of the 32 layers' bf16 inputs [L, pdbs, T, D] (3.22 GB),
    tpusim's saved activations to the byte, and the peak is well under v5e's 16 GB."""
    p = P16
    meta = _meta("v5e_16b_full")
    assert meta["memory_analysis"]["peak_memory_in_bytes"] < HBM["v5e"]
    stack = 2 * p["L"] * p["pdbs"] * T * p["D"]
    assert f"bf16[{p['L']},{p['pdbs']},{T},{p['D']}]" in meta["largest_buffers"][0]["shapes"]
    assert meta["largest_buffers"][0]["bytes"] == stack
    assert _ours("maxtext_v5e_16b.yaml").memory.activations == pytest.approx(stack, rel=1e-9)


def test_v5e_16b_no_recomputation_beyond_the_policy_and_matmul_flops_match():
    assert not [o for o in _program("v5e_16b_full").ops if ".remat" in o.name]
    ours = sum(o.flops for o in _ours("maxtext_v5e_16b.yaml").ops if o.category == "matmul" and o.layer >= 0) / 32
    xla = sum(o.flops for o in _program("v5e_16b_full").ops
              if o.category == "matmul" and o.name.startswith("while")) / 32
    assert ours == pytest.approx(xla, rel=0.01)


def test_v5e_16b_weight_gradients_are_whole_synchronous_all_reduces():
    """With the v5e run's flags XLA all-reduces each layer's whole bf16 weight gradient over the 256
    devices (seven per layer: wq, wk, wv, wo, gate, up, down; the norm scales ride in one), synchronously, and reduce-scatters none: the
    collective moves about twice a reduce-scatter's bytes and nothing overlaps it (tpusim's program
    reduce-scatters them asynchronously)."""
    p = P16
    cols = _collectives("v5e_16b_full")
    assert not [c for c in cols if c["kind"] == "reduce-scatter"]
    grads = [c for c in cols if c["kind"] == "all-reduce" and c["in_while"] and "transpose" in c["op_name"]
             and c["operand_bytes"] > 1e6]
    assert not any(c["async"] for c in grads)
    assert sum(c["executed"] for c in grads) == 7 * p["L"]
    # a layer's gradients in bf16, the two RMSNorm scales' riding in one of the seven (a tuple all-reduce)
    assert sum(c["operand_bytes"] for c in grads) == 2 * (4 * p["D"] * N * H + 3 * p["D"] * F + 2 * p["D"])


def test_v5e_16b_weight_all_gathers_are_mostly_async_collective_fusions():
    """The FSDP weight all-gathers in the layer loops (each weight [.., D/256, ..] -> [.., D, ..] bf16,
    forward and again in the backward) are async collective fusions, all but one per loop."""
    p = P16
    ags = [c for c in _collectives("v5e_16b_full") if c["kind"] == "all-gather" and c["in_while"]]
    assert sum(c["executed"] for c in ags) == 14 * p["L"]
    sync = [c for c in ags if not c["async"]]
    assert sum(c["executed"] for c in sync) == 2 * p["L"]
