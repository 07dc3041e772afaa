"""Where libtpu puts the collectives of gradient accumulation (MaxText's gradient_accumulation_steps).

A two-layer MLP with f32 parameters sharded on D over ``fsdp``, a batch over ``data`` x ``fsdp``
(mesh data 2 x fsdp 4 on v5e:2x4), compiled ahead of time with and without a ``lax.scan`` over k
microbatches that adds each microbatch's gradient into ``zeros_like(params)`` (as MaxText's
gradient accumulation does). Prints, per collective, its kind, group size, how often it runs and
whether it sits in the microbatch loop; ``--write`` saves that to ``traces/xla_aot_grad_accum.json``.

    /work/venvs/jax/bin/python traces/aot_grad_accum.py [--write]

Found (jax 0.10.2, libtpu 0.0.42.1): with k = 4 the weight all-gathers and the gradient
reduce-scatters over fsdp (bf16) run inside the loop, 4 times each; the all-reduce over data runs
once, after the loop, on the f32 accumulator (twice the bf16 gradient's bytes). Without
accumulation XLA fuses the data reduction into the reduce-scatter.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import aot_cases  # noqa: E402

OUT = HERE / "xla_aot_grad_accum.json"


def compile_case(k: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from aot_compile import get_topology

    topo = get_topology("v5e:2x4", "default")
    mesh = Mesh(np.array(topo.devices).reshape(2, 4), ("data", "fsdp"))
    d, f, layers, batch, seq = 1024, 4096, 2, 16, 256
    ps = NamedSharding(mesh, P("fsdp", None))
    bs = NamedSharding(mesh, P(("data", "fsdp"), None, None))
    params = [jax.ShapeDtypeStruct((d, f), jnp.float32, sharding=ps) for _ in range(2 * layers)]
    x = jax.ShapeDtypeStruct((batch, seq, d), jnp.bfloat16, sharding=bs)

    loss = aot_cases.mlp_loss(layers)

    def step(ws, x):
        if k == 1:
            g = jax.grad(loss)(ws, x)
        else:
            xs = jax.lax.with_sharding_constraint(
                x.reshape(k, batch // k, seq, d), NamedSharding(mesh, P(None, ("data", "fsdp"), None, None)))

            def body(acc, xm):
                return jax.tree.map(lambda a, b: a + b, acc, jax.grad(loss)(ws, xm)), None
            g, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, ws), xs)
        return [w - 1e-3 * gi for w, gi in zip(ws, g)]

    text = jax.jit(step, in_shardings=([ps] * (2 * layers), bs),
                   out_shardings=[ps] * (2 * layers)).lower(params, x).compile().as_text()
    return aot_cases.collective_rows(text, in_loop=True)


if __name__ == "__main__":
    aot_cases.main(__file__, compile_case, {"k1": 1, "k4": 4}, OUT)
