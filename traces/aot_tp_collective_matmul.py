"""When does XLA write MaxText's tensor-parallel activation collectives as collective matmuls? (libtpu AOT
compile, a sweep)

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 /work/venvs/jax/bin/python traces/aot_tp_collective_matmul.py
        # every case of CASES, one process each; writes traces/xla_aot_tp_collective_matmul.json
    python traces/aot_tp_collective_matmul.py --table   # the committed JSON as docs/VALIDATION.md's table

The step of ``traces/aot_memory.py`` (MaxText's layer: RMSNorm, Q/K/V/O, splash attention, gated MLP; the
residual stream sharded on D over tensor, f32 weights, remat ``minimal``, AdamW) with 2 scanned layers, on the
MaxText v5p 32B run's mesh (v5p:4x4x4, fsdp 16 x tensor 4) and LIBTPU flags, at the 32B's widths and at the 16B's,
for 1/4 to 6 sequences of 2048 per chip (under one a chip, the tensor group of 4 shares 1 or 2). For each compile the JSON records, per layer, how the activations cross
the tensor axis: ``collective_permutes`` of one activation shard (a collective matmul's ring steps, async
``-start``/``-done``), and the ``all-gather``/``reduce-scatter``/``all-reduce`` of whole activations (async or
sync as issued). tests/test_collective_matmul.py checks tpusim's rule
(``tpusim.compiler.transformer.COLLECTIVE_MATMUL_MIN_TOKENS``) against every case.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "xla_aot_tp_collective_matmul.json"
L = 2
# name -> (dims of aot_memory.DIMS, sequences of 2048 per chip)
CASES = {f"{dims}_b{b:g}": (dims, b) for dims, bs in (("32b", (0.25, 0.5, 1, 2, 3, 6)), ("16b", (0.25, 0.5, 1, 2, 6)))
         for b in bs}
OPS = r"(collective-permute-start|collective-permute|all-gather-start|all-gather|reduce-scatter|all-reduce-start|all-reduce|fusion)"


def _elements(shape: str) -> int:
    n = 1
    for x in shape.split(","):
        n *= int(x)
    return n


def classify(text: str, shard: int, whole: int) -> dict:
    """Tensor-parallel activation collectives of the module (loop bodies counted once): permutes of one
    shard (``shard`` elements), and gathers / scatters / all-reduces between a shard and the whole
    activation (``whole``), as issued (sync: no -start)."""
    out = {"collective_permutes": 0, "sync_all_gathers": 0, "async_all_gathers": 0, "sync_reduce_scatters": 0,
           "async_reduce_scatters": 0, "all_reduces": 0}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) " + OPS + r"\(", line)
        if not m:
            continue
        name, result, op = m.groups()
        sizes = {_elements(s) for s in re.findall(r"bf16\[([\d,]+)\]", result)}
        if op.startswith("collective-permute") and shard in sizes:
            out["collective_permutes"] += 1
        elif op.startswith("all-gather") and whole in sizes:
            out["async_all_gathers" if op.endswith("start") else "sync_all_gathers"] += 1
        elif op == "reduce-scatter" and shard in sizes:
            out["sync_reduce_scatters"] += 1
        elif op == "fusion" and name.startswith("all-reduce-scatter") and shard in sizes:
            out["sync_reduce_scatters"] += 1
        elif op.startswith("all-reduce") and whole in sizes:
            out["all_reduces"] += 1
    out["async_reduce_scatters"] = len(set(re.findall(r"%(all-reduce-scatter[\w.]*-start)", text)))
    return out


def compile_case(name: str) -> dict:
    import time

    import aot_memory
    from aot_compile import get_topology, make_mesh

    dims, b = CASES[name]
    cfg = {**aot_memory.maxtext_config("v5p_32b_full"), **aot_memory.DIMS[dims], "name": name,
           "base_num_decoder_layers": L, "per_device_batch_size": b}
    cfg["base_num_kv_heads"] = cfg["base_num_query_heads"]
    topo = get_topology(cfg["topology"], aot_memory.CHIP_CONFIG["v5p"])
    mesh = make_mesh(list(topo.devices), cfg["ici_fsdp_parallelism"], cfg["ici_tensor_parallelism"])
    jitted, args = aot_memory.build_step(cfg, mesh)
    t0 = time.perf_counter()
    text = jitted.lower(*args).compile().as_text()
    tp, d, t = cfg["ici_tensor_parallelism"], cfg["base_emb_dim"], cfg["max_target_length"]
    seqs = round(b * tp)  # sequences per fsdp shard: the tensor group shares them
    return {"case": name, "dims": dims, "d_model": d, "sequences_per_chip": b, "tensor": tp,
            "activation_shard_mib": round(seqs * t * d // tp * 2 / 2**20, 1),
            "activation_mib": round(seqs * t * d * 2 / 2**20, 1), "compile_s": round(time.perf_counter() - t0, 1),
            **classify(text, seqs * t * d // tp, seqs * t * d)}


def table(data: dict) -> str:
    rows = ["| widths | sequences per chip | tokens per tensor group | whole activation (MiB) | shard permutes (of 40) "
            "| sync all-gathers | all-reduces |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["cases"].values():
        tokens = round(r["sequences_per_chip"] * r["tensor"]) * 2048
        rows.append(f"| {r['dims']} (D {r['d_model']}) | {r['sequences_per_chip']:g} | {tokens:,} | {r['activation_mib']:g} | "
                    f"{r['collective_permutes']} | {r['sync_all_gathers']} | {r['all_reduces']} |")
    return "\n".join(rows)


def main() -> None:
    if sys.argv[1:2] == ["--case"]:
        print(json.dumps(compile_case(sys.argv[2])))
        return
    if sys.argv[1:2] == ["--table"]:
        print(table(json.loads(OUT.read_text())))
        return
    import aot_memory

    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu", LIBTPU_INIT_ARGS=aot_memory.V5P_32B_FLAGS)
    results = {}
    for name in CASES:
        run = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True, env=env)
        if run.returncode:
            sys.exit(f"{name}: {run.stderr[-2000:]}")
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(json.dumps(results[name]), flush=True)
    data = {"flags": aot_memory.V5P_32B_FLAGS, "layers": L, "topology": "v5p:4x4x4", "mesh": "fsdp 16 x tensor 4",
            "cases": results}
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
