"""Extract every collective from XLA's optimized HLO text (``compiled.as_text()``).

Used by ``aot_compile.py`` (TPU, ahead of time) and ``capture_cpu.py`` (CPU devices) to write the
collective part of their ``summary.json``.  Standard library only, so it also runs from a plain
interpreter:  ``python3 traces/hlo_collectives.py optimized_hlo.txt[.gz] [--json]`` (or
``python -m tpusim.compiler.hlo.parse``).

One entry of ``collectives`` is one *logical* collective, however XLA spelled it:

* ``sync``: a plain ``all-gather`` / ``reduce-scatter`` / ``all-reduce`` / ``all-to-all`` /
  ``collective-permute`` (/ ``collective-broadcast`` / ``ragged-all-to-all``) instruction;
* ``async_start_done``: a ``<kind>-start`` / ``<kind>-done`` pair (or a generic ``async-start`` /
  ``async-done`` wrapping one), counted once; the result shape comes from the done;
* ``async_collective_fusion`` (XLA TPU): the collective is cloned into a fusion whose root is a
  ``custom-call`` ``AsyncCollectiveStart``, zero or more "continuation" fusions that run a slice of
  it next to compute, and a fusion whose root is ``AsyncCollectiveDone``; all clones share one
  ``channel_id``, which is how they are grouped (``members`` lists them);
* ``all_reduce_scatter_fusion`` (XLA TPU): an ``all-reduce`` followed by a ``dynamic-slice`` of the
  local shard, in a ``kCustom`` fusion calling ``%all-reduce-scatter*``; reported with
  ``kind: reduce-scatter`` (``hlo_opcode: all-reduce``) and the fusion's result as its result.

``operand_bytes`` / ``result_bytes`` are per device and per execution (all-gather: local shard ->
gathered buffer; reduce-scatter: local full buffer -> shard).  Collectives inside ``while`` bodies
are counted once statically (``count``) and ``trip_count`` times dynamically (``executed``); the
trip count is read from the loop (``i = c0; i < C; i += s``) when it has that form.  XLA TPU's
windowed einsum ("collective matmul": ``windowed_dot_general_body_rs`` / ``_ag`` loops) shows up as
``collective-permute`` pairs in such loops plus one permute outside the loop (a ring step run
after a reduce-scatter loop or before an all-gather loop); those carry ``windowed_einsum_loop``,
and ``windowed_einsum_loops`` describes each loop.
"""

from __future__ import annotations

