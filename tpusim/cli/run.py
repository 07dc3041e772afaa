"""``tpusim run`` (a workload, or ``--hlo``): one step simulated, its summary, and with ``--out`` the
timeline, traces and report written beside the folder and swapped in whole.

The group, the error rule and ``--json`` are in :mod:`tpusim.cli.common`; ``topology``, ``collective``
and ``program`` are in :mod:`tpusim.cli.describe`, ``replay`` and ``compare`` in :mod:`tpusim.cli.replay`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys

import click

from tpusim.cli.common import _emit, _json_option, _mode_option, dumps, main, prepare_out
from tpusim.errors import TpusimError
from tpusim.limits import MAX_STRAGGLER_FACTOR, MAX_TIMELINE_ROWS


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
    folder = prepare_out(out_dir, "run") if out_dir else None  # before simulating, after what can be refused
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
