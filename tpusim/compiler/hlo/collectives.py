"""Extract every collective from XLA's optimized HLO text (``compiled.as_text()``).

Used by ``aot_compile.py`` (TPU, ahead of time) and ``capture_cpu.py`` (CPU devices) to write the
collective part of their ``summary.json``.  Standard library only, so it also runs from a plain
interpreter:  ``python3 traces/hlo_collectives.py optimized_hlo.txt[.gz] [--json]`` (or
``python -m tpusim.compiler.hlo.collectives``).

One entry of ``collectives`` is one *logical* collective, however XLA spelled it:

* ``sync``: a plain ``all-gather`` / ``reduce-scatter`` / ``all-reduce`` / ``all-to-all`` /
  ``collective-permute`` (/ ``collective-broadcast`` / ``ragged-all-to-all``) instruction;
* ``async_start_done``: a ``<kind>-start`` / ``<kind>-done`` pair (or a generic ``async-start`` /
  ``async-done`` wrapping one), counted once; the result shape comes from the done;
* ``async_collective_fusion`` (XLA TPU): the collective is cloned into a fusion whose root is a
  ``custom-call`` ``AsyncCollectiveStart``, zero or more "continuation" fusions that run a slice of
  it next to compute, and a fusion whose root is ``AsyncCollectiveDone``; all clones share one
  ``channel_id`` (and, in newer XLA, one ``chain_id`` frontend attribute), which is how they are
  grouped (``members`` lists them);
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
import re
import sys
from collections import Counter
from typing import Any

from tpusim.compiler.hlo.analysis import _Analysis
from tpusim.compiler.hlo.parse import (COLLECTIVE_KINDS, Instr, _callees, _op_name, _operand_name,
                                       _replica_group_sizes, array_bytes, array_shapes, parse_module, shape_str)

def _base_kind(opcode: str) -> tuple[str | None, str]:
    """``(kind, form)`` with form ``sync`` / ``start`` / ``done`` / ``update``."""
    for suffix in ("-start", "-done", "-update"):
        if opcode.endswith(suffix):
            base = opcode[: -len(suffix)]
            return (base if base in COLLECTIVE_KINDS else None), suffix[1:]
    return (opcode, "sync") if opcode in COLLECTIVE_KINDS else (None, "sync")


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
    groups: dict[tuple[str, str, str], list[tuple[Instr, str, list[Instr]]]] = {}
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
            # Newer XLA gives every async collective fusion of a computation the same channel_id and
            # tells the chains apart by a frontend attribute: clones share both.
            chain_id = re.search(r'chain_id="([^"]*)"', ins.attrs.get("frontend_attributes", ""))
            # A plain or start/done collective is one instruction (jax may give all of them channel_id 1).
            grouped = role.startswith("fusion_") or role == "all_reduce_scatter"
            key = (kind, (ins.attrs.get("channel_id") or ins.name) if grouped else ins.name,
                   chain_id.group(1) if chain_id else "")
            groups.setdefault(key, []).append((ins, role, chain))

    records: list[dict[str, Any]] = []
    for (kind, _, _), members in groups.items():
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
    """``python -m tpusim.compiler.hlo.collectives optimized_hlo.txt[.gz] [--json]``: the collectives table."""
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
