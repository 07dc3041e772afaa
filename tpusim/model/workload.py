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
dataclasses; sizes of ``-1`` ("the rest") are resolved against a topology by :mod:`tpusim.model.mesh`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tpusim.model import maxtext
from tpusim.model.pipeline import PIPELINE_KEYS, Pipeline, pipeline_from_values
from tpusim.config import read_yaml, unknown_key_reason
from tpusim.data import data_dir
from tpusim.errors import TpusimError
from tpusim.limits import MAX_LAYERS, MAX_SIZE

DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "int8": 1,
               "float8": 1, "fp8": 1}
OPTIMIZERS = ("adamw", "adam", "adam_pax", "sgd", "adafactor")
REMAT_POLICIES = ("full", "minimal", "none", "save_qkv_proj", "save_out_proj", "save_dot_except_mlp",
                  "save_dot_except_mlpwi", "minimal_offloaded", "qkv_proj_offloaded", "custom")
ATTENTION_KERNELS = ("flash", "dot_product", "autoselected", "splash", "cudnn_flash_te")
MESH_AXES = ("data", "fsdp", "sequence", "tensor", "expert", "pipeline")
DCN_AXES = ("data", "fsdp", "pipeline")


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    """A decoder-only Transformer (LLaMA family; MoE when ``num_experts > 1``). Sizes are counts.

    MaxText's other families add: DeepSeek's multi-head latent attention (``attention_type: mla``,
    low-rank Q and KV projections), shared experts, dense first layers and (Llama 4) MoE every
    ``moe_layer_step``-th layer; Gemma 2 / 3's local sliding-window layers.
    """

    name: str
    d_model: int           # base_emb_dim, D
    num_heads: int         # base_num_query_heads, N
    num_kv_heads: int      # base_num_kv_heads, K
    head_dim: int          # head_dim, H
    d_ff: int              # base_mlp_dim, F (per expert for MoE unless d_ff_moe is given)
    num_layers: int        # base_num_decoder_layers, L (Gemma 2: twice the file's, see _model)
    vocab_size: int        # V
    gated_mlp: bool        # mlp_activations has two entries (e.g. silu, linear): 3 matrices, else 2
    num_experts: int = 1   # E
    experts_per_token: int = 1  # k
    tied_embeddings: bool = False  # logits_via_embedding
    d_ff_moe: int = 0      # base_moe_mlp_dim: one expert's width (0: d_ff)
    shared_experts: int = 0  # always-on experts of width d_ff_moe (DeepSeek, Llama 4)
    first_dense_layers: int = 0  # first_num_dense_layers: dense MLP of width d_ff before the MoE layers
    moe_layer_step: int = 1  # interleave_moe_layer_step: every n-th layer is MoE, the others dense
    attention_type: str = "global"  # global (GQA) or mla
    q_lora_rank: int = 0   # MLA: 0 = full-rank query projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    sliding_window: int = 0  # local layers attend this many tokens back (0: none), or within chunks of it
    local_period: int = 0    # every local_period-th layer is global, the others local (Gemma 2: 2, Gemma 3: 6)
    chunked: bool = False    # Llama 4: local layers attend within fixed chunks, not a sliding window
    post_norms: int = 0      # use_post_attn_norm + use_post_ffw_norm: extra D-wide norms per layer (Gemma 2/3)
    qk_norm: bool = False    # use_qk_norm: an H-wide norm on queries and one on keys (Qwen3, Gemma 3)

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    def is_local(self, layer: int) -> bool:
        return bool(self.local_period and self.sliding_window) and (layer + 1) % self.local_period != 0

    @property
    def local_layers(self) -> int:
        return sum(1 for i in range(self.num_layers) if self.is_local(i))

    def attention_span(self, layer: int, seq_len: int, *, causal: bool) -> float:
        """A layer's attention work relative to a global layer's at sequence length T (W the window).
        Causal: sliding window sum_i min(i, W) = TW - W^2/2 against T^2/2, i.e. (2TW - W^2)/T^2; chunks
        of W, T W / 2, i.e. W/T. Counting the full square: W/T both."""
        t, win = seq_len, self.sliding_window
        if not self.is_local(layer) or t <= win:
            return 1.0
        if causal and not self.chunked:
            return (2 * t * win - win * win) / (t * t)
        return win / t

    @property
    def expert_ff(self) -> int:
        return self.d_ff_moe or self.d_ff

    @property
    def moe_layers(self) -> int:
        """Layers with experts: after the first dense ones, every moe_layer_step-th (MaxText's models)."""
        if self.num_experts == 1:
            return 0
        return sum(1 for i in range(self.first_dense_layers, self.num_layers) if (i + 1) % self.moe_layer_step == 0)

    @property
    def attention_params_per_layer(self) -> int:
        """Q and O: D x NH each; K and V: D x KH each (book: 2DNH + 2DKH). MLA (DeepSeek-V2 s2.1):
        Q through a rank-q_lora down-projection (and its norm) or straight; KV down to kv_lora + the
        shared RoPE key, a norm, up to N x (nope + v); O from N x v."""
        d, n = self.d_model, self.num_heads
        if self.attention_type == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = d * n * qk if not self.q_lora_rank else d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * n * qk
            kv = (d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim))
            return q + kv + n * self.v_head_dim * d
        h = self.head_dim
        return 2 * d * n * h + 2 * d * self.num_kv_heads * h

    @property
    def dense_mlp_params(self) -> int:
        return self.mlp_matrices * self.d_model * self.d_ff

    @property
    def moe_mlp_params(self) -> int:
        """One MoE layer: routed and shared experts, and the router (D x E)."""
        return (self.mlp_matrices * self.d_model * self.expert_ff * (self.num_experts + self.shared_experts)
                + self.d_model * self.num_experts)

    @property
    def mlp_params_per_layer(self) -> int:
        """All experts' MLP weights, plus the router (D x E) for MoE (book: 3DF, times E); for a model
        mixing dense and MoE layers, the mean over layers."""
        if self.num_experts == 1:
            return self.dense_mlp_params
        moe = self.moe_layers
        return (moe * self.moe_mlp_params + (self.num_layers - moe) * self.dense_mlp_params) // self.num_layers

    @property
    def norm_params_per_layer(self) -> int:
        return (2 + self.post_norms) * self.d_model + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def embedding_params(self) -> int:
        """Input embedding and unembedding (book: 2VD; VD when tied) plus the final norm."""
        return (1 if self.tied_embeddings else 2) * self.vocab_size * self.d_model + self.d_model

    @property
    def params(self) -> int:
        mlp = (self.moe_layers * self.moe_mlp_params + (self.num_layers - self.moe_layers) * self.dense_mlp_params
               if self.num_experts > 1 else self.num_layers * self.dense_mlp_params)
        return (self.num_layers * (self.attention_params_per_layer + self.norm_params_per_layer) + mlp
                + self.embedding_params)

    @property
    def active_params(self) -> int:
        """Parameters one token touches: k of E experts (book: MoE is E x params, k x FLOPs)."""
        if self.num_experts == 1:
            return self.params
        inactive = self.mlp_matrices * self.d_model * self.expert_ff * (self.num_experts - self.experts_per_token)
        return self.params - self.moe_layers * inactive


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
    gradient_accumulation_steps: int = 1  # microbatches per step, run in sequence (per_device_batch_size / k each)
    quantization: str = ""  # MaxText's AQT training: "", int8, fp8, nanoo_fp8 (tpusim.compiler.quant)
    quantize_wgrad: bool = True  # quantization_local_shard_count != 0: AQT quantizes the weight gradient too
    optimizer_memory_host_offload: bool = False  # Adam's moments live in host memory between steps
    context_load_balance: bool = True  # context_parallel_load_balance: causal work spread evenly over context
    context_strategy: str = "all_gather"  # context_parallel_strategy: all_gather (K/V gathered) or ring

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
    # ZeRO over the data axes (tpusim.compiler.zero): MaxText's shard_optimizer_over_data is ZeRO-1;
    # shard_gradients_over_data (a tpusim key, MaxText has none) adds ZeRO-2. ZeRO-3 is the fsdp axis.
    shard_optimizer_over_data: bool = False
    shard_gradients_over_data: bool = False


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
    notes: tuple[str, ...] = field(default=())  # MaxText keys set away from base.yml that tpusim does not model
    pipeline: Pipeline = field(default=Pipeline())  # stages: ici/dcn_pipeline_parallelism (tpusim.model.pipeline)


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
}
QUANTIZATIONS = ("", "int8", "fp8", "nanoo_fp8")  # MaxText's AQT modes tpusim models (others: not yet)
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
libtpu_init_args max_grad_norm xla_flags
""".split())


@cache
def model_presets() -> dict[str, dict]:
    return read_yaml(data_dir("workloads") / "models.yaml") or {}


def load_workload(path: str | Path, overrides: dict[str, Any] | None = None) -> Workload:
    """Read a workload YAML (sectioned or flat MaxText) into a :class:`Workload`.

    ``overrides`` are flat MaxText keys (e.g. from ``tpusim sweep --vary``) applied after the file.
    """
    path = Path(path)
    raw = read_yaml(path)
    return workload_from_dict(raw, source=str(path), overrides=overrides)


def workload_from_dict(raw: Any, *, source: str, overrides: dict[str, Any] | None = None) -> Workload:
    """MaxText's layering: ``base_config`` (e.g. ``base.yml``), then the file ``model_name`` names,
    then the workload's own keys, then ``overrides``; each key then classified (:mod:`tpusim.model.maxtext`)."""
    if not isinstance(raw, dict):
        raise TpusimError("a workload is a mapping of keys to values", source=source)
    own: list[tuple[str, Any, str]] = []  # (key, value, dotted key in the file)
    top: dict[str, Any] = {}

    def check_section(key: str, dotted: str, section: str) -> None:
        if key not in _SECTIONS[section]:
            other = next((s for s, keys in _SECTIONS.items() if key in keys), None)
            if other is not None:
                raise TpusimError(f"belongs in section '{other}', not '{section}'", source=source, key=dotted)

    for key, value in raw.items():
        key = str(key)
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise TpusimError("expected a mapping", source=source, key=key)
            for sub, v in value.items():
                k = _ALIASES.get(str(sub), str(sub))
                check_section(k, f"{key}.{sub}", key)
                own.append((k, v, f"{key}.{sub}"))
        elif key in _TOP_KEYS:
            top[key] = _typed(key, value, _TOP_KEYS[key], source)
        else:
            own.append((_ALIASES.get(key, key), value, key))
    over = [(_ALIASES.get(str(k), str(k)), v, f"{k} (override)") for k, v in (overrides or {}).items()]

    # The layers, lowest first: base config, model file, the workload's keys, the overrides.
    layers: list[tuple[str, list[tuple[str, Any, str]]]] = []
    if "base_config" in top:
        base_name = top["base_config"]
        base = _base_config(base_name, source)
        layers.append(("base", [(_ALIASES.get(str(k), str(k)), v, f"{k} ({base_name})") for k, v in base.items()
                                if str(k) != "base_config"]))
    # model_name may come from the base_config chain too (MaxText's inference configs name their model)
    named_in = [e for _, entries in layers for e in entries] + own + over
    named = [v for k, v, _ in named_in if k == "model_name"]
    preset_name = None
    if named and named[-1] != "default":  # MaxText's sentinel for "no model file"
        where_name = next(d for k, _, d in reversed(named_in) if k == "model_name")
        preset_name = _typed(where_name, named[-1], str, source)
        preset = maxtext.model_file(preset_name)
        if preset is None:
            preset = model_presets().get(preset_name)
        if preset is None:
            names = sorted({*model_presets(), *maxtext.model_names()})
            raise TpusimError(unknown_key_reason(str(preset_name), names).replace("unknown key", "unknown model")
                              + f" ({len(names)} models: workloads/maxtext/models/*.yml)", source=source,
                              key=where_name)
        layers.append(("model", [(str(k), v, f"{k} (model_name {preset_name})") for k, v in preset.items()]))
    layers += [("file", own), ("override", over)]

    flat: dict[str, Any] = {}
    where: dict[str, str] = {}  # flat key -> dotted key in the file, for messages
    origin: dict[str, str] = {}
    for layer, entries in layers:
        for key, value, dotted in entries:
            flat[key], where[key], origin[key] = value, dotted, layer

    ignored: list[str] = []
    notes: list[str] = []
    vocab = {k for keys in _SECTIONS.values() for k in keys}
    for key, value in list(flat.items()):
        if key in vocab:
            continue
        if key == "num_slices":
            n = _typed(where[key], value, int, source)
            if n != -1 and "slices" not in top:
                top["slices"] = n
        elif key in maxtext.REFUSED_KEYS:
            if not maxtext.is_default(key, value):
                group = maxtext.REFUSED[maxtext.REFUSED_KEYS[key]][0]
                raise TpusimError(f"{value!r}: not modelled yet by tpusim ({group}); MaxText's default is "
                                  f"{maxtext.default(key)!r}", source=source, key=where[key])
        elif key in maxtext.NOTED_KEYS:
            if not maxtext.is_default(key, value):
                notes.append(f"{key}={value!r}")
        elif key in maxtext.IGNORED_KEYS or key in MAXTEXT_LEGACY_IGNORED:
            if origin[key] in ("file", "override"):
                ignored.append(where[key])
        else:
            known = [*vocab, *_TOP_KEYS, *_SECTIONS, *maxtext.IGNORED_KEYS, *maxtext.NOTED_KEYS,
                     *maxtext.REFUSED_KEYS]
            raise TpusimError(unknown_key_reason(key, known), source=source,
                              key=key if origin[key] == "override" else where[key])

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
    pipeline = pipeline_from_values(values, source, where)
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
                    description=top.get("description", ""), ignored_keys=tuple(ignored), notes=tuple(notes),
                    pipeline=pipeline)


