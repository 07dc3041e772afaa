"""Sweeps over serving workloads, and MaxText's inference configs as serving workloads.

The sweep's rows are ``tpusim serve``'s numbers (the same runs); along a concurrency sweep a closed
loop saturates: once every decode slot is busy, more clients only queue (throughput flat, TTFT grows);
bad grids are refused before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from tpusim.cli import main
from tpusim.errors import TpusimError
from tpusim.explore.store import encode_row
from tpusim.explore.sweep import journal_path, make_sweep, read_journal, run_sweep
from tpusim.serving import load_serve_workload, serve

REPO = Path(__file__).resolve().parent.parent

# LLaMA-3 8B, 4 replicas of TP2 on v5e:2x4, 8 decode slots each (32 in all), short fixed lengths: fast.
SMALL = {"name": "small_serve", "chip": "v5e", "topology": "v5e:2x4", "model": {"model_name": "llama3-8b"},
         "inference": {"max_prefill_predict_length": 512, "max_target_length": 1024, "per_device_batch_size": 4},
         "sharding": {"ici_tensor_parallelism": 2},
         "serving": {"seed": 3, "requests": 200, "arrival": {"concurrency": 4}, "input_len": {"dist": "sharegpt"},
                     "output_len": {"dist": "fixed", "value": 64}}}


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small_serve.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def test_rows_are_the_serve_command_s_numbers(small):
    """Each row holds what `tpusim serve --concurrency C --json` prints, flattened."""
    run = run_sweep(make_sweep(small, {"concurrency": (1, 8, 64)}), workers=1)
    assert list(run.rows["status"]) == ["ok"] * 3
    for row in run.rows.to_dict("records"):
        r = CliRunner().invoke(main, ["serve", str(small), "--concurrency", str(row["concurrency"]), "--json"])
        assert r.exit_code == 0, r.output
        s = json.loads(r.output)
        assert row["throughput.output_tokens_per_s_per_chip"] == s["throughput"]["output_tokens_per_s_per_chip"]
        for metric in ("ttft_s", "tpot_s"):
            for p in ("p50", "p90", "p99"):
                assert row[f"{metric}.{p}"] == s[metric][p]
        assert row["bottleneck"] == s["bottleneck"] and json.loads(row["arrival"]) == s["arrival"]
        assert row["hbm_per_device.total"] == s["hbm_per_device"]["total"]


def test_concurrency_sweep_saturates(small):
    """32 slots: below, throughput follows the clients; past them it is flat and TTFT grows with the queue."""
    grid = (1, 4, 32, 128, 256)
    rows = run_sweep(make_sweep(small, {"concurrency": grid, "requests": (600,)}), workers=1).rows
    tput = list(rows["throughput.output_tokens_per_s_per_chip"])
    ttft = list(rows["ttft_s.p50"])
    assert tput[1] > 3 * tput[0]                       # 4 clients: ~4x one client (each its own slot)
    assert tput[4] == pytest.approx(tput[3], rel=0.05)  # 128 and 256 clients: every slot busy either way
    assert all(b > a for a, b in zip(ttft[2:], ttft[3:]))  # past the slots, waiting grows with the clients
    assert rows["queueing_s.p50"].iloc[4] > 0.5 * rows["e2e_s.p50"].iloc[4]
    assert rows["queueing_s.p50"].iloc[0] == 0.0


def test_serving_rows_resume_from_the_journal(small, tmp_path):
    sweep = make_sweep(small, {"concurrency": (1, 2, 4, 8), "quantization": ("bf16", "int8")})
    full = run_sweep(sweep, workers=1).rows  # serving rows are deterministic: no wall-time column
    out = tmp_path / "curve.parquet"
    run_sweep(sweep, out=out, workers=2)
    kept = read_journal(journal_path(out))[::2]
    journal_path(out).write_bytes(b"".join(encode_row(r) for r in kept))
    again = run_sweep(sweep, out=out, workers=1)
    assert again.resumed == 4 and again.simulated == 4
    pd.testing.assert_frame_equal(again.rows, full)


def test_varied_mesh_batch_and_quantization_say_why_when_they_do_not_work(small):
    rows = run_sweep(make_sweep(small, {"ici_tensor_parallelism": (1, 3), "per_device_batch_size": (4, 512)}),
                     workers=1).rows.set_index(["ici_tensor_parallelism", "per_device_batch_size"])
    assert rows.loc[(1, 4), "status"] == "ok"
    assert rows.loc[(3, 4), "status"] == "invalid"            # 3 does not divide the 8 chips
    assert rows.loc[(1, 512), "status"] == "infeasible"       # 512 x 1024-token KV caches per chip
    assert "does not fit in HBM" in rows.loc[(1, 512), "reason"]


@pytest.mark.parametrize("vary, says", [
    (["concurency=1,8"], "--vary: concurency: unknown key (did you mean 'concurrency'?)"),
    (["concurrency=8,-1"], "--vary: concurrency=-1:"),
    (["concurrency=1", "rate=2"], "vary one of concurrency, rate, trace"),
    (["quantization=int4"], "--vary: quantization='int4':"),
])
def test_bad_grid_is_one_line_exit_2_nothing_written(small, tmp_path, vary, says):
    out = tmp_path / "rows.parquet"
    r = CliRunner().invoke(main, ["sweep", str(small), *[a for v in vary for a in ("--vary", v)], "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and says in r.output
    assert not out.exists() and not journal_path(out).exists()


def test_negative_concurrency_refused_with_the_reason(small):
    with pytest.raises(TpusimError, match="concurrency must be a positive integer"):
        make_sweep(small, {"concurrency": (8, -1)})


def test_cli_prints_the_latency_throughput_table(small):
    r = CliRunner().invoke(main, ["sweep", str(small), "--vary", "concurrency=1,64", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "tok/s/chip" in r.output and "TPOT p50" in r.output and r.output.count(" ok ") == 2


# ---- MaxText's inference configs --------------------------------------------------------------------------

def test_maxtext_inference_config_serves_as_the_sectioned_workload():
    """serve_maxtext_llama2_70b.yaml (MaxText's llama2_70b_v5e-16.yml chain, flat keys) is
    serve_llama2_70b.yaml's configuration: the same simulation."""
    a = serve(load_serve_workload(REPO / "workloads" / "serve_maxtext_llama2_70b.yaml", requests=100)).summary
    b = serve(load_serve_workload(REPO / "workloads" / "serve_llama2_70b.yaml", requests=100)).summary
    for s in (a, b):
        s.pop("workload")
    assert a == b


INFERENCE_CONFIGS = sorted(str(p.relative_to(REPO / "workloads" / "maxtext"))
                           for p in (REPO / "workloads" / "maxtext" / "inference").rglob("*.yml"))


@pytest.mark.parametrize("config", INFERENCE_CONFIGS)
def test_every_maxtext_inference_config_loads(config, tmp_path):
    """Each config of MaxText's inference/ (its base_config chain down to base.yml) is a serving workload:
    every key it sets is modelled, ignored or noted; none is unknown."""
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({
        "topology": "v5e:4x4", "base_config": config, "model_name": "llama2-7b", "ici_tensor_parallelism": 4,
        "per_device_batch_size": 2, "max_prefill_predict_length": 512, "max_target_length": 1024,
        "serving": {"requests": 20, **({"disaggregation": {"prefill_replicas": 1}} if "disaggregation" in config
                                       else {})}}))
    sw = load_serve_workload(path)
    assert sw.workload.model.name == "llama2-7b" and sw.max_prefill_len == 512
    assert sw.workload.parallelism.ici["tensor"] == 4


