"""Time of one compute op on one chip: a roofline of MXU (or VPU) FLOPs against HBM bytes.

* Matmuls run on the MXU at ``peak bf16 x mxu_efficiency x padding x size``: the weight dims K and N
  are padded to the MXU size (128; 256 on v6e and TPU7x) and the row count M to the 8 sublanes
  (book tpus.md: "weight dims padded to >=128 (256 on v6e)"); in calibrated mode a small matmul
  also keeps the MXU less busy than a large one (``mxu_size_efficiency``, fitted on the TPU7x GEMM
  curve by size; see :mod:`tpusim.sim.calibration`).
* Everything else (norms, activations, casts, softmax, the loss, the optimizer) runs on the VPU at
  the chip's own rate (``ChipSpec.vpu_flops_per_s``: the book gives v5p's, 7e12 FLOP/s per core; the
  others are derived from their clocks or assumed, each with its source in chips.yaml). The VPU is
  1/32 of the MXU on v4/v5e/v5p but 1/128 on v6e, whose MXU grew 4.7x and whose VPU did not.
* A fused kernel's vector work (``Op.vpu_flops``: a flash kernel's softmax) runs alongside its
  matmuls (VLIW bundles issue MXU and VPU work together), so it counts only when it is the longer.
* All are capped by HBM: ``time = max(FLOPs / rate, vpu_flops / VPU, bytes / (HBM x hbm_efficiency))``.

Efficiencies come from :mod:`tpusim.sim.calibration` (1.0 and no size effect in datasheet mode, where the
book's closed forms come out exactly). All of it is computed once per op before the engine runs.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from tpusim.sim.calibration import get_calibration
from tpusim.sim.chips import ChipSpec
from tpusim.sim.program import Op

SUBLANES = 8
MXU_UNIT_CATEGORIES = ("matmul", "attention")


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeParams:
    mxu_flops_per_s: float
    vpu_flops_per_s: float
    hbm_bytes_per_s: float
    mxu_dim: int
    # (log size in MXU widths, relative throughput) points, ascending; empty: no size effect.
    size_curve: tuple[tuple[float, float], ...] = ()
    # 8-bit MXU rates (quantized training), at the bf16 efficiency: fitted on bf16 matmuls only, the
    # same efficiency is ASSUMED for int8 / fp8. 0: the chip has no such mode.
    int8_flops_per_s: float = 0.0
    fp8_flops_per_s: float = 0.0


def compute_params(chip: ChipSpec, mode: str = "datasheet") -> ComputeParams:
    fit = get_calibration(chip.name, mode).compute
    curve = tuple(sorted((math.log(s), e) for s, e in (fit.mxu_size_efficiency or {}).items()))
    return ComputeParams(mxu_flops_per_s=chip.bf16_flops_per_s * fit.mxu_efficiency,
                         vpu_flops_per_s=chip.vpu_flops_per_s,
                         hbm_bytes_per_s=chip.hbm_bytes_per_s * fit.hbm_efficiency, mxu_dim=chip.mxu_dim,
                         size_curve=curve, int8_flops_per_s=chip.int8_flops_per_s * fit.mxu_efficiency,
                         fp8_flops_per_s=(chip.fp8_flops_per_s or 0.0) * fit.mxu_efficiency)


def padding_efficiency(mxu_shape: tuple[int, int, int] | None, mxu_dim: int) -> float:
    """Useful fraction of MXU work for an (M, K, N) matmul once K, N are padded to the MXU and M to 8."""
    if mxu_shape is None:
        return 1.0
    m, k, n = mxu_shape
    if min(m, k, n) <= 0:
        return 1.0

    def pad(x: int, to: int) -> int:
        return math.ceil(x / to) * to

    return (k / pad(k, mxu_dim)) * (n / pad(n, mxu_dim)) * (m / pad(m, SUBLANES))


def size_efficiency(mxu_shape: tuple[int, int, int] | None, cp: ComputeParams) -> float:
    """Throughput of an (M, K, N) matmul relative to a large one: the fitted curve at the geometric
    mean of M, K, N in MXU widths, interpolated in log size (1 past the last point, the first
    point's value below it)."""
    curve = cp.size_curve
    if not curve or mxu_shape is None or min(mxu_shape) <= 0:
        return 1.0
    m, k, n = mxu_shape
    x = (math.log(m) + math.log(k) + math.log(n)) / 3 - math.log(cp.mxu_dim)
    if x >= curve[-1][0]:
        return curve[-1][1]
    if x <= curve[0][0]:
        return curve[0][1]
    i = bisect.bisect_right(curve, (x, math.inf))
    (x0, e0), (x1, e1) = curve[i - 1], curve[i]
    return e0 + (e1 - e0) * (x - x0) / (x1 - x0)


def mxu_rate(op: Op, cp: ComputeParams) -> float:
    """FLOP/s of a matmul or attention op on the MXU (at the 8-bit rate for a quantized matmul)."""
    peak = (cp.mxu_flops_per_s if not op.mxu_dtype else
            cp.int8_flops_per_s if op.mxu_dtype == "int8" else cp.fp8_flops_per_s)
    return peak * padding_efficiency(op.mxu_shape, cp.mxu_dim) * size_efficiency(op.mxu_shape, cp)


def unit_time(op: Op, cp: ComputeParams) -> float:
    """Seconds ``op`` keeps its compute unit (MXU or VPU) busy, whatever its HBM traffic."""
    rate = mxu_rate(op, cp) if op.category in MXU_UNIT_CATEGORIES else cp.vpu_flops_per_s
    return max(op.flops / rate if op.flops else 0.0, op.vpu_flops / cp.vpu_flops_per_s)


def op_time(op: Op, cp: ComputeParams) -> float:
    """Seconds for ``op`` on one chip (0 for an empty op)."""
    return max(unit_time(op, cp), op.hbm_bytes / cp.hbm_bytes_per_s)


def bound_by(op: Op, cp: ComputeParams) -> str:
    """'mxu', 'vpu' or 'hbm': the side of the roofline the op sits on."""
    unit = "mxu" if op.category in MXU_UNIT_CATEGORIES else "vpu"
    rate = mxu_rate(op, cp) if unit == "mxu" else cp.vpu_flops_per_s
    t_unit, t_vpu = op.flops / rate, op.vpu_flops / cp.vpu_flops_per_s
    if t_vpu > t_unit:
        unit, t_unit = "vpu", t_vpu
    return unit if t_unit >= op.hbm_bytes / cp.hbm_bytes_per_s else "hbm"
