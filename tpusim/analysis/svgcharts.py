"""The run report's three charts as static SVG, drawn here: no altair, no vl-convert (issue 13).

``tpusim run --out`` spent about 1.5 s of its 3 s on the report: importing altair (0.3-0.45 s),
building the charts (0.2 s) and rendering them with vl-convert, whose first call starts a JavaScript
runtime (~1 s). These three charts are simple (stacked bars, a Gantt chart, bars), so they are drawn
directly, from the same data as the notebook charts of :mod:`tpusim.analysis.plots`
(:func:`~tpusim.analysis.plotdata.timeline_rows`, :func:`~tpusim.analysis.plotdata.breakdown_frame`)
with the same colours. The notebook charts (interactive, any export format) stay altair.

Deterministic: every number is printed with a fixed precision, so a run gives the same bytes.
"""

from __future__ import annotations

import math
from html import escape

from tpusim.analysis.plotdata import COLORS, EXTRA_COLORS, LANES, MAX_LEVELS, breakdown_parts, timeline_bars

FONT = 'font-family="sans-serif" font-size="11"'
LABEL_PX = 7  # width of a label character, roughly, at 11 px (to size the label column)
# Vega's "orangered" scheme (ColorBrewer OrRd, 9 classes), interpolated linearly: busy links are dark red.
ORANGERED = ("#fff7ec", "#fee8c8", "#fdd49e", "#fdbb84", "#fc8d59", "#ef6548", "#d7301f", "#b30000", "#7f0000")


def _n(x: float) -> str:
    """A coordinate: two decimals, no trailing zeros (fixed, so the bytes are too)."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def _colors(categories) -> dict[str, str]:
    """A colour per category: the fixed ones, then a palette for the rest (as plots._color_scale)."""
    known = list(COLORS)
    domain = sorted(dict.fromkeys(categories), key=lambda c: known.index(c) if c in known else len(known))
    extra = iter(EXTRA_COLORS * (1 + len(domain) // len(EXTRA_COLORS)))
    return {c: COLORS.get(c) or next(extra) for c in domain}


def orangered(u: float) -> str:
    """The colour of a utilisation ``u`` in [0, 1]."""
    u = min(max(u, 0.0), 1.0) * (len(ORANGERED) - 1)
    i = min(int(u), len(ORANGERED) - 2)
    a, b = ORANGERED[i], ORANGERED[i + 1]
    mix = [round(int(a[k:k + 2], 16) + (int(b[k:k + 2], 16) - int(a[k:k + 2], 16)) * (u - i)) for k in (1, 3, 5)]
    return "#" + "".join(f"{v:02x}" for v in mix)


def ticks(hi: float, count: int = 8) -> list[float]:
    """Round tick values from 0 to ``hi``: steps of 1, 2 or 5 times a power of ten."""
    if hi <= 0:
        return [0.0]
    raw = hi / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [k * step for k in range(int(hi / step + 1e-9) + 1)]


def _tick_text(v: float, pct: bool = False) -> str:
    return f"{v:.0%}" if pct else f"{v:.6g}"


class _Svg:
    """An SVG document built as lines."""

    def __init__(self):
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def rect(self, x, y, w, h, fill, extra: str = "", title: str = "") -> None:
        head = f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(max(w, 0.0))}" height="{_n(h)}" fill="{fill}"{extra}'
        self.add(f"{head}><title>{escape(title)}</title></rect>" if title else f"{head}/>")

    def text(self, x, y, s: str, anchor: str = "start", extra: str = "") -> None:
        self.add(f'<text x="{_n(x)}" y="{_n(y)}" text-anchor="{anchor}"{extra}>{escape(s)}</text>')

    def line(self, x1, y1, x2, y2, color: str = "#888") -> None:
        self.add(f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" stroke="{color}"/>')

    def x_axis(self, x0: float, y: float, width: float, hi: float, title: str, pct: bool = False) -> None:
        """A bottom axis from 0 to ``hi`` over ``width`` pixels, with its grid going up to the plot's top."""
        self.line(x0, y, x0 + width, y)
        for v in ticks(hi, 5 if pct else 8):
            x = x0 + width * v / hi if hi else x0
            self.line(x, y, x, y + 4)
            self.text(x, y + 15, _tick_text(v, pct), "middle")
        self.text(x0 + width / 2, y + 30, title, "middle", ' font-weight="bold"')

    def legend(self, x0: float, y0: float, items: dict[str, str], columns: int, col_px: float) -> float:
        """Swatches in ``columns`` columns; returns the height used."""
        for k, (name, color) in enumerate(items.items()):
            x, y = x0 + (k % columns) * col_px, y0 + (k // columns) * 16
            self.rect(x, y, 10, 10, color)
            self.text(x + 14, y + 9, name)
        return 16 * math.ceil(len(items) / columns)

    def done(self, width: float, height: float, title: str, subtitle: str = "") -> str:
        head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{math.ceil(width)}" height="{math.ceil(height)}" '
                f'viewBox="0 0 {math.ceil(width)} {math.ceil(height)}" {FONT}>',
                '<rect width="100%" height="100%" fill="white"/>',
                f'<text x="0" y="14" font-size="13" font-weight="bold">{escape(title)}</text>']
        if subtitle:
            head.append(f'<text x="0" y="30" fill="#666">{escape(subtitle)}</text>')
        return "\n".join(head + self.parts + ["</svg>"])


