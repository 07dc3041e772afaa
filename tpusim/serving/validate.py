"""Each published serving run simulated as its benchmark ran it, against the measurement.

    python -m tpusim.serving.validate

Reads ``workloads/measured/serving/serve_*.yaml`` and ``workloads/measured/serving/measured.yaml`` (the measured
figures, copied from ``tests/data/measured-dev-2.yaml`` with their ids). Nothing is fitted on these
runs. A run our memory model refuses is reported with the reason instead of a number.
"""

from __future__ import annotations

from tpusim.config import read_yaml
from tpusim.data import data_dir
from tpusim.errors import InfeasibleError
from tpusim.serving import serve


def compare_serving(mode: str = "calibrated") -> list[dict]:
    folder = data_dir("workloads") / "measured" / "serving"
    rows = []
    for name, m in read_yaml(folder / "measured.yaml").items():
        row = {"name": name, "id": m["id"], "measured_output_tokens_per_s": float(m["output_tokens_per_s"])}
        try:
            s = serve(folder / f"{name}.yaml", mode=mode).summary
        except InfeasibleError as e:
            rows.append({**row, "simulated_output_tokens_per_s": None, "error": None, "refused": e.reason})
            continue
        sim = s["throughput"]["output_tokens_per_s"]
        rows.append({**row, "topology": s["topology"], "simulated_output_tokens_per_s": sim,
                     "error": sim / row["measured_output_tokens_per_s"] - 1, "refused": None,
                     "itl_p50_s": s["itl_s"]["p50"], "bottleneck": s["bottleneck"],
                     "device_bottleneck": max(("weights", "kv", "compute", "collectives"),
                                              key=lambda p: s["device_time_s"][p])})
    return rows


def main() -> None:
    print("| run | measured output tok/s | simulated | error | device time mostly |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in compare_serving():
        if r["refused"]:
            print(f"| {r['name']} | {r['measured_output_tokens_per_s']:,.0f} | refused | - | {r['refused'][:60]}... |")
        else:
            print(f"| {r['name']} | {r['measured_output_tokens_per_s']:,.0f} | {r['simulated_output_tokens_per_s']:,.0f} | "
                  f"{r['error']:+.0%} | {r['device_bottleneck']} |")


if __name__ == "__main__":
    main()
