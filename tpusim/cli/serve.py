"""``tpusim serve``: a thin command over :mod:`tpusim.serving`."""

from __future__ import annotations

import click

from tpusim.cli.common import _emit, _json_option, _mode_option, main

@main.command()
@click.argument("workload", metavar="WORKLOAD.yaml")
@click.option("--topology", "-t", "topology", metavar="[CHIP:]SHAPE", help="default: the workload's topology")
@click.option("--rate", type=float, default=None, help="Poisson arrivals, requests/s (inf: all at once)")
@click.option("--concurrency", type=int, default=None, help="closed loop: C clients, each waiting for its answer")
@click.option("--trace", "trace_file", metavar="FILE", default=None, help="CSV of arrival_s,input_tokens,output_tokens")
@click.option("--requests", "n_requests", type=int, default=None, help="requests to serve (default: the workload's)")
@_mode_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="write summary.json, requests.parquet, steps.parquet and trace.json.gz (Perfetto) here")
@_json_option
def serve(workload: str, topology: str | None, rate: float | None, concurrency: int | None, trace_file: str | None,
          n_requests: int | None, mode: str, out_dir: str | None, as_json: bool) -> None:
    """Simulate serving requests: throughput, TTFT / TPOT / ITL percentiles, batch, KV cache, bottleneck."""
    from tpusim.serving import format_summary, serve as run_serving

    run = run_serving(workload, topology, mode=mode, rate=rate, concurrency=concurrency, trace=trace_file,
                      requests=n_requests, out=out_dir)
    _emit(as_json, run.summary, format_summary(run.summary) + (f"\n  wrote        {out_dir}/" if out_dir else ""))
