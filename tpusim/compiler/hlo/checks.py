"""What makes an HLO module unfit to simulate, checked before :func:`tpusim.compiler.hlo.importer.import_hlo`
builds a program: each a :class:`TpusimError` naming the instruction and the reason.

* shapes: a negative dimension, or an array over :data:`~tpusim.limits.MAX_BYTES`;
* calls: a computation named by ``calls=``, ``body=``, ``condition=``, ``to_apply=`` ... that the
  file does not have (a file cut short loses its last computations);
* loops: a ``while`` whose body runs itself (directly or through another loop), loops nested more
  than :data:`MAX_LOOP_DEPTH` deep, or more than :data:`~tpusim.limits.MAX_PROGRAM_OPS` ops once
  the loops are unrolled (tpusim refuses rather than summarising a loop: an unrolled loop is what
  lets its collectives overlap its compute);
* devices: a module compiled for N devices (``num_partitions`` x ``replica_count``) run on a slice
  of another size, and replica groups or permute pairs naming devices the program does not have;
* opcodes not in :data:`KNOWN_OPCODES` are simulated by their bytes alone and listed in a note
  (a newer XLA may add opcodes; refusing them would refuse a whole real program for one op).
"""

from __future__ import annotations

import math
import re
from collections import Counter

from tpusim.errors import TpusimError
from tpusim.compiler.hlo.parse import DTYPE_BYTES, Module, _callees, array_shapes, shape_str
from tpusim.compiler.hlo.analysis import _Analysis
from tpusim.limits import MAX_BYTES, MAX_PROGRAM_OPS

MAX_LOOP_DEPTH = 64

# XLA's opcodes (xla/hlo/ir/hlo_opcode.h), with the async forms spelled out.
KNOWN_OPCODES = frozenset("""
abs add add-dependency after-all all-gather all-gather-start all-gather-done all-reduce all-reduce-start
all-reduce-done all-to-all async-start async-update async-done atan2 batch-norm-grad batch-norm-inference
batch-norm-training bitcast bitcast-convert broadcast call cbrt ceil cholesky clamp clz collective-broadcast
collective-permute collective-permute-start collective-permute-done compare complex composite concatenate
conditional constant convert convolution copy copy-start copy-done cosine custom-call divide domain dot
dynamic-reshape dynamic-slice dynamic-update-slice erf exponential exponential-minus-one fft floor fusion
gather get-dimension-size set-dimension-size get-tuple-element imag infeed iota is-finite log log-plus-one
logistic and not or xor map maximum minimum multiply negate opt-barrier outfeed pad parameter partition-id
popcnt power real recv recv-done reduce reduce-precision reduce-scatter reduce-window remainder replica-id
reshape reverse rng rng-get-and-update-state rng-bit-generator round-nearest-afz round-nearest-even rsqrt
scatter select select-and-scatter send send-done shift-left shift-right-arithmetic shift-right-logical sign
sine slice slice-start slice-done dynamic-slice-start dynamic-slice-done dynamic-update-slice-start
dynamic-update-slice-done sort sqrt stochastic-convert subtract tan tanh top-k transpose triangular-solve tuple while
ragged-all-to-all ragged-dot
""".split())


def check_shapes(mod: Module, *, source: str) -> None:
    """Every array of every instruction (result and operands): no negative dimension, at most MAX_BYTES."""
    for ins in mod.by_name.values():
        for text in (ins.result_type, *ins.operands):
            for dtype, dims in array_shapes(text):
                if any(d < 0 for d in dims):
                    raise TpusimError(f"%{ins.name}: the shape {shape_str(dtype, dims)} has a negative dimension",
                                      source=source)
                if math.prod(dims) * DTYPE_BYTES[dtype] > MAX_BYTES:
                    raise TpusimError(f"%{ins.name}: the array {shape_str(dtype, dims)} is more than "
                                      f"{MAX_BYTES:.0e} bytes (1 PB), tpusim's limit for one array", source=source)


def check_calls(mod: Module, *, source: str) -> None:
    """Every computation an instruction calls is in the file."""
    for ins in mod.by_name.values():
        for callee in _callees(ins):
            if callee not in mod.computations:
                raise TpusimError(f"%{ins.name} calls %{callee}, which is not in the file (is it cut short?)",
                                  source=source)


def unrolled_ops(mod: Module, an: _Analysis, free: frozenset[str] | set[str], *, source: str) -> int:
    """Ops of the entry computation once every ``while`` is unrolled (trip count, or 1 if unknown);
    refuses recursive or too deeply nested loops, and programs over MAX_PROGRAM_OPS."""
    memo: dict[str, int] = {}

    def count(comp: str, stack: tuple[str, ...]) -> int:
        if comp in memo:
            return memo[comp]
        if len(stack) > MAX_LOOP_DEPTH:
            raise TpusimError(f"while loops nested more than {MAX_LOOP_DEPTH} deep (in %{comp})", source=source)
        n = 0
        for ins in mod.computations.get(comp, []):
            if ins.opcode == "while":
                body = ins.attrs.get("body", "").lstrip("%")
                if body in stack or body == comp:
                    raise TpusimError(f"%{ins.name} runs %{body}, which is already running: a loop cannot "
                                      "contain itself", source=source)
                trips = an.trip_count(ins)
                n += (1 if trips is None else trips) * count(body, stack + (comp,))
            elif ins.opcode not in free:
                n += 1
            if n > MAX_PROGRAM_OPS:
                loops = [f"%{w.name} x{an.trip_count(w):,}" for w in mod.computations.get(comp, [])
                         if w.opcode == "while" and an.trip_count(w)]
                raise TpusimError(f"the program unrolls to more than {MAX_PROGRAM_OPS:,} ops, tpusim's limit"
                                  + (f" (loops: {', '.join(loops[:3])})" if loops else ""), source=source)
        memo[comp] = n
        return n

    return count(mod.entry, ())


def module_devices(mod: Module, n_chips: int, cores_per_chip: int, topo_name: str, *, source: str) -> int:
    """The devices the program runs on: the header's ``num_partitions`` x ``replica_count`` when it
    gives them (refused unless the slice has that many chips, or cores), else the slice's chips."""
    declared = (mod.num_partitions or 1) * (mod.replica_count or 1)
    if declared == 1 and mod.num_partitions is None and mod.replica_count is None:
        return n_chips
    if declared in (n_chips, n_chips * cores_per_chip):
        return declared
    if declared == 1 and n_chips > 1:
        return n_chips  # a one-device module (e.g. an un-sharded jit) run on each chip alike
    chips = f"{n_chips} chip{'s' if n_chips > 1 else ''}"
    raise TpusimError(f"compiled for {declared} devices (num_partitions={mod.num_partitions or 1}, "
                      f"replica_count={mod.replica_count or 1}) but {topo_name} has {chips}; "
                      f"give a --topology with {declared} chips", source=source)


def check_devices(name: str, groups: list[list[int]], n_dev: int, *, source: str, what: str = "replica_groups"):
    """Refuse device ids the program does not have."""
    worst = max((d for g in groups for d in g), default=0)
    if worst >= n_dev or min((d for g in groups for d in g), default=0) < 0:
        raise TpusimError(f"%{name}: {what} name device {worst}, but the program runs on {n_dev} devices "
                          f"(0..{n_dev - 1})", source=source)


def permute_pairs(pairs: str | None) -> list[list[int]]:
    """``{{0,1},{1,2}}`` -> [[0, 1], [1, 2]]."""
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs or "")]


def unknown_opcodes(mod: Module) -> Counter:
    return Counter(i.opcode for i in mod.by_name.values() if i.opcode not in KNOWN_OPCODES)
