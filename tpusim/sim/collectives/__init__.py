"""Collectives on TPU tori and across slices: lowered onto links (:mod:`.lowering`), timed (:mod:`.timing`).

>>> from tpusim.sim.topology import parse_topology
>>> topo = parse_topology("v5e:8x16")
>>> plan = lower("all-gather", 34e6, topo, parse_axes("y", topo))
>>> round(collective_time(plan, link_params(topo, "datasheet")) * 1e6)   # (X-1)/X * V / W_ici, in us
354
"""

from tpusim.sim.collectives.lowering import (
    KINDS, CollectivePlan, Phase, Span, Stage, lower, parse_axes, parse_kind,
)
from tpusim.sim.collectives.timing import (
    LinkParams, collective_time, link_params, phase_time, stage_time, transfer_time,
)

__all__ = [
    "KINDS", "CollectivePlan", "Phase", "Span", "Stage", "lower", "parse_axes", "parse_kind",
    "LinkParams", "collective_time", "link_params", "phase_time", "stage_time", "transfer_time",
]