def maxtext_chain(name: Any, source: str) -> dict:
    """The keys of a ``base_config`` chain (what :func:`workload_from_dict` layers under a workload's own)."""
    if not isinstance(name, str):
        raise TpusimError(f"{name!r} is not a file name", source=source, key="base_config")
    return _base_config(name, source)


@cache
def _bundled_config(path: str) -> Any:
    """A config of workloads/maxtext/ (package data: read once per process; a sweep loads it per row)."""
    return read_yaml(path)


def _base_config(name: str, source: str, depth: int = 0) -> dict:
    """``base_config``: a file beside the file that names it, else one of ``workloads/maxtext/`` (a path
    inside it, e.g. ``inference/inference_jetstream.yml``); its own ``base_config`` is followed the same
    way, as MaxText does (``inference/multihost/interleaved/*.yml`` -> ``inference/inference_jetstream.yml``
    -> ``base.yml``). The keys of the whole chain, the nearest file winning."""
    try:
        parts = Path(name).parts
        here = Path(source).parent / name
        bundled = data_dir("workloads") / "maxtext" / name
        inside = not Path(name).is_absolute() and ".." not in parts
        path = here if here.is_file() else bundled if inside and bundled.is_file() else None
    except (OSError, ValueError):  # a name no file system has (a NUL byte, too long)
        path = None
    if path is None:
        raise TpusimError(f"{name!r}: no such file beside {Path(source).name} or in workloads/maxtext/", source=source,
                          key="base_config")
    root = data_dir("workloads") / "maxtext"
    data = _bundled_config(str(path)) if path.resolve().is_relative_to(root.resolve()) else read_yaml(path)
    if not isinstance(data, dict):
        raise TpusimError("a MaxText config is a mapping of keys to values", source=str(path))
    parent = data.get("base_config")
    if parent is None:
        return dict(data)
    if depth >= 8:
        raise TpusimError(f"{parent!r}: more than 8 base_config files in a chain (a loop?)", source=str(path),
                          key="base_config")
    if not isinstance(parent, str):
        raise TpusimError(f"{parent!r} is not a file name", source=str(path), key="base_config")
    return {**_base_config(parent, str(path), depth + 1), **{k: v for k, v in data.items() if k != "base_config"}}


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
    for k in ("max_target_length", "num_vocab_tiling", "gradient_accumulation_steps"):
        _positive(values, k, source, where)
    for k in ("dtype", "weight_dtype"):
        _choice(values, k, tuple(DTYPE_BYTES), source, where)
    if values["mu_dtype"]:
        _choice(values, "mu_dtype", tuple(DTYPE_BYTES), source, where)
    return Step(per_device_batch_size=pdbs, seq_len=values["max_target_length"], dtype=values["dtype"],
                weight_dtype=values["weight_dtype"],
                # adam_pax is Adam as Pax implements it: the same two moments and FLOPs
                optimizer=_choice(values, "opt_type", OPTIMIZERS, source, where).replace("adam_pax", "adam"),
                remat_policy=_choice(values, "remat_policy", REMAT_POLICIES, source, where),
                attention=_choice(values, "attention", ATTENTION_KERNELS, source, where),
                attention_flops=_choice(values, "attention_flops", ("causal", "full"), source, where),
                num_vocab_tiling=values["num_vocab_tiling"], mu_dtype=values["mu_dtype"],
                gradient_accumulation_steps=values["gradient_accumulation_steps"],
                quantization=_not_yet(values, "quantization", QUANTIZATIONS, source, where),
                quantize_wgrad=values["quantization_local_shard_count"] != 0,
                optimizer_memory_host_offload=values["optimizer_memory_host_offload"],
                context_load_balance=values["context_parallel_load_balance"],
                context_strategy=_not_yet(values, "context_parallel_strategy", CONTEXT_STRATEGIES, source, where))


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
