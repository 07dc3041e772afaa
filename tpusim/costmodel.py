"""Time of one compute op on one chip: a roofline of MXU (or VPU) FLOPs against HBM bytes.

* Matmuls run on the MXU at ``peak bf16 x mxu_efficiency x padding``: the weight dims K and N are
  padded to the MXU size (128; 256 on v6e and TPU7x) and the row count M to the 8 sublanes (book
  tpus.md: "weight dims padded to >=128 (256 on v6e)").
* Everything else (norms, activations, the loss, the optimizer) runs on the VPU. The book gives the
  VPU rate only for v5p (7e12 FLOP/s per core, 2.5e14 per core on the MXU: about 1/28); other chips
  are assumed to keep v5p's VPU/MXU ratio.
* Either is capped by HBM: ``time = max(FLOPs / rate, bytes / (HBM bandwidth x hbm_efficiency))``.

Efficiencies come from :mod:`tpusim.calibration` (1.0 in datasheet mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpusim.calibration import get_calibration
from tpusim.chips import ChipSpec
from tpusim.program import Op

# Book tpus.md: v5p VPU 7e12 FLOP/s per core (8 x 128 x 4 ALUs x 1.75 GHz), 2 cores, vs 4.59e14 on the MXU.
VPU_OVER_MXU = 2 * 7.0e12 / 4.59e14
SUBLANES = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeParams:
    mxu_flops_per_s: float
    vpu_flops_per_s: float
    hbm_bytes_per_s: float
    mxu_dim: int


def compute_params(chip: ChipSpec, mode: str = "datasheet") -> ComputeParams:
    fit = get_calibration(chip.name, mode).compute
    return ComputeParams(mxu_flops_per_s=chip.bf16_flops_per_s * fit.mxu_efficiency,
                         vpu_flops_per_s=chip.bf16_flops_per_s * VPU_OVER_MXU,
                         hbm_bytes_per_s=chip.hbm_bytes_per_s * fit.hbm_efficiency, mxu_dim=chip.mxu_dim)


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


def op_time(op: Op, cp: ComputeParams) -> float:
    """Seconds for ``op`` on one chip (0 for an empty op)."""
    if op.category in ("matmul", "attention"):
        rate = cp.mxu_flops_per_s * padding_efficiency(op.mxu_shape, cp.mxu_dim)
    else:
        rate = cp.vpu_flops_per_s
    return max(op.flops / rate if op.flops else 0.0, op.hbm_bytes / cp.hbm_bytes_per_s)


def bound_by(op: Op, cp: ComputeParams) -> str:
    """'mxu', 'vpu' or 'hbm': the side of the roofline the op sits on."""
    unit = "mxu" if op.category in ("matmul", "attention") else "vpu"
    rate = cp.mxu_flops_per_s * padding_efficiency(op.mxu_shape, cp.mxu_dim) if unit == "mxu" else cp.vpu_flops_per_s
    return unit if op.flops / rate >= op.hbm_bytes / cp.hbm_bytes_per_s else "hbm"
