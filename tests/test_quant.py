"""Quantized training (issue 15): MaxText's ``quantization: int8 | fp8 | nanoo_fp8`` (AQT). The MXU's
8-bit peaks are the datasheets' (topologies/chips.yaml: the book's int8 figures, Google's TPU7x fp8
one); a quantized matmul runs at them, the step gains at most their ratio to bf16, and a chip
without fp8 refuses it."""

from __future__ import annotations

import pytest

from tpusim.compiler import compile_program
from tpusim.compiler.quant import DEQUANT_VPU_OPS, QUANT_VPU_OPS, QUANTIZED_WEIGHTS
from tpusim.errors import TpusimError
from tpusim.model.workload import workload_from_dict
from tpusim.sim.costmodel import compute_params, op_time
from tpusim.sim.engine import simulate
from tpusim.sim.topology import parse_topology

V5E, TPU7X = parse_topology("v5e:2x2"), parse_topology("tpu7x:2x2x1")


def _prog(topo, quantization="", **more):
    w = workload_from_dict({"model_name": "llama3-8b", "per_device_batch_size": 4, "max_target_length": 2048,
                            "base_num_decoder_layers": 2, "quantization": quantization, **more}, source="quant")
    return compile_program(w, topo, check_memory=False)


def _op(prog, name):
    return next(op for op in prog.ops if op.name == name)


@pytest.mark.parametrize("name", ["layer_0/fwd/mlp_up", "layer_1/bwd/mlp_down/dgrad", "layer_1/bwd/q_proj/wgrad"])
def test_an_int8_matmul_runs_at_the_int8_peak(name):
    """Datasheet mode: a large int8 matmul (dims multiples of the MXU's 128) takes FLOPs / int8 peak,
    half its bf16 time on v5e (394 against 197 TOP/s, book tpus.md)."""
    cp = compute_params(V5E.chip, "datasheet")
    q, bf16 = _op(_prog(V5E, "int8"), name), _op(_prog(V5E), name)
    assert q.mxu_dtype == "int8" and bf16.mxu_dtype == ""
    assert op_time(q, cp) == pytest.approx(q.flops / V5E.chip.int8_flops_per_s, rel=1e-12)
    assert op_time(bf16, cp) == pytest.approx(bf16.flops / V5E.chip.bf16_flops_per_s, rel=1e-12)
    assert q.flops == bf16.flops
    m, k, n = q.mxu_shape
    assert q.hbm_bytes == m * k + k * n + 2 * m * n  # 1-byte operands, bf16 output
    assert q.vpu_flops == DEQUANT_VPU_OPS * m * n


def test_fp8_is_refused_on_a_chip_without_it():
    for q in ("fp8", "nanoo_fp8"):
        with pytest.raises(TpusimError) as e:
            _prog(V5E, q)
        assert e.value.key == "quantization" and "no fp8 MXU mode" in e.value.reason and "int8" in e.value.reason
    fp8 = _op(_prog(TPU7X, "fp8"), "layer_0/fwd/mlp_up")
    cp = compute_params(TPU7X.chip, "datasheet")
    assert fp8.mxu_dtype == "fp8"
    assert op_time(fp8, cp) == pytest.approx(fp8.flops / TPU7X.chip.fp8_flops_per_s, rel=1e-12)


@pytest.mark.parametrize("topo, q", [(V5E, "int8"), (TPU7X, "int8"), (TPU7X, "fp8")])
@pytest.mark.parametrize("mode", ["datasheet", "calibrated"])
def test_a_quantized_step_is_faster_by_at_most_the_peak_ratio(topo, q, mode):
    peak = topo.chip.int8_flops_per_s if q == "int8" else topo.chip.fp8_flops_per_s
    t_bf16 = simulate(_prog(topo), topo, mode=mode).step_time_s
    t_q = simulate(_prog(topo, q), topo, mode=mode).step_time_s
    assert 1.0 < t_bf16 / t_q <= peak / topo.chip.bf16_flops_per_s


