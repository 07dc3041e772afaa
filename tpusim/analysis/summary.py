"""What a person wants from one simulated step: step time, MFU, where the time went, the bottleneck.

Read from the engine's record (plain lists), never from engine internals.

* MFU (MaxText's and the book's): model FLOPs / (chips x peak bf16 FLOP/s x step time).
* compute_s: time the reference device's TensorCore is busy (a ``-done`` op of imported HLO waits,
  so it counts as exposed communication or host transfer, not compute).
* exposed_comm_s: step time minus compute time: the TensorCore waiting on collectives. Each wait
  is charged to the collective it waited for last (the one that ended latest), by kind.
* bottleneck: the largest exposed collective kind when communication exposes more than 10% of the
  step; otherwise the roofline side where the compute time goes (MXU, HBM, VPU).
"""

from __future__ import annotations

from collections import defaultdict

from tpusim.sim.costmodel import bound_by
from tpusim.sim.engine import SimResult
from tpusim.sim.program import Program
from tpusim.sim.topology import Topology
from tpusim.units import fmt_bytes, fmt_time

EXPOSED_THRESHOLD = 0.10


def _nine(x: float) -> float:
    """``x`` to 9 significant digits: figures equal to 9 digits (up to the rounding of their sums, or
    of an extrapolated step) rank as ties, which keep their first order."""
    return float(f"{x:.9g}")


def summarize(result: SimResult) -> dict:
    return summary_of(result.program, result.topology, result.mode, step_totals(result), classes=result.classes,
                      pipeline=pipeline_summary(result) if result.program.stages > 1 else None)


def reference_rows(result: SimResult):
    """The reference device's compute rows in time order, as (op, start, end), and ``waited_for(op)``: the
    index of the collective or copy, among those ``op`` depends on, that ended last (None: none). Exposed
    time is charged to it: the gap before an op, and the whole of a "-done" op (imported HLO), which lasts
    while the TensorCore waits (:func:`step_totals`, :func:`tpusim.analysis.breakdown.exposed_by_op`)."""
    prog, rec = result.program, result.record
    coll_end: dict[int, float] = {}
    for stream, index, end in zip(rec.stream, rec.op_index, rec.end_s):
        if stream == "Async XLA Ops":
            coll_end[index] = end

    def waited_for(op) -> int | None:
        waited = [d for d in op.deps if d in coll_end]
        return max(waited, key=coll_end.__getitem__) if waited else None

    ops = prog.ops
    rows = [(ops[index], start, end) for stream, cls, index, start, end
            in zip(rec.stream, rec.device_class, rec.op_index, rec.start_s, rec.end_s)
            if stream == "XLA Ops" and cls == 0]
    return rows, waited_for


def step_totals(result: SimResult) -> dict:
    """The step's extensive figures, read from the record: what grows by the same amount with every
    layer added (times, FLOPs, bytes, counts), from which :func:`summary_of` derives the rest. Kept
    apart so a step's totals can be extrapolated in its layer count (:mod:`tpusim.explore.periodic`)."""
    prog = result.program
    compute_s = 0.0
    exposed_by: dict[str, float] = defaultdict(float)
    by_bound: dict[str, float] = defaultdict(float)
    bounds: dict[tuple, str] = {}
    rows, waited_for = reference_rows(result)

    def kind(op, default: str) -> str:
        waited = waited_for(op)
        return prog.ops[waited].category if waited is not None else default

    prev_end = 0.0
    for op, start, end in rows:
        gap = start - prev_end
        if gap > 0:
            exposed_by[kind(op, "other")] += gap
        dur = end - start
        if op.category.endswith("-done"):
            # A "-done" op (imported HLO) lasts while the TensorCore waits for its copy or collective:
            # exposed waiting charged to what it waited for, not compute (it has no FLOPs or bytes).
            if dur > 0:
                exposed_by[kind(op, op.category[:-5])] += dur
            prev_end = end
            continue
        compute_s += dur
        if dur > 0:
            key = (op.category, op.flops, op.vpu_flops, op.hbm_bytes, op.mxu_shape, op.mxu_dtype)  # what bound_by reads
            side = bounds.get(key)
            if side is None:  # once per distinct op shape: the layers repeat the same ops
                side = bounds[key] = bound_by(op, result.compute_params)
            by_bound[side] += dur
        prev_end = end
    return {
        "step_time_s": result.step_time_s, "compute_s": compute_s,
        "exposed_by_kind_s": dict(exposed_by), "compute_by_bound_s": dict(by_bound),
        "links": {name: {"busy_s": s["busy_s"], "bytes": s["bytes"]} for name, s in result.link_stats.items()},
        "matmul_flops": sum(op.flops for op in prog.compute_ops),
        "hbm_bytes": sum(op.hbm_bytes for op in prog.compute_ops),
        "flops_per_device": prog.flops_per_device,
        "ops": len(prog.ops), "events": result.events, "sim_wall_s": result.sim_wall_s,
    }


