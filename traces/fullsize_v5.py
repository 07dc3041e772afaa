"""XLA's full-size program against tpusim's: MaxText v5p 32B and v5e 16B (issue 11).

    python traces/fullsize_v5.py [CASE ...]    # default: v5p_32b_full v5e_16b_full (those compiled)

For each case of ``traces/aot_memory.py`` compiled with ``save_hlo`` (``xla_aot_memory/<case>.hlo.txt.gz``),
simulates XLA's program (``tpusim run --hlo``) and tpusim's own program of the published run's workload
(``workloads/measured/...``), calibrated, and prints and writes ``xla_aot_memory/compare/<case>.json``:
step; compute by op category (seconds, FLOPs); MXU FLOPs per layer (XLA: the ``while`` bodies, its
rematerialisation pass's ``*.remat`` ops apart); each group of collectives (mesh axis from the replica
group size, sync or async as XLA issued it) with count, busy and exposed seconds (the TensorCore waiting on
it, as ``tpusim run`` charges it); and memory: XLA's buffer assignment against tpusim's memory model.
Needs tpusim importable (run from the repository).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from tp_overlap import collective_rows

from tpusim.analysis.breakdown import exposed_by_op
from tpusim.api import compile_workload
from tpusim.compiler.hlo.collectives import extract_collectives
from tpusim.compiler.hlo.importer import import_hlo, read_hlo, replica_groups
from tpusim.sim.costmodel import op_time
from tpusim.sim.engine import simulate

AOT = HERE / "xla_aot_memory"
WORKLOADS = {"v5p_32b_full": "maxtext_v5p_32b.yaml", "v5e_16b_full": "maxtext_v5e_16b.yaml",
             "v4_22b_full": "maxtext_v4_22b.yaml"}


def axis_of_size(cfg: dict) -> dict[int, str]:
    """Replica-group size -> mesh axis, for this case's (fsdp, tensor) mesh."""
    fsdp, tensor = cfg["ici_fsdp_parallelism"], cfg["ici_tensor_parallelism"]
    return {fsdp: "fsdp", tensor: "tensor", fsdp * tensor: "all"} if tensor > 1 else {fsdp: "fsdp"}


def hlo_groups(text: str, cfg: dict) -> dict[str, tuple[str, str]]:
    """HLO collective name -> (group label, ``sync`` / ``async``)."""
    sizes = axis_of_size(cfg)
    n_dev = cfg["ici_fsdp_parallelism"] * cfg["ici_tensor_parallelism"]
    out = {}
    for c in extract_collectives(text)["collectives"]:
        groups = replica_groups(c.get("replica_groups"), n_dev) if c.get("replica_groups") else []
        size = len(groups[0]) if groups else n_dev
        if c["kind"] == "collective-permute":  # the ring its source-target pairs trace, from the first source
            nxt = {int(a): int(b) for a, b in re.findall(r"\{(\d+),(\d+)\}", c.get("source_target_pairs") or "")}
            size, d = 1, nxt.get(next(iter(nxt), 0), 0)
            while nxt and d != next(iter(nxt)) and size < n_dev:
                d, size = nxt.get(d, next(iter(nxt))), size + 1
        axis = sizes.get(size, f"{size} devices")
        how = "async" if c["implementation"] in ("async_start_done", "async_collective_fusion") else "sync"
        out[c["name"]] = (f"{c['kind']} ({axis})", how)
    return out


def ours_group(op) -> tuple[str, str]:
    return f"{op.category} ({','.join(op.mesh_axes)})", ""


def table(prog, result, group_of, layers: int) -> dict:
    exposed, compute = exposed_by_op(result)
    rows = collective_rows(prog, result, group_of, exposed)
    by_cat: dict[str, dict] = defaultdict(lambda: {"s": 0.0, "flops": 0.0, "bytes": 0.0, "count": 0})
    for op in prog.compute_ops:
        if op.category.endswith("-done"):
            continue
        cat = op.category + (" (remat)" if ".remat" in op.name or "/remat_to_fit/" in op.name else "")
        r = by_cat[cat]
        r["s"] += op_time(op, result.compute_params)
        r["flops"] += op.flops
        r["bytes"] += op.hbm_bytes
        r["count"] += 1
    return {"step_s": result.step_time_s, "compute_s": compute, "other_exposed_s": exposed.get(-1, 0.0),
            "compute_by_category": dict(by_cat), "collectives": dict(rows)}


