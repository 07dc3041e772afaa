"""Capture a real XLA profile of the ``model.py`` train step (L=2) on 8 fake CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` gives 8 CPU "devices", enough to run the
sharded step with real SPMD collectives.  For each case the script compiles the step, runs one
warm-up step, then profiles a few steps with ``jax.profiler.trace`` and writes ``<out>/<case>/``:

* ``profile/plugins/profile/<run>/<host>.xplane.pb`` (+ ``perfetto_trace.json.gz``)
* ``config.yaml``        the model/step/sharding in MaxText key names, ``topology: cpu:8``
* ``optimized_hlo.txt.gz``  the compiled step's HLO (``compiled.as_text()``)
* ``summary.json``       collectives extracted from that HLO (``hlo_collectives.py``), the
  collective events seen in the profile, step wall times, losses, versions, file sizes

Usage (from the repo root, with the jax venv; see traces/README.md)::

    /work/venvs/jax/bin/python traces/capture_cpu.py              # both cases
    /work/venvs/jax/bin/python traces/capture_cpu.py --case fsdp

Each case runs in its own subprocess, so the XLA flag is set before jax is imported and the two
profiles do not share a profiler session.
"""

from __future__ import annotations

import gzip
import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hlo_collectives  # noqa: E402  (standard library only)

NUM_CPU_DEVICES = 8
CASES: dict[str, dict[str, Any]] = {
    "fsdp": {"fsdp": 8, "tensor": 1, "remat": "none"},
    "fsdp_tp": {"fsdp": 4, "tensor": 2, "remat": "none"},
}
NUM_LAYERS = 2
PROFILED_STEPS = 2
HOST_TRACER_LEVEL = 2  # jax default
COLLECTIVE_EVENT_RE = re.compile(
    r"^(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start|-done)?\b")


def profile_collective_events(xplane: Path) -> dict[str, Any]:
    """Count the collective op events in an xplane.pb (by HLO kind), per plane and line.

    Uses ``jax.profiler.ProfileData`` (jaxlib).  On the CPU backend all events sit on the
    ``/host:CPU`` plane, in per-thread lines.
    """
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(str(xplane))
    kinds: Counter[str] = Counter()
    names: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    planes = []
    total = 0
    for plane in pd.planes:
        planes.append(plane.name)
        for line in plane.lines:
            for ev in line.events:
                total += 1
                m = COLLECTIVE_EVENT_RE.match(ev.name)
                if m:
                    kinds[m.group(1)] += 1
                    names[ev.name] += 1
                    lines[f"{plane.name} / {line.name}"] += 1
    return {"planes": planes, "num_events": total,
            "collective_events_by_kind": dict(sorted(kinds.items())),
            "collective_events_by_name": dict(sorted(names.items())),
            "collective_events_by_line": dict(sorted(lines.items()))}


