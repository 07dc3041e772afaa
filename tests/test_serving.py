"""tpusim serve: the command, its files, bad input, queueing sanity, disaggregation, published runs.

Error budget for the published serving runs (workloads/measured/serving/measured.yaml): +-15% of the measured
output tokens/s. Why 15%: the runs' own uncertainty is large (the JetStream table does not say whether
it counts output tokens only; the ShareGPT length mix is drawn, not replayed: a different 2,000-prompt
sample moves the totals by a few %; software versions are not pinned), and 15% is the issue's goal.
Runs outside it are strict xfails that say why. Nothing in tpusim is fitted on them.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tpusim.cli import main
from tpusim.errors import TpusimError
from tpusim.serving import serve, serve_workload_from_dict
from tpusim.serving.compiler import bucket
from tpusim.serving.validate import compare_serving

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "workloads" / "serve_llama2_70b.yaml"


def small(serving: dict | None = None, **inference) -> dict:
    """LLaMA-3 8B, 4 replicas of 2-way tensor parallelism on a v5e 2x4."""
    return {"name": "small", "chip": "v5e", "topology": "v5e:2x4", "model": {"model_name": "llama3-8b"},
            "inference": {"max_prefill_predict_length": 1024, "max_target_length": 2048,
                          "per_device_batch_size": 16, **inference},
            "sharding": {"ici_tensor_parallelism": 2},
            "serving": {"seed": 1, "requests": 300, "input_len": {"dist": "sharegpt"},
                        "output_len": {"dist": "sharegpt"}, **(serving or {})}}


def run_small(**serving):
    return serve(serve_workload_from_dict(small(serving), source="small"))


def test_serve_command_summary():
    r = CliRunner().invoke(main, ["serve", str(SHIPPED), "--requests", "200"])
    assert r.exit_code == 0, r.output
    for word in ("throughput", "TTFT", "TPOT", "ITL", "queueing", "KV cache", "HBM", "bottleneck"):
        assert word in r.output


def test_serve_json_and_files_byte_identical(tmp_path):
    outs = []
    for name in ("a", "b"):
        r = CliRunner().invoke(main, ["serve", str(SHIPPED), "--requests", "150", "--out", str(tmp_path / name),
                                      "--json"])
        assert r.exit_code == 0, r.output
        outs.append(json.loads(r.output))
    a, b = outs
    assert a["requests"] == 150 and a["throughput"]["output_tokens_per_s"] > 0
    for f in ("summary.json", "requests.parquet", "steps.parquet", "trace.json.gz"):
        if f == "summary.json":  # differs only by the folder it names
            ja, jb = (json.loads((tmp_path / n / f).read_text()) for n in "ab")
            assert {**ja, "out": ""} == {**jb, "out": ""}
        else:
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_trace_rows_never_overlap_on_a_track(tmp_path):
    serve(SHIPPED, requests=150, out=tmp_path / "o")
    trace = json.loads(gzip.decompress((tmp_path / "o" / "trace.json.gz").read_bytes()))
    tracks: dict[tuple, list] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            assert abs(e["ts"] * 1000 - round(e["ts"] * 1000)) < 1e-3  # whole nanoseconds
            tracks.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    assert any(tid > 0 for _, tid in tracks)  # request lanes exist
    for spans in tracks.values():
        spans.sort()
        for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
            assert s1 >= e0 - 1e-3 or e1 <= e0 + 1e-3  # sequential (to the ns), or nested within


def test_every_request_accounted_for():
    run = run_small(arrival={"rate": 20.0})
    req = run.requests
    assert len(req) == 300 and (req.finish_s >= req.first_token_s).all() and (req.first_token_s > req.arrival_s).all()
    assert run.summary["tokens"]["output"] == int(req.output_tokens.sum())
    # one decode step per token after the first, for every request: the steps' decode rows add up
    assert int(run.steps.decode_batch.sum()) == int((req.output_tokens - 1).sum())


def test_bucket_rounds_up_by_at_most_one_32nd_of_an_octave():
    xs = np.unique(np.geomspace(1, 1e7, 4000).astype(int))
    b = np.array([bucket(x) for x in xs])
    assert (b >= xs).all() and (b <= xs * (1 + 1 / 32) + 1).all()


# ---- queueing sanity ------------------------------------------------------------------------------------

def test_low_rate_ttft_is_the_prefill_time():
    """Alone in the system, a request's TTFT is its prefill step."""
    run = run_small(arrival={"rate": 0.05}, requests=40, input_len=512, output_len=16)
    pre = run.steps[run.steps.kind == "prefill"]
    assert run.summary["queueing_s"]["p99"] == pytest.approx(0.0, abs=1e-12)
    assert run.summary["ttft_s"]["p50"] == pytest.approx(float((pre.end_s - pre.start_s).median()), rel=1e-9)


