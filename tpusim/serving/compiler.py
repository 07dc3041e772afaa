"""Prefill and decode steps as per-device programs, timed with the shared cost model and collectives.

One *step* of a model replica processes ``M = decode + prefill`` tokens: every decode request adds one
token and attends over its whole cache; prefill chunks add their tokens and attend causally over
themselves and what is cached before them. Per device and per layer (``tp`` = tensor parallelism):

* matmuls (:class:`~tpusim.sim.program.Op`, timed by :func:`tpusim.sim.costmodel.op_time`): Q/K/V and O
  projections, the MLP (gated: 3 matrices), the unembedding for the tokens that sample. Each reads
  its weights from HBM once per step, so at small batch the step is weight-bandwidth-bound and past
  the book's critical batch (C / W_hbm, 240 tokens on v5e in bf16) compute-bound (inference.md).
  ``quantization: int8`` (MaxText's AQT: int8 weights and activations) reads 1-byte weights and runs
  at the chip's int8 rate; ``int8_weight_only`` / ``fp8`` read 1-byte weights and compute in bf16,
  ``int4_weight_only`` half-byte ones (dequantized in the matmul, as the int8 ones).
* attention over the cache: 4 N H FLOPs per (query, key) pair and the KV bytes it reads (2 K H per
  token per layer, in the cache's dtype); the book's "the KV term is always bandwidth-bound".
* tensor-parallel all-reduces of the activations after attention and after the MLP (Megatron), over
  the mesh's tensor (and expert) axes, lowered and timed by :mod:`tpusim.sim.collectives`: at decode they
  are small and latency-bound, so the calibrated per-collective overhead matters.
* MoE: each device holds E / ep experts; the weights read are those of the experts the step's tokens
  touch, E_l (1 - (1 - 1/E)^(M k)) for uniform routing; the expert outputs are all-reduced with the
  tensor ones. Attention is replicated over the expert axis (every device of it attends for every
  token; no data-parallel attention).
* the KV cache is sharded over kv heads up to K, then over batch (book inference.md); past K the two
  all-to-alls per layer that this costs are charged.
* with ``ici_fsdp_parallelism`` > 1 the replica is 2D weight-stationary (book inference.md Q7): every
  weight split over D on the fsdp axis and over F / heads / vocab on the tensor axis, the activations
  gathered and reduce-scattered over the two in turn (:mod:`tpusim.serving.twod`).

The ops run one after the other (decode has nothing to overlap them with); the step time is their
sum. :class:`StepModel` caches step times by (decode batch, mean context bucket, prefill tokens
bucket, attended-pairs bucket): buckets are 1/32 of an octave (<= 3.1% above the exact value, never
below), so a thousand requests cost a few hundred step evaluations.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tpusim.sim.collectives import collective_time, link_params, lower
from tpusim.compiler.shapes import derive_shapes
from tpusim.sim.costmodel import bound_by, compute_params, op_time
from tpusim.errors import InfeasibleError
from tpusim.model.mesh import resolve_mesh
from tpusim.sim.program import COLLECTIVE, COMPUTE, Memory, Op, Program
from tpusim.serving.twod import check_2d, ops_2d
from tpusim.serving.workload import ServeWorkload
from tpusim.sim.topology import Topology
from tpusim.units import fmt_bytes

PARTS = ("weights", "kv", "compute", "collectives")
# vLLM's default gpu_memory_utilization (vllm/config.py, also on TPU): the paged KV pool gets 90% of
# HBM less the weights and the working set.
PAGED_HBM_FRACTION = 0.9


def bucket(x: float) -> int:
    """Round up to 32 steps per octave above 64 (exact below): at most 3.1% high."""
    x = int(math.ceil(x))
    if x <= 64:
        return x
    q = 1 << (x.bit_length() - 6)
    return -(-x // q) * q


@dataclass(frozen=True, slots=True)
class StepCost:
    time_s: float
    parts_s: tuple[float, float, float, float]  # weights, kv, compute, collectives (sum = time_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaMemory:
    """Per-device HBM of one replica (bytes)."""

    weights: float
    kv_cache: float
    working: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.working


class StepModel:
    """The per-device step programs of one model replica of ``sw`` on ``topo``."""

    def __init__(self, sw: ServeWorkload, topo: Topology, mode: str = "calibrated"):
        self.sw, self.topo, self.mode = sw, topo, mode
        w = sw.workload
        self.mesh = mesh = resolve_mesh(w.parallelism, topo, source=w.source)
        self.fsdp = mesh.ici["fsdp"]  # 2D weight-stationary: the weights' D split (the book's X); 1: Megatron
        if self.fsdp > 1:
            check_2d(w.model, mesh, w.source)
            # the shapes' batch split over data x fsdp is training's: a serving step's batch is its slots
            w = dataclasses.replace(w, step=dataclasses.replace(w.step, per_device_batch_size=1.0))
        self.sh = derive_shapes(w, mesh, topo.num_chips)
        self.tp, self.ep = mesh.ici["tensor"], mesh.ici["expert"]
        self.replica_chips = self.tp * self.ep * self.fsdp
        self.replicas = topo.num_chips // self.replica_chips
        m = w.model
        self.model = m
        cp = compute_params(topo.chip, mode)
        self.cp = cp
        self.cp_matmul = (dataclasses.replace(cp, mxu_flops_per_s=cp.mxu_flops_per_s * topo.chip.int8_flops_per_s
                                              / topo.chip.bf16_flops_per_s) if sw.int8_math else cp)
        self.lp = link_params(topo, mode, in_step=True)  # collectives inside a compiled step, as the engine times them
        self.model_axes = mesh.axes_of("tensor", "expert")
        self.tensor_axes = mesh.axes_of("tensor")
        self.fsdp_axes = mesh.axes_of("fsdp")
        self.ab = w.step.act_bytes
        self.wb = sw.weight_bytes
        self.kvb = sw.kv_bytes
        # KV bytes per token per device: all layers, sharded over the replica's tensor axis.
        self.kv_per_token_total = 2.0 * m.num_layers * m.num_kv_heads * m.head_dim * self.kvb
        self.kv_per_token = self.kv_per_token_total / self.tp
        self.batch_sharded_kv = self.tp > m.num_kv_heads
        self._cache: dict[tuple, StepCost] = {}
        self._coll: dict[tuple, float] = {}
        self.evaluations = 0
        self.memory = self._memory()

    # ---- weights and memory -------------------------------------------------------------------------
    def weight_bytes_per_device(self) -> float:
        m, sh = self.model, self.sh
        attn = m.d_model * (sh.heads + 2 * sh.kv_heads) * m.head_dim + sh.heads * m.head_dim * m.d_model
        mlp = m.mlp_matrices * m.d_model * sh.ff * (m.num_experts // self.ep if m.num_experts > 1 else 1)
        router = m.d_model * m.num_experts if m.num_experts > 1 else 0
        tables = (1 if m.tied_embeddings else 2) * sh.vocab * m.d_model
        x = self.fsdp  # 2D weight-stationary: each matrix's D split over the fsdp axis too (norms replicated)
        return self.wb * (m.num_layers * ((attn + mlp + router) / x + m.norm_params_per_layer) + tables / x
                          + m.d_model)

    def working_bytes(self, tokens: int, seqs: int) -> float:
        """The largest transient of a step of ``tokens``: a layer's activations (Q/K/V, MLP) and the logits."""
        m, sh = self.model, self.sh
        layer = tokens * (3 * m.d_model + (2 * sh.heads + 2 * sh.kv_heads) * m.head_dim
                          + m.mlp_matrices * sh.ff * (m.experts_per_token if m.num_experts > 1 else 1))
        return self.ab * layer + 4.0 * seqs * sh.vocab

    def max_batch_that_fits(self) -> int:
        free = self.topo.chip.hbm_bytes - self.weight_bytes_per_device() - self.working_bytes(self.token_budget, 1)
        return max(0, int(free // (self.sw.max_target_len * self.kv_per_token)))

    @property
    def token_budget(self) -> int:
        return self.sw.batching.token_budget or self.sw.max_prefill_len

    @property
    def max_batch(self) -> int:
        b = self.sw.batching
        if b.max_batch:
            return b.max_batch
        if self.sw.per_device_batch_size is not None:
            return max(1, int(self.sw.per_device_batch_size * self.replica_chips))
        return self.max_batch_that_fits()

    def _memory(self) -> ReplicaMemory:
        sw = self.sw
        weights = self.weight_bytes_per_device()
        batch = self.max_batch
        working = self.working_bytes(max(self.token_budget, batch), batch)
        cap = self.topo.chip.hbm_bytes
        if sw.batching.paged_kv:
            pool = PAGED_HBM_FRACTION * cap - weights - working
            self.kv_pool_tokens = int(pool // self.kv_per_token) if pool > 0 else 0
            if self.kv_pool_tokens < sw.max_target_len:
                raise InfeasibleError(
                    f"the paged KV pool holds {max(self.kv_pool_tokens, 0)} tokens, less than one "
                    f"{sw.max_target_len}-token sequence: {PAGED_HBM_FRACTION:.0%} of {fmt_bytes(cap)} on "
                    f"{self.topo.chip.name} less weights {fmt_bytes(weights)} and working {fmt_bytes(working)}",
                    source=sw.source, key="serving.batching.paged_kv")
            return ReplicaMemory(weights=weights, kv_cache=self.kv_pool_tokens * self.kv_per_token, working=working,
                                 capacity=cap)
        kv = batch * sw.max_target_len * self.kv_per_token
        self.kv_pool_tokens = batch * sw.max_target_len
        mem = ReplicaMemory(weights=weights, kv_cache=kv, working=working, capacity=cap)
        if batch < 1 or mem.total > cap:
            fits = self.max_batch_that_fits()
            what = (f"a batch of {batch} x {sw.max_target_len}-token KV caches does not fit in HBM"
                    if batch >= 1 else "the weights leave no room for one KV cache")
            raise InfeasibleError(
                f"{what}: needs {fmt_bytes(weights + kv + working)} per device of {fmt_bytes(cap)} on "
                f"{self.topo.chip.name} (weights {fmt_bytes(weights)}, KV cache {fmt_bytes(kv)} = {batch} x "
                f"{sw.max_target_len} tokens x {fmt_bytes(self.kv_per_token)}, working {fmt_bytes(working)}); "
                f"at most {fits} sequences fit per replica of {self.replica_chips} chips",
                source=sw.source, key="inference.per_device_batch_size")
        return mem

    # ---- the step program ---------------------------------------------------------------------------
    def ops(self, n_decode: int, decode_ctx: float, prefill_tokens: int, prefill_pairs: float,
            prefill_ctx: float, n_logits: int) -> tuple[list[Op], list[Op]]:
        """(one layer's ops, the ops outside the layers) of a step, per device.

        ``decode_ctx``: cached tokens the decode queries attend to (summed over requests);
        ``prefill_pairs``: (query, key) pairs of the prefill chunks (causal); ``prefill_ctx``: cached
        tokens before the chunks, read once; ``n_logits``: tokens sampled this step.
        """
        if self.fsdp > 1:
            return ops_2d(self, n_decode, decode_ctx, prefill_tokens, prefill_pairs, prefill_ctx, n_logits)
        m, sh, ab, wb = self.model, self.sh, self.ab, self.wb
        D, H = m.d_model, m.head_dim
        hl, kvl, fl = sh.heads, sh.kv_heads, sh.ff
        M = n_decode + prefill_tokens
        layer: list[Op] = []

        def mm(name, k, n, rows=M, weights=None):
            w_elems = k * n if weights is None else weights
            layer.append(Op(index=len(layer), name=name, stream=COMPUTE, category="matmul", flops=2.0 * rows * k * n,
                            hbm_bytes=wb * w_elems + ab * rows * (k + n), mxu_shape=(max(rows, 1), k, n)))

        def coll(name, kind, nbytes, axes):
            layer.append(Op(index=len(layer), name=name, stream=COLLECTIVE, category=kind, bytes=nbytes, axes=axes))

        mm("qkv_proj", D, (hl + 2 * kvl) * H)
        for op in self.attention_ops(n_decode, decode_ctx, prefill_tokens, prefill_pairs, prefill_ctx):
            layer.append(dataclasses.replace(op, index=len(layer)))
        mm("o_proj", hl * H, D)
        if self.replica_chips > 1:
            coll("attn_all_reduce", "all-reduce", ab * M * D, self.tensor_axes)
        if m.num_experts > 1:
            e_local = m.num_experts // self.ep
            touched = e_local * (1.0 - (1.0 - 1.0 / m.num_experts) ** (M * m.experts_per_token))
            rows = M * m.experts_per_token / self.ep
            mm("moe_mlp", D, m.mlp_matrices * fl, rows=math.ceil(rows),
               weights=touched * m.mlp_matrices * D * fl)
            mm("router", D, m.num_experts)
        else:
            mm("mlp_in", D, (m.mlp_matrices - 1) * fl)
            mm("mlp_out", fl, D)
        if self.replica_chips > 1:
            coll("mlp_all_reduce", "all-reduce", ab * M * D, self.model_axes)
        layer.append(Op(index=len(layer), name="norms_residuals", stream=COMPUTE, category="elementwise",
                        flops=12.0 * M * D + 4.0 * M * fl, hbm_bytes=ab * M * (8 * D + 2 * fl)))
        outside = [Op(index=0, name="embed", stream=COMPUTE, category="embedding", hbm_bytes=(wb + ab) * M * D)]
        if self.tp > 1 and M:  # the table is split over vocab (MaxText: vocab -> tensor): each shard looks up
            # the tokens it holds and an all-reduce sums the rows, as XLA's compile of the same step does
            # (traces/xla_aot_serving: 2L + 1 all-reduces of M x D per step)
            outside.append(Op(index=1, name="embed_all_reduce", stream=COLLECTIVE, category="all-reduce",
                              bytes=ab * M * D, axes=self.tensor_axes))
        outside.append(Op(index=len(outside), name="unembed", stream=COMPUTE, category="matmul",
                          flops=2.0 * n_logits * D * sh.vocab, hbm_bytes=wb * D * sh.vocab + ab * n_logits * (D + sh.vocab),
                          mxu_shape=(max(n_logits, 1), D, sh.vocab)))
        if self.tp > 1 and n_logits:  # sampling: each shard's best candidates gathered (value, index)
            outside.append(Op(index=len(outside), name="sample_all_gather", stream=COLLECTIVE, category="all-gather",
                              bytes=8.0 * n_logits * self.tp, axes=self.tensor_axes))
        return layer, outside

    def attention_ops(self, n_decode: int, decode_ctx: float, prefill_tokens: int, prefill_pairs: float,
                      prefill_ctx: float) -> list[Op]:
        """Attention over the cache for the tensor shard's heads (both layouts): the KV all-to-alls past K
        kv heads around the decode and prefill attention."""
        m, sh, ab = self.model, self.sh, self.ab
        H, hl, kvl = m.head_dim, sh.heads, sh.kv_heads
        M = n_decode + prefill_tokens
        ops: list[Op] = []
        if self.batch_sharded_kv and M:  # queries to the chips holding their sequences' cache, and back
            ops.append(Op(index=0, name="kv_all_to_all_in", stream=COLLECTIVE, category="all-to-all",
                          bytes=ab * M * hl * H, axes=self.tensor_axes))
        kv_tok = 2 * kvl * H * self.kvb / (self.tp // m.num_kv_heads if self.batch_sharded_kv else 1)
        if n_decode:
            ops.append(Op(index=0, name="attention_decode", stream=COMPUTE, category="attention",
                          flops=4.0 * hl * H * decode_ctx,
                          hbm_bytes=kv_tok * (decode_ctx + n_decode) + 2 * ab * n_decode * hl * H))
        if prefill_tokens:
            ops.append(Op(index=0, name="attention_prefill", stream=COMPUTE, category="attention",
                          flops=4.0 * hl * H * prefill_pairs,
                          hbm_bytes=kv_tok * (prefill_ctx + prefill_tokens) + 2 * ab * prefill_tokens * hl * H))
        if self.batch_sharded_kv and M:
            ops.append(Op(index=0, name="kv_all_to_all_out", stream=COLLECTIVE, category="all-to-all",
                          bytes=ab * M * hl * H, axes=self.tensor_axes))
        return ops

    def _op_time(self, op: Op) -> tuple[float, str]:
        if op.stream == COLLECTIVE:
            key = (op.category, op.axes, op.bytes)
            t = self._coll.get(key)
            if t is None:
                t = self._coll[key] = collective_time(lower(op.category, op.bytes, self.topo, op.axes), self.lp)
            return t, "collectives"
        cp = self.cp_matmul if op.category == "matmul" else self.cp
        t = op_time(op, cp)
        if bound_by(op, cp) == "hbm":
            return t, "kv" if op.category == "attention" else "weights"
        return t, "compute"

    def cost(self, n_decode: int, decode_ctx: float, prefill_tokens: int = 0, prefill_pairs: float = 0.0,
             prefill_ctx: float = 0.0, n_logits: int | None = None) -> StepCost:
        """The step's time, cached by bucketed shape (every input rounded up by :func:`bucket`)."""
        mean_ctx = bucket(decode_ctx / n_decode) if n_decode else 0
        key = (n_decode, mean_ctx, bucket(prefill_tokens), bucket(prefill_pairs), bucket(prefill_ctx),
               n_decode if n_logits is None else n_logits)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        self.evaluations += 1
        layer, outside = self.ops(n_decode, n_decode * mean_ctx, key[2], key[3], key[4], key[5])
        parts = dict.fromkeys(PARTS, 0.0)
        L = self.model.num_layers
        for op in layer:
            t, part = self._op_time(op)
            parts[part] += L * t
        for op in outside:
            t, part = self._op_time(op)
            parts[part] += t
        total = sum(parts.values())
        cost = self._cache[key] = StepCost(total + self.sw.step_overhead_s, tuple(parts[p] for p in PARTS))
        return cost

    def program(self, n_decode: int, decode_ctx: float, prefill_tokens: int = 0, prefill_pairs: float = 0.0,
                prefill_ctx: float = 0.0, n_logits: int | None = None) -> Program:
        """The step as a :class:`~tpusim.sim.program.Program` for :func:`tpusim.sim.engine.simulate`: every layer's
        ops in order, each collective issued after the op before it (a compute op, or the collective it
        continues: 2D weight-stationary reduce-scatters then gathers) and waited for by the next compute
        op (at decode nothing overlaps them). ``cost`` sums the same ops' times without simpy."""
        layer, outside = self.ops(n_decode, decode_ctx, prefill_tokens, prefill_pairs, prefill_ctx,
                                  n_decode if n_logits is None else n_logits)
        ops: list[Op] = []
        pending: list[int] = []

        def add(op: Op, layer_index: int) -> None:
            i = len(ops)
            if op.stream == COLLECTIVE:
                deps = (pending[-1],) if pending else (last[0],) if last[0] >= 0 else ()
                pending.append(i)
            else:
                deps = tuple(pending)
                pending.clear()
                last[0] = i
            ops.append(dataclasses.replace(op, index=i, layer=layer_index, deps=deps))

        last = [-1]
        before = [op for op in outside if op.name.startswith("embed")]  # the lookup precedes the layers
        for op in before:
            add(op, -1)
        for li in range(self.model.num_layers):
            for op in layer:
                add(op, li)
        for op in outside[len(before):]:
            add(op, -1)
        if pending:  # the sampling gather ends the step
            ops.append(Op(index=len(ops), name="end", stream=COMPUTE, category="elementwise", deps=tuple(pending)))
        mem = self.memory
        return Program(name=f"{self.sw.name}:step", ops=tuple(ops), devices=self.topo.num_chips,
                       model_flops_per_step=sum(op.flops for op in ops) * self.topo.num_chips,
                       tokens_per_step=float(n_decode + prefill_tokens),
                       memory=Memory(params=mem.weights, grads=0.0, optimizer=0.0, activations=mem.kv_cache,
                                     working=mem.working, gathered_weights=0.0),
                       hbm_capacity_bytes=mem.capacity)

    def kv_transfer_time(self, tokens: int, transfer: str) -> float:
        """Moving one request's KV cache from a prefill replica to a decode replica: each device sends its
        shard to its counterpart, one ICI link (and a hop per replica it crosses) or its DCN egress."""
        nbytes = tokens * self.kv_per_token
        if transfer == "dcn":
            if self.lp.dcn_bytes_per_s <= 0:
                return math.inf
            return self.lp.dcn_latency_s + nbytes / self.lp.dcn_bytes_per_s
        return self.lp.ici_hop_latency_s + nbytes / self.lp.ici_link_bytes_per_s

    def describe(self) -> dict:
        mem = self.memory
        return {"replicas": self.replicas, "chips_per_replica": self.replica_chips, "tensor": self.tp,
                "expert": self.ep, "fsdp": self.fsdp, "max_batch": self.max_batch, "token_budget": self.token_budget,
                "kv_bytes_per_token": self.kv_per_token_total,
                "hbm_per_device": {"weights": mem.weights, "kv_cache": mem.kv_cache, "working": mem.working,
                                   "total": mem.total, "capacity": mem.capacity},
                "tensor_axes": [str(a) for a in self.tensor_axes]}
