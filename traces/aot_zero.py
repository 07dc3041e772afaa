"""What libtpu compiles for DP and ZeRO-1 over a data axis (tpusim/compiler/zero.py's assumption).

A two-layer MLP (f32 parameters, bf16 compute), a batch over ``data`` (mesh data 8 on v5e:2x4), an
Adam-like update (two f32 moments), compiled ahead of time in three layouts:

* ``dp``: parameters and moments replicated over data (plain DP);
* ``zero1_replicated_params``: moments sharded over data, f32 parameters replicated (what
  ``shard_optimizer_over_data`` does to the optimizer state alone);
* ``zero1_compute_copy``: f32 master parameters and moments sharded over data, a bf16 compute copy
  replicated, differentiated, and rebuilt from the updated master (tpusim's ZeRO-1 model).

Prints, per collective, its kind, group size and operand bytes; ``--write`` saves them to
``traces/xla_aot_zero.json``.

    /work/venvs/jax/bin/python traces/aot_zero.py [--write]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import aot_cases  # noqa: E402

OUT = HERE / "xla_aot_zero.json"
CASES = ("dp", "zero1_replicated_params", "zero1_compute_copy")


def compile_case(case: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from aot_compile import get_topology

    topo = get_topology("v5e:2x4", "default")
    mesh = Mesh(np.array(topo.devices).reshape(8), ("data",))
    d, f, layers, batch, seq = 1024, 4096, 2, 16, 256
    rep = NamedSharding(mesh, P(None, None))
    shard = NamedSharding(mesh, P("data", None))
    bs = NamedSharding(mesh, P("data", None, None))
    n = 2 * layers
    x = jax.ShapeDtypeStruct((batch, seq, d), jnp.bfloat16, sharding=bs)

    loss = aot_cases.mlp_loss(layers)

    def adam(p, g, m, v):
        g = g.astype(jnp.float32)
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        return p - 1e-3 * m / (jnp.sqrt(v) + 1e-8), m, v

    def spec(sharding, dtype=jnp.float32):
        return [jax.ShapeDtypeStruct((d, f), dtype, sharding=sharding) for _ in range(n)]

    if case == "zero1_compute_copy":
        def step(copy, master, ms, vs, x):
            g = jax.grad(loss)(copy, x)
            out = [adam(p, gi, m, v) for p, gi, m, v in zip(master, g, ms, vs)]
            master = [o[0] for o in out]
            return [p.astype(jnp.bfloat16) for p in master], master, [o[1] for o in out], [o[2] for o in out]

        args = (spec(rep, jnp.bfloat16), spec(shard), spec(shard), spec(shard), x)
        ins = ([rep] * n, [shard] * n, [shard] * n, [shard] * n, bs)
        outs = ([rep] * n, [shard] * n, [shard] * n, [shard] * n)
    else:
        opt = rep if case == "dp" else shard

        def step(ws, ms, vs, x):
            g = jax.grad(loss)(ws, x)
            out = [adam(p, gi, m, v) for p, gi, m, v in zip(ws, g, ms, vs)]
            return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]

        args = (spec(rep), spec(opt), spec(opt), x)
        ins = ([rep] * n, [opt] * n, [opt] * n, bs)
        outs = ([rep] * n, [opt] * n, [opt] * n)
    text = jax.jit(step, in_shardings=ins, out_shardings=outs).lower(*args).compile().as_text()
    return aot_cases.collective_rows(text)


if __name__ == "__main__":
    aot_cases.main(__file__, compile_case, {c: c for c in CASES}, OUT)
