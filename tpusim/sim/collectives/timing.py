"""Uncontended time of a lowered collective (the closed forms the engine must reproduce when alone)."""

from __future__ import annotations

from dataclasses import dataclass

from tpusim.sim.calibration import get_calibration
from tpusim.sim.collectives.lowering import CollectivePlan, Phase, Stage
from tpusim.sim.topology import DCN, Topology


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkParams:
    """Effective link rates and latencies for one topology in one mode (SI units)."""

    ici_link_bytes_per_s: float  # one direction of one ICI link
    ici_hop_latency_s: float
    dcn_bytes_per_s: float  # one chip's share of its host's NIC egress
    dcn_latency_s: float
    overhead_s: float = 0.0  # fixed cost per collective (calibrated mode)
    overlap_exponent: float = 1.0  # how the overhead combines with the transfer time (see CollectiveFit)


def link_params(topo: Topology, mode: str = "datasheet", *, in_step: bool = False) -> LinkParams:
    """Link rates of ``topo`` in ``mode`` (``datasheet`` or ``calibrated``).

    ``in_step``: the fixed cost of a collective inside a compiled step (issued by the TPU's program:
    what the engine simulates), instead of that of one collective timed alone from the host (what
    the measured curves and ``tpusim collective`` give). See :class:`tpusim.sim.calibration.CollectiveFit`.
    """
    fit = get_calibration(topo.chip.name, mode).collectives
    chip = topo.chip
    return LinkParams(
        ici_link_bytes_per_s=chip.ici_link_bytes_per_s * fit.ici_link_efficiency,
        ici_hop_latency_s=chip.ici_hop_latency_s,
        dcn_bytes_per_s=topo.dcn_bytes_per_s_per_chip * fit.dcn_efficiency,
        dcn_latency_s=chip.dcn_latency_s or 0.0,
        overhead_s=fit.in_step_overhead_s if in_step else fit.overhead_s,
        overlap_exponent=1.0 if in_step else fit.overlap_exponent,
    )


def phase_time(ph: Phase, lp: LinkParams) -> float:
    """``steps * max(latency, per-step bytes / W)``: each hop costs at least one hop latency."""
    if ph.steps == 0 or ph.link_bytes == 0:
        return 0.0
    if ph.axis == DCN:
        rate, latency = lp.dcn_bytes_per_s, lp.dcn_latency_s
    else:
        rate, latency = lp.ici_link_bytes_per_s, lp.ici_hop_latency_s
    return ph.steps * max(latency * ph.stride, ph.link_bytes / ph.steps / rate)


def stage_time(stage: Stage, lp: LinkParams) -> float:
    return max((phase_time(ph, lp) for ph in stage.phases), default=0.0)


def transfer_time(plan: CollectivePlan, lp: LinkParams) -> float:
    """Time on the wire: the stages one after the other, without the fixed overhead."""
    return sum(stage_time(s, lp) for s in plan.stages)


def combine_overhead(transfer_s: float, lp: LinkParams) -> float:
    """Add the fixed per-collective overhead as a p-norm: p=1 adds it, larger p hides it in long transfers."""
    if lp.overhead_s == 0.0 or transfer_s == 0.0:
        return transfer_s
    p = lp.overlap_exponent
    return (lp.overhead_s**p + transfer_s**p) ** (1.0 / p)


def collective_time(plan: CollectivePlan, lp: LinkParams) -> float:
    """Uncontended time of ``plan`` in seconds (0 for a group of one)."""
    return combine_overhead(transfer_time(plan, lp), lp)
