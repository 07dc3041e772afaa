"""Context parallelism (issue 15): MaxText's ``ici_context_parallelism`` with its two strategies and its
load balancing, against closed forms: K and V cross the context axis once per attention forward,
(n-1)/n of them per device whether all-gathered or passed round a ring (the book's all-gather cost;
Liu et al. 2023, Ring Attention), and an unbalanced causal split leaves the last shard (2n-1)/n of
the average work."""

from __future__ import annotations

import pytest

from tpusim.compiler import compile_program
from tpusim.errors import TpusimError
from tpusim.model.workload import workload_from_dict
from tpusim.sim.engine import simulate
from tpusim.sim.topology import parse_topology

TOPO = parse_topology("v5p:4x2x1")
T, N_CTX = 8192, 4


def _prog(**more):
    w = workload_from_dict({"model_name": "llama3-8b", "per_device_batch_size": 1, "max_target_length": T,
                            "base_num_decoder_layers": 2, "ici_context_parallelism": N_CTX,
                            "physical_axes": {"sequence": "x"}, **more}, source="context")
    return w, compile_program(w, TOPO, check_memory=False)


def _sent(prog, *, phase, layer=0, kinds=("all-gather", "collective-permute")):
    """Bytes one device sends over the context axis in one layer's forward (not its recomputation):
    all-gather (n-1)/n V, a permute its V."""
    ops = [op for op in prog.ops if op.stream == "collective" and op.mesh_axes == ("sequence",)
           and op.layer == layer and op.phase == phase and "/recompute/" not in op.name and op.category in kinds]
    return sum(op.bytes * ((N_CTX - 1) / N_CTX if op.category == "all-gather" else 1) for op in ops), ops


