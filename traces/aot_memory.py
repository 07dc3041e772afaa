"""Peak HBM as XLA allocates it: a MaxText-like train step compiled ahead of time for TPU slices.

What tpusim's memory model (``tpusim/compiler/memory.py``) is tested against. Each case is a
LLaMA-style decoder as MaxText builds it: layers under ``lax.scan`` (``scan_layers: true``) with a
``jax.checkpoint`` remat policy named as MaxText names it, splash (flash) attention from Pallas inside
``shard_map``, weights sharded ``embed -> fsdp`` and ``heads/mlp/vocab -> tensor``, activations
``[batch -> fsdp, length, embed -> tensor]``, logits cast to float32 for the loss, and AdamW in plain
JAX (optax's update: two moments in the weights' dtype, global-norm gradient clipping), the whole
state donated. libtpu compiles it for the slice with no TPU attached; ``compiled.memory_analysis()``
gives XLA's buffer assignment: argument, output, alias, temp, host (offloaded) and peak bytes.

Writes ``xla_aot_memory/<case>.json``: the case in MaxText key names (tpusim reads it as a workload),
``memory_analysis``, the largest buffers of XLA's memory-usage report, versions and compile time; cases
with ``save_hlo`` (MaxText v4 22B, v5p 32B and v5e 16B at full size on their slices, each compiled with its
run's LIBTPU flags) also
``<case>.hlo.txt.gz``, XLA's optimized HLO, for ``tpusim run --hlo`` (see docs/VALIDATION.md); so do the v6e
tpu-recipes Llama-3.1 8B and 70B runs at full size (GQA, rope, the recipes' custom offload; compiled with the
MaxText v5p run's flags, the 8B also with collective matmul off).

    /work/venvs/jax/bin/python traces/aot_memory.py                  # every case (7-25 min each on 2 busy cores)
    /work/venvs/jax/bin/python traces/aot_memory.py --case v5e_1b_full --out /tmp/x
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Model dims: LLaMA-style, gated SiLU MLP; multi-head attention (K = N, as the MaxText v4/v5e/v5p configs)
# unless ``base_num_kv_heads`` says otherwise (grouped-query attention, as Llama-3).
DIMS = {
    "1b": {"base_emb_dim": 2048, "base_num_query_heads": 16, "head_dim": 128, "base_mlp_dim": 8192,
           "vocab_size": 32000},
    "4b": {"base_emb_dim": 4096, "base_num_query_heads": 32, "head_dim": 128, "base_mlp_dim": 14336,
           "vocab_size": 32000},
    # MaxText's v4 22b.sh (tests/data/measured-dev.yaml maxtext-v4-22b-1xv4-128): 24 heads of 128 < D.
    "22b": {"base_emb_dim": 6144, "base_num_query_heads": 24, "head_dim": 128, "base_mlp_dim": 24576,
            "vocab_size": 32000},
    # MaxText's global_parameter_scale 16 and 32 (v5e 16b.sh, v5p 32b.sh; measured-dev.yaml): 64 heads of 128.
    "16b": {"base_emb_dim": 4096, "base_num_query_heads": 64, "head_dim": 128, "base_mlp_dim": 28672,
            "vocab_size": 32000},
    "32b": {"base_emb_dim": 8192, "base_num_query_heads": 64, "head_dim": 128, "base_mlp_dim": 28672,
            "vocab_size": 32000},
    # MaxText's models/llama3-8b.yml and llama3-70b.yml (Llama-3.1 has the same dims): GQA, 8 KV heads, rope.
    "llama3_8b": {"base_emb_dim": 4096, "base_num_query_heads": 32, "base_num_kv_heads": 8, "head_dim": 128,
                  "base_mlp_dim": 14336, "vocab_size": 128256, "rope_max_timescale": 500_000},
    "llama3_70b": {"base_emb_dim": 8192, "base_num_query_heads": 64, "base_num_kv_heads": 8, "head_dim": 128,
                   "base_mlp_dim": 28672, "vocab_size": 128256, "rope_max_timescale": 500_000},
}
# The v4 22B run's LIBTPU flags (measured-dev.yaml maxtext-v4-22b-1xv4-128 "other"; its
# TPU_MEGACORE=MEGACORE_DENSE is the "megacore" chip config: one device per v4 chip).
V4_22B_FLAGS = "--xla_enable_async_all_gather=true"
# The v5p 32B and v5e 16B runs' LIBTPU flags, copied from measured-dev.yaml (maxtext-v5p-32b-1xv5p-128,
# maxtext-v5e-16b-1xv5e-256 "other"), in the order listed there.
V5P_32B_FLAGS = ("--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_megacore_fusion_allow_ags=false "
                 "--xla_enable_async_collective_permute=true --xla_tpu_enable_ag_backward_pipelining=true "
                 "--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true "
                 "--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true "
                 "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true")
V5E_16B_FLAGS = ("--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true "
                 "--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
                 "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
                 "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true")
# The v6e recipes' LIBTPU flags are named only as MaxText benchmarks/xla_flags_library groups (measured-dev.yaml
# "other": DENSE_VMEM_LIMIT, CF_FOR_ALL_GATHER, DATA_PARALLEL_OVERLAP, HOST_OFFLOAD ...), which we do not have;
# their cases compile with the MaxText v5p 32B run's flags (traces/aot_tp_flags.py: async collective fusion,
# data-parallel all-reduce overlap, async all-gather/permute), the nearest flag set we have.
V5P_RUN_FLAGS = V5P_32B_FLAGS
# MaxText's switch for collective matmul off (xla_flags_library DISABLE_COLLECTIVE_MATMUL, quoted from memory:
# the file is not in the reference material): windowed einsum only above a 1 TB threshold.
NO_COLLECTIVE_MATMUL = "--xla_jf_spmd_threshold_for_windowed_einsum_mib=1000000"
# v4 runs as one device per chip (megacore, as the published run); the other cases compiled with "default".
CHIP_CONFIG = {"v4": "megacore", "v5e": "default", "v5p": "default", "v6e": "default"}
# case -> topology, dims, layers, per-device batch, mesh, remat policy, weight dtype.
_C = dict
CASES: dict[str, dict[str, Any]] = {
    "v5e_1b_full": _C(topology="v5e:4x4", dims="1b", layers=16, pdbs=4, fsdp=16, tensor=1, remat="full"),
    "v5e_1b_full_b8": _C(topology="v5e:4x4", dims="1b", layers=16, pdbs=8, fsdp=16, tensor=1, remat="full"),
    "v5e_1b_none": _C(topology="v5e:4x4", dims="1b", layers=8, pdbs=2, fsdp=16, tensor=1, remat="none"),
    "v5e_1b_minimal": _C(topology="v5e:4x4", dims="1b", layers=16, pdbs=2, fsdp=16, tensor=1, remat="minimal"),
    "v5e_1b_qkv": _C(topology="v5e:4x4", dims="1b", layers=16, pdbs=4, fsdp=16, tensor=1, remat="save_qkv_proj"),
    "v5e_1b_minimal_offloaded": _C(topology="v5e:4x4", dims="1b", layers=16, pdbs=4, fsdp=16, tensor=1,
                                   remat="minimal_offloaded"),
    "v5e_1b_tp4_minimal": _C(topology="v5e:4x4", dims="1b", layers=16, pdbs=4, fsdp=4, tensor=4, remat="minimal"),
    "v5e_1b_tp2_full_bf16": _C(topology="v5e:4x4", dims="1b", layers=16, pdbs=4, fsdp=8, tensor=2, remat="full",
                               weight_dtype="bfloat16"),
    "v5p_4b_full": _C(topology="v5p:2x2x4", dims="4b", layers=16, pdbs=4, fsdp=16, tensor=1, remat="full"),
    "v5p_4b_tp4_minimal": _C(topology="v5p:2x2x4", dims="4b", layers=16, pdbs=4, fsdp=4, tensor=4, remat="minimal"),
    "v5p_4b_qkv_offloaded": _C(topology="v5p:2x2x4", dims="4b", layers=16, pdbs=8, fsdp=16, tensor=1,
                               remat="qkv_proj_offloaded"),
    "v5p_4b_minimal": _C(topology="v5p:2x2x4", dims="4b", layers=16, pdbs=4, fsdp=16, tensor=1, remat="minimal"),
    "v5e_1b_tp2_minimal": _C(topology="v5e:4x4", dims="1b", layers=16, pdbs=4, fsdp=8, tensor=2, remat="minimal"),
    "v5p_4b_dot_except_mlp": _C(topology="v5p:2x2x4", dims="4b", layers=16, pdbs=2, fsdp=16, tensor=1,
                                remat="save_dot_except_mlp"),
    "v6e_4b_custom": _C(topology="v6e:4x4", dims="4b", layers=16, pdbs=2, fsdp=16, tensor=1, remat="custom",
                        weight_dtype="bfloat16"),
    "v6e_4b_full": _C(topology="v6e:4x4", dims="4b", layers=16, pdbs=2, fsdp=16, tensor=1, remat="full"),
    "v6e_1b_tp2_minimal": _C(topology="v6e:4x4", dims="1b", layers=16, pdbs=4, fsdp=8, tensor=2, remat="minimal"),
    # The published v4 22B run at full size (workloads/measured/maxtext_v4_22b.yaml; num_vocab_tiling 8 not
    # built: the loss is untiled), with its LIBTPU flag; and the same step at 4 sequences, where HBM is not tight.
    "v4_22b_full": _C(topology="v4:4x4x4", dims="22b", layers=48, pdbs=13, fsdp=64, tensor=1, remat="full",
                      libtpu_flags=V4_22B_FLAGS, save_hlo=True),
    "v4_22b_full_b4": _C(topology="v4:4x4x4", dims="22b", layers=48, pdbs=4, fsdp=64, tensor=1, remat="full",
                         libtpu_flags=V4_22B_FLAGS, save_hlo=True),
    # The published v5p 32B run at full size (workloads/measured/maxtext_v5p_32b.yaml: tensor 4 x fsdp 16,
    # remat minimal) with its LIBTPU flags; and the v5e 16B run (fsdp 256, remat full) with its own.
    "v5p_32b_full": _C(topology="v5p:4x4x4", dims="32b", layers=32, pdbs=6, fsdp=16, tensor=4, remat="minimal",
                       libtpu_flags=V5P_32B_FLAGS, save_hlo=True),
    "v5e_16b_full": _C(topology="v5e:16x16", dims="16b", layers=32, pdbs=6, fsdp=256, tensor=1, remat="full",
                       libtpu_flags=V5E_16B_FLAGS, save_hlo=True),
    # The two tpu-recipes v6e Llama-3.1 runs at full size (workloads/measured/recipes_v6e{8,64}_llama31_*.yaml):
    # 8192 tokens per sequence, bf16 weights, the recipes' custom offloading remat.
    "v6e8_llama31_8b": _C(topology="v6e:2x4", dims="llama3_8b", layers=32, pdbs=3, fsdp=8, tensor=1, seq=8192,
                          remat="custom", weight_dtype="bfloat16", libtpu_flags=V5P_RUN_FLAGS, save_hlo=True),
    # The 8B recipe is MaxText's "llama3_1_8b_8192_no_collective_matmul" (measured-dev.yaml note): the same step
    # with windowed einsum (collective matmul) turned off by the XLA flag MaxText uses for that.
    "v6e8_llama31_8b_no_cm": _C(topology="v6e:2x4", dims="llama3_8b", layers=32, pdbs=3, fsdp=8, tensor=1, seq=8192,
                                remat="custom", weight_dtype="bfloat16", save_hlo=True,
                                libtpu_flags=V5P_RUN_FLAGS + " " + NO_COLLECTIVE_MATMUL),
    "v6e64_llama31_70b": _C(topology="v6e:8x8", dims="llama3_70b", layers=80, pdbs=2, fsdp=64, tensor=1, seq=8192,
                            remat="custom", weight_dtype="bfloat16", libtpu_flags=V5P_RUN_FLAGS, save_hlo=True),
}
SEQ_LEN = 2048  # unless the case says ``seq``
# MaxText's checkpoint names (layers/attentions.py, layers/linears.py) and what each policy does with
# them (layers/decoders.py get_remat_policy); "custom" is the tpu-recipes' v6e Llama-3.1 setting:
# decoder_layer_input, out_proj, query_proj, key_proj, value_proj offloaded to host.
QKV = ("query_proj", "key_proj", "value_proj")
CUSTOM_OFFLOADED = ("decoder_layer_input", "out_proj", *QKV)


def remat_policy(name: str) -> Any:
    """The ``jax.checkpoint`` policy MaxText uses for ``remat_policy: name`` (None: no remat)."""
    import jax

    cp = jax.checkpoint_policies
    return {
        "none": None,
        "full": cp.nothing_saveable,
        "minimal": cp.checkpoint_dots_with_no_batch_dims,
        "save_qkv_proj": cp.save_only_these_names(*QKV),
        "save_dot_except_mlp": cp.save_only_these_names(*QKV, "out_proj"),
        "minimal_offloaded": cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host"),
        "qkv_proj_offloaded": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(QKV),
            offload_src="device", offload_dst="pinned_host"),
        "custom": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(CUSTOM_OFFLOADED),
            offload_src="device", offload_dst="pinned_host"),
    }[name]


def maxtext_config(case: str) -> dict[str, Any]:
    """The case under MaxText's key names (plus ``topology``), as tpusim loads a workload."""
    c = CASES[case]
    d = DIMS[c["dims"]]
    return {"name": case, **d, "base_num_kv_heads": d.get("base_num_kv_heads", d["base_num_query_heads"]),
            "base_num_decoder_layers": c["layers"], "mlp_activations": ["silu", "linear"],
            "per_device_batch_size": c["pdbs"], "max_target_length": c.get("seq", SEQ_LEN), "dtype": "bfloat16",
            "weight_dtype": c.get("weight_dtype", "float32"), "remat_policy": c["remat"], "scan_layers": True,
            "attention": "flash", "opt_type": "adamw", "ici_fsdp_parallelism": c["fsdp"],
            "ici_tensor_parallelism": c["tensor"], "topology": c["topology"],
            **({k: "offload" for k in CUSTOM_OFFLOADED} if c["remat"] == "custom" else {})}


