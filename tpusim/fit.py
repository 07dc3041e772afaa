"""Fit the calibrated-mode collective constants to measured curves and rewrite calibration.yaml.

    python -m tpusim.fit            # print the fit and its residuals
    python -m tpusim.fit --write    # also rewrite topologies/calibration.yaml

For each measured curve (``topologies/collective_measurements.yaml``) three constants are fitted:
the ICI link efficiency eta (the fraction of the datasheet link rate reached), a fixed
per-collective overhead t0, and the exponent p with which that overhead combines with the transfer
time (``(t0^p + T(eta)^p)^(1/p)``). The loss is the squared log error, weighted 1 for messages of
1 MiB and more (the range the model must hold within 10%) and 0.05 below (those points are
digitized near the plot's axis and are imprecise). Deterministic: a fixed start and Nelder-Mead.

Two more constants come from other op-level data in the same file:

* ``in_step_overhead_s``: the fixed cost of a collective *inside a compiled step*, with the link
  efficiency, fitted (``t0 + T(eta)``) on the all-gathers and reduce-scatters a real TPU v2 step
  timed (``in_step``). The host-timed curves' overheads (13 us on v5e, a ~130 us floor on v5p) include
  a host dispatch per op that a compiled step does not pay. Every chip borrows it: it is the only
  in-program evidence where the fixed cost can be resolved (the v6e capture's one all-reduce lasts
  120 ms, where microseconds are invisible).
* ``dcn_efficiency``: the fraction of the datasheet DCN egress per chip a cross-slice psum reaches
  (``dcn``: a v6e microbenchmark), borrowed by every chip.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from tpusim.sim.collectives.lowering import lower, parse_axes
from tpusim.sim.collectives.timing import LinkParams, collective_time
from tpusim.config import read_yaml
from tpusim.data import data_dir
from tpusim.sim.topology import parse_topology

MIB = 2**20
SMALL_WEIGHT = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class CurveFit:
    name: str
    chip: str
    source: str
    eta: float
    overhead_s: float
    exponent: float
    bytes: tuple[float, ...]
    measured_s: tuple[float, ...]
    predicted_s: tuple[float, ...]

    @property
    def rel_errors(self) -> np.ndarray:
        return np.array(self.predicted_s) / np.array(self.measured_s) - 1.0

    def max_abs_error(self, min_bytes: float = MIB) -> float:
        sel = np.array(self.bytes) >= min_bytes
        return float(np.max(np.abs(self.rel_errors[sel])))


def curve_model(curve: dict):
    """(bytes, measured seconds, predict(eta, t0, p) -> seconds) for one measured curve."""
    topo = parse_topology(curve["topology"])
    chip = topo.chip
    nbytes = np.array(curve["bytes"], dtype=float)
    measured = np.array(curve["runtime_s"], dtype=float)
    plans = [lower(curve["kind"], b, topo, parse_axes(curve["axes"], topo)) for b in nbytes]

    def predict(eta: float, t0: float, p: float) -> np.ndarray:
        lp = LinkParams(ici_link_bytes_per_s=chip.ici_link_bytes_per_s * eta,
                        ici_hop_latency_s=chip.ici_hop_latency_s, dcn_bytes_per_s=1.0, dcn_latency_s=0.0,
                        overhead_s=t0, overlap_exponent=p)
        return np.array([collective_time(plan, lp) for plan in plans])

    return nbytes, measured, predict


def fit_curve(name: str, curve: dict, *, keep=None) -> CurveFit:
    """Fit (eta, t0, p) to ``curve``; ``keep`` (a boolean mask over its points) fits on a subset only
    (the out-of-sample check fits on alternate points and predicts the others)."""
    from scipy.optimize import minimize  # a development-time dependency (the `test` extra)

    nbytes, measured, predict = curve_model(curve)
    weight = np.where(nbytes >= MIB, 1.0, SMALL_WEIGHT)
    if keep is not None:
        weight = weight * np.asarray(keep, dtype=float)

    # Unconstrained parameters: eta = sigmoid(a), t0 = exp(b) us, p = 1 + 3 sigmoid(c) in [1, 4].
    def unpack(x):
        return 1 / (1 + math.exp(-x[0])), math.exp(x[1]) * 1e-6, 1 + 3 / (1 + math.exp(-x[2]))

    def loss(x):
        return float(np.sum(weight * np.log(predict(*unpack(x)) / measured) ** 2))

    res = minimize(loss, x0=[2.0, math.log(20.0), -2.0], method="Nelder-Mead",
                   options=dict(xatol=1e-9, fatol=1e-14, maxiter=20000, maxfev=20000))
    eta, t0, p = unpack(res.x)
    return CurveFit(name=name, chip=curve["chip"], source=" ".join(curve["source"].split()), eta=eta,
                    overhead_s=t0, exponent=p, bytes=tuple(nbytes), measured_s=tuple(measured),
                    predicted_s=tuple(predict(eta, t0, p)))


def fit_all(path: Path | None = None) -> list[CurveFit]:
    path = path or data_dir("topologies") / "collective_measurements.yaml"
    data = read_yaml(path)
    return [fit_curve(name, curve) for name, curve in data["curves"].items()]


@dataclass(frozen=True, slots=True, kw_only=True)
class InStepFit:
    name: str
    chip: str
    source: str
    eta: float
    overhead_s: float
    measured_s: tuple[float, ...]
    predicted_s: tuple[float, ...]

    @property
    def rel_errors(self) -> np.ndarray:
        return np.array(self.predicted_s) / np.array(self.measured_s) - 1.0


def in_step_model(entry: dict):
    """(measured seconds, datasheet transfer seconds) of collectives timed inside a step."""
    from tpusim.sim.collectives.timing import link_params, transfer_time
    from tpusim.analysis.replay import pod_viewer_plan

    topo = parse_topology(entry["topology"])
    lp = link_params(topo, "datasheet")
    transfer = np.array([transfer_time(pod_viewer_plan(kind, float(data), topo)[1], lp)
                         for _, kind, data, _ in entry["points"]])
    measured = np.array([float(t) for *_, t in entry["points"]])
    return measured, transfer


def fit_in_step(name: str, entry: dict, *, keep=None) -> InStepFit:
    """``t = t0 + T_datasheet / eta`` by least squares on the log error (closed form in 1/eta and t0
    would weight the large points; the log loss weighs every collective alike)."""
    from scipy.optimize import minimize

    measured, transfer = in_step_model(entry)
    weight = np.ones_like(measured) if keep is None else np.asarray(keep, dtype=float)

    def unpack(x):
        return 1 / (1 + math.exp(-x[0])), math.exp(x[1]) * 1e-6

    def loss(x):
        eta, t0 = unpack(x)
        return float(np.sum(weight * np.log((t0 + transfer / eta) / measured) ** 2))

    res = minimize(loss, x0=[2.0, math.log(5.0)], method="Nelder-Mead",
                   options=dict(xatol=1e-10, fatol=1e-15, maxiter=20000, maxfev=20000))
    eta, t0 = unpack(res.x)
    return InStepFit(name=name, chip=entry["chip"], source=" ".join(entry["source"].split()), eta=eta,
                     overhead_s=t0, measured_s=tuple(measured), predicted_s=tuple(t0 + transfer / eta))


def dcn_efficiency(entry: dict) -> float:
    """Datasheet DCN time of the microbenchmark's psum over the measured time (the benchmark's
    bandwidth is the ring all-reduce's bytes per device, 2 (S-1)/S x matrix / S, over its time)."""
    from tpusim.sim.collectives.timing import collective_time, link_params

    s = int(entry["slices"])
    topo = parse_topology(entry["topology"], slices=s)
    v = float(entry["matrix_bytes"]) / s  # each device holds the slice's shard of the matrix
    measured_s = 2 * (s - 1) / s * v / float(entry["achieved_bytes_per_s"])
    return collective_time(lower("all-reduce", v, topo, ("dcn",)), link_params(topo, "datasheet")) / measured_s