def test_past_saturation_throughput_flattens_and_latency_grows():
    rates = (2.0, 200.0, 400.0, 800.0)
    s = [run_small(arrival={"rate": r}, requests=400).summary for r in rates]
    tput = [x["throughput"]["output_tokens_per_s"] for x in s]
    assert tput[1] > 3 * tput[0]                                # below saturation it follows the rate
    assert tput[3] == pytest.approx(tput[2], rel=0.05)          # past it, flat
    assert s[3]["ttft_s"]["p50"] > s[2]["ttft_s"]["p50"] > s[0]["ttft_s"]["p50"]
    assert s[3]["queueing_s"]["p90"] > 0.5 * s[3]["e2e_s"]["p50"] and s[0]["queueing_s"]["p50"] == 0.0
    assert s[0]["bottleneck"] != "queueing"


def test_disaggregation_keeps_decode_steady():
    """Book applied-inference.md: with prefill and generation on the same chips, every prefill stalls
    the running decodes; disaggregated (prefill on other chips, the KV cache moved over ICI) keeps the
    inter-token latency at the decode step time. Same 8 chips, same requests."""
    base = dict(arrival={"rate": 40.0}, requests=300)
    co = run_small(**base).summary
    dis = run_small(**base, disaggregation={"prefill_replicas": 1, "transfer": "ici"}).summary
    assert dis["itl_s"]["p99"] < 0.5 * co["itl_s"]["p99"]
    assert dis["prefill_replicas"] == 1


def test_chunked_prefill_and_static_batching_run():
    chunked = run_small(arrival={"rate": 40.0}, batching={"chunked_prefill": True, "token_budget": 512}).summary
    static = run_small(arrival={"rate": 40.0}, batching={"policy": "static"}).summary
    cont = run_small(arrival={"rate": 40.0}).summary
    assert chunked["itl_s"]["p99"] < cont["itl_s"]["p99"]  # decodes are never stalled by a whole prompt
    assert static["e2e_s"]["mean"] > cont["e2e_s"]["mean"]  # a static batch waits for its longest request


def test_moe_expert_parallel_and_fp8_cache():
    """Mixtral 8x7B over tensor 2 x expert 8: each chip holds 1 of 8 experts (of half width), an fp8
    KV cache is 1 byte per value, and the expert outputs are all-reduced over both axes."""
    data = small({"requests": 100, "arrival": {"concurrency": 16}}, quantization="int8", quantize_kvcache=True,
                 kv_quant_dtype="fp8", per_device_batch_size=4)
    data.update(topology="v5e:4x4", model={"model_name": "mixtral-8x7b"},
                sharding={"ici_tensor_parallelism": 2, "ici_expert_parallelism": 8})
    run = serve(serve_workload_from_dict(data, source="moe"))
    m = run.result.model
    assert (m.replica_chips, m.replicas, m.kvb) == (16, 1, 1.0)
    L, D, F, N, K, H, V, E = 32, 4096, 14336, 32, 8, 128, 32000, 8
    expert = 3 * D * F / 2                     # one gated expert of the 8, half its width (tensor 2)
    attn = (D * (N + 2 * K) * H + N * H * D) / 2
    per_layer = expert + attn + D * E + 2 * D  # + router, norms
    assert m.weight_bytes_per_device() == pytest.approx(L * per_layer + 2 * V * D / 2 + D)  # int8: 1 byte each
    layer, _ = m.ops(8, 8 * 100, 0, 0, 0, 8)
    assert [op.axes for op in layer if op.name == "mlp_all_reduce"] == [m.mesh.axes_of("tensor", "expert")]
    assert run.summary["device_time_s"]["collectives"] > 0


@pytest.mark.parametrize("shape", [dict(n_decode=64, decode_ctx=64 * 1024), dict(n_decode=0, decode_ctx=0,
                                   prefill_tokens=512, prefill_pairs=512 * 513 / 2)])
def test_step_time_is_the_engines_simulation_of_the_step_program(shape):
    """The cached step time (ops' times summed) equals the training engine replaying the same per-device
    step program on the slice (compute ops, then each collective on the links, in order)."""
    from tpusim.sim.engine import simulate

    sw = serve_workload_from_dict(small(), source="small")
    from tpusim.serving import StepModel
    from tpusim.sim.topology import parse_topology

    topo = parse_topology("v5e:2x4")
    m = StepModel(sw, topo, "calibrated")
    n_logits = shape["n_decode"] or 1
    program = m.program(**shape, n_logits=n_logits)
    # two all-reduces per layer, the embedding lookup's all-reduce (vocab-split table) and the sampling gather
    assert len(program.collective_ops) == 2 * 32 + 2
    simulated = simulate(program, topo, mode="calibrated").step_time_s
    assert m.cost(**shape, n_logits=n_logits).time_s == pytest.approx(simulated, rel=1e-6)