def test_model_name_comes_from_the_chain(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({"topology": "v5e:4x4", "ici_tensor_parallelism": 8, "serving": {},
                                    "base_config": "inference/multihost/interleaved/llama3_70b_v5e-16.yml"}))
    sw = load_serve_workload(path)
    assert sw.workload.model.name == "llama3-70b"
    assert sw.max_prefill_len == 64 and sw.per_device_batch_size == 12.0  # base.yml's defaults, as MaxText's


@pytest.mark.parametrize("key, value, says", [
    ("ici_autoregressive_parallelism", 2, "not modelled yet"),
    ("ici_sequence_parallelism", 2, "not modelled for serving"),
    ("quantization", "int4", "is not one of"),
    ("max_target_length", 8192, "longer than llama2-70b's context of 4096"),
    ("enable_prefix_caching", True, "enable_prefix_caching: True: not modelled yet for serving (prefix caching"),
    ("inference_server", "ExperimentalMaxtextDisaggregatedServer", "say how in serving.disaggregation"),
])
def test_maxtext_inference_keys_not_modelled_are_named(tmp_path, key, value, says):
    raw = yaml.safe_load((REPO / "workloads" / "serve_maxtext_llama2_70b.yaml").read_text())
    raw[key] = value
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, ["serve", str(path)])
    assert r.exit_code == 2 and says in r.output and r.output.count("\n") == 1, r.output


