"""Pipeline parallelism in ``tpusim search``: a pipelined plan's settings and memory, and the verdict
on when pipelining wins or loses (see :mod:`tpusim.explore.search`)."""

from __future__ import annotations

import json
from collections.abc import Callable

MICROBATCHES_PER_STAGE = (4, 2, 1)  # pipelined plans: the most microbatches (x stages) the batch splits into


def pipelined_plan(base: dict, source: str, ov: dict, mesh, sh, topo, p: int):
    """A pipelined plan's overrides (MaxText's GPipe, one chunk per stage, the most microbatches of
    ``MICROBATCHES_PER_STAGE`` x p that split the batch) and its worst stage's memory."""
    from tpusim.compiler import pipeline_memory
    from tpusim.model.workload import workload_from_dict

    for k in MICROBATCHES_PER_STAGE:
        m = k * p
        if sh.seqs % m == 0:
            break
    ov = {**ov, "num_pipeline_microbatches": m, "num_pipeline_repeats": 1, "pipeline_schedule": "gpipe"}
    w = workload_from_dict(base, source=source, overrides=ov)
    mems = pipeline_memory(w, mesh, sh, topo.num_chips)[-1]
    return max(mems, key=lambda mem: mem.total), m, ov


def pipeline_verdict(ok: list[dict], candidates: dict, mesh_name: Callable[[dict], str]) -> str:
    """When pipelining wins or loses here: the best simulated plan with stages against the best without."""
    staged = [r for r in ok if candidates[r["config"]]["stages"] > 1]
    flat = [r for r in ok if candidates[r["config"]]["stages"] == 1]
    if not staged or not flat:
        return "no pipelined plan fits or places here" if not staged else "only pipelined plans fit here"
    p, f = staged[0], flat[0]  # (ok is sorted by the objective)
    pp = json.loads(p["pipeline"]) if isinstance(p["pipeline"], str) else p["pipeline"]
    ov_p, ov_f = candidates[p["config"]]["overrides"], candidates[f["config"]]["overrides"]
    exposed = json.loads(f["exposed_comm_by_kind_s"])
    kinds = ", ".join(f"{k} {v / f['step_time_s']:.0%}" for k, v in list(exposed.items())[:2]) or "none"
    head = (f"pipelined {mesh_name(ov_p)}: MFU {p['mfu']:.1%}, against {mesh_name(ov_f)}: MFU {f['mfu']:.1%}; ")
    if p["mfu"] > f["mfu"]:
        return (head + f"pipelining wins: the stages send only a microbatch's activations over "
                f"{pp['over'].upper()}, where the best unpipelined plan exposes "
                f"{f['exposed_comm_s'] / f['step_time_s']:.0%} of its step in communication ({kinds}); that outweighs "
                f"the bubble ({pp['bubble']:.0%} of busy time simulated, (p-1)/m = {pp['bubble_formula']:.0%})")
    return (head + f"pipelining loses: its bubble idles the stages {pp['bubble']:.0%} of their busy time "
            f"((p-1)/m = {pp['bubble_formula']:.0%}), more than the best unpipelined plan loses to exposed "
            f"communication ({f['exposed_comm_s'] / f['step_time_s']:.0%} of its step: {kinds})")
