"""Altair charts of serving runs (render them offline with :func:`tpusim.analysis.plots.save_chart` or
:func:`svg`). Each takes library objects or the DataFrames a run returns."""

from __future__ import annotations

import altair as alt
import pandas as pd

from tpusim.serving.compiler import PARTS, StepModel

PART_COLORS = {"weights": "#4c78a8", "kv": "#f58518", "compute": "#54a24b", "collectives": "#e45756"}


def svg(chart: alt.TopLevelMixin):
    """The chart as an inline SVG for a notebook (vl-convert; no Vega from a CDN)."""
    from IPython.display import SVG

    from tpusim.analysis.plots import chart_svg

    return SVG(chart_svg(chart))


def step_time_frame(model: StepModel, batches: list[int], context: int) -> pd.DataFrame:
    """One decode step's time by part, per batch size, every request at ``context`` cached tokens."""
    rows = []
    for b in batches:
        cost = model.cost(b, b * context)
        for part, t in zip(PARTS, cost.parts_s):
            rows.append({"batch": b, "part": part, "time_ms": t * 1e3, "tokens_per_s": b / cost.time_s})
    return pd.DataFrame(rows)


def step_time_chart(df: pd.DataFrame, *, critical_batch: float | None = None, title: str = "") -> alt.Chart:
    """Stacked decode step time against batch: flat while the weights dominate, rising with KV and compute."""
    color = alt.Color("part:N", scale=alt.Scale(domain=list(PART_COLORS), range=list(PART_COLORS.values())),
                      sort=list(PARTS))
    bars = alt.Chart(df).mark_area().encode(
        x=alt.X("batch:Q", title="decode batch (sequences)"), y=alt.Y("time_ms:Q", stack=True, title="step time (ms)"),
        color=color, order=alt.Order("part_order:Q")).transform_calculate(
        part_order=" + ".join(f"(datum.part == '{p}') * {i}" for i, p in enumerate(PARTS)))
    layers = [bars]
    if critical_batch is not None:
        rule = pd.DataFrame({"batch": [critical_batch], "label": [f"book B_crit = {critical_batch:g}"]})
        layers.append(alt.Chart(rule).mark_rule(strokeDash=[4, 3], color="black").encode(x="batch:Q"))
        layers.append(alt.Chart(rule).mark_text(align="left", dx=4, dy=-120).encode(x="batch:Q", text="label:N"))
    return alt.layer(*layers).properties(width=420, height=260, title=title)


def load_curve_chart(df: pd.DataFrame) -> alt.Chart:
    """Throughput against latency as the offered load grows: ``df`` has one row per run with
    ``rate``, ``output_tokens_per_s`` and the latency columns ``ttft_p50_s``, ``tpot_p50_s``, ``tpot_p99_s``."""
    long = df.melt(id_vars=["rate", "output_tokens_per_s", "config"], value_vars=["ttft_p50_s", "tpot_p99_s"],
                   var_name="latency", value_name="seconds")
    base = alt.Chart(long).encode(
        x=alt.X("output_tokens_per_s:Q", title="output tokens/s"),
        y=alt.Y("seconds:Q", scale=alt.Scale(type="log"), title="latency (s, log)"),
        color=alt.Color("config:N"), strokeDash=alt.StrokeDash("latency:N"),
        tooltip=["config", "rate", "latency", "seconds", "output_tokens_per_s"])
    return (base.mark_line(point=True)).properties(width=420, height=260, title="load curve: latency against throughput")


def latency_throughput_chart(rows: pd.DataFrame, by: str = "concurrency") -> alt.HConcatChart:
    """The latency-throughput curve of a serving sweep (``tpusim sweep SERVE.yaml --vary concurrency=...``):
    output tokens/s per chip against TPOT p50 (the batch filling up) and against TTFT p50 (log: the queue
    once the slots are full), one point per ``ok`` row of ``rows`` labelled by ``by``."""
    df = rows[rows["status"] == "ok"].assign(
        tpot_ms=lambda d: d["tpot_s.p50"] * 1e3, ttft_ms=lambda d: d["ttft_s.p50"] * 1e3,
        per_chip=lambda d: d["throughput.output_tokens_per_s_per_chip"])

    def panel(x: str, title: str, scale: alt.Scale) -> alt.LayerChart:
        base = alt.Chart(df).encode(x=alt.X(f"{x}:Q", title=title, scale=scale),
                                    y=alt.Y("per_chip:Q", title="output tokens/s per chip"),
                                    tooltip=[by, "per_chip", "tpot_ms", "ttft_ms", "bottleneck"])
        labels = base.mark_text(align="left", dx=5, dy=-6).encode(text=alt.Text(f"{by}:N"))
        return (base.mark_line(point=True) + labels).properties(width=300, height=240)

    return alt.hconcat(panel("tpot_ms", "TPOT p50 (ms)", alt.Scale(zero=False)),
                       panel("ttft_ms", "TTFT p50 (ms, log)", alt.Scale(type="log"))).properties(
        title=f"latency-throughput curve (labels: {by})")


def requests_chart(req: pd.DataFrame, n: int = 60) -> alt.Chart:
    """The first ``n`` requests as bars: queued (arrival to start), prefill (to the first token), decode."""
    r = req.sort_values("arrival_s").head(n)
    parts = []
    for name, a, b in (("queued", "arrival_s", "start_s"), ("prefill", "start_s", "first_token_s"),
                       ("decode", "first_token_s", "finish_s")):
        parts.append(pd.DataFrame({"request": r.request, "phase": name, "start": r[a], "end": r[b]}))
    df = pd.concat(parts, ignore_index=True)
    return alt.Chart(df).mark_bar().encode(
        x=alt.X("start:Q", title="time (s)"), x2="end:Q", y=alt.Y("request:O", sort=None, axis=None),
        color=alt.Color("phase:N", scale=alt.Scale(domain=["queued", "prefill", "decode"],
                                                   range=["#bab0ac", "#f58518", "#4c78a8"]))
    ).properties(width=420, height=300, title=f"the first {len(r)} requests")