def test_what_is_quantized_and_what_it_costs():
    """Per layer, remat full: forward 7 projections, their recomputation 6 (the down-projection's is
    dead code), backward 7 dgrads + 7 wgrads; each quantizes both operands (M K + K N elements)."""
    prog = _prog(V5E, "int8")
    quantized = [op for op in prog.ops if op.mxu_dtype]
    assert {op.name.split("/")[-1] if op.phase != "backward" or op.recompute else op.name.split("/")[-2]
            for op in quantized} == {"q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down"}
    assert len(quantized) == 2 * (7 + 6 + 14)
    assert {op.name for op in prog.ops if op.category in ("attention",) or "unembedding" in op.name} & \
        {op.name for op in quantized} == set()
    quantize = {op.name: op for op in prog.ops if op.name.endswith("/quantize")}
    for op in quantized:
        m, k, n = op.mxu_shape
        qz = quantize[op.name + "/quantize"]
        assert qz.flops == QUANT_VPU_OPS * (m * k + k * n)
        assert qz.hbm_bytes == (m * k + k * n) * (2 * 2 + 1)
    bf16 = _prog(V5E)
    assert sum(op.flops for op in prog.ops if op.category == "matmul") == \
        sum(op.flops for op in bf16.ops if op.category == "matmul")
    assert prog.memory == bf16.memory and prog.model_flops_per_step == bf16.model_flops_per_step


def test_local_shard_count_zero_keeps_the_wgrad_in_bf16():
    prog = _prog(V5E, "int8", quantization_local_shard_count=0)
    assert not any(op.mxu_dtype for op in prog.ops if op.name.endswith("/wgrad"))
    assert all(op.mxu_dtype == "int8" for op in prog.ops if op.name.endswith("/dgrad")
               and op.name.split("/")[-2] in QUANTIZED_WEIGHTS)


@pytest.mark.parametrize("value", ["intmp", "fp8_full", "int4w"])
def test_other_aqt_modes_are_not_modelled_yet(value):
    with pytest.raises(TpusimError) as e:
        _prog(V5E, value)
    assert e.value.key == "quantization" and "not modelled yet" in e.value.reason


def test_fsdp_gathers_the_quantized_weights_as_libtpu_does_it():
    """libtpu's AOT compile (traces/aot_int8.py: 2-layer MLP, fsdp 8 on v5e:2x4, hand-written
    AQT-style int8 forward / dgrad / wgrad; jax 0.10.2, libtpu 0.0.42.1): the bf16 step gathers bf16
    weights; the int8 step has only int32-accumulating matmuls and moves the weights as int8 shards
    (1 B per element: 1024 x 4096 / 8 bytes each), no bf16 gather. tpusim gathers quantized
    projections at 1 B per element, the rest (embedding, router) at 2."""
    import json
    from pathlib import Path

    aot = json.loads((Path(__file__).parent.parent / "traces" / "xla_aot_int8.json").read_text())
    assert set(aot["bf16"]["matmuls"]) == {"->bf16"} and set(aot["int8"]["matmuls"]) == {"->s32"}
    shard = 1024 * 4096 // 8
    assert {c["operand_bytes"] for c in aot["bf16"]["collectives"] if c["kind"] == "all-gather"} == {2 * shard}
    moved = {c["operand_bytes"] for c in aot["int8"]["collectives"] if c["kind"] in ("all-gather", "collective-permute")
             and c["operand_bytes"] >= 1024}
    assert moved == {shard}
    topo = parse_topology("v5p:2x2x2")
    q, bf16 = _prog(topo, "int8"), _prog(topo)
    for name in ("all-gather/layer_0/forward/mlp_up", "all-gather/layer_1/backward/q_proj"):
        assert _op(q, name).bytes * 2 == _op(bf16, name).bytes
    assert _op(q, "all-gather/unembedding").bytes == _op(bf16, "all-gather/unembedding").bytes
