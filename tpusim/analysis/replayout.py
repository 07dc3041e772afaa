"""``tpusim replay PROFILE --out DIR``: the replay as an XProf run beside the profile it replays.

``DIR/plugins/profile/replay/`` holds two hosts, which ``xprof --logdir DIR`` shows side by side:

* ``simulated.xplane.pb``: one ``/device:TPU:0`` plane with each module the replay simulated, one run
  of each, one after the other (in the replay's module order), as :mod:`tpusim.analysis.xspace` writes a
  simulated step; the ops keep the profile's HLO names, program ids and (from an ``.xplane.pb``) their
  ``symbol_id``, ``long_name``, ``hlo_category`` and ``tf_op``, so XProf matches them with the HLO.
  The input's ``/host:metadata`` plane (its HloProtos) follows, copied byte for byte: XProf's graph
  viewer and memory viewer read the modules from it, so they work on the simulated run too.
* ``measured.xplane.pb``: the input profile as it is.

A trace JSON has no HloProtos and XProf cannot read it: only ``simulated.xplane.pb`` is written, and
the graph and memory viewers have nothing to show. ``DIR/replay.json`` is what ``--json`` prints.
Deterministic: two identical replays write identical bytes.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tpusim.analysis.lanes import to_ns
from tpusim.analysis.profiles import Profile
from tpusim.analysis.replay import MODULE_END
from tpusim.analysis.xspace import XSpace, clear_xprof_cache, device_plane, profile_dir, program_id

RUN = "replay"
METADATA_PLANE = "/host:metadata"
# The profile's op stats the simulated op takes over tpusim's own: what XProf names and groups ops by.
_KEPT_STATS = ("hlo_category", "symbol_id", "tf_op")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return n, i


def raw_planes(data: bytes) -> list[bytes]:
    """The serialized XPlanes of a serialized XSpace (field 1), as they are in it, so a plane can be
    copied without re-encoding it. ``data`` has parsed as an XSpace; other fields are skipped."""
    planes, i = [], 0
    while i < len(data):
        tag, i = _varint(data, i)
        wire = tag & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire in (1, 5):  # fixed 64 / 32 bits
            i += 8 if wire == 1 else 4
        else:  # length-delimited (XSpace's own fields are all so)
            size, i = _varint(data, i)
            if tag >> 3 == 1:
                planes.append(data[i:i + size])
            i += size
    return planes


def _field(number: int, payload: bytes) -> bytes:
    size, out = len(payload), bytearray([number << 3 | 2])
    while True:
        b, size = size & 0x7F, size >> 7
        out.append(b | (0x80 if size else 0))
        if not size:
            return bytes(out) + payload


def metadata_plane(data: bytes) -> bytes | None:
    """The ``/host:metadata`` plane of a serialized XSpace, its bytes as they are; None if it has none."""
    for raw in raw_planes(data):
        if XSpace.FromString(_field(1, raw)).planes[0].name == METADATA_PLANE:
            return raw
    return None


def _program_ids(profile: Profile) -> dict[str, int]:
    """Module name -> the program id of its first run in the profile (XLA Modules events)."""
    t = profile.timeline
    runs = t[(t.stream == "XLA Modules") & t.program_id.notna()].sort_values(["device", "start_s"], kind="stable")
    return {str(m): int(pid) for m, pid in runs.groupby("module", sort=False).program_id.first().items()}


def _profile_op_stats(space) -> dict[tuple[int, str], dict]:
    """(program id, HLO op name) -> the stats of that op's XEventMetadata in the profile (lowest device first)."""
    from tpusim.analysis.profiles.xplane import _TPU_PLANE, _op_name, stats_of

    out: dict[tuple[int, str], dict] = {}
    planes = sorted((int(m[1]), p) for p in space.planes if (m := _TPU_PLANE.match(p.name)))
    for _, plane in planes:
        names = {k: v.name for k, v in plane.stat_metadata.items()}
        for meta in plane.event_metadata.values():
            st = stats_of(meta.stats, names)
            if "program_id" in st and "symbol_id" in st:
                kept = {k: st.get(k, "") for k in _KEPT_STATS}  # no tf_op in the profile: none made up
                kept = {k: v for k, v in kept.items() if v != "" or k == "tf_op"}
                if meta.name.startswith("%"):
                    kept["long_name"] = meta.name
                out.setdefault((int(st["program_id"]), _op_name(meta)), kept)
    return out


