"""Pipeline parallelism: each stage's program, its memory, and the permutes between stages.

The stage axis (``ici_pipeline_parallelism`` on one torus axis, or ``dcn_pipeline_parallelism``
across slices) splits the layers; the other mesh axes shard each stage as without a pipeline. One
microbatch's step is compiled once by :func:`~tpusim.compiler.transformer.build_ops` (the whole model,
``per_device_batch_size / m``), and its ops are dealt out: a layer's forward ops to the forward unit
of the chunk that holds the layer, its backward ops to that chunk's backward unit; the embedding to
the first virtual stage, the final norm, unembedding and loss (forward and backward) to the last (the
Playbook's / Megatron-LM's layout; MaxText computes them outside the pipeline, batch-sharded over the
stage axis too: see docs/VALIDATION.md). Each stage runs its units in the order of the schedule
(:mod:`tpusim.compiler.schedule`); a forward unit ends with a collective-permute of the microbatch's
activations to the next stage (+1 along the stage axis, round the ring to stage 0 for the next chunk)
that the next stage's unit waits for, a backward unit with the gradient's permute back (-1).

Per microbatch, each unit gathers its layers' weights again (MaxText, unless
``pipeline_fsdp_ag_once``: gathered by the first microbatch, held, and the gradients reduce-scattered
once by the last) and reduce-scatters its gradients into an f32 accumulator; the data-axis all-reduce
runs once, after the chunk's last microbatch. A collective whose issue point lies in another unit is
issued at the start of its unit.
"""

from __future__ import annotations

from dataclasses import replace

from tpusim.compiler.memory import layer_residual_bytes, peak_memory
from tpusim.compiler.schedule import peak_in_flight, schedule
from tpusim.compiler.shapes import Shapes, derive_shapes
from tpusim.compiler.transformer import build_ops
from tpusim.errors import InfeasibleError, TpusimError
from tpusim.model.mesh import Mesh
from tpusim.model.pipeline import PipelinePlan, resolve
from tpusim.model.workload import Workload
from tpusim.sim.collectives.lowering import Span
from tpusim.sim.program import ASYNC_STREAMS, COLLECTIVE, COMPUTE, Memory, Op, op_copy
from tpusim.sim.topology import Topology
from tpusim.units import fmt_bytes

ACCUMULATOR_BYTES = 4  # gradients accumulated over the microbatches in f32 (as MaxText's accumulation)
WEIGHT_AXES = {"fsdp", "sequence", "expert", "dcn_fsdp"}


def pipeline_stages(mesh: Mesh) -> int:
    return mesh.size("pipeline", "dcn_pipeline")


