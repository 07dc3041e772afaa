"""``tpusim topology``, ``collective``, ``program``, ``run`` (also ``--hlo``), ``replay`` and ``compare``.

Each command is a few lines over the library; the group, the error rule and ``--json`` are in
:mod:`tpusim.cli.common`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys

import click

from tpusim.cli.common import (_emit, _json_option, _mode_option, _slices_option, _topology_option, dumps,
                               main, parse_bytes)
from tpusim.errors import TpusimError
from tpusim.limits import MAX_STRAGGLER_FACTOR, MAX_TIMELINE_ROWS

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


@main.command()
@click.argument("workload", metavar="WORKLOAD.yaml", required=False)
@click.option("--hlo", "hlo_file", metavar="FILE", help="simulate XLA's optimized HLO text instead of a workload")
@click.option("--topology", "-t", "topology", metavar="[CHIP:]SHAPE",
              help="e.g. 16x16 or v5e:16x16; a bare shape takes the workload's chip (default: the workload's topology)")
@click.option("--slices", type=int, default=None, help="identical slices joined by DCN (default: the workload's)")
@_mode_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="write summary.json, timeline.parquet, trace.json.gz (Perfetto), report.html and "
                   "plugins/profile/tpusim/simulated.xplane.pb (xprof --logdir DIR) here")
@click.option("--all-devices", is_flag=True, help="expand the timeline to every device (large for big slices)")
@click.option("--straggler", "stragglers", multiple=True, metavar="DEVICE=FACTOR",
              help="slow one device's compute by FACTOR (e.g. 3=1.2); repeatable")
@_json_option
def run(workload: str | None, hlo_file: str | None, topology: str | None, slices: int | None, mode: str,
        out_dir: str | None, all_devices: bool, stragglers: tuple[str, ...], as_json: bool) -> None:
    """Simulate one training step: step time, MFU, exposed communication, bottleneck, timeline.

    With --hlo FILE, simulate a real compiled program (MFU then counts the HLO's FLOPs)."""
    from tpusim.api import compile_workload
    from tpusim.sim.engine import check_stragglers, simulate
    from tpusim.analysis.summary import format_summary, summarize

    slow = _parse_stragglers(stragglers)
    if (workload is None) == (hlo_file is None):
        raise TpusimError("give a WORKLOAD.yaml or --hlo FILE (one of them)", source="tpusim run")
    if hlo_file is not None:
        from tpusim.compiler.hlo.importer import import_hlo, read_hlo
        from tpusim.sim.topology import parse_topology

        if topology is None:
            raise TpusimError("--hlo needs --topology CHIP:SHAPE", source="--hlo")
        topo = parse_topology(topology, slices=slices or 1)
        prog = import_hlo(read_hlo(hlo_file), topo, source=hlo_file)
    else:
        w, topo, prog = compile_workload(workload, topology, slices=slices)
    check_stragglers(slow, topo)  # before the output folder is prepared
    if all_devices and out_dir and len(prog.ops) * topo.num_chips > MAX_TIMELINE_ROWS:
        raise TpusimError(f"{len(prog.ops):,} ops on {topo.num_chips:,} chips would be "
                          f"{len(prog.ops) * topo.num_chips:,} timeline rows; at most {MAX_TIMELINE_ROWS:,} "
                          f"(leave it out for one device per class)", source="--all-devices")
    folder = _prepare_out(out_dir, "run") if out_dir else None  # before simulating, after what can be refused
    with folder or contextlib.nullcontext():
        n_compute = len(prog.compute_ops)
        with _progress(n_compute, as_json) as bar:
            result = simulate(prog, topo, mode=mode, stragglers=slow, progress=lambda n: bar.update(n - bar.n))
            bar.update(n_compute - bar.n)
        if not math.isfinite(result.step_time_s):
            raise RuntimeError(f"the simulated step time is {result.step_time_s}")  # inputs are bounded: a bug
        if not result.step_time_s > 0:
            what = hlo_file or workload
            raise TpusimError(f"nothing to simulate: the program takes no time on {topo.name} ({len(prog.ops)} ops, "
                              "none of them moving bytes or doing FLOPs, e.g. collectives over one device)",
                              source=what)
        summary = summarize(result)
        if folder is not None:
            _write_run(folder.tmp, result, summary, all_devices)
            summary["out"] = str(out_dir)
    _emit(as_json, summary, format_summary(summary) + (f"\n  wrote        {out_dir}/" if folder else ""))


def _parse_stragglers(items: tuple[str, ...]) -> dict[int, float]:
    slow = {}
    for item in items:
        dev, _, factor = item.partition("=")
        try:
            slow[int(dev)] = float(factor)
        except ValueError:
            raise TpusimError(f"{item!r} is not DEVICE=FACTOR (e.g. 3=1.2)", source="--straggler") from None
        if not 0 < slow[int(dev)] <= MAX_STRAGGLER_FACTOR:
            raise TpusimError(f"{item!r}: the factor must be a number above 0 and at most {MAX_STRAGGLER_FACTOR:g} "
                              "(a device slower than that is down, not straggling)", source="--straggler")
    return slow


def _prepare_out(out_dir: str, command: str):
    """Check the output folder now (writable; new, empty or a run folder), so a bad one fails before
    any simulation; the run is written beside it and swapped in whole (:mod:`tpusim.runfolder`)."""
    from tpusim.runfolder import RunFolder

    return RunFolder(out_dir, command)


class _NoBar:
    """The progress bar where none is shown: tqdm is not even imported (~0.05-0.09 s of start-up)."""

    n = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, k: int) -> None:
        self.n += k


