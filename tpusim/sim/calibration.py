"""Fitted efficiencies, kept apart from the datasheet (``topologies/calibration.yaml``).

Two modes, chosen by the user:

* ``datasheet``: links at their datasheet rate, 1 us hops, no per-collective overhead. The book's
  closed forms come out exactly in this mode.
* ``calibrated``: what real TPUs reach, fitted on measured curves (see the file, which says what each
  constant was fitted on and with what residuals; ``python -m tpusim.fit`` rewrites it).

Chips with no measurement of their own borrow another chip's fit; the file says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from tpusim.config import build, read_yaml
from tpusim.data import data_dir
from tpusim.errors import TpusimError

Mode = Literal["datasheet", "calibrated"]
MODES: tuple[str, ...] = ("datasheet", "calibrated")


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveFit:
    """How a chip's real collectives depart from the datasheet model.

    The calibrated time of a collective timed on its own from the host (the measured curves) is
    ``(overhead_s**p + T(eta)**p) ** (1/p)`` with ``p = overlap_exponent`` and ``T(eta)`` the
    datasheet model with links at ``ici_link_efficiency`` of their rate. ``p = 1`` adds a fixed launch
    overhead; a larger ``p`` hides it behind long transfers (the shape of the v5p curve).

    Inside a compiled step a collective is launched by the TPU's own program, not by a host dispatch,
    so it pays ``in_step_overhead_s`` (added, ``p = 1``) instead: fitted on collectives timed inside a
    real step (``in_step_fitted_on``). DCN phases run at ``dcn_efficiency`` of the datasheet egress per
    chip (``dcn_fitted_on``).
    """

    ici_link_efficiency: float = 1.0
    dcn_efficiency: float = 1.0
    overhead_s: float = 0.0
    overlap_exponent: float = 1.0
    in_step_overhead_s: float = 0.0
    fitted_on: str = "nothing (datasheet)"
    in_step_fitted_on: str = "nothing (datasheet)"
    dcn_fitted_on: str = "nothing (datasheet)"
    borrowed_from: str | None = None
    residuals: dict[str, float] | None = None  # size label -> relative error of the fit, for the record


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeFit:
    """Achievable fraction of peak MXU FLOP/s and HBM bandwidth.

    ``mxu_efficiency`` is a large matmul's fraction of peak. ``mxu_size_efficiency`` maps a matmul's
    size, in multiples of the MXU side (the geometric mean of M, K, N over ``mxu_dim``), to its
    throughput relative to a large one: smaller matmuls fill the MXU pipeline less (interpolated in
    log size; 1 beyond the last point). None: every size runs at ``mxu_efficiency``.
    """

    mxu_efficiency: float = 1.0
    hbm_efficiency: float = 1.0
    mxu_size_efficiency: dict[float, float] | None = None
    fitted_on: str = "nothing (datasheet)"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChipCalibration:
    collectives: CollectiveFit = CollectiveFit()
    compute: ComputeFit = ComputeFit()


DATASHEET = ChipCalibration()


def load_calibration(path: str | Path | None = None) -> dict[str, ChipCalibration]:
    path = Path(path) if path is not None else data_dir("topologies") / "calibration.yaml"
    raw = read_yaml(path)
    if not isinstance(raw, dict) or "chips" not in raw:
        raise TpusimError("expected a mapping with a 'chips' key", source=str(path))
    chips = raw["chips"]
    if not isinstance(chips, dict):
        raise TpusimError("expected a mapping of chip names", source=str(path), key="chips")
    out = {name: build(ChipCalibration, entry, source=str(path), prefix=f"chips.{name}")
           for name, entry in chips.items()}
    # Resolve borrowing: a chip that says `borrowed_from: v5e` gets v5e's collective fit.
    for name, cal in list(out.items()):
        lender = cal.collectives.borrowed_from
        if lender is not None:
            if lender not in out or out[lender].collectives.borrowed_from is not None:
                raise TpusimError(f"borrows from {lender!r}, which has no fit of its own", source=str(path),
                                  key=f"chips.{name}.collectives.borrowed_from")
    return out


@cache
def _calibrations() -> dict[str, ChipCalibration]:
    return load_calibration()


def get_calibration(chip_name: str, mode: str) -> ChipCalibration:
    """The efficiencies of ``chip_name`` in ``mode`` (``datasheet``: all ones, no overhead)."""
    if mode not in MODES:
        raise TpusimError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}", source="--mode")
    if mode == "datasheet":
        return DATASHEET
    cals = _calibrations()
    cal = cals.get(chip_name)
    if cal is None:
        return DATASHEET
    lender = cal.collectives.borrowed_from
    if lender is not None:
        cal = ChipCalibration(collectives=cals[lender].collectives, compute=cal.compute)
    return cal
