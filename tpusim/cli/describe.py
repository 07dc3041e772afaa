"""``tpusim topology``, ``collective`` and ``program``: the slice, one collective, and a workload's compiled
per-device program, without simulating a step."""

from __future__ import annotations


import click

from tpusim.cli.common import _emit, _json_option, _mode_option, _slices_option, _topology_option, main, parse_bytes


@main.command()
@click.argument("spec", metavar="CHIP:SHAPE")
@_slices_option
@click.option("--dcn-oversubscription", default=1.0, show_default=True, type=float,
              help="divides each chip's DCN egress when all send at once")
@_json_option
def topology(spec: str, slices: int, dcn_oversubscription: float, as_json: bool) -> None:
    """Describe a slice (or several joined by DCN): chips, hosts, links, bandwidths."""
    from tpusim.sim.topology import describe, parse_topology
    from tpusim.units import fmt_rate

    topo = parse_topology(spec, slices=slices, dcn_oversubscription=dcn_oversubscription, source="CHIP:SHAPE")
    d = describe(topo)
    axes = "  ".join(f"{a}={n} ({'wraps' if w else 'no wraparound'})"
                     for a, n, w in zip(topo.axis_names, topo.shape, topo.wraparound))
    per_axis = "  ".join(f"{a}: {fmt_rate(bw)}" for a, bw in d["axis_bandwidth_bytes_per_s"].items())
    block = "x".join(map(str, topo.host_block))
    if topo.slices > 1:
        dcn = (f"{fmt_rate(d['dcn_bytes_per_s_per_chip'])} per chip, {fmt_rate(d['dcn_bytes_per_s_per_slice'])} "
               f"per slice (oversubscription {topo.dcn_oversubscription:g})")
    else:
        dcn = "- (one slice; --slices N joins N slices)"
    human = "\n".join([
        f"{topo.name}  ({topo.chip.display_name})",
        f"  chips        {topo.num_chips}  ({topo.slices} slice{'s' if topo.slices > 1 else ''} of "
        f"{topo.chips_per_slice}), {topo.num_hosts} hosts of {block} chips",
        f"  axes         {axes}",
        f"  ICI links    {topo.ici_links}  ({fmt_rate(topo.chip.ici_link_bytes_per_s)} each way per link)",
        f"  per axis     {per_axis}  (bidirectional, per chip: the book's W_ici)",
        f"  bisection    {fmt_rate(d['bisection_bytes_per_s'])} one way, per slice",
        f"  DCN          {dcn}",
    ])
    _emit(as_json, d, human)


@main.command()
@click.argument("kind", metavar="KIND")
@click.option("--bytes", "nbytes", required=True, metavar="V",
              help="the book's V: bytes of the whole array a device holds after an all-gather, or before a "
                   "reduce-scatter / all-reduce; for all-to-all and permute, the bytes a device sends")
@_topology_option
@click.option("--axes", required=True, metavar="AXES", help="torus axes (x, xy, z), dcn, or both (xy,dcn)")
@_slices_option
@_mode_option
@_json_option
def collective(kind: str, nbytes: str, topology: str, axes: str, slices: int, mode: str, as_json: bool) -> None:
    """Predict one collective's time, uncontended. KIND: all-gather, reduce-scatter, all-reduce,
    all-to-all, collective-permute."""
    from tpusim.sim.collectives import collective_time, link_params, lower, parse_axes, parse_kind
    from tpusim.sim.topology import parse_topology
    from tpusim.units import fmt_bytes, fmt_rate, fmt_time

    kind = parse_kind(kind)
    v = parse_bytes(nbytes)
    topo = parse_topology(topology, slices=slices)
    plan = lower(kind, v, topo, parse_axes(axes, topo))
    t = collective_time(plan, link_params(topo, mode))
    t_ds = collective_time(plan, link_params(topo, "datasheet"))
    link_bytes = plan.link_bytes_by_axis()
    payload = {
        "kind": kind, "bytes": v, "topology": topo.name, "axes": list(plan.axes), "group_size": plan.group_size,
        "mode": mode, "time_s": t, "datasheet_time_s": t_ds, "algorithm": plan.algorithm,
        "link_bytes_per_direction": link_bytes,
        "algorithm_bandwidth_bytes_per_s": v / t if t > 0 else None,
        "stages": [[{"axis": p.axis, "algorithm": p.algorithm, "op": p.op, "group": p.group, "steps": p.steps,
                     "link_bytes": p.link_bytes} for p in s.phases] for s in plan.stages],
    }
    per_link = ", ".join(f"{a}: {fmt_bytes(b)}" for a, b in link_bytes.items()) or "-"
    human = "\n".join([
        f"{kind} of {fmt_bytes(v)} over {'+'.join(plan.axes)} of {topo.name} (group of {plan.group_size})",
        f"  algorithm    {plan.algorithm}",
        f"  time         {fmt_time(t)} ({mode})" + ("" if mode == "datasheet" else f", {fmt_time(t_ds)} datasheet"),
        f"  busiest link {per_link} each way",
        f"  achieved     {fmt_rate(v / t) if t > 0 else '-'} (V / time, the book's plotted bandwidth)",
    ])
    _emit(as_json, payload, human)


