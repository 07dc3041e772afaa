"""Compile the ``model.py`` train step ahead of time for a TPU slice, on a CPU-only machine.

libtpu (from ``pip install "jax[tpu]"``) compiles for a TPU topology described by
``jax.experimental.topologies.get_topology_desc`` without any TPU attached, which gives the real
TPU-optimized HLO (fusions, async collectives, the scheduler's order), XLA's cost analysis and its
memory analysis.  These are the ground truth tpusim's Transformer compiler is tested against.

For each case and layer count it writes ``<out>/<case>_L<L>/``:

* ``config.yaml``          the model/step/sharding in MaxText key names (+ ``topology``)
* ``optimized_hlo.txt.gz``    ``compiled.as_text()``
* ``cost_analysis.json``   ``compiled.cost_analysis()``
* ``memory_analysis.json`` every field of ``compiled.memory_analysis()``
* ``memory_usage_report.txt`` XLA's dump of the buffer-assignment memory report, if < 1 MB
* ``summary.json``         collectives extracted from the HLO (``hlo_collectives.py``), counts per
  kind, flops and bytes from cost analysis, versions, compile wall time

and ``<out>/index.json``: the per-case table and the per-layer difference ``L4 - L2``.

Usage (from the repo root, with the jax[tpu] venv; see traces/README.md)::

    /work/venvs/jax/bin/python traces/aot_compile.py                 # all cases, L=2 and L=4
    /work/venvs/jax/bin/python traces/aot_compile.py --case fsdp --layers 2

Each (case, L) compiles in its own subprocess so that ``XLA_FLAGS=--xla_dump_to`` gives one clean
dump directory per compile (the dump itself goes to a temporary directory and is deleted).
"""

from __future__ import annotations

import gzip
import argparse
import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hlo_collectives  # noqa: E402  (standard library only)
from aot_tp_flags import FLAGS as MAXTEXT_LIBTPU_FLAGS  # noqa: E402  (the MaxText v5p 32B run's flags)

# case -> mesh, remat and extra XLA compiler options.  All on one v5e 4x4 slice (16 chips).
# The first three are the reference cases (XLA's defaults).  The "*_no_windowed_einsum" ones are
# the same with XLA TPU's windowed einsum (collective matmul, emitted as while loops of
# collective-permutes) turned off: no while loops, so cost_analysis counts every FLOP (it counts a
# loop body once), and the weight/gradient collectives are plain all-gathers / all-reduces.
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
                      "xla_tpu_enable_windowed_einsum_for_all_gather": False}
CASES: dict[str, dict[str, Any]] = {
    "fsdp": {"fsdp": 16, "tensor": 1, "remat": "none", "compiler_options": {}},
    "fsdp_tp": {"fsdp": 4, "tensor": 4, "remat": "none", "compiler_options": {}},
    "fsdp_remat": {"fsdp": 16, "tensor": 1, "remat": "full", "compiler_options": {}},
    "fsdp_no_windowed_einsum": {"fsdp": 16, "tensor": 1, "remat": "none",
                                "compiler_options": NO_WINDOWED_EINSUM},
    "fsdp_remat_no_windowed_einsum": {"fsdp": 16, "tensor": 1, "remat": "full",
                                      "compiler_options": NO_WINDOWED_EINSUM},
}
# Cases at training sizes (``--cases chips``): every activation is far larger than VMEM (128 MiB on
# v5e/v5p; the small default dims above fit it, so XLA keeps whole layers in VMEM and HBM traffic
# is not what a real run sees). Compiled for v5e:4x4, v5p:2x2x4 and v6e:4x4 into
# ``xla_aot_chips/<chip>/`` (tests/test_aot_compute.py).
BIG_MODEL = {"emb_dim": 2048, "num_query_heads": 16, "num_kv_heads": 8, "head_dim": 128, "mlp_dim": 8192,
             "vocab_size": 32768, "seq_len": 1024, "batch_per_fsdp_shard": 4}
CHIP_CASES: dict[str, dict[str, Any]] = {
    "big_fsdp": {"fsdp": 16, "tensor": 1, "remat": "none", "compiler_options": {}, "model": BIG_MODEL},
    "big_fsdp_remat": {"fsdp": 16, "tensor": 1, "remat": "full", "compiler_options": {}, "model": BIG_MODEL},
    "big_fsdp_tp": {"fsdp": 4, "tensor": 4, "remat": "none", "compiler_options": {}, "model": BIG_MODEL},
}
CASES.update(CHIP_CASES)
# MaxText's tensor parallelism (``--chip v5p --case big_tp_sharded_residual``, with and without
# ``--maxtext-flags``): the residual stream sharded on D over tensor (``activation_embed -> tensor``),
# so each layer all-gathers the activations over tensor before Q/K/V and the MLP and
# reduce-scatters them after O and down; 32 MiB per activation collective (traces/aot_tp_flags.py's
# size). Not in CHIP_CASES: a plain ``--chip`` rerun leaves it alone.
TP_MODEL = {"emb_dim": 4096, "num_query_heads": 32, "num_kv_heads": 32, "head_dim": 128, "mlp_dim": 16384,
            "vocab_size": 32768, "seq_len": 2048, "batch_per_fsdp_shard": 2, "residual_over_tensor": True}
