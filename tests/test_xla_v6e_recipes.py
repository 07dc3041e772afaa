"""The v6e tpu-recipes Llama-3.1 runs compiled at full size: what XLA's program does that tpusim's does not.

``traces/aot_memory.py`` compiles the recipes' steps (Llama-3.1 8B on v6e:2x4, FSDP 8, 3 sequences of 8192
per chip; 70B on v6e:8x8, FSDP 64, 2 sequences; GQA with 8 KV heads, rope, vocab 128256, bf16 weights, the
recipes' custom remat: the layer input and the Q/K/V/out projections offloaded to host; splash attention;
AdamW) with libtpu and commits the optimized HLO beside the memory analysis: ``v6e8_llama31_8b`` and
``v6e64_llama31_70b`` (the MaxText v5p 32B run's LIBTPU flags) and ``v6e8_llama31_8b_no_cm`` (the same plus
MaxText's switch that turns collective matmul off, as the 8B recipe's name says it ran). Facts checked here:
XLA's host memory is the offloaded tensors of every layer; it moves them as async slices of a stacked host
buffer, five each way per layer, exactly the bytes tpusim's program copies over PCIe; it recomputes nothing
beyond the policy (no ``*.remat``); its MXU FLOPs per layer are tpusim's; its splash kernels run forward
twice per layer (the context is not saved) and dq/dkv once, with 512 blocks (tpusim's attention ops).
"""

from __future__ import annotations

import collections
import functools
import json
import math
import re

import pytest
from conftest import REPO

from tpusim.api import compile_workload
from tpusim.compiler.hlo.collectives import extract_collectives
from tpusim.compiler.hlo.importer import import_hlo, read_hlo
from tpusim.sim.topology import parse_topology

AOT = REPO / "traces" / "xla_aot_memory"
# case -> (workload, topology, (D, N, K, H, F, V, L)) -- workloads/maxtext/models/llama3-{8b,70b}.yml
RUNS = {"v6e8_llama31_8b": ("recipes_v6e8_llama31_8b", "v6e:2x4", (4096, 32, 8, 128, 14336, 128256, 32)),
        "v6e8_llama31_8b_no_cm": ("recipes_v6e8_llama31_8b", "v6e:2x4", (4096, 32, 8, 128, 14336, 128256, 32)),
        "v6e64_llama31_70b": ("recipes_v6e64_llama31_70b", "v6e:8x8", (8192, 64, 8, 128, 28672, 128256, 80))}
CASES = [c for c in RUNS if (AOT / f"{c}.hlo.txt.gz").exists()]
T = 8192


@functools.cache
def _hlo(case: str) -> str:
    return read_hlo(AOT / f"{case}.hlo.txt.gz")


@functools.cache
def _program(case: str):
    return import_hlo(_hlo(case), parse_topology(RUNS[case][1]))


@functools.cache
def _ours(case: str):
    return compile_workload(REPO / "workloads" / "measured" / f"{RUNS[case][0]}.yaml")[2]


def _case(case: str) -> dict:
    return json.loads((AOT / f"{case}.json").read_text())


def _tokens(case: str) -> int:
    c = _case(case)["config"]
    return c["per_device_batch_size"] * c["max_target_length"]


def _layer_loops(prog) -> list[str]:
    """The scanned layers' loops (forward, backward): the top-level ``while`` ops run most often."""
    trips = collections.defaultdict(set)
    for o in prog.ops:
        m = re.match(r"^(while\.\d+)\[(\d+)\]/", o.name)
        if m:
            trips[m.group(1)].add(int(m.group(2)))
    most = max(len(t) for t in trips.values())
    return [w for w, t in trips.items() if len(t) == most]


@pytest.mark.parametrize("case", CASES)
def test_the_case_is_the_recipes_run(case):
    """The compiled config is the workload tpusim runs: same dims, batch, mesh and remat."""
    from tpusim.api import workload_and_topology

    c = _case(case)["config"]
    assert (c["base_emb_dim"], c["base_num_query_heads"], c["base_num_kv_heads"], c["head_dim"], c["base_mlp_dim"],
            c["vocab_size"], c["base_num_decoder_layers"]) == RUNS[case][2]
    w, topo = workload_and_topology(REPO / "workloads" / "measured" / f"{RUNS[case][0]}.yaml")
    assert (c["per_device_batch_size"], c["max_target_length"], c["ici_fsdp_parallelism"], c["remat_policy"]) == (
        w.step.per_device_batch_size, w.step.seq_len, topo.num_chips, w.step.remat_policy)


