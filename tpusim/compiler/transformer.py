"""The ops of one training step of a sharded decoder-only Transformer, in the order XLA runs them.

Sharding follows MaxText: weights are split on their embed dim over fsdp x sequence x expert (x DCN
fsdp) and gathered before use (FSDP, ZeRO-3); heads, MLP width and vocab are split over tensor
(Megatron), with activations between blocks split over tensor too, so each block starts with an
all-gather and ends with a reduce-scatter (the book's TP: 4BD forward, 4BD backward per block);
sequence parallelism gathers K and V; expert parallelism sends tokens to their experts and back
with all-to-alls. Gradients are reduce-scattered over the weight shards and all-reduced over the
data axes.

XLA's latency-hiding scheduler is modelled by where each asynchronous collective is issued: a
layer's weights are gathered one layer ahead (forward and backward), gradients are reduced as soon
as their weight gradient exists and waited for by the optimizer (and, across slices, also at the
end of the next backward layer, as libtpu pipelines them). Tensor- and sequence-parallel
collectives sit on the critical path (libtpu's default compile of FSDP x TP has them synchronous).
"""

from __future__ import annotations

from tpusim.compiler import context, quant, zero
from tpusim.compiler.shapes import Shapes
from tpusim.model.mesh import Mesh
from tpusim.model.spec import MESH_AXES
from tpusim.compiler.memory import layer_activation_bytes
from tpusim.compiler.shapes import offloaded_tensors
from tpusim.sim.program import COLLECTIVE, COMPUTE, HOST, Op
from tpusim.model.workload import Workload

# VPU FLOPs per element of the elementwise ops (their exact count hardly matters next to the matmuls).
NORM_FLOPS, ROPE_FLOPS, ACT_FLOPS, ADD_FLOPS, SOFTMAX_XENT_FLOPS = 4, 6, 5, 1, 6
ADAM_FLOPS_PER_PARAM, SGD_FLOPS_PER_PARAM = 12, 2
# A flash (splash) backward against its forward's 2 matmuls (QK^T, PV), as jax's splash attention
# kernel writes it (jax.experimental.pallas.ops.tpu.splash_attention, the kernel MaxText calls; its
# libtpu compile shows the kernels: fwd, then dkv and dq). MaxText's default (sa_use_fused_bwd_kernel:
# false) runs two kernels, each recomputing QK^T and P: dkv (K Q^T, P^T dO, V dO^T, dS^T Q) and dq
# (Q K^T, dO V^T, dS K): 4 + 3 matmuls, each kernel over its own blocks. Fused, one kernel does both: 5.
FLASH_DKV_MATMULS, FLASH_DQ_MATMULS, FLASH_FUSED_BWD_MATMULS = 4, 3, 5
# Vector ops per attention score inside a flash kernel (counted from the algorithm, not fitted).
# Forward: scale, running max, subtract, exp (EUP: one per lane per cycle, taken as a VPU op), row
# sum, cast to bf16 = 6. Backward (dkv, or the fused kernel): recompute scale, subtract, exp, then
# dP - delta, x P, scale, cast = 7; a separate dq kernel does it again but for one cast: 6. The causal
# mask costs a select on the diagonal blocks only (ignored).
FLASH_VPU_OPS_FWD, FLASH_VPU_OPS_BWD, FLASH_VPU_OPS_BWD_DQ = 6, 7, 6
# Dense attention (einsums, no kernel) as XLA compiles it (traces/xla_aot_chips): bytes per score.
# The QK^T matmul writes f32 scores (4) and the PV matmul reads bf16 probabilities (2); between them
# the softmax reads the scores and writes the probabilities (4 + 2); its backward reads P and dP
# and writes dS (2 + 4 + 2). VPU ops per score: max, subtract, exp, sum, divide.
DENSE_SCORE_BYTES_MXU, DENSE_SOFTMAX_BYTES_FWD, DENSE_SOFTMAX_BYTES_BWD, DENSE_SOFTMAX_FLOPS = 6, 6, 8, 5
# Weights kept in f32 and run in bf16 (weight_dtype float32, dtype bfloat16): each step casts the
# local shard to bf16 once (read 4 B, write 2 B per parameter); the backward re-gathers that copy.
CAST_FLOPS = 1
DENSE_BWD_OVER_FWD = 2.0
# Weight gradients reduced over a group of this many devices or more, the whole slice with its data axis, are
# all-reduced whole, synchronously (no -start/-done), and each device slices its shard out; over fewer, or
# beside a tensor axis, XLA reduce-scatters them (windowed einsums, reduce-scatters or async all-reduce-scatter
# fusions) beside the backward's matmuls. libtpu 0.0.42.1's compiles of a scanned MLP with MaxText's sharding
# (traces/aot_grad_reduction.py): FSDP alone on v4, v5e, v5p and v6e all-reduces whole at 64, 128 and 256
# devices, reduce-scatters at 4 to 32; beside tensor 4, reduce-scatters at 16, 32 and 64. And the full-size
# development-set compiles: all-reduced on v4 22B (64), v5e 16B (256), v6e Llama 70B (64), reduce-scattered
# on v6e Llama 8B (8) and v5p 32B (16 x tensor 4) (docs/VALIDATION.md).
FSDP_ALL_REDUCE_MIN_DEVICES = 64
# Tensor-parallel activation collectives XLA writes as collective matmuls (windowed einsums: the activation's
# shards passed around the tensor ring by async collective-permutes beside the matmul's chunks, the partial sums
# added by separate fusions) when the tensor group's step has this many tokens or more: the reduce-scatters after
# the O and down projections, and in the backward the all-gathers of their output gradients and the reduce-scatters
# of the input gradients; the forward's all-gathers before Q/K/V and the MLP stay synchronous. libtpu 0.0.42.1's
# compiles of MaxText's layer with the v5p 32B run's flags (traces/aot_tp_collective_matmul.py; D 4096 and 8192 on
# v5p fsdp 16 x tensor 4): every one of them at 8192 tokens and more, about none at 2048; at 4096 the attention's
# only (modelled as none). docs/VALIDATION.md.
COLLECTIVE_MATMUL_MIN_TOKENS = 8192
# A layer's offloaded tensors (host-offload remat), grouped by the op of the next layer that writes the same
# tensor again, in the order the layer makes them. libtpu's compiles of the tpu-recipes Llama runs
# (traces/xla_aot_memory/v6e*: layer input and Q/K/V/out projections offloaded) copy layer i's tensors into
# their host stacks at the start of iteration i+1 (the loop carries them) and wait for each copy before the
# iteration writes that tensor again: Q's, K's and V's before its projections, so the wait there is the PCIe
# time of the input's, Q's, K's and V's copies, which DMA serves in issue order (docs/VALIDATION.md).
OFFLOAD_GROUPS = (("attn_in", ("input", "q_proj", "k_proj", "v_proj")), ("attention", ("context",)),
                  ("o_proj", ("o_proj",)), ("mlp", ("mlp_gate", "mlp_up")))


