"""The collective-permutes of a MaxText-like pipelined step, as libtpu compiles them (issue 15).

MaxText's pipeline (``layers/pipeline.py``): the stage weights stacked on a leading axis sharded over
the ``stage`` mesh axis; a loop state of one microbatch per stage (also sharded over ``stage``); each
iteration every stage runs its layer on its slot (a vmap over the stage axis), then the state shifts
by one stage (``jnp.roll`` on the stage axis: a collective-permute) and stage 0 takes the next
microbatch. ``m + p - 1`` iterations; the backward is the loop's transpose. Here: p = 4 stages x
data 2 on v5e:2x4, m = 8 microbatches of 4 sequences x 256 tokens, D = 1024, one MLP layer per stage.

Prints, per collective, its kind, group size, how often it runs, whether it sits in a loop and its
operand bytes; ``--write`` saves that to ``traces/xla_aot_pipeline.json``.

    /work/venvs/jax/bin/python traces/aot_pipeline.py [--write]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "xla_aot_pipeline.json"
P_STAGES, DATA, M, MB, SEQ, D, F = 4, 2, 8, 4, 256, 1024, 4096


def compile_case() -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    sys.path.insert(0, str(HERE))
    from aot_compile import get_topology
    from hlo_collectives import extract_collectives

    topo = get_topology("v5e:2x4", "default")
    mesh = Mesh(np.array(topo.devices).reshape(P_STAGES, DATA), ("stage", "data"))
    ws = NamedSharding(mesh, P("stage", None, None))
    state_s = NamedSharding(mesh, P("stage", "data", None, None))
    xs_s = NamedSharding(mesh, P(None, "data", None, None))
    w_in = jax.ShapeDtypeStruct((P_STAGES, D, F), jnp.bfloat16, sharding=ws)
    w_out = jax.ShapeDtypeStruct((P_STAGES, F, D), jnp.bfloat16, sharding=ws)
    x = jax.ShapeDtypeStruct((M, MB * DATA, SEQ, D), jnp.bfloat16, sharding=xs_s)

    def layer(wi, wo, h):
        return h + jnp.einsum("bsf,fd->bsd", jax.nn.relu(jnp.einsum("bsd,df->bsf", h, wi)), wo)

    def loss(params, xs):
        wi, wo = params
        state = jnp.zeros((P_STAGES, MB * DATA, SEQ, D), jnp.bfloat16)
        state = jax.lax.with_sharding_constraint(state, state_s)
        outs = []
        for t in range(M + P_STAGES - 1):  # unrolled, as MaxText's scan of iterations after XLA's unrolling
            if t < M:
                state = state.at[0].set(xs[t])
            state = jax.vmap(layer)(wi, wo, state)
            state = jax.lax.with_sharding_constraint(state, state_s)
            if t >= P_STAGES - 1:
                outs.append(state[-1])
            state = jnp.roll(state, 1, axis=0)  # the shift to the next stage: a collective-permute
            state = jax.lax.with_sharding_constraint(state, state_s)
        y = jnp.stack(outs)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    def step(params, xs):
        g = jax.grad(loss)(params, xs)
        return jax.tree.map(lambda a, b: a - 1e-3 * b, params, g)

    text = jax.jit(step, in_shardings=((ws, ws), xs_s), out_shardings=(ws, ws)).lower((w_in, w_out), x) \
        .compile().as_text()
    if "--dump" in sys.argv:
        Path(sys.argv[-1]).write_text(text)
    collectives = [{"kind": c["kind"], "group_size": c.get("group_size"), "executed": c["executed"],
                    "in_loop": bool(c.get("in_while")), "operand_bytes": c["operand_bytes"]}
                   for c in extract_collectives(text)["collectives"]]
    stage_of = {d.id: i // DATA for i, d in enumerate(np.array(topo.devices).reshape(-1))}
    return {"collectives": collectives, "permutes": permutes(text, stage_of)}


def permutes(text: str, stage_of: dict[int, int]) -> list[dict]:
    """Each collective-permute: its shift in stages (+1: to the next stage; -1: back), how many device
    pairs move (8: every device; 2: only the wrap-around stage), its bytes per device, and what JAX op
    it came from (``roll``: the pipeline's shift; else the microbatches' entry and exit)."""
    import re

    out = []
    for line in text.splitlines():
        if not re.search(r"= \(?\S*\)? ?collective-permute(-start)?\(|collective-permute(-start)?\(", line) \
                or "collective-permute-done" in line.split("=", 1)[-1][:40]:
            continue
        pairs = re.search(r"source_target_pairs=\{(\{[0-9,{}]*\})\}", line)
        shape = re.search(r"bf16\[([0-9,]+)\]", line)
        if not pairs or not shape:
            continue
        pp = [tuple(map(int, p.split(","))) for p in re.findall(r"\{(\d+,\d+)\}", pairs.group(1))]
        shifts = {(stage_of[b] - stage_of[a]) % P_STAGES for a, b in pp}
        shift = shifts.pop() if len(shifts) == 1 else None
        if shift is not None and shift > P_STAGES // 2:
            shift -= P_STAGES
        op = re.search(r'op_name="([^"]*)"', line)
        name = op.group(1) if op else ""
        out.append({"shift": shift, "pairs": len(pp), "bytes": 2 * __import__("math").prod(map(int, shape.group(1).split(","))),
                    "op": "roll" if "_roll_static" in name else name.split("/")[-1],
                    "backward": "transpose(" in name})
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        print(json.dumps(compile_case()))
        return
    run = subprocess.run([sys.executable, __file__, "--case"], capture_output=True, text=True, check=True)
    out = {"stages": P_STAGES, "data": DATA, "microbatches": M, "microbatch_sequences": MB * DATA, "seq": SEQ,
           "d_model": D, "d_ff": F, **json.loads(run.stdout.strip().splitlines()[-1])}
    print(json.dumps(out, indent=1))
    if "--write" in sys.argv:
        OUT.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
