"""Workloads: what runs (the model), the step, and how it is sharded, in MaxText's parameter names.

A workload YAML is either sectioned::

    name: fsdp-70b
    chip: v5e
    model: {model_name: llama3-70b}
    step: {per_device_batch_size: 1, max_target_length: 4096, remat_policy: full}
    sharding: {ici_fsdp_parallelism: -1}

or a MaxText config with flat keys, as it is. Keys MaxText has but that do not change performance
(paths, learning rate, logging, ...) are ignored and listed once in ``Workload.ignored_keys``; keys
known to neither vocabulary are errors naming the key. :func:`load_workload` returns frozen
dataclasses; sizes of ``-1`` ("the rest") are resolved against a topology by :mod:`tpusim.mesh`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tpusim.config import read_yaml, unknown_key_reason
from tpusim.data import data_dir
from tpusim.errors import TpusimError
from tpusim.limits import MAX_LAYERS, MAX_SIZE

DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "int8": 1,
               "float8": 1, "fp8": 1}
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
REMAT_POLICIES = ("full", "minimal", "none", "save_qkv_proj", "save_out_proj", "save_dot_except_mlp",
                  "save_dot_except_mlpwi", "minimal_offloaded", "qkv_proj_offloaded", "custom")
ATTENTION_KERNELS = ("flash", "dot_product", "autoselected", "splash", "cudnn_flash_te")
MESH_AXES = ("data", "fsdp", "sequence", "tensor", "expert")
DCN_AXES = ("data", "fsdp")


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    """A decoder-only Transformer (LLaMA family; MoE when ``num_experts > 1``). Sizes are counts."""

    name: str
    d_model: int           # base_emb_dim, D
    num_heads: int         # base_num_query_heads, N
    num_kv_heads: int      # base_num_kv_heads, K
    head_dim: int          # head_dim, H
    d_ff: int              # base_mlp_dim, F (per expert for MoE)
    num_layers: int        # base_num_decoder_layers, L
    vocab_size: int        # V
    gated_mlp: bool        # mlp_activations has two entries (e.g. silu, linear): 3 matrices, else 2
    num_experts: int = 1   # E
    experts_per_token: int = 1  # k
    tied_embeddings: bool = False  # logits_via_embedding

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    @property
    def attention_params_per_layer(self) -> int:
        """Q and O: D x NH each; K and V: D x KH each (book: 2DNH + 2DKH)."""
        d, h = self.d_model, self.head_dim
        return 2 * d * self.num_heads * h + 2 * d * self.num_kv_heads * h

    @property
    def mlp_params_per_layer(self) -> int:
        """All experts' MLP weights, plus the router (D x E) for MoE (book: 3DF, times E)."""
        router = self.d_model * self.num_experts if self.num_experts > 1 else 0
        return self.mlp_matrices * self.d_model * self.d_ff * self.num_experts + router

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.d_model

    @property
    def embedding_params(self) -> int:
        """Input embedding and unembedding (book: 2VD; VD when tied) plus the final norm."""
        return (1 if self.tied_embeddings else 2) * self.vocab_size * self.d_model + self.d_model

    @property
    def params(self) -> int:
        per_layer = self.attention_params_per_layer + self.mlp_params_per_layer + self.norm_params_per_layer
        return self.num_layers * per_layer + self.embedding_params

    @property
    def active_params(self) -> int:
        """Parameters one token touches: k of E experts (book: MoE is E x params, k x FLOPs)."""
        if self.num_experts == 1:
            return self.params
        inactive = self.mlp_matrices * self.d_model * self.d_ff * (self.num_experts - self.experts_per_token)
        return self.params - self.num_layers * inactive


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One training step. ``attention_flops`` is the model-FLOPs convention: ``causal`` counts half of
    the T^2 attention (what a causal flash kernel does), ``full`` all of it (MaxText before Jul 2025)."""

    per_device_batch_size: float
    seq_len: int
    dtype: str = "bfloat16"
    weight_dtype: str = "float32"
    optimizer: str = "adamw"
    remat_policy: str = "full"
    attention: str = "flash"
    attention_flops: str = "causal"
    num_vocab_tiling: int = 1
    mu_dtype: str = ""  # Adam moments' dtype; "" = the weights' (optax's default)

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def moment_bytes(self) -> int:
        return DTYPE_BYTES[self.mu_dtype] if self.mu_dtype else self.weight_bytes

    @property
    def flash(self) -> bool:
        return self.attention != "dot_product"


@dataclass(frozen=True, slots=True, kw_only=True)
class Parallelism:
    """Mesh axis sizes (-1: the rest) on ICI and across slices (DCN), and optional physical placement."""

    ici: dict[str, int]
    dcn: dict[str, int]
    physical_axes: dict[str, str] | None = None  # mesh axis -> torus axis letters, e.g. {tensor: x, fsdp: yz}


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    name: str
    source: str
    model: Model
    step: Step
    parallelism: Parallelism
    chip: str | None = None
    topology: str | None = None
    slices: int | None = None
    description: str = ""
    ignored_keys: tuple[str, ...] = field(default=())


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
    "vocab_size": (int, 32000),
    "mlp_activations": (list, ["silu", "linear"]),
    "num_experts": (int, 1),
    "num_experts_per_tok": (int, 1),
    "logits_via_embedding": (bool, False),
}
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
}
_SHARDING_KEYS: dict[str, tuple[type, Any]] = {
    **{f"ici_{a}_parallelism": (int, -1 if a == "fsdp" else 1) for a in MESH_AXES},
    **{f"dcn_{a}_parallelism": (int, -1 if a == "data" else 1) for a in DCN_AXES},
    "physical_axes": (dict, None),
}
_TOP_KEYS = {"name": str, "description": str, "chip": str, "topology": str, "slices": int}
_SECTIONS = {"model": _MODEL_KEYS, "step": _STEP_KEYS, "sharding": _SHARDING_KEYS}
_ALIASES = {"ici_context_parallelism": "ici_sequence_parallelism", "optimizer": "opt_type"}

# MaxText keys that exist but do not change a step's performance; accepted and listed once.
MAXTEXT_IGNORED = frozenset("""
run_name base_output_directory dataset_path dataset_type dataset_name eval_dataset_name train_split eval_split
tokenizer_path tokenizer_type add_bos add_eos steps learning_rate cosine_learning_rate_final_fraction
warmup_steps_fraction learning_rate_schedule_steps adam_b1 adam_b2 adam_eps adam_eps_root adam_weight_decay
gradient_clipping_threshold max_grad_norm log_period enable_checkpointing async_checkpointing checkpoint_period
load_parameters_path load_full_state_path enable_single_controller eval_interval eval_steps target_eval_loss
enable_profiler profiler upload_all_profiler_results skip_first_n_steps_for_profiler profiler_steps
profile_cleanly use_iota_embed reuse_example_batch monitor_goodput enable_goodput_recording metrics_file
gcs_metrics save_config_to_gcs hardware enable_data_shuffling data_shuffle_seed init_weights_seed
scan_layers param_scan_axis fused_qkv fused_mlp decoder_block enable_dropout dropout_rate
normalization_layer_epsilon rope_min_timescale rope_max_timescale rope_type max_position_embeddings
sa_block_q sa_block_kv sa_block_kv_compute sa_block_q_dkv sa_block_kv_dkv sa_block_kv_dkv_compute
sa_block_q_dq sa_block_kv_dq sa_use_fused_bwd_kernel sa_q_layout sa_k_layout sa_v_layout
compile_topology compile_topology_num_slices model_call_mode base_num_encoder_layers
logical_axis_rules data_sharding mesh_axes jax_cache_dir jax_distributed_initialization_timeout
enable_jax_profiler jax_profiler_port checkpoint_storage_use_ocdbt checkpoint_storage_use_zarr3
skip_jax_distributed_system vertex_tensorboard_project vertex_tensorboard_region
inference_microbenchmark_prefill_lengths inference_microbenchmark_stages prompt autoregressive_decode_assert
packing grain_worker_count colocated_python_data_input expansion_factor_real_data
record_internal_nn_metrics use_untrainable_positional_embedding trainable_position_size
final_logits_soft_cap attn_logits_soft_cap use_post_attn_norm use_post_ffw_norm
float32_qk_product float32_logits cast_logits_to_fp32 matmul_precision activations_in_float32
allow_split_physical_axes custom_mesh optimize_mesh_for_tpu_v6e dump_hlo dump_hlo_xla_flags
dump_hlo_gcs_dir xla_flags libtpu_init_args global_batch_size_to_train_on logits_dot_in_fp32
""".split())
_UNSUPPORTED = {"global_parameter_scale": 1, "gradient_accumulation_steps": 1, "quantization": "", "ici_pipeline_parallelism": 1,
                "dcn_pipeline_parallelism": 1, "ici_tensor_sequence_parallelism": 1,
                "dcn_tensor_parallelism": 1, "dcn_sequence_parallelism": 1, "dcn_expert_parallelism": 1,
                "ici_fsdp_transpose_parallelism": 1, "dcn_fsdp_transpose_parallelism": 1}


@cache
def model_presets() -> dict[str, dict]:
    return read_yaml(data_dir("workloads") / "models.yaml")


def load_workload(path: str | Path, overrides: dict[str, Any] | None = None) -> Workload:
    """Read a workload YAML (sectioned or flat MaxText) into a :class:`Workload`.

    ``overrides`` are flat MaxText keys (e.g. from ``tpusim sweep --vary``) applied after the file.
    """
    path = Path(path)
    raw = read_yaml(path)
    return workload_from_dict(raw, source=str(path), overrides=overrides)


def workload_from_dict(raw: Any, *, source: str, overrides: dict[str, Any] | None = None) -> Workload:
    if not isinstance(raw, dict):
        raise TpusimError("a workload is a mapping of keys to values", source=source)
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}  # flat key -> dotted key in the file, for messages
    ignored: list[str] = []
    top: dict[str, Any] = {}

    def put(key: str, value: Any, dotted: str, section: str | None) -> None:
        key = _ALIASES.get(key, key)
        if section is not None and key not in _SECTIONS[section]:
            other = next((s for s, keys in _SECTIONS.items() if key in keys), None)
            if other is not None:
                raise TpusimError(f"belongs in section '{other}', not '{section}'", source=source, key=dotted)
        if any(key in keys for keys in _SECTIONS.values()):
            flat[key] = value
            where[key] = dotted
        elif key in _UNSUPPORTED:
            if value != _UNSUPPORTED[key]:
                raise TpusimError(f"{value!r} is not supported by tpusim (only {_UNSUPPORTED[key]!r})",
                                  source=source, key=dotted)
        elif key in MAXTEXT_IGNORED:
            ignored.append(dotted)
        else:
            known = [*(k for keys in _SECTIONS.values() for k in keys), *_TOP_KEYS, *_SECTIONS]
            raise TpusimError(unknown_key_reason(key, known), source=source, key=dotted)

    for key, value in raw.items():
        key = str(key)
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise TpusimError("expected a mapping", source=source, key=key)
            for sub, v in value.items():
                put(str(sub), v, f"{key}.{sub}", key)
        elif key in _TOP_KEYS:
            top[key] = _typed(key, value, _TOP_KEYS[key], source)
        else:
            put(key, value, key, None)
    for key, value in (overrides or {}).items():
        put(key, value, key, None)
        where[_ALIASES.get(key, key)] = f"{key} (override)"

    # A model preset fills the dims the file does not give.
    preset_name = flat.get("model_name")
    if preset_name is not None:
        preset_name = _typed(where["model_name"], preset_name, str, source)
        presets = model_presets()
        if preset_name not in presets:
            raise TpusimError(unknown_key_reason(str(preset_name), presets).replace("unknown key", "unknown model")
                              + f"; presets: {', '.join(presets)}", source=source, key=where["model_name"])
        for k, v in presets[preset_name].items():
            flat.setdefault(k, v)
            where.setdefault(k, f"model_name ({preset_name})")

    values: dict[str, Any] = {}
    for keys in _SECTIONS.values():
        for key, (typ, default) in keys.items():
            if key in flat:
                values[key] = _typed(where[key], flat[key], typ, source)
            elif default is REQUIRED:
                raise TpusimError("required key is missing", source=source, key=key)
            else:
                values[key] = default

    model = _model(values, preset_name, source, where)
    step = _step(values, source, where)
    parallelism = _parallelism(values, source, where)
    if top.get("slices") is not None and top["slices"] < 1:
        raise TpusimError(f"{top['slices']!r} must be a positive integer", source=source, key="slices")
    ep = parallelism.ici.get("expert", 1)
    if model.num_experts == 1 and ep != 1:
        raise TpusimError(f"{ep} but the model is dense (num_experts 1): expert parallelism splits a mixture "
                          f"of experts", source=source,
                          key=where.get("ici_expert_parallelism", "ici_expert_parallelism"))
    name = top.get("name") or Path(source).stem
    return Workload(name=name, source=source, model=model, step=step, parallelism=parallelism,
                    chip=top.get("chip"), topology=top.get("topology"), slices=top.get("slices"),
                    description=top.get("description", ""), ignored_keys=tuple(ignored))


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


def _model(values, preset_name, source, where) -> Model:
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
    return Model(name=preset_name or "custom", d_model=d, num_heads=n, num_kv_heads=k, head_dim=h,
                 d_ff=values["base_mlp_dim"], num_layers=values["base_num_decoder_layers"],
                 vocab_size=values["vocab_size"], gated_mlp=len(acts) == 2, num_experts=e,
                 experts_per_token=topk, tied_embeddings=values["logits_via_embedding"])


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
    for k in ("max_target_length", "num_vocab_tiling"):
        _positive(values, k, source, where)
    for k in ("dtype", "weight_dtype"):
        _choice(values, k, tuple(DTYPE_BYTES), source, where)
    if values["mu_dtype"]:
        _choice(values, "mu_dtype", tuple(DTYPE_BYTES), source, where)
    return Step(per_device_batch_size=pdbs, seq_len=values["max_target_length"], dtype=values["dtype"],
                weight_dtype=values["weight_dtype"],
                optimizer=_choice(values, "opt_type", OPTIMIZERS, source, where),
                remat_policy=_choice(values, "remat_policy", REMAT_POLICIES, source, where),
                attention=_choice(values, "attention", ATTENTION_KERNELS, source, where),
                attention_flops=_choice(values, "attention_flops", ("causal", "full"), source, where),
                num_vocab_tiling=values["num_vocab_tiling"], mu_dtype=values["mu_dtype"])


def _parallelism(values, source, where) -> Parallelism:
    ici = {a: _positive(values, f"ici_{a}_parallelism", source, where, allow_minus_one=True) for a in MESH_AXES}
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
    return Parallelism(ici=ici, dcn=dcn, physical_axes=phys)
