"""Where does XLA put the cross-slice (DCN) gradient reduction of a scanned model, and how does it change
with the slice count? (libtpu AOT compile)

    /work/venvs/jax/bin/python traces/aot_multislice.py            # writes traces/xla_aot/multislice_scan_L4/
    /work/venvs/jax/bin/python traces/aot_multislice.py --slices 8 --slice-topology 2x2 --flags default
        # writes traces/xla_aot_multislice/v5e2x2_s8_default/
    ALLOW_MULTIPLE_LIBTPU_LOAD=1 /work/venvs/jax/bin/python traces/aot_multislice.py --series
        # every committed case (SERIES), one process each, one at a time: 5-20 s a compile here

A MaxText-shaped step, small: 4 scanned layers (``lax.scan``, full remat) of an MLP block with f32
weights cast to bf16 (MaxText's ``weight_dtype: float32``, ``dtype: bfloat16``), FSDP over the chips
of each v5e slice (weights sharded on the embed dim) and data parallelism over the slices
(``create_hybrid_device_mesh``, MaxText's ``dcn_data_parallelism: N``), 2 sequences per chip at every
N (weak scaling, as the measured series), SGD. Compiled ahead of time for N slices
(``get_topology_desc(..., num_slices=N)``) with the LIBTPU flags of the MaxText v5e 16B multi-slice
runs (tests/data/measured-dev.yaml, copied exactly; ``--flags default`` compiles with none). Output:
``optimized_hlo.txt.gz`` and ``summary.json`` (the case, and ``structure``: every megascale host
transfer, where it is issued and waited, and the ICI collectives by kind and group size, with any
whose replica groups span slices). What the 2-slice compile shows (tests/test_engine.py reads it): the cross-slice all-reduce of
each layer's gradient shard is a pair of megascale host transfers (``send``/``recv`` with
``_xla_megascale_transfer_type="ALL_REDUCE"``) on bf16 shards, issued at the start of the next
backward iteration and waited for (``send-done``/``recv-done``) at its end; the last layer's after
the loop. tests/test_multislice_aot.py compares the N-slice compiles.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

FLAGS = ("--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true "
         "--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
         "--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true "
         "--xla_enable_async_all_gather=true")
D, F, L, T = 1024, 4096, 4, 256
PER_CHIP = 2  # sequences per chip (the 2-slice 4x4 case's batch 64 over 32 chips)
SERIES = ([(n, t, "maxtext") for t in ("4x4", "2x2", "16x16") for n in (2, 4, 8, 16, 32)]
          + [(n, t, "default") for t, ns in (("4x4", (2, 4, 8)), ("2x2", (2, 4, 8, 16)), ("16x16", (2, 8, 32)))
             for n in ns])
HERE = Path(__file__).resolve().parent
BYTES = {"bf16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "f16": 2}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "all-reduce-start", "all-gather-start", "collective-permute-start")


def out_dir(slices: int, slice_topology: str, flags: str) -> Path:
    if (slices, slice_topology, flags) == (2, "4x4", "maxtext"):
        return HERE / "xla_aot" / f"multislice_scan_L{L}"  # the first compile's place (tests/test_engine.py)
    return HERE / "xla_aot_multislice" / f"v5e{slice_topology}_s{slices}_{flags}"


def _shape_bytes(shape: str) -> int:
    m = re.match(r"(\w+)\[([\d,]*)\]", shape)
    return math.prod(int(d) for d in filter(None, m.group(2).split(","))) * BYTES[m.group(1)]


def _groups(line: str) -> list[list[int]]:
    m = re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\(([\d,]+)\))?", line)
    if not m:
        return []
    dims = [int(x) for x in m.group(3).split(",")]
    ids = list(range(math.prod(dims)))
    if m.group(5):  # reshape to dims, transpose by perm, flatten
        perm = [int(x) for x in m.group(5).split(",")]
        strides = [1] * len(dims)
        for i in range(len(dims) - 2, -1, -1):
            strides[i] = strides[i + 1] * dims[i + 1]
        ids = [sum(idx[k] * strides[perm[k]] for k in range(len(dims)))
               for idx in itertools.product(*[range(dims[p]) for p in perm])]
    g, size = int(m.group(1)), int(m.group(2))
    return [ids[i * size:(i + 1) * size] for i in range(g)]


def _trip_counts(text: str, bodies: list[str]) -> dict[str, int]:
    """Each while body's trip count: its condition compares the counter LT a constant; the counter starts
    at the constant the init tuple's first element copies (libtpu's peeled loops start at 1)."""
    defs = {m.group(1): m.group(2) for m in re.finditer(r"\n\s*(?:ROOT )?%([\w.\-]+) = (.*)", text)}
    by_name = {b.split(" ", 1)[0].lstrip("%"): b for b in bodies}

    def value(name: str) -> int:
        line = defs[name]
        m = re.search(r" constant\((-?\d+)\)", line)
        if m:
            return int(m.group(1))
        return value(re.search(r" (?:copy|bitcast)\(%([\w.\-]+)\)", line).group(1))

    trips = {}
    for m in re.finditer(r"= .*? while\(%([\w.\-]+)\), condition=%([\w.\-]+), body=%([\w.\-]+)", text):
        init = re.search(r" tuple\(%([\w.\-]+)", defs[m.group(1)]).group(1)
        cond = by_name[m.group(2)]
        assert "direction=LT" in cond
        limit = int(re.search(r" constant\((\d+)\)", cond).group(1))
        trips[m.group(3)] = limit - value(init)
    return trips


def structure(text: str, chips_per_slice: int) -> dict:
    """The cross-slice structure of one optimized HLO: per computation, its megascale transfers (op,
    shape, bytes, type, target, line), where each is waited for (ops between issue and wait, whether a
    convolution and an ICI collective run in between), and the module's other collectives (kind and
    group size, each instruction once) with any whose groups span slices."""
    bodies = re.split(r"\n(?=%\S+ \(|ENTRY )", text)
    trips = _trip_counts(text, bodies)
    comps, spanning, colls = [], [], {}
    for body in bodies:
        name = body.split(" ", 1)[0].lstrip("%")
        lines = body.splitlines()
        transfers = []
        for i, ln in enumerate(lines):
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \(?(\w+\[[\d,]*\])\S* .*? (send|recv)\(", ln)
            if m and "_xla_megascale_transfer_type" in ln:
                attr = lambda k: (re.search(k + r'="([^"]*)"', ln) or [None, None])[1]
                done = next(j for j, x in enumerate(lines) if f" {m.group(3)}-done(%{m.group(1)})" in x)
                between = lines[i + 1:done]
                transfers.append({
                    "op": m.group(3), "name": m.group(1), "shape": m.group(2), "bytes": _shape_bytes(m.group(2)),
                    "type": attr("_xla_megascale_transfer_type"), "reduce": attr("_xla_megascale_reduce_operation"),
                    "target": attr("_xla_megascale_target"), "rendezvous": attr("_xla_host_transfer_rendezvous"),
                    "line": i, "done_line": done, "ops_between": sum(1 for x in between if " = " in x),
                    "convolution_between": any("convolution" in x for x in between),
                    "ici_collective_between": any(re.search(r" (all-reduce|all-gather|reduce-scatter)(-start)?\(", x)
                                                  for x in between)})
        for ln in lines:
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z\-]+)\(", ln)
            if m and m.group(3) in COLLECTIVES:
                groups = _groups(ln) or [[int(a), int(b)] for a, b in re.findall(
                    r"\{(\d+),(\d+)\}", (re.search(r"source_target_pairs=\{(.*?)\}\}", ln) or [None, ""])[1] + "}")]
                key = f"{m.group(3)} x{len(groups[0]) if groups else '?'}"
                colls[key] = colls.get(key, 0) + 1
                if any(len({d // chips_per_slice for d in g}) > 1 for g in groups):
                    spanning.append(f"{name}/{m.group(1)}")
        if transfers:
            comps.append({"computation": name, "entry": name == "ENTRY" or body.startswith("ENTRY"),
                          "trip_count": trips.get(name), "lines": len(lines), "megascale": transfers})
    per_step = sum(len(c["megascale"]) * (c["trip_count"] or 1) for c in comps)
    sends = [t for c in comps for t in c["megascale"] if t["op"] == "send"]
    return {"computations": comps, "megascale_transfers_per_step": per_step,
            "megascale_send_bytes_per_step": sum(t["bytes"] * (c["trip_count"] or 1) for c in comps
                                                 for t in c["megascale"] if t["op"] == "send"),
            "megascale_types": sorted({t["type"] for c in comps for t in c["megascale"]}),
            "megascale_targets": sorted({t["target"] for t in sends}),
            "synchronous_sends": sum(1 for t in sends if t["ops_between"] == 0),
            "ici_collectives_in_module": dict(sorted(colls.items())),  # "kind xGROUP": instructions
            "ici_collectives_spanning_slices": spanning}


def program(text: str) -> list[str]:
    """The HLO's instructions with what may differ between two compiles of one program taken out: the
    stack-frame tables and metadata, shardings, the megascale target (which slices), instruction
    numbers, channel and barrier ids, rendezvous keys. What is left differs between slice counts only by
    the loss's 2/(B T D) constant (the global batch B grows with N) and a table with one u32 per device
    (tests/test_multislice_aot.py)."""
    text = text[text.index("\n%"):]
    for pattern, repl in ((r", metadata=\{[^}]*\}", ""), (r'_xla_megascale_target="[^"]*"', ""),
                          (r"sharding=\{[^}]*\}", ""), (r"(%[\w\-]+(?:\.[a-z]\w*)*)\.\d+\b", r"\1"),
                          (r"channel_id=\d+", ""), (r'"id":"\d+"', ""),
                          (r'(rendezvous|RendezvousKeyName)="[^"]*"', "")):
        text = re.sub(pattern, repl, text)
    return text.splitlines()


def scanned_mlp_step():
    """The jitted SGD step of a MaxText-shaped model: scanned layers (``lax.scan``, full remat) of an MLP block
    with f32 weights ``w1`` [L, D, F] and ``w2`` [L, F, D] cast to bf16, a bf16 batch [B, T, D]."""
    import jax
    import jax.numpy as jnp

    def loss(p, x):
        def layer(h, w):
            y = jax.nn.silu(h @ w["w1"].astype(jnp.bfloat16)) @ w["w2"].astype(jnp.bfloat16)
            return h + y, None
        h, _ = jax.lax.scan(jax.checkpoint(layer), x, p)
        return jnp.mean(h.astype(jnp.float32) ** 2)

    @jax.jit
    def step(p, x):
        return jax.tree.map(lambda a, g: a - 1e-3 * g, p, jax.grad(loss)(p, x))

    return step


def compile_case(slices: int, slice_topology: str, flags: str) -> None:
    os.environ["LIBTPU_INIT_ARGS"] = FLAGS if flags == "maxtext" else ""
    import jax
    import jax.numpy as jnp
    from jax.experimental import mesh_utils, topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    x_, y_ = (int(v) for v in slice_topology.split("x"))
    chips = x_ * y_
    topo = topologies.get_topology_desc(platform="tpu", topology_name=f"v5e:{slice_topology}", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=slices)
    devices = list(topo.devices)
    mesh = Mesh(mesh_utils.create_hybrid_device_mesh((1, chips), (slices, 1), devices=devices), ("data", "fsdp"))
    B = PER_CHIP * slices * chips
    params = {"w1": jax.ShapeDtypeStruct((L, D, F), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", None))),
              "w2": jax.ShapeDtypeStruct((L, F, D), jnp.float32, sharding=NamedSharding(mesh, P(None, None, "fsdp")))}
    x = jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"), None, None)))

    text = scanned_mlp_step().lower(params, x).compile().as_text()
    # HLO replica groups number the devices in mesh order (row s of the mesh is slice s): id // chips.
    assert all(d.slice_index == i // chips for i, d in enumerate(mesh.devices.flat)), "mesh rows are not slices"
    out = out_dir(slices, slice_topology, flags)
    out.mkdir(parents=True, exist_ok=True)
    (out / "optimized_hlo.txt.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    summary = {"topology": f"v5e:{slice_topology}", "num_slices": slices, "mesh": {"data": slices, "fsdp": chips},
               "layers": L, "D": D, "F": F, "batch": B, "seq": T,
               "libtpu_flags": FLAGS if flags == "maxtext" else "", "jax": jax.__version__,
               "structure": structure(text, chips)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--slice-topology", default="4x4", choices=["2x2", "2x4", "4x4", "16x16"])
    ap.add_argument("--flags", default="maxtext", choices=["maxtext", "default"])
    ap.add_argument("--series", action="store_true", help="compile every case of SERIES, each in its own process")
    a = ap.parse_args()
    if not a.series:
        compile_case(a.slices, a.slice_topology, a.flags)
        return
    for n, topo, flags in SERIES:  # libtpu once per process
        subprocess.run([sys.executable, __file__, "--slices", str(n), "--slice-topology", topo, "--flags", flags],
                       check=True)


if __name__ == "__main__":
    main()
