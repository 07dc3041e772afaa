"""Where does XLA put the cross-slice (DCN) gradient reduction of a scanned model? (libtpu AOT compile)

    /work/venvs/jax/bin/python traces/aot_multislice.py   # writes traces/xla_aot/multislice_scan_L4/

A MaxText-shaped step, small: 4 scanned layers (``lax.scan``, full remat) of an MLP block with f32
weights cast to bf16 (MaxText's ``weight_dtype: float32``, ``dtype: bfloat16``), FSDP over the 16
chips of each v5e 4x4 slice (weights sharded on the embed dim) and data parallelism over 2 slices
(``create_hybrid_device_mesh``, MaxText's ``dcn_data_parallelism: 2``), SGD. Compiled ahead of time
for 2 slices (``get_topology_desc(..., num_slices=2)``) with the LIBTPU flags of the MaxText v5e
16B multi-slice runs (tests/data/measured-dev.yaml). Output: ``optimized_hlo.txt.gz`` and
``summary.json``. What it shows (tests/test_engine.py reads it): the cross-slice all-reduce of each
layer's gradient shard is a pair of megascale host transfers (``send``/``recv`` with
``_xla_megascale_transfer_type="ALL_REDUCE"``) on bf16 shards, issued at the start of the next
backward iteration and waited for (``send-done``/``recv-done``) at its end; the last layer's after
the loop.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

FLAGS = ("--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true "
         "--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
         "--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true "
         "--xla_enable_async_all_gather=true")
D, F, L, B, T = 1024, 4096, 4, 64, 256
OUT = Path(__file__).resolve().parent / "xla_aot" / f"multislice_scan_L{L}"


def main() -> None:
    os.environ["LIBTPU_INIT_ARGS"] = FLAGS
    import jax
    import jax.numpy as jnp
    from jax.experimental import mesh_utils, topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:4x4", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=2)
    mesh = Mesh(mesh_utils.create_hybrid_device_mesh((1, 16), (2, 1), devices=list(topo.devices)), ("data", "fsdp"))
    params = {"w1": jax.ShapeDtypeStruct((L, D, F), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", None))),
              "w2": jax.ShapeDtypeStruct((L, F, D), jnp.float32, sharding=NamedSharding(mesh, P(None, None, "fsdp")))}
    x = jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"), None, None)))

    def loss(p, x):
        def layer(h, w):
            y = jax.nn.silu(h @ w["w1"].astype(jnp.bfloat16)) @ w["w2"].astype(jnp.bfloat16)
            return h + y, None
        h, _ = jax.lax.scan(jax.checkpoint(layer), x, p)
        return jnp.mean(h.astype(jnp.float32) ** 2)

    @jax.jit
    def step(p, x):
        return jax.tree.map(lambda a, g: a - 1e-3 * g, p, jax.grad(loss)(p, x))

    text = step.lower(params, x).compile().as_text()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "optimized_hlo.txt.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    (OUT / "summary.json").write_text(json.dumps({
        "topology": "v5e:4x4", "num_slices": 2, "mesh": {"data": 2, "fsdp": 16}, "layers": L, "D": D, "F": F,
        "batch": B, "seq": T, "libtpu_flags": FLAGS, "jax": jax.__version__}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
