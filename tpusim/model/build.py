"""The workload vocabulary (tpusim's keys by section, with types and defaults) and the builders that
turn checked values into :mod:`tpusim.model.spec`'s dataclasses, each error naming the file and key."""

from __future__ import annotations

from typing import Any

from tpusim.config import unknown_key_reason
from tpusim.errors import TpusimError
from tpusim.limits import MAX_FLASH_BLOCKS, MAX_LAYERS, MAX_SIZE
from tpusim.model.pipeline import PIPELINE_KEYS
from tpusim.model.spec import (ATTENTION_KERNELS, DCN_AXES, DTYPE_BYTES, FLASH_BLOCK_KEYS, MESH_AXES, OPTIMIZERS,
                               REMAT_POLICIES, Model, Parallelism, Step)

# ---- the vocabulary --------------------------------------------------------------------------------

# tpusim's keys, by section. Values are (python type, default). "required" marks keys with no default.
REQUIRED = object()
_MODEL_KEYS: dict[str, tuple[type, Any]] = {
    "model_name": (str, None),
    "base_emb_dim": (int, REQUIRED),
    "base_num_query_heads": (int, REQUIRED),
    "base_num_kv_heads": (int, None),
    "head_dim": (int, None),
    "base_mlp_dim": (int, REQUIRED),
    "base_num_decoder_layers": (int, REQUIRED),
    "global_parameter_scale": (int, 1),
    "vocab_size": (int, 32000),
    "mlp_activations": (list, ["silu", "linear"]),
    "num_experts": (int, 1),
    "num_experts_per_tok": (int, 1),
    "logits_via_embedding": (bool, False),
    "decoder_block": (str, "llama2"),
    "base_moe_mlp_dim": (int, -1),
    "shared_experts": (int, 0),
    "first_num_dense_layers": (int, 0),
    "interleave_moe_layer_step": (int, 1),
    "attention_type": (str, "global"),
    "q_lora_rank": (int, 0),
    "kv_lora_rank": (int, 512),
    "qk_nope_head_dim": (int, 128),
    "qk_rope_head_dim": (int, 64),
    "v_head_dim": (int, 128),
    "sliding_window_size": (int, 0),
    "chunk_attn_window_size": (int, 0),
    "use_post_attn_norm": (bool, False),
    "use_post_ffw_norm": (bool, False),
    "use_qk_norm": (bool, False),
}
# decoder_block values whose layers tpusim builds; Gemma 2's file counts (local, global) pairs as one
# layer; Gemma 3 has 5 local layers per global one, Llama 4 3 chunked per global (MaxText's models).
DECODER_BLOCKS = ("llama2", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "qwen3", "qwen3_moe", "gpt3",
                  "deepseek", "llama4", "simple", "simple_mlp")
