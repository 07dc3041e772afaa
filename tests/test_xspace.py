"""A simulated step opens in XProf like a real profile, and every trace tpusim writes survives Perfetto.

XProf's own converter (``xprof.convert.raw_to_tool_data.xspace_to_tool_data``, the code behind
``xprof --logdir``) turns the written ``.xplane.pb`` into each tool's data; the tools must be populated
and agree with tpusim's summary: step time, op count, FLOPs, the chip's peaks. Perfetto's JSON import
drops an event that starts inside another on the same thread and ends after it
(:func:`tpusim.analysis.lanes.partial_overlaps`); no trace tpusim writes may have one.
"""

from __future__ import annotations

import gzip
import json
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner

from tpusim.sim.chips import get_chip
from tpusim.cli import main
from tpusim.analysis.lanes import assign_lanes, partial_overlaps, to_ns
from tpusim.analysis.profiles.xplane import XSpace

from conftest import REAL_TRACES

from xprof.convert import raw_to_tool_data as xprof_convert  # in the test extra: pip install '.[test]'
V6E = REAL_TRACES / "tpu-v6e-host-offload" / "tpu_inference_2.xplane.pb"
V6E_HLO = REAL_TRACES / "tpu-v6e-host-offload" / "hlo" / "jit_f.hlo.txt"
TOOLS = ("trace_viewer", "overview_page", "op_profile", "hlo_stats", "roofline_model")


def run(*args):
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output
    return r


def tool_data(files, tool, tmp_path):
    """XProf's data for ``tool``; the converter writes caches beside its input, so it reads copies."""
    d = tmp_path / f"xprof-{tool}"
    d.mkdir()
    copies = [shutil.copy(f, d / f.name) for f in files]
    data, _ = xprof_convert.xspace_to_tool_data([str(c) for c in copies], tool, {})
    return json.loads(data)


