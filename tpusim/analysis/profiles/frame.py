"""Profile events -> the simulator's Timeline schema, and per-op statistics.

Both readers (:mod:`.xplane`, :mod:`.tracejson`) emit the same raw rows (:data:`RAW_COLUMNS`, absolute
times in picoseconds); :func:`timeline_frame` turns them into the simulator's timeline columns
(``tpusim.analysis.timeline.COLUMNS``, SI units, times relative to the earliest event) plus what a real profile
adds: ``long_name``, ``hlo_category``, ``module``, ``program_id``, ``run_id``, ``host_start_s``,
``host_end_s``.

Two clocks. A TPU op event carries the chip's own clock (``device_offset_ps``,
``device_duration_ps``) and a time mapped onto the host's clock (the event's offset and duration,
which is what the trace viewer draws). The mapping is piecewise and distorts ops: in the v6e capture
it squeezes 183 XLA Ops events (8 ms fusions among them) to zero length and stretches host copies by
up to 140 ms. So ``start_s``/``end_s`` use the device clock where an event has it (TPU XLA Ops) and
the host clock otherwise (modules, async ops, CPU captures); ``host_start_s``/``host_end_s`` always
hold the host clock, on which modules contain their ops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tpusim.errors import TpusimError
from tpusim.compiler.hlo.parse import expand_replica_groups

RAW_COLUMNS = ["device", "stream", "name", "hlo_category", "long_name", "start_ps", "end_ps",
               "device_start_ps", "device_end_ps", "flops", "bytes", "module", "program_id", "run_id"]
EXTRA_COLUMNS = ["long_name", "hlo_category", "module", "program_id", "run_id", "host_start_s", "host_end_s"]
TIMELINE_COLUMNS = ["device", "stream", "name", "category", "layer", "phase", "start_s", "end_s", "flops",
                    "bytes", *EXTRA_COLUMNS]
MODULES = "XLA Modules"
_IDS = ("module", "program_id", "run_id")
_COLLECTIVE = re.compile(r"^(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute|"
                         r"collective-broadcast|ragged-all-to-all)(-start|-done)?$")
# pandas and numpy are imported by the functions that use them: `run --out` imports this package (for
# tpusim.analysis.xspace's XSpace) and needs neither (issue 13).
if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

_MODULE_NAME = re.compile(r"^(.*)\((\d+)\)$")  # XLA Modules events: "jit_f(12190760917235803885)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """One device of a profile, with the chip's peak figures when the profile records them.

    Parameters
    ----------
    id:
        TPU ordinal (``/device:TPU:N``), or the CPU backend's ``device_ordinal``.
    name:
        The plane or process name, e.g. ``/device:TPU:0``.
    kind:
        The chip as the profiler names it (``TPU v6 Lite``), ``CPU``, or None when not recorded.
    peak_flops_per_s, hbm_bytes_per_s:
        Peak FLOP/s and HBM bandwidth (bytes/s) from the device plane's stats, or None.
    """

    id: int
    name: str
    kind: str | None = None
    peak_flops_per_s: float | None = None
    hbm_bytes_per_s: float | None = None


def op_category(name: str) -> str:
    """A category from an HLO op name, for events without XLA's ``hlo_category``.

    The ``.N`` suffix is dropped; collectives keep their kind (and ``-start``/``-done``); any fusion
    is ``fusion``.

    Examples
    --------
    >>> [op_category(n) for n in ("all-reduce.41", "all-gather-start.2", "ynn_fusion.73", "copy-done")]
    ['all-reduce', 'all-gather-start', 'fusion', 'copy-done']
    """
    base = re.sub(r"\.\d+$", "", name)
    if _COLLECTIVE.match(base):
        return base
    return "fusion" if base.endswith("fusion") else base


def replica_groups(long_name: str) -> list[list[int]] | None:
    """The device groups of a collective from its HLO text, or None if it has none we can read.

    Reads the explicit form ``{{0,1},{2,3}}``, the iota form ``[G,S]<=[d0,d1,...]T(perm)``
    (iota over the dims, transposed by ``perm``, reshaped to G groups of S) and XLA's newer mesh
    form ``mesh['axis_0'=2,'axis_1'=2] {'axis_0'}`` (:func:`tpusim.compiler.hlo.parse.expand_replica_groups`).

    Examples
    --------
    >>> replica_groups("all-reduce(...), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add")
    [[0, 4], [1, 5], [2, 6], [3, 7]]
    >>> replica_groups("all-gather(...), replica_groups={{0,1},{2,3}}, dimensions={0}")
    [[0, 1], [2, 3]]
    >>> replica_groups("all-reduce(...), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, to_apply=%add")
    [[0, 2], [1, 3]]
    """
    m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?|\{(?:\{[\d,\s]*\},?\s*)*\}"
                  r"|mesh\[(?:'[^']+'=\d+,?)+\]\s*\{(?:'[^']+',?)*\})", long_name)
    try:
        return expand_replica_groups(m.group(1)) if m else None
    except ValueError as e:  # an iota form naming millions of devices, or a bad permutation
        raise TpusimError(" ".join(str(e).split())[:200]) from None


def _fill_modules(df: pd.DataFrame) -> None:
    """Give each event without a module the XLA Modules event enclosing it on its device.

    Containment is tested on the host clock, the one the module events are on.
    """
    import numpy as np

    mods = df[df.stream == MODULES]
    for device, m in mods.groupby("device", sort=False):
        m = m.sort_values("start_ps")
        rows = df.index[(df.device == device) & (df.stream != MODULES) & df.module.isna()]
        start = df.loc[rows, "start_ps"].to_numpy(float)
        i = np.searchsorted(m.start_ps.to_numpy(float), start, side="right") - 1
        inside = (i >= 0) & (start <= m.end_ps.to_numpy(float)[i.clip(0)])
        rows, i = rows[inside], i[inside]
        no_pid = df.loc[rows, "program_id"].isna().to_numpy()
        df.loc[rows, "module"] = m.module.to_numpy()[i]
        df.loc[rows, "run_id"] = m.run_id.to_numpy()[i]
        df.loc[rows[no_pid], "program_id"] = m.program_id.to_numpy()[i[no_pid]]


def _id_array(values: pd.Series, dtype: str) -> pd.api.extensions.ExtensionArray:
    """64-bit ids as a nullable array, wrapped into the dtype's range as two's complement."""
    import pandas as pd

    half = 2**63
    wrap = (lambda x: x % 2**64) if dtype == "UInt64" else (lambda x: (x + half) % 2**64 - half)
    return pd.array([None if x is None or pd.isna(x) else wrap(int(x)) for x in values], dtype=dtype)


def _check_times(df: pd.DataFrame, source: str) -> None:
    """Refuse events with a non-finite time or a negative duration (host or device clock), and
    negative or non-finite flops or bytes: a profile cannot have them, and they would make every
    figure computed from it meaningless."""
    import numpy as np
    import pandas as pd

    def floats(col: str) -> np.ndarray:
        try:
            return pd.to_numeric(df[col], errors="raise").astype(float).to_numpy()
        except (TypeError, ValueError, OverflowError):
            raise TpusimError(f"profile events have a non-numeric {col.removesuffix('_ps')}", source=source) from None

    start, end = floats("start_ps"), floats("end_ps")
    dev_start, dev_end = floats("device_start_ps"), floats("device_end_ps")
    on_dev = ~np.isnan(dev_start) & ~np.isnan(dev_end)
    bad = ~np.isfinite(start) | ~np.isfinite(end) | (end < start)
    bad |= on_dev & (~np.isfinite(dev_start) | ~np.isfinite(dev_end) | (dev_end < dev_start))
    for col in ("flops", "bytes"):
        v = floats(col)
        bad |= ~np.isnan(v) & (~np.isfinite(v) | (v < 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise TpusimError(f"{int(bad.sum()):,} events have a negative duration or a non-finite time, flops or bytes "
                          f"(the first: {str(df.name.iloc[i])[:60]!r} on device {df.device.iloc[i]})", source=source)


def timeline_frame(rows: list[dict], *, source: str) -> pd.DataFrame:
    """The simulator's timeline columns from raw reader rows (see the module docstring for clocks).

    ``category`` is XLA's ``hlo_category`` when known, else :func:`op_category` of the name
    (``module`` for XLA Modules events); ``flops`` is XLA's ``model_flops`` and ``bytes`` its
    ``bytes_accessed`` (0 when unknown); ``layer`` is -1 and ``phase`` empty (a profile does not
    know them).
    """
    import numpy as np
    import pandas as pd

    if not rows:
        raise TpusimError("no device events and no XLA op events in this profile", source=source)
    # Ids as Python ints in object columns: XLA program ids exceed int64 and float64 would round them.
    df = pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object if c in _IDS else None)
                       for c in RAW_COLUMNS})
    _check_times(df, source)
    is_mod = df.stream == MODULES
    for i in df.index[is_mod]:
        m = _MODULE_NAME.match(df.at[i, "name"])
        df.at[i, "module"] = m[1] if m else df.at[i, "name"]
        if m and df.at[i, "program_id"] is None:
            df.at[i, "program_id"] = int(m[2])
    _fill_modules(df)
    category = df.hlo_category.where(df.hlo_category != "", df.name.map(op_category))
    on_device = df.device_start_ps.notna()
    start = df.device_start_ps.where(on_device, df.start_ps)
    end = df.device_end_ps.where(on_device, df.end_ps)
    t0 = min(start.min(), df.start_ps.min())
    out = pd.DataFrame({
        "device": df.device.astype("int32"), "stream": df.stream, "name": df.name,
        "category": category.where(~is_mod, "module"), "layer": np.int32(-1), "phase": "",
        # Subtract in picoseconds before scaling: absolute times are ~1e14 ps, exact in float64.
        "start_s": (start - t0) * 1e-12, "end_s": (end - t0) * 1e-12,
        "flops": df.flops.astype(float).fillna(0.0), "bytes": df.bytes.astype(float).fillna(0.0),
        "long_name": df.long_name, "hlo_category": df.hlo_category, "module": df.module.fillna("").astype(str),
        # Nullable: host events may have no module. XLA program ids are uint64 (they exceed int64);
        # run ids are int64 (negative on the CPU backend).
        "program_id": _id_array(df.program_id, "UInt64"), "run_id": _id_array(df.run_id, "Int64"),
        "host_start_s": (df.start_ps - t0) * 1e-12, "host_end_s": (df.end_ps - t0) * 1e-12,
    })
    return out.sort_values(["device", "start_s", "stream"], kind="stable").reset_index(drop=True)


def op_stats(timeline: pd.DataFrame, stream: str = "XLA Ops", *, source: str | None = None) -> pd.DataFrame:
    """One row per distinct op name per module on ``stream``, all devices together.

    Columns: ``module, name, category, count, total_s, mean_s, median_s, min_s, max_s`` (durations in
    seconds, ``end_s - start_s``), ``flops`` and ``bytes`` (per execution, XLA's figures), ``long_name``.
    Sorted by total time, largest first.
    """
    df = timeline[timeline.stream == stream]
    if df.empty:
        streams = ", ".join(sorted(timeline.stream.unique()))
        raise TpusimError(f"no events on stream {stream!r} (streams: {streams})", source=source)
    df = df.assign(duration_s=df.end_s - df.start_s)
    stats = df.groupby(["module", "name"], sort=False).agg(
        category=("category", "first"), count=("duration_s", "size"), total_s=("duration_s", "sum"),
        mean_s=("duration_s", "mean"), median_s=("duration_s", "median"), min_s=("duration_s", "min"),
        max_s=("duration_s", "max"), flops=("flops", "max"), bytes=("bytes", "max"),
        long_name=("long_name", "first"))
    return stats.reset_index().sort_values("total_s", ascending=False, kind="stable").reset_index(drop=True)
