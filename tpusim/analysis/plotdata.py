"""The data behind tpusim's charts (:mod:`tpusim.analysis.plots`): plain DataFrames a notebook can also use.

* :func:`timeline_rows`: one device's ops as lanes and levels, short ops merged under altair's limit.
* :func:`profile_run`: one run of a real profile's module, in the same rows.
* :func:`breakdown_frame`: the step split into compute (by roofline side), exposed communication, idle.
* :func:`link_cells`, :func:`other_links`: each link's busy time over the step, on the slice's grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tpusim.sim.engine import SimResult
from tpusim.analysis.timeline import columns_of, timeline_columns

if TYPE_CHECKING:  # imported where used: report.html's charts (svgcharts) are drawn without pandas (issue 13)
    import pandas as pd

# Compute in blues and greens, collectives in warm colours, host traffic in yellows, waiting in grey
# (the notebook charts of plots.py and the report's SVG of svgcharts.py).
COLORS = {
    "matmul": "#4c78a8", "attention": "#72b7b2", "elementwise": "#9ecae9", "embedding": "#54a24b",
    "loss": "#88d27a", "optimizer": "#b279a2", "compute: MXU": "#4c78a8", "compute: HBM": "#72b7b2",
    "compute: VPU": "#9ecae9", "all-gather": "#f58518", "reduce-scatter": "#e45756", "all-reduce": "#c03d3e",
    "all-to-all": "#ff9da6", "collective-permute": "#9d755d", "copy-to-host": "#eeca3b",
    # copy-start / copy-done (a real profile's ops) apart from the simulated copies each way
    "copy-from-host": "#d8a200", "copy-start": "#8c6d31", "copy-done": "#bab0ac", "idle": "#dddddd",
    "other": "#dddddd",
}
EXTRA_COLORS = ["#6baed6", "#3182bd", "#a1d99b", "#31a354", "#9e9ac8", "#756bb1", "#fdae6b", "#e6550d"]
MAX_ROWS = 5000  # altair's default limit on the rows of one dataset
MAX_LEVELS = 4  # rows of one lane for overlapping ops
LANES = {"XLA Ops": "compute", "Async XLA Ops": "async: collectives, copies", "ICI x": "link ICI x",
         "ICI y": "link ICI y", "ICI z": "link ICI z", "DCN": "link DCN", "PCIe": "host: PCIe"}


def timeline_rows(frame: SimResult | dict[str, list] | pd.DataFrame, *, device: int | None = None,
                  window: tuple[float, float] | None = None, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """The rows :func:`timeline_chart` draws: one device's ops on the streams of :data:`LANES`.

    Columns ``stream, lane, name, category, start_s, end_s, busy_s, ops``; ops that overlap on a
    stream (concurrent collectives, transfers sharing a link) go to extra rows of its lane, as Perfetto
    draws them (at most :data:`MAX_LEVELS`; the last takes the rest). Beyond ``max_rows``, the ops
    of a stream that start within a time resolution of a bar's start are merged into that bar (the
    resolution doubles until the rows fit): ``busy_s`` sums their durations, ``ops`` counts them, and
    the bar takes the category that held most of its time. Such ops are under a pixel wide at the
    scale of the whole step; a ``window`` shows them one by one.
    """
    import pandas as pd

    bars = timeline_bars(frame, device=device, window=window, max_rows=max_rows)
    return pd.DataFrame({c: pd.Series(v, dtype=_BAR_DTYPES[c]) for c, v in bars.items()})


_BAR_DTYPES = {"stream": "str", "name": "str", "category": "str", "start_s": "float64", "end_s": "float64",
               "busy_s": "float64", "ops": "int64", "lane": "str"}


def timeline_bars(frame: SimResult | dict[str, list] | pd.DataFrame, *, device: int | None = None,
                  window: tuple[float, float] | None = None, max_rows: int = MAX_ROWS) -> dict[str, list]:
    """:func:`timeline_rows` as column lists, in plain Python (``report.html`` draws them: ``run --out``
    imports no pandas)."""
    if isinstance(frame, SimResult):
        reps = [c["devices"][0] for c in frame.classes]
        frame = timeline_columns(frame, all_devices=device is not None and device not in reps)
        device = reps[0] if device is None else device
    cols = columns_of(frame)
    device = int(min(cols["device"])) if device is None else device
    keep = [i for i, (d, s) in enumerate(zip(cols["device"], cols["stream"])) if d == device and s in LANES]
    if not keep:
        raise ValueError(f"no rows for device {device}; the frame has devices {sorted(set(cols['device']))[:8]}")
    if window is not None:
        start, end = cols["start_s"], cols["end_s"]
        keep = [i for i in keep if end[i] >= window[0] and start[i] <= window[1]]
    out = {c: [cols[c][i] for i in keep] for c in ("stream", "name", "category", "start_s", "end_s")}
    out["busy_s"] = [e - s for s, e in zip(out["start_s"], out["end_s"])]
    out["ops"] = [1] * len(keep)
    if len(keep) > max_rows:
        out = _merge_short(out, max_rows)
    out = _take(out, _by_start(out))
    ends: dict[str, list[float]] = {}  # per stream: the end of the last bar on each row of its lane
    lanes = []
    for stream, start, end in zip(out["stream"], out["start_s"], out["end_s"]):
        row_ends = ends.setdefault(stream, [])
        free = next((k for k, e in enumerate(row_ends) if e <= start), None)
        if free is None:
            free = min(len(row_ends), MAX_LEVELS - 1)
            row_ends.extend([0.0] * (free + 1 - len(row_ends)))
        row_ends[free] = max(row_ends[free], end)
        lanes.append(LANES[stream] if free == 0 else f"{LANES[stream]} ({free + 1})")
    out["lane"] = lanes
    return out


def _by_start(rows: dict[str, list]) -> list[int]:
    """Row positions by start, then end; ties in row order (a stable sort)."""
    start, end = rows["start_s"], rows["end_s"]
    return sorted(range(len(start)), key=lambda i: (start[i], end[i]))


def _take(rows: dict[str, list], order: list[int]) -> dict[str, list]:
    return {c: [v[i] for i in order] for c, v in rows.items()}


def _merge_short(rows: dict[str, list], max_rows: int) -> dict[str, list]:
    res = (max(rows["end_s"]) - min(rows["start_s"])) * len(set(rows["stream"])) / max_rows
    rows = _take(rows, _by_start(rows))
    streams: dict[str, list[int]] = {}  # rows of each stream, streams in the order they first start
    for i, stream in enumerate(rows["stream"]):
        streams.setdefault(stream, []).append(i)
    name, category, start, end, busy = (rows[c] for c in ("name", "category", "start_s", "end_s", "busy_s"))
    while True:
        bars: list[dict] = []
        for stream, idx in streams.items():
            bar: dict | None = None
            for i in idx:
                if bar is not None and start[i] - bar["start_s"] < res and start[i] <= bar["end_s"] + res:
                    bar["end_s"] = max(bar["end_s"], end[i])
                    bar["busy_s"] += busy[i]
                    bar["ops"] += 1
                    bar["by"][category[i]] = bar["by"].get(category[i], 0.0) + busy[i]
                else:
                    bar = {"stream": stream, "name": name[i], "start_s": start[i], "end_s": end[i],
                           "busy_s": busy[i], "ops": 1, "by": {category[i]: busy[i]}}
                    bars.append(bar)
        if len(bars) <= max_rows:
            break
        res *= 2
    for b in bars:
        by = b.pop("by")
        b["category"] = max(by, key=by.get)
        if b["ops"] > 1:
            b["name"] = f"{b['ops']} ops from {b['name']}"
    return {c: [b[c] for b in bars] for c in ("stream", "name", "category", "start_s", "end_s", "busy_s", "ops")}


def profile_run(profile, module: str | None = None, *, device: int = 0) -> pd.DataFrame:
    """One run of ``module`` on ``device`` of a real profile, timed from the run's first op.

    ``module`` defaults to the one with the most time on the device (the step, as :mod:`tpusim.analysis.compare`
    picks it); the run is its first.
    """
    t = profile.timeline[profile.timeline.device == device]
    mods = t[t.stream == "XLA Modules"]
    if mods.empty:
        raise ValueError(f"{profile.source}: no XLA Modules on device {device}")
    if module is None:
        module = str((mods.end_s - mods.start_s).groupby(mods.module).sum().idxmax())
    first = mods[mods.module == module].run_id.min()
    rows = t[(t.module == module) & (t.run_id == first)]
    t0 = rows.start_s.min()
    return rows.assign(start_s=rows.start_s - t0, end_s=rows.end_s - t0)


def breakdown_frame(run: SimResult | dict) -> pd.DataFrame:
    """Where one step went, in parts that add up to the step time: ``part, seconds, fraction``.

    Compute by the roofline side that bounds it (``compute: MXU``, ``HBM``, ``VPU``), exposed
    communication by the collective kind waited for (as :func:`tpusim.analysis.summary.summarize` charges it),
    and ``idle``: the rest of the step. ``attrs`` holds the workload, topology, step time and MFU.
    """
    import pandas as pd

    from tpusim.analysis.summary import summarize

    s = summarize(run) if isinstance(run, SimResult) else run
    parts = breakdown_parts(s)
    step = s["step_time_s"]
    f = pd.DataFrame({"part": list(parts), "seconds": list(parts.values())})
    f["fraction"] = f.seconds / step if step else 0.0
    f.attrs.update({k: s[k] for k in ("workload", "topology", "step_time_s", "mfu")})
    return f


def breakdown_parts(summary: dict) -> dict[str, float]:
    """:func:`breakdown_frame`'s parts and their seconds, from a summary (:func:`tpusim.analysis.summary.summarize`)."""
    s = summary
    step = s["step_time_s"]
    by_bound = s["compute_by_bound_s"]
    parts = {f"compute: {k.upper()}": by_bound[k] for k in ("mxu", "hbm", "vpu") if by_bound.get(k, 0) > 0}
    rest = s["compute_s"] - sum(parts.values())
    if rest > 1e-9 * step:
        parts["compute: other"] = rest
    parts.update({k: v for k, v in s["exposed_comm_by_kind_s"].items() if k != "other" and v > 0})
    parts["idle"] = max(step - s["compute_s"] - sum(v for k, v in parts.items() if not k.startswith("compute")), 0.0)
    return parts


