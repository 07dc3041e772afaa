"""Compile a workload for a topology into a per-device :class:`~tpusim.sim.program.Program`.

>>> from tpusim.sim.topology import parse_topology
>>> from tpusim.model.workload import workload_from_dict
>>> w = workload_from_dict({"model_name": "llama3-8b", "per_device_batch_size": 2,
...                         "max_target_length": 4096}, source="example")
>>> prog = compile_program(w, parse_topology("v5p:4x4x4"))
>>> f"{prog.model_flops_per_step:.3e}"
'2.530e+16'
"""

from __future__ import annotations

from dataclasses import replace

from tpusim.compiler import pipeline, quant
from tpusim.compiler.memory import peak_memory
from tpusim.compiler.shapes import Shapes, derive_shapes, offloaded_tensors
from tpusim.compiler.transformer import build_ops
from tpusim.errors import InfeasibleError, TpusimError
from tpusim.model.mesh import Mesh, resolve_mesh
from tpusim.sim.program import Program
from tpusim.sim.topology import Topology
from tpusim.units import fmt_bytes
from tpusim.model.workload import Workload


def model_flops_breakdown(w: Workload, global_batch: float) -> dict[str, float]:
    """MaxText's and the book's model FLOPs per step, by part (forward + backward = 3 x forward).

    ``layers``: 6 x the layers' matmul weights a token uses (k of E experts, and the router) x tokens;
    ``unembedding``: 6 V D x tokens (the input embedding is a lookup, not a matmul, so the book's
    6 x all-parameters is larger by 6 V D x tokens); ``attention``: 12 B T^2 N H per layer, halved when
    ``attention_flops: causal``; local layers (sliding window, chunks) scaled by their span.
    """
    m = w.model
    tokens = global_batch * w.step.seq_len
    moe = m.moe_layers
    routed = m.mlp_matrices * m.d_model * m.expert_ff * (m.experts_per_token + m.shared_experts)
    mlp_active = moe * (routed + m.d_model * m.num_experts) + (m.num_layers - moe) * m.dense_mlp_params
    attn = m.attention_params_per_layer - (m.q_lora_rank + m.kv_lora_rank if m.attention_type == "mla" else 0)
    causal = 0.5 if w.step.attention_flops == "causal" else 1.0  # (MLA's latent norms are not matmuls)
    qk, v = ((m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim) if m.attention_type == "mla"
             else (m.head_dim, m.head_dim))  # QK^T over qk, PV over v: 12 B T^2 N H for GQA
    return {
        "layers": 6.0 * (m.num_layers * attn + mlp_active) * tokens,
        "unembedding": 6.0 * m.vocab_size * m.d_model * tokens,
        "attention": 6.0 * global_batch * w.step.seq_len**2 * m.num_heads * (qk + v) * causal
                     * sum(m.attention_span(i, w.step.seq_len, causal=causal < 1) for i in range(m.num_layers)),
    }


def model_flops_per_step(w: Workload, global_batch: float) -> float:
    """The MFU numerator: the sum of :func:`model_flops_breakdown`."""
    return sum(model_flops_breakdown(w, global_batch).values())


def local_parameter_counts(w: Workload, sh: Shapes) -> tuple[float, float, float]:
    """(this device's parameter shard, one layer's gathered weights, the gathered embedding table)."""
    m = w.model
    if m.attention_type == "mla":  # the down-projections are whole on every tensor shard
        n = sh.heads
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = sh.d * n * qk if not m.q_lora_rank else m.q_lora_rank * (sh.d + n * qk)
        attn = (q + sh.d * (m.kv_lora_rank + m.qk_rope_head_dim)
                + m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim) + n * m.v_head_dim * sh.d)
    else:
        attn = sh.d * (2 * sh.heads * sh.head_dim + 2 * sh.kv_heads * sh.head_dim)  # after the tensor split
    table = sh.vocab * sh.d
    tables = table * (1 if m.tied_embeddings else 2)
    dense_shards, expert_shards = sh.weight_shards, sh.expert_weight_shards
    moe_layers = m.moe_layers
    dense_mlp = m.mlp_matrices * sh.d * sh.ff_dense
    experts = m.mlp_matrices * sh.d * sh.ff * sh.experts_local
    moe_dense = sh.d * m.num_experts + m.mlp_matrices * sh.d * sh.ff_shared  # router and shared experts
    dense_layers = m.num_layers - moe_layers
    local = (m.num_layers * (attn + m.norm_params_per_layer) / dense_shards
             + dense_layers * dense_mlp / dense_shards
             + moe_layers * (moe_dense / dense_shards + experts / expert_shards)
             + (tables + sh.d) / dense_shards)  # the embedding tables and the final norm
    gathered = attn + max(dense_mlp if dense_layers else 0, experts + moe_dense if moe_layers else 0)
    return local, gathered, table