def _kv_bytes(w):
    """K (or V) of the whole sequence for this device's sequences, bf16."""
    m = w.model
    seqs = TOPO.num_chips * w.step.per_device_batch_size / (TOPO.num_chips // N_CTX)
    return seqs * T * m.num_kv_heads * m.head_dim * 2


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_forward_moves_n_minus_1_over_n_of_k_and_v(strategy):
    w, prog = _prog(context_parallel_strategy=strategy)
    sent, ops = _sent(prog, phase="forward")
    assert sent == pytest.approx(2 * _kv_bytes(w) * (N_CTX - 1) / N_CTX, rel=1e-12)
    assert len(ops) == (2 if strategy == "all_gather" else N_CTX - 1)


def test_ring_backward_recirculates_k_v_and_sends_the_gradients_round():
    """(n-1) permutes of the K, V shards and n of the dK, dV partial sums: (2(n-1) + 2n)/n of K."""
    w, prog = _prog(context_parallel_strategy="ring")
    sent, ops = _sent(prog, phase="backward")
    assert sent == pytest.approx(2 * _kv_bytes(w) * (2 * N_CTX - 1) / N_CTX, rel=1e-12)
    _, ag = _prog()
    rs, _ = _sent(ag, phase="backward", kinds=("reduce-scatter",))
    assert rs * (N_CTX - 1) / N_CTX == pytest.approx(2 * _kv_bytes(w) * (N_CTX - 1) / N_CTX, rel=1e-12)


def test_ring_runs_on_the_placed_torus_axis_chunk_by_chunk():
    w, prog = _prog(context_parallel_strategy="ring")
    permutes = [op for op in prog.ops if op.category == "collective-permute"]
    assert permutes and all(op.axes == ("x",) for op in permutes)
    res = simulate(prog, TOPO)
    links = {s for s, n in zip(res.record.stream, res.record.name) if "kv_ring" in n and s.startswith("ICI")}
    assert links == {"ICI x"}
    chunks = [op for op in prog.ops if op.name.startswith("layer_0/fwd/attention/ring_")]
    whole = next(op for op in _prog()[1].ops if op.name == "layer_0/fwd/attention")
    assert len(chunks) == N_CTX and sum(op.flops for op in chunks) == pytest.approx(whole.flops)


def test_unbalanced_causal_split_costs_the_last_shard_2n_minus_1_over_n():
    _, bal = _prog()
    _, unbal = _prog(context_parallel_load_balance=False)
    a = next(op for op in bal.ops if op.name == "layer_0/fwd/attention")
    b = next(op for op in unbal.ops if op.name == "layer_0/fwd/attention")
    assert b.flops / a.flops == pytest.approx((2 * N_CTX - 1) / N_CTX, rel=1e-12)
    assert simulate(unbal, TOPO).step_time_s > simulate(bal, TOPO).step_time_s
    _, dense = _prog(attention="dot_product", context_parallel_load_balance=False)  # computes the whole square
    _, dense_bal = _prog(attention="dot_product")
    name = "layer_0/fwd/attention"
    assert next(o for o in dense.ops if o.name == name).flops == next(o for o in dense_bal.ops if o.name == name).flops


@pytest.mark.parametrize("more, words", [
    ({"context_parallel_strategy": "ring", "attention": "dot_product"}, "flash kernel"),
    ({"context_parallel_strategy": "ring", "physical_axes": {"sequence": "xy"}, "ici_context_parallelism": 8},
     "one torus axis"),
    ({"context_parallel_strategy": "ulysses"}, "not modelled yet"),
])
def test_what_ring_cannot_do_is_one_clear_error(more, words):
    with pytest.raises(TpusimError) as e:
        _prog(**more)
    assert e.value.key == "context_parallel_strategy" and words in e.value.reason


def test_tensor_parallelism_is_the_playbooks_sequence_parallel_tp():
    """The Playbook's SP inside TP: each block starts with an all-gather of the (tokens, D) activation
    and ends with a reduce-scatter (no all-reduce), and the norms between run on 1/Y of it. tpusim's
    tensor axis does so (MaxText shards the activations' D over tensor, the Playbook the sequence:
    the same bytes)."""
    topo, y = parse_topology("v5p:4x2x1"), 4
    w = workload_from_dict({"model_name": "llama3-8b", "per_device_batch_size": 1, "max_target_length": 2048,
                            "base_num_decoder_layers": 2, "ici_tensor_parallelism": y,
                            "physical_axes": {"tensor": "x"}}, source="sp")
    prog = compile_program(w, topo, check_memory=False)
    tok = 2048 * topo.num_chips / (topo.num_chips // y)  # the global batch (1 per chip) over fsdp's 2 shards
    fwd = [op for op in prog.ops if op.stream == "collective" and op.mesh_axes == ("tensor",) and op.layer == 0
           and op.phase == "forward" and "/recompute/" not in op.name]
    assert sorted(op.category for op in fwd) == ["all-gather", "all-gather", "reduce-scatter", "reduce-scatter"]
    assert all(op.bytes == tok * w.model.d_model * 2 for op in fwd)
    norm = next(op for op in prog.ops if op.name == "layer_0/fwd/attn_norm")
    assert norm.hbm_bytes == 2 * tok * w.model.d_model / y * 2


def test_tensor_sequence_is_tensor_parallelism_with_the_sequence_split():
    """MaxText's ici_tensor_sequence_parallelism: the same program as tensor parallelism of that size
    (the weights split alike, the activations' all-gather / reduce-scatter the same bytes)."""
    topo = parse_topology("v5p:4x2x1")
    base = {"model_name": "llama3-8b", "per_device_batch_size": 1, "max_target_length": 2048,
            "base_num_decoder_layers": 2}

    def prog(**sharding):
        return compile_program(workload_from_dict({**base, **sharding}, source="ts"), topo, check_memory=False)

    tp4 = prog(ici_tensor_parallelism=4)
    assert prog(ici_tensor_sequence_parallelism=4).ops == tp4.ops
    assert prog(ici_tensor_parallelism=2, ici_tensor_sequence_parallelism=2).ops == tp4.ops
    with pytest.raises(TpusimError) as e:
        prog(ici_tensor_parallelism=-1, ici_tensor_sequence_parallelism=2)
    assert e.value.key == "ici_tensor_parallelism"


@pytest.mark.parametrize("case", ["mha", "gqa"])
def test_kv_exchange_matches_libtpu(case):
    """Against XLA (traces/aot_context.py: libtpu 0.0.42.1, v5e:2x4, context 8, MaxText's flash path
    with an explicit all-gather of K and V in shard_map): per layer, one all-gather each of K and V
    whose result is B x T x kv_heads x head_dim bf16, and one reduce-scatter each of dK and dV of the
    same size, as tpusim's program has. (The AOT step keeps the weights replicated, so its gradients
    end in one all-reduce; tpusim shards them over the context axis as over fsdp: not compared.)"""
    import json

    from conftest import REPO

    aot = json.loads((REPO / "traces" / "xla_aot_context.json").read_text())
    m = aot["model"]
    kv = m["kv_heads"][case]
    w = workload_from_dict({"model": {"base_emb_dim": m["d_model"], "base_num_query_heads": m["heads"],
                                      "base_num_kv_heads": kv, "head_dim": m["head_dim"], "base_mlp_dim": 1024,
                                      "base_num_decoder_layers": m["layers"], "vocab_size": 32000},
                            "step": {"per_device_batch_size": m["batch"] / m["context"], "max_target_length": m["seq"],
                                     "remat_policy": "none", "attention": "dot_product"},
                            "sharding": {"ici_context_parallelism": m["context"]}}, source="aot_context")
    prog = compile_program(w, parse_topology(m["topology"]))
    ours = sorted((o.category, o.bytes) for o in prog.collective_ops if "_context" in o.name)
    xla = sorted((c["kind"], c["result_bytes"] if c["kind"] == "all-gather" else c["operand_bytes"])
                 for c in aot["cases"][case] if c["kind"] in ("all-gather", "reduce-scatter"))
    assert ours == xla
    assert len(ours) == 4 * m["layers"]


@pytest.mark.libtpu
def test_context_recompile_matches_committed():
    """``TPUSIM_JAX_PYTHON=/work/venvs/jax/bin/python pytest -m libtpu tests/test_context.py``."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    python = os.environ.get("TPUSIM_JAX_PYTHON", sys.executable)
    run = subprocess.run([python, str(REPO / "traces" / "aot_context.py")], capture_output=True, text=True,
                         check=True, env=dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
    fresh = json.loads(run.stdout[run.stdout.index("{"):])
    committed = json.loads((REPO / "traces" / "xla_aot_context.json").read_text())
    assert fresh["cases"] == committed["cases"]