def breakdown_svg(summary: dict, label: str, *, width: int = 700) -> str:
    """One stacked bar of where the step went (seconds), labelled with the step time and MFU."""
    import numpy as np  # the sum of the parts as pandas summed them (numpy's pairwise sum), so the same bars

    parts = breakdown_parts(summary)
    colors = _colors(parts)
    left = min(300, LABEL_PX * len(label) + 10)
    top, bar_h = 30, 20
    end = float(np.sum(np.array(list(parts.values()), dtype=float)))
    hi = 1.3 * end if end > 0 else 1.0  # room for the label after the bar
    svg = _Svg()
    svg.text(left - 6, top + bar_h / 2 + 4, label, "end")
    x = 0.0
    for part, seconds in parts.items():
        w = width * seconds / hi
        svg.rect(left + x, top, w, bar_h, colors[part], title=f"{part}: {seconds:.4g} s")
        x += w
    step, mfu = summary["step_time_s"], summary["mfu"]
    step_text = f"step {step * 1e3:.3g} ms" if step < 1 else f"step {step:.3g} s"
    svg.text(left + x + 4, top + bar_h / 2 + 4, f"{step_text}, MFU {mfu:.1%}")
    svg.x_axis(left, top + bar_h + 6, width, hi, "seconds of the step")
    legend_y = top + bar_h + 50
    svg.text(left, legend_y, "time spent", extra=' font-weight="bold"')
    h = svg.legend(left, legend_y + 8, colors, 4, width / 4)
    return svg.done(left + width + 20, legend_y + 8 + h + 4,
                    "step breakdown: compute, exposed communication, idle")


def timeline_svg(frame, device: int, *, max_rows: int, width: int = 900) -> str:
    """One device's streams over the step as a Gantt chart, the legend below it. ``frame``: the timeline
    (:func:`tpusim.analysis.timeline.timeline_columns` or its DataFrame)."""
    rows = timeline_bars(frame, device=device, max_rows=max_rows)
    order = [f"{lane}{n}" for lane in LANES.values() for n in ["", *(f" ({k})" for k in range(2, MAX_LEVELS + 1))]]
    present = set(rows["lane"])
    lanes = [lane for lane in order if lane in present]
    hi = max(rows["end_s"]) if rows["end_s"] else 1.0
    unit, k = ("ms", 1e3) if hi < 2.0 else ("s", 1.0)
    colors = _colors(rows["category"])
    left = LABEL_PX * max(len(lane) for lane in lanes) + 10
    top, lane_h = 24, 24
    svg = _Svg()
    y_of = {lane: top + i * lane_h for i, lane in enumerate(lanes)}
    for lane, y in y_of.items():
        svg.text(left - 6, y + lane_h / 2 + 4, lane, "end")
    edge = ' stroke="white" stroke-width="0.5"' if len(rows["lane"]) <= 600 else ""
    scale = width / hi if hi > 0 else 0.0
    for lane, cat, start, end in zip(rows["lane"], rows["category"], rows["start_s"], rows["end_s"]):
        x0, x1 = left + min(start, hi) * scale, left + min(end, hi) * scale
        svg.rect(x0, y_of[lane] + 2, x1 - x0, lane_h - 4, colors[cat], edge)
    plot_h = lane_h * len(lanes)
    svg.x_axis(left, top + plot_h, width, hi * k, f"time ({unit})")
    legend_y = top + plot_h + 48
    svg.text(left, legend_y, "category", extra=' font-weight="bold"')
    h = svg.legend(left, legend_y + 8, colors, 6, width / 6)
    return svg.done(left + width + 20, legend_y + 8 + h + 4, "timeline of one device (simulated)")


def link_svg(link_stats: dict[str, dict], step_s: float, topology: str, *, width: int = 480) -> str:
    """Busy time over the step of each link direction, with the bytes it carried."""
    names = list(link_stats)
    left = LABEL_PX * max((len(n) for n in names), default=4) + 10
    top, bar_h = 42, 24
    svg = _Svg()
    for i, name in enumerate(names):
        st = link_stats[name]
        u = st["busy_s"] / step_s if step_s else 0.0
        y = top + i * bar_h
        svg.text(left - 6, y + bar_h / 2 + 4, name, "end")
        svg.rect(left, y + 2, width * min(u, 1.0), bar_h - 4, orangered(u), title=f"{name}: {u:.1%}")
        if step_s:
            svg.text(left + 4, y + bar_h / 2 + 4, f"{u:.0%} busy, {st['bytes'] / 1e9:.3g} GB")
    plot_h = bar_h * max(1, len(names))
    svg.x_axis(left, top + plot_h, width, 1.0, "busy / step", pct=True)
    return svg.done(left + width + 20, top + plot_h + 40, f"link utilisation on {topology}",
                    "every chip runs alike, so each direction's links are all this busy (per link, each way)")