import gzip
import json
import math
import functools
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

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
    for line in text.splitlines():
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
    ``num_devices`` is known). XLA's newer ``mesh[...]`` form is not expanded (None).

    >>> expand_replica_groups("[4,2]<=[2,4]T(1,0)")
    [[0, 4], [1, 5], [2, 6], [3, 7]]
    >>> expand_replica_groups("{{0,1},{2,3}}")
    [[0, 1], [2, 3]]
    """
    if rg is None:
        return None
    rg = rg.strip()
    if rg in ("", "{}"):
        return [list(range(num_devices))] if num_devices else None
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


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------

def _base_kind(opcode: str) -> tuple[str | None, str]:
    """``(kind, form)`` with form ``sync`` / ``start`` / ``done`` / ``update``."""
    for suffix in ("-start", "-done", "-update"):
        if opcode.endswith(suffix):
            base = opcode[: -len(suffix)]
            return (base if base in COLLECTIVE_KINDS else None), suffix[1:]
    return (opcode, "sync") if opcode in COLLECTIVE_KINDS else (None, "sync")


class _Analysis:
    """Call graph, operand shapes and while-loop trip counts of a parsed module."""

    def __init__(self, mod: Module) -> None:
        self.mod = mod
        self.callers: dict[str, list[Instr]] = defaultdict(list)
        self.users: dict[str, list[Instr]] = defaultdict(list)
        self.root: dict[str, Instr] = {}
        for instrs in mod.computations.values():
            for ins in instrs:
                for op in ins.operands:
                    self.users[_operand_name(op)].append(ins)
                for callee in _callees(ins):
                    self.callers[callee].append(ins)
                if ins.is_root:
                    self.root[ins.computation] = ins
        self._trip: dict[str, int | None] = {}

    def operand_arrays(self, ins: Instr) -> list[tuple[str, tuple[int, ...]]]:
        """Arrays of the operands, from the operand text or else from the operand's definition."""
        out = []
        for op in ins.operands:
            parts = op.rsplit(" ", 1)
            if len(parts) == 2 and _ARRAY_RE.search(parts[0]):
                out += array_shapes(parts[0])
            else:
                d = self.mod.by_name.get(_operand_name(op))
                if d is not None:
                    out += array_shapes(d.result_type)
        return out

    def operand_instr(self, ins: Instr, i: int) -> Instr | None:
        return self.mod.by_name.get(_operand_name(ins.operands[i])) if i < len(ins.operands) else None

    def consuming_while(self, ins: Instr) -> Instr | None:
        """The ``while`` that takes the output of ``ins`` (through tuple/bitcast/copy/fusion), if
        any: e.g. the first ring step of a windowed-einsum all-gather, run before its loop."""
        frontier = [ins]
        for _ in range(4):
            nxt = []
            for cur in frontier:
                for user in self.users.get(cur.name, ()):
                    if user.opcode == "while":
                        return user
                    if user.opcode in ("tuple", "bitcast", "copy", "fusion", "get-tuple-element"):
                        nxt.append(user)
            frontier = nxt
        return None

    def producing_while(self, ins: Instr) -> Instr | None:
        """The ``while`` whose output feeds operand 0 of ``ins`` (through gte/bitcast/copy/fusion
        of a single operand), if any."""
        cur = self.operand_instr(ins, 0)
        for _ in range(6):
            if cur is None:
                return None
            if cur.opcode == "while":
                return cur
            if cur.opcode not in ("get-tuple-element", "bitcast", "copy", "fusion"):
                return None
            cur = self.operand_instr(cur, 0)
        return None

    def caller_chain(self, comp: str) -> list[Instr]:
        """Calling instructions from ``comp`` up to the entry (the first caller at each step)."""
        chain, seen = [], set()
        while comp != self.mod.entry and self.callers.get(comp) and comp not in seen:
            seen.add(comp)
            caller = self.callers[comp][0]
            chain.append(caller)
            comp = caller.computation
        return chain

    def _const_int(self, ins: Instr | None) -> int | None:
        for _ in range(16):  # bounded: a malformed module may make an instruction its own operand
            if ins is None or ins.opcode not in ("copy", "bitcast", "convert", "reshape"):
                break
            ins = self.operand_instr(ins, 0)
        if ins is None or ins.opcode != "constant":
            return None
        try:
            return int(ins.operands[0])
        except (ValueError, IndexError):
            return None

    def trip_count(self, whl: Instr) -> int | None:
        """Trip count of a ``while`` of the form ``i = c0; i < C; i += s`` (else known_trip_count)."""
        if whl.name in self._trip:
            return self._trip[whl.name]
        n = None
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', whl.attrs.get("backend_config", ""))
        if m:
            n = int(m.group(1))
        cond = self.root.get(whl.attrs.get("condition", "").lstrip("%"))
        body = self.root.get(whl.attrs.get("body", "").lstrip("%"))
        init = self.operand_instr(whl, 0)
        if n is None and cond is not None and cond.opcode == "compare" and body is not None:
            a, b = self.operand_instr(cond, 0), self.operand_instr(cond, 1)
            direction = re.search(r"direction=(\w+)", ",".join(f"{k}={v}" for k, v in
                                                             cond.attrs.items()))
            if a is not None and a.opcode == "get-tuple-element" and direction:
                k = int(a.attrs.get("index", "-1"))
                limit = self._const_int(b)
                upd = self.operand_instr(body, k) if body.opcode == "tuple" else None
                step = None
                if upd is not None and upd.opcode == "add":
                    step = self._const_int(self.operand_instr(upd, 1))
                    if step is None:
                        step = self._const_int(self.operand_instr(upd, 0))
                start = (self._const_int(self.operand_instr(init, k))
                         if init is not None and init.opcode == "tuple" else None)
                if None not in (limit, step, start) and step > 0:
                    d = direction.group(1)
                    if d == "LT":
                        n = max(0, -(-(limit - start) // step))
                    elif d == "LE":
                        n = max(0, (limit - start) // step + 1)
        self._trip[whl.name] = n
        return n


def extract_collectives(text: str) -> dict[str, Any]:
    """All logical collectives of an optimized HLO module, with counts, bytes and contexts.

    Returns a JSON-able dict: ``collectives`` (one entry per logical collective),
    ``counts_by_kind`` (static ``count``, dynamic ``executed``, bytes summed per execution and
    executed), ``windowed_einsum_loops``, ``while_loops``, ``fusions_with_collectives`` and module
    facts (``opcode_counts`` counts HLO instructions, so clones of one collective count there).
    """
    mod = parse_module(text)
    an = _Analysis(mod)
    n_dev = (mod.num_partitions or 1) * (mod.replica_count or 1)

    dones: dict[str, Instr] = {}
    for ins in mod.by_name.values():
        _, form = _base_kind(ins.opcode)
        if form == "done" and ins.operands:
            dones[_operand_name(ins.operands[0])] = ins
    async_wrapper: dict[str, Instr] = {}  # computation -> generic async-start calling it
    for ins in mod.by_name.values():
        if ins.opcode == "async-start":
            for callee in _callees(ins):
                async_wrapper[callee] = ins

    # Group the HLO instructions of one logical collective (clones share a channel_id).
    groups: dict[tuple[str, str], list[tuple[Instr, str, list[Instr]]]] = {}
    for instrs in mod.computations.values():
        for ins in instrs:
            kind, form = _base_kind(ins.opcode)
            if kind is None or form in ("done", "update"):
                continue
            chain = an.caller_chain(ins.computation)
            role = "start" if form == "start" else "sync"
            if ins.computation in async_wrapper:
                role = "async_wrapped"
            elif chain and chain[0].opcode == "fusion":
                root = an.root.get(ins.computation)
                target = (root.attrs.get("custom_call_target", "").strip('"')
                          if root is not None and root.opcode == "custom-call" else "")
                if target == "AsyncCollectiveStart":
                    role = "fusion_start"
                elif target == "AsyncCollectiveDone":
                    role = "fusion_done"
                elif chain[0].attrs.get("calls", "").lstrip("%").startswith("all-reduce-scatter"):
                    role = "all_reduce_scatter"
                else:
                    role = "fusion_continuation"
            key = (kind, ins.attrs.get("channel_id") or ins.name)
            groups.setdefault(key, []).append((ins, role, chain))

    records: list[dict[str, Any]] = []
    for (kind, _), members in groups.items():
        roles = [r for _, r, _ in members]
        # The member that starts it: start fusion, -start, async-wrapped, else the first.
        order = ("fusion_start", "start", "async_wrapped", "all_reduce_scatter", "sync",
                 "fusion_continuation", "fusion_done")
        anchor, role, chain = min(members, key=lambda m: order.index(m[1]))
        operands = an.operand_arrays(anchor)
        logical_kind = kind
        hlo_opcode = anchor.opcode
        if role in ("fusion_start", "fusion_continuation", "fusion_done") or \
                "fusion_start" in roles or "fusion_done" in roles:
            impl = "async_collective_fusion"
            results = array_shapes(anchor.result_type)
        elif role == "all_reduce_scatter":
            impl = "all_reduce_scatter_fusion"
            logical_kind = "reduce-scatter" if kind == "all-reduce" else kind
            results = array_shapes(chain[0].result_type)
        elif role in ("start", "async_wrapped"):
            impl = "async_start_done"
            start = anchor if role == "start" else async_wrapper[anchor.computation]
            done = dones.get(start.name)
            if done is not None:
                results = array_shapes(done.result_type)
            else:
                arrs = array_shapes(anchor.result_type)
                results = arrs[len(operands):] or arrs
            if role == "async_wrapped":
                chain = an.caller_chain(start.computation)
        else:
            impl = "sync"
            results = array_shapes(anchor.result_type)
        if kind == "collective-permute":
            results = [a for a in results if a[1]][:max(1, len(operands))]  # drop u32[] scalars

        whiles = [c for c in chain if c.opcode == "while"]
        executed = 1
        trips = []
        for w in whiles:
            t = an.trip_count(w)
            trips.append(t)
            executed = executed * t if (t is not None and executed is not None) else None
        top = chain[-1] if chain else anchor  # the entry-level instruction that runs it
        rg = anchor.attrs.get("replica_groups")
        n_groups, group_size = _replica_group_sizes(rg, n_dev)
        if kind == "collective-permute":
            n_groups, group_size = None, None
        to_apply = anchor.attrs.get("to_apply", "").lstrip("%")
        rec = {
            "name": anchor.name,
            "kind": logical_kind,
            "hlo_opcode": hlo_opcode,
            "implementation": impl,
            "async": impl != "sync",
            "members": ([f"{r}:{m.name}@{m.computation}" for m, r, _ in members]
                        if len(members) > 1 or impl != "sync" else None),
            "num_continuations": roles.count("fusion_continuation") or None,
            "done": (dones[anchor.name].name if role == "start" and anchor.name in dones
                     else None),
            "computation": anchor.computation,
            "entry_instruction": top.name,
            "context": [f"{c.opcode}:{c.name}" for c in chain],
            "in_fusion": any(c.opcode == "fusion" for c in chain),
            "in_while": bool(whiles),
            "trip_counts": trips or None,
            "executed": executed,
            "channel_id": anchor.attrs.get("channel_id"),
            "replica_groups": rg,
            "num_groups": n_groups,
            "group_size": group_size,
            "source_target_pairs": anchor.attrs.get("source_target_pairs"),
            "dimensions": anchor.attrs.get("dimensions"),
            "use_global_device_ids": anchor.attrs.get("use_global_device_ids"),
            "reduction": an.root[to_apply].opcode if to_apply in an.root else None,
            "num_operands": len(operands),
            "operand_shapes": [shape_str(*a) for a in operands],
            "operand_bytes": sum(array_bytes(*a) for a in operands),
            "result_shapes": [shape_str(*a) for a in results],
            "result_bytes": sum(array_bytes(*a) for a in results),
            "op_name": _op_name(anchor) or _op_name(top),
        }
        loop = next((c for c in chain if c.opcode == "while"
                     and "windowed_dot_general" in c.attrs.get("body", "")), None)
        if loop is None and kind == "collective-permute":
            # The ring step run outside the loop: after it (reduce-scatter) or before (all-gather).
            done = dones.get(anchor.name, anchor)
            loop = an.producing_while(anchor) or an.consuming_while(done)
            if loop is not None and "windowed_dot_general" not in loop.attrs.get("body", ""):
                loop = None
        if loop is not None:
            rec["windowed_einsum_loop"] = loop.name
        records.append({k: v for k, v in rec.items() if v is not None})

    counts: dict[str, dict[str, Any]] = {}
    for r in records:
        c = counts.setdefault(r["kind"], {"count": 0, "async": 0, "executed": 0,
                                          "operand_bytes": 0, "result_bytes": 0,
                                          "executed_operand_bytes": 0,
                                          "executed_result_bytes": 0})
        n = r.get("executed")
        c["count"] += 1
        c["async"] += int(r["async"])
        c["operand_bytes"] += r["operand_bytes"]
        c["result_bytes"] += r["result_bytes"]
        if n is None or c["executed"] is None:
            c["executed"] = c["executed_operand_bytes"] = c["executed_result_bytes"] = None
        else:
            c["executed"] += n
            c["executed_operand_bytes"] += n * r["operand_bytes"]
            c["executed_result_bytes"] += n * r["result_bytes"]

    whiles = []
    for w in (i for i in mod.by_name.values() if i.opcode == "while"):
        body = w.attrs.get("body", "").lstrip("%")
        inside = [r for r in records if f"while:{w.name}" in r["context"]]
        outside = [r["name"] for r in records
                   if r.get("windowed_einsum_loop") == w.name and not r["in_while"]]
        entry = {"name": w.name, "computation": w.computation, "body": body,
                 "trip_count": an.trip_count(w), "op_name": _op_name(w),
                 "collectives_in_body": len(inside),
                 "collective_bytes_per_trip": sum(r["operand_bytes"] for r in inside),
                 "collectives_outside_loop": outside}
        if "windowed_dot_general" in body:
            entry["windowed_einsum"] = ("reduce-scatter" if "_rs" in body else
                                        "all-gather" if "_ag" in body else "?")
        whiles.append(entry)

    fusions_with_coll = sorted({(c.split(":", 1)[1], mod.by_name[c.split(":", 1)[1]].attrs.get(
        "calls", "").lstrip("%")) for r in records for c in r["context"]
        if c.startswith("fusion:")})
    opcodes = Counter(i.opcode for i in mod.by_name.values())
    custom_targets = Counter(i.attrs.get("custom_call_target", "").strip('"')
                             for i in mod.by_name.values() if i.opcode == "custom-call")
    return {
        "module": mod.name,
        "num_partitions": mod.num_partitions,
        "num_computations": len(mod.computations),
        "num_instructions": len(mod.by_name),
        "counts_by_kind": dict(sorted(counts.items())),
        "counts_by_implementation": dict(sorted(Counter(
            f"{r['kind']}/{r['implementation']}" for r in records).items())),
        "collectives": records,
        "windowed_einsum_loops": [w for w in whiles if "windowed_einsum" in w],
        "while_loops": whiles,
        "fusions_with_collectives": [{"fusion": f, "calls": c} for f, c in fusions_with_coll],
        "custom_call_targets": dict(sorted(custom_targets.items())),
        "opcode_counts": dict(sorted(opcodes.items())),
    }


def counts_table(summary: dict[str, Any]) -> str:
    """A short text table of ``counts_by_kind`` (bytes per execution, and executed)."""
    lines = [f"{'kind':20s} {'count':>5s} {'async':>5s} {'exec':>5s} {'operand_MiB':>11s} "
             f"{'result_MiB':>10s} {'exec_opnd_MiB':>13s}"]
    for k, c in summary["counts_by_kind"].items():
        ex = c["executed"] if c["executed"] is not None else -1
        eob = (c["executed_operand_bytes"] or 0) / 2**20
        lines.append(f"{k:20s} {c['count']:5d} {c['async']:5d} {ex:5d} "
                     f"{c['operand_bytes'] / 2**20:11.3f} {c['result_bytes'] / 2**20:10.3f} "
                     f"{eob:13.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m tpusim.compiler.hlo.parse optimized_hlo.txt[.gz] [--json]``: the collectives table."""
    argv = sys.argv[1:] if argv is None else argv
    opener = gzip.open if argv[0].endswith(".gz") else open
    with opener(argv[0], "rt") as f:
        s = extract_collectives(f.read())
    if len(argv) > 1 and argv[1] == "--json":
        json.dump(s, sys.stdout, indent=1)
        return
    print(counts_table(s))
    for r in s["collectives"]:
        print(f"{r['kind']:18s} {r['implementation'][:10]:10s} x{r.get('executed', '?')!s:3s} "
              f"{','.join(r['operand_shapes'])[:40]:40s} -> "
              f"{','.join(r['result_shapes'])[:32]:32s} g={r.get('group_size')} "
              f"{r['op_name'][10:80]}")


if __name__ == "__main__":
    main()
