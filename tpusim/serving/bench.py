"""How long ``tpusim serve`` takes: the whole command (start-up included) and the simulation alone.

    python -m tpusim.serving.bench

The issue's aim: the summary of 1,000 requests in under 2 s (workloads/serve_llama2_70b.yaml).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

from tpusim.data import data_dir


def bench(repeat: int = 3) -> list[dict]:
    from tpusim.serving import serve

    path = data_dir("workloads") / "serve_llama2_70b.yaml"
    serve(path, requests=50)  # warm the imports
    rows = []
    for n in (1000, 10000):
        t = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run = serve(path, requests=n)
            t.append(time.perf_counter() - t0)
        rows.append({"case": f"serve() {n} requests", "steps": run.summary["steps"],
                     "step_programs": run.summary["step_evaluations"], "seconds": min(t)})
    t, cpu = [], []
    for _ in range(repeat):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tpusim", "serve", str(path)], check=True, capture_output=True)
        t.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    rows.append({"case": "tpusim serve (whole command, 1000 requests)", "steps": rows[0]["steps"],
                 "step_programs": rows[0]["step_programs"], "seconds": min(t), "cpu_seconds": min(cpu)})
    return rows


def main() -> None:
    print("| case | steps | step programs timed | wall seconds (best of 3) | CPU seconds (a shared machine's wall "
          "time is inflated by its load) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in bench():
        cpu = f"{r['cpu_seconds']:.2f}" if "cpu_seconds" in r else "-"
        print(f"| {r['case']} | {r['steps']:,} | {r['step_programs']:,} | {r['seconds']:.2f} | {cpu} |")


if __name__ == "__main__":
    main()