def test_cli_out_writes_the_table_and_resumes(small, tmp_path):
    out = tmp_path / "curve.csv"
    args = ["sweep", str(small), "--vary", "concurrency=1,16", "--out", str(out), "--workers", "1", "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    again = json.loads(CliRunner().invoke(main, args).output)
    assert again["resumed"] == 2 and again["simulated"] == 0
    assert again["rows"] == json.loads(first.output)["rows"]
    assert len(pd.read_csv(out)) == 2 and journal_path(out).exists()


def test_varied_tensor_parallelism_leaves_the_rest_of_the_slice_to_replicas(small):
    rows = run_sweep(make_sweep(small, {"ici_tensor_parallelism": (1, 2, 4, 8), "requests": (40,)}), workers=1).rows
    assert list(rows["status"]) == ["ok"] * 4
    assert list(rows["replicas"]) == [8, 4, 2, 1] and list(rows["chips_per_replica"]) == [1, 2, 4, 8]


def test_varied_2d_split_leaves_the_rest_of_the_slice_to_replicas(small):
    """ici_fsdp_parallelism (2D weight-stationary, the weights' D split) grows the replica as tensor does."""
    rows = run_sweep(make_sweep(small, {"ici_fsdp_parallelism": (1, 2, 4), "requests": (40,)}), workers=1).rows
    assert list(rows["status"]) == ["ok"] * 3
    assert list(rows["replicas"]) == [4, 2, 1] and list(rows["chips_per_replica"]) == [2, 4, 8]
    weights = list(rows["hbm_per_device.weights"])
    assert weights[0] > weights[1] > weights[2]  # each matrix split over D as well


def test_a_training_key_is_refused_for_a_serving_sweep(small):
    with pytest.raises(TpusimError, match="remat_policy: unknown key .* is a serving workload"):
        make_sweep(small, {"remat_policy": ("full",)})


def test_maxtext_chunked_prefill_keys_set_the_batching(tmp_path):
    raw = yaml.safe_load((REPO / "workloads" / "serve_maxtext_llama2_70b.yaml").read_text())
    raw["serving"]["batching"] = {"policy": "continuous"}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({**raw, "use_chunked_prefill": True, "prefill_chunk_size": 512}))
    b = load_serve_workload(path).batching
    assert b.chunked_prefill and b.token_budget == 512
    path.write_text(yaml.safe_dump(raw))  # base.yml's default: no chunking
    assert not load_serve_workload(path).batching.chunked_prefill


def test_every_key_of_maxtexts_inference_group_is_placed_for_serving():
    """base.yml's inference keys that tpusim serve models (its inference keys) or refuses when switched on;
    the rest of the group is ignored (sampling, kernel block sizes, server and microbenchmark settings)."""
    from tpusim.model import maxtext
    from tpusim.serving import workload as sw

    group = set(maxtext.IGNORED["inference and decoding"][1].split())
    modelled = set(sw.INFERENCE_KEYS) - set(sw._SERVING_REFUSED)  # read, to refuse them when on
    assert set(sw._SERVING_REFUSED) <= group
    assert all(maxtext.default(k) is False for k in sw._SERVING_REFUSED)  # refused only when switched on
    assert {"max_prefill_predict_length", "quantize_kvcache", "kv_quant_dtype", "use_chunked_prefill",
            "prefill_chunk_size"} <= modelled