@pytest.mark.parametrize("mode", ["datasheet", "calibrated"])
def test_2d_weight_stationary_step_is_the_engines_simulation_of_its_program(mode):
    """The 2D weight-stationary step (fsdp 2 x tensor 4, one replica of 8): per layer 4 collectives over the
    tensor axes and 3 over the fsdp axis (two of them back to back: the reduce-scatter, then the gather
    after the activation), replayed by the engine one after the other to the summed time."""
    from tpusim.serving import StepModel
    from tpusim.sim.engine import simulate
    from tpusim.sim.topology import parse_topology

    data = small()
    data["sharding"] = {"ici_tensor_parallelism": 4, "ici_fsdp_parallelism": 2}
    topo = parse_topology("v5e:2x4")
    m = StepModel(serve_workload_from_dict(data, source="2d"), topo, mode)
    assert (m.replicas, m.replica_chips, m.fsdp, m.tp) == (1, 8, 2, 4)
    program = m.program(n_decode=64, decode_ctx=64 * 1024, n_logits=64)
    layer, outside = m.ops(64, 64 * 1024, 0, 0, 0, 64)
    by_axes = [op.axes for op in layer if op.stream == "collective"]
    assert by_axes.count(m.tensor_axes) == 4 and by_axes.count(m.fsdp_axes) == 3
    assert len(program.collective_ops) == 7 * 32 + 4  # + the lookup's and the unembedding's four
    simulated = simulate(program, topo, mode=mode).step_time_s
    assert m.cost(64, 64 * 1024, n_logits=64).time_s == pytest.approx(simulated, rel=1e-6)


