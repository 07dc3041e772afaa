"""Write a simulated step as an XSpace (``<host>.xplane.pb``), laid out like a real TPU profile, so that
XProf (``xprof --logdir DIR``) and TensorBoard's profile plugin open it with all their tools.

XProf lists a run only from ``<logdir>/plugins/profile/<run>/<host>.xplane.pb``. The layout mirrors
the v6e capture in ``traces/real/tpu-v6e-host-offload`` (read with :func:`tpusim.analysis.profiles.xplane.load_xspace`):

* one ``/device:TPU:N`` plane per simulated device (one per class of equivalent devices, or every
  device with ``--all-devices``), with the plane stats XProf's overview and roofline read:
  ``device_type_string`` (XLA's name: ``TPU v6 Lite``), ``peak_teraflops_per_second``,
  ``peak_hbm_bw_gigabytes_per_second``;
* lines ``XLA Modules`` (the step's module, ``jit_<workload>(<program id>)``), ``Steps`` (step 0),
  ``XLA Ops`` (the TensorCore's ops), ``XLA Collectives`` (collectives, start to done), ``Async XLA
  Ops`` (host copies, which XProf shows as ``Host Offload Ops`` rows) and one line per link
  (``ICI x``, ``DCN``, ``PCIe``); ops overlapping on a line go to extra lines (``XLA Collectives #2``),
  as in the Perfetto JSON (:mod:`tpusim.analysis.lanes`);
* per-op stats in the op's XEventMetadata, as real profiles carry them: ``hlo_category``,
  ``program_id``, ``symbol_id`` (XProf's op profile, HLO stats and roofline key ops on these two and
  come out empty without them), ``flops``, ``model_flops``, ``bytes_accessed`` and
  ``memory_access_breakdown`` (HBM), ``long_name``, ``tf_op``.

Deterministic: no wall-clock time inside (lines start at 0), ids in first-use order, maps serialized
sorted; two identical runs write identical bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections import namedtuple
from pathlib import Path
from typing import TYPE_CHECKING

from tpusim.analysis.lanes import lane_name, ns_list, stream_lanes
from tpusim.analysis.profiles.xplane import XSpace
from tpusim.analysis.timeline import columns_of, device_rows

if TYPE_CHECKING:
    import pandas as pd

# XLA's device_type_string per chip, as profiles report it (tpusim/sim/chips.py takes them as aliases).
DEVICE_TYPE = {"v2": "TPU v2", "v3": "TPU v3", "v4": "TPU v4", "v5e": "TPU v5 Lite", "v5p": "TPU v5",
               "v6e": "TPU v6 Lite", "tpu7x": "TPU7x"}
# tpusim's op categories as XLA's hlo_category names them (what XProf's op profile groups by).
HLO_CATEGORY = {"matmul": "convolution fusion", "attention": "convolution fusion", "elementwise": "loop fusion",
                "embedding": "data formatting", "loss": "loop fusion", "optimizer": "loop fusion",
                "copy-to-host": "copy-start", "copy-from-host": "copy-start"}
LINE_ORDER = ["XLA Modules", "Steps", "XLA Ops", "XLA Collectives", "Async XLA Ops", "ICI x", "ICI y", "ICI z", "DCN",
              "PCIe"]
PROFILE_SUBDIR = Path("plugins") / "profile"
_KIND = {int: "int64_value", bool: "int64_value", float: "double_value", str: "str_value", bytes: "bytes_value"}
_UINT_STATS = {"program_id", "symbol_id", "run_id"}


def program_id(name: str) -> int:
    """A stable 64-bit program id for a program name (XLA's are fingerprints of the module)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def hlo_category(category: str) -> str:
    return HLO_CATEGORY.get(category, category)


class _Plane:
    """An XPlane under construction: stat and event-metadata ids handed out in first-use order."""

    def __init__(self, plane):
        self.plane = plane
        self.stat_ids: dict[str, int] = {}
        self.meta_ids: dict[tuple, int] = {}
        self._encoded: list[bytes] = []  # op and link metadata in protobuf's wire format, merged by finish()
        self._parts: dict[tuple, bytes] = {}  # encoded runs of XStats that ops share

    def stat_id(self, name: str) -> int:
        if name not in self.stat_ids:
            self.stat_ids[name] = len(self.stat_ids) + 1
            self.plane.stat_metadata[self.stat_ids[name]].id = self.stat_ids[name]
            self.plane.stat_metadata[self.stat_ids[name]].name = name
        return self.stat_ids[name]

    def add_stats(self, target, stats: dict) -> None:
        """Append ``stats`` to a repeated XStat field: int -> int64 (uint64 for ids, as XLA writes
        them), float -> double, str -> str, bytes -> bytes."""
        for name, value in stats.items():
            kind = _KIND.get(type(value), "str_value")
            if kind == "int64_value" and name in _UINT_STATS:
                kind = "uint64_value"
            target.add(**{"metadata_id": self.stat_id(name), kind: value})

    def metadata(self, name: str, display_name: str = "", stats: dict | None = None, key=None) -> int:
        key = key if key is not None else (name,)
        if key not in self.meta_ids:
            mid = len(self.meta_ids) + 1
            self.meta_ids[key] = mid
            md = self.plane.event_metadata[mid]
            md.id, md.name, md.display_name = mid, name, display_name
            if stats:
                self.add_stats(md.stats, stats)
        return self.meta_ids[key]

    def op_metadata(self, r, pid: int, module: str, key) -> int:
        """``metadata(r.name, r.name, _op_stats(r, pid, module), key=key)``, the same message built faster
        (issue 13: the 70B's 5,375 ops have 54,000 stats, ~0.07 s of ``add`` calls). It is encoded in
        protobuf's wire format and merged into the plane by :meth:`finish`: parsing builds the message
        the ``add`` calls build, so the serialized XSpace has the same bytes (``tests/test_runout.py``).
        The runs of stats that ops share (category and program, sizes, scope) are encoded once."""
        if key not in self.meta_ids:
            self.meta_ids[key] = len(self.meta_ids) + 1
            s = _op_stats(r, pid, module)
            self._add_encoded(self.meta_ids[key], r.name, b"".join([
                self._part(_CATEGORY, (s["hlo_category"], s["program_id"])), self._stat("symbol_id", s["symbol_id"]),
                self._part(_SIZES, (s["flops"], s["model_flops"], s["bytes_accessed"], s["raw_bytes_accessed"],
                                    s["memory_access_breakdown"])),
                self._stat("long_name", s["long_name"]), self._part(_SCOPE, (s["tf_op"],))]))
        return self.meta_ids[key]

    def link_metadata(self, r) -> int:
        """``metadata(r.name, r.name, {"hlo_category": ..., "bytes": float(r.bytes)}, key=("link", r.name))``
        (a transfer on a link), encoded as :meth:`op_metadata` encodes."""
        key = ("link", r.name)
        if key not in self.meta_ids:
            self.meta_ids[key] = len(self.meta_ids) + 1
            self._add_encoded(self.meta_ids[key], r.name, self._part(("hlo_category",), (hlo_category(r.category),))
                              + self._stat("bytes", float(r.bytes)))
        return self.meta_ids[key]

    def _add_encoded(self, mid: int, name: str, stats: bytes) -> None:
        # XEventMetadata: id = 1, name = 2, display_name = 4 (the name), stats = 5; as the value (2) of an
        # entry of XPlane.event_metadata (4), keyed (1) by its id
        md = b"\x08" + _varint(mid) + _field(0x12, name.encode()) + _field(0x22, name.encode()) + stats
        self._encoded.append(_field(0x22, b"\x08" + _varint(mid) + _field(0x12, md)))

    def _part(self, names: tuple[str, ...], values: tuple) -> bytes:
        """The stats ``names`` = ``values`` (no floats: -0.0 == 0.0), encoded once per plane."""
        key = (names, values)
        if key not in self._parts:
            self._parts[key] = b"".join(self._stat(n, v) for n, v in zip(names, values))
        return self._parts[key]

    def _stat(self, name: str, value: int | float | str | bytes) -> bytes:
        """An XStat as an XEventMetadata's stats (field 5), typed as :meth:`add_stats` types it."""
        if isinstance(value, float):
            body = b"\x11" + struct.pack("<d", value)  # double_value = 2, 64 bits little-endian
        elif isinstance(value, int):
            body = (b"\x18" + _varint(value) if name in _UINT_STATS  # uint64_value = 3
                    else b"\x20" + _varint(value & 0xFFFF_FFFF_FFFF_FFFF))  # int64_value = 4, two's complement
        elif isinstance(value, str):
            body = _field(0x2a, value.encode())  # str_value = 5
        else:
            body = _field(0x32, value)  # bytes_value = 6
        return _field(0x2a, b"\x08" + _varint(self.stat_id(name)) + body)

    def finish(self) -> None:
        """Merge the encoded metadata into the plane (a map: the order they are merged in does not matter;
        the XSpace is serialized with its maps sorted)."""
        self.plane.MergeFromString(b"".join(self._encoded))
        self._encoded = []


_Row = namedtuple("_Row", "stream name category layer phase flops bytes op_index")


_BYTE = [bytes((i,)) for i in range(256)]


def _varint(n: int) -> bytes:
    """``n`` >= 0 as a protobuf varint: 7 bits a byte, low bits first, the top bit set on all but the last."""
    if n < 0x80:
        return _BYTE[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(tag: int, data: bytes) -> bytes:
    """A length-delimited protobuf field: its tag byte, the length, the bytes."""
    return _BYTE[tag] + _varint(len(data)) + data


def hbm_access(nbytes: int) -> bytes:
    """A serialized MemoryAccessBreakdown with one entry: ``nbytes`` of HBM (memory_space 1), as the v6e
    capture encodes it (``0a 0a 08 <op> 10 01 18 <bytes>``: operation 1 read, 2 write). tpusim counts an
    op's HBM bytes read and written together, and XProf adds both for HBM bandwidth: one entry, read."""
    entry = b"\x08\x01\x10\x01\x18" + _varint(nbytes)
    return b"\x0a" + _varint(len(entry)) + entry


# The runs of _op_stats' stats that ops share, which op_metadata encodes once per plane.
_CATEGORY = ("hlo_category", "program_id")
_SIZES = ("flops", "model_flops", "bytes_accessed", "raw_bytes_accessed", "memory_access_breakdown")
_SCOPE = ("tf_op",)
_OP_ORDER = [*_CATEGORY, "symbol_id", *_SIZES, "long_name", *_SCOPE]  # _op_stats' keys (tests/test_runout.py)


def _op_stats(r, pid: int, module: str) -> dict:
    flops = int(round(r.flops)) if r.flops else 0
    nbytes = int(round(r.bytes)) if r.bytes else 0
    cat = hlo_category(r.category)
    scope = f"layer {r.layer} {r.phase}" if r.layer >= 0 else r.phase
    return {"hlo_category": cat, "program_id": pid, "symbol_id": int(r.op_index) + 1,
            "flops": flops, "model_flops": flops, "bytes_accessed": nbytes, "raw_bytes_accessed": nbytes,
            "memory_access_breakdown": hbm_access(nbytes) if nbytes and r.stream == "XLA Ops" else b"",
            "long_name": f"%{r.name} = {cat}(...), tpusim {r.category}, {scope}",
            "tf_op": f"{module}/{scope.replace(' ', '_')}/{r.category}:"}


def device_plane(space, plane_id: int, device: int, rows: dict[str, list] | pd.DataFrame, *, chip, module: str,
                 pid: int, step_ns: int, runs: list[tuple[str, int, int, int]] | None = None, op_stats=None) -> None:
    """Add ``/device:TPU:<device>`` with the rows of that device (timeline schema) to ``space``.

    ``runs``: the module runs the plane holds, ``(module, program id, start ns, duration ns)`` each, with
    ``rows`` carrying a ``run`` column (the index of the row's run) and times from the plane's start (a
    replay's modules one after the other); by default one run of ``module`` over the step. Each run is a
    step (its ops' ``group_id``). ``op_stats(run, name)``: stats put over an op's own, e.g. the profile's
    ``symbol_id`` and ``long_name`` for an op the replay took from it (None: keep tpusim's)."""
    rows = columns_of(rows)
    runs = runs if runs is not None else [(module, pid, 0, int(step_ns))]
    run_of = rows["run"] if "run" in rows else [0] * len(rows["start_s"])
    p = _Plane(space.planes.add(id=plane_id, name=f"/device:TPU:{device}"))
    p.add_stats(p.plane.stats, {
        "device_type_string": DEVICE_TYPE.get(chip.name, chip.display_name),
        "peak_teraflops_per_second": chip.bf16_flops_per_s / 1e12,         # FLOP/s -> TFLOP/s
        "peak_hbm_bw_gigabytes_per_second": chip.hbm_bytes_per_s / 1e9,    # bytes/s -> GB/s
        "has_megacore": int(bool(getattr(chip, "megacore", False))),
    })
    start = [t * 1000 for t in ns_list(rows["start_s"])]  # ps, from whole ns (the same instants as the JSON)
    end = [t * 1000 for t in ns_list(rows["end_s"])]
    # XProf's trace viewer turns the copies of an "Async XLA Ops" line into "Host Offload Ops" rows and
    # drops its other events: collectives get a line of their own.
    stream = ["XLA Collectives" if s == "Async XLA Ops" and not c.startswith("copy") else s
              for s, c in zip(rows["stream"], rows["category"])]
    lanes = stream_lanes(stream, start, end)
    keys = sorted({(s, k) for s, k in zip(stream, lanes)} | {("XLA Modules", 0), ("Steps", 0)},
                  key=lambda t: (LINE_ORDER.index(t[0]) if t[0] in LINE_ORDER else len(LINE_ORDER), t[0], t[1]))
    lines = {}
    span_ps = max(int(a) + int(d) for _, _, a, d in runs) * 1000
    for n, (s, k) in enumerate(keys):
        lines[s, k] = p.plane.lines.add(id=n + 1, display_id=n + 1, name=lane_name(s, k), timestamp_ns=0,
                                        duration_ps=span_ps)
    for n, (name, run_pid, start_ns, dur_ns) in enumerate(runs):
        ev = lines["XLA Modules", 0].events.add(metadata_id=p.metadata(f"{name}({run_pid})"),
                                                offset_ps=int(start_ns) * 1000, duration_ps=int(dur_ns) * 1000)
        p.add_stats(ev.stats, {"run_id": n + 1, "program_id": run_pid})
        ev = lines["Steps", 0].events.add(metadata_id=p.metadata(str(n), key=("step", n)),
                                          offset_ps=int(start_ns) * 1000, duration_ps=int(dur_ns) * 1000)
        p.add_stats(ev.stats, {"step_num": n, "group_id": n})
    group_stat = p.stat_id("group_id")
    for i, r in enumerate(map(_Row._make, zip(*(rows[c] for c in _Row._fields)))):
        run = run_of[i]
        if r.stream in ("XLA Ops", "Async XLA Ops") and op_stats is None:  # an op, its stats as real profiles have them
            mid = p.op_metadata(r, runs[run][1], runs[run][0], key=("op", run, r.op_index))
        elif r.stream in ("XLA Ops", "Async XLA Ops"):  # the same, some of them the profile's
            stats = _op_stats(r, runs[run][1], runs[run][0])
            stats.update(op_stats(run, r.name) or {})
            mid = p.metadata(r.name, r.name, stats, key=("op", run, r.op_index))
        else:  # a link transfer: one stage of a collective (or a copy) on that link
            mid = p.link_metadata(r)
        ev = lines[stream[i], lanes[i]].events.add(metadata_id=mid, offset_ps=start[i], duration_ps=end[i] - start[i])
        if r.stream == "XLA Ops":  # XProf's overview page sums a step's ops by group_id (the step)
            ev.stats.add(metadata_id=group_stat, int64_value=run)
    p.finish()


def xspace_bytes(frame: dict[str, list] | pd.DataFrame, *, chip, program_name: str, step_time_s: float,
                 host: str = "tpusim") -> bytes:
    """The serialized XSpace of a simulated step's timeline (:func:`tpusim.analysis.timeline.timeline_columns`
    or ``timeline_frame``)."""
    space = XSpace(hostnames=[host])
    module = f"jit_{program_name}"
    pid = program_id(program_name)
    step_ns = ns_list([step_time_s])[0]
    for n, (device, rows) in enumerate(device_rows(columns_of(frame))):
        device_plane(space, n + 1, int(device), rows, chip=chip, module=module, pid=pid, step_ns=step_ns)
    return space.SerializeToString(deterministic=True)


def profile_dir(out: Path, run: str) -> Path:
    """``out/plugins/profile/<run>``, where XProf looks for a run's ``<host>.xplane.pb``."""
    return Path(out) / PROFILE_SUBDIR / run


def clear_xprof_cache(run_dir: Path) -> None:
    """Remove what XProf cached beside the ``.xplane.pb`` files of ``run_dir`` (``*.SSTABLE``,
    ``*.op_stats_v2.pb``, ``*.hlo_proto.pb``, ``cache_version.txt``): it would show the previous run's
    data for files rewritten in place."""
    for f in Path(run_dir).iterdir():
        if f.is_file() and not f.name.endswith(".xplane.pb") and (
                f.suffix == ".SSTABLE" or f.name.endswith((".op_stats_v2.pb", ".hlo_proto.pb"))
                or f.name == "cache_version.txt"):
            f.unlink(missing_ok=True)


def write_xspace(out: Path, frame: dict[str, list] | pd.DataFrame, result, *, run: str = "tpusim",
                 host: str = "simulated") -> Path:
    """Write ``out/plugins/profile/<run>/<host>.xplane.pb`` for a simulated step; returns its path."""
    from tpusim.analysis.timeline import write_atomic

    d = profile_dir(out, run)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{host}.xplane.pb"
    clear_xprof_cache(d)
    write_atomic(path, xspace_bytes(frame, chip=result.topology.chip, program_name=result.program.name,
                                    step_time_s=result.step_time_s, host=host))
    return path
