"""Does XLA hide tensor-parallel communication with the MaxText v5p run's flags? (libtpu AOT compile)

    /work/venvs/jax/bin/python traces/aot_tp_flags.py   # writes traces/xla_aot/fsdp_tp_v5pflags_big_L2/

The model of traces/model.py at a larger size (D=4096, 32 heads of 128, F=16384, T=2048, 2 layers,
2 sequences per fsdp shard: 32 MB per tensor-parallel activation collective), FSDP 4 x tensor 4 on a
v5e 4x4, compiled with the LIBTPU flags of the MaxText v5p 32B run (tests/data/measured-dev.yaml
``maxtext-v5p-32b-1xv5p-128``). Writes ``optimized_hlo.txt.gz`` and ``summary.json`` (the collectives
by kind, implementation and asynchrony). What it shows: the tensor-parallel activation all-reduces
stay synchronous (no collective matmul); the FSDP collectives are asynchronous. Takes about 10 min
on 2 busy cores.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = ("--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_megacore_fusion_allow_ags=false "
         "--xla_enable_async_collective_permute=true --xla_tpu_enable_ag_backward_pipelining=true "
         "--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true "
         "--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true "
         "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true")
OUT = HERE / "xla_aot" / "fsdp_tp_v5pflags_big_L2"


def summarize(text: str) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from tpusim.compiler.hlo.collectives import extract_collectives

    cols = extract_collectives(text)["collectives"]
    counts = collections.Counter(f"{c['kind']} {c['implementation']} async={c['async']}" for c in cols)
    tp = [c for c in cols if c["kind"] == "all-reduce" and c["operand_shapes"] == ["bf16[2,2048,4096]"]]
    return {"flags": FLAGS, "collectives": dict(sorted(counts.items())),
            "tensor_parallel_activation_all_reduces": len(tp),
            "of_which_async": sum(1 for c in tp if c["async"]),
            "windowed_einsum_loops": len(extract_collectives(text)["windowed_einsum_loops"])}


def main() -> None:
    os.environ["LIBTPU_INIT_ARGS"] = FLAGS
    sys.path.insert(0, str(HERE))
    import aot_compile
    import model

    cfg = model.ModelConfig(num_layers=2, emb_dim=4096, num_query_heads=32, num_kv_heads=32, head_dim=128,
                            mlp_dim=16384, seq_len=2048, batch_per_fsdp_shard=2)
    mesh = aot_compile.make_mesh(list(aot_compile.get_topology("v5e:4x4", "default").devices), 4, 4)
    step = model.jit_train_step(cfg, mesh)
    text = step.lower(model.abstract_params(cfg, mesh), *model.abstract_batch(cfg, mesh)).compile().as_text()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "optimized_hlo.txt.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    (OUT / "summary.json").write_text(json.dumps(summarize(text), indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
