"""Charts of simulated steps (altair), for notebooks and the run report; each returns an altair chart.

* :func:`timeline_chart`: one device's streams over the step (compute, collectives, ICI/DCN links,
  host), zoomable, coloured by category; a real profile below the simulation when both are given.
* :func:`breakdown_chart`: where the step went (compute, exposed communication by kind, idle), MFU.
* :func:`link_heatmap`: each ICI link's utilisation (busy time / step) laid out on the slice's grid.
* :func:`sweep_chart`: MFU and step time across a sweep, with the book's compute-bound thresholds.
* :func:`replay_chart`: a replayed profile, op by op, measured against simulated.
* :func:`save_chart`: PNG / SVG (vl-convert, no browser) or self-contained HTML.

Every chart keeps each of its datasets under altair's 5,000-row limit (:data:`MAX_ROWS`) by drawing
one device and merging ops too short to see, rather than lifting the limit for the whole session.
The DataFrames behind the charts are built in :mod:`tpusim.analysis.plotdata`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import altair as alt
import pandas as pd

from tpusim.sim.engine import SimResult
from tpusim.analysis.plotdata import (  # the data helpers (and colours, shared with svgcharts), re-exported
    COLORS, EXTRA_COLORS, LANES, MAX_LEVELS, MAX_ROWS, breakdown_frame, link_cells, other_links, profile_run,
    timeline_rows,
)
from tpusim.analysis.timeline import write_atomic

__all__ = ["MAX_ROWS", "book_thresholds", "breakdown_chart", "breakdown_frame", "link_bars", "link_cells",
           "link_heatmap", "offline_charts", "profile_run", "replay_chart", "save_chart", "sweep_chart",
           "timeline_chart", "timeline_rows"]

_EXTRA = EXTRA_COLORS


def _color_scale(categories) -> alt.Scale:
    """A colour per category: fixed for the categories tpusim writes, then a palette for the rest."""
    known = list(COLORS)
    domain = sorted(dict.fromkeys(categories), key=lambda c: known.index(c) if c in known else len(known))
    extra = iter(_EXTRA * (1 + len(domain) // len(_EXTRA)))
    return alt.Scale(domain=domain, range=[COLORS.get(c) or next(extra) for c in domain])




def timeline_chart(sim: SimResult | pd.DataFrame | None = None, real=None, *, device: int | None = None,
                   window: tuple[float, float] | None = None, module: str | None = None,
                   max_rows: int = MAX_ROWS, width: int = 900, interactive: bool = True) -> alt.Chart:
    """One device's streams over the step, as a Gantt chart that zooms and pans along time
    (``interactive=False``: a static picture, e.g. SVG, with the legend below so it stays ``width`` wide).

    Parameters
    ----------
    sim : SimResult or DataFrame, optional
        A simulated step, or its :func:`tpusim.analysis.timeline.timeline_frame`.
    real : Profile or DataFrame, optional
        A real profile (its device 0, first run of ``module``: see :func:`profile_run`), drawn below.
    device : int, optional
        The simulated device to draw (default: the representative one).
    window : (start_s, end_s), optional
        Draw only this part of the step (seconds), at full detail.
    max_rows : int
        Rows at most; beyond, ops closer than a time resolution are merged (see :func:`timeline_rows`).
    """
    if sim is None and real is None:
        raise ValueError("give a simulated step, a real profile, or both")
    parts = []
    budget = max_rows // ((sim is not None) + (real is not None))
    if sim is not None:
        parts.append(timeline_rows(sim, device=device, window=window, max_rows=budget).assign(source="simulated"))
    if real is not None:
        frame = real if isinstance(real, pd.DataFrame) else profile_run(real, module)
        parts.append(timeline_rows(frame, window=window, max_rows=budget).assign(source="measured"))
    rows = pd.concat(parts, ignore_index=True)
    both = len(parts) == 2
    rows["lane"] = (rows.source + " · " + rows.lane) if both else rows.lane
    order = [f"{s} · {lane}{n}" if both else f"{lane}{n}" for s in ("simulated", "measured") for lane in LANES.values()
             for n in ["", *(f" ({k})" for k in range(2, MAX_LEVELS + 1))]]
    lanes = [lane for lane in order if lane in set(rows.lane)]
    lo, hi = window if window else (0.0, float(rows.end_s.max()) if len(rows) else 1.0)
    unit, k = ("ms", 1e3) if hi - lo < 2.0 else ("s", 1.0)
    rows = rows.assign(start=rows.start_s * k, end=rows.end_s * k, duration_ms=rows.busy_s * 1e3)
    title = "simulated above, measured below" if both else ("measured" if real is not None else "simulated")
    edges = {"stroke": "white", "strokeWidth": 0.5} if len(rows) <= 600 else {}  # op edges, when few enough
    hint = "; scroll to zoom, drag to pan" if interactive else ""
    legend = alt.Legend() if interactive else alt.Legend(orient="bottom", columns=6)
    chart = alt.Chart(rows, title=f"timeline of one device ({title}){hint}").mark_bar(
        clip=True, **edges).encode(
        x=alt.X("start:Q", title=f"time ({unit})", scale=alt.Scale(domain=[lo * k, hi * k], nice=False)),
        x2="end:Q",
        y=alt.Y("lane:N", sort=lanes, title=None,  # a lane's extra rows (overlapping ops): "lane (2)", ...
                axis=alt.Axis(labelLimit=260)),
        color=alt.Color("category:N", scale=_color_scale(rows.category), title="category", legend=legend),
        tooltip=["source", "name", "category", alt.Tooltip("start:Q", title=f"start ({unit})", format=".4~f"),
                 alt.Tooltip("duration_ms:Q", title="busy (ms)", format=".4~f"), "ops"],
    ).properties(width=width, height=24 * len(lanes))
    return chart.interactive(bind_y=False) if interactive else chart


# ---- step breakdown --------------------------------------------------------------------------------

def breakdown_chart(runs, *, width: int = 700) -> alt.LayerChart:
    """Stacked bars of where each step went (seconds), labelled with the step time and MFU.

    ``runs``: one SimResult or summary dict, or a mapping label -> SimResult or summary (one bar each).
    """
    if isinstance(runs, SimResult) or (isinstance(runs, Mapping) and "step_time_s" in runs):
        runs = {"": runs}
    frames, labels = [], []
    for label, run in runs.items():
        f = breakdown_frame(run)
        name = label or f"{f.attrs['workload']} on {f.attrs['topology']}"
        frames.append(f.assign(run=name))
        labels.append({"run": name, "end_s": f.seconds.sum(),
                       "label": f"  {_fmt_s(f.attrs['step_time_s'])}, MFU {f.attrs['mfu']:.1%}"})
    data = pd.concat(frames, ignore_index=True)
    data["order"] = range(len(data))
    runs_order = [d["run"] for d in labels]
    y = alt.Y("run:N", sort=runs_order, title=None, axis=alt.Axis(labelLimit=300))
    x_max = 1.3 * max(d["end_s"] for d in labels)  # room for the labels after the bars
    bars = alt.Chart(data).mark_bar().encode(
        x=alt.X("sum(seconds):Q", title="seconds of the step", scale=alt.Scale(domain=[0, x_max], nice=False)), y=y,
        color=alt.Color("part:N", scale=_color_scale(data.part), title="time spent",
                        legend=alt.Legend(orient="bottom", columns=4)),
        order="order:Q",
        tooltip=["run", "part", alt.Tooltip("seconds:Q", format=".4~s"), alt.Tooltip("fraction:Q", format=".1%")])
    text = alt.Chart(pd.DataFrame(labels)).mark_text(align="left", fontSize=12).encode(
        x="end_s:Q", y=y, text="label:N")
    return alt.layer(bars, text, title="step breakdown: compute, exposed communication, idle").properties(
        width=width, height=34 * len(runs_order))


def _fmt_s(seconds: float) -> str:
    return f"step {seconds * 1e3:.3g} ms" if seconds < 1 else f"step {seconds:.3g} s"


# ---- link heatmap ----------------------------------------------------------------------------------

def link_heatmap(result: SimResult, *, max_rows: int = MAX_ROWS, cell_px: int | None = None) -> alt.TopLevelMixin:
    """Each ICI link's utilisation (busy time / step time) on the slice's grid; 3D slices as z planes.

    Each chip (grey square) has its +x link to the right and its -x link in the gap on its left (upper
    and lower halves), +y below and -y above (left and right halves); in 3D the square itself holds the
    z+ (left) and z- (right) links. The gaps after the last chip of an axis hold its wraparound links,
    dashed when the axis has none (a line). DCN and PCIe links are bars beside the grid.
    """
    cells = link_cells(result, max_rows=max_rows)
    topo = result.topology
    nx_, ny = topo.shape[0], topo.shape[1] if len(topo.shape) > 1 else 1
    px = cell_px or max(22, 200 // max(nx_, ny))
    color = alt.Color("utilisation:Q", scale=alt.Scale(domain=[0, 1], scheme="orangered"), title="busy / step",
                      legend=alt.Legend(format="%"))
    base = alt.Chart().encode(
        x=alt.X("x0:Q", axis=None, scale=alt.Scale(domain=[0, nx_], nice=False, zero=False)), x2="x1:Q",
        y=alt.Y("y0:Q", axis=None, scale=alt.Scale(domain=[0, ny], nice=False, zero=False, reverse=True)),
        y2="y1:Q")
    tip = ["chip", "coords", "link", "to", alt.Tooltip("utilisation:Q", format=".1%"),
           alt.Tooltip("bytes:Q", format=".3~s")]
    chips = base.transform_filter("datum.kind == 'chip'")
    grid = alt.layer(
        *([chips.mark_rect(fill="#8c8c8c")] if len(topo.shape) < 3 else []),
        base.transform_filter("datum.kind == 'link'").mark_rect(stroke="white", strokeWidth=0.5).encode(
            color=color, tooltip=tip),
        base.transform_filter("datum.kind == 'no link'").mark_rect(
            fill="white", stroke="#888888", strokeDash=[2, 2], strokeWidth=0.8).encode(tooltip=["coords", "link", "to"]),
        *([chips.mark_rect(fillOpacity=0, stroke="#333333", strokeWidth=1)] if len(topo.shape) == 3 else []),
        data=cells).properties(width=px * nx_, height=px * ny)
    planes = list(dict.fromkeys(cells.plane))
    shown = f"slice 0 of {topo.slices}, " if topo.slices > 1 else ""
    shown += f"planes {', '.join(planes)} of z=0..{topo.shape[2] - 1}" if len(topo.shape) == 3 else ""
    wrapped = [a for a in topo.axis_names if topo.axis_size(a) > 1 and topo.axis_wraps(a)]
    shown += ("; " if shown else "") + (f"wraparound on {', '.join(wrapped)}" if wrapped else "no wraparound")
    title = alt.Title(f"ICI link utilisation on {topo.name} ({shown})", subtitle=[
        "squares: chips; x+ right of a chip (upper half), x- left of it (lower half); y+ below (left half), "
        "y- above (right half)" + ("; z+ / z- inside the chip (left / right half)" if len(topo.shape) == 3 else ""),
        "the gaps after the last chip of an axis hold its wraparound links, dashed where the axis is a line"])
    chart = grid.facet(facet=alt.Facet("plane:N", sort=planes, title=None), columns=4) if len(planes) > 1 else grid
    others = other_links(result)
    if len(others):
        bars = alt.Chart(others).mark_bar().encode(
            y=alt.Y("link:N", title=None), x=alt.X("utilisation:Q", scale=alt.Scale(domain=[0, 1]),
                                                  axis=alt.Axis(format="%"), title="busy / step"),
            color=color, tooltip=["link", alt.Tooltip("utilisation:Q", format=".1%")]).properties(width=160)
        chart = alt.hconcat(chart, bars)
    return chart.properties(title=title)


def link_bars(result: SimResult) -> alt.Chart:
    """Busy time over the step of each link direction (ICI per axis and sign, DCN, PCIe), with the bytes
    it carried: what a symmetric run has to show, since all links of a direction behave the same."""
    step = result.step_time_s
    rows = []
    for name, st in result.link_stats.items():
        rows.append({"link": name, "utilisation": st["busy_s"] / step if step else 0.0, "bytes": st["bytes"],
                     "label": f"{st['busy_s'] / step:.0%} busy, {st['bytes'] / 1e9:.3g} GB" if step else ""})
    df = pd.DataFrame(rows, columns=["link", "utilisation", "bytes", "label"])
    color = alt.Color("utilisation:Q", scale=alt.Scale(domain=[0, 1], scheme="orangered"), legend=None)
    y = alt.Y("link:N", title=None, sort=list(df.link))
    bars = alt.Chart(df).mark_bar().encode(
        y=y, x=alt.X("utilisation:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"),
                     title="busy / step"), color=color, tooltip=["link", alt.Tooltip("utilisation:Q", format=".1%")])
    text = alt.Chart(df).mark_text(align="left", dx=4).encode(y=y, x=alt.value(4), text="label:N")
    return alt.layer(bars, text).properties(width=480, height=24 * max(1, len(df)), title=alt.Title(
        f"link utilisation on {result.topology.name}",
        subtitle="every chip runs alike, so each direction's links are all this busy (per link, each way)"))


# ---- sweeps ----------------------------------------------------------------------------------------

def book_thresholds(chip, *, fsdp_axes: int = 3, mixed_axes: tuple[int, int] = (2, 1), d_ff: int | None = None,
                    tokens_per_unit: float = 1.0) -> dict[str, float]:
    """The book's compute-bound per-chip token batches (training.md), in units of ``tokens_per_unit``.

    FSDP (or DP) is compute-bound above ``C / (M_X W_ici)`` tokens per chip; FSDP x tensor above
    ``alpha^2 / (M_X M_Y F)`` with ``alpha = C / W_ici`` (``W_ici``: both directions of one axis).

    >>> from tpusim.sim.chips import get_chip
    >>> {k: round(v) for k, v in book_thresholds(get_chip("v5p"), d_ff=32768).items()}
    {'FSDP, 3 axes: C/(3 W_ici)': 850, 'FSDP x TP: alpha^2/(2 F)': 99}
    """
    alpha = chip.bf16_flops_per_s / chip.ici_axis_bytes_per_s
    out = {f"FSDP, {fsdp_axes} axes: C/({fsdp_axes} W_ici)": alpha / fsdp_axes / tokens_per_unit}
    if d_ff:
        mx, my = mixed_axes
        out[f"FSDP x TP: alpha^2/({mx * my} F)"] = alpha ** 2 / (mx * my * d_ff) / tokens_per_unit
    return out


def sweep_chart(df: pd.DataFrame, *, x: str = "per_device_batch_size", series=("strategy",),
                thresholds: Mapping[str, float] | None = None, x_title: str | None = None,
                width: int = 360) -> alt.HConcatChart:
    """MFU and step time against ``x`` (log scale), one line per combination of the ``series`` columns
    (coloured by the first, dashed by the others).

    ``df``: one row per run, the varied keys as columns and the summary's ``mfu`` and ``step_time_s``;
    ``thresholds``: label -> value of ``x`` drawn as vertical rules (e.g. :func:`book_thresholds`).
    """
    series = [series] if isinstance(series, str) else list(series)
    data = df.assign(step_ms=df.step_time_s * 1e3,
                     variant=df[series[1:]].astype(str).agg(" · ".join, axis=1) if len(series) > 1 else "")
    xe = alt.X(f"{x}:Q", scale=alt.Scale(type="log", base=2), title=x_title or x)
    enc = {"color": alt.Color(f"{series[0]}:N"), "tooltip": [*series, x, alt.Tooltip("mfu:Q", format=".1%"),
                                                              alt.Tooltip("step_ms:Q", format=".4~r")]}
    dash = {"strokeDash": alt.StrokeDash("variant:N", title=" · ".join(series[1:]), legend=alt.Legend(
        symbolType="stroke", symbolStrokeColor="#444444", symbolStrokeWidth=2, symbolSize=300))} if len(series) > 1 else {}
    rules = pd.DataFrame({"label": list((thresholds or {}).keys()), x: list((thresholds or {}).values())})

    def panel(y: alt.Y, title: str) -> alt.LayerChart:
        # Lines and points apart, so that the dash legend shows dashes.
        layers = [alt.Chart(data).mark_line().encode(x=xe, y=y, **enc, **dash),
                  alt.Chart(data).mark_circle(size=45, opacity=1).encode(x=xe, y=y, **enc)]
        if len(rules):
            layers.append(alt.Chart(rules).mark_rule(strokeDash=[5, 3], color="#555555").encode(x=f"{x}:Q"))
            layers.append(alt.Chart(rules).mark_text(angle=270, align="right", baseline="bottom", dy=-3, dx=-4,
                                                     fontSize=10, color="#444444").encode(
                x=f"{x}:Q", y=alt.value(0), text="label"))
        return alt.layer(*layers, title=title).properties(width=width, height=260)

    return alt.hconcat(panel(alt.Y("mfu:Q", axis=alt.Axis(format="%"), title="MFU"), "MFU"),
                       panel(alt.Y("step_ms:Q", scale=alt.Scale(type="log"), title="step time (ms)"), "step time"))


# ---- a replayed profile ----------------------------------------------------------------------------

def replay_chart(replay, *, min_measured_s: float = 1e-6, width: int = 520) -> alt.LayerChart:
    """Each replayed op's measured (median) and simulated time, joined by a line (log time axis).

    ``replay``: a :class:`tpusim.analysis.replay.Replay`; ops measured under ``min_measured_s`` are left out.
    """
    ops = replay.ops[replay.ops.measured_s >= min_measured_s].copy()
    ops["op"] = ops.module + " / " + ops.name
    long = ops.melt(id_vars=["op", "category", "rel_error"], value_vars=["measured_s", "simulated_s"],
                    var_name="source", value_name="seconds")
    long["source"] = long.source.str.removesuffix("_s")
    y = alt.Y("op:N", sort=list(ops.op), title=None, axis=alt.Axis(labelLimit=320))
    xs = alt.X("seconds:Q", scale=alt.Scale(type="log"), title="time per run (s)")
    line = alt.Chart().mark_line(color="#999999").encode(x=xs, y=y, detail="op:N")
    dots = alt.Chart().mark_point(filled=True, size=70).encode(
        x=xs, y=y, color=alt.Color("source:N", scale=alt.Scale(domain=["measured", "simulated"],
                                                               range=["#333333", "#f58518"])),
        tooltip=["op", "category", "source", alt.Tooltip("seconds:Q", format=".4~s"),
                 alt.Tooltip("rel_error:Q", format="+.1%")])
    return alt.layer(line, dots, data=long, title="replayed profile, op by op: measured against simulated").properties(
        width=width, height=22 * len(ops))


# ---- export ----------------------------------------------------------------------------------------

def _offline_renderer(spec: dict, **metadata) -> dict:
    """A notebook output both ways: the Vega-Lite spec (JupyterLab draws it with its own bundled Vega,
    interactive, offline) and the chart as SVG by vl-convert (what every other front-end, an HTML export
    or a viewer without network shows). Altair's default HTML output loads Vega from a CDN instead,
    and is blank offline."""
    from altair.utils.mimebundle import spec_to_mimebundle

    svg = spec_to_mimebundle(spec, format="svg", mode="vega-lite")
    return {f"application/vnd.vegalite.v{alt.SCHEMA_VERSION.split('.')[0].lstrip('v')}+json": spec, **svg,
            "text/plain": "<tpusim chart: Vega-Lite / SVG>"}


def offline_charts() -> None:
    """Make altair charts in a notebook show offline: call once in a notebook's first cells."""
    if "tpusim-offline" not in alt.renderers.names():
        alt.renderers.register("tpusim-offline", _offline_renderer)
    alt.renderers.enable("tpusim-offline")


def chart_svg(chart: alt.TopLevelMixin) -> str:
    """The chart as SVG text, rendered without a browser (vl-convert)."""
    buf = io.StringIO()
    chart.save(buf, format="svg")
    return buf.getvalue()


def save_chart(chart: alt.TopLevelMixin, path: str | Path, *, scale: float = 2.0) -> Path:
    """Write ``chart`` as ``.png`` / ``.svg`` (vl-convert, no browser) or ``.html`` (Vega inlined: opens
    offline), whole or not at all. ``scale`` multiplies a PNG's pixels."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "html"):
        raise ValueError(f"{path}: write .png, .svg or .html")
    if fmt == "png":
        buf = io.BytesIO()
        chart.save(buf, format="png", scale_factor=scale)
        data = buf.getvalue()
    elif fmt == "svg":
        data = chart_svg(chart).encode()
    else:
        text = io.StringIO()
        chart.save(text, format="html", inline=True)
        data = text.getvalue().encode()
    write_atomic(path, data)
    return path