ATTENTION_TYPES = ("global", "mla")
_STEP_KEYS: dict[str, tuple[type, Any]] = {
    "per_device_batch_size": (float, REQUIRED),
    "max_target_length": (int, 2048),
    "dtype": (str, "bfloat16"),
    "weight_dtype": (str, "float32"),
    "opt_type": (str, "adamw"),
    "remat_policy": (str, "full"),
    "attention": (str, "flash"),
    "attention_flops": (str, "causal"),
    "num_vocab_tiling": (int, 1),
    "mu_dtype": (str, ""),
    "gradient_accumulation_steps": (int, 1),
    "quantization": (str, ""),
    "quantization_local_shard_count": (int, -1),
    "optimizer_memory_host_offload": (bool, False),
    "context_parallel_load_balance": (bool, True),
    "context_parallel_strategy": (str, "all_gather"),
    "sa_use_fused_bwd_kernel": (bool, False),
    # splash attention's block sizes (forward, dkv and dq kernels): a causal kernel computes every block
    # that holds an unmasked score, whole (tpusim.model.spec.flash_fraction)
    **{k: (int, 512) for k in FLASH_BLOCK_KEYS},
    "use_iota_embed": (bool, False),
    # tpusim's (MaxText has no key for it): how weight gradients are reduced over the weight shards. "xla":
    # as libtpu compiles it, whole and synchronously all-reduced over 64 devices or more, else reduce-scattered
    # beside the backward's matmuls (tpusim.compiler.transformer.FSDP_ALL_REDUCE_MIN_DEVICES); "reduce_scatter":
    # always reduce-scattered, overlapped (the book's FSDP)
    "gradient_reduction": (str, "xla"),
    # tpusim's: whether large tensor-parallel activation collectives run as XLA's collective matmuls beside their
    # matmuls (tpusim.compiler.transformer.COLLECTIVE_MATMUL_MIN_TOKENS); false is MaxText's recipes' XLA flag
    # for collective matmul off (--xla_jf_spmd_threshold_for_windowed_einsum_mib=1000000)
    "collective_matmul": (bool, True),
    # remat_policy: custom, MaxText's per-tensor choice: "remat" (recompute), "device" (save in HBM) or
    # "offload" (save in host memory); base.yml's defaults (the layer input on device, the rest remat)
    **{k: (str, "device" if k == "decoder_layer_input" else "remat") for k in (
        "decoder_layer_input", "query_proj", "key_proj", "value_proj", "out_proj", "context", "mlpwi", "mlpwi_0",
        "mlpwi_1", "mlpwo", "moe_mlpwi_0", "moe_mlpwi_1", "moe_mlpwo")},
}
# MaxText's checkpoint names (layers/attentions.py, linears.py, moe.py) -> the tensors tpusim's layer
# saves by name (compiler/memory.py's widths); the fused mlpwi holds both gate and up.
CUSTOM_TENSORS = {"decoder_layer_input": ("input",), "query_proj": ("q_proj",), "key_proj": ("k_proj",),
                  "value_proj": ("v_proj",), "out_proj": ("o_proj",), "context": ("context",),
                  "mlpwi": ("mlp_gate", "mlp_up"), "mlpwi_0": ("mlp_gate",), "mlpwi_1": ("mlp_up",),
                  "mlpwo": ("mlp_down",), "moe_mlpwi_0": ("mlp_gate",), "moe_mlpwi_1": ("mlp_up",),
                  "moe_mlpwo": ("mlp_down",)}
REMAT_CHOICES = ("remat", "device", "offload")
QUANTIZATIONS = ("", "int8", "fp8", "nanoo_fp8")  # MaxText's AQT modes tpusim models (others: not yet)
GRADIENT_REDUCTIONS = ("xla", "reduce_scatter")
CONTEXT_STRATEGIES = ("all_gather", "ring")  # MaxText's ulysses / usp: not yet
_SHARDING_KEYS: dict[str, tuple[type, Any]] = {
    **{f"ici_{a}_parallelism": (int, -1 if a == "fsdp" else 1) for a in MESH_AXES},
    **{f"dcn_{a}_parallelism": (int, -1 if a == "data" else 1) for a in DCN_AXES},
    "physical_axes": (dict, None),
    "shard_optimizer_over_data": (bool, False),
    "shard_gradients_over_data": (bool, False),  # tpusim's: ZeRO-2 (MaxText has no key for it)
    "ici_tensor_sequence_parallelism": (int, 1),  # folded into tensor (see _parallelism)
    **PIPELINE_KEYS,
}
_TOP_KEYS = {"name": str, "description": str, "chip": str, "topology": str, "slices": int, "base_config": str}
_SECTIONS = {"model": _MODEL_KEYS, "step": _STEP_KEYS, "sharding": _SHARDING_KEYS}
_ALIASES = {"ici_context_parallelism": "ici_sequence_parallelism", "optimizer": "opt_type"}

# Keys of older MaxText versions (not in today's base.yml) that do not change a step's performance.
MAXTEXT_LEGACY_IGNORED = frozenset("""
base_num_encoder_layers cosine_learning_rate_final_fraction enable_profiler global_batch_size_to_train_on
libtpu_init_args max_grad_norm xla_flags collect_stack_trace stack_trace_to_cloud stack_trace_interval_seconds
use_replicator_service
""".split())
# MaxText's 2023 AQT switch, before quantization: int8 (true: the same int8 training).
MAXTEXT_LEGACY_INT8 = "int8_training"


def _typed(key: str, value: Any, typ: type, source: str) -> Any:
    if typ is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          bool: isinstance(value, bool), str: isinstance(value, str),
          list: isinstance(value, list), dict: isinstance(value, dict)}[typ]
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not ok:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
                 dict: "a mapping"}
        raise TpusimError(f"{value!r} is not {names[typ]}", source=source, key=key)
    return float(value) if typ is float else value


def _positive(values, key, source, where, allow_minus_one=False):
    v = values[key]
    if v < 1 and not (allow_minus_one and v == -1):
        more = " or -1 (the rest)" if allow_minus_one else ""
        raise TpusimError(f"{v!r} must be a positive integer{more}", source=source, key=where.get(key, key))
    if v > MAX_SIZE:
        raise TpusimError(f"{v:.3g} is more than {MAX_SIZE:,}, tpusim's limit for a size", source=source,
                          key=where.get(key, key))
    return v


