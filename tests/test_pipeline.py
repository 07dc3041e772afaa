"""Pipeline parallelism (issue 15): the bubble comes out of the simulation and matches the Ultra-Scale
Playbook's closed forms in the uncontended case; memory per stage follows the schedule; bad keys are
refused by name; the CLI runs a pipelined workload and shows its stages."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from tpusim.analysis.summary import summarize
from tpusim.cli import main
from tpusim.compiler import compile_program
from tpusim.compiler.schedule import peak_in_flight, schedule
from tpusim.errors import TpusimError
from tpusim.sim.engine import simulate
from tpusim.sim.topology import parse_topology
from tpusim.model.workload import workload_from_dict

# A model whose stages are nearly identical: a 256-token vocabulary makes the embedding (first stage)
# and the loss (last stage), which the Playbook's identical stages lack, a few per cent of a chunk.
MODEL = {"base_emb_dim": 1024, "base_num_query_heads": 8, "base_mlp_dim": 4096, "vocab_size": 256,
         "base_num_decoder_layers": 24, "weight_dtype": "bfloat16", "opt_type": "sgd", "max_target_length": 4096}


def _workload(p, m, v, sched, *, layers=24, **more):
    return workload_from_dict({**MODEL, "base_num_decoder_layers": layers, "per_device_batch_size": 8 * m / p,
                               "ici_pipeline_parallelism": p, "ici_fsdp_parallelism": 1, "ici_data_parallelism": 1,
                               "num_pipeline_microbatches": m, "num_pipeline_repeats": v, "pipeline_schedule": sched,
                               **more}, source="test")


def _uncontended(p, m, v, sched, layers=24):
    """Compute only: the permutes carry one byte (their ~us latency stays), nothing else is sharded."""
    topo = parse_topology(f"v5e:{p}x1")
    prog = compile_program(_workload(p, m, v, sched, layers=layers), topo)
    assert {op.category for op in prog.collective_ops} == {"collective-permute"}
    prog = replace(prog, ops=tuple(replace(o, bytes=1.0) if o.category == "collective-permute" else o
                                   for o in prog.ops))
    return summarize(simulate(prog, topo))["pipeline"]


@pytest.mark.parametrize("p,m,v,sched,layers", [
    (4, 4, 1, "gpipe", 24), (4, 8, 1, "gpipe", 24), (4, 8, 1, "1f1b", 24), (8, 8, 1, "1f1b", 24),
    (4, 8, 2, "gpipe", 24), (4, 8, 2, "interleaved", 24), (2, 8, 3, "interleaved", 24), (8, 16, 2, "interleaved", 48),
])
def test_simulated_bubble_is_the_playbooks(p, m, v, sched, layers):
    """Playbook: GPipe and 1F1B idle (p-1)/m of the ideal time, interleaved over v chunks (p-1)/(m v). The
    simulated bubble is each stage's idle time over its busy time. The Playbook's stages are identical;
    here the first also embeds and the last computes the loss, and the slowest stage sets the pace, so
    a stage's idle / busy may differ by (1 + bubble) x the stages' spread in busy time (max - min over
    the mean, under 1% here), plus 0.1% for the permutes' microseconds. A schedule with one unit out of
    place is off by far more."""
    pp = _uncontended(p, m, v, sched, layers)
    formula = (p - 1) / (m * v)
    busy = pp["stage_busy_s"]
    spread = (max(busy) - min(busy)) / (sum(busy) / len(busy))
    assert pp["bubble_formula"] == pytest.approx(formula)
    assert spread < 0.01
    tol = (1 + formula) * spread + 1e-3
    assert pp["bubble"] == pytest.approx(formula, abs=tol)
    for b in pp["bubble_by_stage"]:  # every stage idles the same, not just on average
        assert b == pytest.approx(formula, abs=tol)


def test_more_microbatches_shrink_the_bubble_and_interleaving_divides_it():
    b = {m: _uncontended(4, m, 1, "1f1b")["bubble"] for m in (4, 8, 16)}
    assert b[4] > b[8] > b[16]
    assert _uncontended(4, 8, 2, "interleaved")["bubble"] == pytest.approx(b[8] / 2, abs=0.005)


def test_in_flight_activations_1f1b_p_gpipe_m():
    """The Playbook: 1F1B holds at most p microbatches' activations on the first stage (p - s on stage s),
    GPipe all m; the stage's activation memory scales the same way."""
    p, m = 4, 16
    assert [peak_in_flight(schedule("1f1b", p, m, 1, s)) for s in range(p)] == [4, 3, 2, 1]
    assert [peak_in_flight(schedule("gpipe", p, m, 1, s)) for s in range(p)] == [m] * p
    topo = parse_topology("v5e:4x1")
    gpipe = compile_program(_workload(p, m, 1, "gpipe"), topo, check_memory=False)
    ofob = compile_program(_workload(p, m, 1, "1f1b"), topo, check_memory=False)
    assert gpipe.pipeline["peak_in_flight"] == [m] * p and ofob.pipeline["peak_in_flight"] == [4, 3, 2, 1]
    ratio = [g.activations / o.activations for g, o in zip(gpipe.stage_memory, ofob.stage_memory)]
    assert ratio == pytest.approx([m / 4, m / 3, m / 2, m / 1])