def _progress(total: int, quiet: bool):
    # Shown on a terminal only, and only once a run has taken a second.
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="op", desc="simulating", delay=1.0, leave=False)


def _write_run(out, result, summary: dict, all_devices: bool) -> None:
    # No pandas here (issue 13: ~0.35 s of the command): the writers take the timeline as column lists.
    # Each process imports what it writes with, after the fork: the child the XSpace's protobuf, this
    # one pyarrow (and numpy) and the report.
    from tpusim.analysis.timeline import timeline_columns, write_atomic, write_chrome_trace, write_timeline_parquet

    columns = timeline_columns(result, all_devices=all_devices)

    def traces() -> None:
        from tpusim.analysis.xspace import write_xspace

        write_chrome_trace(columns, result, out / "trace.json.gz")
        write_xspace(out, columns, result)  # plugins/profile/tpusim/simulated.xplane.pb, for xprof --logdir out

    with _alongside(traces):  # the two traces in a second process while this one writes the rest
        from tpusim.analysis.report import write_report  # its charts are drawn without altair (svgcharts)

        write_timeline_parquet(columns, out / "timeline.parquet")
        # The files say what was simulated, not how long this machine took: two identical runs write
        # identical bytes (the wall time is printed, and kept in --json).
        kept = {k: v for k, v in summary.items() if k != "sim_wall_s"}
        write_atomic(out / "summary.json", (dumps(kept, indent=2) + "\n").encode())
        write_report(out / "report.html", result, kept, columns)


@contextlib.contextmanager
def _alongside(work):
    """Run ``work()`` in a forked child while the ``with`` body runs here; leave only once both are done.

    Speed (issue 13): the Chrome trace and the XSpace are ~0.3 s of `run --out`'s ~1.2 s of CPU, and
    independent of the rest; on two cores they overlap with the Parquet and the report. Both write into
    the run's temporary folder, which is swapped in only after this returns, so the folder is never
    seen half-written. The child dies with this process (a killed run leaves no writer behind); an
    error in either is raised here (the child's as the OSError it was, or a RuntimeError: a bug) and
    the other is stopped. Without ``os.fork`` (not POSIX), ``work()`` runs here first."""
    if not hasattr(os, "fork"):
        work()
        yield
        return
    import pickle

    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's stack (os._exit, no unwinding)
        code = 1
        try:
            os.close(read_fd)
            from tpusim.runfolder import die_with_parent

            die_with_parent(parent)
            work()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
            error = (e.errno, e.strerror or str(e)) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
            with contextlib.suppress(BaseException):
                os.write(write_fd, pickle.dumps(error))
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read()  # empty unless the child failed; EOF once it has exited
        _, status = os.waitpid(pid, 0)
    if status != 0:
        error = pickle.loads(message) if message else f"the trace writer ended with status {status}"
        if isinstance(error, tuple):
            raise OSError(*error)
        raise RuntimeError(error)


@main.command()
@click.argument("profile", metavar="PROFILE")
@click.option("--topology", "-t", "topology", metavar="CHIP:SHAPE", help="default: read from the profile")
@_mode_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="write replay.json and plugins/profile/replay/ (hosts simulated and measured, with the "
                   "profile's HLO modules: xprof --logdir DIR) here")
