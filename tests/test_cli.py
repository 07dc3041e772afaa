"""The command line: readable output, JSON for machines, one clear line and exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tpusim.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_topology_human_and_json():
    r = run("topology", "v5e:16x16")
    assert r.exit_code == 0, r.output
    assert "256" in r.output and "32 hosts" in r.output and "wraps" in r.output
    r = run("topology", "v5e:8x16", "--slices", "2", "--json")
    d = json.loads(r.output)
    assert d["chips"] == 256 and d["hosts"] == 32 and d["slices"] == 2
    assert d["shape"] == [8, 16] and d["wraparound"] == [False, True]
    assert d["ici_links"] == 2 * (16 * 7 + 8 * 16)
    assert d["dcn_bytes_per_s_per_chip"] == 3.125e9


def test_collective_json_matches_library():
    r = run("collective", "all-gather", "--bytes", "34e6", "--topology", "v5e:8x4", "--axes", "y",
            "--mode", "datasheet", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["time_s"] == pytest.approx(3 * (34e6 / 4) / 4.5e10)  # a 4-long line: V/X / W_one_way
    assert d["algorithm"] == "bidirectional line on y"
    assert d["group_size"] == 4
    r = run("collective", "all-reduce", "--bytes", "1GiB", "--topology", "4x4x4", "--axes", "xyz,dcn",
            "--slices", "2", "--json")
    d = json.loads(r.output)
    assert d["mode"] == "calibrated" and d["time_s"] > d["datasheet_time_s"] > 0
    assert "hierarchical" in d["algorithm"]


def test_collective_human_output():
    r = run("collective", "ar", "--bytes", "1e9", "--topology", "v5p:4x4x4", "--axes", "x")
    assert r.exit_code == 0
    assert "all-reduce of 1 GB over x of v5p:4x4x4" in r.output and "achieved" in r.output


@pytest.mark.parametrize("args, words", [
    (["topology", "v9:4x4"], "unknown chip 'v9'"),
    (["topology", "v5e:32x32"], "larger than the largest"),
    (["topology", "v5p:4x4"], "3D"),
    (["collective", "all-gather", "--bytes", "1e6", "--topology", "v5e:4x4", "--axes", "z"], "no axis 'z'"),
    (["collective", "all-gather", "--bytes", "-3", "--topology", "v5e:4x4", "--axes", "x"], "--bytes"),
    (["collective", "all-gather", "--bytes", "lots", "--topology", "v5e:4x4", "--axes", "x"], "not a number"),
    (["collective", "all-gather", "--bytes", "0", "--topology", "v5e:4x4", "--axes", "x"], "positive"),
    (["collective", "gather-all", "--bytes", "1e6", "--topology", "v5e:4x4", "--axes", "x"], "unknown collective"),
    (["collective", "all-gather", "--bytes", "1e6", "--topology", "v5e:4x4", "--axes", "dcn"], "several slices"),
])
def test_bad_input_is_one_line_and_exit_2(args, words):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert words in r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_console_script_end_to_end():
    """The installed entry point, as a user runs it: no traceback, exit 2 on a bad chip."""
    ok = subprocess.run([sys.executable, "-m", "tpusim", "topology", "v5p:4x4x4", "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["chips"] == 64
    bad = subprocess.run([sys.executable, "-m", "tpusim", "topology", "v9:4x4"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("tpusim: error: ") and "Traceback" not in bad.stderr


def test_program_json(tmp_path):
    r = run("program", "workloads/fsdp_70b.yaml", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for key in ("model_flops_per_step", "flops_per_device", "peak_hbm_bytes_per_device", "hbm_capacity_bytes",
                "collectives"):
        assert key in d
    assert d["chips"] == 256 and d["peak_hbm_bytes_per_device"] < d["hbm_capacity_bytes"]
    kinds = {(c["kind"], tuple(c["mesh_axes"])) for c in d["collectives"]}
    # (over 256 chips each gradient is all-reduced whole, as libtpu compiles it, not reduce-scattered)
    assert kinds == {("all-gather", ("fsdp",)), ("all-reduce", ("fsdp",)), ("all-to-all", ("fsdp",))}
    assert next(c for c in d["collectives"] if c["kind"] == "all-reduce")["count"] == 7 * 80 + 1
    ag = next(c for c in d["collectives"] if c["kind"] == "all-gather")
    # 7 weights per layer, forward and backward, plus the unembedding table (the token embedding is a
    # lookup on each device's slice of its table, resharded by all-to-alls)
    assert ag["count"] == 2 * 7 * 80 + 1
    assert {"kind", "axes", "bytes", "count"} <= set(ag)


def test_program_human_and_topology_override():
    r = run("program", "workloads/llama3_8b_fsdp_tp.yaml", "--topology", "4x4x4")
    assert r.exit_code == 0, r.output
    assert "llama3_8b_fsdp_tp on v5p:4x4x4 (64 chips)" in r.output
    assert "tensor=4" in r.output and "HBM" in r.output


@pytest.mark.parametrize("content, words", [
    ("model: {model_name: llama3-8b}\nstep: {per_device_batch_size: 1}\ntopology: v5p:4x4x4\nfoo: 1\n",
     "foo: unknown key"),
    ("model: {model_name: llama3-70b}\nstep: {per_device_batch_size: 8, max_target_length: 8192}\n"
     "topology: v5e:4x4\n", "does not fit in HBM"),
    ("model: {model_name: llama3-8b}\nstep: {per_device_batch_size: 1}\ntopology: v5p:4x4x4\n"
     "sharding: {ici_tensor_parallelism: 3}\n", "does not divide"),
    ("model: {model_name: llama3-8b}\nstep: {per_device_batch_size: 1}\n", "no topology"),
])
def test_program_bad_workloads(tmp_path, content, words):
    p = tmp_path / "w.yaml"
    p.write_text(content)
    r = CliRunner().invoke(main, ["program", str(p)])
    assert r.exit_code == 2, r.output
    assert words in r.output and str(p) in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_run_json_and_out(tmp_path):
    out = tmp_path / "run"
    r = run("run", "workloads/fsdp_70b.yaml", "--topology", "16x16", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for key in ("step_time_s", "mfu", "tokens_per_s", "compute_s", "exposed_comm_s", "peak_hbm_bytes_per_device",
                "bottleneck", "chips", "sim_wall_s", "events"):
        assert key in d, key
    assert d["chips"] == 256 and 0 < d["mfu"] < 1
    assert d["mfu"] == pytest.approx(d["model_flops_per_step"] / (256 * 1.97e14 * d["step_time_s"]))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "plugins", "report.html", "summary.json", "timeline.parquet",
                                                     "trace.json.gz"]
    assert [p.name for p in (out / "plugins" / "profile").rglob("*.pb")] == ["simulated.xplane.pb"]
    import gzip

    import pandas as pd
    assert json.loads((out / "summary.json").read_text())["step_time_s"] == d["step_time_s"]
    df = pd.read_parquet(out / "timeline.parquet")
    assert list(df.columns)[:10] == ["device", "stream", "name", "category", "layer", "phase", "start_s", "end_s",
                                     "flops", "bytes"]
    trace = json.loads(gzip.decompress((out / "trace.json.gz").read_bytes()))
    assert any(e.get("args", {}).get("name") == "XLA Ops" for e in trace["traceEvents"])


def test_run_human_summary():
    r = run("run", "workloads/llama3_8b_fsdp_tp.yaml", "--mode", "datasheet")
    assert r.exit_code == 0, r.output
    for words in ("step time", "MFU", "tokens/s", "exposed communication", "bottleneck", "busiest", "HBM"):
        assert words in r.output


@pytest.mark.parametrize("args, words", [
    (["run", "workloads/fsdp_70b.yaml", "--out", "/proc/nope/x"], "--out /proc/nope/x: cannot write there"),
    (["run", "workloads/fsdp_70b.yaml", "--topology", "v5e:4x4"], "does not fit in HBM"),
    (["run", "workloads/fsdp_70b.yaml", "--straggler", "3"], "DEVICE=FACTOR"),
    (["run", "workloads/fsdp_70b.yaml", "--straggler", "999=2"], "devices are 0..255"),
    (["run", "nope.yaml"], "nope.yaml: file not found"),
])
def test_run_bad_input(args, words, tmp_path):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output


def test_run_writes_nothing_when_refused(tmp_path):
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["run", "workloads/fsdp_70b.yaml", "--topology", "v5e:4x4", "--out", str(out)])
    assert r.exit_code == 2
    assert not out.exists()


def test_two_identical_runs_write_identical_folders(tmp_path):
    """Issue 10: two identical `run --out` give byte-identical files (summary.json, the Parquet, the
    Perfetto trace, the XSpace, the report, the manifest): nothing in them depends on the wall clock."""
    folders = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        r = CliRunner().invoke(main, ["run", "workloads/llama3_8b_2slice_dp.yaml", "--topology", "v5p:2x2x2",
                                      "--out", str(out)])
        assert r.exit_code == 0, r.output
        folders.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert folders[0].keys() == folders[1].keys() and len(folders[0]) >= 6
    assert [name for name in folders[0] if folders[0][name] != folders[1][name]] == []
