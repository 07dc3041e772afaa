"""`tpusim search` on a serving workload: the plan with the most output tokens/s per chip under a latency
limit, pruned by HBM and the roofline, checked against the book's applied-inference answers.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from click.testing import CliRunner

from conftest import value
from tpusim.cli import main
from tpusim.errors import TpusimError
from tpusim.explore.servesearch import search_serving
from tpusim.serving import serve, serve_workload_from_dict
from tpusim.sim.topology import parse_topology

SMALL = {"name": "small_serve", "chip": "v5e", "topology": "v5e:2x4", "model": {"model_name": "llama3-8b"},
         "inference": {"max_prefill_predict_length": 512, "max_target_length": 1024, "per_device_batch_size": 4},
         "sharding": {"ici_tensor_parallelism": 2},
         "serving": {"seed": 3, "requests": 100, "arrival": {"concurrency": 4}, "input_len": {"dist": "sharegpt"},
                     "output_len": {"dist": "fixed", "value": 64}}}
# applied-inference.md's model: LLaMA-3 70B on v5e, 8k context (the book's minimum-topology table)
LLAMA3_70B = {"name": "llama3_70b_serve", "chip": "v5e", "topology": "v5e:4x4", "model": {"model_name": "llama3-70b"},
              "inference": {"max_prefill_predict_length": 1024, "max_target_length": 8192},
              "serving": {"requests": 60, "input_len": {"dist": "fixed", "value": 512},
                          "output_len": {"dist": "fixed", "value": 32}}}


def _write(tmp_path, raw, name="w.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_search_finds_a_plan_within_the_limit_and_the_serve_command_agrees(tmp_path):
    path = _write(tmp_path, SMALL)
    res = search_serving(str(path), tpot_s=0.012, budget=8, workers=1)
    best = res["top"][0]
    assert best["tpot_p90_s"] <= 0.012
    assert [t["tokens_per_s_per_chip"] for t in res["top"]] == sorted((t["tokens_per_s_per_chip"]
                                                                       for t in res["top"]), reverse=True)
    # the winner served on its own: the same number
    over = {"ici_tensor_parallelism": best["tensor"], "ici_data_parallelism": best["replicas"],
            **({"ici_fsdp_parallelism": best["fsdp"]} if best["fsdp"] > 1 else {}),
            "quantization": best["quantization"], "quantize_kvcache": best["quantization"] != "bf16",
            "per_device_batch_size": 1.0, "max_batch": best["slots_per_replica"],
            "concurrency": best["slots_per_replica"] * best["replicas"],
            "requests": max(100, 4 * best["slots_per_replica"] * best["replicas"])}
    s = serve(serve_workload_from_dict(SMALL, source=str(path), overrides=over)).summary
    assert s["throughput"]["output_tokens_per_s_per_chip"] == pytest.approx(best["tokens_per_s_per_chip"], rel=1e-12)
    assert "why" in best and all("below #1" in t["why"] for t in res["top"][1:])


def test_dense_models_are_searched_over_2d_meshes_too(tmp_path):
    """A dense model's replicas are tensor or fsdp x tensor (inference.md Q7's 2D weight-stationary
    layout): on 8 chips, every (fsdp, tensor) with fsdp x tensor dividing 8 (10 pairs) in each of the 3
    weight formats."""
    res = search_serving(str(_write(tmp_path, SMALL)), tpot_s=0.05, budget=4, workers=1)
    assert res["counts"]["enumerated"] == 10 * 3


def test_roofline_bound_is_never_below_the_simulation(tmp_path):
    """The pruning is safe only if the roofline's tokens/s per chip bound every simulated plan from above
    and its decode step is never slower than the simulated TPOT's median."""
    res = search_serving(str(_write(tmp_path, SMALL)), tpot_s=0.05, budget=10, workers=1)
    ok = [p for p in res["simulated"] if p["status"] == "ok"]
    assert len(ok) >= 5
    for p in ok:
        assert p["tokens_per_s_per_chip"] <= p["bound_tokens_per_s_per_chip"], p


