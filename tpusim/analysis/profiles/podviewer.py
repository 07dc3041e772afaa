"""Read the collectives of a TensorBoard pod-viewer tool output (``*.pod_viewer.json``).

This is a processed tool output, not a profile: per step, ``allReduceOpDb`` lists each collective
with ``dataSize`` (bytes), ``durationUs`` and ``replicaGroups``. On the Cloud TPU v2 demo (2x2 chips,
8 cores) ``dataSize`` is the operand plus the result bytes (e.g. ``fusion.8``, an all-gather of
f32[64,8,128] into f32[1,1,1024,512]: 262,144 + 2,097,152 = 2,359,296), and ``occurrences`` is 8,
one per core.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from tpusim.errors import TpusimError

if TYPE_CHECKING:  # imported by read_pod_viewer: `run --out` imports this package without pandas
    import pandas as pd

COLUMNS = ["step", "name", "kind", "data_bytes", "duration_s", "occurrences", "replica_groups", "description"]
# XLA TPU writes reduce-scatter as a kCustom fusion calling %all-reduce-scatter.N; tpusim says reduce-scatter.
_KINDS = {"all-reduce-scatter": "reduce-scatter"}
_KIND = re.compile(r"(all-reduce-scatter|reduce-scatter|all-gather|all-to-all|collective-permute|all-reduce)")


def _kind(description: str) -> str:
    """The collective kind: what a fusion ``calls=``, else the instruction's own name."""
    m = re.search(r"calls=%" + _KIND.pattern, description) or _KIND.search(description)
    return _KINDS.get(m[1], m[1]) if m else ""


def load_pod_viewer(path: str | Path) -> dict:
    """The pod viewer JSON document (a mapping with ``podStatsSequence.podStatsMap``), or a TpusimError."""
    from tpusim.safeio import read_input

    path = Path(path)
    raw = read_input(path)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TpusimError(f"not valid JSON ({e.__class__.__name__})", source=str(path)) from None
    except RecursionError:
        raise TpusimError("not a pod viewer output: nested too deeply", source=str(path)) from None
    steps = (doc.get("podStatsSequence") or {}) if isinstance(doc, dict) else None
    if not isinstance(steps, dict) or not isinstance(steps.get("podStatsMap"), list):
        raise TpusimError("not a pod viewer output: no podStatsSequence.podStatsMap", source=str(path))
    return doc


_REQUIRED = object()


def _field(obj: dict, key: str, kind: type, default, *, where: str, source: str, minimum: float | None = None):
    """``obj[key]`` as ``kind`` (proto3 JSON writes 64-bit numbers as strings), else a TpusimError naming it."""
    value = obj.get(key)
    if value is None:
        if default is _REQUIRED:
            raise TpusimError("missing or null" if key not in obj else "null, expected a value", source=source,
                              key=f"{where}.{key}")
        value = default
    try:
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        out = kind(value) if kind is float else int(str(value).strip())
    except (TypeError, ValueError):
        names = {int: "an integer", float: "a number", str: "a string"}
        raise TpusimError(f"{value!r} is not {names[kind]}", source=source, key=f"{where}.{key}") from None
    if kind is float and not math.isfinite(out):
        raise TpusimError(f"{value!r} is not a finite number", source=source, key=f"{where}.{key}")
    if minimum is not None and out < minimum:
        raise TpusimError(f"{value!r} must be at least {minimum:g}", source=source, key=f"{where}.{key}")
    return out


def _mapping(value, *, where: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise TpusimError("expected an object", source=source, key=where)
    return value


def _list(value, *, where: str, source: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise TpusimError("expected a list", source=source, key=where)
    return value


def pod_viewer_slice(doc: dict, *, source: str) -> tuple[str, int, int]:
    """``(tpuType, xDimension, yDimension)`` of the run's slice (the pod viewer's demo is a 2x2 v2)."""
    env = _mapping(doc.get("runEnvironment") or {}, where="runEnvironment", source=source)
    dims = _mapping(env.get("topology") or {}, where="runEnvironment.topology", source=source)
    where = "runEnvironment.topology"
    x = _field(dims, "xDimension", int, 2, where=where, source=source, minimum=1)
    y = _field(dims, "yDimension", int, 2, where=where, source=source, minimum=1)
    return _field(env, "tpuType", str, "", where="runEnvironment", source=source), x, y


def read_pod_viewer(path: str | Path) -> pd.DataFrame:
    """The collectives of every step: one row per ``allReduceOpDb`` entry.

    Columns: ``step``, ``name`` (the HLO op, e.g. ``fusion.35``), ``kind`` (``all-reduce``,
    ``all-gather``, ``reduce-scatter``, ...), ``data_bytes``, ``duration_s`` (the file's
    microseconds in seconds), ``occurrences``, ``replica_groups`` (lists of replica ids, or None when
    the file gives none), ``description`` (the HLO instruction). Every field is checked: a value of
    the wrong type, a negative size or duration, is a TpusimError naming its place in the file.
    """
    import pandas as pd

    from tpusim.limits import MAX_BYTES

    src = str(path)
    doc = load_pod_viewer(path)
    rows = []
    for i, step in enumerate(doc["podStatsSequence"]["podStatsMap"]):
        where = f"podStatsSequence.podStatsMap[{i}]"
        step = _mapping(step, where=where, source=src)
        # proto3 JSON omits a stepNum of 0, hence the position as default.
        step_num = _field(step, "stepNum", int, i, where=where, source=src)
        for j, op in enumerate(_list(step.get("allReduceOpDb"), where=f"{where}.allReduceOpDb", source=src)):
            at = f"{where}.allReduceOpDb[{j}]"
            op = _mapping(op, where=at, source=src)
            groups = []
            for k, g in enumerate(_list(op.get("replicaGroups"), where=f"{at}.replicaGroups", source=src)):
                g = _mapping(g, where=f"{at}.replicaGroups[{k}]", source=src)
                ids = _list(g.get("replicaIds"), where=f"{at}.replicaGroups[{k}].replicaIds", source=src)
                groups.append([_field({f"replicaIds[{n}]": r}, f"replicaIds[{n}]", int, _REQUIRED,
                                      where=f"{at}.replicaGroups[{k}]", source=src, minimum=0)
                               for n, r in enumerate(ids)])
            data = _field(op, "dataSize", int, _REQUIRED, where=at, source=src, minimum=1)
            if data > MAX_BYTES:
                raise TpusimError(f"{data:,} bytes is more than {MAX_BYTES:.0e} (1 PB), tpusim's limit for one "
                                  "collective", source=src, key=f"{at}.dataSize")
            description = _field(op, "description", str, "", where=at, source=src)
            if not _kind(description):
                raise TpusimError(f"{description[:80]!r} names no collective (all-gather, reduce-scatter, all-reduce, "
                                  "all-to-all, collective-permute)", source=src, key=f"{at}.description")
            rows.append({"step": step_num, "name": _field(op, "name", str, "", where=at, source=src),
                         "kind": _kind(description), "data_bytes": data,
                         "duration_s": 1e-6 * _field(op, "durationUs", float, _REQUIRED, where=at, source=src,
                                                     minimum=0),
                         "occurrences": _field(op, "occurrences", int, 0, where=at, source=src, minimum=0),
                         "replica_groups": groups or None, "description": description})
    if not rows:
        raise TpusimError("the pod viewer output lists no collectives (allReduceOpDb is empty)", source=src)
    return pd.DataFrame(rows, columns=COLUMNS)