# Chips without a measured curve borrow the fit of the closest generation (same torus family).
BORROW = {"v3": "v5e", "v6e": "v5e", "v4": "v5p", "tpu7x": "v5p"}


def in_step_fits() -> list[InStepFit]:
    data = read_yaml(data_dir("topologies") / "collective_measurements.yaml")
    return [fit_in_step(name, entry) for name, entry in data.get("in_step", {}).items()]


def calibration_document(fits: list[CurveFit]) -> dict:
    measurements = read_yaml(data_dir("topologies") / "collective_measurements.yaml")
    (in_step,) = in_step_fits()
    (dcn_name, dcn_entry), = measurements["dcn"].items()
    dcn = {"dcn_efficiency": round(dcn_efficiency(dcn_entry), 4),
           "dcn_fitted_on": f"{dcn_name}: {' '.join(dcn_entry['source'].split())}; every chip borrows it "
                            "(the only cross-slice measurement)"}
    step = {"in_step_overhead_s": float(f"{in_step.overhead_s:.4g}"),
            "in_step_fitted_on": f"{in_step.name}: {in_step.source} (t0 + T/eta, eta = {in_step.eta:.4f}); "
                                 "every chip borrows it (the only in-step collectives whose fixed cost is resolved)"}
    chips: dict[str, dict] = {}
    for f in fits:
        chips[f.chip] = {"collectives": {
            "ici_link_efficiency": round(f.eta, 4),
            "overhead_s": float(f"{f.overhead_s:.4g}"),
            "overlap_exponent": round(f.exponent, 3),
            **step, **dcn,
            "fitted_on": f"{f.name}: {f.source}",
            "residuals": {_size_label(b): round(float(e), 4) for b, e in zip(f.bytes, f.rel_errors)},
        }}
    # The in-step data are a chip's only collective measurement for v2: its link efficiency and
    # fixed cost come from them (a single op of v2 costs what it costs inside the step).
    chips[in_step.chip] = {"collectives": {
        "ici_link_efficiency": round(in_step.eta, 4), "overhead_s": step["in_step_overhead_s"],
        "overlap_exponent": 1.0, **step, **dcn,
        "fitted_on": f"{in_step.name}: {in_step.source} (collectives inside a step; no host-timed curve)"}}
    for chip, lender in BORROW.items():
        if chip in chips:
            continue
        chips.setdefault(chip, {})["collectives"] = {"borrowed_from": lender,
                                                     "fitted_on": f"no measurement of its own; uses {lender}'s fit"}
    # Compute: a chip's own microbenchmark where there is one (TPU7x). Elsewhere the MXU fraction of large
    # matmuls is borrowed from that microbenchmark (83% at m=n=k=32768), not the book's "about 95%"
    # (roofline.md, a rounded statement with no measurement behind it here): measured op-level data over
    # prose, one rule for every chip. HBM: the chip's own op-level figure where there is one (v6e's
    # capture), else the TPU7x copy bandwidth, borrowed.
    from tpusim.sim.chips import get_chip
    measured = {chip: {"mxu": (float(m["mxu_flops_per_s_per_chip"]) / get_chip(chip).bf16_flops_per_s
                               if "mxu_flops_per_s_per_chip" in m else None),
                       "hbm": float(m["hbm_bytes_per_s_per_chip"]) / get_chip(chip).hbm_bytes_per_s,
                       "gemm": m.get("gemm_tflops_per_device"),
                       "source": " ".join(m["source"].split())}
                for chip, m in measurements.get("compute", {}).items()}
    lender, hbm = next(iter(measured.items()))
    # Matmul size: the GEMM curve relative to its largest point, sizes in MXU widths (256 on TPU7x).
    gemm = {int(n): float(t) for n, t in hbm["gemm"].items()}
    top = gemm[max(gemm)]
    size_eff = {round(n / 256, 4): round(t / top, 4) for n, t in sorted(gemm.items())}
    size_src = (f"matmul size: {lender}'s bf16 GEMM curve m=n=k (measured-dev.yaml id ironwood-gemm-bf16), "
                f"relative to m=n=k={max(gemm)}, sizes in units of the MXU width")
    for chip in chips:
        m = measured.get(chip)
        if m is not None and m["mxu"] is not None:
            chips[chip]["compute"] = {"mxu_efficiency": round(m["mxu"], 4), "hbm_efficiency": round(m["hbm"], 4),
                                      "mxu_size_efficiency": dict(size_eff), "fitted_on": f"{m['source']}; {size_src}"}
        elif m is not None:  # v6e: its own HBM figure; the MXU borrowed from TPU7x's GEMM
            chips[chip]["compute"] = {
                "mxu_efficiency": round(measured[lender]["mxu"], 4), "hbm_efficiency": round(m["hbm"], 4),
                "mxu_size_efficiency": dict(size_eff),
                "fitted_on": f"MXU: borrowed from {lender}'s large-GEMM fraction ({hbm['source']}); "
                             f"HBM: {m['source']}; {size_src}"}
        else:
            chips[chip]["compute"] = {
                "mxu_efficiency": round(measured[lender]["mxu"], 4), "hbm_efficiency": round(hbm["hbm"], 4),
                "mxu_size_efficiency": dict(size_eff),
                "fitted_on": f"MXU and HBM: borrowed from {lender}'s GEMM and copy-bandwidth microbenchmarks "
                             f"({hbm['source']}), the only op-level measurements of either; {size_src}"}
    return {"chips": chips}


