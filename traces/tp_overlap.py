"""Where MaxText's tensor-parallel activation collectives go: XLA's compile against tpusim's program.

    python traces/tp_overlap.py [CASE_DIR ...]      # default: both compiles of big_tp_sharded_residual_L2

For each case directory (``optimized_hlo.txt.gz`` + ``config.yaml`` written by ``aot_compile.py --chip v5p
--case big_tp_sharded_residual [--maxtext-flags]``), simulates XLA's program (``tpusim run --hlo``) and
tpusim's own program of the same config (``tpusim run config.yaml``), calibrated, and prints, side by side:
the step, the compute stream by op category, and the exposed time of each group of collectives (the
TensorCore waiting on it: the gap before the op that needs it, or the time its ``-done`` lasts), with how
XLA issued each group (``sync``: one instruction the next op waits for; ``async``: a start, continuation
fusions running slices of it beside compute, and a done). Groups: the tensor-parallel activation
all-gathers and reduce-scatters (``[B, T, D]`` over a ``tensor`` row of the mesh), the RMSNorm statistics
all-reduced over ``tensor``, the FSDP weight all-gathers / gradient reduce-scatters (over an ``fsdp``
column), collective-permutes, all-to-alls. tpusim's program is shown twice: placed on the torus its own
way, and with the compile's placement (``physical_axes`` read from summary.json's device coordinates).
Needs tpusim importable (run from the repository).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tpusim.analysis.breakdown import collective_spans, exposed_by_op  # noqa: E402
from tpusim.api import compile_workload  # noqa: E402
from tpusim.compiler.hlo.collectives import extract_collectives  # noqa: E402
from tpusim.compiler.hlo.importer import import_hlo, read_hlo, replica_groups  # noqa: E402
from tpusim.sim.costmodel import op_time  # noqa: E402
from tpusim.sim.engine import simulate  # noqa: E402

CASE = "big_tp_sharded_residual_L2"
DEFAULT_DIRS = (HERE / "xla_aot_chips" / "v5p" / CASE, HERE / "xla_aot_chips_maxtext" / "v5p" / CASE)


def hlo_groups(text: str, summary: dict) -> dict[str, tuple[str, str]]:
    """HLO collective name -> (group label, how XLA issued it), from the mesh in summary.json."""
    mesh = summary["mesh_device_ids"]  # rows: fsdp index; columns: tensor index
    tensor_rows = {frozenset(r) for r in mesh}
    fsdp_cols = {frozenset(c) for c in zip(*mesh)}
    n_dev = sum(len(r) for r in mesh)
    out = {}
    for c in extract_collectives(text)["collectives"]:
        groups = {frozenset(g) for g in replica_groups(c.get("replica_groups"), n_dev)} if c.get("replica_groups") else set()
        axis = "tensor" if groups and groups <= tensor_rows else "fsdp" if groups and groups <= fsdp_cols else "other"
        shape = c["operand_shapes"][0] if c["operand_shapes"] else ""
        batch_tokens = f"[{summary['model']['batch_per_fsdp_shard']},{summary['model']['seq_len']}"
        activation = shape.startswith("bf16" + batch_tokens) or shape.startswith("f32" + batch_tokens)
        kind = c["kind"]
        if kind in ("all-gather", "reduce-scatter") and axis == "tensor" and activation:
            label = f"TP activation {kind}"
        elif kind == "all-reduce" and axis == "tensor" and activation:
            label = "TP norm-statistics all-reduce"
        elif kind in ("all-gather", "reduce-scatter") and axis == "fsdp":
            label = f"FSDP weight {kind}"
        else:
            label = f"{kind} ({axis})" if kind != "collective-permute" else kind
        how = "async" if c["implementation"] in ("async_start_done", "async_collective_fusion") else "sync"
        out[c["name"]] = (label, how)
    return out


def ours_group(op) -> tuple[str, str]:
    if op.mesh_axes == ("tensor",):
        return (f"TP activation {op.category}" if op.category != "all-reduce" else "TP norm-statistics all-reduce",
                "")
    if "fsdp" in op.mesh_axes and op.category in ("all-gather", "reduce-scatter"):
        return f"FSDP weight {op.category}", ""
    return f"{op.category} ({','.join(op.mesh_axes)})", ""


def collective_rows(prog, result, group_of, exposed: dict[int, float]) -> dict[str, dict]:
    """The collectives by ``group_of(op) -> (label, "sync" or "")``: count, synchronous count, exposed and
    busy seconds (also used by ``fullsize_v5.py``)."""
    rows: dict[str, dict] = defaultdict(lambda: {"count": 0, "sync": 0, "exposed_s": 0.0, "sync_exposed_s": 0.0,
                                                 "busy_s": 0.0})
    spans = collective_spans(result)
    for op in prog.collective_ops:
        label, how = group_of(op)
        r = rows[label]
        r["count"] += 1
        r["sync"] += how == "sync"
        r["exposed_s"] += exposed.get(op.index, 0.0)
        r["sync_exposed_s"] += exposed.get(op.index, 0.0) if how == "sync" else 0.0
        if op.index in spans:
            r["busy_s"] += spans[op.index][1] - spans[op.index][0]
    return dict(rows)


def table(prog, result, group_of) -> dict:
    exposed, compute = exposed_by_op(result)
    rows = collective_rows(prog, result, group_of, exposed)
    by_cat: dict[str, float] = defaultdict(float)
    for op in prog.compute_ops:
        if not op.category.endswith("-done"):
            by_cat[op.category] += op_time(op, result.compute_params)
    return {"step_s": result.step_time_s, "compute_s": compute, "other_exposed_s": exposed.get(-1, 0.0),
            "compute_by_category_s": dict(by_cat), "collectives": dict(rows)}


def xla_placement(summary: dict) -> dict[str, str]:
    """``physical_axes`` of the compile's mesh (mesh_utils' placement, from summary.json's device coords):
    the torus axes along which a ``tensor`` row and an ``fsdp`` column of the mesh vary."""
    coords = summary["mesh_device_coords"]  # [fsdp][tensor] -> [x, y, z]

    def varying(points):
        return "".join(a for i, a in enumerate("xyz") if len({p[i] for p in points}) > 1)

    return {"tensor": varying(coords[0]), "fsdp": varying([row[0] for row in coords])}


def analyse(case_dir: Path) -> dict:
    summary = json.loads((case_dir / "summary.json").read_text())
    _, topo, prog = compile_workload(case_dir / "config.yaml")
    placement = xla_placement(summary)
    _, _, placed = compile_workload(case_dir / "config.yaml", overrides={"physical_axes": placement})
    text = read_hlo(case_dir / "optimized_hlo.txt.gz")
    hlo = import_hlo(text, topo, name=case_dir.name)
    names = hlo_groups(text, summary)

    def hlo_group(op):
        base = op.name.rsplit("/", 1)[-1]
        return names.get(base, (op.category, "?"))

    return {"case": str(case_dir.resolve().relative_to(HERE.parent)), "flags": bool(summary.get("libtpu_init_args")),
            "placement": placement,
            "run": table(prog, simulate(prog, topo, mode="calibrated"), ours_group),
            "run_placed": table(placed, simulate(placed, topo, mode="calibrated"), ours_group),
            "run_hlo": table(hlo, simulate(hlo, topo, mode="calibrated"), hlo_group)}


def report(a: dict, placed: bool = False) -> str:
    ms = 1e3
    r, h = a["run_placed" if placed else "run"], a["run_hlo"]
    where = (f"; run with XLA's placement, physical_axes {a['placement']}" if placed else
             "; run with tpusim's own placement")
    lines = [f"{a['case']} ({'MaxText v5p 32B LIBTPU flags' if a['flags'] else 'default flags'}{where})",
             f"  step        run {r['step_s'] * ms:8.2f} ms   run --hlo {h['step_s'] * ms:8.2f} ms",
             f"  compute     run {r['compute_s'] * ms:8.2f} ms   run --hlo {h['compute_s'] * ms:8.2f} ms"]
    for cat in sorted(set(r["compute_by_category_s"]) | set(h["compute_by_category_s"])):
        lines.append(f"    {cat:<22} {r['compute_by_category_s'].get(cat, 0) * ms:8.2f}   "
                     f"{h['compute_by_category_s'].get(cat, 0) * ms:8.2f}")
    lines.append("  collectives: count / busy / exposed ms (run)     count (sync) / busy / exposed (of it sync) ms (run --hlo)")
    for g in sorted(set(r["collectives"]) | set(h["collectives"])):
        x, y = r["collectives"].get(g), h["collectives"].get(g)
        left = f"{x['count']:4d} / {x['busy_s'] * ms:6.2f} / {x['exposed_s'] * ms:5.2f}" if x else " " * 22
        right = (f"{y['count']:4d} ({y['sync']:3d}) / {y['busy_s'] * ms:6.2f} / {y['exposed_s'] * ms:5.2f} "
                 f"({y['sync_exposed_s'] * ms:5.2f})") if y else ""
        lines.append(f"    {g:<34} {left}     {right}")
    return "\n".join(lines)


def main() -> None:
    dirs = [Path(p).resolve() for p in sys.argv[1:]] or list(DEFAULT_DIRS)
    for d in dirs:
        if (d / "optimized_hlo.txt.gz").exists():
            a = analyse(d)
            print(report(a))
            print(report(a, placed=True))


if __name__ == "__main__":
    main()
