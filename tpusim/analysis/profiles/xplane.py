"""Read ``*.xplane.pb`` (XSpace protobuf), what ``jax.profiler.trace`` writes, with ``protobuf`` alone.

Field numbers are those of ``tsl/profiler/protobuf/xplane.proto`` (see
``shared/reference/trace-formats.md``). What is read:

* ``/device:TPU:N`` planes: every line (``XLA Modules``, ``XLA Ops``, ``Async XLA Ops``,
  ``XLA TraceMe``, ``Steps``, ...). An op's ``hlo_category``, ``model_flops``, ``bytes_accessed``,
  ``program_id`` live in the stats of its XEventMetadata; an event's own stats override them (TPU
  events carry ``device_offset_ps``/``device_duration_ps``, the chip's clock). The plane stats give
  the chip (``device_type_string``) and its peaks (``peak_teraflops_per_second``,
  ``peak_hbm_bw_gigabytes_per_second``).
* ``/host:CPU``: only events with an ``hlo_op`` stat, i.e. ops run by XLA's CPU backend (a capture
  with ``--xla_force_host_platform_device_count``), on stream ``XLA Ops`` of their
  ``device_ordinal``. Host threads' other events (runtime, Python, allocator) are not kept.
* ``/host:metadata``: the serialized HloProto of each module (:mod:`.hloproto`).
"""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf.message import DecodeError

from tpusim.errors import TpusimError
from tpusim.limits import MAX_CHIPS
from tpusim.analysis.profiles._messages import message_classes
from tpusim.analysis.profiles.frame import Device
from tpusim.analysis.profiles.hloproto import HloModule, parse_hlo_module

_XSTAT_VALUE = "value"
SCHEMA = {
    "XSpace": [("planes", 1, "XPlane*"), ("errors", 2, "string*"), ("warnings", 3, "string*"),
               ("hostnames", 4, "string*")],
    "XPlane": [("id", 1, "int64"), ("name", 2, "string"), ("lines", 3, "XLine*"),
               ("event_metadata", 4, "map<int64,XEventMetadata>"),
               ("stat_metadata", 5, "map<int64,XStatMetadata>"), ("stats", 6, "XStat*")],
    "XLine": [("id", 1, "int64"), ("display_id", 10, "int64"), ("name", 2, "string"),
              ("display_name", 11, "string"), ("timestamp_ns", 3, "int64"), ("duration_ps", 9, "int64"),
              ("events", 4, "XEvent*")],
    "XEvent": [("metadata_id", 1, "int64"), ("offset_ps", 2, "int64", "data"),
               ("num_occurrences", 5, "int64", "data"), ("duration_ps", 3, "int64"), ("stats", 4, "XStat*")],
    "XStat": [("metadata_id", 1, "int64"), ("double_value", 2, "double", _XSTAT_VALUE),
              ("uint64_value", 3, "uint64", _XSTAT_VALUE), ("int64_value", 4, "int64", _XSTAT_VALUE),
              ("str_value", 5, "string", _XSTAT_VALUE), ("bytes_value", 6, "bytes", _XSTAT_VALUE),
              ("ref_value", 7, "uint64", _XSTAT_VALUE)],
    "XEventMetadata": [("id", 1, "int64"), ("name", 2, "string"), ("metadata", 3, "bytes"),
                       ("display_name", 4, "string"), ("stats", 5, "XStat*"), ("child_id", 6, "int64*")],
    "XStatMetadata": [("id", 1, "int64"), ("name", 2, "string"), ("description", 3, "string")],
}
XSpace = message_classes("tpusim.xplane", SCHEMA)["XSpace"]

_TPU_PLANE = re.compile(r"^/device:TPU:(\d+)$")
_HLO_NAME = re.compile(r"^%([^\s=]+) = ")  # "%fusion.16 = f32[...] fusion(...)" -> "fusion.16"


def load_xspace(path: Path) -> XSpace:
    """The XSpace message in ``path``; a TpusimError names the file if it is missing, empty or corrupt."""
    from tpusim.safeio import read_input

    data = read_input(path, decompress=False)  # regular files only, at most tpusim's input limit
    if not data:
        raise TpusimError("empty file (0 bytes), not an XSpace profile", source=str(path))
    try:
        return XSpace.FromString(data)
    except DecodeError:
        raise TpusimError(f"truncated or corrupt XSpace protobuf ({len(data):,} bytes do not parse)",
                          source=str(path)) from None


def stats_of(stats, names: dict[int, str]) -> dict:
    """XStats as ``{name: value}``, skipping stats with no value set.

    A ``ref_value`` is an id into the plane's stat names: the profiler stores strings that repeat
    (op and module names on the CPU backend) once, there.
    """
    out = {}
    for st in stats:
        kind = st.WhichOneof(_XSTAT_VALUE)
        if kind is not None:
            value = getattr(st, kind)
            key = names.get(st.metadata_id, str(st.metadata_id))
            out[key] = names.get(value, "") if kind == "ref_value" else value
    return out


def _op_name(meta) -> str:
    """The HLO op name: the instruction in the metadata's HLO text, else its display name or name.

    The text wins because ``Async XLA Ops`` events are displayed as ``async-copy`` whatever the copy.
    """
    m = _HLO_NAME.match(meta.name)
    return m[1] if m else (meta.display_name or meta.name)


def _device(plane, plane_stats: dict) -> Device:
    tflops = plane_stats.get("peak_teraflops_per_second")
    hbm_gbs = plane_stats.get("peak_hbm_bw_gigabytes_per_second")
    return Device(id=_plane_device(plane), name=plane.name,
                  kind=plane_stats.get("device_type_string"),
                  peak_flops_per_s=tflops * 1e12 if tflops else None,   # TFLOP/s -> FLOP/s
                  hbm_bytes_per_s=hbm_gbs * 1e9 if hbm_gbs else None)    # GB/s -> bytes/s


