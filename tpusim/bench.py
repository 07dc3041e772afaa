"""Speed benchmark of the simulator (not a test: timings belong here, machines are noisy).

    python -m tpusim.bench            # the table for the README
    python -m tpusim.bench --repeat 5

Each case runs in a fresh process (so peak memory is its own): compile and simulate wall time
(median of --repeat runs), events processed, and the process's peak resident memory. The flatness
cases run one per-device program on ever larger v5p slices: the cost must not grow with chips.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASES = [
    ("fsdp_70b on v5e:16x16", "workloads/fsdp_70b.yaml", None, None),
    ("70B fsdp x tensor, full v5p pod (8,960 chips)", "workloads/pod_70b_fsdp_tp.yaml", None, None),
    ("fsdp_70b on 4 v5e pods over DCN (1,024 chips)", "workloads/fsdp_70b_4slices.yaml", None, None),
    ("flatness: llama3-8b fsdp x tensor on v5p:4x4x4 (64)", "workloads/llama3_8b_fsdp_tp.yaml", "v5p:4x4x4", None),
    ("flatness: llama3-8b fsdp x tensor on v5p:8x8x8 (512)", "workloads/llama3_8b_fsdp_tp.yaml", "v5p:8x8x8", None),
    ("flatness: llama3-8b fsdp x tensor on v5p:16x16x16 (4,096)", "workloads/llama3_8b_fsdp_tp.yaml", "v5p:16x16x16", None),
]

_CHILD = """
import json, resource, sys, time
from tpusim.api import compile_workload
from tpusim.engine import simulate
path, topo, slices, repeat = sys.argv[1], sys.argv[2] or None, sys.argv[3], int(sys.argv[4])
slices = int(slices) if slices else None
compile_s, sim_s = [], []
for _ in range(repeat):
    t0 = time.perf_counter()
    w, t, p = compile_workload(path, topo, slices=slices)
    t1 = time.perf_counter()
    r = simulate(p, t)
    t2 = time.perf_counter()
    compile_s.append(t1 - t0); sim_s.append(t2 - t1)
print(json.dumps({"chips": t.num_chips, "ops": len(p.ops), "events": r.events, "compile_s": compile_s,
                  "sim_s": sim_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "step_time_s": r.step_time_s}))
"""


def run_case(path: str, topology: str | None, slices: int | None, repeat: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, path, topology or "", str(slices or ""), str(repeat)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print("| case | chips | ops | events | compile (s) | simulate (s) | peak memory (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, path, topo, slices in CASES:
        r = run_case(path, topo, slices, args.repeat)
        print(f"| {name} | {r['chips']:,} | {r['ops']:,} | {r['events']:,} | {statistics.median(r['compile_s']):.3f} "
              f"| {statistics.median(r['sim_s']):.3f} | {r['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
