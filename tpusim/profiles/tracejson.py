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

import gzip
import json
import re
import zlib
from pathlib import Path

from tpusim.errors import TpusimError
from tpusim.profiles.frame import Device

_TPU_PROCESS = re.compile(r"^/device:TPU:(\d+)")


def load_trace_events(path: Path) -> list[dict]:
    """The ``traceEvents`` of a (gzipped) trace JSON file, with every failure named as a TpusimError."""
    src = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise TpusimError("file not found", source=src) from None
    except OSError as e:
        raise TpusimError(f"cannot read the file ({e.strerror})", source=src) from None
    if not raw:
        raise TpusimError("empty file (0 bytes), not a trace", source=src)
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise TpusimError(f"truncated or corrupt gzip ({e})", source=src) from None
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError:
        raise TpusimError("not a JSON trace (not UTF-8 text)", source=src) from None
    except json.JSONDecodeError as e:
        raise TpusimError(f"truncated or corrupt JSON (line {e.lineno}, column {e.colno}: {e.msg})",
                          source=src) from None
    # The object form {"traceEvents": [...]} or the bare array form of the trace-event format.
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    if not isinstance(events, list):
        pod_viewer = isinstance(doc, dict) and "podStatsSequence" in doc
        hint = " (a pod viewer output: use read_pod_viewer)" if pod_viewer else ""
        raise TpusimError(f"not a trace: no 'traceEvents' list{hint}", source=src)
    if not any(isinstance(e, dict) and e.get("ph") for e in events):
        raise TpusimError("the trace has no events", source=src)
    return events


def _int(value) -> int | None:
    """An id or picosecond count from args, where the trace viewer writes numbers as strings."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _row(device: int, stream: str, e: dict, args: dict) -> dict:
    start = float(e["ts"]) * 1e6  # us -> ps
    dev_start, dev_dur = _int(args.get("device_offset_ps")), _int(args.get("device_duration_ps"))
    on_device = dev_start is not None and dev_dur is not None
    flops = args.get("model_flops", args.get("flops"))
    return {
        "device": device, "stream": stream, "name": e.get("name", ""), "hlo_category": args.get("hlo_category", ""),
        "long_name": args.get("long_name", ""), "start_ps": start, "end_ps": start + float(e.get("dur", 0)) * 1e6,
        "device_start_ps": dev_start if on_device else None,
        "device_end_ps": dev_start + dev_dur if on_device else None,
        "flops": float(flops) if flops is not None else None,
        "bytes": float(args["bytes_accessed"]) if "bytes_accessed" in args else None,
        "module": args.get("hlo_module"), "program_id": _int(args.get("program_id")),
        "run_id": _int(args.get("run_id")),
    }


def read_trace_json(path: Path) -> tuple[list[dict], list[Device]]:
    """Raw timeline rows (``frame.RAW_COLUMNS``) and devices of a trace-viewer JSON file.

    Raises
    ------
    TpusimError
        The file is missing, empty, not gzip/JSON, has no events, or no TPU device and no XLA CPU op.
    """
    events = load_trace_events(path)
    meta = [e for e in events if isinstance(e, dict) and e.get("ph") == "M"]
    processes = {e.get("pid"): e.get("args", {}).get("name", "") for e in meta if e.get("name") == "process_name"}
    threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "")
               for e in meta if e.get("name") == "thread_name"}
    devices: dict[int, Device] = {}
    rows = []
    for i, e in enumerate(events):
        if not isinstance(e, dict) or e.get("ph") != "X" or "ts" not in e:
            continue
        args = e.get("args") or {}
        process = processes.get(e.get("pid"), "")
        m = _TPU_PROCESS.match(process)
        try:
            if m:
                device = int(m[1])
                devices.setdefault(device, Device(id=device, name=process, kind=None))
                rows.append(_row(device, threads.get((e.get("pid"), e.get("tid")), str(e.get("tid"))), e, args))
            elif "hlo_op" in args and _int(args.get("device_ordinal")) is not None:
                device = int(args["device_ordinal"])
                devices.setdefault(device, Device(id=device, name=f"{process} device_ordinal {device}", kind="CPU"))
                rows.append(_row(device, "XLA Ops", e, args))
        except (TypeError, ValueError):
            raise TpusimError(f"trace event {i} ({e.get('name')!r}) has a non-numeric ts, dur or count",
                              source=str(path)) from None
    if not rows:
        names = ", ".join(sorted(set(processes.values()))) or "none"
        raise TpusimError(f"no /device:TPU:N process and no XLA CPU op events (processes: {names})",
                          source=str(path))
    return rows, sorted(devices.values(), key=lambda d: d.id)