def test_smallest_replica_is_the_books_minimum_topology(book_cases, tmp_path):
    """applied-inference.md: LLaMA-3 70B's weights need a 4x4 in bf16 and a 4x2 in int8 (min topology table)."""
    c = book_cases["appinf-min-topology-table"]
    res = search_serving(str(_write(tmp_path, LLAMA3_70B)), tpot_s=0.1, quantizations=("bf16", "int8"),
                         budget=3, workers=1)
    slices = c["expected"]["slice"]["value"]  # bf16, int8, int4
    assert res["smallest_replica_chips"] == {"bf16": parse_topology(f"v5e:{slices[0]}").num_chips,
                                             "int8": parse_topology(f"v5e:{slices[1]}").num_chips}


def test_impossible_latency_is_refused_with_the_roofline_floor(book_cases, tmp_path):
    """No sharding of LLaMA-3 70B int8 on 16 v5e decodes faster than its weights stream from HBM: the
    book's 5.3 ms floor (applied-inference.md, within its 3%); a 4 ms TPOT is refused, one line, exit 2."""
    c = book_cases["appinf-pareto-claims"]
    floor = value(c, "inputs", "params_bytes") / (value(c, "inputs", "chips") * value(c, "inputs", "W_hbm"))
    r = CliRunner().invoke(main, ["search", str(_write(tmp_path, LLAMA3_70B)), "--tpot-ms", "4", "--quantization",
                                  "int8"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    # the fastest mesh is one replica of all 16 chips (2D fsdp x tensor: no K/V projection held twice)
    m = re.search(r"fastest decode step on v5e:4x4 is ([\d.]+) ms \((fsdp \d+ x )?tensor \d+, 1 replicas, int8", r.output)
    assert m, r.output
    assert float(m.group(1)) * 1e-3 == pytest.approx(floor, rel=c["max_rel_dev_book_vs_recomputed"])


@pytest.mark.parametrize("args, says", [
    (["--ttft-ms", "-5"], "--ttft-ms: -5 is not a positive number of milliseconds"),
    ([], "give a latency limit: --tpot-ms and/or --ttft-ms"),
    (["--tpot-ms", "50", "--percentile", "95"], "--percentile: 95: one of 50, 90, 99"),
    (["--tpot-ms", "50", "--quantization", "int4"], "--quantization: int4: weight formats are"),
    (["--tpot-ms", "50", "--remat", "full"], "--remat: a serving workload is searched by latency limits"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, says):
    r = CliRunner().invoke(main, ["search", str(_write(tmp_path, SMALL)), *args])
    assert r.exit_code == 2 and says in r.output and r.output.count("\n") == 1, r.output


def test_expert_parallel_plans_are_placed(tmp_path):
    """Mixtral: meshes with expert parallelism are plans (not refused for how a training batch splits)."""
    raw = {"name": "mix", "chip": "v5e", "topology": "v5e:4x4", "model": {"model_name": "mixtral-8x7b"},
           "inference": {"max_prefill_predict_length": 512, "max_target_length": 1024},
           "serving": {"requests": 40, "input_len": 128, "output_len": 16}}
    res = search_serving(str(_write(tmp_path, raw)), tpot_s=0.2, quantizations=("int8",), budget=4, workers=1)
    assert res["counts"]["invalid"] == 0, res["rejected"]
    assert res["counts"]["enumerated"] == 14  # (tensor x expert) | 16 with expert | 8: 5 + 4 + 3 + 2


def test_latency_limit_on_a_training_workload_is_refused(tmp_path):
    path = _write(tmp_path, {"name": "t", "topology": "v5e:2x2", "model": {"model_name": "llama3-8b"}})
    r = CliRunner().invoke(main, ["search", str(path), "--tpot-ms", "50"])
    assert r.exit_code == 2 and "is a training workload" in r.output, r.output


def test_cli_json_is_the_result(tmp_path):
    r = CliRunner().invoke(main, ["search", str(_write(tmp_path, SMALL)), "--tpot-ms", "30", "--budget", "3",
                                  "--workers", "1", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["top"] and res["counts"]["simulated"] <= 3 and res["limits"]["tpot_s"] == 0.03


def test_a_limit_only_the_simulation_rules_out_says_the_closest(tmp_path):
    """The roofline lets the plans through (their full-batch decode step is under the limit), but prefill
    steps between decodes make every simulated TTFT miss a limit that tight."""
    with pytest.raises(TpusimError, match="no plan on v5e:2x4 meets TTFT p90 <= "):
        search_serving(str(_write(tmp_path, SMALL)), ttft_s=0.004, budget=3, workers=1)
