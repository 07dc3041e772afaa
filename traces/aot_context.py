"""What libtpu compiles for context parallelism with all-gathered K and V (tpusim/compiler/context.py).

MaxText's default ``context_parallel_strategy: all_gather``: the sequence is split over a ``context``
mesh axis; each device projects its chunk's Q, K and V, K and V are all-gathered over the axis before
attention (each query chunk attends to the whole, causally masked), and the backward returns dK and
dV to their chunks. The attention is written as MaxText's flash path runs it, inside ``shard_map``
with an explicit ``all_gather`` of K and V (dense attention inside, so that no Pallas kernel is
needed). Written instead with sharding constraints only (GSPMD), XLA gathers the layer's input and
recomputes K and V on every device (16 MiB per layer here whatever the kv heads): not MaxText's path. A two-layer attention block (D=1024, 8 query heads of 128; 8 kv heads (``mha``) or
2 (``gqa``); causal dense attention, bf16), batch 2 x 4096 tokens, context 8 on v5e:2x4, weights
replicated, one SGD-like step:

    /work/venvs/jax/bin/python traces/aot_context.py [--write]

prints each collective (kind, group size, operand bytes, executions) and with ``--write`` saves them
to ``traces/xla_aot_context.json``; ``tests/test_context.py`` compares them with tpusim's program of
the same layer.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import aot_cases  # noqa: E402

OUT = HERE / "xla_aot_context.json"
D, N, H, LAYERS, BATCH, T, CONTEXT = 1024, 8, 128, 2, 2, 4096, 8
CASES = {"mha": 8, "gqa": 2}  # kv heads: 8 (K and V as wide as the input) or 2 (a quarter as wide)


def compile_case(kv: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.shard_map import shard_map
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from aot_compile import get_topology

    topo = get_topology("v5e:2x4", "default")
    mesh = Mesh(np.array(topo.devices).reshape(CONTEXT), ("context",))
    rep = NamedSharding(mesh, P())
    seq = NamedSharding(mesh, P(None, "context", None))
    bf = jnp.bfloat16

    def constrain(x, *spec):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

    def attend(q, k, v):
        """Per device, as MaxText's flash path wraps its kernel in shard_map: the local query chunk
        against K and V all-gathered over the context axis, causally masked by global position."""
        k = jax.lax.all_gather(k, "context", axis=1, tiled=True)
        v = jax.lax.all_gather(v, "context", axis=1, tiled=True)
        t_local = q.shape[1]
        q = q.reshape(q.shape[0], t_local, kv, N // kv, H)
        s = jnp.einsum("btkgh,bskh->bkgts", q, k) * jnp.asarray(1 / math.sqrt(H), bf)
        pos = jax.lax.axis_index("context") * t_local + jnp.arange(t_local)
        mask = jnp.arange(T)[None, :] <= pos[:, None]
        s = jnp.where(mask, s, jnp.asarray(-1e9, bf))
        o = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(s, axis=-1), v)
        return o.reshape(o.shape[0], t_local, N, H)

    chunk = P(None, "context", None, None)
    attend = shard_map(attend, mesh=mesh, in_specs=(chunk, chunk, chunk), out_specs=chunk)

    def layer(x, w):
        q = jnp.einsum("btd,dnh->btnh", x, w["q"])
        k = jnp.einsum("btd,dkh->btkh", x, w["k"])
        v = jnp.einsum("btd,dkh->btkh", x, w["v"])
        o = attend(q, k, v)
        return constrain(x + jnp.einsum("btnh,nhd->btd", o, w["o"]), None, "context", None)

    def loss(ws, x):
        for w in ws:
            x = layer(x, w)
        return jnp.mean(x.astype(jnp.float32) ** 2)

    def step(ws, x):
        g = jax.grad(loss)(ws, x)
        return jax.tree_util.tree_map(lambda p, gi: p - jnp.asarray(1e-3, bf) * gi, ws, g)

    wshape = {"q": (D, N, H), "k": (D, kv, H), "v": (D, kv, H), "o": (N, H, D)}
    ws = [{k: jax.ShapeDtypeStruct(s, bf, sharding=rep) for k, s in wshape.items()} for _ in range(LAYERS)]
    x = jax.ShapeDtypeStruct((BATCH, T, D), bf, sharding=seq)
    text = jax.jit(step, out_shardings=[{k: rep for k in wshape}] * LAYERS).lower(ws, x).compile().as_text()
    return aot_cases.collective_rows(text, result=True)


if __name__ == "__main__":
    model = {"d_model": D, "heads": N, "head_dim": H, "layers": LAYERS, "batch": BATCH, "seq": T,
             "context": CONTEXT, "topology": "v5e:2x4", "kv_heads": CASES}
    aot_cases.main(__file__, compile_case, CASES, OUT, wrap=lambda cases: {"model": model, "cases": cases})
