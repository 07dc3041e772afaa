"""The Timeline: one row per op or transfer, as column lists (:func:`timeline_columns`, what ``run --out``
writes from) or a pandas DataFrame (:func:`timeline_frame`, for notebooks and analyses); written as
Parquet and as a Chrome trace (Perfetto, TensorBoard/XProf trace viewer) laid out like a real XLA profile.

Schema (SI units): ``device, stream, name, category, layer, phase, start_s, end_s, flops, bytes``,
plus ``replicas`` (how many devices the row stands for: the engine simulates one device per class of
equivalent devices and the rows are expanded on output) and ``op_index`` (the op in the Program).
Streams are named as XLA's trace viewer rows: ``XLA Ops`` (the TensorCore), ``Async XLA Ops``
(collectives and host copies, from start to done), and one row per link they used (``ICI x``,
``DCN``, ``PCIe``).

Speed (issue 13): ``run --out`` imports no pandas (~0.35 s of its second). The columns are built and
sorted here in plain Python, and the Parquet file is written by pyarrow alone with the schema and
the ``pandas`` schema metadata that ``DataFrame.to_parquet`` wrote from :func:`timeline_frame`, so the
file has the same bytes and still reads back as that DataFrame (``tests/test_runout.py`` compares).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from tpusim.sim.engine import SimResult

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["device", "stream", "name", "category", "layer", "phase", "start_s", "end_s", "flops", "bytes",
           "replicas", "op_index"]
STREAM_ORDER = ["XLA Modules", "XLA Ops", "Async XLA Ops", "ICI x", "ICI y", "ICI z", "DCN", "PCIe"]
# Each column's type, as timeline_frame's DataFrame holds it (pandas 3: strings are Arrow large strings).
DTYPES = {"device": "int32", "stream": "str", "name": "str", "category": "str", "layer": "int32", "phase": "str",
          "start_s": "float64", "end_s": "float64", "flops": "float64", "bytes": "float64", "replicas": "int32",
          "op_index": "int32"}
_PER_ROW = ["stream", "name", "category", "layer", "phase", "start_s", "end_s", "flops", "bytes", "op_index"]


def timeline_columns(result: SimResult, *, all_devices: bool = False) -> dict[str, list]:
    """The simulated step as column lists (:data:`COLUMNS`, Python values), in the rows and order of
    :func:`timeline_frame`: one representative device per class (``all_devices``: every device, which
    is rows x devices; use it for small slices), sorted by device, start and op (ties in the engine's
    record order)."""
    rec = result.record
    start, op_index, cls_of = rec.start_s, rec.op_index, rec.device_class

    def key(i: int) -> tuple:
        return start[i], op_index[i]

    parts = []  # (device, replicas, its rows in order), in the order the frame concatenated them
    for c, cls in enumerate(result.classes):
        rows = sorted((i for i, k in enumerate(cls_of) if k == c or k == -1), key=key)  # stable
        devices = cls["devices"] if all_devices else cls["devices"][:1]
        parts += [(d, 1 if all_devices else len(cls["devices"]), rows) for d in devices]
    if not parts:
        parts = [(0, 1, sorted(range(len(start)), key=key))]
    out: dict[str, list] = {c: [] for c in COLUMNS}
    picked: dict[int, dict[str, list]] = {}  # the per-row columns of a row list, taken once for all its devices
    for device, group in groupby(sorted(parts, key=lambda p: p[0]), key=lambda p: p[0]):  # a stable sort
        group = list(group)
        if len(group) == 1:
            _, replicas, rows = group[0]
            replicas = [replicas] * len(rows)
            if id(rows) not in picked:  # rows: a list of `parts`, alive until the end
                picked[id(rows)] = {c: [getattr(rec, c)[i] for i in rows] for c in _PER_ROW}
            values = picked[id(rows)]
        else:  # a device in several classes (the engine never makes one): merge, as the frame's sort did
            pairs = sorted(((r, i) for _, r, rows in group for i in rows), key=lambda p: key(p[1]))
            replicas, rows = [r for r, _ in pairs], [i for _, i in pairs]
            values = {c: [getattr(rec, c)[i] for i in rows] for c in _PER_ROW}
        for c, v in values.items():
            out[c] += v
        out["device"] += [int(device)] * len(rows)
        out["replicas"] += replicas
    return out


def timeline_frame(result: SimResult, *, all_devices: bool = False) -> pd.DataFrame:
    """The simulated step as a DataFrame: one representative device per class (``all_devices``: every
    device, which is rows x devices; use it for small slices)."""
    return frame_of(timeline_columns(result, all_devices=all_devices))


def frame_of(columns: dict[str, list]) -> pd.DataFrame:
    """The DataFrame of :func:`timeline_columns`' lists."""
    import pandas as pd

    return pd.DataFrame(columns, columns=COLUMNS).astype({c: t for c, t in DTYPES.items() if t == "int32"})


