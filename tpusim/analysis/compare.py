"""A simulated run against a real profile: step time, time by category, op by op where names match,
and both timelines in one Chrome trace (the simulation above, the profile's device 0 below)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from tpusim.errors import TpusimError
from tpusim.analysis.profiles import Profile

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Below this fraction of the profile's op names found in the simulation, the two are different programs
# (a simulation of the profile's own HLO matches them all; a workload's names match none).
MIN_MATCHED = 0.5


def coarse_category(category: str) -> str:
    """compute, one of the collective kinds, or host transfers."""
    c = (category or "").replace("all-reduce-scatter", "reduce-scatter")
    if c.startswith("copy") or "host" in c:
        return "host transfers"
    for k in KINDS:
        if k in c:
            return k
    return "compute"


RUN_COLUMNS = {"device": "integer", "stream": "string", "name": "string", "category": "string",
               "start_s": "number", "end_s": "number"}  # what compare reads of timeline.parquet


def load_run(run_dir: str | Path) -> tuple[dict, pd.DataFrame]:
    """``summary.json`` and ``timeline.parquet`` of a run folder (``tpusim run --out``), each checked:
    a missing or unreadable file, a summary without a positive step time, or a timeline without the
    columns compare reads (or with no rows) is a TpusimError naming the folder and the file."""
    from tpusim.runfolder import check_run_folder
    from tpusim.safeio import check_regular, read_input

    run_dir = check_run_folder(run_dir)  # complete: tpusim run --out wrote its manifest last
    src = str(run_dir)
    for name in ("summary.json", "timeline.parquet"):
        if not (run_dir / name).exists():
            raise TpusimError(f"not a run folder ({name} missing; write one with tpusim run --out)", source=src)
        check_regular(run_dir / name)
    try:
        summary = json.loads(read_input(run_dir / "summary.json"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TpusimError(f"summary.json is not JSON ({e.__class__.__name__})", source=src) from None
    step = summary.get("step_time_s") if isinstance(summary, dict) else None
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < float("inf"):
        raise TpusimError(f"summary.json has no positive step_time_s (got {step!r})", source=src)
    if not isinstance(summary.get("exposed_comm_by_kind_s", {}), dict):
        raise TpusimError("summary.json: exposed_comm_by_kind_s is not a mapping", source=src)
    try:
        timeline = pd.read_parquet(io.BytesIO(read_input(run_dir / "timeline.parquet", decompress=False)))
    except (ValueError, OSError, TypeError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise TpusimError(f"timeline.parquet does not read ({e.__class__.__name__})", source=src) from None
    kinds = {"integer": pd.api.types.is_integer_dtype, "number": pd.api.types.is_numeric_dtype,
             "string": lambda s: pd.api.types.is_string_dtype(s) or pd.api.types.is_object_dtype(s)}
    for col, kind in RUN_COLUMNS.items():
        if col not in timeline.columns or not kinds[kind](timeline[col]):
            raise TpusimError(f"timeline.parquet has no {kind} column {col!r} (columns: "
                              f"{', '.join(map(str, timeline.columns))[:200]})", source=src)
    if timeline.empty:
        raise TpusimError("timeline.parquet has no rows", source=src)
    return summary, timeline


def _profile_step(profile: Profile) -> tuple[str, pd.DataFrame, float]:
    """The module with the most time on device 0, its ops during its first run, and its median run time."""
    t = profile.timeline
    mods = t[(t.device == 0) & (t.stream == "XLA Modules")]
    if mods.empty:
        raise TpusimError("the profile has no XLA Modules on device 0", source=profile.source)
    dur = (mods.end_s - mods.start_s).groupby(mods.module).sum()
    module = str(dur.idxmax())
    runs = mods[mods.module == module].sort_values("host_start_s")
    first = runs.iloc[0]
    ops = t[(t.device == 0) & (t.stream == "XLA Ops") & (t.host_start_s >= first.host_start_s)
            & (t.host_start_s <= first.host_end_s)]
    return module, ops, float(np.median(runs.end_s - runs.start_s))


def compare(summary: dict, timeline: pd.DataFrame, profile: Profile) -> dict:
    module, real_ops, real_step = _profile_step(profile)
    dev = int(timeline.device.min())
    sim = timeline[timeline.device == dev]
    sim_ops = sim[sim.stream == "XLA Ops"]
    sim_async = sim[sim.stream == "Async XLA Ops"]
    real_by = (real_ops.end_s - real_ops.start_s).groupby(real_ops.category.map(coarse_category)).sum()
    sim_by = (sim_ops.end_s - sim_ops.start_s).groupby(sim_ops.category.map(coarse_category)).sum()
    # Both sides count what the TensorCore's row shows: its ops, and the time it waits on collectives
    # and copies (a profile's "-done" and synchronous collectives; a simulation of imported HLO has the
    # same "-done" ops, one of a compiled workload has the summary's exposed time by kind instead).
    exposed = {}
    for kind, secs in summary.get("exposed_comm_by_kind_s", {}).items():
        exposed[coarse_category(kind)] = exposed.get(coarse_category(kind), 0.0) + secs
    cats = sorted(set(real_by.index) | set(sim_by.index) | set(exposed))
    categories = [{"category": c, "measured_s": float(real_by.get(c, 0.0)),
                   "simulated_s": float(sim_by[c] if c in sim_by.index and (c == "compute" or sim_by[c] > 0)
                                        else exposed.get(c, 0.0))}
                  for c in cats]
    real_med = (real_ops.end_s - real_ops.start_s).groupby(real_ops.name).median()
    sim_dur = pd.concat([sim_ops, sim_async]).assign(d=lambda f: f.end_s - f.start_s).groupby("name").d.sum()
    common = sorted(set(real_med.index) & set(sim_dur.index))
    ops = [{"name": n, "measured_s": float(real_med[n]), "simulated_s": float(sim_dur[n]),
            "rel_error": float(sim_dur[n] / real_med[n] - 1) if real_med[n] > 0 else None} for n in common]
    real_busy = float(real_by.get("compute", 0.0))
    real_names = set(real_med.index)
    warning = None
    if len(ops) < MIN_MATCHED * len(real_names):
        warning = (f"different programs: only {len(ops)} of the {len(real_names)} op names of {module} are in the "
                   f"simulation of {summary.get('workload')}; step time and categories compare two different programs")
    return {
        "profile": profile.source, "module": module, "workload": summary.get("workload"),
        "step_time_s": {"measured": real_step, "simulated": summary["step_time_s"],
                        "rel_error": summary["step_time_s"] / real_step - 1 if real_step else None},
        "compute_s": {"measured": real_busy, "simulated": summary.get("compute_s")},
        "exposed_comm_s": {"measured": max(real_step - real_busy, 0.0), "simulated": summary.get("exposed_comm_s")},
        "categories": categories, "ops": ops, "ops_matched": len(ops), "profile_ops": len(real_names),
        "warning": warning,
    }


def merged_trace(sim_trace: dict, profile: Profile, module_ops: pd.DataFrame) -> dict:
    """The simulated trace (pids as they are) plus the profile's device 0 ops as one more process
    (whole nanoseconds, overlapping ops on extra rows: see :mod:`tpusim.analysis.lanes`)."""
    from tpusim.analysis.lanes import assign_lanes, lane_name, to_ns

    events = list(sim_trace["traceEvents"])
    pid = 1 + max([e["pid"] for e in events if isinstance(e.get("pid"), int)] + [0])
    events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": f"measured: {profile.source}"}})
    t0 = module_ops.start_s.min() if len(module_ops) else 0.0
    start, end = to_ns(module_ops.start_s - t0).tolist(), to_ns(module_ops.end_s - t0).tolist()
    lanes = assign_lanes(start, end)
    for k in range(max(lanes, default=0) + 1):
        events.append({"ph": "M", "pid": pid, "tid": k + 1, "name": "thread_name",
                       "args": {"name": lane_name("XLA Ops", k)}})
    for i, r in enumerate(module_ops.itertuples(index=False)):
        events.append({"ph": "X", "pid": pid, "tid": lanes[i] + 1, "name": r.name, "ts": start[i] / 1000,
                       "dur": (end[i] - start[i]) / 1000, "args": {"category": r.category}})
    return {"displayTimeUnit": "ns", "traceEvents": events}


def write_merged_trace(run_dir: str | Path, profile: Profile, out: str | Path) -> None:
    from tpusim.analysis.timeline import write_atomic

    from tpusim.safeio import read_input

    run_dir = Path(run_dir)
    try:
        sim_trace = json.loads(read_input(run_dir / "trace.json.gz", source=f"{run_dir}: trace.json.gz"))
    except (ValueError, RecursionError) as e:
        raise TpusimError(f"cannot read trace.json.gz: {e.__class__.__name__}", source=str(run_dir)) from None
    events = sim_trace.get("traceEvents") if isinstance(sim_trace, dict) else None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise TpusimError("trace.json.gz is not a trace (no list of traceEvents)", source=str(run_dir))
    _, ops, _ = _profile_step(profile)
    text = json.dumps(merged_trace(sim_trace, profile, ops), separators=(",", ":")).encode()
    try:
        write_atomic(Path(out), gzip.compress(text, mtime=0))
    except OSError as e:  # checked before the work (cli), but the disk can still fill up or vanish
        from tpusim.safeio import os_reason

        raise TpusimError(f"cannot write the trace: {os_reason(e)}", source=str(out)) from None


def write_xprof_run(run_dir: str | Path, summary: dict, timeline: pd.DataFrame, profile: Profile,
                    run: str = "compare") -> Path:
    """``RUN_DIR/plugins/profile/<run>/`` with the simulation as host ``simulated`` and, when the profile
    is an XSpace, the profile as host ``measured`` (its file as it is): ``xprof --logdir RUN_DIR``
    shows the two side by side. Returns the folder."""
    from tpusim.analysis.timeline import write_atomic
    from tpusim.sim.chips import get_chip
    from tpusim.analysis.xspace import clear_xprof_cache, profile_dir, xspace_bytes

    d = profile_dir(Path(run_dir), run)
    d.mkdir(parents=True, exist_ok=True)
    chip = get_chip(str(summary["topology"]).split(":")[0])  # "v5p:2x2x2 x2 slices" -> v5p
    write_atomic(d / "simulated.xplane.pb", xspace_bytes(timeline, chip=chip, program_name=summary["workload"],
                                                         step_time_s=summary["step_time_s"], host="simulated"))
    if profile.format == "xplane":
        write_atomic(d / "measured.xplane.pb", Path(profile.source).read_bytes())
    else:  # a trace JSON: XProf cannot read it; no stale profile from an earlier compare either
        (d / "measured.xplane.pb").unlink(missing_ok=True)
    clear_xprof_cache(d)
    return d