def compile_program(w: Workload, topo: Topology, *, mesh: Mesh | None = None, check_memory: bool = True,
                    layers: int | None = None) -> Program:
    """The per-device program of one training step of ``w`` on ``topo``.

    Raises :class:`~tpusim.errors.TpusimError` for a mesh that does not fit or splits a dimension
    unevenly, and :class:`~tpusim.errors.InfeasibleError` (with the breakdown) when it does not fit
    in HBM and ``check_memory`` is set.

    ``layers``: the ops of the step cut to its first ``layers`` layers (embedding, loss, the weights'
    cast and the optimizer over the whole step's parameters, as in the whole step), while the model FLOPs, tokens, memory and
    notes stay the whole step's: what :mod:`tpusim.explore.periodic` simulates to extrapolate a step
    in its layer count. Not for pipelined steps (their stages split the layers).
    """
    _check_modelled(w)
    quant.check_chip(w, topo.chip)
    mesh = mesh or resolve_mesh(w.parallelism, topo, source=w.source)
    devices = topo.num_chips
    sh = derive_shapes(w, mesh, devices)
    if pipeline.pipeline_stages(mesh) > 1:
        if layers is not None:
            raise ValueError("a pipelined step cannot be cut to fewer layers")
        return _compile_pipeline(w, topo, mesh, sh, check_memory)
    micro_w, micro = _microbatch(w, sh, mesh, devices)
    local, gathered_layer, table = local_parameter_counts(w, sh)
    fsdp = sh.weight_shards > 1
    capacity = topo.chip.hbm_bytes
    # Under gradient accumulation the activations are one microbatch's, and an f32 accumulator sits
    # beside that microbatch's gradient.
    accumulator = ACCUMULATOR_BYTES * local if micro is not sh else 0.0
    natural = peak_memory(micro_w, micro, local_params=local, gathered_layer_params=gathered_layer,
                          gathered_table_params=table, fsdp=fsdp)
    memory = peak_memory(micro_w, micro, local_params=local, gathered_layer_params=gathered_layer,
                         gathered_table_params=table, fsdp=fsdp, capacity_bytes=capacity - accumulator)
    if accumulator:
        natural = replace(natural, grads=natural.grads + accumulator)
        memory = replace(memory, grads=memory.grads + accumulator)
    if check_memory and memory.total > capacity:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in memory.as_dict().items() if k != "total")
        raise InfeasibleError(f"does not fit in HBM: needs {fmt_bytes(memory.total)} per device of "
                              f"{fmt_bytes(capacity)} on {topo.chip.name} ({parts})", source=w.source)
    fit = natural.working - memory.working  # the backward's transients XLA rematerialises to fit
    if layers is None:
        ops = build_ops(micro_w, micro, mesh, local_params=local, remat_to_fit=fit)
    else:
        # the ops that are not the layers' (weights' cast, optimizer update, embedding) stay the whole
        # step's, so every cut starts and ends as the whole step does: only the layer count differs
        cut = replace(micro_w, model=replace(micro_w.model, num_layers=layers))
        ops = build_ops(cut, micro, mesh, local_params=local, remat_to_fit=fit)
    notes = []
    if w.notes:
        notes.append(f"MaxText keys set away from base.yml that tpusim does not model (small effects): "
                     f"{', '.join(w.notes)}")
    if w.ignored_keys:
        notes.append(f"ignored (no effect on performance): {', '.join(w.ignored_keys)}")
    offloaded = offloaded_tensors(w.step)
    if w.step.remat_policy == "custom":
        kept = list(dict.fromkeys(t for t in ("input", *w.step.custom_device) if t not in offloaded))
        parts = [f"{', '.join(offloaded)} offloaded to host memory (copied over PCIe after each layer's forward, "
                 f"back before its backward)"] if offloaded else []
        parts += [f"{', '.join(kept)} kept in HBM"] if kept else []
        same_as_full = kept == ["input"] and not offloaded
        notes.append(f"remat_policy custom: {'; '.join(parts)}; the rest recomputed"
                     + (" (as full: MaxText's per-tensor keys are all 'remat')" if same_as_full else ""))
    elif offloaded:
        notes.append(f"remat_policy {w.step.remat_policy}: saved activations live in host memory, copied "
                     "over PCIe after each layer's forward and back before its backward")
    if mesh.split:
        notes.append("mesh: some axes take part of a torus axis, placed as jax's mesh_utils does with "
                     "allow_split_physical_axes (MaxText refuses this mesh unless allow_split_physical_axes: true)")
    if memory.working < natural.working:
        notes.append(f"memory: XLA would keep {fmt_bytes(natural.total)} of transients and saved tensors; over the "
                     f"{fmt_bytes(capacity)} HBM it rematerialises {fmt_bytes(natural.working - memory.working)} of the "
                     "backward's transients to fit, recomputing its widest matmul outputs a second time in each layer's "
                     "backward (as libtpu's compile of MaxText v4 22B does)")
    if topo.chip.devices_per_chip > 1:
        notes.append(f"{topo.chip.name} has {topo.chip.devices_per_chip} cores per chip; simulated as one device")
    return Program(name=w.name, ops=tuple(ops), devices=devices,
                   model_flops_per_step=model_flops_per_step(w, sh.global_batch),
                   tokens_per_step=sh.global_batch * w.step.seq_len, memory=memory,
                   hbm_capacity_bytes=capacity, notes=tuple(notes))