TP_CASES = {"big_tp_sharded_residual": {"fsdp": 4, "tensor": 4, "remat": "none", "compiler_options": {},
                                        "model": TP_MODEL}}
CASES.update(TP_CASES)
CHIP_TOPOLOGIES = {"v5e": ("v5e:4x4", "default"), "v5p": ("v5p:2x2x4", "megacore"), "v6e": ("v6e:4x4", "default")}
LAYER_COUNTS = (2, 4)
DEFAULT_TOPOLOGY = "v5e:4x4"
MAX_REPORT_BYTES = 1 << 20  # keep XLA's memory usage report only if smaller than 1 MiB


def versions() -> dict[str, str]:
    """Versions of jax, jaxlib and libtpu as installed."""
    out = {}
    for pkg in ("jax", "jaxlib", "libtpu"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def get_topology(topology: str, chip_config: str) -> Any:
    """TopologyDescription of a single slice, e.g. ``v5e:4x4`` (one host per 2x2 chips)."""
    from jax.experimental import topologies

    dims = topology.split(":")[1].split("x")
    # v5e/v6e hosts hold 2x2 chips; v4/v5p hosts 2x2x1.
    chips_per_host = (2, 2, 1)
    if len(dims) == 2 and all(int(d) < 2 for d in dims):
        chips_per_host = (1, 1, 1)
    return topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name=chip_config,
                                        chips_per_host_bounds=chips_per_host, num_slices=1)


def make_mesh(devices: list[Any], fsdp: int, tensor: int) -> Any:
    """Mesh ("fsdp", "tensor") laid onto the physical torus as MaxText does (mesh_utils)."""
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    try:
        grid = mesh_utils.create_device_mesh((fsdp, tensor), devices=devices)
    except Exception as exc:  # noqa: BLE001 -- fall back to id order and say so
        print(f"mesh_utils.create_device_mesh failed ({exc}); using device-id order",
              file=sys.stderr)
        grid = np.array(sorted(devices, key=lambda d: d.id)).reshape(fsdp, tensor)
    return Mesh(grid, ("fsdp", "tensor"))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    if isinstance(x, bytes):
        return f"<{len(x)} bytes>"
    try:
        return float(x)
    except (TypeError, ValueError):
        return repr(x)


def memory_analysis_dict(compiled: Any) -> dict[str, Any]:
    """Every public field of ``compiled.memory_analysis()`` (bytes fields shown by size only)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    out = {}
    for attr in sorted(dir(ma)):
        if attr.startswith("_"):
            continue
        v = getattr(ma, attr)
        if callable(v):
            continue
        out[attr] = _jsonable(v)
    return out


def cost_analysis_dict(compiled: Any) -> dict[str, Any]:
    """``compiled.cost_analysis()`` as a dict (older jax returned a one-element list)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return {k: _jsonable(v) for k, v in sorted((ca or {}).items())}


