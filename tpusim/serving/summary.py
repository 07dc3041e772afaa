"""What a serving run did: throughput, latency percentiles, occupancy, KV cache, HBM, the bottleneck.

Conventions (those of vLLM's and JetStream's ``benchmark_serving.py``): the run lasts from the first
arrival to the last finish; *output* tokens/s counts generated tokens only, *total* adds the prompts;
TTFT = first token - arrival (queueing included); TPOT = (finish - first token) / (output - 1) per
request; ITL = every gap between two tokens of a request.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from tpusim.analysis.lanes import assign_lanes, to_ns
from tpusim.serving.compiler import PARTS
from tpusim.serving.engine import STEP_COLUMNS, ServeResult
from tpusim.units import fmt_bytes, fmt_time

PCTS = (50, 90, 99)


def _stats(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {"mean": None, **{f"p{p}": None for p in PCTS}}
    return {"mean": float(np.mean(x)), **{f"p{p}": float(np.percentile(x, p)) for p in PCTS}}


def requests_frame(res: ServeResult) -> pd.DataFrame:
    r = res.requests
    return pd.DataFrame({
        "request": np.array([q.i for q in r], dtype=np.int64),
        "replica": np.array([q.replica for q in r], dtype=np.int64),
        "decode_replica": np.array([q.decode_replica if q.decode_replica >= 0 else q.replica for q in r], dtype=np.int64),
        "arrival_s": np.array([q.arrival for q in r]),
        "start_s": np.array([q.start for q in r]),
        "first_token_s": np.array([q.first_token for q in r]),
        "finish_s": np.array([q.finish for q in r]),
        "input_tokens": np.array([q.n_in for q in r], dtype=np.int64),
        "output_tokens": np.array([q.n_out for q in r], dtype=np.int64),
    })


def steps_frame(res: ServeResult) -> pd.DataFrame:
    df = pd.DataFrame(res.steps, columns=list(STEP_COLUMNS))
    df["kv_bytes_per_device"] = df["kv_tokens"] * res.model.kv_per_token
    return df


def summarize(res: ServeResult, req: pd.DataFrame | None = None, steps: pd.DataFrame | None = None) -> dict:
    m = res.model
    sw, topo = m.sw, m.topo
    req = requests_frame(res) if req is None else req
    steps = steps_frame(res) if steps is None else steps
    t0 = float(req.arrival_s.min())
    duration = float(req.finish_s.max()) - t0
    out_tok, in_tok = int(req.output_tokens.sum()), int(req.input_tokens.sum())
    chips = topo.num_chips
    ttft = (req.first_token_s - req.arrival_s).to_numpy()
    multi = req[req.output_tokens > 1]
    tpot = ((multi.finish_s - multi.first_token_s) / (multi.output_tokens - 1)).to_numpy()
    queue = (req.start_s - req.arrival_s).to_numpy()
    e2e = (req.finish_s - req.arrival_s).to_numpy()
    dur = (steps.end_s - steps.start_s).to_numpy()
    busy = float(dur.sum())
    parts = {p: float(steps[f"{p}_s"].sum()) for p in PARTS}
    dec = steps[steps.decode_batch > 0]
    ddur = (dec.end_s - dec.start_s).to_numpy()
    occupancy = float((dec.decode_batch.to_numpy() * ddur).sum() / ddur.sum() / m.max_batch) if len(dec) else 0.0
    kv_cap = m.memory.kv_cache
    kv_use = (steps.kv_bytes_per_device.to_numpy() * dur).sum() / busy / kv_cap if busy and kv_cap else 0.0
    kv_peak = float(steps.kv_bytes_per_device.max()) / kv_cap if kv_cap else 0.0
    device = max(parts, key=parts.get) if busy else "idle"
    queue_share = float(queue.mean() / e2e.mean()) if e2e.mean() > 0 else 0.0
    bottleneck = "queueing" if queue_share > 0.5 else {"weights": "weights bandwidth (HBM)",
                                                        "kv": "KV-cache bandwidth (HBM)", "compute": "compute (MXU)",
                                                        "collectives": "collectives (ICI)"}.get(device, device)
    replicas = m.replicas
    a = sw.arrival
    arrival = ({"rate_per_s": a.rate_per_s if np.isfinite(a.rate_per_s) else "inf"} if a.kind == "rate"
               else {"concurrency": a.concurrency} if a.kind == "concurrency" else {"trace": a.trace})
    b = sw.batching
    return {
        "workload": sw.name, "topology": topo.name, "chips": chips, "mode": m.mode,
        "model": sw.workload.model.name, "quantization": sw.quantization or "bf16", "kv_dtype": sw.kv_dtype,
        "arrival": arrival, "requests": len(req),
        "batching": {"policy": b.policy, "chunked_prefill": b.chunked_prefill, "max_batch": m.max_batch,
                     "token_budget": m.token_budget},
        "replicas": replicas, "chips_per_replica": m.replica_chips, "prefill_replicas": res.n_prefill_replicas,
        "duration_s": duration,
        "throughput": {"output_tokens_per_s": out_tok / duration, "total_tokens_per_s": (in_tok + out_tok) / duration,
                       "requests_per_s": len(req) / duration,
                       "output_tokens_per_s_per_chip": out_tok / duration / chips},
        "tokens": {"input": in_tok, "output": out_tok, "mean_input": in_tok / len(req), "mean_output": out_tok / len(req)},
        "ttft_s": _stats(ttft), "tpot_s": _stats(tpot), "itl_s": _stats(res.itl_s), "queueing_s": _stats(queue),
        "e2e_s": _stats(e2e),
        "batch_occupancy": occupancy, "kv_cache_use": {"mean": float(kv_use), "peak": kv_peak},
        "hbm_per_device": m.describe()["hbm_per_device"],
        "device_time_s": {**parts, "busy": busy, "utilization": busy / (duration * replicas) if duration else 0.0},
        "bottleneck": bottleneck,
        "steps": len(steps), "step_evaluations": res.step_evaluations,
    }


def format_summary(s: dict) -> str:
    t, hbm = s["throughput"], s["hbm_per_device"]

    def pct(d):
        return "  ".join(f"p{p} {fmt_time(d[f'p{p}'])}" for p in PCTS) if d["mean"] is not None else "-"

    arr = ", ".join(f"{k} {v}" for k, v in s["arrival"].items())
    b = s["batching"]
    dt = s["device_time_s"]
    busy = dt["busy"] or 1.0
    lines = [
        f"{s['workload']} on {s['topology']} ({s['chips']} chips, {s['mode']}): {s['model']}, {s['quantization']} "
        f"weights, {s['kv_dtype']} KV cache",
        f"  replicas     {s['replicas']} x {s['chips_per_replica']} chips"
        + (f" ({s['prefill_replicas']} prefill, {s['replicas'] - s['prefill_replicas']} decode)" if s["prefill_replicas"] else "")
        + f", {b['policy']} batching{' + chunked prefill' if b['chunked_prefill'] else ''}, "
          f"{b['max_batch']} slots, {b['token_budget']} tokens/step",
        f"  requests     {s['requests']} ({arr}), {s['tokens']['mean_input']:.0f} in / {s['tokens']['mean_output']:.0f} "
        f"out tokens on average, {fmt_time(s['duration_s'])}",
        f"  throughput   {t['output_tokens_per_s']:,.0f} output tokens/s ({t['output_tokens_per_s_per_chip']:,.1f} per chip), "
        f"{t['total_tokens_per_s']:,.0f} total, {t['requests_per_s']:.2f} requests/s",
        f"  TTFT         {pct(s['ttft_s'])}",
        f"  TPOT         {pct(s['tpot_s'])}",
        f"  ITL          {pct(s['itl_s'])}",
        f"  queueing     {pct(s['queueing_s'])}",
        f"  batch        {s['batch_occupancy']:.0%} of slots in decode    KV cache {s['kv_cache_use']['mean']:.0%} used "
        f"(peak {s['kv_cache_use']['peak']:.0%})",
        f"  HBM          {fmt_bytes(hbm['total'])} of {fmt_bytes(hbm['capacity'])} per chip: weights "
        f"{fmt_bytes(hbm['weights'])}, KV cache {fmt_bytes(hbm['kv_cache'])}, working {fmt_bytes(hbm['working'])}",
        "  device time  " + "  ".join(f"{p} {dt[p] / busy:.0%}" for p in PARTS) + f"   busy {dt['utilization']:.0%}",
        f"  bottleneck   {s['bottleneck']}",
        f"  simulated    {s['steps']} steps ({s['step_evaluations']} step programs timed)",
    ]
    return "\n".join(lines)


# ---- files --------------------------------------------------------------------------------------------

def chrome_trace(res: ServeResult, req: pd.DataFrame, steps: pd.DataFrame) -> dict:
    """Perfetto / Chrome trace: one process per replica, its steps on one row and its requests on lanes
    (no two events of a row overlap). Times are whole nanoseconds, written in microseconds."""
    ev: list[dict] = []
    n_prefill = res.n_prefill_replicas
    for rep in range(res.model.replicas):
        pid = rep + 1
        role = "prefill" if rep < n_prefill else "decode" if n_prefill else "replica"
        ev.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": f"{role} {rep}"}})
        ev.append({"ph": "M", "pid": pid, "tid": 0, "name": "thread_name", "args": {"name": "steps"}})
        st = steps[steps.replica == rep]
        for r, s, e in zip(st.itertuples(index=False), to_ns(st.start_s), to_ns(st.end_s)):
            ev.append({"ph": "X", "pid": pid, "tid": 0, "name": r.kind, "ts": s / 1000, "dur": (e - s) / 1000,
                       "args": {"decode_batch": int(r.decode_batch), "prefill_tokens": int(r.prefill_tokens)}})
        rq = req[req.decode_replica == rep]
        s, e = to_ns(rq.arrival_s), to_ns(rq.finish_s)
        lanes = np.asarray(assign_lanes(s.tolist(), e.tolist()), dtype=np.int64)
        for lane in range(int(lanes.max()) + 1 if len(lanes) else 0):
            ev.append({"ph": "M", "pid": pid, "tid": lane + 1, "name": "thread_name",
                       "args": {"name": f"requests {lane}"}})
        for r, a, f, lane in zip(rq.itertuples(index=False), s, e, lanes):
            ev.append({"ph": "X", "pid": pid, "tid": int(lane) + 1, "name": f"request {r.request}", "ts": a / 1000,
                       "dur": (f - a) / 1000, "args": {"input_tokens": int(r.input_tokens),
                                                       "output_tokens": int(r.output_tokens),
                                                       "ttft_ns": int(to_ns(r.first_token_s) - a)}})
    return {"displayTimeUnit": "ns", "traceEvents": ev}


def write_outputs(folder: Path, res: ServeResult, summary: dict, req: pd.DataFrame, steps: pd.DataFrame) -> None:
    """summary.json, requests.parquet, steps.parquet, trace.json.gz, written into ``folder`` (the
    staging folder of a :class:`tpusim.runfolder.RunFolder`, swapped in whole once all are complete)."""
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, df in (("requests.parquet", req), ("steps.parquet", steps)):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False, engine="pyarrow")
        (folder / name).write_bytes(buf.getvalue())
    text = json.dumps(chrome_trace(res, req, steps), separators=(",", ":")).encode()
    (folder / "trace.json.gz").write_bytes(gzip.compress(text, mtime=0))
