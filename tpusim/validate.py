"""Simulate each published end-to-end run as it was run and hold it against the measurement.

    python -m tpusim.validate [--mode calibrated|datasheet]

Reads ``workloads/measured/*.yaml`` and their measurements (``measured.yaml``). Nothing here is
fitted on these runs. The memory check is on: every one of them ran, and the memory model accepts
them all (tests/test_memory_xla.py). Runs that are the same step on more slices
(``scaling_of``) are also compared by their growth over one slice, ``T_N / T_1 - 1``.
"""

from __future__ import annotations

import argparse

from tpusim.api import workload_and_topology
from tpusim.compiler import compile_program
from tpusim.config import read_yaml
from tpusim.data import data_dir
from tpusim.sim.engine import simulate
from tpusim.analysis.summary import summarize


def compare_measured(mode: str = "calibrated") -> list[dict]:
    folder = data_dir("workloads") / "measured"
    measured = read_yaml(folder / "measured.yaml")
    rows = []
    for name, m in measured.items():
        w, topo = workload_and_topology(folder / f"{name}.yaml")
        prog = compile_program(w, topo)
        s = summarize(simulate(prog, topo, mode=mode))
        rows.append({"name": name, "topology": topo.name, "slices": topo.slices,
                     "measured_step_s": float(m["step_time_s"]),
                     "simulated_step_s": s["step_time_s"], "measured_mfu": float(m["mfu"]), "simulated_mfu": s["mfu"],
                     "error": s["step_time_s"] / float(m["step_time_s"]) - 1, "bottleneck": s["bottleneck"],
                     "exposed_comm_s": s["exposed_comm_s"], "scaling_of": m.get("scaling_of")})
    return rows


def scaling_growth(rows: list[dict]) -> list[dict]:
    """Each multi-slice run against its one-slice run: measured and simulated ``T_N / T_1 - 1``."""
    by_name = {r["name"]: r for r in rows}
    out = []
    for r in rows:
        base = by_name.get(r["scaling_of"]) if r["scaling_of"] else None
        if base is None:
            continue
        measured = r["measured_step_s"] / base["measured_step_s"] - 1
        simulated = r["simulated_step_s"] / base["simulated_step_s"] - 1
        out.append({"name": r["name"], "base": base["name"], "slices": r["slices"], "measured_growth": measured,
                    "simulated_growth": simulated, "difference_pp": 100 * (simulated - measured)})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["calibrated", "datasheet"], default="calibrated")
    args = parser.parse_args(argv)
    rows = compare_measured(args.mode)
    print("| run | slice | measured step (s) | simulated (s) | error | measured MFU | simulated MFU | bottleneck |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['topology']} | {r['measured_step_s']:.3f} | {r['simulated_step_s']:.3f} | "
              f"{r['error']:+.1%} | {r['measured_mfu']:.1%} | {r['simulated_mfu']:.1%} | {r['bottleneck']} |")
    growth = scaling_growth(rows)
    if growth:
        print()
        print("| series | slices | measured T_N/T_1 - 1 | simulated | difference (pp) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for g in growth:
            print(f"| {g['base']} | {g['slices']} | {g['measured_growth']:+.2%} | {g['simulated_growth']:+.2%} | "
                  f"{g['difference_pp']:+.1f} |")


if __name__ == "__main__":
    main()
