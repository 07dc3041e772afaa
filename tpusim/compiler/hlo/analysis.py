"""Questions about a parsed HLO module that span instructions: an instruction's operand arrays and
producers, the while loop that consumes or produces a value, the chain of callers of a computation,
and a loop's trip count (from its backend config or its ``i = c0; i < C; i += s`` form)."""

from __future__ import annotations

import re
from collections import defaultdict

from tpusim.compiler.hlo.parse import _ARRAY_RE, Instr, Module, _callees, _operand_name, array_shapes


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
