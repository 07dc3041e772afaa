"""HBM bytes of one scheduled instruction of XLA's optimized TPU HLO.

XLA's own ``bytes_accessed`` counts every operand and result; on a TPU much of that never touches
HBM. Here an array counts only if it lives in HBM (memory space 0), a fusion operand read through
slices counts the slices, a buffer updated in place counts the update, and the state handed
through an async collective fusion counts nothing (the collective is priced as such).
"""

from __future__ import annotations

import re

from tpusim.compiler.hlo.parse import DTYPE_BYTES, Instr, _callees, _split_top, array_bytes, array_shapes
from tpusim.compiler.hlo.analysis import _Analysis

# An array with its layout; XLA TPU writes the memory space as ``S(n)`` at the end of the layout.
_TYPED_ARRAY_RE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                             + r")\[([^\]]*)\](\{[^}]*\})?")
_MEMORY_SPACE_RE = re.compile(r"S\((\d+)\)")


def hbm_array_bytes(type_str: str) -> float:
    """Bytes of the arrays in ``type_str`` that live in HBM (memory space 0).

    XLA TPU's memory-space assignment moves buffers into VMEM (``S(1)``) ahead of their use with
    async copies (``copy-start``/``copy-done``, priced as HBM traffic there); an op reading or
    writing VMEM does not touch HBM. ``S(2)``, ``S(4)``, ``S(6)`` hold scalars (sync flags, SMEM);
    ``S(5)`` is host memory (PCIe, priced as host copies).
    """
    total = 0.0
    for dtype, dims, layout in _TYPED_ARRAY_RE.findall(type_str):
        m = _MEMORY_SPACE_RE.search(layout or "")
        if m and m.group(1) != "0":
            continue
        n = 1
        for d in dims.split(","):
            if d.strip():
                n *= int(d.replace("<=", ""))
        total += n * DTYPE_BYTES[dtype]
    return total


def _operand_types(ins: Instr, an: _Analysis) -> list[str]:
    """The type text (with layout) of each operand, from the operand text or its definition."""
    out = []
    for op in ins.operands:
        parts = op.rsplit(" ", 1)
        if len(parts) == 2 and _TYPED_ARRAY_RE.search(parts[0]):
            out.append(parts[0])
        else:
            d = an.mod.by_name.get(parts[-1].lstrip("%"))
            out.append(d.result_type if d is not None else "")
    return out


def _in_hbm(type_str: str) -> bool:
    m = _MEMORY_SPACE_RE.search(type_str)
    return not m or m.group(1) == "0"


def _plain_bytes(type_str: str) -> float:
    return float(sum(array_bytes(*a) for a in array_shapes(type_str)))


# Custom calls that move no data: buffer allocation, bitcasts, index assumptions, and the wrappers
# of XLA TPU's async collectives (priced as collectives).
FREE_CUSTOM_CALLS = ("AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound", "AsyncCollectiveStart",
                     "AsyncCollectiveDone")
_SLICERS = ("dynamic-slice", "slice")
# Inside XLA TPU's async collective fusions, buffers handed through to the tuple or to the fused
# collective are the collective's (priced as such), not the fusion's compute traffic.
_PASS_THROUGH = ("parameter", "tuple", "all-gather", "all-reduce", "reduce-scatter", "collective-permute",
                 "all-to-all", "all-gather-start", "all-reduce-start", "collective-permute-start")


def _params_and_users(ins: Instr, an: _Analysis) -> tuple[list[Instr], dict[int, str], dict[str, list]]:
    """A fusion's body, its parameters by number, and each value's users (instruction, operand index)."""
    callees = _callees(ins)
    body = an.mod.computations.get(callees[0], []) if callees else []
    params: dict[int, str] = {}
    for i in body:
        if i.opcode == "parameter":
            m = re.match(r"\s*(\d+)", i.operands[0] if i.operands else "")
            if m:
                params[int(m.group(1))] = i.name
    users: dict[str, list[tuple[Instr, int]]] = {}
    for i in body:
        for k, op in enumerate(i.operands):
            users.setdefault(op.split()[-1].lstrip("%"), []).append((i, k))
    return body, params, users