def table(data) -> pd.DataFrame:
    cols = [c["id"] for c in data["cols"]]
    return pd.DataFrame([[c.get("v") for c in r["c"]] for r in data["rows"]], columns=cols)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    run("run", "workloads/fsdp_70b.yaml", "--topology", "16x16", "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    timeline = pd.read_parquet(out / "timeline.parquet")
    return out, summary, timeline


@pytest.fixture(scope="module")
def tools(fsdp, tmp_path_factory):
    out, _, _ = fsdp
    pb = out / "plugins" / "profile" / "tpusim" / "simulated.xplane.pb"
    tmp = tmp_path_factory.mktemp("tools")
    return {tool: tool_data([pb], tool, tmp) for tool in TOOLS}


def test_the_run_folder_is_an_xprof_logdir(fsdp):
    out, _, _ = fsdp
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.xplane.pb")] == \
        ["plugins/profile/tpusim/simulated.xplane.pb"]


def test_trace_viewer_has_every_op_and_no_partial_overlap(fsdp, tools):
    _, _, timeline = fsdp
    events = tools["trace_viewer"]["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    rows = pd.Series([threads[e["pid"], e["tid"]].split(" #")[0] for e in events if e.get("ph") == "X"])
    counts = rows.value_counts()
    assert counts["XLA Ops"] == (timeline.stream == "XLA Ops").sum()
    assert counts["XLA Collectives"] == (timeline.stream == "Async XLA Ops").sum()
    assert counts["ICI x"] == (timeline.stream == "ICI x").sum() and counts["Steps"] == 1
    assert partial_overlaps(events) == []


def test_overview_page_step_time_and_chip(fsdp, tools):
    _, summary, _ = fsdp
    p = {k: v for t in tools["overview_page"] for k, v in (t.get("p") or {}).items()}
    assert float(p["steptime_ms_average"]) == pytest.approx(summary["step_time_s"] * 1e3, abs=0.01)
    assert float(p["tc_compute_ms_average"]) == pytest.approx(summary["compute_s"] * 1e3, abs=0.01)
    assert p["device_type"] == "TPU v5 Lite" and p["hardware_type"] == "TPU"


def test_op_profile_counts_every_flop(fsdp, tools):
    _, summary, timeline = fsdp
    prog = tools["op_profile"]["byProgram"]
    assert prog["metrics"]["rawFlops"] == pytest.approx(summary["flops_per_device"], rel=1e-9)
    assert prog["metrics"]["rawTime"] == pytest.approx(summary["step_time_s"] * 1e12, abs=1000)
    ops = timeline[timeline.stream == "XLA Ops"]
    assert prog["metrics"]["rawBytesAccessedArray"][0] == pytest.approx(ops.bytes.sum(), rel=1e-9)  # HBM
    assert prog["metrics"]["bandwidthUtils"][0] == pytest.approx(summary["utilization"]["hbm"], rel=1e-6)
    cats = {c["name"] for m in prog["children"] for c in m["children"]}
    assert "convolution fusion" in cats and "loop fusion" in cats


def test_hlo_stats_one_row_per_op(fsdp, tools):
    _, summary, timeline = fsdp
    t = table(tools["hlo_stats"])
    ops = timeline[timeline.stream == "XLA Ops"]
    assert len(t) == len(ops) and t.occurrences.sum() == len(ops)
    assert t.total_time.sum() == pytest.approx(summary["compute_s"] * 1e6, rel=1e-6)  # us
    assert t.program_id.nunique() == 1


def test_roofline_has_the_chip_peaks_and_the_program(fsdp, tools):
    _, summary, timeline = fsdp
    p = tools["roofline_model"][0]["p"]
    v5e = get_chip("v5e")
    assert float(p["peak_flop_rate"]) == pytest.approx(v5e.bf16_flops_per_s / 1e9)             # GFLOP/s
    assert float(p["peak_hbm_bw"]) == pytest.approx(v5e.hbm_bytes_per_s / 2**30, rel=1e-5)     # GiB/s
    t = table(tools["roofline_model"][0])
    program = t[t.category == "Program"].iloc[0]
    assert program.total_time == pytest.approx(summary["step_time_s"] * 1e6, rel=1e-6)
    assert program.measured_flop_rate == pytest.approx(summary["flops_per_device"] / summary["step_time_s"] / 1e9,
                                                       rel=1e-6)


def test_without_program_and_symbol_ids_the_op_tools_are_empty(fsdp, tmp_path):
    """Why the writer sets them: XProf keys op profile, HLO stats and roofline on both ids."""
    out, _, _ = fsdp
    space = XSpace.FromString((out / "plugins/profile/tpusim/simulated.xplane.pb").read_bytes())
    for plane in space.planes:
        ids = {k for k, v in plane.stat_metadata.items() if v.name in ("program_id", "symbol_id")}
        assert ids, plane.name
        for md in plane.event_metadata.values():
            kept = [st for st in md.stats if st.metadata_id not in ids]
            del md.stats[:]
            md.stats.extend(kept)
    stripped = tmp_path / "stripped.xplane.pb"
    stripped.write_bytes(space.SerializeToString())
    assert table(tool_data([stripped], "hlo_stats", tmp_path)).empty
    assert tool_data([stripped], "op_profile", tmp_path)["byProgram"]["children"] == []


def test_written_files_are_byte_identical():
    """Two identical runs write identical bytes: no wall-clock time inside (what run --out writes)."""
    from tpusim.api import compile_workload
    from tpusim.sim.engine import simulate
    from tpusim.analysis.timeline import chrome_trace, timeline_frame
    from tpusim.analysis.xspace import xspace_bytes

    out = []
    for _ in range(2):
        _, topo, prog = compile_workload("workloads/llama3_8b_fsdp_tp.yaml")
        result = simulate(prog, topo)
        df = timeline_frame(result)
        out.append((xspace_bytes(df, chip=topo.chip, program_name=prog.name, step_time_s=result.step_time_s),
                    json.dumps(chrome_trace(df, result))))
    assert out[0] == out[1]


@pytest.mark.parametrize("args", [  # fsdp_70b on v5e:16x16: the fixture, in the tests above and below
    ["workloads/llama3_8b_2slice_dp.yaml", "--topology", "v5p:2x2x2", "--straggler", "3=1.3"],  # DCN, 2 classes
    ["--hlo", str(V6E_HLO), "--topology", "v6e:2x2"],
])
def test_every_written_trace_passes_perfettos_rule(args, tmp_path):
    out = tmp_path / "run"
    run("run", *args, "--out", str(out))
    trace = json.loads(gzip.decompress((out / "trace.json.gz").read_bytes()))
    assert partial_overlaps(trace["traceEvents"]) == []
    run("compare", str(out), str(V6E))
    merged = json.loads(gzip.decompress((out / "compare.trace.json.gz").read_bytes()))
    assert partial_overlaps(merged["traceEvents"]) == []


def test_fsdp_70b_had_overlaps_that_lanes_remove(fsdp):
    """The raw timeline does overlap on a row (why lanes exist); the written trace does not."""
    out, _, timeline = fsdp
    trace = json.loads(gzip.decompress((out / "trace.json.gz").read_bytes()))
    assert partial_overlaps(trace["traceEvents"]) == []
    rows = timeline[timeline.device == timeline.device.min()]
    raw = [{"ph": "X", "pid": 0, "tid": s, "ts": a * 1e6, "dur": (b - a) * 1e6}
           for s, a, b in zip(rows.stream, rows.start_s, rows.end_s)]
    assert len(partial_overlaps(raw)) > 100


def test_whole_nanoseconds_keep_back_to_back_ops_apart():
    # Op a ends where op b starts. Rounding a's start and duration each to ns (what a reader does with
    # float microseconds) ends a 1 ns after b starts: Perfetto would drop b. Whole ns of both ends do not.
    a, b = (0.6e-9, 2.4e-9), (2.4e-9, 5e-9)
    by_duration = [{"ph": "X", "pid": 0, "tid": 0, "ts": s * 1e6, "dur": (e - s) * 1e6} for s, e in (a, b)]
    assert len(partial_overlaps(by_duration)) == 1
    starts, ends = to_ns([a[0], b[0]]), to_ns([a[1], b[1]])
    whole = [{"ph": "X", "pid": 0, "tid": 0, "ts": s / 1000, "dur": (e - s) / 1000} for s, e in zip(starts, ends)]
    assert ends[0] == starts[1] and partial_overlaps(whole) == [] and assign_lanes(starts, ends) == [0, 0]


def test_compare_side_by_side_in_xprof_and_warns_on_different_programs(fsdp, tmp_path):
    out, _, _ = fsdp
    r = CliRunner().invoke(main, ["compare", str(out), str(V6E), "--json"])
    assert r.exit_code == 0
    assert "warning: different programs: only 0 of the" in r.output
    d = json.loads(r.output[r.output.index("{"):])
    assert d["ops_matched"] == 0 and d["warning"].startswith("different programs")
    merged = json.loads(gzip.decompress((out / "compare.trace.json.gz").read_bytes()))
    assert partial_overlaps(merged["traceEvents"]) == []
    run_dir = out / "plugins" / "profile" / "compare"
    assert sorted(p.name for p in run_dir.iterdir()) == ["measured.xplane.pb", "simulated.xplane.pb"]
    pages = tool_data(sorted(run_dir.iterdir()), "overview_page", tmp_path)
    env = next(t["p"] for t in pages if t.get("p") and "host_count" in t["p"])
    assert env["host_count"] == "2"


def test_compare_of_the_same_program_does_not_warn(tmp_path):
    out = tmp_path / "run"
    run("run", "--hlo", str(V6E_HLO), "--topology", "v6e:2x2", "--out", str(out))
    d = json.loads(run("compare", str(out), str(V6E), "--json").output)
    assert d["warning"] is None and d["ops_matched"] == d["profile_ops"]


def test_host_copy_waits_are_not_compute():
    """The v6e capture's copy-done waits are host transfers, as compare books them, not VPU compute."""
    d = json.loads(run("run", "--hlo", str(V6E_HLO), "--topology", "v6e:2x2", "--json").output)
    assert "vpu" not in d["compute_by_bound_s"] or d["compute_by_bound_s"]["vpu"] < 0.01 * d["step_time_s"]
    waits = sum(v for k, v in d["exposed_comm_by_kind_s"].items() if k.startswith("copy"))
    assert waits == pytest.approx(d["exposed_comm_s"], rel=1e-9)
    assert d["compute_s"] + d["exposed_comm_s"] == pytest.approx(d["step_time_s"], rel=1e-9)


def test_rewriting_a_run_leaves_no_stale_xprof_data(tmp_path):
    """XProf caches its tools' data beside the .xplane.pb; a rewritten run must not show the old data, and
    a compare against a JSON trace must not keep an earlier compare's measured host."""
    out = tmp_path / "run"
    run("run", "--hlo", str(V6E_HLO), "--topology", "v6e:2x2", "--out", str(out))
    run("compare", str(out), str(V6E))
    stale = ["cache_version.txt", "simulated.SSTABLE", "ALL_HOSTS.op_stats_v2.pb", "jit_f(1).hlo_proto.pb"]
    for folder in ("tpusim", "compare"):
        for name in stale:
            (out / "plugins" / "profile" / folder / name).write_text("old")
    run("run", "--hlo", str(V6E_HLO), "--topology", "v6e:2x2", "--out", str(out))
    run("compare", str(out), str(REAL_TRACES / "tpu-v6e-host-offload" / "tpu_inference_2.trace.json.gz"))
    assert [p.name for p in (out / "plugins" / "profile" / "tpusim").iterdir()] == ["simulated.xplane.pb"]
    assert [p.name for p in (out / "plugins" / "profile" / "compare").iterdir()] == ["simulated.xplane.pb"]