def layer_flops(hlo, ours, layers: int) -> dict:
    loops = [o for o in hlo.ops if o.category == "matmul" and o.name.startswith("while")]
    return {"tpusim_per_layer": sum(o.flops for o in ours.ops if o.category == "matmul" and o.layer >= 0
                                    and "/remat_to_fit/" not in o.name) / layers,
            "xla_per_layer_less_remat": sum(o.flops for o in loops if ".remat" not in o.name) / layers,
            "xla_per_layer_remat": sum(o.flops for o in loops if ".remat" in o.name) / layers,
            "xla_remat_outside_loops": sum(o.flops for o in hlo.ops if ".remat" in o.name
                                           and not o.name.startswith("while"))}


def analyse(case: str) -> dict:
    meta = json.loads((AOT / f"{case}.json").read_text())
    cfg = meta["config"]
    _w, topo, ours = compile_workload(HERE.parent / "workloads" / "measured" / WORKLOADS[case])
    text = read_hlo(AOT / f"{case}.hlo.txt.gz")
    hlo = import_hlo(text, topo, name=case)
    names = hlo_groups(text, cfg)

    def hlo_group(op):
        return names.get(op.name.rsplit("/", 1)[-1], (op.category, "?"))

    L = cfg["base_num_decoder_layers"]
    return {"case": case, "topology": cfg["topology"], "layers": L,
            "xla_memory_analysis": meta["memory_analysis"], "tpusim_memory": ours.memory.as_dict(),
            "run": table(ours, simulate(ours, topo, mode="calibrated"), ours_group, L),
            "run_hlo": table(hlo, simulate(hlo, topo, mode="calibrated"), hlo_group, L),
            "mxu_flops": layer_flops(hlo, ours, L)}


def report(a: dict) -> str:
    r, h = a["run"], a["run_hlo"]
    lines = [f"{a['case']} on {a['topology']}",
             f"  step        run {r['step_s']:8.3f} s   run --hlo {h['step_s']:8.3f} s",
             f"  compute     run {r['compute_s']:8.3f} s   run --hlo {h['compute_s']:8.3f} s",
             "  compute by category: s / TFLOP / GB (run)   s / TFLOP / GB (run --hlo)"]
    for cat in sorted(set(r["compute_by_category"]) | set(h["compute_by_category"])):
        x, y = r["compute_by_category"].get(cat), h["compute_by_category"].get(cat)
        f = (lambda v: f"{v['s']:7.3f} / {v['flops'] / 1e12:8.1f} / {v['bytes'] / 1e9:7.1f}" if v else " " * 29)
        lines.append(f"    {cat:<20} {f(x)}     {f(y)}")
    lines.append("  collectives: count / busy s / exposed s (run)     count (sync) / busy / exposed (run --hlo)")
    for g in sorted(set(r["collectives"]) | set(h["collectives"])):
        x, y = r["collectives"].get(g), h["collectives"].get(g)
        left = f"{x['count']:4d} / {x['busy_s']:6.3f} / {x['exposed_s']:6.3f}" if x else " " * 24
        right = f"{y['count']:4d} ({y['sync']:3d}) / {y['busy_s']:6.3f} / {y['exposed_s']:6.3f}" if y else ""
        lines.append(f"    {g:<28} {left}     {right}")
    m, t = a["xla_memory_analysis"], a["tpusim_memory"]
    lines.append(f"  memory      XLA peak {m['peak_memory_in_bytes'] / 1e9:.2f} GB (args {m['argument_size_in_bytes'] / 1e9:.2f}, "
                 f"temp {m['temp_size_in_bytes'] / 1e9:.2f})   tpusim " +
                 ", ".join(f"{k} {v / 1e9:.2f}" for k, v in t.items()) + " GB")
    lines.append("  MXU FLOPs per layer: " + ", ".join(f"{k} {v / 1e12:.2f}T" for k, v in a["mxu_flops"].items()))
    return "\n".join(lines)


def main() -> None:
    cases = sys.argv[1:] or [c for c in ("v5p_32b_full", "v5e_16b_full") if (AOT / f"{c}.hlo.txt.gz").exists()]
    for case in cases:
        a = analyse(case)
        (AOT / "compare").mkdir(exist_ok=True)
        (AOT / "compare" / f"{case}.json").write_text(json.dumps(a, indent=1, sort_keys=True) + "\n")
        print(report(a))


if __name__ == "__main__":
    main()