def _sliced_read(uses: list[tuple[Instr, int]], an: _Analysis, depth: int = 0) -> float | None:
    """Bytes read of a fusion parameter used only through (dynamic-)slices, also inside nested
    fusions (XLA TPU nests a kLoop fusion that slices one layer out of a scanned stack in the
    convolution fusion that reads it); None if some use reads it whole."""
    if not uses or depth > 8:
        return None
    total = 0.0
    for u, j in uses:
        if u.opcode in _SLICERS and j == 0:
            total += _plain_bytes(u.result_type)
        elif u.opcode == "fusion":
            _, params, users = _params_and_users(u, an)
            inner = _sliced_read(users.get(params.get(j, ""), []), an, depth + 1)
            if inner is None:
                return None
            total += inner
        else:
            return None
    return total


def _fusion_hbm_bytes(ins: Instr, an: _Analysis) -> float:
    """HBM bytes a fusion really moves, as XLA's cost analysis counts them.

    A parameter read only through (dynamic-)slices (directly or in a nested fusion) costs the
    slices' bytes; a parameter that is the buffer of a root dynamic-update-slice is updated in place
    (it costs nothing; the update is written). Arrays in VMEM cost nothing (see :func:`hbm_array_bytes`).
    """
    body, params, users = _params_and_users(ins, an)
    root = next((i for i in body if i.is_root), None)
    roots = [root] if root is not None else []
    if root is not None and root.opcode == "tuple":
        roots = [an.mod.by_name.get(o.split()[-1].lstrip("%")) for o in root.operands]
    in_place = {r.operands[0].split()[-1].lstrip("%") for r in roots
                if r is not None and r.opcode == "dynamic-update-slice"}
    total = 0.0
    for k, t in enumerate(_operand_types(ins, an)):
        if not _in_hbm(t):
            continue
        name = params.get(k)
        uses = users.get(name, []) if name else []
        if name in in_place or (uses and all(u.opcode in _PASS_THROUGH for u, _ in uses)):
            continue
        sliced = _sliced_read(uses, an)
        total += hbm_array_bytes(t) if sliced is None else sliced
    out_types = _split_top(ins.result_type.strip()[1:-1]) if ins.result_type.strip().startswith("(") \
        else [ins.result_type]
    for j, t in enumerate(out_types):
        if not _in_hbm(t):
            continue
        r = roots[j] if j < len(roots) else None
        if r is not None and r.opcode in _PASS_THROUGH:
            continue
        if r is not None and r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
            upd = an.mod.by_name.get(r.operands[1].split()[-1].lstrip("%"))
            total += _plain_bytes(upd.result_type) if upd is not None else hbm_array_bytes(t)
        else:
            total += hbm_array_bytes(t)
    return total


def hbm_bytes(ins: Instr, an: _Analysis) -> float:
    """HBM bytes read and written by one scheduled instruction (operands + results in HBM)."""
    if ins.opcode == "fusion":
        return _fusion_hbm_bytes(ins, an)
    if ins.opcode == "custom-call" and any(f'"{t}"' in ins.attrs.get("custom_call_target", "")
                                           for t in FREE_CUSTOM_CALLS):
        return 0.0
    if ins.opcode in ("copy-start", "slice-start"):
        # An async DMA (HBM <-> VMEM, or a slice of HBM): the destination (first element of the
        # result tuple) and what of the source it reads; the tuple repeats the source.
        dest = _split_top(ins.result_type.strip()[1:-1])[0] if ins.result_type.strip().startswith("(") \
            else ins.result_type
        if dest.startswith("("):
            dest = _split_top(ins.result_type.strip()[1:-1])[1]
        src = (_operand_types(ins, an) or [""])[0]
        moved = _plain_bytes(dest)
        return moved * (_in_hbm(dest) + _in_hbm(src))
    return sum(hbm_array_bytes(t) for t in _operand_types(ins, an)) + hbm_array_bytes(ins.result_type)