def compile_one(case: str, layers: int, out_root: Path, topology: str, chip_config: str,
                dump_dir: str | None) -> dict[str, Any]:
    """Lower and compile one (case, L); write its directory; return its summary."""
    import yaml

    import model

    spec = CASES[case]
    cfg = model.ModelConfig(num_layers=layers, remat=spec["remat"], **spec.get("model", {}))
    topo = get_topology(topology, chip_config)
    mesh = make_mesh(list(topo.devices), spec["fsdp"], spec["tensor"])
    step = model.jit_train_step(cfg, mesh)
    args = (model.abstract_params(cfg, mesh), *model.abstract_batch(cfg, mesh))

    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=spec["compiler_options"] or None)
    t2 = time.perf_counter()

    out = out_root / f"{case}_L{layers}"
    if out.exists():
        shutil.rmtree(out)  # this script owns the directory; a rerun replaces it whole
    out.mkdir(parents=True)
    hlo_text = compiled.as_text()
    # gzip with a fixed mtime: the same HLO gives the same bytes (about 10x smaller in the repo).
    with gzip.GzipFile(out / "optimized_hlo.txt.gz", "wb", mtime=0) as f:
        f.write(hlo_text.encode())
    cost = cost_analysis_dict(compiled)
    mem = memory_analysis_dict(compiled)
    (out / "cost_analysis.json").write_text(json.dumps(cost, indent=1) + "\n")
    (out / "memory_analysis.json").write_text(json.dumps(mem, indent=1) + "\n")
    mt = model.maxtext_config(cfg, mesh, topology)
    libtpu_args = os.environ.get("LIBTPU_INIT_ARGS", "").strip()
    with open(out / "config.yaml", "w") as f:
        f.write(f"# Written by traces/aot_compile.py (case {case}); MaxText key names.\n")
        if libtpu_args:
            f.write(f"# Compiled with LIBTPU_INIT_ARGS={libtpu_args}\n")
        if spec["compiler_options"]:
            f.write("# XLA compiler options (as LIBTPU_INIT_ARGS): " + " ".join(
                f"--{k}={str(v).lower()}" for k, v in spec["compiler_options"].items()) + "\n")
        yaml.safe_dump(mt, f, sort_keys=False)

    report = None
    if dump_dir:
        reports = sorted(Path(dump_dir).glob("*memory-usage-report.txt"))
        # One module per process, but jax may compile tiny helpers too: keep the step's (largest).
        reports = [r for r in reports if "jit_step" in r.name] or reports
        if reports:
            best = max(reports, key=lambda r: r.stat().st_size)
            if best.stat().st_size < MAX_REPORT_BYTES:
                shutil.copy(best, out / "memory_usage_report.txt")
                report = best.name

    coll = hlo_collectives.extract_collectives(hlo_text)
    summary = {
        "case": case,
        "num_layers": layers,
        "topology": topology,
        "chip_config_name": chip_config,
        "device_kind": topo.devices[0].device_kind,
        "mesh_axes": {"fsdp": spec["fsdp"], "tensor": spec["tensor"]},
        "mesh_device_ids": [[int(d.id) for d in row] for row in mesh.devices],
        "mesh_device_coords": [[list(d.coords) for d in row] for row in mesh.devices],
        "remat": spec["remat"],
        "compiler_options": spec["compiler_options"],
        "libtpu_init_args": libtpu_args,
        "model": dataclasses.asdict(cfg),
        "global_batch": model.global_batch_size(cfg, mesh),
        "param_bytes_global": model.param_bytes(cfg),
        "versions": versions(),
        "lower_wall_s": round(t1 - t0, 3),
        "compile_wall_s": round(t2 - t1, 3),
        "cost_analysis": {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
                          "transcendentals": cost.get("transcendentals"),
                          "optimal_seconds": cost.get("optimal_seconds")},
        "memory_analysis": mem,
        "xla_memory_usage_report": report,
        **coll,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[{case}_L{layers}] lower {t1 - t0:.1f}s compile {t2 - t1:.1f}s "
          f"flops {cost.get('flops'):.4g}")
    print(hlo_collectives.counts_table(coll))
    return summary


# ---------------------------------------------------------------------------------------------
# Index with per-layer differences
# ---------------------------------------------------------------------------------------------

def _by_kind(summary: dict[str, Any]) -> dict[str, dict[str, int]]:
    return summary.get("counts_by_kind", {})