def stage_devices(mesh: Mesh, topo: Topology) -> tuple[tuple[int, ...], ...]:
    """Device ids of each stage: the slice (DCN), or the position along the stage's torus axis or span
    (chip ids slice-major, then row-major over the shape)."""
    p = pipeline_stages(mesh)
    out: list[list[int]] = [[] for _ in range(p)]
    per_slice = topo.chips_per_slice
    for d in range(topo.num_chips):
        if mesh.dcn["pipeline"] > 1:
            out[d // per_slice].append(d)
            continue
        rest, coords = d % per_slice, {}
        for a, n in reversed(list(zip(topo.axis_names, topo.shape))):
            coords[a], rest = rest % n, rest // n
        stage = 0
        for part in mesh.physical["pipeline"]:
            if isinstance(part, Span):
                size, digit = part.size, (coords[part.axis] // part.stride) % part.size
            else:
                size, digit = topo.axis_size(part), coords[part]
            stage = stage * size + digit
        out[stage].append(d)
    return tuple(tuple(ds) for ds in out)


def plan_pipeline(w: Workload, mesh: Mesh, sh: Shapes) -> PipelinePlan:
    if mesh.ici["pipeline"] > 1 and mesh.dcn["pipeline"] > 1:
        raise TpusimError("stages on ICI and across slices at once: not modelled yet by tpusim (give one of "
                          "ici_pipeline_parallelism and dcn_pipeline_parallelism)", source=w.source,
                          key="dcn_pipeline_parallelism")
    if mesh.ici["pipeline"] > 1 and len(mesh.axes_of("pipeline")) != 1:
        raise TpusimError(f"{mesh.ici['pipeline']} stages must lie along one torus axis (a collective-permute "
                          f"shifts along one); placed on {', '.join(map(str, mesh.axes_of('pipeline')))}",
                          source=w.source, key="ici_pipeline_parallelism")
    return resolve(w.pipeline, stages=pipeline_stages(mesh), over_dcn=mesh.dcn["pipeline"] > 1,
                   layers=w.model.num_layers, sequences=sh.seqs, grad_accum=w.step.gradient_accumulation_steps,
                   source=w.source)


def _segments(t: list[Op], tied: bool) -> dict:
    """Template op indices by where they go: ("F"|"B", layer), or embed_f, embed_b, head, cast, opt."""
    seg: dict = {}
    for op in t:
        n = op.name
        if op.layer >= 0:
            keys = [("F" if op.phase == "forward" else "B", op.layer)]
        elif n == "weight_cast":
            keys = ["cast"]
        elif op.phase == "optimizer":
            keys = ["opt"]
        elif n in ("all-gather/embedding", "embedding/lookup"):
            keys = ["embed_f"] + (["head"] if tied and n == "all-gather/embedding" else [])
        elif n.startswith("embedding/bwd") or n in ("reduce-scatter/embedding", "all-reduce/embedding"):
            keys = ["embed_b"]
        else:
            keys = ["head"]
        for k in keys:
            seg.setdefault(k, []).append(op.index)
    return seg


def build_pipeline_ops(w: Workload, micro_w: Workload, micro: Shapes, mesh: Mesh, plan: PipelinePlan, *,
                       local_params: float, stage_params: list[float]) -> list[Op]:
    """Every stage's ops (``Op.stage``), in an order where each permute precedes the unit that waits for it."""
    p, m, v, lc = plan.stages, plan.microbatches, plan.repeats, plan.layers_per_chunk
    K = p * v
    t = build_ops(micro_w, micro, mesh, local_params=local_params)
    seg = _segments(t, w.model.tied_embeddings)
    opt = t[seg["opt"][0]]
    grad_sync = set(opt.deps)  # the step's gradient reductions (the optimizer waits for them) ...
    grad_rs = {d for g in grad_sync for d in (g, *t[g].deps) if t[d].category == "reduce-scatter"}
    grad_ar = {g for g in grad_sync if t[g].category == "all-reduce"}
    weight_ag = {d for op in t if op.category in ("matmul", "embedding") for d in op.deps
                 if t[d].category == "all-gather" and set(t[d].mesh_axes) <= WEIGHT_AXES}
    orders = [schedule(plan.schedule, p, m, v, s) for s in range(p)]
    first_f = [{c: next(j for k, j, cc in o if k == "F" and cc == c) for c in range(v)} for o in orders]
    last = [{(kind, c): j for kind, j, c in o} for o in orders]  # the last microbatch of each kind and chunk
    act_bytes = micro.tok * micro.d * micro.act_bytes / micro.tp  # a microbatch's activations between layers
    stage_axis = ("dcn_pipeline",) if plan.over_dcn else ("pipeline",)

    ops: list[Op] = []
    emap = [dict() for _ in range(p)]     # (microbatch, template index) -> op index, per stage
    dropped = [dict() for _ in range(p)]  # (microbatch, template index) -> the deps it stood for
    last_compute: list[int | None] = [None] * p
    reductions: list[list[int]] = [[] for _ in range(p)]
    sent: dict[tuple, int] = {}           # (F|B, microbatch, virtual stage) -> its permute
    pending: list[tuple | None] = [None] * p  # a delayed forward send, issued after the next unit

    def add(op: Op, **changes) -> int:
        """Append ``op`` with these changes as the next op (one copy: ~760,000 per 16-stage step)."""
        op = op_copy(op, index=len(ops), **changes) if changes or op.index != len(ops) else op
        ops.append(op)
        if op.stream == COMPUTE:
            last_compute[op.stage] = op.index
        return op.index

    def scaled(i: int, s: int, factor: float) -> None:
        o = t[i]
        add(o, stage=s, flops=o.flops * factor, hbm_bytes=o.hbm_bytes * factor, deps=())

    def send(s: int, kind: str, j: int, k: int, layer: int, after: int | None) -> None:
        sent[(kind, j, k)] = add(Op(index=0, name=f"collective-permute/microbatch_{j}/{'fwd' if kind == 'F' else 'bwd'}"
                                    f"/stage_{s}", stream=COLLECTIVE, category="collective-permute", layer=layer,
                                    phase="forward" if kind == "F" else "backward", bytes=act_bytes,
                                    mesh_axes=stage_axis, axes=mesh.axes_of(*stage_axis),
                                    deps=(after,) if after is not None else (), stage=s,
                                    shift=1 if kind == "F" else -1))

    def unit(s: int, kind: str, j: int, c: int, need: int | None, next_kind: str | None) -> None:
        k = c * p + s
        layers = range(k * lc, (k + 1) * lc)
        idx = [i for layer in layers for i in seg.get((kind, layer), ())]
        if kind == "F":
            idx = seg.get("embed_f", []) * (k == 0) + idx + seg.get("head", []) * (k == K - 1)
        else:
            idx = idx + seg.get("embed_b", []) * (k == 0)
        issue, first = last_compute[s], True
        is_last = last[s][(kind, c)] == j
        for i in sorted(dict.fromkeys(idx)):
            o = t[i]
            drop = ((i in grad_ar and not is_last)
                    or (plan.fsdp_ag_once and ((i in weight_ag and (kind == "B" or j != first_f[s][c]))
                                               or (i in grad_rs and not is_last))))
            deps: list[int] = []
            for d in o.deps:
                if (j, d) in emap[s]:
                    deps.append(emap[s][(j, d)])
                elif (j, d) in dropped[s]:
                    deps += dropped[s][(j, d)] if o.stream in ASYNC_STREAMS else []
                elif o.stream in ASYNC_STREAMS and issue is not None:
                    deps.append(issue)  # issued in another unit (or stage): at the start of this one
            if o.stream in ASYNC_STREAMS and not o.deps and issue is not None:
                deps.append(issue)
            if drop:
                dropped[s][(j, i)] = deps
                continue
            if o.stream == COMPUTE and first and need is not None:
                deps.append(need)  # the activations (or gradient) from the stage before
                first = False
            new = add(o, name=f"microbatch_{j}/{o.name}", stage=s, deps=tuple(dict.fromkeys(deps)))
            emap[s][(j, i)] = new
            if i in grad_sync or i in grad_rs:
                reductions[s].append(new)
        end = last_compute[s]
        if kind == "B":  # this chunk's gradient added into the f32 accumulator
            add(Op(index=0, name=f"microbatch_{j}/grad_accumulate/chunk_{c}", stream=COMPUTE, category="elementwise",
                   phase="backward", flops=stage_params[s] / v, hbm_bytes=3 * 4 * stage_params[s] / v, stage=s))
        if pending[s] is not None:
            send(*pending[s], after=end)
            pending[s] = None
        if (kind == "F" and k < K - 1) or (kind == "B" and k > 0):
            edge = layers[-1] if kind == "F" else layers[0]
            if plan.delay_forwarding and next_kind == kind:  # MaxText's delay: held one iteration (the
                pending[s] = (s, kind, j, k, edge)           # backward, its transpose, too)
            else:
                send(s, kind, j, k, edge, end)

    for s in range(p):
        if seg.get("cast"):
            scaled(seg["cast"][0], s, stage_params[s] / local_params)
    pos = [0] * p
    while any(pos[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pos[s] < len(orders[s]):
                kind, j, c = orders[s][pos[s]]
                k = c * p + s
                want = ("F", j, k - 1) if kind == "F" and k > 0 else ("B", j, k + 1) if kind == "B" and k < K - 1 else None
                if want is not None and want not in sent:
                    break
                nxt = orders[s][pos[s] + 1][0] if pos[s] + 1 < len(orders[s]) else None
                unit(s, kind, j, c, sent.get(want), nxt)
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline schedule {plan.schedule} deadlocks")  # a bug, not an input error
    for s in range(p):
        if pending[s] is not None:
            send(*pending[s], after=last_compute[s])
        scaled(seg["opt"][0], s, stage_params[s] / local_params)
        ops[-1] = replace(ops[-1], deps=tuple(reductions[s]))
    return ops


def stage_parameters(w: Workload, sh: Shapes, local: float, p: int) -> list[float]:
    """This device's parameter shard on each stage: 1/p of the layers' (layers weighted equally), the
    input embedding on the first stage, the unembedding (a copy, when tied) and final norm on the last."""
    table = sh.vocab * sh.d / sh.weight_shards
    tables = (table * (1 if w.model.tied_embeddings else 2) + sh.d / sh.weight_shards)
    layers = (local - tables) / p
    return [layers + (table if s == 0 else 0.0) + (table + sh.d / sh.weight_shards if s == p - 1 else 0.0)
            for s in range(p)]


def stage_memory(w: Workload, micro_w: Workload, micro: Shapes, plan: PipelinePlan, stage_params: list[float],
                 gathered_layer: float) -> list[Memory]:
    """Per stage: its parameters, f32 gradient accumulator and optimizer state; the saved activations of
    the chunk-microbatches in flight at the schedule's worst point (GPipe: all m; 1F1B: up to p); the
    loss's logits on the last stage only; with ``pipeline_fsdp_ag_once`` the gathered weights and their
    gradients (bf16) held through the step."""
    p, v, lc = plan.stages, plan.repeats, plan.layers_per_chunk
    per_stage = lc * v
    sub = replace(micro_w, model=replace(micro_w.model, num_layers=per_stage))
    out = []
    for s in range(p):
        mem = peak_memory(sub, micro, local_params=stage_params[s], gathered_layer_params=gathered_layer,
                          gathered_table_params=0.0, fsdp=micro.weight_shards > 1)
        kept_layer = mem.activations / per_stage
        inflight = peak_in_flight(schedule(plan.schedule, p, plan.microbatches, v, s))
        working = mem.working
        if s < p - 1:  # no logits here: the working set is one layer's backward residuals
            working = 0.0 if micro.saved is None else max(layer_residual_bytes(sub, micro) - kept_layer, 0.0)
        gathered = 2 * gathered_layer * per_stage * micro.act_bytes if plan.fsdp_ag_once else 0.0
        out.append(replace(mem, grads=mem.grads + ACCUMULATOR_BYTES * stage_params[s],
                           activations=kept_layer * lc * inflight, working=working, gathered_weights=gathered))
    return out


def check_fits(mems: list[Memory], capacity: float, w: Workload, chip: str) -> None:
    worst = max(range(len(mems)), key=lambda s: mems[s].total)
    if mems[worst].total > capacity:
        parts = ", ".join(f"{k} {fmt_bytes(x)}" for k, x in mems[worst].as_dict().items() if k != "total")
        raise InfeasibleError(f"pipeline stage {worst} does not fit in HBM: needs {fmt_bytes(mems[worst].total)} "
                              f"per device of {fmt_bytes(capacity)} on {chip} ({parts})", source=w.source)


def microbatch(w: Workload, mesh: Mesh, devices: int, plan: PipelinePlan) -> tuple[Workload, Shapes]:
    micro_w = replace(w, step=replace(w.step, per_device_batch_size=w.step.per_device_batch_size
                                      / plan.microbatches))
    return micro_w, derive_shapes(micro_w, mesh, devices)


def describe(plan: PipelinePlan, mems: list[Memory]) -> dict:
    """What reports show: the plan, the Playbook's bubble for it, each stage's memory."""
    p, m, v = plan.stages, plan.microbatches, plan.repeats
    delay = 2 if plan.delay_forwarding else 1
    return {"stages": p, "microbatches": m, "repeats": v, "layers_per_chunk": plan.layers_per_chunk,
            "schedule": plan.schedule, "over": "dcn" if plan.over_dcn else "ici",
            "delay_activation_forwarding": plan.delay_forwarding, "fsdp_ag_once": plan.fsdp_ag_once,
            "bubble_formula": delay * (p - 1) / (m * v),
            # microbatches' saved activations held at the worst point, per stage (chunks / v)
            "peak_in_flight": [peak_in_flight(schedule(plan.schedule, p, m, v, s)) / v for s in range(p)],
            "stage_memory_bytes": [mem.total for mem in mems]}
