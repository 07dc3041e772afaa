"""``report.html`` for a simulated run: the summary, the step breakdown, one device's timeline and each
link direction's utilisation in one file that opens offline.

The charts are inline SVG drawn by :mod:`tpusim.analysis.svgcharts` (no browser, no scripts, nothing
fetched; no altair or vl-convert either, which took 1.5 s of the command), so the page, under a
megabyte, shows as it is in any browser, online or not; ``trace.json.gz`` beside it holds every op for
Perfetto, ``plugins/profile/`` for XProf. The static timeline has its legend below it, so that the
chart fits the 1,200 px page. The same charts, interactive, are :mod:`tpusim.analysis.plots`'s.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from tpusim.sim.engine import SimResult
from tpusim.analysis.svgcharts import breakdown_svg, link_svg, timeline_svg
from tpusim.analysis.summary import format_summary, summarize
from tpusim.analysis.timeline import write_atomic
from tpusim.units import fmt_bytes, fmt_time

if TYPE_CHECKING:  # no pandas on `run --out`'s path (issue 13); a DataFrame timeline is still accepted
    import pandas as pd

TIMELINE_ROWS = 2500  # bars of the report's timeline: enough to see the step, small enough to stay light

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 2em; }
.sub { color: #666; margin-top: 0; }
table.kv { border-collapse: collapse; margin: 1em 0; }
table.kv td { padding: 0.25em 1.2em 0.25em 0; vertical-align: top; }
table.kv td:first-child { color: #666; }
.big { font-size: 1.35em; font-weight: 600; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 0; overflow-x: auto; } figcaption { color: #666; font-size: 0.9em; margin-top: 0.3em; }
"""


def report_html(result: SimResult, summary: dict | None = None, frame: dict[str, list] | pd.DataFrame | None = None
                ) -> str:
    """The report as one HTML page (inline SVG charts, inline CSS, no script).

    Parameters
    ----------
    result : SimResult
        The simulated step.
    summary : dict, optional
        Its :func:`tpusim.analysis.summary.summarize` (computed when not given).
    frame : dict of lists or DataFrame, optional
        Its timeline: :func:`tpusim.analysis.timeline.timeline_columns` or ``timeline_frame`` (computed
        when not given).
    """
    s = summary if summary is not None else summarize(result)
    device = result.classes[0]["devices"][0]
    title = f"{s['workload']} on {s['topology']}"
    step = s["step_time_s"]
    exposed = ", ".join(f"{k} {fmt_time(v)}" for k, v in s["exposed_comm_by_kind_s"].items()) or "none"
    rows = [
        ("step time", f"<span class=big>{fmt_time(step)}</span>"),
        ("MFU", f"<span class=big>{s['mfu']:.1%}</span>"),
        ("tokens / s", f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else "- (imported HLO)"),
        ("compute", f"{fmt_time(s['compute_s'])} ({s['compute_s'] / step:.0%} of the step)" if step else "-"),
        ("exposed communication", f"{fmt_time(s['exposed_comm_s'])}: {exposed}"),
        ("bottleneck", s["bottleneck"]),
        ("busiest links", ", ".join(f"{d['link']} {d['utilization']:.0%}" for d in s["busiest_links"]) or "-"),
        ("HBM per device", f"{fmt_bytes(s['peak_hbm_bytes_per_device'])} of {fmt_bytes(s['hbm_capacity_bytes'])}"
         if s["peak_hbm_bytes_per_device"] else "- (not modelled for imported HLO)"),
        ("chips", f"{s['chips']} ({s['mode']} costs)"),
    ]
    table = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{v if k in ('step time', 'MFU') else html.escape(v)}</td></tr>"
                      for k, v in rows)
    sections = [
        ("Where the step went", breakdown_svg(s, title),
         ("Compute split by the roofline side that bounds it; exposed communication is the TensorCore waiting "
          "on a collective or copy, charged to the one it waited for; idle is the rest.")),
        (f"Timeline of device {device}", timeline_svg(frame if frame is not None else _frame(result), device,
                                                      max_rows=TIMELINE_ROWS, width=900),
         ("One representative device (devices that run alike are simulated once). Ops too short to see at this "
          "scale are merged; open trace.json.gz beside this file in Perfetto, or this folder with "
          "xprof --logdir, for every op.")),
        ("Links", link_svg(result.link_stats, result.step_time_s, result.topology.name),
         ("Busy time over the step time of each link direction, and the bytes it carried. The engine simulates "
          "one representative link per axis direction (all links of a direction are equally busy), so a heatmap "
          "of the slice would be one colour per direction: each direction is shown once.")),
    ]
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p class=sub>tpusim simulation of one training step, {html.escape(s['mode'])} costs</p>",
            f"<table class=kv>{table}</table>"]
    for heading, chart, caption in sections:
        body.append(f"<h2>{html.escape(heading)}</h2><figure>{chart}"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    body.append(f"<h2>Summary</h2><pre>{html.escape(format_summary(s))}</pre>")
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)} - tpusim</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _frame(result: SimResult) -> dict[str, list]:
    from tpusim.analysis.timeline import timeline_columns

    return timeline_columns(result)


def write_report(path: str | Path, result: SimResult, summary: dict | None = None,
                 frame: dict[str, list] | pd.DataFrame | None = None) -> None:
    """Write :func:`report_html` to ``path``, whole or not at all."""
    write_atomic(Path(path), report_html(result, summary, frame).encode())
