"""``tpusim sweep`` and ``tpusim search``: thin commands over :mod:`tpusim.explore.sweep` and :mod:`tpusim.explore.search`.

:func:`register` adds them to the ``tpusim`` group (``tpusim/cli/__init__.py`` calls it). Progress goes
to stderr: a tqdm bar on a terminal, otherwise a line every few seconds.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import click

from tpusim.errors import TpusimError

SHOWN_ROWS = 40  # rows printed for people; the file (and --json) has them all
_LINE_EVERY_S = 5.0


class Progress:
    """``done/total, rate, time left`` on stderr: tqdm on a terminal, plain lines (every few seconds) elsewhere."""

    def __init__(self, what: str, quiet: bool = False):
        self.what, self.quiet = what, quiet
        self.bar = None
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if sys.stderr.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="config", desc=self.what, leave=False, file=sys.stderr)
            self.bar.update(done - self.bar.n)
            return
        now = time.perf_counter()
        if now - self.last >= _LINE_EVERY_S and done < total:
            rate = done / (now - self.t0)
            click.echo(f"{self.what}: {done}/{total} configurations, {rate:.1f}/s, "
                       f"{(total - done) / rate:.0f} s left", err=True)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class GracefulStop:
    """SIGINT and SIGTERM end a sweep gracefully: the first starts no new configuration and lets the
    running ones finish (their rows are saved); a second ends it at once (KeyboardInterrupt). Calling
    the object says whether a signal came; ``signum`` is the first one."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler can run in the middle of another write to stderr
        os.write(2, b"\ntpusim: stopping: no new configurations; the running ones finish "
                    b"(Ctrl-C again to stop now)\n")

    def __enter__(self) -> GracefulStop:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def _sweep_table(df, varied: list[str], limit: int, serving: bool = False) -> list[str]:
    from tpusim.units import fmt_time

    width = {k: max(len(k), *(len(str(v)) for v in df[k])) for k in varied}
    head = "  ".join(f"{k:<{width[k]}}" for k in varied)
    if serving:  # the latency-throughput curve: tokens/s per chip, TTFT and TPOT percentiles
        lines = [f"  {head}  {'status':<10}{'tok/s/chip':>11}{'TTFT p50':>10}{'p99':>9}{'TPOT p50':>10}{'p99':>9}"
                 "  bottleneck / reason"]
        for r in df.head(limit).to_dict("records"):
            cells = "  " + "  ".join(f"{r[k]!s:<{width[k]}}" for k in varied) + f"  {r['status']:<10}"
            if r["status"] == "ok":
                def t(key, w):
                    v = r.get(key)
                    return f"{fmt_time(v) if v is not None and v == v else '-':>{w}}"
                cells += (f"{r['throughput.output_tokens_per_s_per_chip']:>11,.1f}{t('ttft_s.p50', 10)}"
                          f"{t('ttft_s.p99', 9)}{t('tpot_s.p50', 10)}{t('tpot_s.p99', 9)}  {r['bottleneck']}")
            else:
                cells += f"{'-':>11}{'-':>10}{'-':>9}{'-':>10}{'-':>9}  {r['reason']}"
            lines.append(cells)
        if len(df) > limit:
            lines.append(f"  ... and {len(df) - limit} more rows")
        return lines
    lines = [f"  {head}  {'status':<10}{'step time':>10}{'MFU':>8}  bottleneck / reason"]
    for r in df.head(limit).to_dict("records"):
        ok = r["status"] == "ok"
        lines.append("  " + "  ".join(f"{r[k]!s:<{width[k]}}" for k in varied) + f"  {r['status']:<10}"
                     + (f"{fmt_time(r['step_time_s']):>10}{r['mfu']:>8.1%}  {r['bottleneck']}" if ok
                        else f"{'-':>10}{'-':>8}  {r['reason']}"))
    if len(df) > limit:
        lines.append(f"  ... and {len(df) - limit} more rows")
    return lines


