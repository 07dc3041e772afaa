"""tpusim.analysis.profiles on real captures: the v6e host-offload profile (xplane.pb and its trace-viewer
JSON, in traces/real), our CPU captures (traces/cpu), the v2 pod-viewer output; and bad input.

The numbers are ones a wrong reader would not produce: event counts per device and row, XLA's
per-op flops and bytes, closed forms of the array sizes, the chip's peaks, the agreement of the two
formats event by event, the collective counts capture_cpu.py recorded with jaxlib's reader, and, for
the v6e capture, xprof's own tools on the same file (hlo_stats, op_profile, overview_page: per-op
counts, times, FLOPs and bytes, program and idle totals).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tpusim.errors import TpusimError
from tpusim.analysis.profiles import op_stats, read_pod_viewer, read_profile, replica_groups
from tpusim.analysis.profiles.tracejson import load_trace_events
from tpusim.analysis.profiles.xplane import load_xspace

from conftest import xprof_avg_s, xprof_hlo_stats

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "traces" / "real"
V6E = REAL / "tpu-v6e-host-offload"
CPU = REPO / "traces" / "cpu"
ARRAY_BYTES = 5 * 1024 * 1024 * 256 * 4  # f32[5,1024,1024,256] = 5,368,709,120 B
ARRAY_ELEMENTS = 5 * 1024 * 1024 * 256
NS = 1e-9


@pytest.fixture(scope="module")
def v6e():
    return read_profile(V6E / "tpu_inference_2.xplane.pb")


@pytest.fixture(scope="module")
def v6e_json():
    return read_profile(V6E / "tpu_inference_2.trace.json.gz")


def _ops(profile, device=None, stream="XLA Ops"):
    tl = profile.timeline
    rows = tl[tl.stream == stream]
    return rows if device is None else rows[rows.device == device]


# ---- the v6e capture: devices, counts, known ops ------------------------------------------------------------

def test_v6e_devices_and_peaks_from_plane_stats(v6e):
    assert [d.id for d in v6e.devices] == [0, 1, 2, 3]
    assert {d.kind for d in v6e.devices} == {"TPU v6 Lite"}
    assert {d.peak_flops_per_s for d in v6e.devices} == {918e12}  # 918 TFLOP/s bf16
    assert {d.hbm_bytes_per_s for d in v6e.devices} == {1637.993152512e9}  # "1638 GB/s"
    assert v6e.format == "xplane"


def test_v6e_event_counts_per_device_and_row(v6e):
    counts = v6e.timeline.groupby(["device", "stream"]).size().to_dict()
    # 100 jit_f runs x 15 ops + 3 psums (+ the broadcast of jit_broadcast_in_dim, on TPU:0 only).
    assert [counts[(d, "XLA Ops")] for d in range(4)] == [1504, 1503, 1503, 1503]
    assert [counts[(d, "XLA Modules")] for d in range(4)] == [105, 103, 103, 103]
    assert counts[(0, "Async XLA Ops")] == 600 and (1, "Async XLA Ops") not in counts  # 6 host copies x 100
    modules = v6e.timeline[v6e.timeline.stream == "XLA Modules"].groupby(["device", "module"]).size()
    assert all(modules[(d, "jit_f")] == 100 and modules[(d, "jit__psum")] == 3 for d in range(4))


def test_v6e_timeline_has_the_simulator_columns(v6e):
    from tpusim.analysis.timeline import COLUMNS

    sim = [c for c in COLUMNS if c not in ("replicas", "op_index")]
    assert list(v6e.timeline.columns[:len(sim)]) == sim
    assert v6e.timeline.start_s.min() == 0.0 and (v6e.timeline.end_s >= v6e.timeline.start_s).all()
    assert (v6e.timeline.layer == -1).all() and (v6e.timeline.phase == "").all()


def test_v6e_xla_ops_use_the_device_clock(v6e):
    # The TensorCore runs one op at a time: on the chip's clock XLA Ops never overlap and none is
    # empty; the host-clock projection (what the trace viewer draws) squeezes 183 of them to 0 s.
    for device in range(4):
        ops = _ops(v6e, device).sort_values("start_s")
        assert (ops.start_s.to_numpy()[1:] >= ops.end_s.to_numpy()[:-1]).all()
    ops = _ops(v6e)
    assert ((ops.end_s - ops.start_s) <= 0).sum() == 12  # copy-starts that take 0 ps on the chip too
    assert ((ops.host_end_s - ops.host_start_s) <= 0).sum() == 183


def test_v6e_ops_belong_to_their_modules(v6e):
    # module and run_id come from the enclosing XLA Modules event, program_id from the op's
    # metadata: they must name the same compiled module.
    ops = _ops(v6e)
    keys = {f"{m}({p})" for m, p in zip(ops.module, ops.program_id, strict=True)}
    assert keys == set(v6e.hlo_modules) - {"jit_convert_element_type(2433868464432466958)"}
    assert ops.run_id.notna().all()


def test_v6e_all_reduce_of_psum(v6e):
    ar = _ops(v6e)[_ops(v6e).name == "all-reduce"]
    assert len(ar) == 12 and set(ar.module) == {"jit__psum"}  # 3 runs x 4 chips
    assert set(ar.category) == {"all-reduce"}
    assert set(ar.bytes) == {2 * ARRAY_BYTES}  # bytes_accessed: operand + result, 10,737,418,240
    assert set(ar.flops) == {ARRAY_ELEMENTS}  # one add per element, 1,342,177,280
    assert "replica_groups=[4,2]<=[2,4]T(1,0)" in ar.long_name.iloc[0]
    # 2-chip groups whose partners (4..7) are not in this 4-chip profile
    assert replica_groups(ar.long_name.iloc[0]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    duration = ar.end_s - ar.start_s
    assert duration.max() - duration.min() < 3e-5  # device clock: every run within 30 us
    assert duration.median() == pytest.approx(xprof_avg_s("all-reduce"), abs=3e-5)  # so the median is near xprof's mean


def test_v6e_broadcast_add_fusions_of_f_run_near_hbm_peak(v6e):
    stats = op_stats(v6e).set_index("name")
    fusions = stats.loc[["broadcast_add_fusion", "broadcast_add_fusion.1", "broadcast_add_fusion.2"]]
    assert list(fusions["count"]) == [400, 400, 400] and set(fusions.module) == {"jit_f"}
    assert set(fusions.category) == {"loop fusion"}
    assert set(fusions.flops) == {ARRAY_ELEMENTS} and set(fusions.bytes) == {2 * ARRAY_BYTES}
    # xprof's hlo_stats average; the runs of one fusion spread by under 1% (min to max), the median with them
    assert fusions.median_s.tolist() == pytest.approx([xprof_avg_s(n) for n in fusions.index], rel=0.01)
    assert (fusions.max_s - fusions.min_s < 0.01 * fusions.median_s).all()
    assert (fusions.min_s > 7.9e-3).all()  # on the host clock the trace viewer shows some as 0 s
    hbm_fraction = fusions.bytes / fusions.median_s / v6e.devices[0].hbm_bytes_per_s
    assert hbm_fraction.between(0.80, 0.84).all()  # 10.7 GB in ~8 ms: 81-83% of 1638 GB/s


def test_v6e_host_offload_copies(v6e):
    stats = op_stats(v6e).set_index("name")
    h2d = stats.loc[["copy-done", "copy-done.2", "copy-done.4"]]  # waits for host -> HBM copies
    assert set(h2d.bytes) == {ARRAY_BYTES}
    assert h2d.median_s.tolist() == pytest.approx([xprof_avg_s(n) for n in h2d.index], rel=0.01)
    assert (h2d.max_s - h2d.min_s < 0.01 * h2d.median_s).all()
    asynchronous = op_stats(v6e, "Async XLA Ops")
    assert sorted(asynchronous.name) == ["copy-start"] + [f"copy-start.{i}" for i in range(1, 6)]
    assert set(asynchronous["count"]) == {100} and set(asynchronous.category) == {"copy-start"}


def test_v6e_hlo_modules_match_the_hlo_text(v6e):
    assert sorted(m.name for m in v6e.hlo_modules.values()) == [
        "jit__psum", "jit_broadcast_in_dim", "jit_convert_element_type", "jit_f"]
    for module in v6e.hlo_modules.values():
        text = (V6E / "hlo" / f"{module.name}.hlo.txt").read_text()
        assert {i.name for i in module.instructions} == set(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ", text, re.M))
    psum = v6e.hlo_modules["jit__psum(9646411105960254074)"]
    assert psum.program_id == 9646411105960254074 and len(psum.proto) == 2293
    ar = psum.instruction("all-reduce")
    assert (ar.opcode, ar.shape) == ("all-reduce", "f32[5,1024,1024,256]")
    assert ar.op_name == "jit(_psum)/jit(main)/reduce_sum"


# ---- the same capture through xprof's own tools (hlo_stats, op_profile, overview_page) ---------------------
#
# xprof's tools were run on this very xplane.pb upstream (traces/real/README.md), so every per-op
# figure tpusim reads must be theirs. Their aggregation rules, which the comparisons follow:
# * hlo_stats and op_profile aggregate "XLA Ops" events per HLO op over all 4 devices (occurrences =
#   runs x devices), on the device clock, in picoseconds (op_profile) or microseconds (hlo_stats);
#   none of these ops has children, so self time = total time. Both sum the same integer-picosecond
#   durations tpusim sums, so they agree to float rounding (rel 1e-9).
# * hlo_stats gives FLOPs and bytes only as rates: GFLOP/s = flops / avg self time, memory BW in GiB/s.
#   Multiplied back by the average time they are exact up to the printed digits (rel 1e-9).
# * op_profile splits bytes by memory space (index 0 = HBM): the offload copies' host-memory side
#   (layout S(5)) counts 0 there; every op that touches only HBM has all its bytes in index 0.
# * op_profile's program total is, per device, first op start to last op end, summed; its IDLE is
#   that total less the ops' time (the same numbers the overview page's idle % is computed from).

XPROF = V6E / "tpu_inference_2"
PS = 1e-12


def _op_profile_ops(node, program=None):
    """The HLO op nodes, with their program: not the "X and its duplicate(s)" groups, and not the
    instructions inside a fusion (children of an op, untimed), nor the IDLE pseudo-program."""
    if node.get("name") == "IDLE":
        return
    if "xla" in node and not node["name"].endswith(" and its duplicate(s)"):
        yield program, node
        return
    for child in node.get("children", []):
        yield from _op_profile_ops(child, node["name"] if program is None and "(" in node.get("name", "") else program)


def _stats_by_key(v6e):
    stats = op_stats(v6e)
    program = {m.name: str(m.program_id) for m in v6e.hlo_modules.values()}
    return {(program[r.module], r.name): r for r in stats.itertuples()}


def test_op_stats_agree_with_xprof_hlo_stats(v6e):
    ours = _stats_by_key(v6e)
    theirs = xprof_hlo_stats()
    assert {(r["program_id"], r["hlo_op_name"]) for r in theirs} == set(ours)  # the same 17 ops, no more
    for r in theirs:
        o = ours[(r["program_id"], r["hlo_op_name"])]
        assert o.category == r["category"], o.name
        assert o.count == r["occurrences"], o.name
        assert o.total_s == pytest.approx(r["total_self_time"] * 1e-6, rel=1e-9), o.name
        assert o.total_s == pytest.approx(r["total_time"] * 1e-6, rel=1e-9), o.name
        avg_s = r["avg_self_time"] * 1e-6
        assert o.flops == pytest.approx(r["model_flop_rate"] * 1e9 * avg_s, rel=1e-9, abs=1e-3), o.name
        assert o.bytes == pytest.approx(r["measured_memory_bw"] * 2**30 * avg_s, rel=1e-9), o.name
        if o.bytes:
            assert o.flops / o.bytes == pytest.approx(r["operational_intensity"], rel=1e-9), o.name


def test_op_stats_agree_with_xprof_op_profile(v6e):
    ours = _stats_by_key(v6e)
    doc = json.loads(XPROF.with_suffix(".op_profile.json").read_text())
    leaves = list(_op_profile_ops(doc["byProgram"]))
    assert len(leaves) == len(ours) == 17
    host_side = []
    for program, node in leaves:
        m = node["metrics"]
        o = ours[(node["xla"]["programId"], node["name"])]
        assert program.startswith(o.module + "("), (program, o.module)
        assert o.count == m["occurrences"], o.name
        assert o.total_s == pytest.approx(m["rawTime"] * PS, rel=1e-9), o.name
        assert o.flops * o.count == pytest.approx(m["rawFlops"], rel=1e-9), o.name
        hbm = m["rawBytesAccessedArray"][0]
        if "S(5)" in o.long_name:  # a host-offload copy: its host-memory side is not HBM traffic
            assert hbm == pytest.approx(0, abs=1) or hbm == pytest.approx(o.bytes * o.count, rel=1e-9), o.name
            host_side.append(hbm == pytest.approx(0, abs=1))
        else:
            assert hbm == pytest.approx(o.bytes * o.count, rel=1e-9), o.name
    assert sorted(host_side) == [False] * 6 + [True] * 6  # 12 copies: 6 write HBM, 6 only host memory
    # The program totals and idle time: per device, first op start to last op end.
    ops = _ops(v6e)
    busy_s = (ops.end_s - ops.start_s).sum()
    span_s = sum(d.end_s.max() - d.start_s.min() for _, d in ops.groupby("device"))
    idle = next(c for c in doc["byProgram"]["children"] if c["name"] == "IDLE")
    assert span_s == pytest.approx(doc["byProgram"]["metrics"]["rawTime"] * PS, rel=1e-9)
    assert span_s - busy_s == pytest.approx(idle["metrics"]["rawTime"] * PS, rel=1e-9)


def test_op_stats_agree_with_xprof_overview_page(v6e):
    """The overview's top ops: self-time shares of the busy time and GFLOP/s, by HLO op or, for ops with
    framework metadata, by framework op (jit(f)/jit(main)/add is the three broadcast-add fusions)."""
    page = json.loads(XPROF.with_suffix(".overview_page.json").read_text())
    top, env = page[0], page[2]["p"]
    assert env["device_type"] == v6e.devices[0].kind and int(env["device_core_count"]) == len(v6e.devices)
    stats = op_stats(v6e)
    modules = {m.name: m for m in v6e.hlo_modules.values()}
    stats["op"] = [modules[m].instruction(n).op_name or n for m, n in zip(stats.module, stats.name, strict=True)]
    by_op = stats.assign(all_flops=stats.flops * stats["count"]).groupby("op")[["total_s", "all_flops"]].sum()
    busy_s = stats.total_s.sum()
    idle = float(top["p"]["device_idle_time_percent"].rstrip("%")) / 100
    assert 1 - busy_s / sum(d.end_s.max() - d.start_s.min() for _, d in _ops(v6e).groupby("device")) == \
        pytest.approx(idle, abs=0.0005)  # printed to 0.1%
    rows = [[c["v"] for c in r["c"]] for r in top["rows"]]
    assert len(rows) >= 10
    for share, _, _, op, gflops in rows:
        assert by_op.loc[op, "total_s"] / busy_s == pytest.approx(share, rel=1e-9), op
        assert by_op.loc[op, "all_flops"] / by_op.loc[op, "total_s"] / 1e9 == pytest.approx(gflops, rel=1e-9, abs=1e-9), op


def test_pod_viewer_agrees_with_its_overview_page():
    """The v2 run's overview page: 8 replicas (the all-reduce's one group spans them all), and each
    step's collectives fit in that step's measured time (durations are microseconds: read as
    milliseconds they would exceed it 3-fold)."""
    page = json.loads((REAL / "tpu-v2-pod-demo" / "cloud-tpu-v2.overview_page.json").read_text())
    env = page[2]["p"]
    df = read_pod_viewer(REAL / "tpu-v2-pod-demo" / "cloud-tpu-v2.pod_viewer.json")
    assert env["device_type"] == "TPU v2" and env["device_core_count"].startswith("8 (Replica count = 8")
    (group,) = df[df.kind == "all-reduce"].replica_groups.iloc[0]
    assert len(group) == 8
    steps = {int(r["c"][0]["v"]): (r["c"][1]["v"] + r["c"][2]["v"] + r["c"][3]["v"]) * 1e-3 for r in page[1]["rows"]}
    per_step = df.groupby("step").duration_s.sum().to_dict()
    assert set(per_step) == set(steps)
    for step, total in per_step.items():
        assert 0 < total < steps[step], step


# ---- the same capture as trace-viewer JSON --------------------------------------------------------------------

def test_v6e_json_has_the_readme_event_count():
    assert len(load_trace_events(V6E / "tpu_inference_2.trace.json.gz")) == 29_606


def test_v6e_json_agrees_with_xplane_on_xla_ops(v6e, v6e_json):
    assert v6e_json.format == "trace_json" and [d.id for d in v6e_json.devices] == [0, 1, 2, 3]
    dropped = []
    for device in range(4):
        x, j = _ops(v6e, device), _ops(v6e_json, device)
        # The trace viewer drops the events its host-clock alignment squeezed to zero length.
        kept = x[x.host_end_s > x.host_start_s]
        dropped.append(len(x) - len(kept))
        assert len(kept) == len(j)
        assert kept.name.tolist() == j.name.tolist()
        assert np.abs((kept.end_s - kept.start_s).to_numpy() - (j.end_s - j.start_s).to_numpy()).max() < NS
        assert np.abs((kept.host_end_s - kept.host_start_s).to_numpy()
                      - (j.host_end_s - j.host_start_s).to_numpy()).max() < NS
        assert (kept.flops.to_numpy() == j.flops.to_numpy()).all()
        assert (kept.bytes.to_numpy() == j.bytes.to_numpy()).all()
    assert dropped == [45, 45, 44, 49]


# ---- our CPU captures -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, ops_per_device", [("fsdp", 772), ("fsdp_tp", 834)])
def test_cpu_capture_collectives_match_summary(case, ops_per_device):
    summary = json.loads((CPU / case / "summary.json").read_text())["profile"]
    xplane = next((CPU / case).rglob("*.xplane.pb"))
    events = sum(len(line.events) for plane in load_xspace(xplane).planes for line in plane.lines)
    assert events == summary["num_events"]  # every event of every plane, as jaxlib's reader counted
    profile = read_profile(CPU / case)  # the case directory: the run below it, its xplane.pb
    assert profile.format == "xplane" and profile.source == str(xplane)
    tl = profile.timeline
    assert [d.id for d in profile.devices] == list(range(8)) and set(tl.stream) == {"XLA Ops"}
    assert tl.groupby("device").size().tolist() == [ops_per_device] * 8  # 2 profiled steps
    assert set(tl.module) == {"jit_step"} and tl.run_id.nunique() == 2
    collectives = tl[tl.category.isin(["all-gather", "all-reduce", "all-to-all", "collective-permute"])]
    assert collectives.name.value_counts().to_dict() == summary["collective_events_by_name"]
    assert collectives.category.value_counts().to_dict() == summary["collective_events_by_kind"]
    assert (collectives.groupby(["name", "device"]).size() == 2).all()  # every device, once per step
    step = profile.hlo_modules["jit_step(0)"]
    assert all(step.instruction(n).opcode == k for n, k in zip(collectives.name, collectives.category, strict=True))


@pytest.mark.parametrize("case", ["fsdp", "fsdp_tp"])
def test_cpu_capture_three_formats_agree(case):
    run = next((CPU / case).rglob("*.xplane.pb")).parent
    frames = [read_profile(run / f).timeline for f in ("vm.xplane.pb", "vm.trace.json.gz", "perfetto_trace.json.gz")]
    x = frames[0].sort_values(["device", "start_s", "name"]).reset_index(drop=True)
    for other in frames[1:]:
        o = other.sort_values(["device", "start_s", "name"]).reset_index(drop=True)
        assert len(o) == len(x) and (o.name == x.name).all() and (o.device == x.device).all()
        assert np.abs((o.end_s - o.start_s) - (x.end_s - x.start_s)).max() < NS
        assert np.abs(o.start_s - x.start_s).max() < NS


# ---- the v2 pod viewer ----------------------------------------------------------------------------------------

def test_pod_viewer_collectives():
    df = read_pod_viewer(REAL / "tpu-v2-pod-demo" / "cloud-tpu-v2.pod_viewer.json")
    assert df.groupby("step").size().to_dict() == {0: 37, 1: 37, 2: 37}
    assert df.groupby("step").name.apply(frozenset).nunique() == 1  # the same 37 each step
    first = df[df.step == 0]
    assert first.kind.value_counts().to_dict() == {"all-gather": 18, "reduce-scatter": 18, "all-reduce": 1}
    ag = first.set_index("name").loc["fusion.8"]  # f32[64,8,128] -> f32[1,1,1024,512]: operand + result
    assert ag.data_bytes == 64 * 8 * 128 * 4 + 1024 * 512 * 4 and ag.duration_s == pytest.approx(32.789642875e-6)
    ar = first.set_index("name").loc["all-reduce.201"]
    assert ar.replica_groups == [list(range(8))] and ar.data_bytes == 18_545_664
    assert first.replica_groups.isna().sum() == 36


# ---- bad input ------------------------------------------------------------------------------------------------

def _error(path) -> TpusimError:
    with pytest.raises(TpusimError) as info:
        read_profile(path)
    return info.value


def test_truncated_and_random_xplane(tmp_path):
    truncated = tmp_path / "cut.xplane.pb"
    truncated.write_bytes((V6E / "tpu_inference_2.xplane.pb").read_bytes()[:1000])
    err = _error(truncated)
    assert err.source == str(truncated) and "truncated or corrupt XSpace" in err.reason
    noise = tmp_path / "noise.xplane.pb"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    err = _error(noise)
    assert err.source == str(noise) and ("corrupt" in err.reason or "no /device:TPU:N plane" in err.reason)


@pytest.mark.parametrize("name", ["empty.xplane.pb", "empty.trace.json.gz"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    err = _error(tmp_path / name)
    assert err.source == str(tmp_path / name) and "empty file" in err.reason


def test_gzip_of_garbage_json_and_truncated_gzip(tmp_path):
    garbage = tmp_path / "bad.trace.json.gz"
    garbage.write_bytes(gzip.compress(b'{"traceEvents": [{"ph": "X", '))
    assert "corrupt JSON" in _error(garbage).reason
    cut = tmp_path / "cut.trace.json.gz"
    cut.write_bytes((V6E / "tpu_inference_2.trace.json.gz").read_bytes()[:1000])
    err = _error(cut)
    assert err.source == str(cut) and "gzip" in err.reason


def test_json_without_events_or_devices(tmp_path):
    empty = tmp_path / "none.json"
    empty.write_text('{"displayTimeUnit": "ns", "traceEvents": []}')
    assert _error(empty).reason == "the trace has no events"
    host = tmp_path / "host.json"
    host.write_text(json.dumps({"traceEvents": [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 1.0, "dur": 2.0, "name": "main"}]}))
    assert "no /device:TPU:N process and no XLA CPU op" in _error(host).reason


def test_directories(tmp_path):
    assert "no profile in this directory" in _error(tmp_path).reason
    for run in ("2026_01_01", "2026_01_02"):
        (tmp_path / "plugins" / "profile" / run).mkdir(parents=True)
        (tmp_path / "plugins" / "profile" / run / "vm.xplane.pb").write_bytes(b"x")
    err = _error(tmp_path)
    assert err.source == str(tmp_path) and "2 profile runs" in err.reason and "2026_01_02" in err.reason
    assert "no such file" in _error(tmp_path / "missing.xplane.pb").reason
    assert read_profile(V6E).source == str(V6E / "tpu_inference_2.xplane.pb")  # xplane before JSON


def test_op_stats_names_the_streams(v6e):
    with pytest.raises(TpusimError, match="no events on stream 'Steps'.*XLA Ops"):
        op_stats(v6e, "Steps")
