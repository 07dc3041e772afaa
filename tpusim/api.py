"""The few calls a notebook or a command needs: load a workload and its topology, compile it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tpusim.compiler import compile_program
from tpusim.errors import TpusimError
from tpusim.sim.program import Program
from tpusim.sim.topology import Topology, parse_topology
from tpusim.model.workload import Workload, load_workload


def workload_and_topology(workload: str | Path | Workload, topology: str | None = None, *, slices: int | None = None,
                          overrides: dict[str, Any] | None = None) -> tuple[Workload, Topology]:
    """The workload and the topology to run it on: ``topology`` (``[CHIP:]SHAPE``) or the workload's own.

    A bare shape takes the workload's chip. ``slices`` defaults to the workload's (else 1).
    """
    w = workload if isinstance(workload, Workload) else load_workload(workload, overrides=overrides)
    spec = topology or w.topology
    if spec is None:
        raise TpusimError("no topology: give --topology CHIP:SHAPE or put `topology:` in the workload",
                          source=w.source)
    n = slices if slices is not None else (w.slices or 1)
    topo = parse_topology(spec, default_chip=w.chip, slices=n,
                          source="--topology" if topology else f"{w.source}: topology",
                          slices_source="--slices" if slices is not None else f"{w.source}: slices")
    return w, topo


def compile_workload(workload: str | Path | Workload, topology: str | None = None, *, slices: int | None = None,
                     overrides: dict[str, Any] | None = None) -> tuple[Workload, Topology, Program]:
    w, topo = workload_and_topology(workload, topology, slices=slices, overrides=overrides)
    return w, topo, compile_program(w, topo)