def test_trace_file(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("arrival_s,input_tokens,output_tokens\n0,100,20\n0.5,200,10\n1.0,50,5\n")
    run = serve(serve_workload_from_dict(small({"arrival": {"trace": str(f)}}), source="x"))
    assert list(run.requests.input_tokens) == [100, 200, 50]
    assert list(run.requests.arrival_s) == [0.0, 0.5, 1.0]


# ---- bad input ------------------------------------------------------------------------------------------

def _write(tmp_path, data):
    import yaml

    p = tmp_path / "w.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("change,args,message", [
    (dict(inference={"per_device_batch_size": 400}), [], "does not fit in HBM"),
    (dict(inference={"max_target_length": 16384}), [], "longer than llama3-8b's context of 8192"),
    ({}, ["--rate", "-3"], "--rate: -3.0: a rate must be a positive number"),
    ({}, ["--concurrency", "0"], "concurrency must be a positive integer"),
    ({}, ["--requests", "1000000000"], "--requests: 1000000000 must be a positive number of requests, at most 100,000"),
    (dict(serving={"requests": 100_001}), [], "serving.requests: 100001 must be a positive number of requests"),
    (dict(serving={"input_len": 4000}), [], "serving.input_len: 4000 tokens is longer than max_prefill_predict_length"),
    (dict(serving={"batching": {"policy": "fifo"}}), [], "serving.batching.policy: 'fifo' is not one of"),
    (dict(serving={"arival": {"rate": 1}}), [], "serving.arival: unknown key (did you mean 'arrival'?)"),
    (dict(sharding={"ici_fsdp_parallelism": 4}, model={"base_emb_dim": 4098}), [],
     "ici_fsdp_parallelism: d_model 4098 is not divisible by ici_fsdp_parallelism 4"),
    (dict(sharding={"ici_fsdp_parallelism": -1}), [], "sharding.ici_fsdp_parallelism: -1: the 2D weight-stationary"),
    (dict(sharding={"ici_sequence_parallelism": 2}), [], "ici_sequence_parallelism is not modelled for serving"),
])
def test_bad_input_one_message_exit_2_nothing_written(tmp_path, change, args, message):
    data = small()
    for section, values in change.items():
        data[section] = {**data[section], **values}
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["serve", str(_write(tmp_path, data)), "--out", str(out), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["w.yaml"]


@pytest.mark.parametrize("body,message", [
    ("arrival,in,out\n0,1,1\n", "line 1: the first line must be the header"),
    ("arrival_s,input_tokens,output_tokens\n0,12,x\n", "line 2: '0,12,x': arrival_s is a number"),
    ("arrival_s,input_tokens,output_tokens\n1,10,5\n0.5,10,5\n", "line 3: arrival 0.5 is before"),
    ("arrival_s,input_tokens,output_tokens\n0,3000,5\n", "line 2: a prompt of 3000 tokens is longer"),
    ("arrival_s,input_tokens,output_tokens\n0,10\n", "line 2: expected 3 columns"),
])
def test_malformed_trace(tmp_path, body, message):
    f = tmp_path / "t.csv"
    f.write_text(body)
    r = CliRunner().invoke(main, ["serve", str(_write(tmp_path, small())), "--trace", str(f)])
    assert r.exit_code == 2 and message in r.output and str(f) in r.output, r.output


def test_dcn_transfer_needs_prefill_on_whole_slices():
    with pytest.raises(TpusimError, match="different slices"):
        run_small(disaggregation={"prefill_replicas": 1, "transfer": "dcn"})
    data = small({"disaggregation": {"prefill_replicas": 4, "transfer": "dcn"}, "arrival": {"rate": 40.0}})
    data["slices"] = 2
    s = serve(serve_workload_from_dict(data, source="dcn")).summary
    assert (s["replicas"], s["prefill_replicas"], s["chips"]) == (8, 4, 16)


def test_disaggregation_needs_a_decode_replica():
    with pytest.raises(TpusimError, match="leave none of the 4 replicas to decode"):
        run_small(disaggregation={"prefill_replicas": 4})


# ---- published serving runs -----------------------------------------------------------------------------

BUDGET = 0.15
WHY = {
    "serve_jetstream_gemma2b_v5e1": "does not fit by our KV accounting: 1024 slots x 2048 tokens of bf16 KV "
                                    "(18.4 kB/token) is 38.7 GB on a 16 GiB chip; JetStream must have held less",
}
DEFAULT_WHY = ("the simulator models device time only (weights, KV, compute, collectives at their rooflines); "
               "the 2024-25 serving stacks (JetStream-PyTorch, vLLM on PyTorch/XLA) also spent host time per "
               "step (Python scheduling, detokenization, prefill padding to power-of-two buckets), which the book "
               "puts at about half of the ideal (applied-inference.md): simulated 2-6x the measured throughput")


@pytest.fixture(scope="module")
def published():
    return {r["name"]: r for r in compare_serving()}


def _published_ids():
    import yaml

    return list(yaml.safe_load((REPO / "workloads" / "measured" / "serving" / "measured.yaml").read_text()))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=WHY.get(n, DEFAULT_WHY)))
                                  for n in _published_ids()])
def test_published_serving_throughput(published, name):
    r = published[name]
    assert r["refused"] is None, r["refused"]
    print(f"{name}: measured {r['measured_output_tokens_per_s']:.0f}, simulated "
          f"{r['simulated_output_tokens_per_s']:.0f} output tokens/s ({r['error']:+.0%})")
    assert abs(r["error"]) <= BUDGET


def test_out_is_a_run_folder(tmp_path):
    """serve --out goes through the run folders' mechanism (tpusim.runfolder): a folder holding files
    tpusim did not write is refused, untouched; a serve folder is replaced whole, with its manifest."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, ["serve", str(SHIPPED), "--requests", "20", "--out", str(out)])
    assert r.exit_code == 2 and "holds notes.txt, which tpusim serve did not write" in r.output, r.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    for _ in range(2):  # the second run replaces the first's folder
        r = CliRunner().invoke(main, ["serve", str(SHIPPED), "--requests", "20", "--out", str(out)])
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "requests.parquet", "steps.parquet",
                                                    "summary.json", "trace.json.gz"]


@pytest.mark.parametrize("kind,message", [
    ("binary", "not a CSV trace (not UTF-8"),
    ("fifo", "a named pipe (FIFO): tpusim reads regular files only"),
    ("folder", "a folder"),
])
def test_trace_that_is_not_a_text_file(tmp_path, kind, message):
    """The trace goes through tpusim.safeio like every other input: bytes that are not UTF-8 were an
    internal error, and a FIFO blocked the command for good."""
    import os

    f = tmp_path / "t.csv"
    if kind == "binary":
        f.write_bytes(bytes(range(128, 256)))
    elif kind == "fifo":
        os.mkfifo(f)
    else:
        f.mkdir()
    r = CliRunner().invoke(main, ["serve", str(_write(tmp_path, small())), "--trace", str(f)])
    assert r.exit_code == 2 and message in r.output and "internal error" not in r.output, r.output