def _search_lines(res: dict) -> list[str]:
    from tpusim.units import fmt_time

    c = res["counts"]
    lines = [(f"search for {res['workload']} on {res['topology']} ({res['chips']} chips, {res['mode']}), "
              f"best {res['objective'].replace('_', ' ')}"),
             (f"  plans        {c['enumerated']} enumerated: {c['invalid']} cannot be placed or split, "
              f"{c['out_of_hbm']} do not fit in HBM, {c['duplicate']} duplicates, {c['roofline']} ruled out by the "
              f"roofline, {c['budget']} over budget; {c['simulated']} simulated in {res['wall_s']:.1f} s"),
             f"  {'#':>3}  {'mesh':<44}{'remat':<10}{'batch':>6}{'step time':>11}{'MFU':>8}{'exposed':>9}{'HBM':>6}"]
    for i, p in enumerate(res["top"], start=1):
        lines.append(f"  {i:>3}  {p['mesh']:<44}{p['remat_policy']:<10}{p['per_device_batch_size']:>6g}"
                     f"{fmt_time(p['step_time_s']):>11}{p['mfu']:>8.1%}{p['exposed_fraction']:>9.0%}"
                     f"{p['hbm_fraction']:>6.0%}")
        lines.append(f"       why: {p['why']}")
    lines.append(f"  pure FSDP    {res['pure_fsdp']['verdict']}")
    lines.append(f"  pipeline     {res['pipeline']}")
    if res["failed"]:
        lines.append(f"  failed       {len(res['failed'])} simulated plans, e.g. {res['failed'][0]['mesh']}: "
                     f"{res['failed'][0]['reason']}")
    return lines


def _serving_search_lines(res: dict) -> list[str]:
    from tpusim.units import fmt_time

    c, lim = res["counts"], res["limits"]
    p = f"p{lim['percentile']}"
    limits = " and ".join(s for s in ((f"TPOT {p} <= {fmt_time(lim['tpot_s'])}" if lim["tpot_s"] else ""),
                                      (f"TTFT {p} <= {fmt_time(lim['ttft_s'])}" if lim["ttft_s"] else "")) if s)
    lines = [f"serving search for {res['workload']} ({res['model']}) on {res['topology']} ({res['chips']} chips, "
             f"{res['mode']}): most output tokens/s per chip with {limits}",
             f"  load         {res['load']}; {res['mean_input_tokens']:.0f} in / {res['mean_output_tokens']:.0f} out "
             "tokens on average",
             (f"  plans        {c['enumerated']} meshes x formats: {c['invalid']} cannot be placed, {c['out_of_hbm']} do "
              f"not fit in HBM; of their batches {c['roofline']} ruled out by the roofline, {c['bounded']} by the "
              f"bound, {c['budget']} over budget; {c['simulated']} simulated ({c['missed_limit']} missed the limit) "
              f"in {res['wall_s']:.1f} s"),
             f"  {'#':>3}  {'plan':<34}{'slots':>6}{'tok/s/chip':>11}{'TPOT ' + p:>10}{'TTFT ' + p:>10}"]
    for i, t in enumerate(res["top"], start=1):
        lines.append(f"  {i:>3}  {t['mesh']:<34}{t['slots_per_replica']:>6}{t['tokens_per_s_per_chip']:>11,.1f}"
                     f"{fmt_time(t[f'tpot_{p}_s']):>10}{fmt_time(t[f'ttft_{p}_s']):>10}")
        lines.append(f"       why: {t['why']}")
    for r in res["rejected"][:3]:
        lines.append(f"  refused      {r['plan']}: {r['reason']}")
    return lines


def _check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise TpusimError(f"{workers} is not a positive number of processes", source="--workers")


