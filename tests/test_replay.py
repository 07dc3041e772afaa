"""Replaying real TPU data: the v6e host-offload capture op by op, and the v2 pod demo's collectives.

One constant is fitted on the v6e capture: v6e's HBM efficiency, on its three broadcast_add_fusion ops
(topologies/calibration.yaml), so their replay is goodness of fit; its copies and all-reduce are out of
sample. The v2 pod demo's all-gathers and reduce-scatters are what the
in-step collective fixed cost is fitted on (tpusim.fit): in calibrated mode their replay is goodness of
fit, and test_v2_in_step_fit_out_of_sample is the held-out check; the datasheet replay fits nothing.

Budgets: most of these were set just above the errors of the day they were written, not derived from
the captures' uncertainty; each docstring says which. Modelling choices made while looking at a capture
are named as such: the v6e device numbering (host tray by host tray), the PCIe copies served in issue
order, and the reading of the v2 all-reduce's dataSize."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tpusim.cli import main
from tpusim.analysis.profiles import read_profile
from tpusim.analysis.replay import replay, replay_pod_viewer

from conftest import REAL_TRACES, xprof_avg_s

V6E = REAL_TRACES / "tpu-v6e-host-offload" / "tpu_inference_2.xplane.pb"
V2 = REAL_TRACES / "tpu-v2-pod-demo" / "cloud-tpu-v2.pod_viewer.json"


@pytest.fixture(scope="module")
def v6e():
    return replay(read_profile(V6E))


def op(result, name):
    return result.ops.set_index("name").loc[name]


def test_v6e_topology_and_ops(v6e):
    # 4 chips in the profile, 8 devices in the psum's replica groups: a v6e 2x4.
    assert v6e.topology.name == "v6e:2x4"
    assert set(v6e.ops.name) >= {"all-reduce", "broadcast_add_fusion", "copy-done", "copy-done.5"}


def test_v6e_hbm_bound_fusion(v6e):
    """10.7 GB through HBM: 7.92-8.15 ms measured. Goodness of fit: v6e's HBM efficiency (83.7% of 1.6e12
    B/s) is fitted on these three ops' mean rate (the datasheet rate gives -16%), so each must come out
    within the three ops' own spread around their mean (8.154 ms is +1.7% of it): 2%."""
    for name in ("broadcast_add_fusion", "broadcast_add_fusion.1", "broadcast_add_fusion.2"):
        r = op(v6e, name)
        assert r.measured_s == pytest.approx(xprof_avg_s(name), rel=0.01)  # median vs xprof's mean: runs spread < 1%
        assert abs(r.rel_error) < 0.02


def test_v6e_host_offload_copy(v6e):
    """5.37 GB from host memory over PCIe: 189 ms measured for the first copy; datasheet 3.2e10 B/s gives
    168 ms. The later copies measure 194 ms (about 27.6 GB/s); within 18% all (budgets set just above
    today's -11% and -18%; the copies are served in issue order, a choice made from this capture)."""
    first = op(v6e, "copy-done")
    assert first.simulated_s == pytest.approx(5368709120 / 3.2e10, rel=1e-6)
    assert abs(first.rel_error) < 0.12
    for name in ("copy-done.2", "copy-done.4", "copy-done.5"):
        assert abs(op(v6e, name).rel_error) < 0.18


def test_v6e_two_chip_all_reduce(v6e):
    """The 5.37 GB all-reduce of 2-device groups {0,4}, {1,5}, ...: with devices numbered host tray
    by host tray (a choice made while looking at this capture: numbered row-major the model gives half
    the measured time), the partners are two chips apart and the four pairs share the links between
    the trays; 121.7 ms measured, within 5% (set just above today's +4%; v6e borrows v5e's link
    efficiency). At 5.37 GB the in-step fixed cost (microseconds) is invisible: this all-reduce bounds
    it only below a few milliseconds."""
    r = op(v6e, "all-reduce")
    assert r.measured_s == pytest.approx(xprof_avg_s("all-reduce"), rel=0.01)
    assert abs(r.rel_error) < 0.05
    assert v6e.median_abs_rel_error < 0.10


def test_v2_pod_collectives():
    """37 collectives of a v2 2x2 (8 cores) with measured durations, datasheet mode (nothing fitted):
    median |error| under 12% and every one within 40% (budgets set above today's 9.8% and -38%)."""
    df = replay_pod_viewer(V2, mode="datasheet")
    assert len(df) == 37
    assert df.rel_error.abs().median() < 0.12
    assert df.rel_error.abs().max() < 0.40


