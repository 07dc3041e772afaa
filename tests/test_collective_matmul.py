"""Tensor-parallel activation collectives as XLA's collective matmuls (issue 11, item 4).

libtpu's compiles of MaxText's layer with the MaxText v5p 32B run's flags (traces/aot_tp_collective_matmul.py,
committed as traces/xla_aot_tp_collective_matmul.json) pass the activation shards around the tensor ring beside
the matmul's chunks at 8192 tokens per tensor group and more, and keep the collectives synchronous at 2048;
tpusim's rule (``COLLECTIVE_MATMUL_MIN_TOKENS``) is checked against every compile, and its program's structure
and the book's FSDP x TP limit against closed forms.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, waited_at_once

from tpusim.api import compile_workload
from tpusim.compiler import compile_program
from tpusim.compiler.transformer import COLLECTIVE_MATMUL_MIN_TOKENS
from tpusim.errors import TpusimError
from tpusim.model.workload import workload_from_dict
from tpusim.sim.program import COLLECTIVE, COMPUTE
from tpusim.sim.topology import parse_topology

SWEEP = json.loads((REPO / "traces" / "xla_aot_tp_collective_matmul.json").read_text())
T = 2048
# Every tensor-parallel activation collective of the 2-layer step as a collective matmul: its forward and
# backward loop bodies' shard permutes (the O and down reduce-scatters, the backward's gathers of their output
# gradients and its reduce-scatters of Q/K/V's and gate/up's input gradients).
ALL_PERMUTES = 40


def _tokens(case: dict) -> int:
    return round(case["sequences_per_chip"] * case["tensor"]) * T


def _workload(case: dict, **extra):
    dims = {"32b": (8192, 28672), "16b": (4096, 28672)}[case["dims"]]
    return workload_from_dict({
        "model": {"base_emb_dim": dims[0], "base_num_query_heads": 64, "head_dim": 128, "base_mlp_dim": dims[1],
                  "base_num_decoder_layers": 2, "vocab_size": 32000, "mlp_activations": ["silu", "linear"]},
        "step": {"per_device_batch_size": case["sequences_per_chip"], "max_target_length": T,
                 "remat_policy": "minimal", "attention": "flash", "weight_dtype": "float32", **extra},
        "sharding": {"ici_fsdp_parallelism": 16, "ici_tensor_parallelism": 4}}, source="test.yaml")


def _is_collective_matmul(prog) -> bool:
    return any(op.name.endswith("/cm_rest") for op in prog.ops)


def _cases(at_4096: str | None = None):
    out = []
    for name, case in SWEEP["cases"].items():
        marks = []
        if _tokens(case) == 2 * T and at_4096:
            marks = [pytest.mark.xfail(strict=True, reason=at_4096)]
        out.append(pytest.param(case, id=name, marks=marks))
    return out


def test_the_sweep_is_the_run_mesh_with_its_flags():
    import yaml

    entries = yaml.safe_load((REPO / "tests" / "data" / "measured-dev.yaml").read_text())["entries"]
    other = next(e for e in entries if e["id"] == "maxtext-v5p-32b-1xv5p-128")["workload"]["other"]
    assert set(SWEEP["flags"].split()) == set(other.split("LIBTPU:")[1].split())
    assert SWEEP["topology"] == "v5p:4x4x4" and {c["tensor"] for c in SWEEP["cases"].values()} == {4}
    assert {c["d_model"] for c in SWEEP["cases"].values()} == {4096, 8192}


@pytest.mark.parametrize("case", _cases())
def test_xla_switches_on_tokens_not_bytes(case):
    """At the same tokens the two widths (D 4096 and 8192, activations a factor 2 apart) compile alike:
    every collective a collective matmul from 8192 tokens, about none at 2048, the attention's only at 4096."""
    tokens = _tokens(case)
    permutes = case["collective_permutes"]
    if tokens >= COLLECTIVE_MATMUL_MIN_TOKENS:
        assert permutes == ALL_PERMUTES
    elif tokens <= T:
        assert permutes <= 4 and case["sync_all_gathers"] >= 30
    else:
        assert 0 < permutes < ALL_PERMUTES