def link_cells(result: SimResult, *, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """The rectangles of :func:`link_heatmap`, one per chip and per link direction of slice 0.

    Columns ``plane, chip, coords, kind`` (``chip``, ``link``, ``no link``: a wraparound a line axis
    lacks), ``link`` (``x+`` ...), ``to``, ``x0, x1, y0, y1`` (chip pitch 1), ``utilisation``, ``busy_s``,
    ``bytes``. The engine simulates each axis direction as one representative chip's link (the busiest:
    on a line axis the end links carry less), so every link of a direction holds that link's busy time
    over the step. 3D slices show the z planes that fit in ``max_rows`` rows (the last plane always).
    """
    import numpy as np
    import pandas as pd

    topo, step = result.topology, result.step_time_s
    rank = len(topo.shape)
    shape = tuple(topo.shape) + (1,) * (3 - rank)
    wraps = tuple(topo.wraparound) + (False,) * (3 - rank)
    per_chip = sum(2 for n in shape if n > 1) + 1
    n_planes = max(1, min(shape[2], max_rows // max(1, shape[0] * shape[1] * per_chip)))
    planes = list(range(n_planes - 1)) + [shape[2] - 1] if n_planes < shape[2] else list(range(shape[2]))
    s, h = 0.5, 0.25  # chip square side and half of it, in chip pitches
    rows = []
    for z in planes:
        for cx in range(shape[0]):
            for cy in range(shape[1]):
                c = (cx, cy, z)
                coords = "(" + ", ".join(map(str, c[:rank])) + ")"
                chip = topo.chip_id(0, c[:rank])
                base = {"plane": f"z={z}" if rank == 3 else "slice 0", "chip": chip, "coords": coords}
                rows.append({**base, "kind": "chip", "x0": cx, "x1": cx + s, "y0": cy, "y1": cy + s})
                for a, axis in enumerate("xyz"):
                    if shape[a] == 1:
                        continue
                    for sign, step_ in (("+", 1), ("-", -1)):
                        nb = c[a] + step_
                        exists = 0 <= nb < shape[a] or wraps[a]
                        to = list(c[:rank])
                        to[a] = nb % shape[a]
                        g = (c[a] - 1) % shape[a]  # a minus link sits in the gap before its chip
                        box = {("x", "+"): (cx + s, cx + 1, cy, cy + h), ("x", "-"): (g + s, g + 1, cy + h, cy + s),
                               ("y", "+"): (cx, cx + h, cy + s, cy + 1), ("y", "-"): (cx + h, cx + s, g + s, g + 1),
                               ("z", "+"): (cx, cx + h, cy, cy + s), ("z", "-"): (cx + h, cx + s, cy, cy + s)}
                        st = result.link_stats.get(f"ICI {axis}{sign}", {"busy_s": 0.0, "bytes": 0.0})
                        rows.append({**base, "kind": "link" if exists else "no link", "link": f"{axis}{sign}",
                                     "to": "(" + ", ".join(map(str, to)) + ")" if exists else "none (line axis)",
                                     **dict(zip(("x0", "x1", "y0", "y1"), box[axis, sign])),
                                     "utilisation": st["busy_s"] / step if exists and step else np.nan,
                                     "busy_s": st["busy_s"] if exists else np.nan,
                                     "bytes": st["bytes"] if exists else np.nan})
    return pd.DataFrame(rows)


def other_links(result: SimResult) -> pd.DataFrame:
    """The links that are not ICI (DCN, PCIe each way): ``link, utilisation, busy_s, bytes``."""
    import pandas as pd

    step = result.step_time_s
    return pd.DataFrame([{"link": name, "utilisation": st["busy_s"] / step if step else 0.0, "busy_s": st["busy_s"],
                          "bytes": st["bytes"]} for name, st in result.link_stats.items() if not name.startswith("ICI")],
                        columns=["link", "utilisation", "busy_s", "bytes"])


# ---- timeline --------------------------------------------------------------------------------------