@pytest.mark.parametrize("case", CASES)
def test_xla_host_memory_is_the_offloaded_tensors_of_every_layer(case):
    """The layer input, Q, K, V and the out projection of every layer, bf16: L x 2 tok (2D + NH + 2KH)."""
    D, N, K, H, _F, _V, L = RUNS[case][2]
    tok = _tokens(case)
    host = _case(case)["memory_analysis"]["host_temp_size_in_bytes"]
    assert host == L * 2 * tok * (2 * D + N * H + 2 * K * H)


@pytest.mark.parametrize("case", CASES)
def test_xla_moves_the_offloaded_tensors_as_async_host_slices_five_each_way_per_layer(case):
    """XLA writes each offloaded tensor into its [L, ...] stack in host memory with an async
    dynamic-update-slice and reads it back with an async dynamic-slice (no copy-start to S(5)): per layer
    five each way, three of tok x D and two of tok x K x H; in all, the bytes tpusim's program copies."""
    D, _N, K, H, _F, _V, L = RUNS[case][2]
    tok = _tokens(case)
    host = [o for o in _program(case).ops if o.stream == "host"]
    for kind in ("copy-to-host", "copy-from-host"):
        sizes = collections.Counter(o.bytes for o in host if o.category == kind)
        assert sizes == {2 * tok * D: 3 * L, 2 * tok * K * H: 2 * L}
    assert sum(o.bytes for o in host) == sum(o.bytes for o in _ours(case).ops if o.stream == "host")


@pytest.mark.parametrize("case", CASES)
def test_under_the_hbm_xla_recomputes_nothing_beyond_the_policy(case):
    assert not [o for o in _program(case).ops if ".remat" in o.name]


@pytest.mark.parametrize("case", CASES)
def test_tpusim_matmul_flops_per_layer_are_xlas(case):
    """One iteration of XLA's forward and backward layer loops against one of tpusim's layers: the issue's
    1% matmul-FLOP budget (XLA's windowed einsum splits the matmuls, not their FLOPs)."""
    prog = _program(case)
    loops = _layer_loops(prog)
    assert len(loops) == 2
    xla = sum(o.flops for o in prog.ops if o.category == "matmul" and any(o.name.startswith(f"{w}[3]/") for w in loops))
    ours = sum(o.flops for o in _ours(case).ops if o.category == "matmul" and o.layer == 3)
    assert ours == pytest.approx(xla, rel=0.01)


@pytest.mark.parametrize("case", CASES)
def test_splash_runs_forward_twice_per_layer_and_each_backward_kernel_once_with_512_blocks(case):
    """The context is neither saved nor offloaded: the backward recomputes the forward kernel; tpusim's
    program has the same three attention ops per layer. Every kernel's block sizes are 512 (MaxText's
    sa_block_* defaults, which tpusim uses when the workload names none)."""
    L = RUNS[case][2][-1]
    names = collections.Counter(re.sub(r"\.\d+$", "", o.name.split("/")[-1]) for o in _program(case).ops
                                if o.name.split("/")[-1].startswith("splash_"))
    assert names == {"splash_mha_fwd_residuals": 2 * L, "splash_mha_dq_no_residuals": L,
                     "splash_mha_dkv_no_residuals": L}
    blocks = {int(b) for b in re.findall(r'\\"block_\w+\\": (\d+)', _hlo(case))}
    assert blocks == {512}
    assert collections.Counter(o.name.split("/")[1] for o in _ours(case).ops if o.category == "attention"
                               and o.layer == 3) == {"fwd": 1, "recompute": 1, "bwd": 1}


def test_with_the_v5p_runs_flags_xla_gathers_and_reduces_the_fsdp_weights_in_windowed_einsum_loops():
    """With collective matmul allowed, no weight all-gather or gradient reduce-scatter is left as a whole
    collective in the layer loops: XLA rotates the weight shards around the 8-chip ring in windowed-einsum
    loops of async collective-permutes (or async collective fusions); nothing there is synchronous."""
    cols = extract_collectives(_hlo("v6e8_llama31_8b"))
    assert cols["windowed_einsum_loops"]
    assert not [c for c in cols["collectives"] if c["kind"] == "reduce-scatter"]
    big_sync = [c for c in cols["collectives"] if not c["async"] and c.get("executed", 1) >= 31
                and c["kind"] in ("all-gather", "reduce-scatter") ]
    assert not big_sync


