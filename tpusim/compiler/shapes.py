"""Per-device sizes of a sharded Transformer step: what every other part of the compiler works from."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpusim.errors import TpusimError
from tpusim.model.mesh import Mesh
from tpusim.model.spec import Parallelism, Step, Workload

# Remat policies: which matmul outputs a layer keeps for the backward pass (MaxText's names).
# "input" is the layer's input, kept by every policy but "none" (which keeps everything). "custom"
# keeps what MaxText's per-tensor keys say (Step.custom_device / custom_offload).
_SAVED = {
    "full": (),
    "minimal": ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down"),
    "minimal_offloaded": ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down"),
    "save_qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "qkv_proj_offloaded": ("q_proj", "k_proj", "v_proj"),
    "save_out_proj": ("o_proj",),
    "save_dot_except_mlp": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "save_dot_except_mlpwi": ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_down"),
}
# What each offloading policy copies to host memory after a layer's forward (MaxText's policies).
_OFFLOADED = {
    "minimal_offloaded": tuple(t for t in _SAVED["minimal"] if t != "mlp_down"),  # never a residual
    "qkv_proj_offloaded": ("q_proj", "k_proj", "v_proj"),
}


def saved_tensors(step: Step) -> tuple[str, ...] | None:
    """The tensors besides the layer input that a layer keeps for its backward, in HBM or host memory
    (None: no remat, every residual kept)."""
    if step.remat_policy == "none":
        return None
    if step.remat_policy == "custom":
        return tuple(t for t in (*step.custom_device, *step.custom_offload) if t != "input")
    return _SAVED[step.remat_policy]


def offloaded_tensors(step: Step) -> tuple[str, ...]:
    """The tensors the policy copies to host memory after each layer's forward (the down-projection's
    output is never a residual, so offloading it moves nothing)."""
    if step.remat_policy == "custom":
        return tuple(t for t in step.custom_offload if t != "mlp_down")
    return _OFFLOADED.get(step.remat_policy, ())


def zero_stage(par: Parallelism, data_shards: int) -> int:
    """0 (DP: weights, gradients and optimizer state replicated over the data axes), 1 (MaxText's
    shard_optimizer_over_data) or 2 (tpusim's shard_gradients_over_data); 0 without data parallelism."""
    if data_shards == 1 or not par.shard_optimizer_over_data:
        return 0
    return 2 if par.shard_gradients_over_data else 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Shapes:
    """Per-device dimensions. ``tok`` = local sequences x local sequence length."""

    global_batch: float        # sequences per step
    seqs: float                # local sequences (batch shards: data x fsdp x expert x DCN)
    seq_len: int               # T
    t_local: int               # T / sequence parallelism
    tok: float                 # tokens one device computes
    d: int
    heads: int                 # local query heads (N / tensor)
    kv_heads: int              # local kv heads
    head_dim: int
    ff: int                    # local MLP width (F / tensor)
    vocab: int                 # local vocab (V / tensor, rounded up)
    tp: int
    sp: int
    ep: int
    experts_local: int
    topk: int
    act_bytes: int
    weight_bytes: int
    weight_shards: int         # devices a dense weight's D dim is split over (fsdp x sequence x expert x dcn_fsdp)
    expert_weight_shards: int  # the same for expert weights (no expert axis: that splits E)
    saved: tuple[str, ...] | None  # matmuls whose outputs remat keeps; None = keep everything (no remat)
    ff_dense: int = 0          # local MLP width of the dense layers of an MoE model (first_num_dense_layers, ...)
    ff_shared: int = 0         # local width of the shared experts, side by side (shared_experts x F_moe / tensor)
    data_shards: int = 1       # devices of the data axes (ici x dcn data): replicas of the weights
    zero_stage: int = 0        # ZeRO over the data axes: 0 (plain DP), 1 or 2 (tpusim.compiler.zero)


def derive_shapes(w: Workload, mesh: Mesh, devices: int) -> Shapes:
    m, s = w.model, w.step
    src = w.source
    tp, sp, ep = mesh.ici["tensor"], mesh.ici["sequence"], mesh.ici["expert"]
    batch_shards = mesh.size("data", "fsdp", "expert", "dcn_data", "dcn_fsdp")
    global_batch = s.per_device_batch_size * devices
    if not float(global_batch).is_integer():
        raise TpusimError(f"{s.per_device_batch_size} sequences per device x {devices} devices is not a whole "
                          f"global batch", source=src, key="per_device_batch_size")
    seqs = global_batch / batch_shards
    if seqs < 1 or not float(seqs).is_integer():
        raise TpusimError(f"a global batch of {global_batch:g} sequences does not split evenly over the "
                          f"{batch_shards} batch shards (data x fsdp x expert x dcn)", source=src,
                          key="per_device_batch_size")

    def divide(total: int, parts: int, what: str, key: str) -> int:
        if total % parts:
            raise TpusimError(f"{what} {total} is not divisible by {parts}", source=src, key=key)
        return total // parts

    t_local = divide(s.seq_len, sp, "sequence length", "ici_sequence_parallelism")
    heads = divide(m.num_heads, tp, "query heads", "ici_tensor_parallelism")
    if m.num_kv_heads % tp == 0:
        kv = m.num_kv_heads // tp
    elif tp % m.num_kv_heads == 0:
        kv = 1  # fewer kv heads than tensor shards: each kv head is replicated tp/K times
    else:
        raise TpusimError(f"kv heads {m.num_kv_heads} and tensor parallelism {tp} do not divide one another",
                          source=src, key="ici_tensor_parallelism")
    ff = divide(m.expert_ff if m.num_experts > 1 else m.d_ff, tp, "MLP width", "ici_tensor_parallelism")
    weight_shards = mesh.size("fsdp", "sequence", "expert", "dcn_fsdp")
    expert_weight_shards = mesh.size("fsdp", "sequence", "dcn_fsdp")
    divide(m.d_model, weight_shards, "embedding width (sharded over fsdp x sequence x expert)", "ici_fsdp_parallelism")
    experts_local = divide(m.num_experts, ep, "experts", "ici_expert_parallelism") if m.num_experts > 1 else 1
    if m.num_experts == 1 and ep > 1:
        pass  # a dense model's expert axis acts as another batch / weight-sharding axis (MaxText does so)
    saved = saved_tensors(s)
    ff_dense = ff
    if m.num_experts > 1 and m.moe_layers < m.num_layers:
        ff_dense = divide(m.d_ff, tp, "dense MLP width", "ici_tensor_parallelism")
    ff_shared = divide(m.expert_ff * m.shared_experts, tp, "shared experts' width", "ici_tensor_parallelism")
    return Shapes(global_batch=global_batch, seqs=seqs, seq_len=s.seq_len, t_local=t_local,
                  tok=seqs * t_local, d=m.d_model, heads=heads, kv_heads=kv, head_dim=m.head_dim, ff=ff,
                  vocab=math.ceil(m.vocab_size / tp), tp=tp, sp=sp, ep=ep, experts_local=experts_local,
                  topk=m.experts_per_token, act_bytes=s.act_bytes, weight_bytes=s.weight_bytes,
                  weight_shards=weight_shards, expert_weight_shards=expert_weight_shards, saved=saved,
                  ff_dense=ff_dense, ff_shared=ff_shared, data_shards=mesh.size("data", "dcn_data"),
                  zero_stage=zero_stage(w.parallelism, mesh.size("data", "dcn_data")))