def test_every_unit_runs_once_per_stage_and_permutes_connect_them():
    p, m, v = 4, 8, 2
    topo = parse_topology("v5e:4x1")
    prog = compile_program(_workload(p, m, v, "interleaved"), topo)
    K = p * v
    permutes = [op for op in prog.collective_ops if op.category == "collective-permute"]
    assert len(permutes) == 2 * m * (K - 1)  # every microbatch crosses K - 1 boundaries each way
    assert {op.shift for op in permutes if op.phase == "forward"} == {1}
    assert {op.shift for op in permutes if op.phase == "backward"} == {-1}
    lc = 24 // K
    for s in range(p):  # stage s holds chunks s and s + p of 3 layers each (virtual stages)
        layers = {op.layer for op in prog.ops if op.stage == s and op.layer >= 0}
        assert layers == {k * lc + i for k in (s, s + p) for i in range(lc)}
    # the stages' matmuls together are the unpipelined step's on one device holding the same batch
    flat = compile_program(workload_from_dict({**MODEL, "per_device_batch_size": 8 * m / p}, source="t"),
                           parse_topology("v5e:1x1"), check_memory=False)
    mm = sum(o.flops for o in prog.ops if o.category == "matmul")
    assert mm == pytest.approx(sum(o.flops for o in flat.ops if o.category == "matmul") * p, rel=1e-9)


def test_over_dcn_the_permutes_cross_slices():
    topo = parse_topology("v5e:2x2", slices=4)
    w = _workload(4, 8, 1, "1f1b", ici_fsdp_parallelism=-1, dcn_pipeline_parallelism=4, dcn_data_parallelism=1,
                  ici_pipeline_parallelism=1)
    prog = compile_program(w, topo)
    assert prog.pipeline["over"] == "dcn"
    assert {op.axes for op in prog.collective_ops if op.category == "collective-permute"} == {("dcn",)}
    assert prog.stage_devices == tuple(tuple(range(4 * s, 4 * s + 4)) for s in range(4))
    s = summarize(simulate(prog, topo))
    assert s["pipeline"]["bubble"] > (4 - 1) / 8  # the permutes over DCN add to the bubble