@main.command()
@click.argument("workload", metavar="WORKLOAD.yaml")
@click.option("--topology", "-t", "topology", metavar="[CHIP:]SHAPE",
              help="e.g. v5e:16x16; a bare shape takes the workload's chip (default: the workload's topology)")
@click.option("--slices", type=int, default=None, help="identical slices joined by DCN (default: the workload's)")
@_json_option
def program(workload: str, topology: str | None, slices: int | None, as_json: bool) -> None:
    """The compiled per-device program of one step: FLOPs, collectives, memory."""
    from tpusim.api import workload_and_topology
    from tpusim.compiler import compile_program
    from tpusim.model.mesh import resolve_mesh
    from tpusim.units import fmt_bytes

    w, topo = workload_and_topology(workload, topology, slices=slices)
    mesh = resolve_mesh(w.parallelism, topo, source=w.source)
    prog = compile_program(w, topo, mesh=mesh)
    mem = prog.memory.as_dict()
    payload = {
        "workload": w.name, "topology": topo.name, "chips": topo.num_chips,
        "model": {"name": w.model.name, "params": w.model.params, "active_params": w.model.active_params},
        "mesh": mesh.describe(),
        "model_flops_per_step": prog.model_flops_per_step, "flops_per_device": prog.flops_per_device,
        "tokens_per_step": prog.tokens_per_step, "ops": len(prog.ops),
        "peak_hbm_bytes_per_device": mem["total"], "hbm_capacity_bytes": prog.hbm_capacity_bytes,
        "memory": mem, "collectives": prog.collectives_summary(), "notes": list(prog.notes),
        **({"pipeline": {**prog.pipeline, "stage_memory": [m.as_dict() for m in prog.stage_memory]}}
           if prog.stages > 1 else {}),
    }
    m, s = w.model, w.step
    mesh_txt = "  ".join(f"{a}={n} on {','.join(str(p) for p in mesh.physical.get(a, ()))}"
                         for a, n in mesh.ici.items() if n > 1) or "one device"
    mesh_txt += "".join(f"  dcn_{a}={n}" for a, n in mesh.dcn.items() if n > 1)
    ratio = prog.flops_per_device * prog.devices / prog.model_flops_per_step
    lines = [
        f"{w.name} on {topo.name} ({topo.num_chips} chips)",
        f"  model        {m.name}: {m.params / 1e9:.2f}B params"
        + (f" ({m.active_params / 1e9:.2f}B active)" if m.num_experts > 1 else "")
        + f", L={m.num_layers} D={m.d_model} F={m.d_ff} N={m.num_heads} K={m.num_kv_heads} H={m.head_dim} "
          f"V={m.vocab_size}" + (f" E={m.num_experts} k={m.experts_per_token}" if m.num_experts > 1 else ""),
        f"  step         {s.per_device_batch_size:g} seq/device x {s.seq_len} = {prog.tokens_per_step / 1e6:.3g}M "
        f"tokens; {s.dtype}, {s.weight_dtype} weights, {s.optimizer}, remat {s.remat_policy}, {s.attention} attention",
        f"  mesh         {mesh_txt}",
        f"  FLOPs        model {prog.model_flops_per_step:.3e} per step ({s.attention_flops} attention); "
        f"executed {prog.flops_per_device:.3e} per device ({ratio:.2f}x model)",
        "  collectives  " + f"{'kind':<19}{'mesh axes':<18}{'physical':<14}{'count':>6}{'bytes':>11}",
    ]
    for c in prog.collectives_summary():
        lines.append("               " + f"{c['kind']:<19}{','.join(c['mesh_axes']):<18}{','.join(c['axes']):<14}"
                                         f"{c['count']:>6}{fmt_bytes(c['bytes']):>11}")
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in mem.items() if k != "total")
    lines.append(f"  HBM          {fmt_bytes(mem['total'])} of {fmt_bytes(prog.hbm_capacity_bytes)} "
                 f"({mem['total'] / prog.hbm_capacity_bytes:.0%}): {parts}")
    if prog.stages > 1:
        pp = prog.pipeline
        lines.append(f"  pipeline     {pp['stages']} stages over {pp['over'].upper()}, {pp['schedule']}, "
                     f"{pp['microbatches']} microbatches, {pp['repeats']} chunk(s) of {pp['layers_per_chunk']} "
                     f"layer(s) per stage; bubble by the Playbook's formula {pp['bubble_formula']:.1%}")
        for st in range(prog.stages):
            ops = [op for op in prog.ops if op.stage == st]
            layers = sorted({op.layer for op in ops if op.layer >= 0})
            chunks = [layers[i:i + pp["layers_per_chunk"]] for i in range(0, len(layers), pp["layers_per_chunk"])]
            lines.append(f"  stage {st:<6} layers {', '.join(f'{c[0]}-{c[-1]}' for c in chunks)}; "
                         f"{sum(op.flops for op in ops):.3e} FLOPs; {len(prog.stage_devices[st])} devices; "
                         f"HBM {fmt_bytes(prog.stage_memory[st].total)} "
                         f"({pp['peak_in_flight'][st]:g} microbatches' activations in flight)")
    lines += [f"  note         {n}" for n in prog.notes]
    _emit(as_json, payload, "\n".join(lines))