def test_at_64_ways_xla_all_reduces_each_layers_whole_weight_gradients_synchronously():
    """70B, FSDP 64: no windowed einsum and no reduce-scatter; every layer's backward all-reduces the
    whole bf16 gradient of each weight matrix over the 64 chips (then keeps its shard), synchronously,
    as on v4 (docs/VALIDATION.md): D x F three times (gate, up, down), D x N x H twice (Q, out), and K and
    V's D x K x H; and it gathers K and V's weights (forward, and again in the backward) as all-reduces of
    zero-padded D x K x H buffers, the v4 pattern, synchronous too: six D x K x H operands per layer.
    tpusim's program all-reduces the same seven gradients whole (compiler/transformer.py
    FSDP_ALL_REDUCE_MIN_DEVICES); its weight gathers stay asynchronous."""
    D, N, K, H, F, _V, L = RUNS["v6e64_llama31_70b"][2]
    cols = extract_collectives(_hlo("v6e64_llama31_70b"))
    assert not cols["windowed_einsum_loops"]
    assert not [c for c in cols["collectives"] if c["kind"] == "reduce-scatter"]
    per_layer = collections.Counter()
    for c in cols["collectives"]:
        if c["kind"] == "all-reduce" and c.get("executed") == L - 1:  # the loop runs L - 1 times, one is peeled
            assert not c["async"]
            for shape in c["operand_shapes"]:
                dims = [int(d) for d in shape.split("[")[1].rstrip("]").split(",")]
                per_layer[math.prod(dims)] += 1
    assert per_layer[D * F] == 3 and per_layer[D * N * H] == 2 and per_layer[D * K * H] == 6
    _w, _topo, ours = compile_workload(REPO / "workloads" / "measured" / f"{RUNS['v6e64_llama31_70b'][0]}.yaml")
    ar = [o for o in ours.collective_ops if o.category == "all-reduce" and o.layer == 0 and o.phase == "backward"]
    assert sorted(o.bytes / 2 for o in ar) == sorted([D * F] * 3 + [D * N * H] * 2 + [D * K * H] * 2)


def test_with_collective_matmul_off_the_fsdp_8_gradients_are_async_reduce_scatters():
    """8B as the recipe ran it (collective matmul off): no windowed einsum; each layer's weight gradients are
    reduce-scattered by async all-reduce-scatter fusions, as tpusim's program does; no weight all-reduce."""
    L = RUNS["v6e8_llama31_8b_no_cm"][2][-1]
    cols = extract_collectives(_hlo("v6e8_llama31_8b_no_cm"))
    assert not cols["windowed_einsum_loops"]
    in_loop = [c for c in cols["collectives"] if c.get("executed") == L - 1]
    rs = [c for c in in_loop if c["kind"] == "reduce-scatter"]
    assert len(rs) >= 6 and all(c["async"] for c in rs)
    assert not [c for c in in_loop if c["kind"] == "all-reduce" and
                any(math.prod(int(d) for d in s.split("[")[1].rstrip("]").split(",")) > 1 << 20
                    for s in c["operand_shapes"])]


@pytest.mark.parametrize("case", [c for c in ("v6e8_llama31_8b_no_cm", "v6e64_llama31_70b") if c in CASES])
def test_xla_waits_in_each_forward_iteration_for_the_last_layers_offloaded_k_and_v(case):
    """XLA issues layer i's five host copies at the start of iteration i+1 (the loop carries them) and waits
    for K's and V's before that iteration's projections, while they share PCIe with the input's and Q's: the
    HLO path's exposed wait per forward iteration is the PCIe time of those four tensors,
    2 tok (2D + 2KH) / PCIe, less the little compute before the projections (the norm): between 75% and 100%
    of it. tpusim's program does the same (compiler/transformer.py OFFLOAD_GROUPS): its exposed wait per
    forward layer is inside the same bounds."""
    from tpusim.sim.engine import simulate

    D, _N, K, H, _F, _V, L = RUNS[case][2]
    topo = parse_topology(RUNS[case][1])
    prog = _program(case)
    fwd = [w for w in _layer_loops(prog) if any(o.name.startswith(f"{w}[") and o.category == "copy-to-host"
                                                for o in prog.ops)]
    assert len(fwd) == 1
    result = simulate(prog, topo)
    rec = result.record
    ops = {o.index: o for o in prog.ops}
    waited = sum(e - s for s, e, i, k in zip(rec.start_s, rec.end_s, rec.op_index, rec.device_class)
                 if k in (0, -1) and ops[i].category == "copy-done" and ops[i].name.startswith(f"{fwd[0]}["))
    per_iteration = waited / (L - 1)
    closed = 2 * _tokens(case) * (2 * D + 2 * K * H) / topo.chip.pcie_bytes_per_s
    assert 0.75 * closed < per_iteration <= closed
    from tpusim.analysis.summary import summarize

    _w, topo, ours = compile_workload(REPO / "workloads" / "measured" / f"{RUNS[case][0]}.yaml")
    ours_waited = summarize(simulate(ours, topo))["exposed_comm_by_kind_s"].get("copy-to-host", 0.0)
    assert 0.75 * closed < ours_waited / (L - 1) <= closed
