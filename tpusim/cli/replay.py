"""``tpusim replay`` (a real profile simulated op by op against its measured times) and ``compare`` (a
run folder beside a profile)."""

from __future__ import annotations

import contextlib

import click

from tpusim.cli.common import _emit, _json_option, _mode_option, dumps, main, prepare_out
from tpusim.errors import TpusimError


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
        folder = prepare_out(out_dir, "replay") if out_dir else None  # before simulating, after what can be refused
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
