"""What the small libtpu structure scripts share (``aot_zero``, ``aot_int8``, ``aot_context``,
``aot_grad_accum``): each case compiled in a process of its own, the collectives of its HLO as rows,
the JSON printed and, with ``--write``, saved; and the two-layer MLP two of them compile.

A script calls :func:`main` with its ``compile_case`` and its cases (name -> the argument
``compile_case`` takes); ``script.py --case NAME`` is the child that compiles one case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def collective_rows(text: str, *, in_loop: bool = False, result: bool = False) -> list[dict]:
    """Per logical collective of an optimized HLO: kind, group size, executions, [whether it sits in a
    while loop], operand bytes [and result bytes]."""
    from hlo_collectives import extract_collectives  # (standard library only)

    rows = []
    for c in extract_collectives(text)["collectives"]:
        row = {"kind": c["kind"], "group_size": c.get("group_size"), "executed": c["executed"]}
        if in_loop:
            row["in_loop"] = bool(c.get("in_while"))
        row["operand_bytes"] = c["operand_bytes"]
        if result:
            row["result_bytes"] = c.get("result_bytes")
        rows.append(row)
    return rows


def mlp_loss(layers: int) -> Callable:
    """Mean square of a residual MLP stack (f32 weights cast to bf16, relu): the loss aot_zero and
    aot_grad_accum differentiate."""
    import jax
    import jax.numpy as jnp

    def loss(ws, x):
        h = x
        for i in range(layers):
            a = jnp.einsum("btd,df->btf", h, ws[2 * i].astype(jnp.bfloat16))
            h = h + jnp.einsum("btf,df->btd", jax.nn.relu(a), ws[2 * i + 1].astype(jnp.bfloat16))
        return jnp.mean(h.astype(jnp.float32) ** 2)

    return loss


def main(script: str, compile_case: Callable[[Any], Any], cases: dict[str, Any], out: Path,
         wrap: Callable[[dict], dict] = lambda results: results) -> None:
    """``--case NAME``: compile that case here and print its JSON. Otherwise compile every case, one
    process each (libtpu's ahead-of-time state; other compiles may hold its lockfile), print
    ``wrap(results)`` and with ``--write`` save it to ``out``."""
    if len(sys.argv) > 2 and sys.argv[1] == "--case":
        print(json.dumps(compile_case(cases[sys.argv[2]])))
        return
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    results = {}
    for name in cases:
        run = subprocess.run([sys.executable, script, "--case", name], capture_output=True, text=True, check=True,
                             env=env)
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    data = wrap(results)
    print(json.dumps(data, indent=1))
    if "--write" in sys.argv:
        out.write_text(json.dumps(data, indent=1) + "\n")
