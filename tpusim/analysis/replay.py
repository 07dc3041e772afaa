"""Replay a real profile: simulate what it ran, op by op, on the topology it ran on, and compare.

For each compiled module the profile ran (one run of it on device 0, in the order the ops ran), the
ops become a Program using the profile's own numbers: compute ops keep XLA's ``model_flops`` and
``bytes_accessed``; collectives are read from their HLO text (kind, shapes, replica groups);
``copy-start``/``copy-done`` to and from host memory (``S(5)``) become host copies over PCIe and the
``-done`` ops that wait for them. The simulated time of each op is compared with the median of its
measured occurrences. Nothing is fitted on the profile.

Device ids to chips: when a collective names more devices than the profile holds (a profile is one
host's), ids are taken to number the hosts' chip blocks one after the other (JAX numbers devices
process by process), each block a 2x2 tray of the slice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tpusim.sim.chips import get_chip
from tpusim.sim.engine import simulate
from tpusim.errors import TpusimError
from tpusim.compiler.hlo.importer import group_axes, host_copy_kind
from tpusim.compiler.hlo.parse import DTYPE_BYTES, array_bytes, array_shapes
from tpusim.limits import MAX_BYTES
from tpusim.sim.program import COLLECTIVE, COMPUTE, HOST, Memory, Op, Program
from tpusim.analysis.profiles import Profile, op_stats, replica_groups
from tpusim.analysis.timeline import timeline_frame
from tpusim.sim.topology import Topology, make_topology

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
MODULE_END = "module-end"  # the op a module's last waits hang on: tpusim's, not an HLO op of the profile
MIN_MEASURED_S = 1e-6  # ops shorter than this are bookkeeping (copy-starts, done ops of finished copies)


@dataclass
class Replay:
    topology: Topology
    ops: pd.DataFrame  # module, name, category, measured_s, simulated_s, rel_error
    module_times: pd.DataFrame  # module, measured_s, simulated_s
    # module -> its simulated run's timeline (tpusim.analysis.timeline.timeline_frame), what replay --out writes
    timelines: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def median_abs_rel_error(self) -> float:
        judged = self.ops[self.ops.measured_s >= MIN_MEASURED_S]
        return float(judged.rel_error.abs().median()) if len(judged) else float("nan")


def chip_of(profile: Profile) -> str:
    kinds = {d.kind for d in profile.devices if d.kind}
    for kind in sorted(kinds):
        try:
            return get_chip(kind).name  # XLA's device_type_string ("TPU v6 Lite") is a chip alias
        except TpusimError:
            continue
    raise TpusimError(f"cannot tell the chip from the device kind {sorted(kinds) or 'none'}; give --topology",
                      source=profile.source)


def profile_topology(profile: Profile, n_devices: int) -> Topology:
    """The smallest slice of the profile's chip holding ``n_devices`` chips (2D: 2 x n/2, square when it can)."""
    chip = get_chip(chip_of(profile))
    if chip.torus_rank == 2:
        a = 2 ** int(math.log2(n_devices) // 2) if n_devices > 1 else 1
        shape = (a, n_devices // a)
    else:
        shape = (min(2, n_devices), max(1, min(2, n_devices // 2)), max(1, n_devices // 4))
    return make_topology(chip, shape, source=profile.source)


def _device_to_chip(topo: Topology, local: int):
    """JAX device id -> chip id when the ids number ``local``-chip 2x2 trays one after the other."""
    if local >= topo.num_chips or local != 4 or topo.chip.torus_rank != 2:
        return lambda d: d
    bx, by = 2, 2
    blocks_y = topo.shape[1] // by

    def chip(d: int) -> int:
        block, within = divmod(d, local)
        x = (block // blocks_y) * bx + within // by
        y = (block % blocks_y) * by + within % by
        return x * topo.shape[1] + y

    return chip


def _collective_kind(long_name: str) -> str | None:
    m = re.search(r"calls=%([a-z\-]+?)(?:[.\d]*)(?:,|$|\s)", long_name)
    opcode = re.search(r"\}\s+([a-z\-]+)\(", long_name) or re.search(r"=\s*\S+\s+([a-z\-]+)\(", long_name)
    for candidate in ((m.group(1) if m else ""), (opcode.group(1) if opcode else "")):
        c = candidate.replace("all-reduce-scatter", "reduce-scatter").removesuffix("-start")
        if c in KINDS:
            return c
    return None


def _module_program(profile: Profile, module: str, topo: Topology, to_chip) -> Program:
    t = profile.timeline
    runs = t[(t.device == 0) & (t.stream == "XLA Modules") & (t.module == module)].sort_values("host_start_s")
    ops_df = t[(t.device == 0) & (t.stream == "XLA Ops") & (t.module == module)]
    if len(runs):
        first = runs.iloc[0]
        ops_df = ops_df[(ops_df.host_start_s >= first.host_start_s) & (ops_df.host_start_s <= first.host_end_s)]
    ops_df = ops_df.sort_values("start_s")
    ops: list[Op] = []
    pending: list[int] = []
    copies: dict[str, int] = {}
    last = -1
    for r in ops_df.itertuples(index=False):
        text = r.long_name or ""
        kind = _collective_kind(text)
        copy_kind = (host_copy_kind(text.split("=", 1)[-1].split(" copy-start(")[0])
                     if r.name.startswith("copy-start") else None)
        if copy_kind is not None:
            i = len(ops)
            ops.append(Op(index=i, name=r.name, stream=HOST, category=copy_kind,
                          bytes=float(r.bytes), deps=(last,) if last >= 0 else ()))
            copies[r.name] = i
            continue
        if r.name.startswith("copy-done"):
            src = re.search(r"%(copy-start[.\d]*)\)?\s*$", text)
            dep = copies.get(src.group(1)) if src else None
            i = len(ops)
            ops.append(Op(index=i, name=r.name, stream=COMPUTE, category="copy-done",
                          deps=tuple(pending) + ((dep,) if dep is not None else ())))
            pending.clear()
            last = i
            continue
        if kind is not None:
            result = array_shapes(text.split("=", 1)[1].split("(")[0]) if "=" in text else []
            operand = array_shapes(text.split("(", 1)[1]) if "(" in text else []
            for dtype, dims in result + operand:
                if any(d < 0 for d in dims) or math.prod(dims) * DTYPE_BYTES[dtype] > MAX_BYTES:
                    raise TpusimError(f"{r.name}: the array {dtype}{list(dims)} is negative or more than 1 PB, "
                                      "tpusim's limit", source=profile.source)
            v = sum(array_bytes(*a) for a in (result if kind == "all-gather" else operand[:1] or result))
            if not v > 0:
                continue  # moves nothing (an empty array): nothing to simulate
            groups = replica_groups(text) or [list(range(topo.num_chips))]
            axes = group_axes(topo, [to_chip(d) for d in groups[0]], topo.num_chips)
            i = len(ops)
            ops.append(Op(index=i, name=r.name, stream=COLLECTIVE, category=kind, bytes=float(v), mesh_axes=("hlo",),
                          axes=axes, deps=(last,) if last >= 0 else ()))
            pending.append(i)
            continue
        i = len(ops)
        category = "matmul" if "convolution" in (r.hlo_category or "") else "elementwise"
        ops.append(Op(index=i, name=r.name, stream=COMPUTE, category=category, flops=float(r.flops),
                      hbm_bytes=float(r.bytes), deps=tuple(pending)))
        pending.clear()
        last = i
    if pending:
        ops.append(Op(index=len(ops), name=MODULE_END, stream=COMPUTE, category="elementwise", deps=tuple(pending)))
    zero = Memory(params=0, grads=0, optimizer=0, activations=0, working=0, gathered_weights=0)
    return Program(name=module, ops=tuple(ops), devices=topo.num_chips, model_flops_per_step=1.0,
                   tokens_per_step=0.0, memory=zero, hbm_capacity_bytes=topo.chip.hbm_bytes)


def _check_topology(profile: Profile, topo: Topology, n_devices: int) -> None:
    """A replay compares with the profile's measured times, so it runs on the profile's chip and on at
    least as many chips as the profile's collectives name: refuse any other --topology."""
    try:
        chip = chip_of(profile)
    except TpusimError:
        chip = None  # the profile does not say (a CPU capture, a trace JSON): the user's chip stands
    if chip is not None and chip != topo.chip.name:
        raise TpusimError(f"the profile ran on {chip}, not {topo.chip.name}: a replay is judged against the measured "
                          f"times, so it runs on the profile's chip (give --topology {chip}:SHAPE, or leave it out)",
                          source="--topology")
    if n_devices > topo.num_chips * topo.chip.cores_per_chip:
        raise TpusimError(f"the profile's collectives span {n_devices} devices but {topo.name} has "
                          f"{topo.num_chips} chip{'s' if topo.num_chips > 1 else ''}", source="--topology")


def replay(profile: Profile, *, topology: Topology | None = None, mode: str = "calibrated") -> Replay:
    """Simulate every module of ``profile`` and compare op by op (median of the measured occurrences)."""
    try:
        return _replay(profile, topology=topology, mode=mode)
    except TpusimError as e:
        raise e.within(profile.source) from None


def _replay(profile: Profile, *, topology: Topology | None, mode: str) -> Replay:
    stats = op_stats(profile)
    groups = [g for text in stats.long_name.dropna() for g in (replica_groups(text) or [])]
    n = max([len(profile.devices)] + [max(g) + 1 for g in groups if g])
    if topology is not None:
        _check_topology(profile, topology, n)
    topo = topology or profile_topology(profile, n)
    to_chip = _device_to_chip(topo, len(profile.devices)) if n > len(profile.devices) else (lambda d: d)
    rows, module_rows, timelines = [], [], {}
    for module in sorted(stats.module.dropna().unique()):
        prog = _module_program(profile, module, topo, to_chip)
        result = simulate(prog, topo, mode=mode)
        df = timelines[module] = timeline_frame(result)
        sim_rows = df[df.stream.isin(["XLA Ops", "Async XLA Ops"])]
        sim = {}
        for r in sim_rows.itertuples(index=False):
            if r.stream == "XLA Ops" or prog.ops[r.op_index].stream == COLLECTIVE:
                sim[r.name] = r.end_s - r.start_s
        for r in stats[stats.module == module].itertuples(index=False):
            if r.name in sim:
                rows.append({"module": module, "name": r.name, "category": r.category, "count": int(r.count),
                             "measured_s": float(r.median_s), "simulated_s": sim[r.name]})
        t = profile.timeline
        runs = t[(t.device == 0) & (t.stream == "XLA Modules") & (t.module == module)]
        module_rows.append({"module": module, "runs": len(runs),
                            "measured_s": float(np.median(runs.end_s - runs.start_s)) if len(runs) else float("nan"),
                            "simulated_s": result.step_time_s})
    ops = pd.DataFrame(rows)
    if len(ops):
        ops["rel_error"] = np.where(ops.measured_s > 0, ops.simulated_s / ops.measured_s.where(ops.measured_s > 0) - 1,
                                    np.nan)
    return Replay(topology=topo, ops=ops, module_times=pd.DataFrame(module_rows), timelines=timelines)


def replay_pod_viewer(path, *, mode: str = "calibrated") -> pd.DataFrame:
    """The collectives of a TensorBoard pod-viewer output (``allReduceOpDb``), each simulated alone on the
    slice the run used, against its measured duration (median over the steps).

    V (the book's: the larger of operand and result) is read from the op's HLO text where it lists the
    shapes, else from ``dataSize``. For the all-gathers and reduce-scatters ``dataSize`` is operand +
    result (8/9 of it is V over 8 devices, which the HLO agrees with); for the one tuple all-reduce it
    is its result alone (its 141 result tensors add up to 18.0 MB of its 18.5 MB ``dataSize``; the
    rest is tile padding), so V is the result, not half the ``dataSize`` (that reading made the
    all-reduce 2.2x slower than modelled; it was found while looking at this capture). The groups
    span every core; a v2 chip has two cores, each a device with its own HBM, so a chip's links carry
    both cores' shards: V per chip is cores x V (the exchange between a chip's two cores is on the
    chip and not modelled).
    """
    from tpusim.sim.collectives import collective_time, link_params
    from tpusim.analysis.profiles.podviewer import load_pod_viewer, pod_viewer_slice, read_pod_viewer
    from tpusim.sim.topology import parse_topology

    entries = read_pod_viewer(path)
    tpu_type, x, y = pod_viewer_slice(load_pod_viewer(path), source=str(path))
    try:
        chip = get_chip(tpu_type).name
    except TpusimError:
        chip = "v2"  # the pod viewer's own demo is a v2
    topo = parse_topology(f"{chip}:{x}x{y}", source=f"{path}: runEnvironment.topology")
    lp = link_params(topo, mode, in_step=True)  # timed inside the step
    rows = []
    for name, g in entries.groupby("name", sort=False):
        kind = g.kind.iloc[0]
        data = float(g.data_bytes.iloc[0])
        v, plan = pod_viewer_plan(kind, data, topo, description=g.description.iloc[0])
        rows.append({"name": name, "kind": kind, "data_bytes": data, "v_bytes": v,
                     "measured_s": float(g.duration_s.median()),
                     "simulated_s": collective_time(plan, lp)})
    out = pd.DataFrame(rows)
    measured = out.measured_s.where(out.measured_s > 0)  # a 0 us measurement has no relative error
    out["rel_error"] = out.simulated_s / measured - 1
    return out


def pod_viewer_plan(kind: str, data_bytes: float, topo: Topology, *, description: str = ""):
    """(V per device, plan) of a pod-viewer collective over every axis of ``topo`` (see
    :func:`replay_pod_viewer`): V is the larger side of the HLO instruction in ``description``, else
    8/9 of ``dataSize`` over 8 devices (half of it for an all-reduce); each chip's links carry all its
    cores' shards."""
    from tpusim.sim.collectives import lower

    devices = topo.num_chips * topo.chip.cores_per_chip
    v = data_bytes / 2 if kind == "all-reduce" else data_bytes * devices / (devices + 1)
    opcode = re.search(r"\s([a-z][\w\-]*)\(", description.partition("=")[2])
    if opcode:  # result shapes before the opcode, operand shapes inside its parentheses
        text = description.partition("=")[2]
        try:
            result = sum(array_bytes(*a) for a in array_shapes(text[:opcode.start()]))
            operand = sum(array_bytes(*a) for a in array_shapes(text[opcode.end():].split("), ")[0]))
        except (ValueError, KeyError):  # the description is a hint from the file: unreadable, use dataSize
            result = operand = 0
        if 0 < max(result, operand) <= MAX_BYTES:
            v = max(result, operand)
    return v, lower(kind, v * topo.chip.cores_per_chip, topo, topo.axis_names)
