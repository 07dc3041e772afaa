"""What libtpu compiles for an int8-quantized training step (tpusim/compiler/quant.py's assumption).

A two-layer MLP, f32 weights sharded on D over ``fsdp`` 8 (v5e:2x4), bf16 compute, trained in bf16
and with AQT-style int8 matmuls written out by hand (the jax venv has no AQT): a custom VJP whose
forward, dgrad and wgrad each quantize both operands with per-channel absmax scales to int8 and run
``dot_general(s8, s8) -> s32``, then rescale. Prints, per case, the matmuls by operand type (from the
optimized HLO: ``dot`` / ``convolution`` instructions) and the collectives (kind, group size, bytes);
``--write`` saves them to ``traces/xla_aot_int8.json``.

    /work/venvs/jax/bin/python traces/aot_int8.py [--write]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import aot_cases  # noqa: E402

OUT = HERE / "xla_aot_int8.json"
CASES = ("bf16", "int8")
_DOT = re.compile(r"=\s*([a-z]+\d+)\[.*?\s(?:dot|convolution)\(")


def compile_case(case: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from aot_compile import get_topology

    topo = get_topology("v5e:2x4", "default")
    mesh = Mesh(np.array(topo.devices).reshape(8), ("fsdp",))
    d, f, layers, batch, seq = 1024, 4096, 2, 16, 256
    ps = NamedSharding(mesh, P("fsdp", None))
    bs = NamedSharding(mesh, P("fsdp", None, None))
    params = [jax.ShapeDtypeStruct((d, f), jnp.float32, sharding=ps) for _ in range(2 * layers)]
    x = jax.ShapeDtypeStruct((batch, seq, d), jnp.bfloat16, sharding=bs)

    def q8(a, axis):
        scale = jnp.max(jnp.abs(a.astype(jnp.float32)), axis=axis, keepdims=True) / 127.0 + 1e-12
        return jnp.round(a.astype(jnp.float32) / scale).astype(jnp.int8), scale

    def mm8(a, b):
        """a (m, k) x b (k, n), both quantized along k, int32 accumulation, rescaled to bf16."""
        qa, sa = q8(a, 1)
        qb, sb = q8(b, 0)
        acc = jax.lax.dot_general(qa, qb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        return (acc.astype(jnp.float32) * sa * sb).astype(jnp.bfloat16)

    @jax.custom_vjp
    def dense8(h, w):
        return mm8(h, w)

    def fwd(h, w):
        return mm8(h, w), (h, w)

    shards = 8

    def wgrad8(h, g):
        """h^T g with the contraction (tokens, sharded over fsdp) quantized per local shard, as AQT's
        LocalAqt does with quantization_local_shard_count = the shard count: per-shard int32 dots,
        rescaled, summed over the shards."""
        hs = h.reshape(shards, -1, h.shape[-1])
        gs = g.reshape(shards, -1, g.shape[-1])
        qh, sh_ = q8(hs, 1)
        qg, sg = q8(gs, 1)
        acc = jax.lax.dot_general(qh, qg, (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.int32)
        return jnp.sum(acc.astype(jnp.float32) * jnp.swapaxes(sh_, 1, 2) * sg, axis=0)

    def bwd(res, g):
        h, w = res
        return mm8(g, w.T), wgrad8(h, g).astype(w.dtype)  # dgrad, wgrad: int8 too (AQT dlhs, drhs)

    dense8.defvjp(fwd, bwd)

    def dense(h, w):
        h2 = h.reshape(-1, h.shape[-1])
        out = dense8(h2, w.astype(jnp.bfloat16)) if case == "int8" else h2 @ w.astype(jnp.bfloat16)
        return out.reshape(*h.shape[:-1], -1)

    def loss(ws, x):
        h = x
        for i in range(layers):
            h = h + dense(jax.nn.relu(dense(h, ws[2 * i])), ws[2 * i + 1].T)
        return jnp.mean(h.astype(jnp.float32) ** 2)

    def step(ws, x):
        g = jax.grad(loss)(ws, x)
        return [w - 1e-3 * gi for w, gi in zip(ws, g)]

    text = jax.jit(step, in_shardings=([ps] * (2 * layers), bs),
                   out_shardings=[ps] * (2 * layers)).lower(params, x).compile().as_text()
    dots: dict[str, int] = {}
    for line in text.splitlines():
        m = _DOT.search(line)
        if m:
            types = re.findall(r"\b([a-z]+\d+)\[", line[m.end(1):])
            key = f"{'x'.join(types[:2])}->{m.group(1)}"
            dots[key] = dots.get(key, 0) + 1
    return {"matmuls": dots, "collectives": aot_cases.collective_rows(text)}


if __name__ == "__main__":
    aot_cases.main(__file__, compile_case, {c: c for c in CASES}, OUT)