def test_v2_tuple_all_reduce():
    """The one all-reduce, a tuple of 141 gradients (18.0 MB; most tensors under 10 KB), within 40% like
    the others (today -14%). V is its result tuple, read from the HLO text: the replay used to take half
    its dataSize (as for the all-gathers' operand + result), which made the model 2.2x too fast; the
    HLO shows dataSize is the result alone here (a reading made while looking at this capture)."""
    df = replay_pod_viewer(V2, mode="datasheet")
    ar = df[df.kind == "all-reduce"].iloc[0]
    assert ar.v_bytes == 17999020  # the 141 result tensors, unpadded
    assert abs(ar.rel_error) < 0.40


def test_v2_in_step_goodness_of_fit():
    """Calibrated: v2's collectives run at the in-step fit (link efficiency and fixed cost fitted on these
    36 all-gathers and reduce-scatters), so this is goodness of fit: median |error| 4.5%."""
    df = replay_pod_viewer(V2, mode="calibrated")
    assert df[df.kind != "all-reduce"].rel_error.abs().median() < 0.06


@pytest.mark.parametrize("held_out", [0, 1])
def test_v2_in_step_fit_out_of_sample(held_out):
    """Fit the in-step fixed cost and link efficiency on alternate collectives (by size), predict the
    others: held-out median |error| within 10% (the issue's collective budget) and each within 40%."""
    pytest.importorskip("scipy")
    import numpy as np

    from tpusim.config import read_yaml
    from tpusim.data import data_dir
    from tpusim.fit import fit_in_step

    entry = read_yaml(data_dir("topologies") / "collective_measurements.yaml")["in_step"]["v2-2x2-pod-demo"]
    order = np.argsort([float(p[2]) for p in entry["points"]], kind="stable")
    keep = np.zeros(len(order), dtype=bool)
    keep[order[held_out::2]] = True
    fit = fit_in_step("v2", entry, keep=keep)
    errors = np.abs(fit.rel_errors[~keep])
    print(f"fitted t0 = {fit.overhead_s * 1e6:.2f} us, eta = {fit.eta:.3f}; held-out median {np.median(errors):.1%}")
    assert 1e-6 < fit.overhead_s < 10e-6
    assert np.median(errors) < 0.10 and errors.max() < 0.40


def test_cli_replay_json():
    r = CliRunner().invoke(main, ["replay", str(V6E), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["topology"] == "v6e:2x4" and d["median_abs_rel_error"] < 0.10
    assert {"name", "category", "measured_s", "simulated_s"} <= set(d["ops"][0])


def test_cli_compare(tmp_path):
    run_dir = tmp_path / "run"
    hlo = REAL_TRACES / "tpu-v6e-host-offload" / "hlo" / "jit_f.hlo.txt"
    r = CliRunner().invoke(main, ["run", "--hlo", str(hlo), "--topology", "v6e:2x2", "--out", str(run_dir)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["compare", str(run_dir), str(V6E), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["module"] == "jit_f" and d["ops_matched"] == 15
    # xprof's op_profile: jit_f's op time over its 4 devices x 100 runs; the module also spans the
    # gaps between its ops, well under 1% of it.
    jit_f = next(c for c in json.loads((REAL_TRACES / "tpu-v6e-host-offload" / "tpu_inference_2.op_profile.json")
                                       .read_text())["byProgram"]["children"] if c["name"].startswith("jit_f("))
    assert d["step_time_s"]["measured"] == pytest.approx(jit_f["metrics"]["rawTime"] * 1e-12 / 400, rel=0.01)
    assert abs(d["step_time_s"]["rel_error"]) < 0.15
    import gzip
    trace = json.loads(gzip.decompress((run_dir / "compare.trace.json.gz").read_bytes()))
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert any(n.startswith("measured:") for n in names) and "/device:TPU:0" in names


@pytest.mark.parametrize("args, words", [
    (["replay", "/nonexistent.xplane.pb"], "no such file"),
    (["compare", "/nonexistent", str(V6E)], "not a run folder"),
    (["run", "--hlo", "/nonexistent.hlo"], "--topology"),
])
def test_bad_input(args, words):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output


def test_corrupt_profile(tmp_path):
    bad = tmp_path / "x.xplane.pb"
    bad.write_bytes(V6E.read_bytes()[:1000])
    r = CliRunner().invoke(main, ["replay", str(bad)])
    assert r.exit_code == 2 and str(bad) in r.output