def _size_label(nbytes: float) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= factor:
            return f"{nbytes / factor:g} {unit}"
    return f"{nbytes:g} B"


HEADER = """\
# Calibrated-mode constants: what real TPUs reach, apart from the datasheet (chips.yaml).
# WRITTEN BY `python -m tpusim.fit --write` from collective_measurements.yaml; do not edit by hand.
# Collectives: calibrated time = (overhead_s^p + T(eta)^p)^(1/p), p = overlap_exponent, where T(eta) is
# the datasheet collective model with ICI links at ici_link_efficiency of their rate (one collective timed
# from the host); inside a compiled step in_step_overhead_s + T(eta); DCN at dcn_efficiency of the egress.
# residuals: (predicted - measured) / measured at each measured size.
# Compute: mxu_efficiency and hbm_efficiency scale peak FLOP/s and HBM bandwidth (see fitted_on).
"""


def report(fits: list[CurveFit]) -> str:
    lines = []
    for f in in_step_fits():
        lines.append(f"{f.name} (inside a step): eta={f.eta:.4f}  in-step overhead={f.overhead_s * 1e6:.2f} us  "
                     f"median |error| {np.median(np.abs(f.rel_errors)):.1%}  max {np.max(np.abs(f.rel_errors)):.1%}")
    for name, entry in read_yaml(data_dir("topologies") / "collective_measurements.yaml")["dcn"].items():
        lines.append(f"{name}: dcn_efficiency={dcn_efficiency(entry):.4f}")
    for f in fits:
        lines.append(f"{f.name}: eta={f.eta:.4f}  overhead={f.overhead_s * 1e6:.1f} us  p={f.exponent:.3f}  "
                     f"max |error| >= 1 MiB: {f.max_abs_error():.1%}")
        lines.append(f"  {'bytes':>12} {'measured':>12} {'predicted':>12} {'error':>8}")
        for b, m, p, e in zip(f.bytes, f.measured_s, f.predicted_s, f.rel_errors):
            lines.append(f"  {_size_label(b):>12} {m * 1e6:10.1f}us {p * 1e6:10.1f}us {e:+8.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite topologies/calibration.yaml")
    args = parser.parse_args(argv)
    fits = fit_all()
    print(report(fits))
    if args.write:
        path = Path(__file__).resolve().parent.parent / "topologies" / "calibration.yaml"
        path.write_text(HEADER + yaml.safe_dump(calibration_document(fits), sort_keys=False, width=120))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