def register(main: click.Group) -> None:
    """Add ``sweep`` and ``search`` to the ``tpusim`` command group."""
    from tpusim.cli.common import _emit, _json_option, _mode_option

    # tpusim.explore.sweep (pandas, pyarrow, the engine) is imported inside the commands, never here: every
    # command, --help included, would pay its 0.5 s. test_startup checks this number is sweep.MAX_GRID.
    max_grid = 2000

    ray_option = click.option("--ray", "ray_address", metavar="auto|ADDRESS",
                              help="run on Ray: auto = the running cluster (RAY_ADDRESS, or the last one started "
                                   "here), else a new local one; ADDRESS = that cluster (needs tpusim[ray])")
    workers_option = click.option("--workers", type=int, default=None,
                                  help="local worker processes (default: every core; 1 = in this process)")

    @main.command()
    @click.argument("spec", metavar="WORKLOAD.yaml|SWEEP.yaml")
    @click.option("--topology", "-t", "topology", metavar="[CHIP:]SHAPE", help="default: the workload's")
    @click.option("--vary", "vary_items", multiple=True, metavar="KEY=V1,V2,...",
                  help="a MaxText key (or topology, slices, mode) and its values, YAML scalars; repeatable")
    @click.option("--slices", type=int, default=None, help="identical slices joined by DCN (default: the workload's)")
    @_mode_option
    @click.option("--out", metavar="FILE", help="write the rows here (.parquet or .csv) as they finish; run the "
                                                "same command again to resume")
    @workers_option
    @ray_option
    @click.option("--yes", is_flag=True, help=f"run grids of more than {max_grid:,} configurations")
    @click.option("--exact", is_flag=True, help="simulate every training step whole (rows equal to tpusim run's to "
                                                "the last digit; slower: by default a step is extrapolated in its "
                                                "layers, equal to 1e-9)")
    @_json_option
    @click.pass_context
    def sweep(ctx: click.Context, spec: str, topology: str | None, vary_items: tuple[str, ...], slices: int | None,
              mode: str, out: str | None, workers: int | None, ray_address: str | None, yes: bool, exact: bool,
              as_json: bool) -> None:
        """Simulate every combination of the --vary values: one row per configuration, with every field
        of tpusim run, or why it is invalid or does not fit. A SWEEP.yaml has workload:, topology: (or a
        topologies: list), slices:, mode: and vary: (key -> list of values)."""
        from click.core import ParameterSource

        from tpusim.explore.sweep import (
            check_out,
            journal_path,
            make_sweep,
            parse_vary,
            read_sweep_file,
            row_dicts,
            run_sweep,
        )

        settings = read_sweep_file(spec) or {"workload": spec, "vary": {}}
        vary = {**settings["vary"], **parse_vary(vary_items)}
        if topology is not None and "topology" in vary:
            raise TpusimError("give --topology or vary topology, not both", source="--topology")
        if ctx.get_parameter_source("mode") is ParameterSource.DEFAULT:
            mode = settings.get("mode", mode)
        _check_workers(workers)
        path = check_out(out) if out else None
        if path is not None:  # an unwritable folder is refused now, not after the first configuration
            from tpusim.safeio import check_writable_file

            check_writable_file(path, source=f"--out {out}")
        sw = make_sweep(settings["workload"], vary, topology=topology or settings.get("topology"),
                        slices=slices if slices is not None else settings.get("slices"), mode=mode, yes=yes,
                        exact=exact)
        for warning in sw.warnings:
            click.echo(f"tpusim: warning: {warning}", err=True)
        bar = Progress("sweep")
        with GracefulStop() as stop:
            try:
                done = run_sweep(sw, out=path, workers=workers, ray=ray_address, progress=bar, stop=stop)
            except KeyboardInterrupt:
                stop.signum = stop.signum or signal.SIGINT
                done = None
        bar.close()
        if stop.signum is not None and (done is None or done.resumed + done.simulated < done.total):
            where = (f"every finished row is in {journal_path(path)} (and {path.name}); run the same command "
                     "again to resume" if path else "nothing saved (give --out FILE to keep rows)")
            click.echo(f"tpusim: interrupted by {signal.Signals(stop.signum).name}: {where}", err=True)
            sys.exit(128 + stop.signum)
        df = done.rows
        counts = {k: int(v) for k, v in df["status"].value_counts().items()}
        payload = {"workload": sw.context()["workload"], "total": done.total, "resumed": done.resumed,
                   "simulated": done.simulated, "counts": counts, "wall_s": done.wall_s,
                   "out": str(path) if path else None,
                   "rows": row_dicts(df)}
        rate = f", {done.simulated / done.wall_s:.1f}/s" if done.simulated and done.wall_s > 0 else ""
        human = [f"sweep of {payload['workload']}: {done.total} configurations ("
                 + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")"
                 + (f"; {done.resumed} already in {path}" if done.resumed else "")
                 + f"; {done.simulated} simulated in {done.wall_s:.1f} s{rate}"]
        human += _sweep_table(df, list(sw.vary), SHOWN_ROWS, serving="serving" in sw.raw)
        if path:
            human.append(f"  wrote        {path}")
        _emit(as_json, payload, "\n".join(human))

    @main.command()
    @click.argument("workload", metavar="WORKLOAD.yaml")
    @click.option("--topology", "-t", "topology", metavar="[CHIP:]SHAPE", help="default: the workload's")
    @click.option("--slices", type=int, default=None, help="identical slices joined by DCN (default: the workload's)")
    @_mode_option
    @click.option("--objective", type=click.Choice(["mfu", "step_time"]), default="mfu", show_default=True,
                  help="rank by MFU, or by step time (which keeps the workload's global batch)")
    @click.option("--top", "top", type=int, default=5, show_default=True, help="plans to show")
    @click.option("--remat", default="full,minimal,none", show_default=True, metavar="P1,P2",
                  help="remat policies to try")
    @click.option("--keep-global-batch", is_flag=True,
                  help="keep the workload's per-device batch (else also try half and double)")
    @click.option("--budget", type=int, default=256, show_default=True,
                  help="simulate at most this many plans (best roofline estimates first), besides pure FSDP "
                       "and the best pipelined and unpipelined plans (serving: 128 unless given)")
    @click.option("--tpot-ms", type=float, default=None, help="serving: the TPOT limit (ms)")
    @click.option("--ttft-ms", type=float, default=None, help="serving: the TTFT limit (ms)")
    @click.option("--percentile", type=int, default=90, show_default=True,
                  help="serving: the percentile the limits apply to (50, 90 or 99)")
    @click.option("--quantization", "quants", default="bf16,int8_weight_only,int8", show_default=True,
                  metavar="Q1,Q2", help="serving: weight formats to try")
    @click.option("--requests", "n_requests", type=int, default=None,
                  help="serving: requests per plan (at least 4 per client; default: the workload's)")
    @workers_option
    @ray_option
    @_json_option
    @click.pass_context
    def search(ctx: click.Context, workload: str, topology: str | None, slices: int | None, mode: str,
               objective: str, top: int, remat: str, keep_global_batch: bool, budget: int, tpot_ms: float | None,
               ttft_ms: float | None, percentile: int, quants: str, n_requests: int | None, workers: int | None,
               ray_address: str | None, as_json: bool) -> None:
        """Find the best sharding: enumerate meshes (data, fsdp, tensor, sequence, expert; DCN data or
        fsdp), remat policies and per-device batches, prune with the book's rooflines, simulate the rest,
        and say why the best win and where pure FSDP runs out. For a serving workload (a serving section),
        find the mesh, weight format and slots with the most output tokens/s per chip under --tpot-ms
        and/or --ttft-ms."""
        from click.core import ParameterSource

        from tpusim.config import read_yaml
        from tpusim.model.spec import REMAT_POLICIES

        _check_workers(workers)
        raw = read_yaml(workload)
        serving_only = ("tpot_ms", "ttft_ms", "percentile", "quants", "n_requests")
        given = [n for n in ctx.params if ctx.get_parameter_source(n) is not ParameterSource.DEFAULT]
        if isinstance(raw, dict) and "serving" in raw:
            training = [n for n in ("slices", "objective", "remat", "keep_global_batch") if n in given]
            if training:
                raise TpusimError(f"a serving workload is searched by latency limits, not --{training[0].replace('_', '-')}",
                                  source=f"--{training[0].replace('_', '-')}")
            from tpusim.explore.servesearch import QUANTIZATIONS, search_serving

            qs = tuple(q.strip() for q in quants.split(",") if q.strip())
            bad = [q for q in qs if q not in (*QUANTIZATIONS, "int4_weight_only", "fp8")]
            if not qs or bad:
                raise TpusimError(f"{', '.join(bad) or 'nothing'}: weight formats are {', '.join(QUANTIZATIONS)}, "
                                  "int4_weight_only, fp8", source="--quantization")
            bar = Progress("search")
            res = search_serving(workload, topology, mode=mode, tpot_s=None if tpot_ms is None else tpot_ms / 1e3,
                                 ttft_s=None if ttft_ms is None else ttft_ms / 1e3, percentile=percentile,
                                 quantizations=qs, top=top, budget=min(budget, 128) if "budget" not in given else budget,
                                 requests=n_requests, workers=workers, ray=ray_address, progress=bar)
            bar.close()
            _emit(as_json, res, "\n".join(_serving_search_lines(res)))
            return
        wrong = [n for n in serving_only if n in given]
        if wrong:
            raise TpusimError(f"{workload} is a training workload (no serving section): --{wrong[0].replace('_', '-')} "
                              "searches serving", source=f"--{wrong[0].replace('_', '-').replace('quants', 'quantization').replace('n-requests', 'requests')}")
        from tpusim.explore.search import search as run_search

        policies = tuple(p.strip() for p in remat.split(",") if p.strip())
        bad = [p for p in policies if p not in REMAT_POLICIES]
        if not policies or bad:
            raise TpusimError(f"{', '.join(bad) or 'nothing'}: remat policies are {', '.join(REMAT_POLICIES)}",
                              source="--remat")
        bar = Progress("search")
        res = run_search(workload, topology, slices=slices, mode=mode, objective=objective, top=top, remat=policies,
                         keep_global_batch=keep_global_batch, budget=budget, workers=workers, ray=ray_address,
                         progress=bar)
        bar.close()
        _emit(as_json, res, "\n".join(_search_lines(res)))
