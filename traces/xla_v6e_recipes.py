"""The v6e tpu-recipes Llama-3.1 runs: XLA's full-size program against tpusim's, by category (issue 11).

Reads ``xla_aot_memory/<case>.hlo.txt.gz`` (written by ``aot_memory.py --case v6e8_llama31_8b`` /
``v6e64_llama31_70b``) and the run's workload, simulates both (calibrated, as ``tpusim run`` does),
and writes ``xla_v6e_recipes.json``: device 0's compute-stream time by category on
each path (ops overlapping it on other streams are not counted: what remains of a collective or host copy
on the compute stream is its exposed wait), MXU FLOPs per layer, XLA's ``*.remat`` ops, the splash
kernels (count, shapes, block sizes), the host offload copies and the collectives. Runs in tpusim's venv:

    python traces/xla_v6e_recipes.py [--case v6e8_llama31_8b]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CASES = {"v6e8_llama31_8b": ("recipes_v6e8_llama31_8b", "v6e:2x4"),
         "v6e8_llama31_8b_no_cm": ("recipes_v6e8_llama31_8b", "v6e:2x4"),
         "v6e64_llama31_70b": ("recipes_v6e64_llama31_70b", "v6e:8x8")}
OUT = HERE / "xla_v6e_recipes.json"


def hlo_bucket(op) -> str:
    """XLA's op in the comparison's categories."""
    if ".remat" in op.name and op.category == "matmul":
        return "matmul (remat to fit)"
    if op.name.startswith(("splash", "while/body/splash")) or "splash_" in op.name:
        return "attention (splash)"
    return op.category


def by_category(result, bucket) -> dict[str, float]:
    """Device 0's compute-stream seconds by category (``bucket(op)``)."""
    from tpusim.analysis.timeline import timeline_frame

    t = timeline_frame(result)
    t = t[(t.device == 0) & (t.stream == "XLA Ops")]
    ops = {op.index: op for op in result.program.ops}
    out: dict[str, float] = collections.defaultdict(float)
    for idx, dur in zip(t.op_index, t.end_s - t.start_s):
        out[bucket(ops[int(idx)])] += float(dur)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def hlo_facts(text: str, hprog, tokens: int, layers: int) -> dict:
    """Splash kernels, host copies and collectives as XLA wrote them."""
    from tpusim.compiler.hlo.collectives import extract_collectives

    kernels = collections.Counter(re.sub(r"\.\d+$", "", o.name.split("/")[-1]) for o in hprog.ops
                                  if "splash_" in o.name.split("/")[-1])
    blocks = sorted({b.replace('\\"', '"') for b in re.findall(r'xprof_metadata":"(\{[^}]*\})"', text)})
    host = collections.Counter()
    for o in hprog.ops:
        if o.stream == "host":
            host[f"{o.category} {o.bytes:.0f} B"] += 1
    cols = extract_collectives(text)
    kinds = collections.Counter(f"{c['kind']} {c['implementation']} async={c['async']}" for c in cols["collectives"])
    return {"splash_kernels_executed": dict(sorted(kernels.items())), "splash_block_sizes": blocks,
            "host_copies_executed": dict(sorted(host.items())),
            "collectives": dict(sorted(kinds.items())),
            "windowed_einsum_loops": len(cols["windowed_einsum_loops"]),
            "remat_instructions": sorted(set(re.findall(r"%([\w.\-]+\.remat\d*) =", text)))[:50],
            "tokens_per_device": tokens}


def compare(case: str) -> dict:
    from tpusim.api import compile_workload
    from tpusim.compiler.hlo.importer import import_hlo, read_hlo
    from tpusim.sim.engine import simulate

    name, topology = CASES[case]
    w, topo, prog = compile_workload(HERE.parent / "workloads" / "measured" / f"{name}.yaml")
    text = read_hlo(HERE / "xla_aot_memory" / f"{case}.hlo.txt.gz")
    hprog = import_hlo(text, topo)
    cfg = json.loads((HERE / "xla_aot_memory" / f"{case}.json").read_text())["config"]
    L, tokens = cfg["base_num_decoder_layers"], cfg["per_device_batch_size"] * cfg["max_target_length"]
    ours, xla = simulate(prog, topo), simulate(hprog, topo)
    loops = [o for o in hprog.ops if o.category == "matmul" and o.name.startswith("while")]
    return {
        "workload": f"workloads/measured/{name}.yaml", "hlo": f"traces/xla_aot_memory/{case}.hlo.txt.gz",
        "topology": topology, "layers": L,
        "step_s": {"tpusim": ours.step_time_s, "xla_hlo": xla.step_time_s},
        "compute_stream_s_by_category": {"tpusim": by_category(ours, lambda o: o.category),
                                         "xla_hlo": by_category(xla, hlo_bucket)},
        "mxu_flops_per_layer": {
            "tpusim": sum(o.flops for o in prog.ops if o.category == "matmul" and o.layer >= 0) / L,
            "xla_loops_less_remat": sum(o.flops for o in loops if ".remat" not in o.name) / L,
            "xla_loops": sum(o.flops for o in loops) / L},
        "hbm_bytes_per_layer": {
            "tpusim": sum(o.hbm_bytes for o in prog.ops if o.layer >= 0 and o.stream == "compute") / L,
            "xla_loops": sum(o.hbm_bytes for o in hprog.ops if o.name.startswith("while") and o.stream == "compute") / L},
        "host_bytes_per_step": {
            "tpusim": sum(o.bytes for o in prog.ops if o.stream == "host"),
            "xla_hlo": sum(o.bytes for o in hprog.ops if o.stream == "host")},
        "hlo": hlo_facts(text, hprog, tokens, L)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    ns = ap.parse_args()
    done = json.loads(OUT.read_text()) if OUT.exists() else {}
    for case in ns.case or sorted(CASES):
        if (HERE / "xla_aot_memory" / f"{case}.hlo.txt.gz").exists():
            done[case] = compare(case)
    OUT.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
    print(json.dumps(done, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
