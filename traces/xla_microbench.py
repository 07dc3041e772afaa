"""libtpu's own cost model on microbenchmark kernels, for every TPU generation it compiles for.

No TPU is needed: libtpu compiles for a TPU topology ahead of time on the CPU (as ``aot_compile.py``
does), and every fusion of the compiled HLO carries XLA's per-op estimate
(``backend_config={... "estimated_cycles":"N" ...}``), the cost model XLA's own scheduler uses.
This script compiles, on one chip of each generation:

* bf16 GEMMs ``[M, K] x [K, N]`` (f32 accumulation, bf16 result): a ladder of square sizes and the
  per-device matmul shapes of the published MaxText runs in ``workloads/measured/``;
* the vector kernels of a Transformer step at per-device sizes: residual add, RMSNorm, rotary
  embedding, SiLU-gated product, softmax cross-entropy over the vocabulary, the AdamW update over
  f32 master weights, the f32 -> bf16 weight cast, and a softmax over attention scores.

and writes ``traces/xla_microbench.json``: per chip and kernel, XLA's estimated cycles, the kernel's
HBM bytes (inputs + outputs), elements, and FLOPs. ``python -m tpusim.analysis.xlacost`` compares
tpusim's cost model with these estimates (table in docs/VALIDATION.md).

Where XLA's estimates can be checked against hardware: the TPU7x GEMM curve measured by
AI-Hypercomputer/accelerator-microbenchmarks (``topologies/collective_measurements.yaml``, compute:
tpu7x) and the v6e capture's broadcast-add fusion (``traces/real/tpu-v6e-host-offload``; its HLO
carries the estimate). Both comparisons are in the JSON's ``checks`` section.

Usage::

    /work/venvs/jax/bin/python traces/xla_microbench.py        # compile (the jax[tpu] venv of
                                                               # traces/requirements-jax.txt), ~3 minutes
    python traces/xla_microbench.py --report                   # the tables, from the committed JSON
                                                               # (tpusim's venv; no jax needed)

What the estimates are worth (docs/VALIDATION.md, "XLA's own cost model"): matmul fusions carry
``cost_model_type: COST_MODEL_TYPE_CLASSIC``; the vector (loop) fusions carry
``COST_MODEL_TYPE_INVALID``, i.e. no model, and their cycles are a fallback (a bf16 add at 24-32% of
HBM bandwidth; TPU7x's cross-entropy a 9.2e18 sentinel; the v6e capture's plain broadcast 3.5x its
measured time) - they are recorded, not used.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# chip -> (topology, chip_config) of one chip; libtpu 0.0.42 knows these names.
CHIPS = {"v4": ("v4:1x1x1", "megacore"), "v5e": ("v5e:1x1", "default"), "v5p": ("v5p:1x1x1", "megacore"),
         "v6e": ("v6e:1x1", "default"), "tpu7x": ("tpu7x:1x1x1", "default")}
SQUARE = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Per-device matmul shapes (M, K, N) of the published runs (tokens per device x model dims), as
# tpusim's compiler emits them (forward, and the two backward products).
RUN_SHAPES = {
    "v4": [(26624, 6144, 24576), (26624, 24576, 6144), (6144, 26624, 24576), (26624, 6144, 3072)],
    "v5e": [(12288, 4096, 28672), (12288, 28672, 4096), (4096, 12288, 28672), (12288, 4096, 8192)],
    "v5p": [(49152, 8192, 7168), (49152, 7168, 8192), (8192, 49152, 7168), (49152, 8192, 2048)],
    "v6e": [(24576, 4096, 14336), (24576, 14336, 4096), (4096, 24576, 14336), (16384, 8192, 28672),
            (16384, 28672, 8192), (8192, 16384, 28672)],
    "tpu7x": [],
}
TOKENS, D, F, VOCAB, HEADS, SEQ = 16384, 4096, 14336, 32000, 32, 2048
PARAMS = 1 << 27  # 134M f32 parameters for the optimizer kernels


def vector_kernels(jnp, jax):
    """name -> (function, argument ShapeDtypeStructs, elements, FLOPs as tpusim counts them)."""
    bf, f32 = jnp.bfloat16, jnp.float32
    S = jax.ShapeDtypeStruct
    act = S((TOKENS, D), bf)

    def rmsnorm(x, s):
        xf = x.astype(f32)
        return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)).astype(bf) * s

    def rope(x, c, s):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def xent(logits, labels):
        lf = logits.astype(f32)
        lse = jax.nn.logsumexp(lf, axis=-1)
        return jnp.sum(lse - jnp.take_along_axis(lf, labels[:, None], axis=-1)[:, 0])

    def adam(p, m, v, g):
        m2 = 0.9 * m + 0.1 * g
        v2 = 0.999 * v + 0.001 * g * g
        return p - 1e-3 * (m2 / (jnp.sqrt(v2) + 1e-8) + 0.1 * p), m2, v2

    def scores_softmax(s):
        return jax.nn.softmax(s.astype(f32), axis=-1).astype(bf)

    n_act = TOKENS * D
    return {
        "residual_add": (lambda x, y: x + y, [act, act], n_act, n_act),
        "rmsnorm": (rmsnorm, [act, S((D,), bf)], n_act, 4 * n_act),
        "rope": (rope, [act, S((TOKENS, D // 2), bf), S((TOKENS, D // 2), bf)], n_act, 6 * n_act),
        "silu_gate": (lambda g, u: jax.nn.silu(g) * u, [S((TOKENS, F), bf)] * 2, TOKENS * F, 5 * TOKENS * F),
        "softmax_xent": (xent, [S((TOKENS // 4, VOCAB), bf), S((TOKENS // 4,), jnp.int32)], TOKENS // 4 * VOCAB,
                         6 * TOKENS // 4 * VOCAB),
        "adamw_update": (adam, [S((PARAMS,), f32)] * 4, PARAMS, 12 * PARAMS),
        "cast_f32_bf16": (lambda w: w.astype(bf), [S((PARAMS,), f32)], PARAMS, PARAMS),
        "scores_softmax": (scores_softmax, [S((4, HEADS, SEQ, SEQ), f32)], 4 * HEADS * SEQ * SEQ,
                           5 * 4 * HEADS * SEQ * SEQ),
    }


def cycles(compiled_text: str) -> int:
    return sum(int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"', compiled_text))


def nbytes(structs, outs) -> int:
    import numpy as np
    return int(sum(np.prod(s.shape) * s.dtype.itemsize for s in [*structs, *outs]))


def main(path: Path = HERE / "xla_microbench.json") -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    out = {"versions": {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "libtpu")},
           "chips": {}}
    for chip, (name, config) in CHIPS.items():
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=config,
                                            chips_per_host_bounds=(1, 1, 1), num_slices=1)
        dev = topo.devices[0]
        mesh = Mesh(np.array([dev]), ("x",))
        rep = NamedSharding(mesh, P())
        rows = {"device_kind": dev.device_kind, "gemm": [], "vector": {}}

        def compile_(fn, structs):
            structs = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep) for s in structs]
            lowered = jax.jit(fn).lower(*structs)
            outs = jax.tree_util.tree_leaves(lowered.out_info)
            return cycles(lowered.compile().as_text()), nbytes(structs, outs)

        for m, k, n in [(s, s, s) for s in SQUARE] + RUN_SHAPES[chip]:
            fn = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)  # noqa: E731
            c, b = compile_(fn, [jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((k, n), jnp.bfloat16)])
            rows["gemm"].append({"m": m, "k": k, "n": n, "flops": 2.0 * m * k * n, "bytes": b, "cycles": c})
            print(chip, "gemm", m, k, n, c, flush=True)
        for kname, (fn, structs, elements, flops) in vector_kernels(jnp, jax).items():
            c, b = compile_(fn, structs)
            rows["vector"][kname] = {"elements": elements, "flops": flops, "bytes": b, "cycles": c}
            print(chip, kname, c, b, flush=True)
        out["chips"][chip] = rows
    # XLA's estimate of the v6e capture's broadcast-add fusion (its own HLO) against the measured time.
    hlo = (HERE / "real" / "tpu-v6e-host-offload" / "hlo" / "jit_f.hlo.txt").read_text()
    out["checks"] = {"v6e_broadcast_add_fusion": {
        "estimated_cycles": int(re.search(r'"estimated_cycles":"(\d+)"', hlo).group(1)),
        "measured_us": [8155.3, 7976.5, 7918.0],
        "measured_source": "traces/real/tpu-v6e-host-offload/tpu_inference_2.hlo_stats.json (avg self time, 400 runs each)"}}
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path, file=sys.stderr)


def mxu_flops_per_cycle(chip) -> float:
    """bf16 MXU FLOPs per cycle of one XLA device: the whole chip under megacore, one TensorCore on
    TPU7x (libtpu shows its two TensorCores as two devices)."""
    per_core = chip.mxus_per_core * chip.mxu_dim ** 2 * 2
    return per_core * (1 if chip.name == "tpu7x" else chip.cores_per_chip)


def report(path: Path = HERE / "xla_microbench.json") -> str:
    """Markdown tables: XLA's GEMM efficiency beside tpusim's calibrated one, per chip; TPU7x's
    estimates beside its measured curve."""
    import math

    sys.path.insert(0, str(HERE.parent))
    import yaml

    from tpusim.sim.chips import get_chip
    from tpusim.sim.costmodel import compute_params, mxu_rate
    from tpusim.sim.program import COMPUTE, Op

    data = json.loads(path.read_text())
    lines = ["| chip | M x K x N | XLA: fraction of MXU peak | tpusim (calibrated) |", "| --- | --- | ---: | ---: |"]
    for name, rows in data["chips"].items():
        chip = get_chip(name)
        cp = compute_params(chip, "calibrated")
        fpc = mxu_flops_per_cycle(chip)
        for g in rows["gemm"]:
            xla = g["flops"] / (g["cycles"] * fpc)
            op = Op(index=0, name="gemm", stream=COMPUTE, category="matmul", flops=g["flops"], mxu_shape=(g["m"], g["k"], g["n"]))
            ours = mxu_rate(op, cp) / chip.bf16_flops_per_s
            lines.append(f"| {name} | {g['m']} x {g['k']} x {g['n']} | {xla:.3f} | {ours:.3f} |")
    measured = yaml.safe_load((HERE.parent / "topologies" / "collective_measurements.yaml").read_text())
    curve = measured["compute"]["tpu7x"]["gemm_tflops_per_device"]
    fpc = mxu_flops_per_cycle(get_chip("tpu7x"))
    lines += ["", "| TPU7x m = n = k | measured TFLOP/s per device | XLA FLOPs per cycle | clock that would make them equal (GHz) |",
              "| ---: | ---: | ---: | ---: |"]
    for g in data["chips"]["tpu7x"]["gemm"]:
        if g["m"] in curve:
            per_cycle = g["flops"] / g["cycles"]
            lines.append(f"| {g['m']} | {curve[g['m']]} | {per_cycle:,.0f} | {curve[g['m']] * 1e12 / per_cycle / 1e9:.2f} |")
    chk = data["checks"]["v6e_broadcast_add_fusion"]
    clock = get_chip("v6e").bf16_flops_per_s / mxu_flops_per_cycle(get_chip("v6e"))
    est = chk["estimated_cycles"] / clock * 1e6
    lines += ["", f"v6e capture, broadcast-add fusion: XLA estimates {est:,.0f} us at {clock / 1e9:.2f} GHz; measured "
              f"{sum(chk['measured_us']) / 3:,.0f} us (mean of {', '.join(str(x) for x in chk['measured_us'])})."]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", action="store_true", help="print the tables from the committed JSON (no jax)")
    ap.add_argument("--out", type=Path, default=HERE / "xla_microbench.json", help="where the compile writes")
    ns = ap.parse_args()
    print(report()) if ns.report else main(ns.out)
