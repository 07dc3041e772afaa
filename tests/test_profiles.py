"""tpusim.profiles on real captures: the v6e host-offload profile (xplane.pb and its trace-viewer
JSON, in traces/real), our CPU captures (traces/cpu), the v2 pod-viewer output; and bad input.

The numbers are ones a wrong reader would not produce: event counts per device and row, XLA's
per-op flops and bytes, closed forms of the array sizes, the chip's peaks, the agreement of the two
formats event by event, and the collective counts capture_cpu.py recorded with jaxlib's reader.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tpusim.errors import TpusimError
from tpusim.profiles import op_stats, read_pod_viewer, read_profile, replica_groups
from tpusim.profiles.tracejson import load_trace_events
from tpusim.profiles.xplane import load_xspace

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
    from tpusim.timeline import COLUMNS

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
    assert duration.median() == pytest.approx(0.12169, abs=1e-4)
    assert duration.max() - duration.min() < 3e-5  # device clock: every run within 30 us


def test_v6e_broadcast_add_fusions_of_f_run_near_hbm_peak(v6e):
    stats = op_stats(v6e).set_index("name")
    fusions = stats.loc[["broadcast_add_fusion", "broadcast_add_fusion.1", "broadcast_add_fusion.2"]]
    assert list(fusions["count"]) == [400, 400, 400] and set(fusions.module) == {"jit_f"}
    assert set(fusions.category) == {"loop fusion"}
    assert set(fusions.flops) == {ARRAY_ELEMENTS} and set(fusions.bytes) == {2 * ARRAY_BYTES}
    assert fusions.median_s.tolist() == pytest.approx([7.9745e-3, 8.1537e-3, 7.9160e-3], abs=2e-6)
    assert (fusions.min_s > 7.9e-3).all()  # on the host clock the trace viewer shows some as 0 s
    hbm_fraction = fusions.bytes / fusions.median_s / v6e.devices[0].hbm_bytes_per_s
    assert hbm_fraction.between(0.80, 0.84).all()  # 10.7 GB in ~8 ms: 81-83% of 1638 GB/s


def test_v6e_host_offload_copies(v6e):
    stats = op_stats(v6e).set_index("name")
    h2d = stats.loc[["copy-done", "copy-done.2", "copy-done.4"]]  # waits for host -> HBM copies
    assert set(h2d.bytes) == {ARRAY_BYTES}
    assert h2d.median_s.tolist() == pytest.approx([0.18918, 0.19411, 0.19443], abs=1e-4)
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
