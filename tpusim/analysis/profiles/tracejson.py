"""Read trace-viewer JSON (``*.trace.json.gz``, ``*.json``, ``perfetto_trace.json.gz``).

Chrome trace-event format: ``ph: "M"`` events name processes (``process_name``: ``/device:TPU:0``,
``/host:CPU``) and threads (``thread_name``: ``XLA Ops``, ...); ``ph: "X"`` events have ``ts`` and
``dur`` in microseconds. Kept: every complete event of a ``/device:TPU:N`` process (stream = its
thread name), and events of other processes whose ``args`` have ``hlo_op`` and ``device_ordinal``
(XLA's CPU backend), on stream ``XLA Ops``.

Compared with the xplane.pb it was converted from, the trace viewer drops events whose host-clock
duration is zero (183 XLA Ops events of the v6e capture) and shows ``Async XLA Ops`` as
``Host Offload Ops row N`` events named ``offload-copy.N``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tpusim.errors import TpusimError
from tpusim.analysis.profiles.frame import Device

_TPU_PROCESS = re.compile(r"^/device:TPU:(\d+)")


def load_trace_events(path: Path) -> list[dict]:
    """The ``traceEvents`` of a (gzipped) trace JSON file, with every failure named as a TpusimError."""
    from tpusim.safeio import read_input

    src = str(path)
    raw = read_input(path, source=src)  # regular files only, gunzipped with a size cap
    if not raw:
        raise TpusimError("empty file (0 bytes), not a trace", source=src)
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError:
        raise TpusimError("not a JSON trace (not UTF-8 text)", source=src) from None
    except json.JSONDecodeError as e:
        raise TpusimError(f"truncated or corrupt JSON (line {e.lineno}, column {e.colno}: {e.msg})",
                          source=src) from None
    except RecursionError:
        raise TpusimError("not a JSON trace: nested too deeply", source=src) from None
    # The object form {"traceEvents": [...]} or the bare array form of the trace-event format.
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    if not isinstance(events, list):
        pod_viewer = isinstance(doc, dict) and "podStatsSequence" in doc
        hint = " (a pod viewer output: its collectives replay with `tpusim replay FILE`)" if pod_viewer else ""
        raise TpusimError(f"not a trace: no 'traceEvents' list{hint}", source=src)
    if not any(isinstance(e, dict) and e.get("ph") for e in events):
        raise TpusimError("the trace has no events", source=src)
    return events


def _int(value) -> int | None:
    """An id or picosecond count from args, where the trace viewer writes numbers as strings."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _row(device: int, stream: str, e: dict, args: dict) -> dict:
    start = float(e["ts"]) * 1e6  # us -> ps
    dev_start, dev_dur = _int(args.get("device_offset_ps")), _int(args.get("device_duration_ps"))
    on_device = dev_start is not None and dev_dur is not None
    flops = args.get("model_flops", args.get("flops"))
    return {
        "device": device, "stream": stream, "name": _text(e.get("name")),
        "hlo_category": _text(args.get("hlo_category")), "long_name": _text(args.get("long_name")),
        "start_ps": start, "end_ps": start + float(e.get("dur", 0)) * 1e6,
        "device_start_ps": dev_start if on_device else None,
        "device_end_ps": dev_start + dev_dur if on_device else None,
        "flops": float(flops) if flops is not None else None,
        "bytes": float(args["bytes_accessed"]) if "bytes_accessed" in args else None,
        "module": args.get("hlo_module") if isinstance(args.get("hlo_module"), str) else None,
        "program_id": _int(args.get("program_id")),
        "run_id": _int(args.get("run_id")),
    }


def _text(value) -> str:
    """A name from the trace: text as it is; a number as its digits; anything else (null, a list) empty."""
    return value if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else ""


def _finite(row: dict) -> bool:
    """Times that are finite, durations that are not negative (a device clock, when given, too)."""
    try:
        t = [float(row[k]) for k in ("start_ps", "end_ps")]
        d = [float(row[k]) for k in ("device_start_ps", "device_end_ps") if row[k] is not None]
    except OverflowError:
        return False
    counts = [row[k] for k in ("flops", "bytes") if row[k] is not None]
    return (all(map(math.isfinite, t + d + counts)) and t[1] >= t[0] and (not d or d[1] >= d[0])
            and all(c >= 0 for c in counts))


def _key(value):
    """A pid or tid as a dict key: a list or object (not an id) becomes its text."""
    return value if isinstance(value, (int, float, str, type(None))) else repr(value)


def _name(meta: dict) -> str:
    args = meta.get("args")
    name = args.get("name", "") if isinstance(args, dict) else ""
    return name if isinstance(name, str) else ""


def _device_id(value, i: int, source: str) -> int:
    """A device ordinal: a whole number below tpusim's chip limit (x8 cores)."""
    from tpusim.limits import MAX_CHIPS

    d = int(value)
    if not 0 <= d < 8 * MAX_CHIPS:
        raise TpusimError(f"trace event {i} is on device {d}; device ids are 0..{8 * MAX_CHIPS - 1}", source=source)
    return d


def read_trace_json(path: Path) -> tuple[list[dict], list[Device]]:
    """Raw timeline rows (``frame.RAW_COLUMNS``) and devices of a trace-viewer JSON file.

    Raises
    ------
    TpusimError
        The file is missing, empty, not gzip/JSON, has no events, or no TPU device and no XLA CPU op.
    """
    src = str(path)
    events = load_trace_events(path)
    meta = [e for e in events if isinstance(e, dict) and e.get("ph") == "M"]
    processes = {_key(e.get("pid")): _name(e) for e in meta if e.get("name") == "process_name"}
    threads = {(_key(e.get("pid")), _key(e.get("tid"))): _name(e) for e in meta if e.get("name") == "thread_name"}
    devices: dict[int, Device] = {}
    rows = []
    for i, e in enumerate(events):
        if not isinstance(e, dict) or e.get("ph") != "X" or "ts" not in e:
            continue
        args = e.get("args") if isinstance(e.get("args"), dict) else {}
        pid = _key(e.get("pid"))
        process = processes.get(pid, "")
        m = _TPU_PROCESS.match(process)
        try:
            if m:
                device = _device_id(m[1], i, src)
                devices.setdefault(device, Device(id=device, name=process, kind=None))
                rows.append(_row(device, threads.get((pid, _key(e.get("tid"))), str(e.get("tid"))), e, args))
            elif "hlo_op" in args and _int(args.get("device_ordinal")) is not None:
                device = _device_id(args["device_ordinal"], i, src)
                devices.setdefault(device, Device(id=device, name=f"{process} device_ordinal {device}", kind="CPU"))
                rows.append(_row(device, "XLA Ops", e, args))
        except (TypeError, ValueError, OverflowError):
            raise TpusimError(f"trace event {i} ({str(e.get('name'))[:60]!r}) has a non-numeric ts, dur or count",
                              source=src) from None
        row = rows[-1] if rows and (m or "hlo_op" in args) else None
        if row is not None and not _finite(row):
            raise TpusimError(f"trace event {i} ({str(e.get('name'))[:60]!r}) has a negative or non-finite "
                              "time, duration, flops or bytes", source=src)
    if not rows:
        names = ", ".join(sorted(set(processes.values()))) or "none"
        raise TpusimError(f"no /device:TPU:N process and no XLA CPU op events (processes: {names})",
                          source=str(path))
    return rows, sorted(devices.values(), key=lambda d: d.id)
