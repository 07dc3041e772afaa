"""Inference: prefill and decode steps, KV cache and serving, simulated request by request.

:func:`serve` is what ``tpusim serve`` and the notebooks call: load a serving workload
(:mod:`.workload`), compile its replica's step programs (:mod:`.compiler`), draw the requests
(:mod:`.requests`), simulate them (:mod:`.engine`) and summarize (:mod:`.summary`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tpusim.serving.compiler import StepModel
from tpusim.serving.engine import ServeResult, simulate_serving
from tpusim.serving.requests import make_requests
from tpusim.runfolder import RunFolder
from tpusim.serving.summary import format_summary, requests_frame, steps_frame, summarize, write_outputs
from tpusim.serving.workload import ServeWorkload, load_serve_workload, serve_workload_from_dict


@dataclass(frozen=True, slots=True)
class ServeRun:
    result: ServeResult
    summary: dict
    requests: pd.DataFrame
    steps: pd.DataFrame


def serve(workload: str | Path | ServeWorkload, topology: str | None = None, *, mode: str = "calibrated",
          rate: float | None = None, concurrency: int | None = None, trace: str | None = None,
          requests: int | None = None, out: str | Path | None = None) -> ServeRun:
    """Simulate serving ``workload`` on ``topology`` (``[CHIP:]SHAPE``, default: the workload's)."""
    from tpusim.api import workload_and_topology

    sw = workload if isinstance(workload, ServeWorkload) else load_serve_workload(
        workload, rate=rate, concurrency=concurrency, trace=trace, requests=requests)
    _, topo = workload_and_topology(sw.workload, topology)
    model = StepModel(sw, topo, mode)
    reqs = make_requests(sw)
    folder = RunFolder(out, "serve") if out is not None else None  # checked before simulating
    with folder or contextlib.nullcontext():
        res = simulate_serving(model, reqs)
        req_df, step_df = requests_frame(res), steps_frame(res)
        summary = summarize(res, req_df, step_df)
        if folder is not None:
            summary["out"] = str(out)
            write_outputs(folder.tmp, res, summary, req_df, step_df)
    return ServeRun(res, summary, req_df, step_df)


__all__ = ["serve", "ServeRun", "StepModel", "ServeWorkload", "load_serve_workload", "serve_workload_from_dict",
           "make_requests", "simulate_serving", "summarize", "format_summary"]