def summary_of(prog: Program, topo: Topology, mode: str, totals: dict, *, classes: list[dict],
               pipeline: dict | None = None) -> dict:
    """The summary from a step's totals (:func:`step_totals`) and what the program says of the whole
    step (model FLOPs, tokens, memory, notes)."""
    step = totals["step_time_s"]
    chips = topo.num_chips
    peak = topo.chip.bf16_flops_per_s
    compute_s, exposed_by, by_bound = totals["compute_s"], totals["exposed_by_kind_s"], totals["compute_by_bound_s"]
    exposed = max(step - compute_s, 0.0)
    mfu = prog.model_flops_per_step / (chips * peak * step) if step > 0 else 0.0
    # Busiest first; links as busy as each other to 9 digits (both directions of a paired link, up to
    # the rounding of their sums) keep the topology's order, however their last digits came out.
    links = sorted(({"link": name, "utilization": s["busy_s"] / step if step else 0.0, "bytes": s["bytes"]}
                    for name, s in totals["links"].items()), key=lambda d: -_nine(d["utilization"]))
    if exposed > EXPOSED_THRESHOLD * step and exposed_by:
        kind = max(exposed_by, key=lambda k: _nine(exposed_by[k]))
        if kind == "collective-permute" and prog.stages > 1:
            bottleneck = "pipeline bubble: stages waiting for each other's activations (collective-permute)"
        elif kind.startswith("copy"):
            bottleneck = "host offload: exposed PCIe copies"
        else:
            axes = sorted({",".join(op.mesh_axes) for op in prog.collective_ops if op.category == kind})
            bottleneck = f"communication: exposed {kind} ({'; '.join(axes)})"
    else:
        side = max(by_bound, key=lambda k: _nine(by_bound[k])) if by_bound else "mxu"
        bottleneck = {"mxu": "compute: MXU", "hbm": "compute: HBM bandwidth", "vpu": "compute: VPU"}[side]
    return {
        "workload": prog.name, "topology": topo.name, "mode": mode,
        "chips": chips, "step_time_s": step, "mfu": mfu,
        "tokens_per_s": prog.tokens_per_step / step if step else 0.0,
        "compute_s": compute_s, "exposed_comm_s": exposed,
        "exposed_comm_by_kind_s": dict(sorted(exposed_by.items(), key=lambda kv: -_nine(kv[1]))),
        "compute_by_bound_s": dict(by_bound),
        "utilization": {"flops": totals["matmul_flops"] / (peak * step) if step else 0.0,
                        "hbm": totals["hbm_bytes"] / (topo.chip.hbm_bytes_per_s * step) if step else 0.0},
        "busiest_links": links[:4],
        "bottleneck": bottleneck,
        "model_flops_per_step": prog.model_flops_per_step, "flops_per_device": totals["flops_per_device"],
        "tokens_per_step": prog.tokens_per_step,
        "peak_hbm_bytes_per_device": prog.memory.total, "hbm_capacity_bytes": prog.hbm_capacity_bytes,
        "memory": prog.memory.as_dict(),
        "device_classes": [{"slowdown": c["slowdown"], "devices": len(c["devices"])} for c in classes],
        "ops": totals["ops"], "events": totals["events"], "sim_wall_s": totals["sim_wall_s"],
        "notes": list(prog.notes),
        **({"pipeline": pipeline} if pipeline is not None else {}),
    }


def pipeline_summary(result: SimResult) -> dict:
    """Each stage's busy time and the bubble the simulation gave it: the stage idle (waiting for a
    permute from its neighbour, or at the ends of the step) over its busy time, the Playbook's
    measure, beside its closed form for the schedule."""
    rec, step = result.record, result.step_time_s
    busy = [0.0] * result.program.stages
    for i, stream in enumerate(rec.stream):
        if stream == "XLA Ops" and rec.device_class[i] >= 0:
            busy[rec.device_class[i]] += rec.end_s[i] - rec.start_s[i]
    bubbles = [(step - b) / b if b > 0 else 0.0 for b in busy]
    return {**result.program.pipeline, "stage_busy_s": busy, "bubble_by_stage": bubbles,
            "bubble": sum(bubbles) / len(bubbles)}


def format_summary(s: dict) -> str:
    """A few lines a person reads at a glance."""
    step = s["step_time_s"]
    rate = (f"{s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"]
            else "(HLO: MFU of every FLOP the program runs, recompute included)")
    lines = [
        f"{s['workload']} on {s['topology']} ({s['chips']} chips, {s['mode']})",
        f"  step time    {fmt_time(step)}    MFU {s['mfu']:.1%}    {rate}",
        f"  compute      {fmt_time(s['compute_s'])} ({s['compute_s'] / step:.0%})    exposed communication "
        f"{fmt_time(s['exposed_comm_s'])} ({s['exposed_comm_s'] / step:.0%})"
        + ("" if not s["exposed_comm_by_kind_s"] else ": " + ", ".join(
            f"{k} {fmt_time(v)}" for k, v in list(s["exposed_comm_by_kind_s"].items())[:3])),
        f"  bottleneck   {s['bottleneck']}",
        "  busiest      " + ("  ".join(f"{d['link']} {d['utilization']:.0%}" for d in s["busiest_links"]) or "-"),
        (f"  HBM          {fmt_bytes(s['peak_hbm_bytes_per_device'])} of {fmt_bytes(s['hbm_capacity_bytes'])} "
         f"({s['peak_hbm_bytes_per_device'] / s['hbm_capacity_bytes']:.0%})") if s["peak_hbm_bytes_per_device"]
        else "  HBM          - (not modelled for imported HLO)",
        f"  simulated    {s['ops']} ops, {s['events']} events"
        + (f" in {s['sim_wall_s']:.2f} s" if "sim_wall_s" in s else ""),
    ]
    if "pipeline" in s:
        pp = s["pipeline"]
        lines.append(f"  pipeline     {pp['stages']} stages, {pp['schedule']}, {pp['microbatches']} microbatches x "
                     f"{pp['repeats']} chunk(s): bubble {pp['bubble']:.1%} simulated (idle / busy, mean of the "
                     f"stages), {pp['bubble_formula']:.1%} by the Playbook's formula")
    lines += [f"  note         {n}" for n in s["notes"]]
    return "\n".join(lines)