def _compile_pipeline(w: Workload, topo: Topology, mesh: Mesh, sh: Shapes, check_memory: bool) -> Program:
    """Pipeline parallelism (:mod:`tpusim.compiler.pipeline`): a program whose ops each stage runs its own of."""
    plan, micro_w, micro, local, params, mems = pipeline_memory(w, mesh, sh, topo.num_chips)
    if check_memory:
        pipeline.check_fits(mems, topo.chip.hbm_bytes, w, topo.chip.name)
    ops = pipeline.build_pipeline_ops(w, micro_w, micro, mesh, plan, local_params=local, stage_params=params)
    info = pipeline.describe(plan, mems)
    notes = [f"pipeline: {plan.stages} stages over {info['over'].upper()}, {plan.schedule}, {plan.microbatches} "
             f"microbatches, {plan.repeats} chunk(s) of {plan.layers_per_chunk} layer(s) per stage; the Playbook's "
             f"bubble (p-1)/(m v) = {info['bubble_formula']:.1%}; embedding on the first stage, loss on the last"]
    if w.notes:
        notes.append(f"MaxText keys set away from base.yml that tpusim does not model (small effects): "
                     f"{', '.join(w.notes)}")
    if w.ignored_keys:
        notes.append(f"ignored (no effect on performance): {', '.join(w.ignored_keys)}")
    worst = max(mems, key=lambda mem: mem.total)
    return Program(name=w.name, ops=tuple(ops), devices=topo.num_chips,
                   model_flops_per_step=model_flops_per_step(w, sh.global_batch),
                   tokens_per_step=sh.global_batch * w.step.seq_len, memory=worst,
                   hbm_capacity_bytes=topo.chip.hbm_bytes, notes=tuple(notes), stages=plan.stages,
                   stage_devices=pipeline.stage_devices(mesh, topo), stage_memory=tuple(mems), pipeline=info)


def pipeline_memory(w: Workload, mesh: Mesh, sh: Shapes, devices: int) -> tuple:
    """(plan, microbatch workload, its shapes, the unpipelined local parameters, each stage's, each stage's
    Memory): what compiling a pipelined step and checking its HBM share (``tpusim search`` too)."""
    plan = pipeline.plan_pipeline(w, mesh, sh)
    micro_w, micro = pipeline.microbatch(w, mesh, devices, plan)
    local, gathered_layer, _ = local_parameter_counts(micro_w, micro)
    params = pipeline.stage_parameters(w, micro, local, plan.stages)
    return plan, micro_w, micro, local, params, pipeline.stage_memory(w, micro_w, micro, plan, params, gathered_layer)


ACCUMULATOR_BYTES = 4  # MaxText accumulates gradients in f32 (zeros_like of the f32 parameters)


def _microbatch(w: Workload, sh: Shapes, mesh: Mesh, devices: int) -> tuple[Workload, Shapes]:
    """The workload and shapes of one microbatch (per_device_batch_size / gradient_accumulation_steps)."""
    k = w.step.gradient_accumulation_steps
    if k == 1:
        return w, sh
    if sh.seqs % k:
        raise TpusimError(f"{k} microbatches do not split the {sh.seqs:g} sequences each batch shard computes",
                          source=w.source, key="gradient_accumulation_steps")
    micro_w = replace(w, step=replace(w.step, per_device_batch_size=w.step.per_device_batch_size / k))
    return micro_w, derive_shapes(micro_w, mesh, devices)


def _check_modelled(w: Workload) -> None:
    """Refuse the model features the compiled step lacks, naming them. Sliding-window (and Llama 4's
    chunked) layers are exact while the sequence fits in the window (they attend to all of it)."""
    m = w.model
    missing: list[str] = []  # (none at present: every MaxText family tpusim loads compiles)
    if missing:
        raise TpusimError(f"{m.name}: not modelled yet in tpusim's compiled step: {'; '.join(missing)} "
                          f"(its parameter count is: {m.params / 1e9:.1f} B)", source=w.source, key="model_name")


__all__ = ["compile_program", "pipeline_memory", "model_flops_breakdown", "model_flops_per_step", "local_parameter_counts"]
