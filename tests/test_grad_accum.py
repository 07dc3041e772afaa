"""Gradient accumulation (MaxText's gradient_accumulation_steps): k microbatches of B/k in sequence,
weights gathered per microbatch, gradients reduce-scattered into the sharded accumulator per
microbatch and all-reduced over the data axes once per step (in f32, the accumulator's dtype); an
f32 accumulator in HBM. The collective placement is libtpu's (traces/aot_grad_accum.py)."""

from __future__ import annotations

import pytest

from tpusim.compiler import compile_program
from tpusim.sim.engine import simulate
from tpusim.errors import TpusimError
from tpusim.sim.topology import parse_topology
from tpusim.model.workload import workload_from_dict

ONCE = ("weight_cast", "optimizer/adamw")  # per step, not per microbatch


def _program(k: int, pdbs: float, topo: str, **sharding):
    w = workload_from_dict({"model_name": "llama2-7b", "per_device_batch_size": pdbs, "max_target_length": 1024,
                            "gradient_accumulation_steps": k, "base_num_decoder_layers": 4, **sharding},
                           source="ga.yaml")
    t = parse_topology(topo)
    return compile_program(w, t), t


def _bytes(program, kind):
    return sum(o.bytes for o in program.ops if o.category == kind)


def test_one_device_step_is_k_microbatches_in_sequence():
    """Uncontended (one chip, no collectives): T(k, B) = k (T(1, B/k) - once) + once + k accumulate."""
    k = 4
    (p1, topo), (pk, _) = _program(1, 1, "v5p:1x1x1"), _program(k, k, "v5p:1x1x1")
    r1, rk = simulate(p1, topo, mode="datasheet"), simulate(pk, topo, mode="datasheet")

    def op_time(result, predicate):
        rec = result.record
        return sum(e - s for n, s, e, c in zip(rec.name, rec.start_s, rec.end_s, rec.device_class)
                   if c == 0 and predicate(n))  # one chip: compute ops only

    once = op_time(r1, lambda n: n in ONCE)
    accumulate = op_time(rk, lambda n: n.endswith("grad_accumulate"))
    assert accumulate > 0
    expected = k * (r1.step_time_s - once) + once + accumulate
    assert rk.step_time_s == pytest.approx(expected, rel=1e-9)
    assert pk.model_flops_per_step == pytest.approx(k * p1.model_flops_per_step, rel=1e-12)
    assert pk.tokens_per_step == k * p1.tokens_per_step


def test_gathers_per_microbatch_data_reduction_once_per_step():
    k = 4
    sharding = {"ici_fsdp_parallelism": 4, "ici_data_parallelism": 2}
    (p1, _), (pk, _) = _program(1, 1, "v5p:2x2x2", **sharding), _program(k, k, "v5p:2x2x2", **sharding)
    step, _ = _program(1, k, "v5p:2x2x2", **sharding)  # the same global batch without accumulation
    assert _bytes(pk, "all-gather") == pytest.approx(k * _bytes(p1, "all-gather"), rel=1e-12)
    assert _bytes(pk, "reduce-scatter") == pytest.approx(k * _bytes(p1, "reduce-scatter"), rel=1e-12)
    assert _bytes(step, "all-reduce") > 0
    # ... on the f32 accumulator: twice the bf16 gradient's bytes (libtpu's compile, traces/aot_grad_accum.py)
    assert _bytes(pk, "all-reduce") == pytest.approx(2 * _bytes(step, "all-reduce"), rel=1e-12)
    assert pk.model_flops_per_step == pytest.approx(step.model_flops_per_step, rel=1e-12)


def test_accumulator_memory_and_smaller_activations():
    sharding = {"ici_fsdp_parallelism": 8}
    (step, _), (pk, _) = _program(1, 4, "v5p:2x2x2", **sharding), _program(4, 4, "v5p:2x2x2", **sharding)
    assert pk.memory.grads == pytest.approx(step.memory.grads * 2)  # f32 weights: gradient + f32 accumulator
    assert pk.memory.activations == pytest.approx(step.memory.activations / 4)


def test_microbatches_must_split_the_batch():
    with pytest.raises(TpusimError) as e:
        _program(3, 1, "v5p:2x2x2", ici_fsdp_parallelism=8)
    assert e.value.key == "gradient_accumulation_steps"
    with pytest.raises(TpusimError) as e:
        _program(0, 1, "v5p:2x2x2")
    assert e.value.key == "gradient_accumulation_steps"


def test_the_placement_is_libtpus():
    """libtpu's compile of a lax.scan over 4 microbatches (traces/aot_grad_accum.py, data 2 x fsdp 4):
    weight gathers and fsdp reduce-scatters in the loop, 4 times each; one data all-reduce after it,
    of the f32 accumulator shards (4 weights of 1024 x 4096 / 4 fsdp shards x 4 bytes)."""
    import json
    from pathlib import Path

    aot = json.loads((Path(__file__).parent.parent / "traces" / "xla_aot_grad_accum.json").read_text())["k4"]
    gathers = [c for c in aot if c["kind"] == "all-gather" and c["in_loop"]]
    scatters = [c for c in aot if c["kind"] == "reduce-scatter"]
    reduces = [c for c in aot if c["kind"] == "all-reduce"]
    assert gathers and all(c["executed"] == 4 for c in gathers)
    assert len(scatters) == 4 and all(c["in_loop"] and c["executed"] == 4 and c["group_size"] == 4 for c in scatters)
    assert len(reduces) == 1 and not reduces[0]["in_loop"] and reduces[0]["executed"] == 1
    assert reduces[0]["group_size"] == 2 and reduces[0]["operand_bytes"] == 4 * 1024 * 4096 // 4 * 4
