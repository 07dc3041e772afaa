"""Compile a decode step and a prefill step ahead of time for a TPU slice, on this CPU (libtpu).

The serving counterpart of ``aot_compile.py``: a LLaMA-2-7B-shaped model (D=4096, 32 heads of 128,
32 kv heads, F=11008, V=32000; 2 layers so that the compile stays short) served with 8-way tensor
parallelism on v5e:2x4, bf16 weights and KV cache, the cache ``[L, B, S, K, H]`` split over kv heads
(MaxText's inference sharding: heads, MLP width and vocab over ``tensor``):

* ``decode``: ``B`` sequences, one new token each at a shared position, written into the cache in
  place and attending over all ``S`` positions (dense, masked past the position, as MaxText's
  ``dot_product`` autoregressive cache does); greedy sampling;
* ``prefill``: one prompt of ``T = S`` tokens written into an empty cache, causal attention, the last
  token sampled.

For each it writes ``xla_aot_serving/<case>/``: ``optimized_hlo.txt.gz``, ``config.yaml`` (a
``tpusim serve`` workload with the same model and mesh), ``summary.json`` (the step's batch, cache
length and new tokens; collectives, versions, compile time). tests/test_serving_aot.py
compares ``tpusim run --hlo`` of each with the serving step compiler's time for the same step.

Usage: ``/work/venvs/jax/bin/python traces/aot_serving.py [--case decode|prefill]`` (a few minutes).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hlo_collectives  # noqa: E402

TOPOLOGY, TP = "v5e:2x4", 8
D, N, K, H, F, V, L = 4096, 32, 32, 128, 11008, 32000, 2
CASES = {"decode": {"batch": 64, "cache": 2048, "tokens": 1}, "prefill": {"batch": 1, "cache": 2048, "tokens": 2048}}


def build(case: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    sys.path.insert(0, str(HERE))
    from aot_compile import get_topology

    topo = get_topology(TOPOLOGY, "default")
    mesh = Mesh(np.array(topo.devices).reshape(TP), ("tensor",))
    c = CASES[case]
    B, S, T = c["batch"], c["cache"], c["tokens"]
    bf = jnp.bfloat16

    def sds(shape, *spec, dtype=bf):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))

    layer = {"wq": sds((D, N, H), None, "tensor"), "wk": sds((D, K, H), None, "tensor"),
             "wv": sds((D, K, H), None, "tensor"), "wo": sds((N, H, D), "tensor"),
             "w_gate": sds((D, F), None, "tensor"), "w_up": sds((D, F), None, "tensor"),
             "w_down": sds((F, D), "tensor"), "attn_norm": sds((D,)), "mlp_norm": sds((D,))}
    params = {"embed": sds((V, D), "tensor"), "layers": [dict(layer) for _ in range(L)],
              "final_norm": sds((D,)), "unembed": sds((D, V), None, "tensor")}
    # One cache array per layer and per K/V, donated and updated in place (dynamic-update-slice at the
    # step's position, as MaxText's autoregressive cache does).
    kv = sds((B, S, K, H), None, None, "tensor")  # split over kv heads
    caches = [(kv, kv) for _ in range(L)]
    tokens = sds((B, T), dtype=jnp.int32)
    position = sds((), dtype=jnp.int32)

    def rms(x, s):
        xf = x.astype(jnp.float32)
        return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6)).astype(bf) * s

    def step(params, caches, tokens, position):
        x = jnp.take(params["embed"], tokens, axis=0)  # [B, T, D]
        new_caches = []
        for li, (p, (ck, cv)) in enumerate(zip(params["layers"], caches)):
            with jax.named_scope(f"layer_{li}"):
                h = rms(x, p["attn_norm"])
                q = jnp.einsum("btd,dnh->btnh", h, p["wq"])
                k = jnp.einsum("btd,dkh->btkh", h, p["wk"])
                v = jnp.einsum("btd,dkh->btkh", h, p["wv"])
                ck = jax.lax.dynamic_update_slice(ck, k, (0, position, 0, 0))
                cv = jax.lax.dynamic_update_slice(cv, v, (0, position, 0, 0))
                new_caches.append((ck, cv))
                q_pos = position + jnp.arange(T)
                mask = jnp.arange(S)[None, None, None, :] <= q_pos[None, None, :, None]
                s = jnp.einsum("btnh,bsnh->bnts", q, ck) * jnp.asarray(1 / math.sqrt(H), bf)
                s = jnp.where(mask, s, jnp.asarray(-1e9, bf))
                o = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), cv)
                x = x + jnp.einsum("btnh,nhd->btd", o, p["wo"])
                h = rms(x, p["mlp_norm"])
                g = jnp.einsum("btd,df->btf", h, p["w_gate"])
                u = jnp.einsum("btd,df->btf", h, p["w_up"])
                x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, p["w_down"])
        logits = jnp.einsum("bd,dv->bv", rms(x[:, -1], params["final_norm"]), params["unembed"])
        return jnp.argmax(logits, axis=-1), new_caches

    kv_out = NamedSharding(mesh, P(None, None, "tensor"))
    fn = jax.jit(step, out_shardings=(NamedSharding(mesh, P()), [(kv_out, kv_out)] * L), donate_argnums=(1,))
    return fn.lower(params, caches, tokens, position)


def config(case: str) -> dict:
    c = CASES[case]
    return {"name": f"aot_serving_{case}", "chip": TOPOLOGY.split(":")[0], "topology": TOPOLOGY,
            "model": {"base_emb_dim": D, "base_num_query_heads": N, "base_num_kv_heads": K, "head_dim": H,
                      "base_mlp_dim": F, "base_num_decoder_layers": L, "vocab_size": V},
            "inference": {"max_prefill_predict_length": c["tokens"] if c["tokens"] > 1 else c["cache"] // 2,
                          "max_target_length": 2 * c["cache"] if c["tokens"] > 1 else c["cache"],
                          "per_device_batch_size": max(1, c["batch"] // TP)},
            "sharding": {"ici_tensor_parallelism": TP}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    ap.add_argument("--out", type=Path, default=HERE / "xla_aot_serving")
    ns = ap.parse_args()
    import yaml

    for case in ns.case or sorted(CASES):
        out = ns.out / case
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        lowered = build(case)
        compiled = lowered.compile()
        text = compiled.as_text()
        with gzip.open(out / "optimized_hlo.txt.gz", "wt") as f:
            f.write(text)
        (out / "config.yaml").write_text(f"# Written by traces/aot_serving.py (case {case}).\n"
                                         + yaml.safe_dump(config(case), sort_keys=False))
        summary = {"case": case, "topology": TOPOLOGY, "step": CASES[case], "compile_wall_s": round(time.time() - t0, 1),
                   "versions": {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "libtpu")},
                   "collectives": hlo_collectives.counts_table(hlo_collectives.extract_collectives(text))}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(case, "compiled in", summary["compile_wall_s"], "s", file=sys.stderr)


if __name__ == "__main__":
    main()
