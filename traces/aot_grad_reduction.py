"""How does XLA reduce an FSDP weight gradient: reduce-scatter it beside the backward's matmuls, or all-reduce
the whole gradient and keep a slice? (libtpu AOT compile, a sweep)

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 /work/venvs/jax/bin/python traces/aot_grad_reduction.py
        # every case of CASES, one process each: 10-25 s a compile here; writes traces/xla_aot_grad_reduction.json
    /work/venvs/jax/bin/python traces/aot_grad_reduction.py --one v5e 8x8 1,64,1 4096 28672 6 2048
    python traces/aot_grad_reduction.py --table     # the committed JSON as docs/VALIDATION.md's table

A MaxText-shaped step, small: 2 scanned layers (``lax.scan``, full remat) of an MLP block, f32 weights cast to
bf16, weights sharded on the embed dim over fsdp (and on the MLP width over tensor), the batch over data x
fsdp, SGD; the mesh laid on the torus by ``mesh_utils.create_device_mesh`` as MaxText does. The widths and
tokens per chip are the development set's (v5e 16B, v4 22B, v5p 32B, Llama 8B/70B on v6e) and a small one,
on 4 to 256 devices of v4, v5e, v5p and v6e. For each compile the JSON records how the weight gradients
cross the fsdp group: ``all-reduce`` (a whole bf16 gradient, ``sync`` when it has no -start/-done),
``windowed`` (reduce-scatter loops, ``windowed_dot_general_body_rs``), ``reduce-scatter`` (instructions or
async all-reduce-scatter fusions). tests/test_grad_reduction.py checks tpusim's rule
(``tpusim.compiler.transformer.FSDP_ALL_REDUCE_MIN_DEVICES``) against every case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from aot_multislice import scanned_mlp_step  # (run as a script: traces/ is on the path)

HERE = Path(__file__).resolve().parent
OUT = HERE / "xla_aot_grad_reduction.json"
L = 2
WIDTHS = {"v5e_16b": (4096, 28672, 6, 2048), "v4_22b": (6144, 24576, 13, 2048), "v5p_32b": (8192, 28672, 6, 2048),
          "llama_8b": (4096, 14336, 3, 8192), "llama_70b": (8192, 28672, 2, 8192), "small": (1024, 4096, 2, 256)}
# (chip, topology, mesh data,fsdp,tensor, widths)
CASES = ([("v5e", t, f"1,{n},1", "v5e_16b") for t, n in (("2x2", 4), ("2x4", 8), ("4x4", 16), ("4x8", 32),
                                                           ("8x8", 64), ("8x16", 128), ("16x16", 256))]
         + [("v5e", t, f"1,{n},1", "small") for t, n in (("4x8", 32), ("8x8", 64))]
         + [("v6e", t, f"1,{n},1", wd) for t, n in (("2x4", 8), ("4x4", 16), ("4x8", 32), ("8x8", 64))
            for wd in ("llama_8b", "llama_70b")]
         + [("v4", t, f"1,{n},1", "v4_22b") for t, n in (("2x2x2", 8), ("2x2x4", 16), ("4x4x4", 64))]
         + [("v5p", t, f"1,{n},1", "v5p_32b") for t, n in (("2x4x4", 32), ("4x4x4", 64), ("4x4x8", 128))]
         # other axes beside fsdp: the group is the fsdp axis
         + [("v5e", "2x4", "2,4,1", "v5e_16b"), ("v5e", "4x4", "2,8,1", "v5e_16b"), ("v5e", "4x4", "2,8,1", "small"),
            ("v5e", "8x8", "2,32,1", "v5e_16b"), ("v5e", "16x16", "4,64,1", "v5e_16b"),
            ("v5e", "16x16", "1,64,4", "v5e_16b"), ("v5p", "4x4x8", "1,32,4", "v5p_32b"),
            ("v5p", "4x4x4", "1,16,4", "v5p_32b")])


def reductions(text: str, d: int, f: int) -> dict:
    """How the module's weight gradients (D x F and F x D, bf16) cross the fsdp group."""
    whole = d * f
    ars = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (.*?) (all-reduce|all-reduce-start)\(", line)
        if m and any(math.prod(int(x) for x in s.split(",")) == whole
                     for s in re.findall(r"bf16\[([\d,]+)\]", m.group(1))):
            ars.append("sync" if m.group(2) == "all-reduce" else "async")
    return {"whole_gradient_all_reduces": len(ars), "all_reduce_sync": all(a == "sync" for a in ars) if ars else None,
            "windowed_reduce_scatter_loops": len(set(re.findall(r"windowed_dot_general_body_rs[\w.]*", text))),
            "reduce_scatters": len(re.findall(r" reduce-scatter(?:-start)?\(", text))
            + len(set(re.findall(r"%all-reduce-scatter[\w.]*", text)))}


def compile_one(chip: str, topology: str, mesh_spec: str, d: int, f: int, per_chip: int, t: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.experimental import mesh_utils, topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    cfg = "megacore" if chip in ("v4", "v5p") else "default"
    topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{chip}:{topology}", chip_config_name=cfg,
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    shape = tuple(int(x) for x in mesh_spec.split(","))
    mesh = Mesh(mesh_utils.create_device_mesh(shape, devices=list(topo.devices), allow_split_physical_axes=True), ("data", "fsdp", "tensor"))
    n = mesh.devices.size
    params = {"w1": jax.ShapeDtypeStruct((L, d, f), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", "tensor"))),
              "w2": jax.ShapeDtypeStruct((L, f, d), jnp.float32, sharding=NamedSharding(mesh, P(None, "tensor", "fsdp")))}
    x = jax.ShapeDtypeStruct((per_chip * n // shape[2], t, d), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(("data", "fsdp"), None, None)))

    text = scanned_mlp_step().lower(params, x).compile().as_text()
    return {"chip": chip, "topology": f"{chip}:{topology}", "mesh": dict(zip(("data", "fsdp", "tensor"), shape)),
            "D": d, "F": f, "sequences_per_chip": per_chip, "seq": t, "layers": L, "jax": jax.__version__,
            **reductions(text, d, f)}


def how(case: dict) -> str:
    """The case's weight-gradient reduction in a word."""
    if case["whole_gradient_all_reduces"]:
        return "whole all-reduce, " + ("sync" if case["all_reduce_sync"] else "async")
    if case["windowed_reduce_scatter_loops"]:
        return "windowed reduce-scatter"
    return "reduce-scatter" if case["reduce_scatters"] else "other (permutes)"


def table() -> str:
    rows = ["| chip | topology | data x fsdp x tensor | widths (D, F, sequences x T per chip) | XLA's gradient reduction |",
            "| --- | --- | --- | --- | --- |"]
    for c in json.loads(OUT.read_text())["cases"]:
        m = c["mesh"]
        rows.append(f"| {c['chip']} | {c['topology']} | {m['data']} x {m['fsdp']} x {m['tensor']} | {c['widths']}: "
                    f"{c['D']}, {c['F']}, {c['sequences_per_chip']} x {c['seq']} | {how(c)} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", nargs=7, metavar=("CHIP", "TOPOLOGY", "DATA,FSDP,TENSOR", "D", "F", "PER_CHIP", "T"),
                    help="compile one case and print its JSON line")
    ap.add_argument("--table", action="store_true", help="print the committed JSON as a markdown table")
    a = ap.parse_args()
    if a.table:
        print(table())
        return
    if a.one:
        chip, topology, mesh_spec, *dims = a.one
        print(json.dumps(compile_one(chip, topology, mesh_spec, *map(int, dims))))
        return
    rows = []
    for chip, topology, mesh_spec, widths in CASES:  # libtpu once per process
        d, f, per_chip, t = WIDTHS[widths]
        out = subprocess.run([sys.executable, __file__, "--one", chip, topology, mesh_spec, str(d), str(f),
                              str(per_chip), str(t)], check=True, capture_output=True, text=True,
                             env={**os.environ, "LIBTPU_INIT_ARGS": ""})
        rows.append({"widths": widths, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    OUT.write_text(json.dumps({"generator": "traces/aot_grad_reduction.py", "cases": rows}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
