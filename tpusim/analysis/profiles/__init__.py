"""Real JAX/XLA profiles in tpusim's Timeline schema, to compare a simulation with a measurement.

:func:`read_profile` reads an ``*.xplane.pb`` (XSpace protobuf), a trace-viewer JSON
(``*.trace.json.gz``, ``*.json``) or a ``perfetto_trace.json.gz``, or the profile directory
``jax.profiler.trace`` wrote, into a :class:`Profile` whose ``timeline`` has the simulator's columns
(``tpusim.analysis.timeline``); :func:`op_stats` summarises it per op. :func:`read_pod_viewer` reads the
collectives of a TensorBoard pod-viewer output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tpusim.errors import TpusimError
from tpusim.analysis.profiles import frame
from tpusim.analysis.profiles.frame import Device, op_category, replica_groups
from tpusim.analysis.profiles.hloproto import HloInstruction, HloModule
from tpusim.analysis.profiles.podviewer import read_pod_viewer
from tpusim.analysis.profiles.tracejson import read_trace_json
from tpusim.analysis.profiles.xplane import read_xplane

if TYPE_CHECKING:  # pandas is imported by the modules' functions: `run --out` imports this package without it
    import pandas as pd

__all__ = ["Device", "HloInstruction", "HloModule", "Profile", "op_category", "op_stats", "read_pod_viewer",
           "read_profile", "replica_groups"]

# What a profile run directory (plugins/profile/<run>/) may hold, most complete first.
_PATTERNS = ("*.xplane.pb", "*.trace.json.gz", "perfetto_trace.json.gz")


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Profile:
    """One profile read into tpusim's terms.

    Parameters
    ----------
    source:
        The file that was read.
    format:
        ``"xplane"``, ``"trace_json"`` or ``"perfetto"``.
    timeline:
        One row per event, columns ``frame.TIMELINE_COLUMNS``: the simulator's ``device, stream,
        name, category, layer, phase, start_s, end_s, flops, bytes`` plus ``long_name``,
        ``hlo_category``, ``module``, ``program_id``, ``run_id``, ``host_start_s``, ``host_end_s``.
        Seconds from the profile's earliest event.
    devices:
        The devices, by id, with the chip's peak figures where the profile has them.
    hlo_modules:
        The compiled modules from an xplane's ``/host:metadata`` plane, keyed ``name(program id)``
        like XLA Modules events; empty for JSON traces.
    """

    source: str
    format: str
    timeline: pd.DataFrame = field(repr=False)
    devices: list[Device]
    hlo_modules: dict[str, HloModule] = field(default_factory=dict, repr=False)


def _run_files(run: Path) -> list[Path]:
    for pattern in _PATTERNS:
        found = sorted(run.glob(pattern))
        if found:
            return found
    return []


def resolve_profile_path(path: str | Path) -> Path:
    """The profile file to read for ``path``: the file itself, or the best file of the one profile
    run in (or below) a directory: an ``*.xplane.pb`` before a ``*.trace.json.gz`` before a
    ``perfetto_trace.json.gz``.

    Raises
    ------
    TpusimError
        Nothing there, no profile below the directory, several runs below it, or a run with several
        hosts' files (pass one of them).
    """
    path = Path(path)
    if not path.exists():
        raise TpusimError("no such file or directory", source=str(path))
    if not path.is_dir():
        return path
    runs = sorted({p.parent for pattern in _PATTERNS for p in path.rglob(pattern)})
    if not runs:
        raise TpusimError(f"no profile in this directory (looked for {', '.join(_PATTERNS)} below it)",
                          source=str(path))
    if len(runs) > 1:
        listed = ", ".join(str(r.relative_to(path)) for r in runs)
        raise TpusimError(f"{len(runs)} profile runs in this directory ({listed}); pass one of them",
                          source=str(path))
    files = _run_files(runs[0])
    if len(files) > 1:
        listed = ", ".join(f.name for f in files)
        raise TpusimError(f"the run has {len(files)} hosts' files ({listed}); pass one of them",
                          source=str(runs[0]))
    return files[0]


def read_profile(path: str | Path) -> Profile:
    """Read a profile file or directory (see :func:`resolve_profile_path`) into a :class:`Profile`.

    The format is chosen by suffix: ``.pb`` is an XSpace, anything else trace-viewer JSON
    (``perfetto_trace*`` is reported as ``"perfetto"``).

    Raises
    ------
    TpusimError
        Every bad input, with the file named: missing, empty, truncated or corrupt (protobuf, gzip,
        JSON), or a profile without TPU devices and without XLA op events.
    """
    file = resolve_profile_path(path)
    source = str(file)
    modules: dict[str, HloModule] = {}
    if file.name.endswith(".pb"):
        rows, devices, modules = read_xplane(file)
        fmt = "xplane"
    else:
        rows, devices = read_trace_json(file)
        fmt = "perfetto" if file.name.startswith("perfetto") else "trace_json"
    timeline = frame.timeline_frame(rows, source=source)
    return Profile(source=source, format=fmt, timeline=timeline, devices=devices, hlo_modules=modules)


def op_stats(profile: Profile, stream: str = "XLA Ops") -> pd.DataFrame:
    """Per-op statistics of ``stream``: one row per distinct op name per module, all devices together
    (count, total/mean/median/min/max seconds, flops, bytes, category, long_name); see
    :func:`tpusim.analysis.profiles.frame.op_stats`."""
    return frame.op_stats(profile.timeline, stream, source=profile.source)