def parameter_scales(scale: int) -> tuple[int, int, int, int]:
    """MaxText's ``global_parameter_scale`` as powers of two for (embedding, heads, MLP, layers): its
    pyconfig's ``get_individual_scales``. Each doubling of the scale doubles, in turn, the heads and
    the MLP width, then the embedding, then the layers; head_dim stays (scale 16 on base.yml's
    2048 / 16 heads / 7168 / 16 layers is MaxText's 16B: 4096 / 64 / 28672 / 32)."""
    log2 = scale.bit_length() - 1
    base, rem = divmod(log2, 3)
    heads = base + int(rem > 0)
    return base + int(rem > 1), heads, heads, base


def _scaled(values, source, where) -> dict:
    """``values`` with MaxText's ``global_parameter_scale`` applied to the base_* dimensions."""
    scale = _positive(values, "global_parameter_scale", source, where)
    if scale & (scale - 1):
        raise TpusimError(f"{scale} is not a power of 2 (MaxText's rule; for finer sizes set base_emb_dim, "
                          f"base_num_query_heads, base_mlp_dim and base_num_decoder_layers)", source=source,
                          key=where.get("global_parameter_scale", "global_parameter_scale"))
    if scale == 1:
        return values
    emb, heads, mlp, layers = parameter_scales(scale)
    out = dict(values)
    d, n = out["base_emb_dim"], out["base_num_query_heads"]
    if out["head_dim"] is None and n > 0 and d % n == 0:
        out["head_dim"] = d // n  # a head's size does not scale
    out["base_emb_dim"] <<= emb
    out["base_num_query_heads"] <<= heads
    if out["base_num_kv_heads"] is not None:
        out["base_num_kv_heads"] <<= heads
    out["base_mlp_dim"] <<= mlp
    if out["base_moe_mlp_dim"] > 0:
        out["base_moe_mlp_dim"] <<= mlp
    out["base_num_decoder_layers"] <<= layers
    key = where.get("global_parameter_scale", "global_parameter_scale")
    if out["base_num_decoder_layers"] > MAX_LAYERS:
        raise TpusimError(f"{scale} makes {out['base_num_decoder_layers']:,} layers; tpusim compiles at most "
                          f"{MAX_LAYERS:,}", source=source, key=key)
    widest = max(out["base_emb_dim"], out["base_mlp_dim"], out["base_num_query_heads"])
    if widest > MAX_SIZE:
        raise TpusimError(f"{scale} makes a dimension of {widest:.3g}, more than {MAX_SIZE:,}, tpusim's limit for a "
                          f"size", source=source, key=key)
    return out