def build_step(cfg: dict[str, Any], mesh: Any) -> tuple[Any, tuple]:
    """``(jitted train step, abstract arguments)`` for a MaxText-style config on ``mesh``."""
    import jax
    import jax.numpy as jnp
    from jax.ad_checkpoint import checkpoint_name
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as smask
    from jax.sharding import NamedSharding, PartitionSpec as P

    D, N, H = cfg["base_emb_dim"], cfg["base_num_query_heads"], cfg["head_dim"]
    K = cfg["base_num_kv_heads"]
    F, V, L, T = cfg["base_mlp_dim"], cfg["vocab_size"], cfg["base_num_decoder_layers"], cfg["max_target_length"]
    wdt = jnp.dtype(cfg["weight_dtype"])
    adt = jnp.bfloat16
    B = int(cfg["per_device_batch_size"] * mesh.devices.size)
    fs, tp = "fsdp", "tensor"
    shapes = {"embed": ((V, D), P(tp, fs)), "final_norm": ((D,), P(None)), "unembed": ((D, V), P(fs, tp)),
              "attn_norm": ((L, D), P(None, None)), "mlp_norm": ((L, D), P(None, None)),
              "wq": ((L, D, N, H), P(None, fs, tp, None)), "wk": ((L, D, K, H), P(None, fs, tp, None)),
              "wv": ((L, D, K, H), P(None, fs, tp, None)), "wo": ((L, N, H, D), P(None, tp, None, fs)),
              "w_gate": ((L, D, F), P(None, fs, tp)), "w_up": ((L, D, F), P(None, fs, tp)),
              "w_down": ((L, F, D), P(None, tp, fs))}
    p_sh = {k: NamedSharding(mesh, s) for k, (_, s) in shapes.items()}

    def c(x, *spec):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

    def rms(x, scale):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
        return y.astype(adt) * scale.astype(adt)

    def rope(x):  # MaxText's RotaryEmbedding (layers/embeddings.py): halves rotated, f32 sin/cos
        if "rope_max_timescale" not in cfg:
            return x
        frac = 2 * jnp.arange(H // 2, dtype=jnp.float32) / H
        ang = jnp.arange(T, dtype=jnp.float32)[:, None] / cfg["rope_max_timescale"] ** frac
        sin, cos = jnp.sin(ang)[None, :, None, :], jnp.cos(ang)[None, :, None, :]
        a, b = jnp.split(x, 2, axis=-1)
        return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)

    blocks = sk.BlockSizes(block_q=512, block_kv=512, block_kv_compute=512, block_q_dkv=512,
                           block_kv_dkv=512, block_kv_dkv_compute=512, block_q_dq=512, block_kv_dq=512)
    heads_local = N // mesh.shape[tp]
    kernel = sk.make_splash_mha(smask.MultiHeadMask([smask.CausalMask((T, T))] * heads_local),
                                block_sizes=blocks, head_shards=1, q_seq_shards=1)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(fs, tp, None, None),) * 3,
                       out_specs=P(fs, tp, None, None), check_vma=False)
    def splash(q, k, v):  # [b, n, t, h] per device, like MaxText's tpu_flash_attention
        return jax.vmap(kernel)(q, k, v)

    def layer(x, p):
        x = checkpoint_name(x, "decoder_layer_input")
        h = rms(x, p["attn_norm"])
        q = checkpoint_name(c(jnp.einsum("btd,dnh->btnh", h, p["wq"].astype(adt)), fs, None, tp, None), "query_proj")
        k = checkpoint_name(c(jnp.einsum("btd,dnh->btnh", h, p["wk"].astype(adt)), fs, None, tp, None), "key_proj")
        v = checkpoint_name(c(jnp.einsum("btd,dnh->btnh", h, p["wv"].astype(adt)), fs, None, tp, None), "value_proj")
        q, k = rope(q), rope(k)
        q = q * jnp.asarray(H ** -0.5, adt)
        o = splash(*(a.transpose(0, 2, 1, 3) for a in (q, k, v))).transpose(0, 2, 1, 3)
        o = checkpoint_name(c(o, fs, None, tp, None), "context")
        y = checkpoint_name(c(jnp.einsum("btnh,nhd->btd", o, p["wo"].astype(adt)), fs, None, tp), "out_proj")
        x = c(x + y, fs, None, tp)
        h = rms(x, p["mlp_norm"])
        g = checkpoint_name(c(jnp.einsum("btd,df->btf", h, p["w_gate"].astype(adt)), fs, None, tp), "mlpwi_0")
        u = checkpoint_name(c(jnp.einsum("btd,df->btf", h, p["w_up"].astype(adt)), fs, None, tp), "mlpwi_1")
        y = checkpoint_name(c(jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, p["w_down"].astype(adt)),
                              fs, None, tp), "mlpwo")
        return c(x + y, fs, None, tp), None

    policy = remat_policy(cfg["remat_policy"])
    body = layer if cfg["remat_policy"] == "none" else jax.checkpoint(layer, policy=policy, prevent_cse=False)
    layer_keys = ("attn_norm", "mlp_norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

    def loss_fn(params, tokens, targets):
        x = c(jnp.take(params["embed"], tokens, axis=0).astype(adt), fs, None, tp)
        x, _ = jax.lax.scan(body, x, {k: params[k] for k in layer_keys})
        x = rms(x, params["final_norm"])
        logits = c(jnp.einsum("btd,dv->btv", x, params["unembed"].astype(adt)), fs, None, tp)
        logits = logits.astype(jnp.float32)  # MaxText's cast_logits_to_fp32
        onehot = c(jax.nn.one_hot(targets, V, dtype=jnp.float32), fs, None, tp)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits, axis=-1) * onehot, axis=-1))

    def step(state, tokens, targets):  # optax.adamw + clip_by_global_norm(1.0), MaxText's defaults
        params, mu, nu, count = state
        loss, g = jax.value_and_grad(loss_fn)(params, tokens, targets)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g)))
        scale = jnp.minimum(1.0, 1.0 / (norm + 1e-6))
        count = count + 1
        b1, b2, lr, wd = 0.9, 0.95, 3e-4, 0.1
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)

        def update(p, g, m, v):
            g = g.astype(jnp.float32) * scale
            m = b1 * m.astype(jnp.float32) + (1 - b1) * g
            v = b2 * v.astype(jnp.float32) + (1 - b2) * g * g
            u = (m / c1) / (jnp.sqrt(v / c2) + 1e-8) + wd * p.astype(jnp.float32)
            return (p - lr * u).astype(p.dtype), m.astype(p.dtype), v.astype(p.dtype)

        new = {k: update(params[k], g[k], mu[k], nu[k]) for k in params}
        return ({k: a[0] for k, a in new.items()}, {k: a[1] for k, a in new.items()},
                {k: a[2] for k, a in new.items()}, count), loss

    rep = NamedSharding(mesh, P())
    state_sh = (p_sh, p_sh, p_sh, rep)
    tok_sh = NamedSharding(mesh, P(fs, None))
    jitted = jax.jit(step, in_shardings=(state_sh, tok_sh, tok_sh), out_shardings=(state_sh, rep),
                     donate_argnums=(0,))
    abstract = {k: jax.ShapeDtypeStruct(s, wdt, sharding=p_sh[k]) for k, (s, _) in shapes.items()}
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=tok_sh)
    return jitted, ((abstract, abstract, abstract, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)),
                    tokens, tokens)


