"""Speed benchmark of the simulator (not a test: timings belong here, machines are noisy).

    python -m tpusim.bench              # issue 13's figures against their targets, then the per-case table
    python -m tpusim.bench --repeat 5
    python -m tpusim.bench --only targets   # or: cases

The first table is what a user feels, each figure beside its target (median of --repeat): import
time of ``tpusim --help`` and of ``tpusim run`` (``python -X importtime``, top-level imports summed),
the wall time of whole ``tpusim run`` processes (start-up included), and sweep configurations per
second. Each figure also shows the CPU time it took (user + system, children included) and what an
idle machine would show (a one-threaded process's wall time is about its CPU time; a sweep keeps its
workers' cores busy): on a machine other jobs share, wall time grows with the load and CPU time much
less, so the load average is printed too. The processes run with bytecode caches, as an installed
tpusim does (see ``_child_env``). "met" judges the measured figure, never the estimate. The second table runs each case in a fresh process (so peak memory is its own): compile and
simulate wall time, events and peak resident memory; the flatness cases run one per-device program on
ever larger v5p slices (the cost must not grow with chips), the layers cases 16, 32 and 80 layers of
the 70B (it may grow at most linearly).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    ("fsdp_70b on v5e:16x16", "workloads/fsdp_70b.yaml", None, None),
    ("70B fsdp x tensor, full v5p pod (8,960 chips)", "workloads/pod_70b_fsdp_tp.yaml", None, None),
    ("fsdp_70b on 4 v5e pods over DCN (1,024 chips)", "workloads/fsdp_70b_4slices.yaml", None, None),
    ("flatness: llama3-8b fsdp x tensor on v5p:4x4x4 (64)", "workloads/llama3_8b_fsdp_tp.yaml", "v5p:4x4x4", None),
    ("flatness: llama3-8b fsdp x tensor on v5p:8x8x8 (512)", "workloads/llama3_8b_fsdp_tp.yaml", "v5p:8x8x8", None),
    ("flatness: llama3-8b fsdp x tensor on v5p:16x16x16 (4,096)", "workloads/llama3_8b_fsdp_tp.yaml", "v5p:16x16x16", None),
    ("layers: fsdp_70b with 16 layers on v5e:16x16", "workloads/fsdp_70b.yaml", None, {"base_num_decoder_layers": 16}),
    ("layers: fsdp_70b with 32 layers on v5e:16x16", "workloads/fsdp_70b.yaml", None, {"base_num_decoder_layers": 32}),
]

_CHILD = """
import json, resource, sys, time
from tpusim.api import compile_workload
from tpusim.sim.engine import simulate
path, topo, overrides, repeat = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3]), int(sys.argv[4])
compile_s, sim_s = [], []
for _ in range(repeat):
    t0 = time.perf_counter()
    w, t, p = compile_workload(path, topo, overrides=overrides or None)
    t1 = time.perf_counter()
    r = simulate(p, t)
    t2 = time.perf_counter()
    compile_s.append(t1 - t0); sim_s.append(t2 - t1)
try:  # this process's own peak (ru_maxrss would keep the parent's across fork + exec)
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
except (OSError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"chips": t.num_chips, "ops": len(p.ops), "events": r.events, "compile_s": compile_s,
                  "sim_s": sim_s, "peak_rss_mb": peak,
                  "step_time_s": r.step_time_s}))
"""

RUN = ["run", "workloads/fsdp_70b.yaml", "--topology", "16x16"]
POD = ["run", "workloads/pod_70b_fsdp_tp.yaml"]

# The sweep grids of the issue, on v5e:16x16 with the shipped fsdp_70b (LLaMA-3 70B, 80 layers).
SWEEP_64 = {"per_device_batch_size": (0.5, 1, 2, 4), "remat_policy": ("full", "minimal"),
            "ici_tensor_parallelism": (1, 2, 4, 8), "max_target_length": (2048, 4096)}
SWEEP_16 = {"ici_tensor_parallelism": (1, 2, 4, 8), "max_target_length": (1024, 2048, 3072, 4096)}


def _child_env() -> dict:
    """The environment of the measured processes: with bytecode caches, as a user's install has them
    (pip compiles them; an editable install writes them on first import). Where the environment turns
    writing them off (PYTHONDONTWRITEBYTECODE), every import would compile its module's source again
    (0.1 s of tpusim's start-up): the children then keep their caches in a folder of their own."""
    env = dict(os.environ)
    if env.pop("PYTHONDONTWRITEBYTECODE", None) and "PYTHONPYCACHEPREFIX" not in env:
        env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "tpusim-bench-pycache")
    return env


