"""Where a simulated step's time goes, per op kind, next to the datasheet roofline.

``python -m tpusim.analysis.breakdown [WORKLOAD.yaml ...]`` (default: the published runs in
``workloads/measured/`` and the AOT cases in ``traces/xla_aot_chips/``) prints one Markdown row per
run: the step, its compute split into MXU-bound matmuls, attention kernels, VPU-bound and HBM-bound
vector work, the exposed collectives by kind, and the datasheet roofline (the step's FLOPs at peak
MXU rate), so that the gap between the two is accounted for op kind by op kind.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from tpusim.api import workload_and_topology
from tpusim.compiler import compile_program
from tpusim.sim.costmodel import bound_by
from tpusim.data import data_dir
from tpusim.sim.engine import simulate
from tpusim.analysis.summary import reference_rows, summarize

COLUMNS = ("MXU matmuls", "attention", "VPU-bound", "HBM-bound")


def breakdown(path: str | Path, mode: str = "calibrated") -> dict:
    """Seconds per op kind on the reference device, the exposed collectives and the roofline."""
    w, topo = workload_and_topology(path)[:2]
    prog = compile_program(w, topo, check_memory=False)  # as validate: these ran, whatever we estimate
    result = simulate(prog, topo, mode=mode)
    s = summarize(result)
    rec = result.record
    by: dict[str, float] = defaultdict(float)
    for i, stream in enumerate(rec.stream):
        if stream != "XLA Ops" or rec.device_class[i] != 0:
            continue
        op = prog.ops[rec.op_index[i]]
        dur = rec.end_s[i] - rec.start_s[i]
        if op.category == "attention":
            by["attention"] += dur
        else:
            side = bound_by(op, result.compute_params)
            by[{"mxu": "MXU matmuls", "vpu": "VPU-bound", "hbm": "HBM-bound"}[side]] += dur
    return {"run": prog.name, "topology": topo.name, "step_s": s["step_time_s"], **{c: by[c] for c in COLUMNS},
            "exposed": s["exposed_comm_by_kind_s"], "roofline_s": prog.flops_per_device / topo.chip.bf16_flops_per_s}


def exposed_by_op(result) -> tuple[dict[int, float], float]:
    """Exposed seconds per collective op index on the reference device, charged as
    :func:`tpusim.analysis.summary.step_totals` charges them (:func:`~tpusim.analysis.summary.reference_rows`;
    -1 when an op waited for none), and that device's compute seconds."""
    exposed: dict[int, float] = defaultdict(float)
    compute = prev_end = 0.0
    rows, waited_for = reference_rows(result)
    for op, start, end in rows:
        waited = waited_for(op)
        last = -1 if waited is None else waited
        if start - prev_end > 0:
            exposed[last] += start - prev_end
        if op.category.endswith("-done"):
            exposed[last] += end - start
        else:
            compute += end - start
        prev_end = end
    return dict(exposed), compute


def collective_spans(result) -> dict[int, tuple[float, float]]:
    """Each collective's first start and last end on the timeline's async stream (its busy span), by op index."""
    spans: dict[int, list[float]] = {}
    rec = result.record
    for stream, index, start, end in zip(rec.stream, rec.op_index, rec.start_s, rec.end_s):
        if stream == "Async XLA Ops":
            s = spans.setdefault(index, [start, end])
            s[0], s[1] = min(s[0], start), max(s[1], end)
    return {i: (a, b) for i, (a, b) in spans.items()}


def default_paths() -> list[Path]:
    measured = sorted(p for p in (data_dir("workloads") / "measured").glob("*.yaml") if p.name != "measured.yaml")
    root = Path(__file__).resolve().parents[2] / "traces" / "xla_aot_chips"
    return measured + sorted(root.glob("*/*_L2/config.yaml"))


def table(paths, mode: str = "calibrated") -> str:
    head = ["run", "slice", "step (s)", *COLUMNS, "exposed collectives", "roofline (s)", "step / roofline"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | " + " | ".join(["---:"] * (len(head) - 2)) + " |"]
    for p in paths:
        b = breakdown(p, mode)
        step = b["step_s"]

        def pct(x: float) -> str:
            return f"{x / step:.0%}" if step else "-"

        exposed = ", ".join(f"{k} {pct(v)}" for k, v in b["exposed"].items() if v > 0.005 * step) or "-"
        name = Path(p).parent.name + "/" + Path(p).stem if Path(p).name == "config.yaml" else b["run"]
        lines.append(f"| {name} | {b['topology']} | {step:.4g} | " + " | ".join(pct(b[c]) for c in COLUMNS)
                     + f" | {exposed} | {b['roofline_s']:.4g} | {step / b['roofline_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    mode = "calibrated"
    if args[:1] == ["--datasheet"]:
        mode, args = "datasheet", args[1:]
    print(table([Path(a) for a in args] or default_paths(), mode))


if __name__ == "__main__":
    main()
