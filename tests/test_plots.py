"""Charts and the run report: each chart is built from a real simulated step and its data checked
against the library's numbers (timeline rows, summary, link stats, replay), not only that it returns."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REAL_TRACES, REPO, value

from tpusim.analysis import plots
from tpusim.api import compile_workload
from tpusim.cli import main
from tpusim.sim.engine import simulate
from tpusim.analysis.summary import summarize
from tpusim.analysis.timeline import timeline_frame

V6E_PROFILE = REAL_TRACES / "tpu-v6e-host-offload" / "tpu_inference_2.xplane.pb"
SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?https?:", re.IGNORECASE)


def run(workload: str, topology: str | None = None, **overrides):
    _, topo, prog = compile_workload(REPO / "workloads" / workload, topology,
                                     overrides={"base_num_decoder_layers": 2, **overrides})
    return simulate(prog, topo)


@pytest.fixture(scope="module")
def fsdp():
    """FSDP on a v5e pod: both axes wrap."""
    return run("fsdp_70b.yaml", "v5e:16x16")


@pytest.fixture(scope="module")
def line_axis():
    """FSDP x TP on v5e:8x16: x (8 long) is a line, y (16) wraps; comms-bound at 512 tokens per chip."""
    return run("fsdp_70b.yaml", "v5e:8x16", ici_tensor_parallelism=8, max_target_length=512)


@pytest.fixture(scope="module")
def multislice():
    """FSDP inside 3D v5p:4x4x4 slices, data parallel over DCN across 2 of them."""
    return run("llama3_8b_2slice_dp.yaml")


def chart_data(chart) -> pd.DataFrame:
    """The dataset of a chart, a layered or faceted chart, or the first view of a concatenation."""
    return chart.hconcat[0].data if hasattr(chart, "hconcat") else chart.data


# ---- timeline ----------------------------------------------------------------------------------

def test_timeline_rows_are_the_frames_rows(fsdp):
    frame = timeline_frame(fsdp)
    chart = plots.timeline_chart(fsdp)
    data = chart.data
    mine = frame[frame.stream.isin(list(plots.LANES))]
    assert len(data) == len(mine) < plots.MAX_ROWS and (data.ops == 1).all()
    key = ["stream", "name", "start_s", "end_s"]
    got = data[key].sort_values(key).reset_index(drop=True)
    want = mine[key].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    chart.to_dict()  # serialises under altair's row limit


def test_timeline_merges_short_ops_keeping_busy_time(fsdp):
    frame = timeline_frame(fsdp)
    mine = frame[frame.stream.isin(list(plots.LANES))]
    data = plots.timeline_chart(fsdp, max_rows=150).data
    assert len(data) <= 150 and data.ops.sum() == len(mine)
    want = (mine.end_s - mine.start_s).groupby(mine.stream).sum()
    got = data.groupby("stream").busy_s.sum()
    np.testing.assert_allclose(got.sort_index(), want.sort_index(), rtol=1e-9)
    assert data.start_s.min() == pytest.approx(mine.start_s.min()) and data.end_s.max() == pytest.approx(mine.end_s.max())


def test_timeline_lane_rows_do_not_overlap(line_axis):
    data = plots.timeline_rows(line_axis)
    for lane, g in data.groupby("lane"):
        if lane.endswith(f"({plots.MAX_LEVELS})"):
            continue  # the last row of a lane takes whatever still overlaps
        g = g.sort_values("start_s")
        assert (g.start_s.to_numpy()[1:] >= g.end_s.to_numpy()[:-1] - 1e-15).all(), lane


def test_timeline_window_shows_ops_one_by_one(line_axis):
    frame = timeline_frame(line_axis)
    window = (0.01, 0.02)
    data = plots.timeline_chart(frame, window=window, max_rows=100_000).data
    inside = frame[frame.stream.isin(list(plots.LANES)) & (frame.end_s >= window[0]) & (frame.start_s <= window[1])]
    assert len(data) == len(inside) and (data.ops == 1).all()


def test_timeline_simulation_above_real_profile():
    from tpusim.compiler.hlo.importer import import_hlo, read_hlo
    from tpusim.analysis.profiles import read_profile
    from tpusim.analysis.replay import replay

    profile = read_profile(V6E_PROFILE)
    topo = replay(profile).topology
    sim = simulate(import_hlo(read_hlo(V6E_PROFILE.parent / "hlo" / "jit_f.hlo.txt"), topo), topo)
    chart = plots.timeline_chart(sim, profile, module="jit_f")
    data = chart.data
    lanes = chart.to_dict()["encoding"]["y"]["sort"]
    sources = [lane.split(" · ")[0] for lane in lanes]
    assert sources == sorted(sources, key=["simulated", "measured"].index) and set(sources) == {"simulated", "measured"}
    real = plots.profile_run(profile, "jit_f")
    real = real[real.stream.isin(list(plots.LANES))]
    measured = data[data.source == "measured"]
    assert len(measured) == len(real) and measured.start_s.min() == 0.0
    assert set(measured.name) == set(real.name)
    simulated = data[data.source == "simulated"]
    assert simulated.end_s.max() == pytest.approx(sim.step_time_s)


# ---- breakdown ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fsdp", "line_axis"])
def test_breakdown_adds_up_to_the_step(name, request):
    result = request.getfixturevalue(name)
    s = summarize(result)
    f = plots.breakdown_frame(result)
    assert f.seconds.sum() == pytest.approx(s["step_time_s"], rel=1e-9)
    assert f[f.part.str.startswith("compute")].seconds.sum() == pytest.approx(s["compute_s"], rel=1e-9)
    for kind, secs in s["exposed_comm_by_kind_s"].items():
        if kind != "other":
            assert f.set_index("part").seconds[kind] == pytest.approx(secs)
    assert (f.seconds >= 0).all() and f.fraction.sum() == pytest.approx(1.0)
    chart = plots.breakdown_chart({"a": result, "b": s}).to_dict()
    bars = pd.DataFrame(chart["datasets"][chart["layer"][0]["data"]["name"]])
    assert bars.groupby("run").seconds.sum().to_list() == pytest.approx([s["step_time_s"]] * 2)
    labels = chart["datasets"][chart["layer"][1]["data"]["name"]]
    assert all(f"MFU {s['mfu']:.1%}" in d["label"] for d in labels)


def test_breakdown_shows_exposed_communication_when_comms_bound(line_axis):
    s = summarize(line_axis)
    f = plots.breakdown_frame(line_axis).set_index("part")
    exposed = f.seconds.drop([p for p in f.index if p.startswith("compute") or p == "idle"]).sum()
    assert exposed > 0.1 * s["step_time_s"]


# ---- link heatmap ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fsdp", "line_axis", "multislice"])
def test_heatmap_cells_are_link_busy_time_over_step(name, request):
    result = request.getfixturevalue(name)
    topo = result.topology
    cells = plots.link_cells(result)
    assert len(cells) <= plots.MAX_ROWS
    links = cells[cells.kind == "link"]
    for link, g in links.groupby("link"):
        st = result.link_stats[f"ICI {link}"]
        np.testing.assert_allclose(g.utilisation, st["busy_s"] / result.step_time_s)
    planes = cells.plane.nunique()
    per_plane = int(np.prod(topo.shape[:2]))
    assert (cells.kind == "chip").sum() == planes * per_plane
    for axis in topo.axis_names:
        # one cell per direction of each physical link (in the planes shown); none where a line lacks its wrap
        n_links = topo.ici_links_along(axis) * (planes * per_plane) // topo.chips_per_slice
        for sign in "+-":
            assert (links.link == f"{axis}{sign}").sum() == n_links
            missing = (cells.kind == "no link") & (cells.link == f"{axis}{sign}")
            assert missing.sum() == (0 if topo.axis_wraps(axis) else planes * per_plane // topo.axis_size(axis))
    data = chart_data(plots.link_heatmap(result))
    pd.testing.assert_frame_equal(data, cells)


def test_heatmap_shows_line_axis_and_busy_axis(line_axis):
    cells = plots.link_cells(line_axis)
    assert set(cells[cells.kind == "no link"].link) == {"x+", "x-"}  # x is 8 long: a line on v5e
    util = cells[cells.kind == "link"].groupby("link").utilisation.first()
    assert util["x+"] > util["y+"] > 0  # tensor parallelism adds its collectives to x


def test_heatmap_other_links_and_planes(multislice):
    others = plots.other_links(multislice)
    dcn = others.set_index("link").loc["DCN"]
    assert dcn.utilisation == pytest.approx(multislice.link_stats["DCN"]["busy_s"] / multislice.step_time_s)
    small = plots.link_cells(multislice, max_rows=200)
    assert len(small) <= 200 and list(dict.fromkeys(small.plane)) == ["z=3"]  # the last plane, with the z wrap
    chart = plots.link_heatmap(multislice)
    assert len(chart.hconcat) == 2 and list(chart.hconcat[1].data.link) == ["DCN"]


# ---- sweeps ------------------------------------------------------------------------------------

def test_book_thresholds_match_the_book(book_cases):
    from tpusim.sim.chips import get_chip

    fsdp = book_cases["training-dp-fsdp-critical-batch-v5p"]
    mixed = book_cases["training-fsdp-tp-min-batch"]
    t = plots.book_thresholds(get_chip("v5p"), d_ff=int(value(mixed, "inputs", "F")))
    fsdp_t, mixed_t = t.values()
    assert fsdp_t == pytest.approx(value(fsdp, "expected", "per_chip_3axes"), rel=0.01)
    assert mixed_t == pytest.approx(value(mixed, "expected", "B_per_chip"), rel=0.01)
    assert plots.book_thresholds(get_chip("v5p"), tokens_per_unit=128)[next(iter(t))] == pytest.approx(fsdp_t / 128)


def test_sweep_chart_plots_the_runs_and_thresholds():
    rows = []
    for tp in (1, 4):
        for batch in (1, 4):
            s = summarize(run("fsdp_70b.yaml", "v5p:4x4x4", ici_tensor_parallelism=tp, per_device_batch_size=batch,
                              max_target_length=128))
            rows.append({"strategy": "FSDP" if tp == 1 else "FSDP x TP", "topology": "v5p:4x4x4",
                         "tokens_per_chip": batch * 128, "mfu": s["mfu"], "step_time_s": s["step_time_s"]})
    df = pd.DataFrame(rows)
    chart = plots.sweep_chart(df, x="tokens_per_chip", series=("strategy", "topology"), thresholds={"book": 850.0})
    spec = chart.to_dict()
    mfu_panel = spec["hconcat"][0]["layer"]
    points = pd.DataFrame(spec["datasets"][mfu_panel[0]["data"]["name"]])
    assert points[["tokens_per_chip", "mfu"]].to_numpy().tolist() == df[["tokens_per_chip", "mfu"]].to_numpy().tolist()
    rule = spec["datasets"][mfu_panel[2]["data"]["name"]]
    assert rule == [{"label": "book", "tokens_per_chip": 850.0}]
    # The simulation's FSDP falls off at small batches, as the book says, and the mixed layout holds up better.
    mfu = df.pivot_table(index="tokens_per_chip", columns="strategy", values="mfu")
    assert mfu.loc[128, "FSDP x TP"] > mfu.loc[128, "FSDP"] and mfu.loc[512, "FSDP"] > mfu.loc[128, "FSDP"]


# ---- replay --------------------------------------------------------------------------------------

def test_replay_chart_has_each_op_measured_and_simulated():
    from tpusim.analysis.profiles import read_profile
    from tpusim.analysis.replay import replay

    rep = replay(read_profile(V6E_PROFILE))
    data = plots.replay_chart(rep).data
    judged = rep.ops[rep.ops.measured_s >= 1e-6]
    assert len(data) == 2 * len(judged) and set(data.source) == {"measured", "simulated"}
    m = data[data.source == "simulated"].set_index("op").seconds
    np.testing.assert_allclose(m[(judged.module + " / " + judged.name).to_list()], judged.simulated_s)


# ---- export and report ---------------------------------------------------------------------------

def test_save_chart_png_svg_html(fsdp, tmp_path):
    chart = plots.breakdown_chart(fsdp)
    png = plots.save_chart(chart, tmp_path / "b.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 600 and height > 100
    assert plots.save_chart(chart, tmp_path / "b.svg").read_text().lstrip().startswith(("<svg", "<?xml"))
    page = plots.save_chart(chart, tmp_path / "b.html").read_text()
    assert "vegaEmbed" in page and not SCRIPT_SRC.search(page)  # Vega inlined: opens offline
    with pytest.raises(ValueError):
        plots.save_chart(chart, tmp_path / "b.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.html", "b.png", "b.svg"]  # no temporary files left


def test_run_out_writes_an_offline_report(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(REPO / "workloads" / "llama3_8b_fsdp_tp.yaml"), "--out", str(out),
                                  "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not SCRIPT_SRC.search(page) and "<script" not in page  # static: inline SVG, nothing fetched
    assert page.count("<svg") == 3  # breakdown, timeline, link utilisation
    # Every chart fits the page (max-width 1,200 px), and the static SVG promises no zoom.
    widths = [int(w) for w in re.findall(r'<svg[^>]* width="(\d+)"', page)]
    assert widths and max(widths) <= 1200 and "scroll to zoom" not in page
    assert all(f"{name}" in page for name in ("ICI x+", "ICI y-"))  # each link direction is shown once
    assert f"{summary['mfu']:.1%}" in page and summary["bottleneck"] in page
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "plugins", "report.html", "summary.json",
                                                     "timeline.parquet", "trace.json.gz"]


def test_notebook_charts_show_offline():
    """Notebooks call offline_charts(): each chart carries its SVG (vl-convert) next to the Vega-Lite spec,
    never an HTML page that loads Vega from a CDN."""
    import altair as alt

    active = alt.renderers.active
    try:
        plots.offline_charts()
        bundle = alt.Chart(pd.DataFrame({"a": [1, 2]})).mark_point().encode(x="a:Q")._repr_mimebundle_()
    finally:
        alt.renderers.enable(active)
    bundle = bundle[0] if isinstance(bundle, tuple) else bundle
    assert bundle["image/svg+xml"].lstrip().startswith(("<svg", "<?xml")) and "text/html" not in bundle
    assert any(k.startswith("application/vnd.vegalite") for k in bundle)


def test_copy_categories_have_their_own_colours():
    copies = ["copy-to-host", "copy-from-host", "copy-start", "copy-done"]
    assert len({plots.COLORS[c] for c in copies}) == len(copies)