def run_case(path: str, topology: str | None, overrides: dict | None, repeat: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, path, topology or "", json.dumps(overrides or {}),
                          str(repeat)], capture_output=True, text=True, check=True, env=_child_env())
    return json.loads(out.stdout)


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the child) of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_child_env())
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_seconds(args: list[str]) -> float:
    """Seconds ``python -X importtime -m tpusim ARGS`` spends importing (top-level imports' cumulative
    times summed: the interpreter's own start-up modules included, about 10 ms)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "tpusim", *args], capture_output=True,
                         text=True, check=True, env=_child_env())
    total_us = 0
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)  # top level: name not indented
        if m:
            total_us += int(m.group(1))
    return total_us / 1e6


def process_seconds(args: list[str]) -> tuple[float, float]:
    return _timed([sys.executable, "-m", "tpusim", *args])


def run_out_seconds() -> tuple[float, float]:
    tmp = Path(tempfile.mkdtemp(prefix="tpusim-bench-"))
    try:
        return process_seconds([*RUN, "--out", str(tmp / "run")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep_rate(vary: dict, workers: int) -> tuple[float, float, int, int]:
    """Configurations per second of one sweep in this process's workers (start-up of the pool included),
    the CPU seconds it took (this process and its workers), how many configurations ran ``ok`` and how
    many ran."""
    from tpusim.data import data_dir
    from tpusim.explore.sweep import make_sweep, run_sweep

    sweep = make_sweep(data_dir("workloads") / "fsdp_70b.yaml", vary, topology="v5e:16x16", yes=True)
    cpu0 = _cpu_now()
    run = run_sweep(sweep, workers=workers)
    ok = int((run.rows["status"] == "ok").sum())
    return run.total / run.wall_s, _cpu_now() - cpu0, ok, run.total


def _cpu_now() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# (figure, target, "<=" or ">=", unit, today before issue 13 (measured in the issue on this machine), how)
TARGETS = [
    ("import time, `tpusim --help`", 0.15, "<=", "s", "0.8-1.0", lambda r: (import_seconds(["--help"]), None)),
    ("import time, `tpusim run` (no --out)", 0.15, "<=", "s", "~1", lambda r: (import_seconds(RUN), None)),
    ("`tpusim run fsdp_70b --topology 16x16` (process)", 0.5, "<=", "s", "1.4-1.5", lambda r: process_seconds(RUN)),
    ("`tpusim run pod_70b_fsdp_tp` (v5p, 8,960 chips)", 1.0, "<=", "s", "-", lambda r: process_seconds(POD)),
    ("`tpusim run fsdp_70b --topology 16x16 --out DIR`", 1.0, "<=", "s", "3.5-5.7", lambda r: run_out_seconds()),
    ("sweep: 64 configs of fsdp_70b (batch x remat x tensor x seq)", 100, ">=", "configs/s", "~6",
     lambda r: sweep_rate(SWEEP_64, r.workers)),
    ("sweep: 16 configs of fsdp_70b (tensor x seq), 80 layers, distinct programs", 20, ">=", "configs/s", "~6-7",
     lambda r: sweep_rate(SWEEP_16, r.workers)),
]


def targets_table(args) -> None:
    for cmd in (["--help"], RUN):  # fill the bytecode caches (see _child_env) before anything is timed
        subprocess.run([sys.executable, "-m", "tpusim", *cmd], check=True, capture_output=True, env=_child_env())
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores; median of "
          f"{args.repeat}; sweeps on {args.workers} worker processes\n")
    print("| figure | target | today | CPU (s) | idle machine (estimate) | met | before (issue 13) |")
    print("| --- | ---: | ---: | ---: | ---: | :---: | ---: |")
    for name, target, sense, unit, before, measure in TARGETS:
        samples = [measure(args) for _ in range(args.repeat)]
        value = statistics.median(x[0] for x in samples)
        cpu = None if samples[0][1] is None else statistics.median(x[1] for x in samples)
        fmt = (lambda v: f"{v:.2f} s") if unit == "s" else (lambda v: f"{v:.1f}/s")
        # What an idle machine would show: a one-threaded process's wall time is about its CPU time; a
        # sweep keeps min(workers, cores) cores busy.
        idle = "-" if cpu is None else fmt(cpu)
        if len(samples[0]) > 2:  # a sweep: how many configurations fit (the others are refused quickly)
            name += f" ({samples[0][2]} fit)"
            idle = fmt(samples[0][3] * min(args.workers, os.cpu_count() or 1) / cpu)
        met = value <= target if sense == "<=" else value >= target
        cpu_txt = "-" if cpu is None else f"{cpu:.2f}"
        print(f"| {name} | {sense} {fmt(target)} | {fmt(value)} | {cpu_txt} | {idle} | {'yes' if met else 'no'} "
              f"| {before} {unit} |", flush=True)
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")


def cases_table(args) -> None:
    print("| case | chips | ops | events | compile (s) | simulate (s) | peak memory (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, path, topo, overrides in CASES:
        r = run_case(path, topo, overrides, args.repeat)
        print(f"| {name} | {r['chips']:,} | {r['ops']:,} | {r['events']:,} | {statistics.median(r['compile_s']):.3f} "
              f"| {statistics.median(r['sim_s']):.3f} | {r['peak_rss_mb']:.0f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="sweep worker processes")
    parser.add_argument("--only", choices=["targets", "cases"], default=None)
    args = parser.parse_args(argv)
    if not Path("workloads").is_dir():  # the cases name the repository's workloads
        os.chdir(Path(__file__).resolve().parents[1])
    if args.only in (None, "targets"):
        targets_table(args)
    if args.only in (None, "cases"):
        cases_table(args)


if __name__ == "__main__":
    main()
