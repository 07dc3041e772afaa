"""XLA's optimized HLO text (``compiled.as_text()``), parsed just enough for tpusim.

Instructions with their result types, operands and attributes, computations, the entry; array
shapes and bytes by HLO type; replica groups in every form XLA prints (explicit, iota, mesh).
Standard library only, so the capture scripts (``traces/``) use it from a plain interpreter too.
:mod:`tpusim.compiler.hlo.analysis` answers questions across instructions (operands, loops, trip
counts); :mod:`tpusim.compiler.hlo.collectives` finds every collective.
"""

from __future__ import annotations

import math
import functools
import re
from dataclasses import dataclass, field

# Device ids an iota replica-group form may expand to (tpusim.limits.MAX_CHIPS x 8 cores; kept
# here as a number so that this module needs nothing but the standard library).
MAX_GROUP_DEVICES = 2**23

# Base opcodes of the collectives we report.
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                    "collective-permute", "collective-broadcast", "ragged-all-to-all")

# Bytes per element of HLO primitive types (sub-byte types as fractions).
DTYPE_BYTES: dict[str, float] = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e3m4": 1, "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0,
}

_ARRAY_RE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                       + r")\[([^\]]*)\]")
_COMP_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMMENT_RE = re.compile(r"/\*.*?\*/")
_CALLEE_KEYS = ("calls", "to_apply", "body", "condition", "branch_computations",
                "true_computation", "false_computation")


@dataclass
class Instr:
    """One HLO instruction, parsed just enough for collectives."""

    name: str
    computation: str
    result_type: str
    opcode: str
    operands: list[str]  # raw operand strings, e.g. "bf16[32,512]{1,0} %p.1"
    attrs: dict[str, str]
    is_root: bool = False


@dataclass
class Module:
    """The parsed module: computations in order, each a list of instructions."""

    name: str
    entry: str
    num_partitions: int | None = None
    replica_count: int | None = None
    computations: dict[str, list[Instr]] = field(default_factory=dict)
    by_name: dict[str, Instr] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Tokenising helpers
# ---------------------------------------------------------------------------------------------

def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split ``s`` on ``sep`` at bracket depth 0, outside double quotes."""
    out, depth, quote, cur = [], 0, False, []
    i = 0
    while i < len(s):
        c = s[i]
        if quote:
            cur.append(c)
            if c == "\\" and i + 1 < len(s):
                cur.append(s[i + 1])
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
            cur.append(c)
        elif c in "([{":
            depth += 1
            cur.append(c)
        elif c in ")]}":
            depth -= 1
            cur.append(c)
        elif c == sep and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _match_close(s: str, start: int) -> int:
    """Index of the bracket closing the one at ``s[start]`` (quotes respected)."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    depth, quote = 0, False
    for i in range(start, len(s)):
        c = s[i]
        if quote:
            if c == '"' and s[i - 1] != "\\":
                quote = False
            continue
        if c == '"':
            quote = True
        elif c in pairs:
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced brackets in: {s[start:start + 200]}")