def replay_xspace_bytes(result, profile: Profile, data: bytes | None = None, *, host: str = "simulated") -> bytes:
    """The serialized XSpace of a replay (:func:`tpusim.analysis.replay.replay`): its simulated module runs on
    ``/device:TPU:0``, then the ``/host:metadata`` plane of ``data`` (the profile's bytes, for an
    ``.xplane.pb``) as it is."""
    pids = _program_ids(profile)
    stats = _profile_op_stats(XSpace.FromString(data)) if data else {}
    t = profile.timeline
    on_ops = {m: set(g) for m, g in t[t.stream == "XLA Ops"].groupby("module").name}
    runs, frames, at_ns = [], [], 0
    for module, simulated_s in zip(result.module_times.module, result.module_times.simulated_s):
        df = result.timelines.get(module)
        if df is None or not len(df):
            continue
        rows = df[(df.device == df.device.min()) & (df.name != MODULE_END)].copy()  # device 0's HLO ops
        # A collective the profile ran on its XLA Ops line (a synchronous one, jit__psum's all-reduce) goes
        # there too: on XLA Collectives, XProf's op profile would book its time as idle.
        sync = (rows.stream == "Async XLA Ops") & ~rows.category.str.startswith("copy") & rows.name.isin(
            on_ops.get(module, ()))
        rows.loc[sync, "stream"] = "XLA Ops"
        dur_ns = int(to_ns(simulated_s))
        rows["start_s"] += at_ns * 1e-9
        rows["end_s"] += at_ns * 1e-9
        rows["run"] = len(runs)
        runs.append((module, pids.get(module, program_id(module)), at_ns, dur_ns))
        frames.append(rows)
        at_ns += dur_ns
    space = XSpace(hostnames=[host])
    if frames:
        device_plane(space, 1, 0, pd.concat(frames, ignore_index=True), chip=result.topology.chip, module="",
                     pid=0, step_ns=at_ns, runs=runs,
                     op_stats=lambda run, name: stats.get((runs[run][1], name)))
    out = space.SerializeToString(deterministic=True)
    meta = metadata_plane(data) if data else None
    return out + _field(1, meta) if meta is not None else out  # a repeated field: appended, it is one more plane


def check_out(out_dir: str | Path, profile: Profile) -> None:
    """Refuse an ``--out`` folder holding the profile: it is replaced whole. :class:`tpusim.runfolder.RunFolder`
    already refuses a logdir whose ``plugins/`` no manifest lists; this also covers a replay folder whose
    manifest lists the ``measured.xplane.pb`` copy being replayed again."""
    from tpusim.errors import TpusimError

    out = Path(out_dir).resolve()
    if out in Path(profile.source).resolve().parents:
        raise TpusimError(f"holds the profile being replayed ({profile.source}); the folder is replaced whole, so "
                          "choose a new or empty one", source=f"--out {out_dir}")


def write_replay(out: Path, result, profile: Profile, summary_json: str) -> Path:
    """Write ``out/replay.json`` (``summary_json``) and ``out/plugins/profile/replay/`` (see the module
    docstring); returns the XProf run's folder. ``out`` is a new folder (:class:`tpusim.runfolder.RunFolder`)."""
    from tpusim.analysis.timeline import write_atomic

    data = Path(profile.source).read_bytes() if profile.format == "xplane" else None
    d = profile_dir(out, RUN)
    d.mkdir(parents=True, exist_ok=True)
    clear_xprof_cache(d)
    write_atomic(d / "simulated.xplane.pb", replay_xspace_bytes(result, profile, data))
    if data is not None:
        write_atomic(d / "measured.xplane.pb", data)
    write_atomic(Path(out) / "replay.json", summary_json.encode())
    return d