@pytest.mark.parametrize("extra,key,words", [
    ({"num_pipeline_microbatches": 6}, "num_pipeline_microbatches", "multiple of the 4 stages"),
    ({"num_pipeline_microbatches": 0}, "num_pipeline_microbatches", "positive"),
    ({"num_pipeline_repeats": 5}, "num_pipeline_repeats", "do not split evenly"),
    ({"pipeline_schedule": "zigzag"}, "pipeline_schedule", "gpipe, 1f1b, interleaved"),
    ({"pipeline_schedule": "1f1b", "num_pipeline_repeats": 2}, "pipeline_schedule", "one chunk"),
    ({"pipeline_schedule": "interleaved", "num_pipeline_repeats": 1}, "pipeline_schedule", ">= 2"),
    ({"num_pipeline_microbatches": 64}, "num_pipeline_microbatches", "do not split the"),
    ({"pipeline_delay_activation_forwarding": True, "num_pipeline_microbatches": 4}, "num_pipeline_microbatches",
     "twice"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", "not modelled yet"),
    ({"pipeline_delay_activation_forwarding": True, "pipeline_schedule": "1f1b"},
     "pipeline_delay_activation_forwarding", "gpipe"),
    ({"ici_pipeline_parallelism": 3}, "ici_*_parallelism", ""),
])
def test_bad_pipeline_keys_are_one_clear_error(extra, key, words):
    base = {"num_pipeline_microbatches": 8, "num_pipeline_repeats": 1, "pipeline_schedule": "gpipe"}
    with pytest.raises(TpusimError) as e:
        w = workload_from_dict({**MODEL, "per_device_batch_size": 8, "ici_pipeline_parallelism": 4,
                                "ici_fsdp_parallelism": 1, "ici_data_parallelism": 1, **base, **extra}, source="t")
        compile_program(w, parse_topology("v5e:4x1"))
    assert e.value.key == key and words in e.value.reason


def test_delayed_forwarding_doubles_the_bubble():
    """MaxText: delaying activation forwarding by one iteration doubles the bubble."""
    topo = parse_topology("v5e:4x1")
    prog = compile_program(_workload(4, 8, 1, "gpipe", pipeline_delay_activation_forwarding=True), topo)
    prog = replace(prog, ops=tuple(replace(o, bytes=1.0) if o.category == "collective-permute" else o
                                   for o in prog.ops))
    pp = summarize(simulate(prog, topo))["pipeline"]
    assert pp["bubble_formula"] == pytest.approx(2 * 3 / 8)
    assert pp["bubble"] == pytest.approx(2 * 3 / 8, abs=0.005)  # (the spread of busy time, as above)


def test_fsdp_ag_once_gathers_weights_once():
    topo = parse_topology("v5e:4x4")
    kw = dict(ici_fsdp_parallelism=4)
    per_mb = compile_program(_workload(4, 8, 1, "gpipe", **kw), topo)
    once = compile_program(_workload(4, 8, 1, "gpipe", pipeline_fsdp_ag_once=True, **kw), topo)
    def ag(prog, which=lambda op: True):
        return sum(op.bytes for op in prog.collective_ops if op.category == "all-gather"
                   and op.mesh_axes == ("fsdp",) and which(op))
    # once: what the first microbatch's forward gathers; per microbatch: that, and the backward's, m times
    first = ag(per_mb, lambda op: op.name.startswith("microbatch_0/") and op.phase == "forward")
    assert ag(once) == pytest.approx(first)
    assert ag(per_mb) > 8 * first
    assert once.memory.gathered_weights > 0 and per_mb.memory.gathered_weights == 0


def test_cli_runs_a_pipelined_workload_and_program_shows_its_stages():
    r = CliRunner().invoke(main, ["run", "workloads/pipeline_llama2_7b.yaml", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["pipeline"]["stages"] == 4 and s["pipeline"]["bubble"] > s["pipeline"]["bubble_formula"] > 0
    r = CliRunner().invoke(main, ["program", "workloads/pipeline_llama2_7b.yaml"])
    assert r.exit_code == 0, r.output
    assert "stage 0" in r.output and "stage 3" in r.output and "collective-permute" in r.output
    r = CliRunner().invoke(main, ["run", "workloads/pipeline_llama2_7b.yaml", "--json",
                                  "--straggler", "3=1.5"])
    assert r.exit_code == 2 and "pipeline" in r.output


def test_cli_refuses_a_bad_pipeline_key_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path("workloads/pipeline_llama2_7b.yaml").read_text().replace(
        "num_pipeline_microbatches: 8", "num_pipeline_microbatches: 6"))
    r = CliRunner().invoke(main, ["run", str(bad)])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "num_pipeline_microbatches" in r.output and "multiple of the 4 stages" in r.output


AOT = Path(__file__).resolve().parent.parent / "traces" / "xla_aot_pipeline.json"


def _aot_equivalent():
    """traces/aot_pipeline.py's step in tpusim's terms: 4 stages x data 2 on v5e:2x4, 8 microbatches of
    8 sequences x 256 tokens, D 1024, F 4096, one layer per stage."""
    aot = json.loads(AOT.read_text())
    w = workload_from_dict({"base_emb_dim": aot["d_model"], "base_num_query_heads": 8, "base_mlp_dim": aot["d_ff"],
                            "base_num_decoder_layers": aot["stages"], "vocab_size": 256,
                            "max_target_length": aot["seq"],
                            "per_device_batch_size": aot["microbatches"] * aot["microbatch_sequences"] / 8,
                            "ici_pipeline_parallelism": aot["stages"], "ici_data_parallelism": aot["data"],
                            "ici_fsdp_parallelism": 1, "num_pipeline_microbatches": aot["microbatches"]}, source="t")
    return aot, compile_program(w, parse_topology("v5e:2x4"))


def test_permutes_between_stages_against_libtpu():
    """libtpu's compile of a MaxText-like circular pipeline (traces/aot_pipeline.py; jax 0.10.2, libtpu
    0.0.42.1): every loop iteration shifts the state by one stage with a collective-permute (XLA splits the
    wrap-around pair off): m + p - 2 shifts forward and m + p - 2 back (the last iteration's shift is dead),
    each of one microbatch's activations on a device. tpusim sends the same bytes per permute, m per stage
    boundary and direction: it does not move the bubble iterations' empty state (p - 2 per direction)."""
    aot, prog = _aot_equivalent()
    p, m = aot["stages"], aot["microbatches"]
    roll = [c for c in aot["permutes"] if c["op"] == "roll" and c["pairs"] > aot["data"]]  # (not the wrap alone)
    forward = [c for c in roll if not c["backward"]]
    backward = [c for c in roll if c["backward"]]
    assert {c["shift"] for c in forward} == {1} and {c["shift"] for c in backward} == {-1}
    assert len(forward) == len(backward) == m + p - 2
    ours = [op for op in prog.collective_ops if op.category == "collective-permute"]
    # 4 sequences (8 over data 2) x 256 tokens x D 1024 x 2 bytes
    assert {op.bytes for op in ours} == {c["bytes"] for c in roll} == {4 * 256 * 1024 * 2}
    for s in range(p - 1):  # each boundary: m forward sends and m backward sends
        assert sum(op.stage == s and op.shift == 1 for op in ours) == m
        assert sum(op.stage == s + 1 and op.shift == -1 for op in ours) == m


@pytest.mark.libtpu
def test_aot_pipeline_gives_the_committed_permutes(tmp_path):
    """``TPUSIM_JAX_PYTHON=/work/venvs/jax/bin/python pytest -m libtpu tests/test_pipeline.py``: the
    script compiles to the committed collective-permutes."""
    import os
    import subprocess
    import sys

    python = os.environ.get("TPUSIM_JAX_PYTHON", sys.executable)
    run = subprocess.run([python, str(AOT.parent / "aot_pipeline.py"), "--case"], capture_output=True, text=True,
                         check=True, env=dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
    fresh = json.loads(run.stdout.strip().splitlines()[-1])
    assert fresh["permutes"] == json.loads(AOT.read_text())["permutes"]


if __name__ == "__main__":  # the table in docs/VALIDATION.md: python tests/test_pipeline.py
    print("| p | m | v | schedule | simulated bubble | (p-1)/(m v) | stages' spread in busy time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for p, m, v, sched, layers in [(4, 4, 1, "gpipe", 24), (4, 8, 1, "gpipe", 24), (4, 8, 1, "1f1b", 24),
                                   (8, 8, 1, "1f1b", 24), (4, 8, 2, "gpipe", 24), (4, 8, 2, "interleaved", 24),
                                   (2, 8, 3, "interleaved", 24), (8, 16, 2, "interleaved", 48),
                                   (4, 32, 1, "1f1b", 24)]:
        pp = _uncontended(p, m, v, sched, layers)
        busy = pp["stage_busy_s"]
        print(f"| {p} | {m} | {v} | {sched} | {pp['bubble']:.2%} | {pp['bubble_formula']:.2%} | "
              f"{(max(busy) - min(busy)) / (sum(busy) / len(busy)):.2%} |")