def columns_of(frame) -> dict[str, list]:
    """A timeline as column lists: :func:`timeline_columns`' lists as they are, a DataFrame's columns
    as Python values (what the writers iterate over)."""
    if isinstance(frame, dict):
        return frame
    return {c: frame[c].tolist() for c in frame.columns}


def device_rows(columns: dict[str, list]):
    """``(device, its rows' columns)`` per device in ascending order, each device's rows in their order
    (``DataFrame.groupby("device", sort=True)``)."""
    rows_of: dict[int, list[int]] = {}
    for i, d in enumerate(columns["device"]):
        rows_of.setdefault(d, []).append(i)
    for d in sorted(rows_of):
        rows = rows_of[d]
        if rows[-1] - rows[0] + 1 == len(rows):  # one run of rows, as in a sorted timeline
            yield d, {c: v[rows[0]:rows[-1] + 1] for c, v in columns.items()}
        else:
            yield d, {c: [v[i] for i in rows] for c, v in columns.items()}


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


def timeline_parquet(columns: dict[str, list]) -> bytes:
    """The Parquet file of a timeline's columns, written by pyarrow without pandas: the bytes
    ``write_parquet(frame_of(columns))`` writes (the same Arrow schema, the same ``pandas`` schema
    metadata, the same writer options: pandas' ``to_parquet`` is ``Table.from_pandas`` then
    ``write_table(compression="snappy")``). That is pandas 3's DataFrame (strings in Arrow); with an
    older pandas (object strings, another schema), pandas writes it."""
    from importlib.metadata import version

    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas_version = version("pandas")
    if int(pandas_version.split(".")[0]) < 3:
        import io

        buf = io.BytesIO()
        frame_of(columns).to_parquet(buf, index=False, engine="pyarrow")
        return buf.getvalue()
    arrow = {"int32": pa.int32(), "float64": pa.float64(), "str": pa.large_string()}
    metadata = _pandas_metadata(pa.__version__, pandas_version)
    schema = pa.schema([(c, arrow[DTYPES[c]]) for c in COLUMNS], metadata={b"pandas": metadata})
    table = pa.Table.from_arrays([_arrow_array(pa, arrow[DTYPES[c]], columns[c]) for c in COLUMNS], schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy")
    return sink.getvalue().to_pybytes()


def _arrow_array(pa, kind, values: list):
    """An Arrow array of a column, from its buffers: ``pa.array(list)`` imports pandas (0.35 s) to ask
    whether the list is a pandas object. Fixed-width values go through the standard library's ``array``
    (machine order, which is Arrow's); strings as their UTF-8 bytes and int64 offsets (large_string)."""
    from array import array
    from itertools import accumulate

    if kind == pa.large_string():
        data = [s.encode() for s in values]
        buffers = [None, pa.py_buffer(array("q", accumulate(map(len, data), initial=0))), pa.py_buffer(b"".join(data))]
    else:
        code = "d" if kind == pa.float64() else next(t for t in "ilh" if array(t).itemsize == 4)  # int32
        buffers = [None, pa.py_buffer(array(code, values))]
    return pa.Array.from_buffers(kind, len(values), buffers)


def _pandas_metadata(pyarrow_version: str, pandas_version: str) -> bytes:
    """What ``pyarrow.Table.from_pandas`` records of :func:`frame_of`'s DataFrame with pandas 3
    (``pyarrow.pandas_compat.construct_metadata``, no index): how pandas reads the file back. The
    versions are the installed ones (pandas' read without importing it)."""
    kinds = {"int32": ("int32", "int32"), "float64": ("float64", "float64"), "str": ("object", "str")}
    columns = [{"name": c, "field_name": c, "pandas_type": kinds[DTYPES[c]][0], "numpy_type": kinds[DTYPES[c]][1],
                "metadata": None} for c in COLUMNS]
    return json.dumps({"index_columns": [], "column_indexes": [], "columns": columns, "attributes": {},
                       "creator": {"library": "pyarrow", "version": pyarrow_version},
                       "pandas_version": pandas_version}).encode("utf8")


def write_timeline_parquet(columns: dict[str, list], path: Path) -> None:
    write_atomic(path, timeline_parquet(columns))


def chrome_trace(frame: dict[str, list] | pd.DataFrame, result: SimResult) -> dict:
    """Chrome trace-event JSON: one process per device (``/device:TPU:N``), rows as XLA names them.

    Times are whole nanoseconds and ops that overlap on a row go to extra rows (``Async XLA Ops #2``):
    Perfetto drops events that overlap partially on one thread (see :mod:`tpusim.analysis.lanes`).
    The document :func:`chrome_trace_json` writes, read back.
    """
    return json.loads(chrome_trace_json(frame, result))


def chrome_trace_json(frame: dict[str, list] | pd.DataFrame, result: SimResult) -> str:
    """:func:`chrome_trace` as JSON text, written directly: ``json.dumps(trace, separators=(",", ":"))``
    character for character (keys in this order, strings escaped by json's own ASCII encoder, floats
    as ``repr``: all times are whole nanoseconds over 1000, flops and bytes finite), without building
    12,000 dicts for the encoder to walk (issue 13: 0.06 s for the 70B, half of it)."""
    from json.encoder import encode_basestring_ascii as q

    from tpusim.analysis.lanes import lane_name, ns_list, stream_lanes

    def number(x: float) -> str:
        return repr(x) if math.isfinite(x) else json.dumps(x)

    events: list[str] = []
    step_ns = ns_list([result.step_time_s])[0]
    module, mode = q(f"jit_train_step({result.program.name})"), q(result.mode)
    for device, rows in device_rows(columns_of(frame)):
        pid = int(device) + 1
        events.append(f'{{"ph":"M","pid":{pid},"name":"process_name","args":{{"name":{q(f"/device:TPU:{device}")}}}}}')
        events.append(f'{{"ph":"M","pid":{pid},"name":"process_sort_index","args":{{"sort_index":{pid}}}}}')
        start_ns, end_ns = ns_list(rows["start_s"]), ns_list(rows["end_s"])
        stream = rows["stream"]
        lane = stream_lanes(stream, start_ns, end_ns)
        present = set(zip(stream, lane))
        threads = [("XLA Modules", 0)] + sorted(
            (p for p in present if p[0] != "XLA Modules"),
            key=lambda p: (STREAM_ORDER.index(p[0]) if p[0] in STREAM_ORDER else len(STREAM_ORDER), p[0], p[1]))
        tids = {p: i + 1 for i, p in enumerate(threads)}
        for (s, k), tid in tids.items():
            head = f'{{"ph":"M","pid":{pid},"tid":{tid},"name":'
            events.append(f'{head}"thread_name","args":{{"name":{q(lane_name(s, k))}}}}}')
            events.append(f'{head}"thread_sort_index","args":{{"sort_index":{tid}}}}}')
        events.append(f'{{"ph":"X","pid":{pid},"tid":{tids["XLA Modules", 0]},"name":{module},"ts":0,'
                      f'"dur":{step_ns / 1000!r},"args":{{"run":"tpusim","mode":{mode}}}}}')
        cols = zip(rows["name"], rows["category"], rows["phase"], rows["layer"], rows["flops"], rows["bytes"])
        for i, (name, category, phase, layer, flops, nbytes) in enumerate(cols):
            args = f'"category":{q(category)},"phase":{q(phase)},"layer":{int(layer)}'
            if flops:
                args += f',"model_flops":{number(float(flops))}'
            if nbytes:
                args += f',"{"bytes_accessed" if stream[i] == "XLA Ops" else "bytes"}":{number(float(nbytes))}'
            events.append(f'{{"ph":"X","pid":{pid},"tid":{tids[stream[i], lane[i]]},"name":{q(name)},'
                          f'"ts":{start_ns[i] / 1000!r},"dur":{(end_ns[i] - start_ns[i]) / 1000!r},"args":{{{args}}}}}')
    return (f'{{"displayTimeUnit":"ns","metadata":{{"tpusim":{{"topology":{q(result.topology.name)},"mode":{mode},'
            f'"workload":{q(result.program.name)}}}}},"traceEvents":[' + ",".join(events) + "]}")


def write_chrome_trace(frame: dict[str, list] | pd.DataFrame, result: SimResult, path: Path) -> None:
    write_atomic(path, gzip.compress(chrome_trace_json(frame, result).encode(), mtime=0))