def write_index(out_root: Path) -> dict[str, Any]:
    """``index.json``: per case and L the counts per kind, flops, and the ``L4 - L2`` difference.

    The per-layer difference divides ``L4 - L2`` by 2.
    """
    index: dict[str, Any] = {"cases": {}}
    for case in CASES:
        runs = {}
        for layers in LAYER_COUNTS:
            p = out_root / f"{case}_L{layers}" / "summary.json"
            if p.exists():
                runs[layers] = json.loads(p.read_text())
        if not runs:
            continue
        entry: dict[str, Any] = {}
        for layers, s in runs.items():
            entry[f"L{layers}"] = {
                "counts_by_kind": _by_kind(s),
                "flops": s["cost_analysis"]["flops"],
                "bytes_accessed": s["cost_analysis"]["bytes_accessed"],
                "compile_wall_s": s["compile_wall_s"],
                "memory_analysis": {k: s["memory_analysis"].get(k) for k in (
                    "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                    "temp_size_in_bytes", "generated_code_size_in_bytes",
                    "peak_memory_in_bytes")},
            }
        if 2 in runs and 4 in runs:
            a, b = _by_kind(runs[2]), _by_kind(runs[4])
            fields = ("count", "executed", "operand_bytes", "result_bytes",
                      "executed_operand_bytes", "executed_result_bytes")
            per_layer = {}
            for kind in sorted(set(a) | set(b)):
                ca, cb = a.get(kind, {}), b.get(kind, {})
                per_layer[kind] = {f: (None if ca.get(f, 0) is None or cb.get(f, 0) is None
                                       else (cb.get(f, 0) - ca.get(f, 0)) / 2) for f in fields}
            layer_param_bytes = runs[2]["param_bytes_global"]["per_layer_total"]
            ag = per_layer.get("all-gather", {})
            entry["per_layer_from_L4_minus_L2"] = {
                "counts_by_kind": per_layer,
                "flops": (runs[4]["cost_analysis"]["flops"] - runs[2]["cost_analysis"]["flops"]) / 2,
                "bytes_accessed": (runs[4]["cost_analysis"]["bytes_accessed"]
                                   - runs[2]["cost_analysis"]["bytes_accessed"]) / 2,
                "layer_param_bytes_global": layer_param_bytes,
                # How many full copies of one layer's weights each device gathers per step
                # (forward + backward re-gather, times tensor-parallel split).
                "all_gather_result_bytes_over_layer_param_bytes":
                    (ag.get("result_bytes") or 0) / layer_param_bytes,
            }
        index["cases"][case] = entry
    any_run = next(iter(json.loads(p.read_text()) for p in sorted(out_root.glob("*/summary.json"))),
                   None)
    if any_run:
        index["versions"] = any_run["versions"]
        index["topology"] = any_run["topology"]
        index["param_bytes_global_L2"] = any_run["param_bytes_global"]
    (out_root / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append",
                    help="case to compile (repeatable; default all)")
    ap.add_argument("--layers", type=int, action="append", help="L (repeatable; default 2 and 4)")
    ap.add_argument("--out", type=Path, default=HERE / "xla_aot")
    ap.add_argument("--topology", default=DEFAULT_TOPOLOGY)
    ap.add_argument("--chip-config", default="default",
                    help='chip_config_name; "megacore" for v4/v5p')
    ap.add_argument("--in-process", action="store_true",
                    help="compile here instead of one subprocess per (case, L)")
    ap.add_argument("--chip", dest="chips", choices=sorted(CHIP_TOPOLOGIES), action="append",
                    help="compile the training-size cases for this chip into xla_aot_chips/CHIP (repeatable)")
    ap.add_argument("--maxtext-flags", action="store_true",
                    help="with --chip: compile with the LIBTPU flags of MaxText's published runs "
                         "(aot_tp_flags.FLAGS) into xla_aot_chips_maxtext/CHIP")
    ns = ap.parse_args()
    if ns.maxtext_flags and not ns.chips:
        ap.error("--maxtext-flags needs --chip")
    cases = ns.case or [c for c in CASES if c not in CHIP_CASES and c not in TP_CASES]
    if ns.chips:  # the training-size cases for each chip, each into its own folder
        for chip in ns.chips:
            topology, chip_config = CHIP_TOPOLOGIES[chip]
            out = HERE / ("xla_aot_chips_maxtext" if ns.maxtext_flags else "xla_aot_chips") / chip
            out.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ)
            if ns.maxtext_flags:  # libtpu reads its flags from the environment when it loads
                env["LIBTPU_INIT_ARGS"] = (env.get("LIBTPU_INIT_ARGS", "") + " " + MAXTEXT_LIBTPU_FLAGS).strip()
            cmd = [sys.executable, __file__, "--out", str(out), "--topology", topology, "--chip-config", chip_config]
            for case in ns.case or CHIP_CASES:
                cmd += ["--case", case]
            for layers in ns.layers or []:
                cmd += ["--layers", str(layers)]
            if subprocess.run(cmd, env=env).returncode:
                sys.exit(f"failed: {chip}")
        return
    layer_counts = ns.layers or list(LAYER_COUNTS)

    if ns.in_process:
        for case in cases:
            for layers in layer_counts:
                compile_one(case, layers, ns.out, ns.topology, ns.chip_config,
                            os.environ.get("TPUSIM_XLA_DUMP_DIR"))
        return

    failures = []
    for case in cases:
        for layers in layer_counts:
            with tempfile.TemporaryDirectory(prefix="xla_dump_") as dump:
                env = dict(os.environ)
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
                env["TPUSIM_XLA_DUMP_DIR"] = dump
                env.setdefault("JAX_PLATFORMS", "cpu")  # no TPU attached; AOT needs no backend
                cmd = [sys.executable, __file__, "--in-process", "--case", case, "--layers",
                       str(layers), "--out", str(ns.out), "--topology", ns.topology,
                       "--chip-config", ns.chip_config]
                r = subprocess.run(cmd, env=env)
                if r.returncode:
                    failures.append(f"{case}_L{layers}")
    index = write_index(ns.out)
    for case, e in index["cases"].items():
        if "per_layer_from_L4_minus_L2" in e:
            print(f"[{case}] per layer (L4-L2)/2:",
                  json.dumps(e["per_layer_from_L4_minus_L2"]["counts_by_kind"]))
    if failures:
        sys.exit(f"failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
