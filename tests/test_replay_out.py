"""``tpusim replay PROFILE --out DIR``: the replay opens in XProf beside the profile, with its HLO.

XProf's own converter (``xprof.convert.raw_to_tool_data``, the code behind ``xprof --logdir``) reads the
written ``simulated.xplane.pb`` alone: its op tools must hold the replay's ops with the replay's times
and the profile's program ids, and its graph and memory viewers must show the capture's module, which
they read from the ``/host:metadata`` plane copied from the input (without it they have nothing).
"""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner

from tpusim.cli import main
from tpusim.analysis.profiles import read_profile
from tpusim.analysis.profiles.xplane import XSpace
from tpusim.analysis.replay import replay
from tpusim.analysis.replayout import metadata_plane, raw_planes

from conftest import REAL_TRACES

from xprof.convert import raw_to_tool_data as xprof_convert  # in the test extra: pip install '.[test]'

V6E = REAL_TRACES / "tpu-v6e-host-offload" / "tpu_inference_2.xplane.pb"
V6E_JSON = REAL_TRACES / "tpu-v6e-host-offload" / "tpu_inference_2.trace.json.gz"
JIT_F = "jit_f(12190760917235803885)"  # the capture's main module, as its /host:metadata plane keys it


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def xprof(pb, tool, params, tmp_path):
    """XProf's data for ``tool`` from a copy of ``pb`` alone (the converter writes caches beside it).
    ``xspace_to_tool_names`` is what XProf calls on opening a run: it extracts the HloProtos."""
    d = tmp_path / f"xprof-{tool}-{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    copy = str(shutil.copy(pb, d / pb.name))
    xprof_convert.xspace_to_tool_names([copy])
    data, _ = xprof_convert.xspace_to_tool_data([copy], tool, params)
    return data


def table(data) -> pd.DataFrame:
    data = json.loads(data)
    return pd.DataFrame([[c.get("v") for c in r["c"]] for r in data["rows"]], columns=[c["id"] for c in data["cols"]])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "out"
    r = invoke("replay", V6E, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.output), replay(read_profile(V6E))


def written_ops(result) -> pd.DataFrame:
    """The replay's ops XProf shows on XLA Ops: device 0's, but tpusim's module-end and ops of no time
    (XProf leaves those out: copy-done.1 and .3, whose copies were done), with the all-reduce of
    jit__psum, which the capture ran on XLA Ops (a synchronous collective)."""
    ops = pd.concat([df[df.device == df.device.min()] for df in result.timelines.values()])
    ops = ops[(ops.stream == "XLA Ops") | ((ops.stream == "Async XLA Ops") & (ops.category == "all-reduce"))]
    return ops[(ops.name != "module-end") & (ops.end_s > ops.start_s)]


def sim_pb(out):
    return out / "plugins" / "profile" / "replay" / "simulated.xplane.pb"


def test_the_folder_holds_both_hosts_and_the_replay(written):
    out, printed, _ = written
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "manifest.json", "plugins/profile/replay/measured.xplane.pb", "plugins/profile/replay/simulated.xplane.pb",
        "replay.json"]
    assert (out / "plugins/profile/replay/measured.xplane.pb").read_bytes() == V6E.read_bytes()
    assert json.loads((out / "replay.json").read_text()) == {k: v for k, v in printed.items() if k != "out"}
    assert printed["out"] == str(out)


def test_the_metadata_plane_is_the_inputs_byte_for_byte(written):
    out, _, _ = written
    meta = metadata_plane(V6E.read_bytes())
    assert meta is not None and len(meta) > 10_000  # four HloProtos (jit_f's alone is 8 kB)
    assert metadata_plane(sim_pb(out).read_bytes()) == meta
    planes = [p.name for p in XSpace.FromString(sim_pb(out).read_bytes()).planes]
    assert planes == ["/device:TPU:0", "/host:metadata"]
    assert len(raw_planes(sim_pb(out).read_bytes())) == 2


def test_hlo_stats_has_the_replays_ops_times_and_program_ids(written, tmp_path):
    out, _, result = written
    t = table(xprof(sim_pb(out), "hlo_stats", {}, tmp_path))
    ops = written_ops(result)
    assert len(t) == len(ops) > 0 and (t.occurrences == 1).all()
    assert sorted(t.hlo_op_name) == sorted(ops.name)
    prof = read_profile(V6E).timeline
    pids = prof[prof.stream == "XLA Ops"].groupby("name").program_id.first()
    assert all(int(t.program_id[i]) == int(pids[n]) for i, n in enumerate(t.hlo_op_name))  # the profile's ids
    compared = result.ops.set_index("name").simulated_s
    for name, us in zip(t.hlo_op_name, t.total_time):  # XProf's time (us) is the replay's simulated time
        if name in compared.index:
            assert us == pytest.approx(compared[name] * 1e6, rel=1e-6, abs=1e-3)
    timed = result.ops[result.ops.simulated_s > 0]
    assert len(timed) == 9 and set(timed.name) <= set(t.hlo_op_name)  # every op the replay timed