class _Builder:
    """Appends ops; a compute op waits for the collectives registered with :meth:`wait` before it."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.ops: list[Op] = []
        self._pending: list[int] = []
        self.last_compute = -1
        self.prefix = ""  # "microbatch_i/" under gradient accumulation

    def wait(self, *idx: int | None) -> None:
        self._pending += [i for i in idx if i is not None]

    def compute(self, name, category, *, flops, hbm, layer=-1, phase="forward", mxu=None, recompute=False,
                deps=(), vpu=0.0, mxu_dtype="") -> int:
        idx = len(self.ops)
        all_deps = tuple(dict.fromkeys([*self._pending, *(d for d in deps if d is not None)]))
        self.ops.append(Op(index=idx, name=self.prefix + name, stream=COMPUTE, category=category, layer=layer, phase=phase,
                           flops=float(flops), hbm_bytes=float(hbm), mxu_shape=mxu, deps=all_deps,
                           recompute=recompute, vpu_flops=float(vpu), mxu_dtype=mxu_dtype))
        self._pending = []
        self.last_compute = idx
        return idx

    def host_copy(self, name, kind, *, nbytes, layer, phase, deps) -> int:
        """An asynchronous HBM <-> host copy over PCIe (``copy-to-host`` or ``copy-from-host``)."""
        idx = len(self.ops)
        self.ops.append(Op(index=idx, name=self.prefix + name, stream=HOST, category=kind, layer=layer, phase=phase,
                           bytes=float(nbytes), deps=tuple(d for d in deps if d is not None and d >= 0)))
        return idx

    def collective(self, name, kind, *, v, mesh_axes, layer=-1, phase="forward", deps=None) -> int | None:
        """A collective over ``mesh_axes`` (those of size 1 dropped); None when the group is one device.

        ``deps`` default to the last compute op: the collective is issued right after it.
        """
        axes = tuple(a for a in mesh_axes if self.mesh.size(a) > 1)
        if not axes or v <= 0:
            return None
        idx = len(self.ops)
        deps = (self.last_compute,) if deps is None and self.last_compute >= 0 else (deps or ())
        self.ops.append(Op(index=idx, name=self.prefix + name, stream=COLLECTIVE, category=kind, layer=layer, phase=phase,
                           bytes=float(v), mesh_axes=axes, axes=self.mesh.axes_of(*axes),
                           deps=tuple(d for d in deps if d is not None and d >= 0)))
        return idx


def build_ops(w: Workload, sh: Shapes, mesh: Mesh, *, local_params: float, remat_to_fit: float = 0.0) -> list[Op]:
    """The step's ops on one device; ``local_params`` is this device's shard of the parameters.

    ``remat_to_fit``: bytes of a layer's backward transients XLA must free to fit the HBM
    (:func:`tpusim.compiler.memory.peak_memory`). Its rematerialisation pass then recomputes whole
    matmul outputs a second time inside each layer's backward; libtpu's compile of MaxText v4 22B
    (``traces/xla_aot_memory/v4_22b_full``, ops named ``*.remat``, none at 4 sequences where HBM is not
    tight) recomputes an F-wide one and Q, K, V. tpusim recomputes the layer's widest matmul outputs
    first until they cover the bytes (XLA's own choice depends on its cost heuristic and live ranges)."""
    b = _Builder(mesh)
    m = w.model
    L = m.num_layers
    ab = sh.act_bytes
    weight_axes = ("fsdp", "sequence", "expert", "dcn_fsdp")
    expert_axes = ("fsdp", "sequence", "dcn_fsdp")
    data_axes = ("data", "dcn_data")
    grad_syncs: list[int | None] = []

    # Attention geometry. GQA: Q, K, V projections of D; MLA (DeepSeek-V2 s2.1): Q through a rank
    # q_lora down-projection (or straight), K and V up from a shared rank-kv_lora latent (plus one
    # shared RoPE key); the down-projections are not split over tensor (MaxText: q_lora/kv_lora on fsdp).
    if m.attention_type == "mla":
        qk_dim, v_dim = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        q_in = ([("q_a", sh.d, m.q_lora_rank), ("q_b", m.q_lora_rank, sh.heads * qk_dim)] if m.q_lora_rank
                else [("q_proj", sh.d, sh.heads * qk_dim)])
        attn_in = [*q_in, ("kv_a", sh.d, m.kv_lora_rank + m.qk_rope_head_dim),
                   ("kv_b", m.kv_lora_rank, sh.heads * (m.qk_nope_head_dim + v_dim))]
        q_width, kv_width, o_width = sh.heads * qk_dim, sh.heads * (qk_dim + v_dim) // 2, sh.heads * v_dim
    else:
        qk_dim = v_dim = sh.head_dim
        q_width, kv_width = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
        o_width = q_width
        attn_in = [("q_proj", sh.d, q_width), ("k_proj", sh.d, kv_width), ("v_proj", sh.d, kv_width)]

    is_moe = m.is_moe

    # Weight matrices of a layer: (name, K, N, sharding axes) on one device, after the gather.
    def layer_weights(layer: int) -> list[tuple[str, int, int, tuple]]:
        ws = [*((name, k, n, weight_axes) for name, k, n in attn_in), ("o_proj", o_width, sh.d, weight_axes)]
        moe = is_moe(layer)
        e = sh.experts_local if moe else 1
        axes = expert_axes if moe else weight_axes
        ff = sh.ff if moe else sh.ff_dense
        mlp = ["mlp_gate", "mlp_up", "mlp_down"] if m.gated_mlp else ["mlp_up", "mlp_down"]
        for name in mlp:
            k, n = (ff, sh.d) if name == "mlp_down" else (sh.d, ff)
            ws.append((name, k * e, n, axes))  # experts stacked: E_local x D x F
        if moe:
            ws.append(("router", sh.d, m.num_experts, weight_axes))
            if sh.ff_shared:  # shared experts: a dense MLP every token goes through
                for name in mlp:
                    k, n = (sh.ff_shared, sh.d) if name == "mlp_down" else (sh.d, sh.ff_shared)
                    ws.append((name.replace("mlp_", "shared_"), k, n, weight_axes))
        return ws

    def gather_weights(layer: int, phase: str, deps) -> dict[str, int | None]:
        return {name: b.collective(f"all-gather/layer_{layer}/{phase}/{name}", "all-gather",
                                   v=k * n * quant.gathered_bytes(w, name, ab),
                                   mesh_axes=axes, layer=layer, phase=phase, deps=deps)
                for name, k, n, axes in layer_weights(layer)}

    # Gradient all-reduces across slices, by the backward layer that issued them. XLA pipelines them
    # by one layer (libtpu AOT compile of a scanned model on 2 slices, docs/VALIDATION.md): issued as
    # host transfers (megascale send/recv) at the start of the next layer's loop iteration and waited
    # for at its end, so every backward layer ends with a cross-slice wait.
    dcn_grad_syncs: dict[int, list[int]] = {}

    def whole_gradient_all_reduce(axes: tuple) -> bool:
        """Whether XLA reduces a weight gradient over ``axes`` as a synchronous all-reduce of the whole
        gradient (each device then keeps its slice) instead of an overlapped reduce-scatter: when the group
        spans FSDP_ALL_REDUCE_MIN_DEVICES devices or more on one slice and, with the data axis, every device
        of it (a tensor or expert axis beside it leaves the reduce-scatter; libtpu's compiles)."""
        return (w.step.gradient_reduction == "xla" and mesh.size("dcn_fsdp") == 1
                and mesh.size(*axes) >= FSDP_ALL_REDUCE_MIN_DEVICES
                and mesh.size(*axes, "data") == mesh.size(*MESH_AXES))
    last_microbatch = [True, False]  # (this is the last microbatch, a microbatch ran before)

    def reduce_grad(name: str, layer: int, nbytes: float, axes: tuple, wgrad: int) -> None:
        whole = whole_gradient_all_reduce(axes)  # the whole gradient, then this device's slice of it
        kind_over_shards = "all-reduce" if whole else "reduce-scatter"
        rs = b.collective(f"{kind_over_shards}/{name}", kind_over_shards, v=nbytes, mesh_axes=axes, layer=layer,
                          phase="backward", deps=(wgrad,))
        if whole:
            b.wait(rs)  # synchronous: the next op waits for it
        shards = mesh.size(*axes)
        if not last_microbatch[0]:  # the data-axis all-reduce waits for the last microbatch
            grad_syncs.append(rs)
            return
        if accumulate > 1:  # the all-reduce moves the accumulator, in the parameters' dtype (zeros_like)
            nbytes = nbytes / ab * sh.weight_bytes
        kind = zero.grad_reduction_kind(sh)  # ZeRO-1/2: each device keeps only its shard of the sum
        ar = b.collective(f"{kind}/{name}", kind, v=nbytes / shards, mesh_axes=data_axes, layer=layer,
                          phase="backward", deps=(rs if rs is not None else wgrad,))
        grad_syncs.append(ar if ar is not None else rs)
        if ar is not None and mesh.size("dcn_data") > 1:
            dcn_grad_syncs.setdefault(layer if layer >= 0 else L, []).append(ar)

    def matmul(name, m_, k_, n_, *, layer, phase, weight=None, recompute=False, part=""):
        """``part``: a suffix naming one chunk of the matmul (a collective matmul's)."""
        q = quant.quantized(w, name)  # AQT: an 8-bit matmul after quantizing its operands
        if q:
            return quant.quantized_matmul(b, name + part, m_, k_, n_, dtype=q, act_bytes=ab, layer=layer,
                                          phase=phase, recompute=recompute, deps=(weight,))
        return b.compute(name + part, "matmul", flops=2 * m_ * k_ * n_, hbm=ab * (m_ * k_ + k_ * n_ + m_ * n_),
                         mxu=(int(m_), int(k_), int(n_)), layer=layer, phase=phase, recompute=recompute,
                         deps=(weight,))

    # Tensor-parallel activation collectives beside the matmuls (XLA's collective matmul), when the step has
    # enough tokens (COLLECTIVE_MATMUL_MIN_TOKENS): the reduce-scatter of a matmul's output starts after its
    # first chunk, the all-gather of a backward input is waited for by the last chunk of the matmul reading it,
    # and the partial sums a reduce-scatter's ring carries are added by the TensorCore (``cm``, below).
    def tensor_collective(kind, name, *, layer, phase) -> int | None:
        """An all-gather or reduce-scatter of a block's activations (tokens x D) over tensor."""
        return b.collective(name, kind, v=tok * d * ab, mesh_axes=("tensor",), layer=layer, phase=phase)

    def scattered(name, rs_name, m_, k_, n_, *, layer, phase, weight=None, recompute=False) -> int | None:
        """A matmul whose (m, n) output is reduce-scattered over tensor; returns the reduce-scatter."""
        kw = dict(layer=layer, phase=phase, weight=weight, recompute=recompute)
        matmul(name, m_, k_, n_ / sh.tp if cm else n_, **kw)
        rs = tensor_collective("reduce-scatter", rs_name, layer=layer, phase=phase)
        if cm:
            matmul(name, m_, k_, n_ * (sh.tp - 1) / sh.tp, part="/cm_rest", **kw)
            elementwise(f"{name}/cm_partial_sums", tok * d / sh.tp * (sh.tp - 1), ADD_FLOPS, 3, layer=layer,
                        phase=phase, recompute=recompute)
        return rs

    def elementwise(name, elems, flops_per, arrays, *, layer, phase, category="elementwise", recompute=False,
                    nbytes=None):
        return b.compute(name, category, flops=flops_per * elems, hbm=arrays * elems * (nbytes or ab),
                         layer=layer, phase=phase, recompute=recompute)

    tok, d, t_full = sh.tok, sh.d, sh.seq_len
    # (see scattered(): tensor-parallel activation collectives as collective matmuls)
    cm = sh.tp > 1 and w.step.collective_matmul and tok >= COLLECTIVE_MATMUL_MIN_TOKENS
    context.check(w, mesh)
    ring = context.ring(w, mesh)  # context_parallel_strategy: ring (else K, V all-gathered)
    attn_fwd_flops = 2 * tok * t_full * sh.heads * (qk_dim + v_dim)  # QK^T and PV over the whole T x T grid
    scores = tok * t_full * sh.heads  # attention scores in that grid, on this device
    blocks = w.step.flash_blocks

    def span(layer: int, kernel: int = 0) -> float:
        """The share of the grid a kernel computes (0 forward, 1 dkv or the fused backward, 2 dq): a
        flash kernel skips the blocks its causal (or window, chunk) mask leaves empty; dense attention
        computes every score and masks."""
        if not w.step.flash:
            return 1.0
        return m.flash_fraction(layer, t_full, blocks[2 * kernel], blocks[2 * kernel + 1])

    def kv_share(layer: int, kernel: int = 0) -> float:
        """The share of K and V a layer's kernel reads: all of it for a global layer, the window's part
        for a local one."""
        return span(layer, kernel) / span(None, kernel) if w.step.flash else 1.0

    regathered: dict[str, int | None] = {}  # this layer's recompute's gathers, for its weight gradients

    def regather(only_for_wgrad: bool, tensor: str, gather: int | None) -> None:
        """A tensor-parallel gather of a block's normed input. Waited for at once, unless the recompute
        gathers it again only for the backward's weight gradients: libtpu's compile of MaxText v5p 32B with
        the run's flags (async collective fusion) issues those re-gathers asynchronously, waited for by the
        weight-gradient matmul (traces/xla_aot_memory/v5p_32b_full; docs/VALIDATION.md)."""
        if only_for_wgrad:
            regathered[tensor] = gather
        else:
            b.wait(gather)

    def forward_layer(layer: int, weights: dict, *, phase: str, recompute: bool, on_start=None,
                      host_waits=None) -> None:
        """One decoder layer forward; during the backward pass, only what the remat policy drops.

        ``on_start(op)`` is called once the layer's first op exists (to issue the next prefetch);
        ``host_waits`` are the layer before's copies to host by OFFLOAD_GROUPS, each waited for before
        the op that writes its tensors again.
        """
        hw = host_waits or {}
        p = f"layer_{layer}/{'recompute' if recompute else 'fwd'}"
        redo = (lambda name: not recompute or sh.saved is None or name not in sh.saved)
        ew = dict(layer=layer, phase=phase, recompute=recompute)
        first = elementwise(f"{p}/attn_norm", tok * d / sh.tp, NORM_FLOPS, 2, **ew)
        if on_start:
            on_start(first)
        regather(recompute and not any(redo(name) for name, _, _ in attn_in), "attn_in",
                 tensor_collective("all-gather", f"all-gather/{p}/attn_in", layer=layer, phase=phase))
        b.wait(hw.get("attn_in"))
        for name, k_, n_ in attn_in:
            if redo(name):
                matmul(f"{p}/{name}", tok, k_, n_, layer=layer, phase=phase, weight=weights[name],
                       recompute=recompute)
        elementwise(f"{p}/rope", tok * (q_width + kv_width), ROPE_FLOPS, 2, **ew)
        kv_bytes = sh.seqs * t_full * kv_width * ab  # one of K, V over the whole sequence
        if not ring:
            for kv in ("k", "v"):
                b.wait(b.collective(f"all-gather/{p}/{kv}_context", "all-gather", v=kv_bytes,
                                    mesh_axes=("sequence",), layer=layer, phase=phase))
        imb = context.imbalance(w, sh.sp, local_layer=m.is_local(layer))
        r = span(layer) * imb
        attn_hbm = ab * (2 * tok * q_width + 2 * sh.seqs * t_full * kv_width * kv_share(layer) * imb)
        if not w.step.flash:  # dense: QK^T writes f32 scores and PV reads bf16 probabilities through HBM
            attn_hbm += DENSE_SCORE_BYTES_MXU * scores
        attn = dict(flops=attn_fwd_flops * r, hbm=attn_hbm, layer=layer, phase=phase, mxu=(int(tok), qk_dim, t_full),
                    recompute=recompute, vpu=FLASH_VPU_OPS_FWD * scores * r if w.step.flash else 0.0)
        b.wait(hw.get("attention"))
        if ring:
            context.ring_forward(b, p, n=sh.sp, kv_bytes=kv_bytes, **attn)
        else:
            b.compute(f"{p}/attention", "attention", **attn)
        if not w.step.flash and not recompute:  # ... and a softmax between them on the VPU (XLA's
            # separate fusions; when rematerialised, XLA fuses it into the softmax backward)
            elementwise(f"{p}/softmax", scores, DENSE_SOFTMAX_FLOPS, DENSE_SOFTMAX_BYTES_FWD, nbytes=1, **ew)
        b.wait(hw.get("o_proj"))
        if redo("o_proj"):
            b.wait(scattered(f"{p}/o_proj", f"reduce-scatter/{p}/attn_out", tok, o_width, d, layer=layer, phase=phase,
                             weight=weights["o_proj"], recompute=recompute))
        else:
            b.wait(tensor_collective("reduce-scatter", f"reduce-scatter/{p}/attn_out", layer=layer, phase=phase))
        elementwise(f"{p}/attn_residual", tok * d / sh.tp, ADD_FLOPS, 3, **ew)
        elementwise(f"{p}/mlp_norm", tok * d / sh.tp, NORM_FLOPS, 2, **ew)
        moe = is_moe(layer)
        ff = sh.ff if moe else sh.ff_dense
        gated = ("mlp_gate", "mlp_up") if m.gated_mlp else ("mlp_up",)
        regather(recompute and not moe and not any(redo(name) for name in gated), "mlp_in",
                 tensor_collective("all-gather", f"all-gather/{p}/mlp_in", layer=layer, phase=phase))
        if moe and sh.ff_shared:  # shared experts: every token, beside the routed ones
            for name in gated:
                if redo(name.replace("mlp_", "shared_")):
                    matmul(f"{p}/{name.replace('mlp_', 'shared_')}", tok, d, sh.ff_shared, layer=layer, phase=phase,
                           weight=weights[name.replace("mlp_", "shared_")], recompute=recompute)
            elementwise(f"{p}/shared_act", tok * sh.ff_shared, ACT_FLOPS, 3 if m.gated_mlp else 2, **ew)
            if not recompute:  # (dead in the recomputation, as the routed down-projection below)
                matmul(f"{p}/shared_down", tok, sh.ff_shared, d, layer=layer, phase=phase,
                       weight=weights["shared_down"])
        rows = tok
        b.wait(hw.get("mlp"))
        if moe:
            matmul(f"{p}/router", tok, d, m.num_experts, layer=layer, phase=phase, weight=weights["router"],
                   recompute=recompute)
            elementwise(f"{p}/router_topk", tok * m.num_experts, 8, 2, **ew)
            rows = tok * sh.topk
            b.wait(b.collective(f"all-to-all/{p}/dispatch", "all-to-all", v=rows * d * ab, mesh_axes=("expert",),
                                layer=layer, phase=phase))
        for name in gated:
            if redo(name):
                matmul(f"{p}/{name}", rows, d, ff, layer=layer, phase=phase, weight=weights[name],
                       recompute=recompute)
        elementwise(f"{p}/mlp_act", rows * ff, ACT_FLOPS, 3 if m.gated_mlp else 2, **ew)
        if recompute:
            # The layer's output is not needed by its backward pass (the next layer's input was kept),
            # so XLA drops the rest of the recomputation as dead code: no down-projection, no combine,
            # no reduce-scatter (seen in the libtpu compile of traces/xla_aot/fsdp_remat_*).
            return
        if not moe and redo("mlp_down"):
            b.wait(scattered(f"{p}/mlp_down", f"reduce-scatter/{p}/mlp_out", rows, ff, d, layer=layer, phase=phase,
                             weight=weights["mlp_down"], recompute=recompute))
        else:
            if redo("mlp_down"):
                matmul(f"{p}/mlp_down", rows, ff, d, layer=layer, phase=phase, weight=weights["mlp_down"],
                       recompute=recompute)
            if moe:
                b.wait(b.collective(f"all-to-all/{p}/combine", "all-to-all", v=rows * d * ab, mesh_axes=("expert",),
                                    layer=layer, phase=phase))
                elementwise(f"{p}/combine", tok * sh.topk * d, 2, 2, **ew)
            b.wait(tensor_collective("reduce-scatter", f"reduce-scatter/{p}/mlp_out", layer=layer, phase=phase))
        elementwise(f"{p}/mlp_residual", tok * d / sh.tp, ADD_FLOPS, 3, **ew)

    def backward_matmul(p, name, m_, k_, n_, *, layer, weight, wshape, axes, x=None, gathered=None,
                        scatter=None) -> int | None:
        """dX = dY W^T and dW = X^T dY for a forward (m, k) x (k, n); then the gradient's reduction. ``x``:
        the recompute's re-gather of the input X (``regathered``), if dW waits for it. As a collective matmul
        (``cm``): ``gathered``, the all-gather of dY that dX's last chunk waits for; ``scatter``, the name of
        dX's reduce-scatter, issued after dX's first chunk and returned."""
        dgrad = f"{p}/{name}/dgrad"
        kw = dict(layer=layer, phase="backward", weight=weight)
        rs = None
        if gathered is not None:  # contract dY's shards as they arrive: the last one after the gather
            matmul(dgrad, m_, n_ * (sh.tp - 1) / sh.tp, k_, **kw)
            b.wait(gathered)
            matmul(dgrad, m_, n_ / sh.tp, k_, part="/cm_rest", **kw)
        elif scatter is not None:
            rs = scattered(dgrad, scatter, m_, n_, k_, **kw)
        else:
            matmul(dgrad, m_, n_, k_, **kw)
        b.wait(regathered.get(x))
        wg = matmul(f"{p}/{name}/wgrad", k_, m_, n_, layer=layer, phase="backward")
        reduce_grad(f"layer_{layer}/{name}", layer, wshape[0] * wshape[1] * ab, axes, wg)
        return rs

    def fit_recompute(layer: int) -> list[tuple[str, float, int, int]]:
        """The matmuls XLA recomputes again to free ``remat_to_fit`` bytes: the widest outputs first."""
        if remat_to_fit <= 0:
            return []
        rows = tok * sh.topk if is_moe(layer) else tok
        ff = sh.ff if is_moe(layer) else sh.ff_dense
        gated = ("mlp_gate", "mlp_up") if m.gated_mlp else ("mlp_up",)
        outputs = [(name, tok, k_, n_) for name, k_, n_ in attn_in] + [("o_proj", tok, o_width, d)]
        outputs += [(name, rows, d, ff) for name in gated] + [("mlp_down", rows, ff, d)]
        chosen, freed = [], 0.0
        for out in sorted(outputs, key=lambda o: -o[1] * o[3]):
            if freed >= remat_to_fit:
                break
            chosen.append(out)
            freed += out[1] * out[3] * ab
        return chosen

    def backward_layer(layer: int, weights: dict, on_start) -> None:
        p = f"layer_{layer}/bwd"
        ws = {name: (k, n, axes) for name, k, n, axes in layer_weights(layer)}
        regathered.clear()
        if sh.saved is not None:  # rematerialise what the policy did not keep
            forward_layer(layer, weights, phase="backward", recompute=True, on_start=on_start)
        for name, m_, k_, n_ in fit_recompute(layer):
            matmul(f"{p}/remat_to_fit/{name}", m_, k_, n_, layer=layer, phase="backward", weight=weights[name],
                   recompute=True)
        ew = dict(layer=layer, phase="backward")
        first = elementwise(f"{p}/mlp_residual", tok * d / sh.tp, ADD_FLOPS, 3, **ew)
        if sh.saved is None:
            on_start(first)
        moe = is_moe(layer)
        dense_cm = cm and not moe  # (an expert layer's tensor collectives stay synchronous)
        ag = tensor_collective("all-gather", f"all-gather/{p}/mlp_out", layer=layer, phase="backward")
        if not dense_cm:
            b.wait(ag)
        ff = sh.ff if moe else sh.ff_dense
        gated = ("mlp_gate", "mlp_up") if m.gated_mlp else ("mlp_up",)
        rows = tok * sh.topk if moe else tok
        if moe:
            b.wait(b.collective(f"all-to-all/{p}/combine", "all-to-all", v=rows * d * ab, mesh_axes=("expert",),
                                layer=layer, phase="backward"))
        backward_matmul(p, "mlp_down", rows, ff, d, layer=layer, weight=weights["mlp_down"],
                        wshape=ws["mlp_down"][:2], axes=ws["mlp_down"][2], gathered=ag if dense_cm else None)
        elementwise(f"{p}/mlp_act", rows * ff, 2 * ACT_FLOPS, 4 if m.gated_mlp else 3, **ew)
        rs = None
        for name in gated:
            last = dense_cm and not sh.ff_shared and name == gated[-1]
            rs = backward_matmul(p, name, rows, d, ff, layer=layer, weight=weights[name], wshape=ws[name][:2],
                                 axes=ws[name][2], x="mlp_in", scatter=f"reduce-scatter/{p}/mlp_in" if last else None)
        if moe:
            b.wait(b.collective(f"all-to-all/{p}/dispatch", "all-to-all", v=rows * d * ab, mesh_axes=("expert",),
                                layer=layer, phase="backward"))
            backward_matmul(p, "router", tok, d, m.num_experts, layer=layer, weight=weights["router"],
                            wshape=ws["router"][:2], axes=ws["router"][2])
        if moe and sh.ff_shared:
            backward_matmul(p, "shared_down", tok, sh.ff_shared, d, layer=layer, weight=weights["shared_down"],
                            wshape=ws["shared_down"][:2], axes=ws["shared_down"][2])
            elementwise(f"{p}/shared_act", tok * sh.ff_shared, 2 * ACT_FLOPS, 4 if m.gated_mlp else 3, **ew)
            for name in (n.replace("mlp_", "shared_") for n in gated):
                backward_matmul(p, name, tok, d, sh.ff_shared, layer=layer, weight=weights[name],
                                wshape=ws[name][:2], axes=ws[name][2])
        b.wait(rs if rs is not None else tensor_collective("reduce-scatter", f"reduce-scatter/{p}/mlp_in", layer=layer,
                                                           phase="backward"))
        elementwise(f"{p}/mlp_norm", tok * d / sh.tp, 2 * NORM_FLOPS, 3, **ew)
        ag = tensor_collective("all-gather", f"all-gather/{p}/attn_out", layer=layer, phase="backward")
        if not cm:
            b.wait(ag)
        backward_matmul(p, "o_proj", tok, o_width, d, layer=layer, weight=weights["o_proj"],
                        wshape=ws["o_proj"][:2], axes=ws["o_proj"][2], gathered=ag if cm else None)
        two_kernels = w.step.flash and not w.step.flash_fused_bwd  # splash's dkv and dq kernels
        if not w.step.flash:  # dense softmax backward: dS = P (dP - rowsum(dP P)), through HBM
            elementwise(f"{p}/softmax", scores, DENSE_SOFTMAX_FLOPS, DENSE_SOFTMAX_BYTES_BWD, nbytes=1, **ew)
        else:  # delta = rowsum(O dO), before the kernels: reads O and dO, writes f32 per query and head
            b.compute(f"{p}/attention_delta", "elementwise", flops=2 * tok * q_width,
                      hbm=2 * ab * tok * q_width + 4 * tok * sh.heads, **ew)
        imb = context.imbalance(w, sh.sp, local_layer=m.is_local(layer))
        r, r_dq = span(layer, 1) * imb, span(layer, 2) * imb
        # reads Q, K, V, dO and writes dQ, dK, dV (4 of Q's size, 4 of K's); a second kernel reads all four again
        reads = 6 if two_kernels else 4
        if two_kernels:  # (the forward's flops are its 2 matmuls of the score block)
            flops = attn_fwd_flops / 2 * (FLASH_DKV_MATMULS * r + FLASH_DQ_MATMULS * r_dq)
            vpu = scores * (FLASH_VPU_OPS_BWD * r + FLASH_VPU_OPS_BWD_DQ * r_dq)
        elif w.step.flash:
            flops, vpu = attn_fwd_flops / 2 * FLASH_FUSED_BWD_MATMULS * r, FLASH_VPU_OPS_BWD * scores * r
        else:
            flops, vpu = DENSE_BWD_OVER_FWD * attn_fwd_flops * r, 0.0
        kv_read = sh.seqs * t_full * kv_width * kv_share(layer, 1) * imb
        attn = dict(flops=flops, hbm=ab * reads * (tok * q_width + kv_read),
                    layer=layer, mxu=(int(tok), qk_dim, t_full), vpu=vpu)
        if ring:
            context.ring_backward(b, p, n=sh.sp, kv_bytes=sh.seqs * t_full * kv_width * ab, **attn)
        else:
            b.compute(f"{p}/attention", "attention", phase="backward", **attn)
            for kv in ("k", "v"):
                b.wait(b.collective(f"reduce-scatter/{p}/{kv}_context", "reduce-scatter",
                                    v=sh.seqs * t_full * kv_width * ab, mesh_axes=("sequence",), layer=layer,
                                    phase="backward"))
        elementwise(f"{p}/rope", tok * (q_width + kv_width), ROPE_FLOPS, 2, **ew)
        rs = None
        for name, k_, n_ in attn_in:  # (GQA: q, k, v, the order libtpu's compile runs them)
            last = cm and m.attention_type != "mla" and name == attn_in[-1][0]  # (MLA's last one reads a latent)
            rs = backward_matmul(p, name, tok, k_, n_, layer=layer, weight=weights[name], wshape=ws[name][:2],
                                 axes=ws[name][2], x="attn_in", scatter=f"reduce-scatter/{p}/attn_in" if last else None)
        b.wait(rs if rs is not None else tensor_collective("reduce-scatter", f"reduce-scatter/{p}/attn_in", layer=layer,
                                                           phase="backward"))
        elementwise(f"{p}/attn_norm", tok * d / sh.tp, 2 * NORM_FLOPS, 3, **ew)

    # ---- forward ---------------------------------------------------------------------------------
    if sh.weight_bytes > ab and not sh.zero_stage:  # f32 master weights: this device's shard is cast to bf16 once, before
        # anything is gathered (XLA converts before the all-gather, which then moves half the bytes)
        b.compute("weight_cast", "elementwise", flops=CAST_FLOPS * local_params,
                  hbm=(sh.weight_bytes + ab) * local_params, layer=-1, phase="forward")
    table = sh.vocab * d
    accumulate = w.step.gradient_accumulation_steps

    def one_microbatch() -> None:
        """Forward and backward of one (micro)batch: weights gathered afresh, gradients reduced."""
        dcn_grad_syncs.clear()
        start = () if not last_microbatch[1] else (b.last_compute,)  # a later microbatch: after the one before
        # The token embedding (MaxText's Embed): with use_iota_embed a one-hot matmul against the gathered
        # table; without (MaxText's default), a lookup (jnp.take), which XLA runs on each device's slice of
        # the table (D over the weight axes) and reshards with an all-to-all of the activations (libtpu's
        # compile of traces/model.py: no table gather, two all-to-alls of tokens x D; docs/VALIDATION.md).
        # A tied table is gathered either way, for the unembedding.
        iota = w.step.iota_embed
        embed_ag = (b.collective("all-gather/embedding", "all-gather", v=table * ab, mesh_axes=weight_axes, deps=start)
                    if iota or m.tied_embeddings else None)
        fwd_weights = {0: gather_weights(0, "forward", start)}
        if iota:
            matmul("embedding/fwd/one_hot", tok, sh.vocab, d, layer=-1, phase="forward", weight=embed_ag)
        else:
            b.compute("embedding/lookup", "embedding", flops=0.0, hbm=2 * tok * d * ab, layer=-1, phase="forward",
                      deps=start)
            b.wait(b.collective("all-to-all/embedding", "all-to-all", v=tok * d * ab, mesh_axes=weight_axes))
        unembed_ag = embed_ag if m.tied_embeddings else None
        # Host offload (remat policies that move saved activations to host memory): copied out after each
        # layer's forward, one copy per group of OFFLOAD_GROUPS, each waited for by the next layer before it
        # writes the group's tensors again; copied back one layer ahead of its backward.
        offloaded = offloaded_tensors(w.step)
        offload = layer_activation_bytes(w, sh, kept=offloaded) if offloaded else 0.0
        groups = [(g, layer_activation_bytes(w, sh, kept=tuple(t for t in names if t in offloaded)))
                  for g, names in OFFLOAD_GROUPS]
        to_host: dict[int, dict[str, int]] = {}
        from_host: dict[int, int] = {}

        def fetch(layer: int, after: int) -> None:
            if offload and layer >= 0:
                from_host[layer] = b.host_copy(f"copy-from-host/layer_{layer}", "copy-from-host", nbytes=offload,
                                               layer=layer, phase="backward", deps=(after, *to_host[layer].values()))

        for layer in range(L):
            def prefetch(first: int, layer=layer) -> None:  # issued as the layer's first op starts
                nonlocal unembed_ag
                if layer + 1 < L:
                    fwd_weights[layer + 1] = gather_weights(layer + 1, "forward", (first,))
                elif not m.tied_embeddings:
                    unembed_ag = b.collective("all-gather/unembedding", "all-gather", v=table * ab,
                                              mesh_axes=weight_axes, deps=(first,))
            if offload and layer >= 2:  # at most two layers' activations wait in HBM for their copy out
                b.wait(*to_host[layer - 2].values())
            forward_layer(layer, fwd_weights[layer], phase="forward", recompute=False, on_start=prefetch,
                          host_waits=to_host.get(layer - 1))
            if offload:
                to_host[layer] = {g: b.host_copy(f"copy-to-host/layer_{layer}/{g}", "copy-to-host", nbytes=nbytes,
                                                 layer=layer, phase="forward", deps=(b.last_compute,))
                                  for g, nbytes in groups if nbytes > 0}
        elementwise("final_norm/fwd", tok * d / sh.tp, NORM_FLOPS, 2, layer=-1, phase="forward")
        b.wait(tensor_collective("all-gather", "all-gather/final_norm_out", layer=-1, phase="forward"))
        matmul("unembedding/fwd/logits", tok, d, sh.vocab, layer=-1, phase="forward", weight=unembed_ag)
        elementwise("loss/fwd/softmax_xent", tok * sh.vocab, SOFTMAX_XENT_FLOPS, 2, layer=-1, phase="forward",
                    category="loss", nbytes=4)
        b.wait(b.collective("all-reduce/loss_stats", "all-reduce", v=tok * 2 * 4, mesh_axes=("tensor",)))

        # ---- backward --------------------------------------------------------------------------------
        first_bwd = elementwise("loss/bwd/softmax_xent", tok * sh.vocab, 3, 2, layer=-1, phase="backward",
                                category="loss", nbytes=4)
        bwd_weights = {L - 1: gather_weights(L - 1, "backward", (first_bwd,))}
        fetch(L - 1, first_bwd)
        matmul("unembedding/bwd/dgrad", tok, sh.vocab, d, layer=-1, phase="backward", weight=unembed_ag)
        wg = matmul("unembedding/bwd/wgrad", d, tok, sh.vocab, layer=-1, phase="backward")
        reduce_grad("unembedding", -1, table * ab, weight_axes, wg)
        b.wait(tensor_collective("reduce-scatter", "reduce-scatter/final_norm_in", layer=-1, phase="backward"))
        elementwise("final_norm/bwd", tok * d / sh.tp, 2 * NORM_FLOPS, 3, layer=-1, phase="backward")
        for layer in reversed(range(L)):
            def prefetch(first: int, layer=layer) -> None:
                if layer > 0:
                    bwd_weights[layer - 1] = gather_weights(layer - 1, "backward", (first,))
                    fetch(layer - 1, first)
            b.wait(from_host.get(layer))
            backward_layer(layer, bwd_weights[layer], on_start=prefetch)
            b.wait(*dcn_grad_syncs.pop(layer + 1, ()))  # the layer before's cross-slice reduction, pipelined
        if iota:
            wg = matmul("embedding/bwd/one_hot_wgrad", sh.vocab, tok, d, layer=-1, phase="backward")
            if not m.tied_embeddings:
                reduce_grad("embedding", -1, table * ab, weight_axes, wg)
        else:  # the activations' gradient resharded back, added into this device's slice of the table's
            b.wait(b.collective("all-to-all/embedding_grad", "all-to-all", v=tok * d * ab, mesh_axes=weight_axes,
                                phase="backward"))
            wg = elementwise("embedding/bwd/scatter_add", tok * d, 1, 2, layer=-1, phase="backward",
                             category="embedding")
            if not m.tied_embeddings:  # already sharded as the table: only the data axes reduce it
                reduce_grad("embedding", -1, table * ab / mesh.size(*weight_axes), (), wg)


    # Gradient accumulation (MaxText's gradient_accumulation_steps k): the microbatches run in
    # sequence, each gathering the weights again; each reduce-scatters its gradient (compute dtype)
    # into the accumulator, sharded like the parameters (a reduction per microbatch over the weight
    # shards), while the all-reduce over the data axes, where the accumulator is replicated, runs
    # once, after the last microbatch, on the accumulator's dtype. So libtpu compiles a lax.scan of
    # microbatches on v5e:2x4, data 2 x fsdp 4 (traces/aot_grad_accum.py, docs/VALIDATION.md).
    for mb in range(accumulate):
        b.prefix = f"microbatch_{mb}/" if accumulate > 1 else ""
        last_microbatch[0] = mb == accumulate - 1
        last_microbatch[1] = mb > 0
        one_microbatch()
        if accumulate > 1:  # add this microbatch's gradient shard into the accumulator (f32)
            b.compute("grad_accumulate", "elementwise", flops=local_params, hbm=3 * 4 * local_params,
                      phase="backward")
    b.prefix = ""

    # ---- optimizer: waits for every gradient reduction -------------------------------------------
    b.wait(*grad_syncs)
    if w.step.optimizer in ("adam", "adamw"):  # read p, g, m, v; write p, m, v
        flops, moments = ADAM_FLOPS_PER_PARAM, 2 * w.step.moment_bytes
    elif w.step.optimizer == "adafactor":  # factored second moment: roughly p, g in, p out
        flops, moments = ADAM_FLOPS_PER_PARAM, 0
    else:
        flops, moments = SGD_FLOPS_PER_PARAM, 0
    # (ZeRO-1/2: on this device's 1/N, then the compute copy all-gathered over the data axes)
    zero.optimizer(b, w, sh, local_params, flops_per_param=flops, moment_bytes_per_param=moments)
    return b.ops