def _model(values, preset_name, source, where) -> Model:
    values = _scaled(values, source, where)
    for k in ("base_emb_dim", "base_num_query_heads", "base_mlp_dim", "base_num_decoder_layers", "vocab_size",
              "num_experts", "num_experts_per_tok"):
        _positive(values, k, source, where)
    if values["base_num_decoder_layers"] > MAX_LAYERS:
        raise TpusimError(f"{values['base_num_decoder_layers']:,} layers; tpusim compiles at most {MAX_LAYERS:,}",
                          source=source, key=where.get("base_num_decoder_layers", "base_num_decoder_layers"))
    d, n = values["base_emb_dim"], values["base_num_query_heads"]
    k = values["base_num_kv_heads"] if values["base_num_kv_heads"] is not None else n
    if k < 1 or n % k:
        raise TpusimError(f"{k} kv heads must divide {n} query heads (GQA)", source=source,
                          key=where.get("base_num_kv_heads", "base_num_kv_heads"))
    h = values["head_dim"]
    if h is None:
        if d % n:
            raise TpusimError(f"head_dim not given and {d} is not divisible by {n} heads", source=source,
                              key="head_dim")
        h = d // n
    else:
        _positive(values, "head_dim", source, where)
    acts = values["mlp_activations"]
    if not 1 <= len(acts) <= 2:
        raise TpusimError(f"{acts!r}: one activation (plain MLP) or two (gated, e.g. [silu, linear])",
                          source=source, key=where.get("mlp_activations", "mlp_activations"))
    e, topk = values["num_experts"], values["num_experts_per_tok"]
    if topk > e:
        raise TpusimError(f"{topk} experts per token but only {e} experts", source=source,
                          key=where.get("num_experts_per_tok", "num_experts_per_tok"))
    block = values["decoder_block"]
    if block not in DECODER_BLOCKS:
        raise TpusimError(f"{block!r}: not modelled yet by tpusim (its layers are {', '.join(DECODER_BLOCKS)})",
                          source=source, key=where.get("decoder_block", "decoder_block"))
    attn = values["attention_type"]
    if attn not in ATTENTION_TYPES:
        raise TpusimError(f"{attn!r}: not modelled yet by tpusim (attention types: {', '.join(ATTENTION_TYPES)})",
                          source=source, key=where.get("attention_type", "attention_type"))
    for key in ("shared_experts", "first_num_dense_layers", "q_lora_rank", "sliding_window_size",
                "chunk_attn_window_size"):
        if values[key] < 0:
            raise TpusimError(f"{values[key]} must be >= 0", source=source, key=where.get(key, key))
    if attn == "mla":
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive(values, key, source, where)
    _positive(values, "interleave_moe_layer_step", source, where)
    layers = values["base_num_decoder_layers"] * (2 if block == "gemma2" else 1)
    window, period = values["sliding_window_size"], 0
    if block == "gemma2" and window:  # (local, global) pairs
        period = 2
    elif block == "gemma3" and window:
        period = 6
    elif block == "llama4" and values["chunk_attn_window_size"]:  # every 4th layer global (and NoPE)
        window, period = values["chunk_attn_window_size"], 4
    moe_ff = values["base_moe_mlp_dim"]
    return Model(name=preset_name or "custom", d_model=d, num_heads=n, num_kv_heads=k, head_dim=h,
                 d_ff=values["base_mlp_dim"], num_layers=layers,
                 vocab_size=values["vocab_size"], gated_mlp=len(acts) == 2, num_experts=e,
                 experts_per_token=topk, tied_embeddings=values["logits_via_embedding"],
                 d_ff_moe=moe_ff if moe_ff > 0 and e > 1 else 0,
                 shared_experts=values["shared_experts"] if e > 1 else 0,
                 first_dense_layers=values["first_num_dense_layers"] if e > 1 else 0,
                 moe_layer_step=values["interleave_moe_layer_step"], attention_type=attn,
                 q_lora_rank=values["q_lora_rank"], kv_lora_rank=values["kv_lora_rank"],
                 qk_nope_head_dim=values["qk_nope_head_dim"], qk_rope_head_dim=values["qk_rope_head_dim"],
                 v_head_dim=values["v_head_dim"], sliding_window=window, local_period=period,
                 chunked=block == "llama4",
                 post_norms=int(values["use_post_attn_norm"]) + int(values["use_post_ffw_norm"]),
                 qk_norm=values["use_qk_norm"] and attn != "mla")


def _choice(values, key, choices, source, where):
    v = values[key]
    if v not in choices:
        raise TpusimError(f"{v!r} is not one of {', '.join(choices)}", source=source, key=where.get(key, key))
    return v


