"""Read the collectives of a TensorBoard pod-viewer tool output (``*.pod_viewer.json``).

This is a processed tool output, not a profile: per step, ``allReduceOpDb`` lists each collective
with ``dataSize`` (bytes), ``durationUs`` and ``replicaGroups``. On the Cloud TPU v2 demo (2x2 chips,
8 cores) ``dataSize`` is the operand plus the result bytes (e.g. ``fusion.8``, an all-gather of
f32[64,8,128] into f32[1,1,1024,512]: 262,144 + 2,097,152 = 2,359,296), and ``occurrences`` is 8,
one per core.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from tpusim.errors import TpusimError

COLUMNS = ["step", "name", "kind", "data_bytes", "duration_s", "occurrences", "replica_groups", "description"]
# XLA TPU writes reduce-scatter as a kCustom fusion calling %all-reduce-scatter.N; tpusim says reduce-scatter.
_KINDS = {"all-reduce-scatter": "reduce-scatter"}
_KIND = re.compile(r"(all-reduce-scatter|reduce-scatter|all-gather|all-to-all|collective-permute|all-reduce)")


def _kind(description: str) -> str:
    """The collective kind: what a fusion ``calls=``, else the instruction's own name."""
    m = re.search(r"calls=%" + _KIND.pattern, description) or _KIND.search(description)
    return _KINDS.get(m[1], m[1]) if m else ""


def read_pod_viewer(path: str | Path) -> pd.DataFrame:
    """The collectives of every step: one row per ``allReduceOpDb`` entry.

    Columns: ``step``, ``name`` (the HLO op, e.g. ``fusion.35``), ``kind`` (``all-reduce``,
    ``all-gather``, ``reduce-scatter``, ...), ``data_bytes``, ``duration_s`` (the file's
    microseconds in seconds), ``occurrences``, ``replica_groups`` (lists of replica ids, or None when
    the file gives none), ``description`` (the HLO instruction).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise TpusimError("file not found", source=str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TpusimError(f"not valid JSON ({e.__class__.__name__})", source=str(path)) from None
    steps = (doc.get("podStatsSequence") or {}).get("podStatsMap") if isinstance(doc, dict) else None
    if not isinstance(steps, list):
        raise TpusimError("not a pod viewer output: no podStatsSequence.podStatsMap", source=str(path))
    rows = []
    for i, step in enumerate(steps):
        for op in step.get("allReduceOpDb", []):
            groups = [[int(r) for r in g.get("replicaIds", [])] for g in op.get("replicaGroups", [])]
            # proto3 JSON omits a stepNum of 0, hence the position as default.
            rows.append({"step": int(step.get("stepNum", i)), "name": op.get("name", ""),
                         "kind": _kind(op.get("description", "")), "data_bytes": int(op.get("dataSize", 0)),
                         "duration_s": float(op.get("durationUs", 0.0)) * 1e-6,
                         "occurrences": int(op.get("occurrences", 0)), "replica_groups": groups or None,
                         "description": op.get("description", "")})
    if not rows:
        raise TpusimError("the pod viewer output lists no collectives (allReduceOpDb is empty)", source=str(path))
    return pd.DataFrame(rows, columns=COLUMNS)
