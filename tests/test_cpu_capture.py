"""Our own XLA captures on 8 CPU devices (traces/capture_cpu.py): the program tpusim compiles for the
same model and sharding has the structure XLA compiled, up to the CPU backend's differences, which
each assertion states:

* the CPU backend computes bf16 as f32, so every collective moves twice the bytes;
* it keeps the gathered weights from the forward pass for the backward (no memory pressure, no
  remat), so weights are all-gathered once per layer, where the TPU compile gathers them twice;
* it reduces all gradients in one tuple all-reduce instead of reduce-scatters, and the embedding
  table's gradient goes through an all-to-all of the looked-up rows instead.
"""

from __future__ import annotations

import json

import pytest

from tpusim.compiler import compile_program
from tpusim.sim.program import COLLECTIVE
from tpusim.sim.topology import parse_topology
from tpusim.model.workload import load_workload

from conftest import REPO

CPU = REPO / "traces" / "cpu"
F32_OVER_BF16 = 2


def ours(case):
    w = load_workload(CPU / case / "config.yaml")
    return compile_program(w, parse_topology("v5e:2x4"))  # 8 devices; the chip does not matter here


def xla(case):
    return json.loads((CPU / case / "summary.json").read_text())["collectives"]


@pytest.mark.parametrize("case, group", [("fsdp", 8), ("fsdp_tp", 4)])
def test_weight_gathers_per_layer(case, group):
    prog = ours(case)
    for layer in (0, 1):
        mine = [o for o in prog.ops if o.stream == COLLECTIVE and o.category == "all-gather" and o.layer == layer
                and "/forward/" in o.name]
        theirs = [c for c in xla(case) if c["kind"] == "all-gather" and f"jvp(layer_{layer})/" in c["op_name"]
                  and "transpose" not in c["op_name"]]
        assert len(mine) == len(theirs) == 7
        assert all(c["group_size"] == group for c in theirs)
        assert sum(c["result_bytes"] for c in theirs) == F32_OVER_BF16 * sum(o.bytes for o in mine)
    # Backward: the TPU compile and tpusim gather again; the CPU backend reuses the forward's.
    assert not [c for c in xla(case) if c["kind"] == "all-gather" and "transpose(jvp(layer_" in c["op_name"]]
    assert len([o for o in prog.ops if o.category == "all-gather" and "/backward/" in o.name]) == 14


def test_gradient_reduction_is_one_all_reduce_of_our_reduce_scatters():
    prog = ours("fsdp")
    grads = [o for o in prog.collective_ops if o.category == "reduce-scatter"]
    assert not any(o.name == "reduce-scatter/embedding" for o in grads)  # the table's gradient: already sharded
    (ar,) = [c for c in xla("fsdp") if c["kind"] == "all-reduce" and c["num_operands"] == 21]
    norms = 5 * 512 * 4 + 4  # 5 replicated RMSNorm scales (f32) and the scalar loss, not modelled
    assert ar["operand_bytes"] == F32_OVER_BF16 * sum(o.bytes for o in grads) + norms
    # The embedding gradient: an all-to-all of the looked-up rows (2 sequences x 512 tokens x 512, f32),
    # tpusim's lookup (jnp.take, use_iota_embed false) resharding them the same way.
    (mine,) = [o for o in prog.collective_ops if o.name == "all-to-all/embedding_grad"]
    assert any(c["kind"] == "all-to-all" and "scatter-add" in c["op_name"]
               and c["operand_bytes"] == 2 * 512 * 512 * 4 == F32_OVER_BF16 * mine.bytes for c in xla("fsdp"))