@pytest.mark.parametrize("case", _cases(at_4096="at 4096 tokens XLA writes the attention's collectives (O's reduce-scatter, "
                                                   "its backward's gather and Q/K/V's input gradients) as collective matmuls "
                                                   "and the MLP's as synchronous ones; tpusim keeps both synchronous"))
def test_tpusim_runs_collective_matmuls_where_xla_does(case):
    prog = compile_program(_workload(case), parse_topology("v5p:4x4x4"))
    assert _is_collective_matmul(prog) == (case["collective_permutes"] > 4)  # (at 4096 tokens: some)


def _program(**extra):
    case = SWEEP["cases"]["32b_b6"]
    return compile_program(_workload(case, **extra), parse_topology("v5p:4x4x4"))


def test_collective_matmul_structure():
    """Each reduce-scatter starts after its matmul's first chunk (1/tp of it) and is waited for after the rest
    and the partial sums (and, in the backward, the last projection's weight gradient); each backward gather is waited for by the last chunk of the matmul reading it; the
    forward's gathers stay synchronous; the MXU work is the same as without."""
    prog, plain = _program(), _program(collective_matmul=False)
    ops = prog.ops
    tp = [op for op in ops if op.stream == COLLECTIVE and op.mesh_axes == ("tensor",)]
    for op in tp:
        nxt = next(o for o in ops[op.index + 1:] if o.stream == COMPUTE)
        waiter = next(o for o in ops if op.index in o.deps and o.stream == COMPUTE)
        if op.layer < 0 or "/fwd/" in op.name and op.category == "all-gather" or "/recompute/" in op.name:
            continue  # (synchronous, or the recompute's re-gathers for the weight gradients)
        if op.category == "reduce-scatter":
            first = ops[op.deps[0]]
            rest = nxt
            assert rest.name == first.name + "/cm_rest"
            assert first.flops == pytest.approx(rest.flops / 3)  # tensor 4: 1 chunk, then 3
            partial = ops[rest.index + 1]
            assert partial.name.endswith("/cm_partial_sums") and waiter.index > partial.index
            if op.phase == "forward":  # (in the backward the weight gradient's matmul runs beside it too)
                assert waiter.index == partial.index + 1
        else:  # a backward gather of an output gradient
            assert not waited_at_once(ops, op)
            assert waiter.name.endswith("/dgrad/cm_rest")
            assert ops[waiter.index - 1].flops == pytest.approx(3 * waiter.flops)
    mxu = lambda p: sum(o.flops for o in p.ops if o.category == "matmul")
    assert mxu(prog) == pytest.approx(mxu(plain), rel=1e-12)
    # per layer: the forward's O and down; the backward's gathers for O and down, its reduce-scatters after V and up
    assert sum(op.name.endswith("/cm_rest") for op in ops) == 2 * 6


def test_collective_matmul_hides_what_the_synchronous_collectives_expose():
    """At 49,152 tokens (the v5p 32B run's) on v5p, each tensor-parallel collective's ring (tpusim's
    bidirectional ring) is shorter than its matmul: the exposed tensor time falls to the forward's gathers."""
    from tpusim.analysis.summary import summarize
    from tpusim.sim.engine import simulate

    topo = parse_topology("v5p:4x4x4")
    cm, plain = (summarize(simulate(_program(**x), topo, mode="calibrated"))["exposed_comm_by_kind_s"]
                 for x in ({}, {"collective_matmul": False}))
    assert cm.get("reduce-scatter", 0) < 0.5 * plain["reduce-scatter"]
    assert cm.get("all-gather", 0) < plain["all-gather"]


@pytest.mark.parametrize("bad", ["yes", 1, None, [True]])
def test_collective_matmul_takes_a_boolean(bad, tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(json.dumps({"model": {"model_name": "llama3-8b"}, "topology": "v5p:2x2x4",
                                "step": {"collective_matmul": bad}}))
    with pytest.raises(TpusimError) as e:
        compile_workload(path)
    assert "collective_matmul" in str(e.value)
