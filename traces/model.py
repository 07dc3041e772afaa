"""A small LLaMA-style decoder-only Transformer train step in plain JAX (no flax).

This is the reference program whose XLA compilation (ahead of time for a TPU, see
``aot_compile.py``, and captured on fake CPU devices, see ``capture_cpu.py``) gives the ground
truth that tpusim's Transformer compiler is tested against.  It is written the way a MaxText user
would get it laid out:

* token embedding ``[V, D]``; per layer: RMSNorm, Q/K/V projections with grouped-query attention
  (``N`` query heads, ``K`` kv heads, head dim ``H``), dense causal softmax attention written with
  einsums (no flash kernel), output projection, residual, RMSNorm, gated SiLU MLP
  (gate ``[D, F]``, up ``[D, F]``, down ``[F, D]``), residual; final RMSNorm, unembedding
  ``[D, V]``, softmax cross-entropy in float32;
* ``jax.value_and_grad`` and a plain SGD update ``p - lr * g``;
* layers are an unrolled Python loop (not ``lax.scan``) so XLA's cost analysis counts every layer;
  ``remat="full"`` wraps each layer in ``jax.checkpoint`` (nothing saved but the layer input);
* params and matmuls in bfloat16; RMSNorm statistics and the loss in float32;
* shardings on a ``Mesh(("fsdp", "tensor"))``: FSDP shards every weight's ``embed`` (``D``) dim
  over ``fsdp`` (MaxText's logical axis ``embed -> fsdp``), tensor parallelism shards heads, the
  MLP dim ``F`` and the vocab over ``tensor`` (Megatron: column-parallel Q/K/V/gate/up/unembed,
  row-parallel O/down); the batch is sharded over ``fsdp`` and replicated over ``tensor``; the
  residual stream ``[B, T, D]`` is replicated over ``tensor`` (no sequence parallelism), or, with
  ``residual_over_tensor``, sharded on ``D`` over ``tensor`` as MaxText's default rules do.  RMSNorm
  scales ``[D]`` are replicated (MaxText maps the logical axis ``norm`` to ``tensor``, which is not
  the ``D`` of the activations here, so at these sizes we keep them replicated; they are 1 KiB).

Named scopes ``layer_<i>`` / ``attn`` / ``mlp`` (plus ``embed``, ``final_norm``, ``unembed``,
``loss``, ``sgd``) appear in the HLO ``metadata={op_name=...}`` and in profiles.

Only jax and numpy are imported, so this module works on any backend.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Mesh axis names, MaxText's.
FSDP = "fsdp"
TENSOR = "tensor"

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Model and step sizes.  Defaults are the dims the tpusim tests use (do not change them).

    Attributes
    ----------
    emb_dim: D, model (embed) width.
    num_query_heads: N.
    num_kv_heads: K (GQA: N must be a multiple of K).
    head_dim: H.
    mlp_dim: F, hidden width of the gated MLP.
    vocab_size: V.
    seq_len: T, tokens per sequence (MaxText ``max_target_length``).
    num_layers: L.
    batch_per_fsdp_shard: sequences per ``fsdp`` shard; the global batch is this times the
        ``fsdp`` mesh size (it is replicated over ``tensor``).
    remat: ``"none"`` or ``"full"`` (per-layer ``jax.checkpoint``, nothing saveable).
    learning_rate: SGD step size.
    residual_over_tensor: shard the residual stream ``[B, T, D]`` (and the RMSNorm outputs) with
        ``D`` over ``tensor``, as MaxText's default logical rule ``activation_embed -> tensor``
        does, instead of replicating it over ``tensor``: XLA must then all-gather the activations
        over ``tensor`` before the column-parallel matmuls and reduce-scatter them after the
        row-parallel ones (off by default: the committed compiles are of the replicated stream).
    """

    emb_dim: int = 512
    num_query_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 64
    mlp_dim: int = 2048
    vocab_size: int = 8192
    seq_len: int = 512
    num_layers: int = 2
    batch_per_fsdp_shard: int = 2
    remat: str = "none"
    learning_rate: float = 1e-2
    residual_over_tensor: bool = False

    def __post_init__(self) -> None:
        if self.num_query_heads % self.num_kv_heads:
            raise ValueError(f"num_query_heads={self.num_query_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.remat not in ("none", "full"):
            raise ValueError(f"remat={self.remat!r}: expected 'none' or 'full'")


PARAM_DTYPE = jnp.bfloat16  # weights and activations
LOSS_DTYPE = jnp.float32  # logits softmax, loss, RMSNorm statistics


# ---------------------------------------------------------------------------------------------
# Parameter shapes and shardings
# ---------------------------------------------------------------------------------------------

def param_shapes(cfg: ModelConfig) -> Params:
    """Shapes of every parameter, as a pytree of tuples (same structure as the params)."""
    D, N, K, H, F, V = (cfg.emb_dim, cfg.num_query_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.mlp_dim, cfg.vocab_size)
    layer = {
        "attn_norm": (D,),
        "wq": (D, N, H),
        "wk": (D, K, H),
        "wv": (D, K, H),
        "wo": (N, H, D),
        "mlp_norm": (D,),
        "w_gate": (D, F),
        "w_up": (D, F),
        "w_down": (F, D),
    }
    return {
        "embed": (V, D),
        "layers": [dict(layer) for _ in range(cfg.num_layers)],
        "final_norm": (D,),
        "unembed": (D, V),
    }


def param_partition_specs(cfg: ModelConfig) -> Params:
    """PartitionSpec of every parameter: the embed dim D over ``fsdp``; heads, F, V over ``tensor``."""
    layer = {
        "attn_norm": P(None),
        "wq": P(FSDP, TENSOR, None),  # column-parallel: heads split
        "wk": P(FSDP, TENSOR, None),
        "wv": P(FSDP, TENSOR, None),
        "wo": P(TENSOR, None, FSDP),  # row-parallel: heads split, output D over fsdp
        "mlp_norm": P(None),
        "w_gate": P(FSDP, TENSOR),  # column-parallel
        "w_up": P(FSDP, TENSOR),
        "w_down": P(TENSOR, FSDP),  # row-parallel
    }
    return {
        "embed": P(TENSOR, FSDP),  # MaxText: ("vocab", "embed")
        "layers": [dict(layer) for _ in range(cfg.num_layers)],
        "final_norm": P(None),
        "unembed": P(FSDP, TENSOR),  # MaxText: ("embed", "vocab")
    }


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    """NamedSharding of every parameter on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_partition_specs(cfg),
                        is_leaf=_is_spec)


def abstract_params(cfg: ModelConfig, mesh: Mesh) -> Params:
    """``jax.ShapeDtypeStruct`` of every parameter, with its sharding (for AOT lowering)."""
    shapes = param_shapes(cfg)
    shardings = param_shardings(cfg, mesh)
    return jax.tree.map(lambda shp, sh: jax.ShapeDtypeStruct(shp, PARAM_DTYPE, sharding=sh),
                        shapes, shardings, is_leaf=_is_shape)


def param_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Bytes (bf16) of each kind of parameter and in total, global (unsharded); for hand checks."""
    itemsize = jnp.dtype(PARAM_DTYPE).itemsize
    shapes = param_shapes(cfg)
    out = {"embed": math.prod(shapes["embed"]) * itemsize,
           "unembed": math.prod(shapes["unembed"]) * itemsize,
           "final_norm": math.prod(shapes["final_norm"]) * itemsize}
    for name, shp in shapes["layers"][0].items():
        out[f"layer.{name}"] = math.prod(shp) * itemsize
    out["per_layer_total"] = sum(v for k, v in out.items() if k.startswith("layer."))
    out["total"] = (out["embed"] + out["unembed"] + out["final_norm"]
                    + cfg.num_layers * out["per_layer_total"])
    return out


def init_params(cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> Params:
    """Random bf16 parameters placed with their shardings (for real runs, e.g. the CPU capture).

    Norm scales are ones; matrices are normal with std 1/sqrt(fan_in).
    """
    shapes = param_shapes(cfg)
    shardings = param_shardings(cfg, mesh)
    paths_and_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(jax.random.key(seed), len(paths_and_shapes))

    def make(key: jax.Array, path: Any, shp: tuple[int, ...]) -> jax.Array:
        if len(shp) == 1:  # norm scale
            return jnp.ones(shp, PARAM_DTYPE)
        name = path[-1].key
        # fan-in: the contracted dims (D, F, or N*H for wo); embedding rows get std 1.
        n_in = 1 if name == "embed" else math.prod(shp[:-1]) if name == "wo" else shp[0]
        return (jax.random.normal(key, shp, jnp.float32) / math.sqrt(n_in)).astype(PARAM_DTYPE)

    leaves = [make(k, path, shp) for k, (path, shp) in zip(keys, paths_and_shapes)]
    params = jax.tree.unflatten(treedef, leaves)
    return jax.device_put(params, shardings)


# ---------------------------------------------------------------------------------------------
# Batch
# ---------------------------------------------------------------------------------------------

def global_batch_size(cfg: ModelConfig, mesh: Mesh) -> int:
    """Sequences per step: ``batch_per_fsdp_shard`` times the ``fsdp`` mesh size."""
    return cfg.batch_per_fsdp_shard * mesh.shape[FSDP]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Tokens ``[B, T]``: batch over ``fsdp``, replicated over ``tensor``."""
    return NamedSharding(mesh, P(FSDP, None))


def abstract_batch(cfg: ModelConfig, mesh: Mesh) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """``(tokens, targets)`` as int32 ``ShapeDtypeStruct`` of shape ``[B, T]``."""
    shape = (global_batch_size(cfg, mesh), cfg.seq_len)
    sds = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh))
    return sds, sds


def random_batch(cfg: ModelConfig, mesh: Mesh, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    """Random token ids and their next-token targets, placed with the batch sharding."""
    rng = np.random.default_rng(seed)
    b = global_batch_size(cfg, mesh)
    seq = rng.integers(0, cfg.vocab_size, size=(b, cfg.seq_len + 1), dtype=np.int32)
    sh = batch_sharding(mesh)
    return jax.device_put(seq[:, :-1], sh), jax.device_put(seq[:, 1:], sh)


# ---------------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------------

def _constrain(x: jax.Array, mesh: Mesh, *spec: Any) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def residual_spec(cfg: ModelConfig) -> tuple[Any, ...]:
    """PartitionSpec entries of the residual stream ``[B, T, D]``: batch over ``fsdp``; ``D`` over
    ``tensor`` only with ``residual_over_tensor`` (MaxText's ``activation_embed -> tensor``)."""
    return (FSDP, None, TENSOR) if cfg.residual_over_tensor else (FSDP, None, None)


def normed(x: jax.Array, scale: jax.Array, cfg: ModelConfig, mesh: Mesh) -> jax.Array:
    """RMSNorm of the residual; with ``residual_over_tensor`` its output keeps the residual's
    sharding, as MaxText constrains ``lnx`` to ``activation_embed``."""
    y = rms_norm(x, scale)
    return _constrain(y, mesh, *residual_spec(cfg)) if cfg.residual_over_tensor else y


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm over the last dim; statistics in float32, output in the input dtype."""
    xf = x.astype(LOSS_DTYPE)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype) * scale


def attention(x: jax.Array, p: Params, cfg: ModelConfig, mesh: Mesh) -> jax.Array:
    """Dense causal GQA attention; ``x`` is the normed residual ``[B, T, D]``, returns ``[B, T, D]``.

    Query heads are grouped as ``N = K * G``: head ``n = k * G + g`` uses kv head ``k``, so the
    ``N`` dim split over ``tensor`` keeps each query group with its kv head on one device.
    """
    B, T, _ = x.shape
    K, H = cfg.num_kv_heads, cfg.head_dim
    G = cfg.num_query_heads // K
    q = jnp.einsum("btd,dnh->btnh", x, p["wq"])
    k = jnp.einsum("btd,dkh->btkh", x, p["wk"])
    v = jnp.einsum("btd,dkh->btkh", x, p["wv"])
    q = _constrain(q, mesh, FSDP, None, TENSOR, None)
    k = _constrain(k, mesh, FSDP, None, TENSOR, None)
    v = _constrain(v, mesh, FSDP, None, TENSOR, None)
    q = q.reshape(B, T, K, G, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k) * jnp.asarray(1.0 / math.sqrt(H), q.dtype)
    causal = jnp.tril(jnp.ones((T, T), dtype=jnp.bool_))
    scores = jnp.where(causal, scores, jnp.asarray(-1e9, scores.dtype))  # bf16 min is ~-3e38
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, K * G, H)
    out = _constrain(out, mesh, FSDP, None, TENSOR, None)
    y = jnp.einsum("btnh,nhd->btd", out, p["wo"])  # row-parallel: all-reduce over tensor
    return _constrain(y, mesh, *residual_spec(cfg))  # (or reduce-scatter, residual_over_tensor)


def mlp(x: jax.Array, p: Params, mesh: Mesh, cfg: ModelConfig) -> jax.Array:
    """Gated SiLU MLP: ``down(silu(x @ gate) * (x @ up))``; ``x`` ``[B, T, D]``."""
    gate = jnp.einsum("btd,df->btf", x, p["w_gate"])
    up = jnp.einsum("btd,df->btf", x, p["w_up"])
    hidden = _constrain(jax.nn.silu(gate) * up, mesh, FSDP, None, TENSOR)
    y = jnp.einsum("btf,fd->btd", hidden, p["w_down"])  # row-parallel: all-reduce over tensor
    return _constrain(y, mesh, *residual_spec(cfg))


def decoder_layer(x: jax.Array, p: Params, cfg: ModelConfig, mesh: Mesh) -> jax.Array:
    """One pre-norm decoder layer on the residual ``x`` ``[B, T, D]``."""
    with jax.named_scope("attn"):
        x = x + attention(normed(x, p["attn_norm"], cfg, mesh), p, cfg, mesh)
    x = _constrain(x, mesh, *residual_spec(cfg))
    with jax.named_scope("mlp"):
        x = x + mlp(normed(x, p["mlp_norm"], cfg, mesh), p, mesh, cfg)
    return _constrain(x, mesh, *residual_spec(cfg))


def loss_fn(params: Params, tokens: jax.Array, targets: jax.Array, cfg: ModelConfig,
            mesh: Mesh) -> jax.Array:
    """Mean next-token softmax cross-entropy (float32) of the model on ``tokens`` ``[B, T]``."""
    with jax.named_scope("embed"):
        x = jnp.take(params["embed"], tokens, axis=0)  # [B, T, D]
        x = _constrain(x, mesh, *residual_spec(cfg))

    layer_fn = decoder_layer
    if cfg.remat == "full":
        # Per-layer remat: save only the layer input, recompute everything in the backward pass.
        layer_fn = jax.checkpoint(decoder_layer, static_argnums=(2, 3),
                                  policy=jax.checkpoint_policies.nothing_saveable)
    for i, layer_params in enumerate(params["layers"]):  # unrolled on purpose (not lax.scan)
        with jax.named_scope(f"layer_{i}"):
            x = layer_fn(x, layer_params, cfg, mesh)

    with jax.named_scope("final_norm"):
        x = normed(x, params["final_norm"], cfg, mesh)
    with jax.named_scope("unembed"):
        logits = jnp.einsum("btd,dv->btv", x, params["unembed"])
        logits = _constrain(logits, mesh, FSDP, None, TENSOR)
    with jax.named_scope("loss"):
        logp = jax.nn.log_softmax(logits.astype(LOSS_DTYPE), axis=-1)
        onehot = jax.nn.one_hot(targets, cfg.vocab_size, dtype=LOSS_DTYPE)
        onehot = _constrain(onehot, mesh, FSDP, None, TENSOR)
        return -jnp.mean(jnp.sum(logp * onehot, axis=-1))


def train_step(params: Params, tokens: jax.Array, targets: jax.Array, *, cfg: ModelConfig,
               mesh: Mesh) -> tuple[Params, jax.Array]:
    """One SGD step: ``(params - lr * grad(loss), loss)``."""
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets, cfg, mesh)
    with jax.named_scope("sgd"):
        lr = jnp.asarray(cfg.learning_rate, PARAM_DTYPE)
        new_params = jax.tree.map(lambda p, g: p - lr * g.astype(p.dtype), params, grads)
    return new_params, loss


def jit_train_step(cfg: ModelConfig, mesh: Mesh) -> Any:
    """``jax.jit`` of ``train_step`` with explicit in/out shardings; params are donated."""
    p_sh = param_shardings(cfg, mesh)
    b_sh = batch_sharding(mesh)
    loss_sh = NamedSharding(mesh, P())

    def step(params: Params, tokens: jax.Array, targets: jax.Array) -> tuple[Params, jax.Array]:
        return train_step(params, tokens, targets, cfg=cfg, mesh=mesh)

    return jax.jit(step, in_shardings=(p_sh, b_sh, b_sh), out_shardings=(p_sh, loss_sh),
                   donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# MaxText-style config
# ---------------------------------------------------------------------------------------------

def maxtext_config(cfg: ModelConfig, mesh: Mesh, topology: str) -> dict[str, Any]:
    """The model/step/sharding under MaxText's key names (plus ``topology``).

    ``per_device_batch_size`` is MaxText's: global batch / number of devices, so it is fractional
    when ``tensor`` > 1 (each ``fsdp`` shard of ``tensor`` devices shares its sequences).
    """
    n_devices = int(mesh.devices.size)
    gbs = global_batch_size(cfg, mesh)
    pdbs = gbs / n_devices
    return {
        "base_emb_dim": cfg.emb_dim,
        "base_num_query_heads": cfg.num_query_heads,
        "base_num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "base_mlp_dim": cfg.mlp_dim,
        "base_num_decoder_layers": cfg.num_layers,
        "vocab_size": cfg.vocab_size,
        "mlp_activations": ["silu", "linear"],
        "per_device_batch_size": int(pdbs) if float(pdbs).is_integer() else pdbs,
        "global_batch_size_to_train_on": gbs,
        "max_target_length": cfg.seq_len,
        "dtype": "bfloat16",
        "weight_dtype": "bfloat16",
        "ici_fsdp_parallelism": int(mesh.shape[FSDP]),
        "ici_tensor_parallelism": int(mesh.shape[TENSOR]),
        "remat_policy": cfg.remat,
        "scan_layers": False,
        "attention": "dot_product",
        "opt_type": "sgd",
        "learning_rate": cfg.learning_rate,
        "logits_dot_in_fp32": False,
        "topology": topology,
    }