def capture_one(case: str, out_root: Path, steps: int, host_tracer_level: int) -> dict[str, Any]:
    """Compile, warm up and profile one case; write its directory; return its summary."""
    import importlib.metadata

    import jax
    import numpy as np
    import yaml
    from jax.sharding import Mesh

    import model

    spec = CASES[case]
    devices = jax.devices()
    if len(devices) != NUM_CPU_DEVICES or devices[0].platform != "cpu":
        raise SystemExit(f"expected {NUM_CPU_DEVICES} CPU devices, got {devices}")
    cfg = model.ModelConfig(num_layers=NUM_LAYERS, remat=spec["remat"])
    mesh = Mesh(np.array(devices).reshape(spec["fsdp"], spec["tensor"]), ("fsdp", "tensor"))
    step = model.jit_train_step(cfg, mesh)

    out = out_root / case
    if out.exists():
        shutil.rmtree(out)  # this script owns the directory; a rerun replaces it
    out.mkdir(parents=True)

    t0 = time.perf_counter()
    compiled = step.lower(model.abstract_params(cfg, mesh), *model.abstract_batch(cfg, mesh)).compile()
    compile_s = time.perf_counter() - t0
    hlo_text = compiled.as_text()
    # gzip with a fixed mtime: the same HLO gives the same bytes (about 10x smaller in the repo).
    with gzip.GzipFile(out / "optimized_hlo.txt.gz", "wb", mtime=0) as f:
        f.write(hlo_text.encode())

    params = model.init_params(cfg, mesh)
    tokens, targets = model.random_batch(cfg, mesh)
    # Warm-up: the first call also places buffers; not profiled.
    t0 = time.perf_counter()
    params, loss = compiled(params, tokens, targets)
    loss.block_until_ready()
    warmup_s = time.perf_counter() - t0
    losses = [float(loss)]

    step_s = []
    prof_dir = out / "profile"
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level = host_tracer_level
    options.python_tracer_level = 0  # Python frames add size, not information about XLA ops
    with jax.profiler.trace(str(prof_dir), create_perfetto_trace=True, profiler_options=options):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                t0 = time.perf_counter()
                params, loss = compiled(params, tokens, targets)
                loss.block_until_ready()
                step_s.append(time.perf_counter() - t0)
            losses.append(float(loss))

    files = sorted(p for p in prof_dir.rglob("*") if p.is_file())
    xplanes = [p for p in files if p.name.endswith(".xplane.pb")]
    events = profile_collective_events(xplanes[0]) if xplanes else {}

    mt = model.maxtext_config(cfg, mesh, f"cpu:{NUM_CPU_DEVICES}")
    with open(out / "config.yaml", "w") as f:
        f.write(f"# Written by traces/capture_cpu.py (case {case}); MaxText key names.\n")
        yaml.safe_dump(mt, f, sort_keys=False)

    coll = hlo_collectives.extract_collectives(hlo_text)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    summary = {
        "case": case,
        "num_layers": NUM_LAYERS,
        "topology": f"cpu:{NUM_CPU_DEVICES}",
        "mesh_axes": {"fsdp": spec["fsdp"], "tensor": spec["tensor"]},
        "mesh_device_ids": [[int(d.id) for d in row] for row in mesh.devices],
        "remat": spec["remat"],
        "model": dataclasses.asdict(cfg),
        "global_batch": model.global_batch_size(cfg, mesh),
        "param_bytes_global": model.param_bytes(cfg),
        "versions": {p: importlib.metadata.version(p) for p in ("jax", "jaxlib")},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "profiler_options": {"host_tracer_level": host_tracer_level, "python_tracer_level": 0},
        "compile_wall_s": round(compile_s, 3),
        "warmup_step_wall_s": round(warmup_s, 3),
        "profiled_step_wall_s": [round(s, 3) for s in step_s],
        "losses": losses,
        "cost_analysis": {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")},
        "profile_files": {str(p.relative_to(out)): p.stat().st_size for p in files},
        "profile": events,
        **coll,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[cpu {case}] compile {compile_s:.1f}s warm-up {warmup_s:.1f}s steps "
          f"{', '.join(f'{s:.1f}' for s in step_s)}s losses {', '.join(f'{x:.4f}' for x in losses)}")
    print(hlo_collectives.counts_table(coll))
    print("profile collective events:", events.get("collective_events_by_kind"))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append",
                    help="case to capture (repeatable; default all)")
    ap.add_argument("--out", type=Path, default=HERE / "cpu")
    ap.add_argument("--steps", type=int, default=PROFILED_STEPS, help="profiled steps")
    ap.add_argument("--host-tracer-level", type=int, default=HOST_TRACER_LEVEL,
                    help="1: XLA ops and annotations only; 2: also runtime internals")
    ap.add_argument("--in-process", action="store_true",
                    help="run here (XLA_FLAGS must already give 8 CPU devices)")
    ns = ap.parse_args()
    cases = ns.case or list(CASES)
    if ns.in_process:
        for case in cases:
            capture_one(case, ns.out, ns.steps, ns.host_tracer_level)
        return
    failures = []
    for case in cases:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={NUM_CPU_DEVICES}").strip()
        env["JAX_PLATFORMS"] = "cpu"  # jax[tpu] is installed, but there is no TPU here
        r = subprocess.run([sys.executable, __file__, "--in-process", "--case", case, "--out",
                            str(ns.out), "--steps", str(ns.steps),
                            "--host-tracer-level", str(ns.host_tracer_level)], env=env)
        if r.returncode:
            failures.append(case)
    if failures:
        sys.exit(f"failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