def test_op_profile_and_trace_viewer(written, tmp_path):
    out, _, result = written
    prog = json.loads(xprof(sim_pb(out), "op_profile", {}, tmp_path))["byProgram"]
    by_module = {m["name"].split("(")[0]: m["metrics"]["rawTime"] for m in prog["children"]}
    assert JIT_F in {m["name"] for m in prog["children"]}
    assert by_module.pop("IDLE", 0) < 1000  # ps: jit__psum's all-reduce is an op, not idle time
    assert set(by_module) == set(result.module_times.module)
    for r in result.module_times.itertuples():  # each program's time is its module's simulated run
        assert by_module[r.module] == pytest.approx(r.simulated_s * 1e12, rel=1e-6)
    events = json.loads(xprof(sim_pb(out), "trace_viewer", {}, tmp_path))["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    rows = pd.Series([threads[e["pid"], e["tid"]].split(" #")[0] for e in events if e.get("ph") == "X"])
    assert (rows == "XLA Modules").sum() == len(result.module_times)  # one run of each module
    assert (rows == "XLA Ops").sum() == len(written_ops(result)) == 9


def test_graph_and_memory_viewers_show_the_captures_module(written, tmp_path):
    out, _, _ = written
    graph = xprof(sim_pb(out), "graph_viewer", {"graph_viewer_options": {"type": "short_txt", "module_name": JIT_F}},
                  tmp_path)
    text = graph.decode() if isinstance(graph, bytes) else graph
    assert text.startswith("HloModule jit_f") and "broadcast_add_fusion" in text
    memory = json.loads(xprof(sim_pb(out), "memory_viewer", {"module_name": JIT_F}, tmp_path))
    assert max(memory["heapSizes"]) == pytest.approx(20480, rel=1e-6)  # MiB: four 5 GiB f32[5,1024,1024,256]


def test_a_trace_json_has_no_hlo_modules(tmp_path):
    out = tmp_path / "out"
    r = invoke("replay", V6E_JSON, "--topology", "v6e:2x4", "--out", out)
    assert r.exit_code == 0, r.output
    assert "a trace JSON has no HLO modules" in r.output
    run = out / "plugins" / "profile" / "replay"
    assert [p.name for p in run.iterdir()] == ["simulated.xplane.pb"]
    assert metadata_plane((run / "simulated.xplane.pb").read_bytes()) is None
    assert not table(xprof(run / "simulated.xplane.pb", "hlo_stats", {}, tmp_path)).empty
    with pytest.raises(ValueError):  # what the copied metadata plane gives the graph viewer
        xprof(run / "simulated.xplane.pb", "graph_viewer",
              {"graph_viewer_options": {"type": "short_txt", "module_name": JIT_F}}, tmp_path)


def test_two_identical_replays_write_identical_bytes(written, tmp_path):
    out, _, _ = written
    again = tmp_path / "again"
    assert invoke("replay", V6E, "--out", again, "--json").exit_code == 0
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    assert invoke("replay", V6E, "--out", again).exit_code == 0  # a replay folder is rewritten whole
    assert sim_pb(again).read_bytes() == sim_pb(out).read_bytes()


@pytest.mark.parametrize("case", ["file", "foreign", "pod_viewer", "the profile's logdir"])
def test_bad_out_is_one_line_exit_2_and_nothing_written(case, tmp_path):
    target = tmp_path / "target"
    profile = V6E
    if case == "file":
        target.write_text("mine")
    elif case == "foreign":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif case == "pod_viewer":
        profile = REAL_TRACES / "tpu-v2-pod-demo" / "cloud-tpu-v2.pod_viewer.json"
    else:  # a logdir has plugins/, as a run folder has: replacing it would delete the profile
        profile = target / "plugins" / "profile" / "run1" / "host.xplane.pb"
        profile.parent.mkdir(parents=True)
        shutil.copy(V6E, profile)
    before = sorted(os.listdir(tmp_path))
    r = invoke("replay", profile, "--out", target)
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and r.output.startswith("tpusim: error:") and "--out" in r.output
    assert sorted(os.listdir(tmp_path)) == before  # no temporary folder left beside it
    if case == "file":
        assert target.read_text() == "mine"
    elif case == "foreign":
        assert os.listdir(target) == ["notes.txt"]
    elif case == "pod_viewer":
        assert not target.exists()
    else:
        assert "holds the profile being replayed" in r.output
        assert [p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()] == \
            ["plugins/profile/run1/host.xplane.pb"]


def test_a_profile_directory_is_replayed_from_its_xplane(tmp_path):
    run_dir = tmp_path / "logdir" / "plugins" / "profile" / "2026_01_01"
    run_dir.mkdir(parents=True)
    shutil.copy(V6E, run_dir / "host.xplane.pb")
    out = tmp_path / "out"
    assert invoke("replay", tmp_path / "logdir", "--out", out).exit_code == 0
    run = out / "plugins" / "profile" / "replay"
    assert (run / "measured.xplane.pb").read_bytes() == V6E.read_bytes()
    assert metadata_plane((run / "simulated.xplane.pb").read_bytes()) == metadata_plane(V6E.read_bytes())
