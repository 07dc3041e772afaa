"""What a workload is, once loaded: the model, the step, the mesh sizes, and the whole, as frozen
dataclasses in SI units and MaxText's names (:mod:`tpusim.model.workload` reads them from YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from tpusim.model.pipeline import Pipeline

DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "int8": 1,
               "float8": 1, "fp8": 1}
OPTIMIZERS = ("adamw", "adam", "adam_pax", "sgd", "adafactor")
REMAT_POLICIES = ("full", "minimal", "none", "save_qkv_proj", "save_out_proj", "save_dot_except_mlp",
                  "save_dot_except_mlpwi", "minimal_offloaded", "qkv_proj_offloaded", "custom")
ATTENTION_KERNELS = ("flash", "dot_product", "autoselected", "splash", "cudnn_flash_te")
MESH_AXES = ("data", "fsdp", "sequence", "tensor", "expert", "pipeline")
DCN_AXES = ("data", "fsdp", "pipeline")
# MaxText's splash attention block sizes: the forward kernel's (q, kv), the backward's dkv kernel's and
# its dq kernel's; base.yml's default is 512 for each.
FLASH_BLOCK_KEYS = ("sa_block_q", "sa_block_kv", "sa_block_q_dkv", "sa_block_kv_dkv", "sa_block_q_dq",
                    "sa_block_kv_dq")


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

    def flash_fraction(self, layer: int | None, seq_len: int, block_q: int, block_kv: int) -> float:
        """The share of the T x T score grid a causal flash kernel computes for this layer: every
        ``block_q x block_kv`` block that holds an unmasked score, whole. jax's splash attention (the
        kernel MaxText calls) skips only the blocks its mask leaves empty and computes the others in
        full, masking inside them; MaxText takes each block size as min(sa_block_*, T). A global layer
        of n equal blocks a side computes (n + 1) / 2n of the grid, not 1/2; a local layer the blocks
        that meet its sliding window or its chunk. ``layer=None``: a global layer."""
        local = layer is not None and self.is_local(layer) and seq_len > self.sliding_window
        window = self.sliding_window if local else 0
        return block_fraction(seq_len, min(block_q, seq_len), min(block_kv, seq_len), window,
                               self.chunked and window > 0)

    @property
    def expert_ff(self) -> int:
        return self.d_ff_moe or self.d_ff

    def is_moe(self, layer: int) -> bool:
        """MaxText's MoE models: dense first layers, then every moe_layer_step-th layer has experts."""
        return self.num_experts > 1 and layer >= self.first_dense_layers and (layer + 1) % self.moe_layer_step == 0

    @property
    def moe_layers(self) -> int:
        """Layers with experts: after the first dense ones, every moe_layer_step-th (MaxText's models)."""
        return sum(1 for i in range(self.num_layers) if self.is_moe(i))

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
    flash_fused_bwd: bool = False  # sa_use_fused_bwd_kernel: splash's backward in one kernel, not dkv + dq
    iota_embed: bool = False  # use_iota_embed: the token embedding as a one-hot matmul, not a lookup (take)
    gradient_reduction: str = "xla"  # weight gradients over the shards: "xla" (libtpu's choice) or "reduce_scatter"
    collective_matmul: bool = True  # large tensor-parallel activation collectives beside their matmuls, as XLA's
    flash_blocks: tuple[int, ...] = (512,) * 6  # FLASH_BLOCK_KEYS' values: (q, kv) of the fwd, dkv and dq kernels
    # remat_policy custom: the tensors (compiler/memory.py's names) MaxText's per-tensor keys save in HBM
    # ("device") and in host memory ("offload"); the rest are recomputed
    custom_device: tuple[str, ...] = ()
    custom_offload: tuple[str, ...] = ()

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


@lru_cache(maxsize=256)
def block_fraction(t: int, bq: int, bkv: int, window: int, chunked: bool) -> float:
    """The share of a T x T score grid a flash kernel with ``bq x bkv`` blocks computes, causal, within a
    ``window`` (0: none) or chunks of it (:meth:`Model.flash_fraction`; the HLO importer's splash kernels
    call it directly). Query block i spans rows r0..r1; the key blocks it needs run
    from the one holding its first row's earliest visible key (0; r0 - W + 1 in a sliding window; the
    start of r0's chunk) to the one holding r1 (causal), a contiguous run."""
    area = 0
    for r0 in range(0, t, bq):  # (pure Python: numpy would cost ``tpusim run`` its import)
        r1 = min(r0 + bq, t) - 1
        if not window:
            first = 0
        elif chunked:
            first = (r0 // window) * window
        else:
            first = max(r0 - window + 1, 0)
        j_lo, j_hi = first // bkv, r1 // bkv
        area += (r1 - r0 + 1) * (min((j_hi + 1) * bkv, t) - j_lo * bkv)
    return area / (t * t)
