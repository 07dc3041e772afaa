"""The Timeline: one row per op or transfer, as a pandas DataFrame; written as Parquet and as a
Chrome trace (Perfetto, TensorBoard/XProf trace viewer) laid out like a real XLA profile.

Schema (SI units): ``device, stream, name, category, layer, phase, start_s, end_s, flops, bytes``,
plus ``replicas`` (how many devices the row stands for: the engine simulates one device per class of
equivalent devices and the rows are expanded on output) and ``op_index`` (the op in the Program).
Streams are named as XLA's trace viewer rows: ``XLA Ops`` (the TensorCore), ``Async XLA Ops``
(collectives and host copies, from start to done), and one row per link they used (``ICI x``,
``DCN``, ``PCIe``).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from tpusim.sim.engine import SimResult

COLUMNS = ["device", "stream", "name", "category", "layer", "phase", "start_s", "end_s", "flops", "bytes",
           "replicas", "op_index"]
STREAM_ORDER = ["XLA Modules", "XLA Ops", "Async XLA Ops", "ICI x", "ICI y", "ICI z", "DCN", "PCIe"]


def timeline_frame(result: SimResult, *, all_devices: bool = False) -> pd.DataFrame:
    """The simulated step as a DataFrame: one representative device per class (``all_devices``: every
    device, which is rows x devices; use it for small slices)."""
    rec = result.record
    base = pd.DataFrame({
        "device_class": rec.device_class, "stream": rec.stream, "name": rec.name, "category": rec.category,
        "layer": rec.layer, "phase": rec.phase, "start_s": rec.start_s, "end_s": rec.end_s,
        "flops": rec.flops, "bytes": rec.bytes, "op_index": rec.op_index,
    })
    frames = []
    for c, cls in enumerate(result.classes):
        rows = base[(base.device_class == c) | (base.device_class == -1)]
        devices = cls["devices"] if all_devices else cls["devices"][:1]
        for d in devices:
            f = rows.assign(device=d, replicas=1 if all_devices else len(cls["devices"]))
            frames.append(f)
    df = pd.concat(frames, ignore_index=True) if frames else base.assign(device=0, replicas=1)
    df = df[COLUMNS].astype({"device": "int32", "layer": "int32", "replicas": "int32", "op_index": "int32"})
    return df.sort_values(["device", "start_s", "op_index"], kind="stable").reset_index(drop=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary file renamed into place)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the name: a crash leaves the old file, not an empty one
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False, engine="pyarrow")
    write_atomic(path, buf.getvalue())


def chrome_trace(df: pd.DataFrame, result: SimResult) -> dict:
    """Chrome trace-event JSON: one process per device (``/device:TPU:N``), rows as XLA names them.

    Times are whole nanoseconds and ops that overlap on a row go to extra rows (``Async XLA Ops #2``):
    Perfetto drops events that overlap partially on one thread (see :mod:`tpusim.analysis.lanes`).
    """
    from tpusim.analysis.lanes import lane_name, stream_lanes, to_ns

    events: list[dict] = []
    step_ns = int(to_ns(result.step_time_s))
    module = f"jit_train_step({result.program.name})"
    for device, rows in df.groupby("device", sort=True):
        pid = int(device) + 1
        events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": f"/device:TPU:{device}"}})
        events.append({"ph": "M", "pid": pid, "name": "process_sort_index", "args": {"sort_index": pid}})
        start_ns, end_ns = to_ns(rows.start_s).tolist(), to_ns(rows.end_s).tolist()
        stream = rows.stream.tolist()
        lane = stream_lanes(stream, start_ns, end_ns)
        present = set(zip(stream, lane))
        threads = [("XLA Modules", 0)] + sorted(
            (p for p in present if p[0] != "XLA Modules"),
            key=lambda p: (STREAM_ORDER.index(p[0]) if p[0] in STREAM_ORDER else len(STREAM_ORDER), p[0], p[1]))
        tids = {p: i + 1 for i, p in enumerate(threads)}
        for (s, k), tid in tids.items():
            events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": lane_name(s, k)}})
            events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
        events.append({"ph": "X", "pid": pid, "tid": tids["XLA Modules", 0], "name": module, "ts": 0,
                       "dur": step_ns / 1000, "args": {"run": "tpusim", "mode": result.mode}})
        # Columns as lists (itertuples over pandas' Arrow-backed strings costs 4x the whole loop).
        cols = zip(rows.name.tolist(), rows.category.tolist(), rows.phase.tolist(), rows.layer.tolist(),
                   rows.flops.tolist(), rows.bytes.tolist())
        for i, (name, category, phase, layer, flops, nbytes) in enumerate(cols):
            args = {"category": category, "phase": phase, "layer": int(layer)}
            if flops:
                args["model_flops"] = float(flops)
            if nbytes:
                args["bytes_accessed" if stream[i] == "XLA Ops" else "bytes"] = float(nbytes)
            events.append({"ph": "X", "pid": pid, "tid": tids[stream[i], lane[i]], "name": name,
                           "ts": start_ns[i] / 1000, "dur": (end_ns[i] - start_ns[i]) / 1000, "args": args})
    return {"displayTimeUnit": "ns", "metadata": {"tpusim": {"topology": result.topology.name, "mode": result.mode,
                                                              "workload": result.program.name}},
            "traceEvents": events}


def write_chrome_trace(df: pd.DataFrame, result: SimResult, path: Path) -> None:
    text = json.dumps(chrome_trace(df, result), separators=(",", ":")).encode()
    write_atomic(path, gzip.compress(text, mtime=0))