def _step(values, source, where) -> Step:
    pdbs = values["per_device_batch_size"]
    if not 0 < pdbs <= MAX_SIZE:
        raise TpusimError(f"{pdbs!r} must be a positive number", source=source,
                          key=where.get("per_device_batch_size", "per_device_batch_size"))
    for k in ("max_target_length", "num_vocab_tiling", "gradient_accumulation_steps", *FLASH_BLOCK_KEYS):
        _positive(values, k, source, where)
    for k in FLASH_BLOCK_KEYS[::2]:  # the query blocks each flash kernel's computed blocks are counted over
        if -(-values["max_target_length"] // values[k]) > MAX_FLASH_BLOCKS:
            raise TpusimError(f"{values[k]} splits max_target_length {values['max_target_length']} into more than "
                              f"{MAX_FLASH_BLOCKS:,} query blocks", source=source, key=where.get(k, k))
    for k in ("dtype", "weight_dtype"):
        _choice(values, k, tuple(DTYPE_BYTES), source, where)
    if values["mu_dtype"]:
        _choice(values, "mu_dtype", tuple(DTYPE_BYTES), source, where)
    policy = _choice(values, "remat_policy", REMAT_POLICIES, source, where)
    device: list[str] = []
    offload: list[str] = []
    for key, tensors in CUSTOM_TENSORS.items():
        choice = _choice(values, key, REMAT_CHOICES, source, where)
        if policy == "custom" and choice != "remat":
            (offload if choice == "offload" else device).extend(tensors)
    return Step(per_device_batch_size=pdbs, seq_len=values["max_target_length"], dtype=values["dtype"],
                weight_dtype=values["weight_dtype"],
                # adam_pax is Adam as Pax implements it: the same two moments and FLOPs
                optimizer=_choice(values, "opt_type", OPTIMIZERS, source, where).replace("adam_pax", "adam"),
                remat_policy=policy, custom_device=tuple(dict.fromkeys(t for t in device if t not in offload)),
                custom_offload=tuple(dict.fromkeys(offload)),
                attention=_choice(values, "attention", ATTENTION_KERNELS, source, where),
                attention_flops=_choice(values, "attention_flops", ("causal", "full"), source, where),
                num_vocab_tiling=values["num_vocab_tiling"], mu_dtype=values["mu_dtype"],
                gradient_accumulation_steps=values["gradient_accumulation_steps"],
                quantization=_not_yet(values, "quantization", QUANTIZATIONS, source, where),
                quantize_wgrad=values["quantization_local_shard_count"] != 0,
                optimizer_memory_host_offload=values["optimizer_memory_host_offload"],
                context_load_balance=values["context_parallel_load_balance"],
                context_strategy=_not_yet(values, "context_parallel_strategy", CONTEXT_STRATEGIES, source, where),
                flash_fused_bwd=values["sa_use_fused_bwd_kernel"], iota_embed=values["use_iota_embed"],
                gradient_reduction=_choice(values, "gradient_reduction", GRADIENT_REDUCTIONS, source, where),
                collective_matmul=values["collective_matmul"],
                flash_blocks=tuple(values[k] for k in FLASH_BLOCK_KEYS))


def _not_yet(values, key, choices, source, where):
    """A MaxText value tpusim does not model yet is refused as such (not as a typo)."""
    v = values[key]
    if v not in choices:
        raise TpusimError(f"{v!r}: not modelled yet by tpusim (it models {', '.join(repr(c) for c in choices)})",
                          source=source, key=where.get(key, key))
    return v


def _parallelism(values, source, where) -> Parallelism:
    ici = {a: _positive(values, f"ici_{a}_parallelism", source, where, allow_minus_one=True) for a in MESH_AXES}
    # MaxText's tensor_sequence axis is tensor parallelism whose activations between blocks are split
    # on the sequence (the Playbook's sequence parallelism) where tensor's are split on D: the same
    # weights' split and the same all-gather / reduce-scatter bytes, so it is folded into tensor.
    ts = _positive(values, "ici_tensor_sequence_parallelism", source, where)
    if ts > 1:
        if ici["tensor"] == -1:
            raise TpusimError("give ici_tensor_parallelism a size (not -1) beside ici_tensor_sequence_parallelism",
                              source=source, key=where.get("ici_tensor_parallelism", "ici_tensor_parallelism"))
        ici["tensor"] *= ts
    dcn = {a: _positive(values, f"dcn_{a}_parallelism", source, where, allow_minus_one=True) for a in DCN_AXES}
    for name, sizes in (("ici", ici), ("dcn", dcn)):
        if sum(1 for v in sizes.values() if v == -1) > 1:
            raise TpusimError(f"only one {name}_*_parallelism may be -1 (the rest)", source=source,
                              key=f"{name}_*_parallelism")
    phys = values["physical_axes"]
    if phys is not None:
        for axis, letters in phys.items():
            if axis not in MESH_AXES:
                raise TpusimError(unknown_key_reason(str(axis), MESH_AXES).replace("unknown key", "unknown mesh axis"),
                                  source=source, key=f"physical_axes.{axis}")
            if not isinstance(letters, str) or not letters or any(c not in "xyz" for c in letters):
                raise TpusimError(f"{letters!r} is not a string of torus axes (x, y, z)", source=source,
                                  key=f"physical_axes.{axis}")
    if values["shard_gradients_over_data"] and not values["shard_optimizer_over_data"]:
        raise TpusimError("true needs shard_optimizer_over_data: true (ZeRO-2 shards the gradients on top of "
                          "ZeRO-1's optimizer state)", source=source,
                          key=where.get("shard_gradients_over_data", "shard_gradients_over_data"))
    return Parallelism(ici=ici, dcn=dcn, physical_axes=phys,
                       shard_optimizer_over_data=values["shard_optimizer_over_data"],
                       shard_gradients_over_data=values["shard_gradients_over_data"])
