"""XLA's optimized HLO text -> a per-device Program, so a real compiled program can be simulated.

What becomes what (the entry computation is walked in XLA's schedule order, ``is_scheduled=true``):

* fusions, convolutions, dots, copies, reduces and other array ops: compute ops. HBM bytes are what
  the op moves to and from HBM (:mod:`tpusim.compiler.hlo.hbm`: VMEM buffers are free, sliced operands cost
  the slices, in-place updates the update); async HBM <-> VMEM DMAs (``copy-start``/``slice-start``)
  add their bytes to the ops in flight. FLOPs are 2 x output elements x contraction for each dot /
  convolution in the fusion, plus one per output element of each elementwise instruction. MXU
  shape: (output elements / N, K, N). Category: matmul, copy (layout and data movement) or
  elementwise; layer and phase from the JAX op name.
* Pallas splash-attention kernels (``tpu_custom_call``): attention ops priced as tpusim's compiler
  prices the same kernel (:mod:`tpusim.compiler.hlo.splash`); other Pallas kernels are copies, by
  their bytes alone (noted).
* collectives (plain, ``-start``/``-done``, async-wrapped, XLA TPU's async collective fusions and
  all-reduce-scatter fusions; grouped by :mod:`tpusim.compiler.hlo.parse`): collective ops issued where the
  start is and waited for where the done is. ``V`` follows the book: all-gather its result,
  reduce-scatter / all-reduce / all-to-all / permute their operand. Replica groups are resolved to
  the topology's axes from the first group's device coordinates.
* ``copy-start``/``copy-done`` into or out of host memory (memory space ``S(5)``): host copies over
  PCIe. Each ``-done`` becomes a zero-cost op that lasts while it waits, as in XLA's profiles. So do
  ``dynamic-update-slice-start`` into and ``dynamic-slice-start`` out of a host buffer: how XLA TPU
  writes a scanned layer's offloaded tensor into its stack in host memory and reads it back (the
  slice's bytes).
* ``while`` loops: their body, trip-count times (1 when the count cannot be read; noted); a module
  that unrolls to more than ``tpusim.limits.MAX_PROGRAM_OPS`` ops is refused (:mod:`.checks`).
* bookkeeping (parameters, constants, tuples, bitcasts, ...) costs nothing; an opcode tpusim does
  not know is costed by its bytes and named in a note.

Before any of this, :mod:`tpusim.compiler.hlo.checks` refuses what cannot be simulated honestly (a file cut
short, a device count other than the slice's, replica groups naming devices it lacks, absurd shapes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from tpusim.sim.collectives.lowering import Axis, Span
from tpusim.errors import TpusimError
from tpusim.compiler.hlo import checks, splash
from tpusim.compiler.hlo.parse import (DTYPE_BYTES, Instr, _callees, _split_top, array_bytes, array_shapes,
                                       expand_replica_groups, parse_module)
from tpusim.compiler.hlo.analysis import _Analysis
from tpusim.compiler.hlo.collectives import extract_collectives
from tpusim.compiler.hlo.hbm import hbm_bytes as _hbm_bytes
from tpusim.limits import MAX_BYTES, MAX_CONV_POSITIONS
from tpusim.sim.costmodel import ComputeParams, compute_params, unit_time
from tpusim.sim.program import COLLECTIVE, COMPUTE, HOST, Memory, Op, Program
from tpusim.sim.topology import Topology

FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
        "replica-id", "opt-barrier", "add-dependency", "reshape", "iota"}
ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "exponential", "log", "tanh",
               "rsqrt", "sqrt", "negate", "abs", "compare", "select", "power", "logistic", "and", "or", "xor",
               "convert", "clamp", "exponential-minus-one", "log-plus-one", "sign", "floor", "ceil", "cosine",
               "sine", "reduce"}
HOST_MEMORY = "S(5)"
COPY_OPCODES = {"copy", "transpose", "copy-start", "slice-start", "slice", "dynamic-slice", "dynamic-update-slice",
                "concatenate", "pad", "broadcast", "reverse", "gather", "scatter", "custom-call"}
_LAYER_RE = re.compile(r"layer_(\d+)")


def layer_and_phase(ins: Instr) -> tuple[int, str]:
    """Decoder layer (-1 outside the layers) and phase of an instruction, from its JAX op name
    (``jvp(layer_3)`` forward, ``transpose(jvp(layer_3))`` backward)."""
    m = re.search(r'op_name="([^"]*)"', ins.attrs.get("metadata", ""))
    name = m.group(1) if m else ""
    lm = _LAYER_RE.search(name)
    phase = "backward" if "transpose(" in name else "forward"
    return (int(lm.group(1)) if lm else -1), phase


def read_hlo(path: str | Path) -> str:
    """HLO text from a ``.hlo.txt`` (or ``.gz``) file; a TpusimError names the file if it is not HLO
    (or not a readable regular file, or larger than tpusim's input limit; see :mod:`tpusim.safeio`)."""
    from tpusim.safeio import read_text

    text = read_text(path, what="HLO text")
    if not re.search(r"^HloModule\s", text, re.M):
        raise TpusimError("not HLO text (no 'HloModule' header)", source=str(path))
    if "ENTRY" not in text:
        raise TpusimError("HLO without an ENTRY computation: the file is cut short, or not a whole module",
                          source=str(path))
    return text


def _elements(dims: tuple[int, ...]) -> int:
    return math.prod(dims) if dims else 1


def _window(attr: str, key: str, n: int, default: int) -> list[int]:
    m = re.search(rf"\b{key}=([\dx_]+)", attr or "")
    if not m:
        return [default] * n
    return [int(x) for x in m.group(1).split("x")]


def _valid_taps(in_size: int, out_size: int, k: int, stride: int, pad_lo: int, dilate: int) -> int:
    """(output position, kernel tap) pairs that read a real input element, not padding or a dilation hole.

    Output position ``o`` reads dilated input positions ``x = o * stride - pad_lo + t`` for taps
    ``t < k``; the real ones are the multiples of ``dilate`` in ``[0, extent)``. Counted per position
    in closed form (multiples of d in [lo, hi) = ceil(hi/d) - ceil(lo/d)), vectorised over positions,
    so a huge window costs nothing and a long output at most :data:`MAX_CONV_POSITIONS` steps.
    """
    import numpy as np

    if out_size > MAX_CONV_POSITIONS or in_size > MAX_CONV_POSITIONS * max(1, stride):
        raise TpusimError(f"a convolution with {max(out_size, in_size):,} positions along one spatial dimension; "
                          f"tpusim counts its taps for at most {MAX_CONV_POSITIONS:,}")
    if in_size < 1 or out_size < 1 or k < 1 or stride < 1 or dilate < 1:
        return 0
    extent = (in_size - 1) * dilate + 1
    o = np.arange(out_size, dtype=np.int64)
    start = o * stride - pad_lo
    lo = np.clip(start, 0, extent)
    hi = np.clip(start + k, 0, extent)
    return int(np.maximum(0, -(-hi // dilate) - -(-lo // dilate)).sum())


def _matmul_flops(ins: Instr, an: _Analysis) -> tuple[float, tuple[int, int, int] | None]:
    """FLOPs and (M, K, N) of a dot or convolution instruction.

    Dots: 2 x output elements x contracted size. Convolutions (XLA TPU writes most einsums as
    convolutions, some with padded or dilated windows): 2 x output batch/feature elements x input
    features x the (output, tap) pairs of each spatial dimension that touch real input.
    """
    out = array_shapes(ins.result_type)
    ops = an.operand_arrays(ins)
    if not out or len(ops) < 2:
        return 0.0, None
    out_dims = out[0][1]
    elems = _elements(out_dims)
    n = out_dims[-1] if out_dims else 1
    if ins.opcode == "dot":
        lhs = ops[0][1]
        dims = [int(d) for d in re.findall(r"\d+", ins.attrs.get("lhs_contracting_dims", ""))]
        k = math.prod(lhs[d] for d in dims if d < len(lhs))
        return 2.0 * elems * k, (max(1, elems // max(n, 1)), int(k), int(n))
    labels = ins.attrs.get("dim_labels", "")
    try:
        lhs_l, rest = labels.split("_", 1)
        rhs_l, out_l = rest.split("->")
    except ValueError:
        return 2.0 * elems, None
    lhs, rhs = ops[0][1], ops[1][1]
    if not (len(lhs_l) == len(lhs) and len(rhs_l) == len(rhs) and len(out_l) == len(out_dims)):
        return 2.0 * elems, None
    spatial = sorted(c for c in out_l if c.isdigit())
    window = ins.attrs.get("window", "")
    ks = _window(window, "size", len(spatial), 1)
    strides = _window(window, "stride", len(spatial), 1)
    dil = _window(window, "lhs_dilate", len(spatial), 1)
    pads = re.search(r"\bpad=([\d_x-]+)", window)
    pad_lo = [int(p.split("_")[0]) for p in pads.group(1).split("x")] if pads else [0] * len(spatial)
    taps = 1
    for j, c in enumerate(spatial):
        taps *= _valid_taps(lhs[lhs_l.index(c)], out_dims[out_l.index(c)], ks[j], strides[j], pad_lo[j], dil[j])
    non_spatial = math.prod(d for c, d in zip(out_l, out_dims) if not c.isdigit())
    k = rhs[rhs_l.index("i")]
    flops = 2.0 * non_spatial * k * taps
    n = out_dims[out_l.index("f")] if "f" in out_l else n  # the output feature dim is the MXU's N
    m = max(1, elems // max(n, 1))
    return flops, (m, max(1, round(flops / (2.0 * m * n))), int(n))


def _compute_cost(ins: Instr, an: _Analysis, kernels: dict | None = None
                  ) -> tuple[float, float, tuple[int, int, int] | None, str, float]:
    """(FLOPs, HBM bytes, MXU shape, category, VPU FLOPs) of one scheduled instruction. ``kernels``: where
    each Pallas kernel's splash pricing (None: not one tpusim knows) is kept, for the importer's notes."""
    nbytes = _hbm_bytes(ins, an)
    kernel = splash.kernel_cost(ins, an) if ins.opcode == "custom-call" else None
    if kernels is not None and splash.is_pallas(ins):
        kernels[ins.name] = (ins, kernel)
    if kernel is not None:
        return kernel.flops, float(nbytes), kernel.mxu_shape, "attention", kernel.vpu_flops
    body = [ins]
    if ins.opcode == "fusion":
        body = []
        for c in _callees(ins):
            body += an.mod.computations.get(c, [])
    flops, mxu, category = 0.0, None, "elementwise"
    if ins.opcode in COPY_OPCODES or (ins.opcode == "fusion" and body and all(
            sub.opcode in COPY_OPCODES or sub.opcode in FREE for sub in body)):
        category = "copy"  # layout changes, transposes, slices, async DMAs: bytes, no arithmetic
    for sub in body:
        if sub.opcode in ("dot", "convolution"):
            f, shape = _matmul_flops(sub, an)
            flops += f
            if mxu is None or (shape and math.prod(shape) > math.prod(mxu)):
                mxu = shape
            category = "matmul"
        elif sub.opcode in ELEMENTWISE:
            flops += sum(_elements(d) for _, d in array_shapes(sub.result_type))
    return flops, float(nbytes), mxu, category, 0.0


def group_axes(topo: Topology, devices: list[int], num_devices: int) -> tuple[Axis, ...]:
    """The torus axes (or spans of them) that a replica group's devices differ along."""
    per_chip = max(1, num_devices // topo.num_chips)
    chips = sorted({d // per_chip for d in devices})
    if len(chips) <= 1:
        return ()
    coords = [topo.coords(c) for c in chips]
    axes: list[Axis] = []
    if len({s for s, _ in coords}) > 1:
        axes.append("dcn")
    for i, a in enumerate(topo.axis_names):
        values = sorted({c[i] for _, c in coords})
        if len(values) <= 1:
            continue
        full = topo.shape[i]
        n = len(values)
        stride = values[1] - values[0]
        regular = all(b - a_ == stride for a_, b in zip(values, values[1:])) and full % (n * stride) == 0
        if n == full:
            axes.append(a)
        else:  # a part of the axis; an irregular set is taken as a contiguous segment of the same size
            axes.append(Span(a, n, stride if regular else 1))
    return tuple(axes)


def xla_chip(topo: Topology, num_devices: int):
    """XLA device id -> tpusim chip id. libtpu numbers a slice's devices with the first torus axis
    fastest (its ahead-of-time topologies: device 1 at (1, 0, 0); on v5p 2x2x4 device 4 at (0, 0, 1);
    on v6e 2x4 device 2 at (0, 1)), slice after slice; tpusim's chip ids are row-major, the last axis
    fastest. Devices beyond one per chip (cores) share their chip."""
    per_chip = max(1, num_devices // topo.num_chips)

    def chip(device: int) -> int:
        s, local = divmod(device // per_chip, topo.chips_per_slice)
        coords = []
        for n in topo.shape:
            local, c = divmod(local, n)
            coords.append(c)
        return topo.chip_id(s, tuple(coords))

    return chip


def replica_groups(rg: str | None, num_devices: int) -> list[list[int]]:
    """Device ids of each replica group (see :func:`tpusim.compiler.hlo.parse.expand_replica_groups`); every
    device when the attribute is empty or in a form we do not expand."""
    return expand_replica_groups(rg, num_devices) or [list(range(num_devices))]


def host_copy_kind(result_type: str) -> str | None:
    """``copy-to-host`` / ``copy-from-host`` for a ``copy-start`` whose result type (destination,
    source, context) puts one side in host memory (memory space ``S(5)``); None for other copies."""
    parts = _split_top(result_type.strip()[1:-1]) if result_type.strip().startswith("(") else [result_type]
    if HOST_MEMORY in parts[0]:
        return "copy-to-host"
    if len(parts) > 1 and HOST_MEMORY in parts[1]:
        return "copy-from-host"
    return None


# XLA TPU's async slices of a host-memory buffer (the offloaded tensors of scanned layers).
HOST_SLICES = {"dynamic-update-slice-start": "copy-to-host", "dynamic-slice-start": "copy-from-host"}


def host_slice_copy(ins: Instr) -> tuple[str, float] | None:
    """``(copy-to-host / copy-from-host, bytes moved)`` for an async ``dynamic-update-slice-start`` whose
    destination, or ``dynamic-slice-start`` whose source, is in host memory (``S(5)``); None otherwise.
    Its result type is ``((operands...), result, context)``; the bytes are the update's or the slice's."""
    rt = ins.result_type.strip()
    if ins.opcode not in HOST_SLICES or not rt.startswith("(") or HOST_MEMORY not in rt:
        return None
    parts = _split_top(rt[1:-1])
    operands = _split_top(parts[0].strip()[1:-1]) if parts[0].strip().startswith("(") else []
    if len(parts) < 2 or len(operands) < 2:
        return None
    if ins.opcode == "dynamic-update-slice-start":
        moved = operands[1] if HOST_MEMORY in parts[1] and HOST_MEMORY not in operands[1] else None
    else:
        moved = parts[1] if HOST_MEMORY in operands[0] and HOST_MEMORY not in parts[1] else None
    arrays = array_shapes(moved) if moved else []
    return (HOST_SLICES[ins.opcode], float(array_bytes(*arrays[0]))) if arrays else None


def import_hlo(text: str, topo: Topology, *, name: str | None = None, source: str = "HLO") -> Program:
    """The Program of one HLO module, for ``topo`` (its device count should match the module's)."""
    try:
        mod = parse_module(text)
        if not mod.entry:
            raise TpusimError("HLO has no ENTRY computation", source=source)
        checks.check_shapes(mod, source=source)
        checks.check_calls(mod, source=source)
        summary = extract_collectives(text)
        an = _Analysis(mod)
        checks.unrolled_ops(mod, an, FREE, source=source)
        program = _import(mod, an, summary, topo, name=name, source=source)
    except TpusimError as e:
        raise e.within(source) from None
    except (ValueError, IndexError, KeyError) as e:
        raise TpusimError(f"HLO does not parse: {' '.join(str(e).split())[:200]}", source=source) from None
    if not any(o.flops > 0 or o.hbm_bytes > 0 or (o.bytes > 0 and (o.axes or o.stream == HOST))
               for o in program.ops):
        raise TpusimError(f"nothing to simulate on {topo.name}: the entry computation has no op that computes or "
                          "moves data (a header alone, or collectives over one device)", source=source)
    return program


def _import(mod, an: _Analysis, summary: dict, topo: Topology, *, name: str | None, source: str) -> Program:
    n_dev = checks.module_devices(mod, topo.num_chips, topo.chip.cores_per_chip, topo.name, source=source)
    to_chip = xla_chip(topo, n_dev)
    unknown = checks.unknown_opcodes(mod)
    # Which scheduled instruction starts / ends each logical collective.
    starts: dict[str, dict] = {}
    ends: dict[str, dict] = {}
    for rec in summary["collectives"]:
        members = rec.get("members") or [f"sync:{rec['name']}@{rec['computation']}"]
        level = []
        for m in members:
            role, _, rest = m.partition(":")
            nm, _, comp = rest.partition("@")
            chain = an.caller_chain(comp)
            wrapper = chain[0] if chain and chain[0].opcode in ("fusion", "async-start") else None
            level.append((role, wrapper.name if wrapper is not None else nm))
        first = next((n for r, n in level if r in ("fusion_start", "start", "async_wrapped")), level[0][1])
        starts[first] = rec
        done = rec.get("done") or next((n for r, n in level if r == "fusion_done"), None)
        if done is None and rec["implementation"] == "async_start_done":
            done = next((i.name for i in mod.by_name.values() if i.opcode in ("async-done",)
                         and i.operands and i.operands[0].split()[-1].lstrip("%") == first), None)
        ends[done or first] = rec
    ops: list[Op] = []
    pending: list[int] = []
    coll_index: dict[int, int] = {}
    notes: list[str] = []
    last_compute = [-1]

    def add(op_kwargs) -> int:
        i = len(ops)
        ops.append(Op(index=i, **op_kwargs))
        return i

    def walk(computation: str, prefix: str = "") -> None:
        for ins in mod.computations.get(computation, []):
            if ins.name in starts:
                rec = starts[ins.name]
                v = rec["result_bytes"] if rec["kind"] == "all-gather" else rec["operand_bytes"]
                if not v > 0:
                    continue  # of empty arrays or tokens: moves nothing (its -done, if any, is skipped too)
                groups = replica_groups(rec.get("replica_groups"), n_dev)
                checks.check_devices(rec["name"], groups, n_dev, source=source)
                if rec["kind"] == "collective-permute":
                    checks.check_devices(rec["name"], checks.permute_pairs(rec.get("source_target_pairs")), n_dev,
                                         source=source, what="source_target_pairs")
                if v > MAX_BYTES:
                    raise TpusimError(f"%{rec['name']} moves {v:.3g} bytes, more than {MAX_BYTES:.0e} (1 PB), "
                                      "tpusim's limit for one collective", source=source)
                axes = (group_axes(topo, [to_chip(d) for d in groups[0]], topo.num_chips)
                        if rec["kind"] != "collective-permute" else
                        _permute_axes(topo, rec.get("source_target_pairs"), to_chip))
                kind = rec["kind"] if rec["kind"] in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                                                      "collective-permute") else "all-reduce"
                i = add(dict(name=prefix + rec["name"], stream=COLLECTIVE, category=kind, bytes=float(v),
                             mesh_axes=("hlo",), axes=axes,
                             deps=(last_compute[0],) if last_compute[0] >= 0 else ()))
                coll_index[id(rec)] = i
                if ins.name in ends and ends[ins.name] is rec:
                    pending.append(i)
                continue
            if ins.name in ends:
                rec = ends[ins.name]
                i = coll_index.get(id(rec))
                if i is not None:  # a zero-cost op that lasts while it waits, like XLA's "-done"
                    i = add(dict(name=prefix + ins.name, stream=COMPUTE, category=f"{rec['kind']}-done",
                                 deps=tuple(pending) + (i,)))
                    pending.clear()
                    last_compute[0] = i
                continue
            if ins.opcode == "while":
                trips = an.trip_count(ins)
                if trips is None:
                    notes.append(f"{ins.name}: trip count unknown, body simulated once")
                for t in range(trips or 1):
                    walk(ins.attrs.get("body", "").lstrip("%"), prefix=f"{prefix}{ins.name}[{t}]/")
                continue
            if ins.opcode == "copy-start" or ins.opcode in HOST_SLICES:
                kind, nb = None, 0.0
                if ins.opcode == "copy-start":
                    kind = host_copy_kind(ins.result_type)
                    arrays = array_shapes(ins.result_type)
                    nb = array_bytes(*arrays[0]) if arrays else 0
                elif (found := host_slice_copy(ins)) is not None:
                    kind, nb = found
                if kind is not None:
                    i = add(dict(name=prefix + ins.name, stream=HOST, category=kind, bytes=float(nb),
                                 deps=(last_compute[0],) if last_compute[0] >= 0 else ()))
                    coll_index[id(ins)] = i
                    ends_copy[ins.name] = i
                    continue
            if ins.opcode in ("copy-start", "slice-start"):  # an async DMA inside the chip (HBM <-> VMEM)
                # XLA's cross-program prefetch of a parameter, refetched at the program's end for the next
                # run: in a step run in a loop the buffer is already in VMEM; the end's copy is priced
                nb = 0.0 if ins.name in prefetched_again else _hbm_bytes(ins, an)
                dmas[ins.name] = (len(ops), nb)
                continue
            if ins.opcode in ("copy-done", "slice-done") and _first_operand(ins) in dmas:
                start, nb = dmas.pop(_first_operand(ins))
                _spread_dma(ops, start, nb, carry, cp, unit)
                continue
            if ins.opcode in ("copy-done", "dynamic-update-slice-done", "dynamic-slice-done"):
                src = _first_operand(ins)
                if src in ends_copy:
                    i = add(dict(name=prefix + ins.name, stream=COMPUTE, category="copy-done",
                                 deps=tuple(pending) + (ends_copy[src],)))
                    pending.clear()
                    last_compute[0] = i
                    continue
            if ins.opcode in FREE or ins.opcode.endswith("-done"):
                continue
            if ins.name not in costs:  # once per instruction, however many times a loop runs it
                costs[ins.name] = _compute_cost(ins, an, kernels)
            flops, nbytes, mxu, category, vpu = costs[ins.name]
            nbytes += carry.pop() if carry else 0.0
            layer, phase = layer_and_phase(ins)
            i = add(dict(name=prefix + ins.name, stream=COMPUTE, category=category, flops=flops, hbm_bytes=nbytes,
                         mxu_shape=mxu, vpu_flops=vpu, deps=tuple(pending), layer=layer, phase=phase))
            pending.clear()
            last_compute[0] = i

    ends_copy: dict[str, int] = {}
    dmas: dict[str, tuple[int, float]] = {}
    prefetched_again = _refetched_cross_program_prefetches(mod.computations.get(mod.entry, []))
    cp = compute_params(topo.chip, "calibrated")  # the DMAs' spread: the default mode's rates
    unit: dict[int, float] = {}  # op index -> its compute unit's time (_spread_dma)
    carry: list[float] = []
    costs: dict[str, tuple] = {}
    kernels: dict[str, tuple] = {}  # Pallas kernel -> (instruction, its splash pricing or None)
    walk(mod.entry)
    notes += splash.notes(kernels.values())
    if unknown:
        notes.append("opcodes tpusim does not know, simulated by their bytes alone: "
                     + ", ".join(f"{k} (x{n})" for k, n in sorted(unknown.items())))
    if pending:  # the step ends when its last collectives and copies are done
        add(dict(name="step-end", stream=COMPUTE, category="elementwise", deps=tuple(pending)))
    flops = sum(o.flops for o in ops)
    zero = Memory(params=0, grads=0, optimizer=0, activations=0, working=0, gathered_weights=0)
    return Program(name=name or mod.name, ops=tuple(ops), devices=topo.num_chips,
                   model_flops_per_step=flops * topo.num_chips, tokens_per_step=0.0, memory=zero,
                   hbm_capacity_bytes=topo.chip.hbm_bytes, notes=tuple(notes))


def _first_operand(ins) -> str:
    """The name of an instruction's first operand ("" for none)."""
    return ins.operands[0].split()[-1].lstrip("%") if ins.operands else ""


def _refetched_cross_program_prefetches(entry: list) -> set[str]:
    """Names of the entry's cross-program prefetches (``copy-start`` with ``cross_program_prefetch_index``)
    whose parameter the program copies into VMEM again before it ends (XLA's end-of-program prefetch,
    so that the next run finds the buffer in place): in steady state only that second copy moves bytes."""
    starts = [i for i in entry if i.opcode == "copy-start" and host_copy_kind(i.result_type) is None]
    cross = {i.name: _first_operand(i) for i in starts if "cross_program_prefetch_index" in i.attrs}
    again = {_first_operand(i) for i in starts if i.name not in cross}
    return {name for name, param in cross.items() if param in again}


def _spread_dma(ops: list[Op], start: int, nbytes: float, carry: list[float], cp: ComputeParams,
                unit: dict[int, float]) -> None:
    """Share an async DMA's HBM bytes among the compute ops that ran while it was in flight.

    XLA TPU's memory-space assignment prefetches buffers into VMEM (and evicts them) with DMAs that
    run alongside the TensorCore: they cost HBM bandwidth, not TensorCore time. The bytes go first to
    the ops that leave HBM idle (an MXU- or VPU-bound op's spare bandwidth: its time at ``cp``'s rates
    times the HBM rate, less its own bytes), in proportion to that slack; what the slack cannot hold
    is shared equally, each byte then costing the same. With no op in between, the next compute op
    carries them.
    """
    window = [i for i in range(start, len(ops)) if ops[i].stream == COMPUTE and not ops[i].category.endswith("-done")]
    if not window:
        carry[:] = [(carry[0] if carry else 0.0) + nbytes]
        return
    rate = cp.hbm_bytes_per_s
    for i in window:
        if i not in unit:
            unit[i] = unit_time(ops[i], cp)  # (a DMA's bytes change an op's HBM side, never its FLOPs)
    slack = [max(max(unit[i], ops[i].hbm_bytes / rate) * rate - ops[i].hbm_bytes, 0.0) for i in window]
    room = sum(slack)
    spare = max(nbytes - room, 0.0) / len(window)
    fill = min(nbytes / room, 1.0) if room > 0 else 0.0
    for i, free in zip(window, slack):
        ops[i] = dataclasses.replace(ops[i], hbm_bytes=ops[i].hbm_bytes + free * fill + spare)


def _permute_axes(topo: Topology, pairs: str | None, to_chip) -> tuple[Axis, ...]:
    """The axis a collective-permute moves along, from its first source-target pair (``to_chip``: XLA
    device id -> chip id, :func:`xla_chip`)."""
    m = re.search(r"\{(\d+),(\d+)\}", pairs or "")
    if not m:
        return ()
    return group_axes(topo, [to_chip(int(m.group(1))), to_chip(int(m.group(2)))], topo.num_chips)[:1]


__all__ = ["DTYPE_BYTES", "group_axes", "host_copy_kind", "host_slice_copy", "import_hlo", "read_hlo", "replica_groups", "xla_chip"]