def _plane_device(plane) -> int:
    d = int(_TPU_PLANE.match(plane.name)[1])
    if d >= 8 * MAX_CHIPS:
        raise TpusimError(f"plane {plane.name[:40]!r}: device ids are 0..{8 * MAX_CHIPS - 1}")
    return d


def _row(device: int, stream: str, line_ps: int, event, meta, st: dict) -> dict:
    start = line_ps + event.offset_ps
    dev_start = st.get("device_offset_ps")
    dev_dur = st.get("device_duration_ps")
    flops = st.get("model_flops", st.get("flops"))
    return {
        "device": device, "stream": stream, "name": _op_name(meta), "hlo_category": st.get("hlo_category", ""),
        "long_name": meta.name if meta.name.startswith("%") else st.get("long_name", ""),
        "start_ps": start, "end_ps": start + event.duration_ps,
        "device_start_ps": None if dev_start is None or dev_dur is None else line_ps + dev_start,
        "device_end_ps": None if dev_start is None or dev_dur is None else line_ps + dev_start + dev_dur,
        "flops": flops, "bytes": st.get("bytes_accessed"),
        "module": st.get("hlo_module"), "program_id": st.get("program_id"), "run_id": st.get("run_id"),
    }


def _plane_rows(plane, *, cpu: bool, origin_ps: int) -> list[dict]:
    names = {k: v.name for k, v in plane.stat_metadata.items()}
    if cpu and "hlo_op" not in names.values():
        return []  # a host plane without XLA CPU ops (e.g. the host of a TPU capture)
    device = None if cpu else _plane_device(plane)
    meta_stats = {k: stats_of(m.stats, names) for k, m in plane.event_metadata.items() if m.stats}
    rows = []
    for line in plane.lines:
        line_ps = line.timestamp_ns * 1000 - origin_ps
        for ev in line.events:
            if ev.WhichOneof("data") != "offset_ps":
                continue  # an aggregated counter (num_occurrences), not a timed event
            st = stats_of(ev.stats, names)
            if cpu and "hlo_op" not in st:
                continue
            meta = plane.event_metadata[ev.metadata_id]
            st = {**meta_stats.get(ev.metadata_id, {}), **st}
            if cpu:
                ordinal = st.get("device_ordinal", 0)
                if not isinstance(ordinal, int) or not 0 <= ordinal < 8 * MAX_CHIPS:
                    raise TpusimError(f"an XLA CPU op on device_ordinal {ordinal!r}: ordinals are "
                                      f"0..{8 * MAX_CHIPS - 1}")
                rows.append(_row(ordinal, "XLA Ops", line_ps, ev, meta, st))
            else:
                rows.append(_row(device, line.name, line_ps, ev, meta, st))
    return rows


def _hlo_modules(plane, path: Path) -> dict[str, HloModule]:
    names = {k: v.name for k, v in plane.stat_metadata.items()}
    modules = {}
    for meta in plane.event_metadata.values():
        st = stats_of(meta.stats, names)
        if "Hlo Proto" in st:
            # Keyed by the metadata name, "jit_f(<program id>)", as XLA Modules events are named:
            # module names alone repeat (35 CPU modules include 16 jit_convert_element_type).
            modules[meta.name] = parse_hlo_module(meta.name, st["Hlo Proto"], program_id=st.get("program_id"),
                                                  source=str(path))
    return modules


def read_xplane(path: Path) -> tuple[list[dict], list[Device], dict[str, HloModule]]:
    """Raw timeline rows (``frame.RAW_COLUMNS``), devices and HLO modules of an ``*.xplane.pb``.

    Raises
    ------
    TpusimError
        The file is missing, empty or not an XSpace, or it has no TPU plane and no XLA CPU ops.
    """
    try:
        return _read_xplane(path)
    except TpusimError as e:
        raise e.within(str(path)) from None


def _read_xplane(path: Path) -> tuple[list[dict], list[Device], dict[str, HloModule]]:
    space = load_xspace(path)
    # Line timestamps may be Unix-epoch nanoseconds (~1e21 ps, beyond float64's exact integers):
    # times are taken from the earliest line in exact integer arithmetic, before any float.
    origin_ps = 1000 * min((line.timestamp_ns for plane in space.planes for line in plane.lines if line.events),
                           default=0)
    rows: list[dict] = []
    devices: list[Device] = []
    modules: dict[str, HloModule] = {}
    for plane in space.planes:
        if _TPU_PLANE.match(plane.name):
            names = {k: v.name for k, v in plane.stat_metadata.items()}
            devices.append(_device(plane, stats_of(plane.stats, names)))
            rows += _plane_rows(plane, cpu=False, origin_ps=origin_ps)
        elif plane.name == "/host:CPU":
            rows += _plane_rows(plane, cpu=True, origin_ps=origin_ps)
        elif plane.name == "/host:metadata":
            modules.update(_hlo_modules(plane, path))
    if not devices and not rows:
        planes = ", ".join(p.name for p in space.planes) or "none"
        errors = f"; profiler errors: {'; '.join(space.errors)}" if space.errors else ""
        raise TpusimError(f"no /device:TPU:N plane and no XLA CPU op events (planes: {planes}){errors}",
                          source=str(path))
    if not devices:  # a CPU capture: one device per device_ordinal seen
        devices = [Device(id=d, name=f"/host:CPU device_ordinal {d}", kind="CPU")
                   for d in sorted({r["device"] for r in rows})]
    return rows, sorted(devices, key=lambda d: d.id), modules