def largest_buffers(report: str, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` largest rows of XLA's memory-usage report (default memory space): size and shapes."""
    rows = []
    for line in report.split("Memory Space:")[1].splitlines() if "Memory Space:" in report else []:
        m = re.match(r"\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*(\d+);\s*(\d+);\s*(.*)$", line)
        if m:
            unit = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]
            rows.append({"bytes": round(float(m.group(1)) * unit), "shapes": m.group(5).strip()})
        if len(rows) >= n or (rows and not line.strip()):
            break
    return rows


def peak_breakdown(live_range: str, n: int = 30) -> list[dict[str, Any]]:
    """What is live at XLA's peak, by the op (or argument) that made it: the top level of the
    live-range dump's "Stack trace breakdown for peak usage", largest first."""
    rows = []
    for m in re.finditer(r"^      [├└]── (.*?) \([\d.]+%, total: ([\d ]+) bytes", live_range, re.M):
        rows.append({"bytes": int(m.group(2).replace(" ", "")), "what": m.group(1)})
    return sorted(rows, key=lambda r: -r["bytes"])[:n]


def compile_case(case: str, out: Path, dump: str | None) -> dict[str, Any]:
    from aot_compile import get_topology, make_mesh, memory_analysis_dict, versions

    cfg = maxtext_config(case)
    topo = get_topology(cfg["topology"], CHIP_CONFIG[cfg["topology"].split(":")[0]])
    mesh = make_mesh(list(topo.devices), cfg["ici_fsdp_parallelism"], cfg["ici_tensor_parallelism"])
    jitted, args = build_step(cfg, mesh)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    wall = time.perf_counter() - t0
    report, live = "", ""
    if dump:
        found = sorted(Path(dump).glob("*jit_step*memory-usage-report.txt"), key=lambda p: p.stat().st_size)
        report = found[-1].read_text() if found else ""
        found = sorted(Path(dump).glob("*jit_step*live-range.txt"), key=lambda p: p.stat().st_size)
        live = found[-1].read_text() if found else ""
    result = {"case": case, "config": cfg, "device_kind": topo.devices[0].device_kind,
              "memory_analysis": {k: v for k, v in memory_analysis_dict(compiled).items()
                                  if k != "serialized_buffer_assignment_proto"},
              "largest_buffers": largest_buffers(report), "peak_breakdown": peak_breakdown(live), "compile_wall_s": round(wall, 1),
              "versions": versions()}
    out.mkdir(parents=True, exist_ok=True)
    if CASES[case].get("save_hlo"):  # XLA's optimized program, for `tpusim run --hlo`
        (out / f"{case}.hlo.txt.gz").write_bytes(gzip.compress(compiled.as_text().encode(), mtime=0))
    (out / f"{case}.json").write_text(json.dumps(result, indent=1) + "\n")
    ma = result["memory_analysis"]
    print(f"[{case}] compile {wall:.0f}s peak {ma['peak_memory_in_bytes'] / 1e9:.3f} GB "
          f"temp {ma['temp_size_in_bytes'] / 1e9:.3f} GB host temp {ma['host_temp_size_in_bytes'] / 1e9:.3f} GB")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="case (repeatable; default all)")
    ap.add_argument("--out", type=Path, default=HERE / "xla_aot_memory")
    ap.add_argument("--in-process", action="store_true", help="compile here, not one subprocess per case")
    ns = ap.parse_args()
    cases = ns.case or list(CASES)
    if ns.in_process:
        for case in cases:
            compile_case(case, ns.out, os.environ.get("TPUSIM_XLA_DUMP_DIR"))
        return
    failures = []
    for case in cases:  # one process per case: a clean dump directory for XLA's memory report
        with tempfile.TemporaryDirectory(prefix="xla_dump_") as dump:
            env = dict(os.environ, TPUSIM_XLA_DUMP_DIR=dump)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
            env.setdefault("JAX_PLATFORMS", "cpu")
            env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            if CASES[case].get("libtpu_flags"):  # libtpu reads its flags from the environment when it loads
                env["LIBTPU_INIT_ARGS"] = (env.get("LIBTPU_INIT_ARGS", "") + " " + CASES[case]["libtpu_flags"]).strip()  # other compiles may hold libtpu's lockfile
            r = subprocess.run([sys.executable, __file__, "--in-process", "--case", case, "--out", str(ns.out)],
                               env=env)
            if r.returncode:
                failures.append(case)
    if failures:
        sys.exit(f"failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