def array_shapes(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    """All ``(dtype, dims)`` arrays in an HLO type string (a tuple type gives several)."""
    out = []
    for dtype, dims in _ARRAY_RE.findall(type_str):
        ds = tuple(int(d.replace("<=", "")) for d in dims.split(",") if d.strip())
        out.append((dtype, ds))
    return out


def shape_str(dtype: str, dims: tuple[int, ...]) -> str:
    return f"{dtype}[{','.join(map(str, dims))}]"


def array_bytes(dtype: str, dims: tuple[int, ...]) -> int:
    return int(math.prod(dims) * DTYPE_BYTES[dtype])


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

def _parse_instr(line: str, computation: str) -> Instr | None:
    m = _INSTR_RE.match(_COMMENT_RE.sub("", line))
    if not m:
        return None
    is_root, name, rest = bool(m.group(1)), m.group(2), m.group(3).strip()
    # Result type: a tuple "( ... )" or one array token (no spaces at depth 0).
    if rest.startswith("("):
        end = _match_close(rest, 0)
        result_type, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        i, depth = 0, 0
        while i < len(rest) and not (rest[i] == " " and depth == 0):
            depth += rest[i] in "([{"
            depth -= rest[i] in ")]}"
            i += 1
        result_type, rest = rest[:i], rest[i:].lstrip()
    p = rest.find("(")
    if p < 0:
        return None
    opcode = rest[:p].strip()
    end = _match_close(rest, p)
    operands = _split_top(rest[p + 1:end])
    attrs: dict[str, str] = {}
    for item in _split_top(rest[end + 1:].lstrip(", ")):
        k, _, v = item.partition("=")
        attrs[k.strip()] = v.strip()
    return Instr(name=name, computation=computation, result_type=result_type, opcode=opcode,
                 operands=operands, attrs=attrs, is_root=is_root)


_QUOTED_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
MAX_CONTINUATION_LINES = 64


def _continued(lines: list[str], i: int) -> tuple[str, int]:
    """Instruction line ``i`` with the lines that continue it joined on, and the index after them.

    XLA prints an attribute value that holds a newline as it is: a Pallas kernel's
    ``frontend_attributes={kernel_metadata={`` is followed by its JSON on the next line and by
    ``}}, metadata=...`` on the one after (libtpu's splash attention, ``traces/xla_aot_memory/v4_22b_full``).
    A line whose brackets do not balance (outside quotes) takes the next lines until they do; if they
    do not within :data:`MAX_CONTINUATION_LINES` lines, or a next line starts an instruction or ends
    the computation (a file cut short), the line stays alone."""
    line = lines[i]
    if line.count("{") == line.count("}") and line.count("(") == line.count(")"):
        return line, i + 1
    depth, j = _depth(line), i + 1
    while depth > 0 and j < len(lines) and j - i <= MAX_CONTINUATION_LINES:
        nxt = lines[j]
        if nxt.strip() == "}" or _INSTR_RE.match(nxt):
            break
        depth += _depth(nxt)
        j += 1
    if depth == 0 and j > i + 1:
        return "".join(lines[i:j]), j
    return line, i + 1


def _depth(s: str) -> int:
    """Opening minus closing brackets in ``s``, outside double-quoted strings."""
    s = _QUOTED_RE.sub("", s)
    return sum(s.count(c) for c in "([{") - sum(s.count(c) for c in ")]}")


@functools.lru_cache(maxsize=2)
def parse_module(text: str) -> Module:
    """Parse HLO module text into computations and instructions (the last two texts are cached:
    the importer and :func:`extract_collectives` read the same module; treat the result as
    read-only)."""
    name_m = re.search(r"^HloModule\s+([\w.\-]+)", text, re.M)
    mod = Module(name=name_m.group(1) if name_m else "?", entry="")
    for key in ("num_partitions", "replica_count"):
        m = re.search(rf"^HloModule\s.*\b{key}=(\d+)", text, re.M)
        if m:
            setattr(mod, key, int(m.group(1)))
    current: str | None = None
    broken: ValueError | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line, i = lines[i], i + 1
        if current is None:
            m = _COMP_HEADER_RE.match(line)
            if m and not line.startswith(" "):
                current = m.group(2)
                mod.computations[current] = []
                if m.group(1):
                    mod.entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        line, i = _continued(lines, i - 1)
        try:
            ins = _parse_instr(line, current)
        except ValueError as e:  # reported below, unless the file is cut short (which explains it)
            broken = broken or e
            continue
        if ins is not None:
            mod.computations[current].append(ins)
            mod.by_name[ins.name] = ins
    if current is not None:
        raise ValueError(f"computation %{current} is not closed: the file is cut short")
    if broken is not None:
        raise broken
    return mod


def _callees(ins: Instr) -> list[str]:
    out = []
    for key in _CALLEE_KEYS:
        v = ins.attrs.get(key)
        if v:
            out += [c.strip().lstrip("%") for c in v.strip("{}").split(",") if c.strip()]
    return out


def _operand_name(operand: str) -> str:
    return operand.split()[-1].lstrip("%") if operand else ""


def _replica_group_sizes(rg: str, num_devices: int | None) -> tuple[int | None, int | None]:
    """``(num_groups, group_size)`` from a replica_groups attribute as written.

    Forms: ``{{0,1},{2,3}}`` (explicit), ``[2,2]<=[4]`` (iota: num_groups, group_size), and
    ``mesh['axis_0'=4,'axis_1'=4] {'axis_1'}`` (the group spans the listed mesh axes).
    """
    if rg is None:
        return None, None
    rg = rg.strip()
    m = re.match(r"^\[(\d+),(\d+)\]<=", rg)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.match(r"^mesh\[(.*?)\]\s*\{(.*)\}$", rg)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        axes = re.findall(r"'([^']+)'", m.group(2))
        group = math.prod(sizes[a] for a in axes)
        total = math.prod(sizes.values())
        return total // group, group
    groups = re.findall(r"\{([\d,\s]*)\}", rg)
    if groups and rg != "{}":
        sizes_set = {len([x for x in g.split(",") if x.strip()]) for g in groups}
        return len(groups), (sizes_set.pop() if len(sizes_set) == 1 else None)
    return 1, num_devices  # "{}": one group of every device


def expand_replica_groups(rg: str | None, num_devices: int | None = None) -> list[list[int]] | None:
    """Device ids of each group of a ``replica_groups`` attribute value.

    Forms: ``{{0,1},{2,3}}`` (explicit), the iota form ``[G,S]<=[d0,d1,...]T(perm)`` (ids over the
    dims, transposed by ``perm``, cut into G groups of S) and ``{}`` (one group of every device, when
    ``num_devices`` is known). XLA's newer form ``mesh['axis_0'=4,'axis_1'=4] {'axis_1'}`` lays the
    device ids out row-major over its axes (the first axis major, as the iota form does) and groups the
    devices that differ only along the listed axes: the iota form transposed to put those axes last.
    (Checked on libtpu's v6e FSDP 4 x tensor 4 compile, traces/xla_aot_chips_maxtext: its
    tensor-parallel all-reduces come out over the mesh's tensor rows, its embedding all-to-all over
    the fsdp columns.) A mesh form written with a device list of its own is not expanded (None).

    >>> expand_replica_groups("[4,2]<=[2,4]T(1,0)")
    [[0, 4], [1, 5], [2, 6], [3, 7]]
    >>> expand_replica_groups("{{0,1},{2,3}}")
    [[0, 1], [2, 3]]
    >>> expand_replica_groups("mesh['axis_0'=2,'axis_1'=1,'axis_2'=2] {'axis_0'}")
    [[0, 2], [1, 3]]
    """
    if rg is None:
        return None
    rg = rg.strip()
    if rg in ("", "{}"):
        return [list(range(num_devices))] if num_devices else None
    m = re.match(r"^mesh\[((?:'[^']+'=\d+,?)+)\]\s*\{((?:'[^']+',?)*)\}$", rg)
    if m:
        sizes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names = [k for k, _ in sizes]
        listed = re.findall(r"'([^']+)'", m.group(2))
        if len(set(listed)) != len(listed) or not set(listed) <= set(names):
            raise ValueError(f"replica_groups {rg}: the listed axes are not distinct axes of the mesh")
        perm = [i for i, k in enumerate(names) if k not in listed] + [names.index(a) for a in listed]
        size = math.prod(int(sizes[i][1]) for i in perm[len(perm) - len(listed):])
        dims = ",".join(v for _, v in sizes)
        total = math.prod(int(v) for _, v in sizes)
        return expand_replica_groups(f"[{total // size},{size}]<=[{dims}]T({','.join(map(str, perm))})")
    m = re.match(r"^\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?$", rg)
    if m:
        dims = [int(x) for x in m.group(3).split(",")]
        perm = [int(x) for x in m.group(4).split(",")] if m.group(4) else list(range(len(dims)))
        if math.prod(dims) > MAX_GROUP_DEVICES or sorted(perm) != list(range(len(dims))):
            raise ValueError(f"replica_groups {rg}: more than {MAX_GROUP_DEVICES:,} devices, or not a "
                             "permutation of the dims")
        tdims = [dims[p] for p in perm]
        strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
        ids = []
        for flat in range(math.prod(dims)):  # walk the transposed array in row-major order
            idx, rest = [], flat
            for n in reversed(tdims):
                rest, r = divmod(rest, n)
                idx.append(r)
            idx.reverse()
            ids.append(sum(idx[k] * strides[perm[k]] for k in range(len(dims))))
        size = int(m.group(2))
        return [ids[i:i + size] for i in range(0, len(ids), size)]
    groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", rg)]
    groups = [g for g in groups if g]
    return groups or None


def _op_name(ins: Instr) -> str:
    m = re.search(r'op_name="([^"]*)"', ins.attrs.get("metadata", ""))
    return m.group(1) if m else ""