@_json_option
def replay(profile: str, topology: str | None, mode: str, out_dir: str | None, as_json: bool) -> None:
    """Simulate what a real profile ran, op by op, and compare with the measured times.

    PROFILE: an .xplane.pb, a trace-viewer / Perfetto JSON, a profile directory, or a TensorBoard
    pod_viewer JSON (its collectives)."""
    from tpusim.sim.topology import parse_topology

    if out_dir and str(profile).endswith("pod_viewer.json"):
        raise TpusimError("a pod viewer output has no timeline to write; --out takes an .xplane.pb, a trace "
                          "JSON or a profile directory", source=f"--out {out_dir}")
    if str(profile).endswith("pod_viewer.json"):
        from tpusim.analysis.replay import replay_pod_viewer

        df = replay_pod_viewer(profile, mode=mode)
        med = float(df.rel_error.abs().median())
        payload = {"profile": profile, "mode": mode, "median_abs_rel_error": med,
                   "ops": df.rename(columns={"kind": "category"}).to_dict("records")}
        lines = [f"{profile}: {len(df)} collectives simulated alone ({mode})"]
    else:
        from tpusim.analysis.profiles import read_profile
        from tpusim.analysis.replay import replay as run_replay

        prof = read_profile(profile)
        topo = parse_topology(topology) if topology else None
        if out_dir:
            from tpusim.analysis.replayout import check_out

            check_out(out_dir, prof)
        folder = _prepare_out(out_dir, "replay") if out_dir else None  # before simulating, after what can be refused
        with folder or contextlib.nullcontext():
            result = run_replay(prof, topology=topo, mode=mode)
            df = result.ops
            med = result.median_abs_rel_error
            payload = {"profile": prof.source, "topology": result.topology.name, "mode": mode,
                       "median_abs_rel_error": med, "ops": df.to_dict("records"),
                       "modules": result.module_times.to_dict("records")}
            if folder is not None:
                from tpusim.analysis.replayout import write_replay

                write_replay(folder.tmp, result, prof, dumps(payload, indent=2) + "\n")
                payload["out"] = str(out_dir)
        lines = [f"{prof.source} on {result.topology.name} ({mode})"]
        for r in result.module_times.itertuples(index=False):
            lines.append(f"  module {r.module}: measured {r.measured_s * 1e3:.3f} ms, simulated "
                         f"{r.simulated_s * 1e3:.3f} ms ({r.simulated_s / r.measured_s - 1:+.1%}), {r.runs} runs")
    from tpusim.analysis.replay import MIN_MEASURED_S

    lines.append(f"  {'op':<28}{'kind':<16}{'measured':>12}{'simulated':>12}{'error':>9}")
    for r in df.itertuples(index=False):
        kind = getattr(r, "category", getattr(r, "kind", ""))
        # no error for bookkeeping ops of a few ns (0 against 2.5 ns would read -100%)
        err = f"{r.rel_error:>+9.1%}" if r.measured_s >= MIN_MEASURED_S else f"{'-':>9}"
        lines.append(f"  {str(r.name):<28}{str(kind)[:15]:<16}{r.measured_s * 1e3:>10.3f}ms"
                     f"{r.simulated_s * 1e3:>10.3f}ms{err}")
    lines.append(f"  median |error| {med:.1%} (ops of at least 1 us)")
    if out_dir:
        lines.append(f"  wrote        {out_dir}/ (xprof --logdir {out_dir}: run replay, "
                     + ("hosts simulated, measured)" if prof.format == "xplane" else "host simulated; a trace JSON "
                        "has no HLO modules, so no graph or memory viewer)"))
    _emit(as_json, payload, "\n".join(lines))


@main.command()
@click.argument("run_dir", metavar="RUN_DIR")
@click.argument("profile", metavar="PROFILE")
@click.option("--trace", "trace_out", metavar="FILE", help="write both timelines in one Chrome trace here "
              "(default RUN_DIR/compare.trace.json.gz)")
@_json_option
def compare(run_dir: str, profile: str, trace_out: str | None, as_json: bool) -> None:
    """Compare a simulated run (tpusim run --out RUN_DIR) with a real profile."""
    from pathlib import Path

    from tpusim.analysis.compare import compare as do_compare, load_run, write_merged_trace, write_xprof_run
    from tpusim.analysis.profiles import read_profile
    from tpusim.units import fmt_time

    from tpusim.safeio import check_writable_file

    summary, timeline = load_run(run_dir)
    out = Path(trace_out) if trace_out else Path(run_dir) / "compare.trace.json.gz"
    check_writable_file(out, source=f"--trace {out}" if trace_out else str(out))  # before the work
    if str(profile).endswith("pod_viewer.json"):
        raise TpusimError("a pod viewer output has no timeline to compare with; its collectives replay with "
                          f"`tpusim replay {profile}`", source=str(profile))
    prof = read_profile(profile)
    result = do_compare(summary, timeline, prof)
    write_merged_trace(run_dir, prof, out)
    result["trace"] = str(out)
    result["xprof_run"] = str(write_xprof_run(run_dir, summary, timeline, prof))
    if result["warning"]:
        click.echo(f"tpusim: warning: {result['warning']}", err=True)
    st = result["step_time_s"]
    lines = [f"{result['workload']} (simulated) against {result['module']} in {prof.source}",
             f"  step time    measured {fmt_time(st['measured'])}, simulated {fmt_time(st['simulated'])}"
             + (f" ({st['rel_error']:+.1%})" if st["rel_error"] is not None else ""),
             f"  {'category':<20}{'measured':>12}{'simulated':>12}"]
    lines += [f"  {c['category']:<20}{fmt_time(c['measured_s']):>12}{fmt_time(c['simulated_s']):>12}"
              for c in result["categories"]]
    lines.append(f"  ops matched by name: {result['ops_matched']}")
    lines.append(f"  both timelines: {out} (open in Perfetto)")
    lines.append(f"  XProf: xprof --logdir {run_dir} (run {Path(result['xprof_run']).name}: hosts simulated"
                 + (", measured)" if prof.format == "xplane" else "; the profile is not an XSpace)"))
    if result["warning"]:
        lines.insert(1, f"  WARNING      {result['warning']}")
    _emit(as_json, result, "\n".join(lines))
