"""``tpusim search`` for serving: the plan with the most output tokens/s per chip under a latency limit.

The book's question (applied-inference.md): how many chips per model replica, what sharding, what
batch and what weight format serve LLaMA-2-70B at a latency target. A *plan* is a mesh of the slice's
chips into replicas of ``tensor x expert`` chips for an MoE model, ``tensor`` or ``fsdp x tensor`` (2D
weight-stationary, inference.md Q7) for a dense one (the rest ``ici_data_parallelism`` replicas, each its
own engine), a weight format (``bf16``, ``int8_weight_only``, ``int8``; the KV cache quantized with the
weights, as the book's tables assume) and a number of decode slots per replica (powers of two up to
the most whose KV caches fit, and that most). Serving is co-located (the workload's disaggregation is
set aside).

Each plan is served at its own capacity: closed-loop clients, as many as it has slots (benchmark
clients keeping every slot busy), with the workload's length mix. Before simulating:

* **HBM**: the replica's weights, one slot's KV cache and the working set must fit
  (:class:`tpusim.serving.compiler.StepModel` refuses with the breakdown); the slots are capped there.
* **roofline** (inference.md): a decode step of the full batch B reads every weight and B KV caches of
  the mean context from HBM and does 2 FLOPs per weight per token, so it takes at least
  ``max(bytes / W_hbm, FLOPs / C)``. A plan whose full-batch step exceeds the TPOT limit is dropped (if a
  partly full batch met it, the plan with that many slots is the same run with less KV memory); so is
  a mesh whose weights alone take longer to read than the TTFT limit (every first token reads them).
  ``B / (step x chips per replica)`` bounds its output tokens/s per chip from above (a test checks it
  against every simulated plan).

Per mesh and format, more slots give a slower decode step and a longer prefill queue: the plan to
find is the most slots that still meet the limits. Each mesh-and-format family is bisected over its
slot counts, the families with the highest bound first, a few at a time (in parallel); a family whose
best remaining bound is below the best plan found so far is dropped (it cannot win). The result
ranks the plans that met the limits by output tokens/s per chip and says why each wins or loses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from tpusim.config import read_yaml
from tpusim.errors import InfeasibleError, TpusimError
from tpusim.explore.search import divisors
from tpusim.explore.sweep import Task, config_key, iter_rows
from tpusim.limits import MAX_REQUESTS
from tpusim.serving.workload import is_serving_workload, serve_workload_from_dict

QUANTIZATIONS = ("bf16", "int8_weight_only", "int8")
PERCENTILES = (50, 90, 99)


def _mean_lengths(sw) -> tuple[float, float]:
    from tpusim.serving.requests import make_requests

    reqs = make_requests(sw)
    return float(reqs.input_tokens.mean()), float(reqs.output_tokens.mean())


def search_serving(workload: str, topology: str | None = None, *, mode: str = "calibrated",
                   tpot_s: float | None = None, ttft_s: float | None = None, percentile: int = 90,
                   quantizations: tuple[str, ...] = QUANTIZATIONS, top: int = 5, budget: int = 24,
                   requests: int | None = None, workers: int | None = None, ray: str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Find the plans with the most output tokens/s per chip whose TPOT / TTFT (at ``percentile``) are
    within the limits; see the module docstring. A limit no plan can meet is a TpusimError."""
    from tpusim.api import workload_and_topology
    from tpusim.serving.compiler import StepModel

    t0 = time.perf_counter()
    source = str(workload)
    raw = read_yaml(workload)
    if not is_serving_workload(raw):
        raise TpusimError("--tpot-ms / --ttft-ms search a serving workload (one with a serving section)", source=source)
    if tpot_s is None and ttft_s is None:
        raise TpusimError("give a latency limit: --tpot-ms and/or --ttft-ms", source="tpusim search")
    for name, v in (("--tpot-ms", tpot_s), ("--ttft-ms", ttft_s)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise TpusimError(f"{v * 1e3:g} is not a positive number of milliseconds", source=name)
    if percentile not in PERCENTILES:
        raise TpusimError(f"{percentile}: one of {', '.join(map(str, PERCENTILES))}", source="--percentile")
    if budget < 1 or top < 1:
        raise TpusimError("must be a positive number", source="--budget" if budget < 1 else "--top")
    base = serve_workload_from_dict(raw, source=source, requests=requests)
    _, topo = workload_and_topology(base.workload, topology)
    spec = topology or base.workload.topology
    chips = topo.num_chips
    model = base.workload.model
    mean_in, mean_out = _mean_lengths(base)
    ctx = mean_in + mean_out / 2  # the mean context a decode step attends over
    # the plan's own raw mapping: co-located, no fixed slot count (each plan sets batching.max_batch)
    plan_raw = {**raw, "serving": {k: v for k, v in (raw.get("serving") or {}).items() if k != "disaggregation"}}
    if isinstance(plan_raw["serving"].get("batching"), dict):
        plan_raw["serving"]["batching"] = {k: v for k, v in plan_raw["serving"]["batching"].items() if k != "max_batch"}
    n_requests = base.requests

    counts = dict.fromkeys(("enumerated", "invalid", "out_of_hbm", "roofline", "bounded", "budget", "simulated",
                            "missed_limit"), 0)
    rejected: list[dict] = []   # why meshes could not serve at all (a sample for the report)
    floors: list[tuple[float, str]] = []  # the fastest decode step each fitting mesh allows (batch 1)
    cands: list[dict] = []
    fits_by_format: dict[str, int] = {}  # the fewest chips a replica in each format needs (the book's minimum slice)
    # Replica meshes: tensor x expert for MoE models; tensor, or fsdp x tensor (2D weight-stationary,
    # inference.md Q7: weights split over D on fsdp and F on tensor) for dense ones.
    moe = model.num_experts > 1
    splits = [(e, t, 1) for e in divisors(model.num_experts) if chips % e == 0 for t in divisors(chips // e)] if moe \
        else [(1, t, f) for t in divisors(chips) for f in divisors(chips // t)]
    for q in quantizations:
        for e, t, f in splits:
            counts["enumerated"] += 1
            rc = t * e * f
            mesh = {"ici_tensor_parallelism": t, "ici_data_parallelism": chips // rc}
            if moe:
                mesh["ici_expert_parallelism"] = e
            if f > 1:
                mesh["ici_fsdp_parallelism"] = f
            # slots as batching.max_batch (a fractional per_device_batch_size would have to split over the
            # data x expert shards as a training batch does); one slot to see what fits
            over = {**mesh, "quantization": q, "quantize_kvcache": q != "bf16", "per_device_batch_size": 1.0,
                    "max_batch": 1, "kv_quant_dtype": "int4" if q.startswith("int4") else "int8"}
            label = ((f"fsdp {f} x " if f > 1 else "") + f"tensor {t}" + (f" x expert {e}" if e > 1 else "")
                     + f", {chips // rc} replicas, {q}")
            try:
                sw = serve_workload_from_dict(plan_raw, source=source, overrides=over)
                sm = StepModel(sw, topo, mode)
                fits = sm.max_batch_that_fits()
            except InfeasibleError as ex:
                counts["out_of_hbm"] += 1
                rejected.append({"plan": label, "reason": ex.reason})
                continue
            except TpusimError as ex:
                counts["invalid"] += 1
                rejected.append({"plan": label, "reason": ex.reason})
                continue
            if fits < 1:
                counts["out_of_hbm"] += 1
                rejected.append({"plan": label, "reason": "the weights leave no room for one KV cache"})
                continue
            chip = topo.chip
            peak = chip.int8_flops_per_s if sw.int8_math else chip.bf16_flops_per_s
            w_bytes = sm.weight_bytes_per_device()
            w_elems = w_bytes / sw.weight_bytes

            def decode_floor(b: int) -> float:
                return max((w_bytes + b * ctx * sm.kv_per_token) / chip.hbm_bytes_per_s,
                           2.0 * w_elems * b / peak)

            prefill_floor = w_bytes / chip.hbm_bytes_per_s  # any first token: every weight read once
            floors.append((decode_floor(1), label))
            fits_by_format[q] = min(fits_by_format.get(q, rc), rc)
            batches = sorted({*(1 << i for i in range(fits.bit_length()) if 1 << i <= fits), fits})
            family: list[dict] = []
            for b in batches:
                step = decode_floor(b)
                plan = {"mesh": label, "tensor": t, "expert": e, "fsdp": f, "replicas": chips // rc, "chips_per_replica": rc,
                        "quantization": q, "slots_per_replica": b, "overrides": {**over,
                        "max_batch": b, "concurrency": b * (chips // rc)},
                        "roofline_step_s": step, "bound_tokens_per_s_per_chip": b / (step * rc)}
                if tpot_s is not None and step > tpot_s:
                    counts["roofline"] += 1
                elif ttft_s is not None and prefill_floor > ttft_s:
                    counts["roofline"] += 1
                else:
                    family.append(plan)
            if family:
                cands.append({"plans": family, "lo": -1, "hi": len(family)})
    if not cands:
        raise TpusimError(_impossible(floors, rejected, tpot_s, ttft_s, spec, chips, f"p{percentile}"),
                          source=_limit_source(tpot_s))
    # Per mesh and format, more slots mean a slower decode step (TPOT) and a longer prefill queue (TTFT),
    # and more tokens per step: the plan to find is the most slots that meet the limits. Each family is
    # bisected (lo: most slots known to meet, hi: fewest known to miss); families whose best remaining
    # bound is below the best plan found are dropped.
    def remaining_bound(f: dict) -> float:
        return f["plans"][f["hi"] - 1]["bound_tokens_per_s_per_chip"]

    pkey = f"p{percentile}"
    done: list[dict] = []
    best = 0.0
    while cands and counts["simulated"] < budget:
        cands.sort(key=lambda f: -remaining_bound(f))
        n = min(budget - counts["simulated"], max(2, 2 * (workers or 1)), len(cands))
        probes = [(f, f["plans"][(f["lo"] + f["hi"] + 1) // 2]) for f in cands[:n]]
        tasks = []
        for i, (_, p) in enumerate(probes):
            inputs = {**p["overrides"], "requests": min(MAX_REQUESTS, max(n_requests, 4 * p["overrides"]["concurrency"]))}
            tasks.append(Task(index=i, key=config_key(inputs), raw=plan_raw, source=source, topology=spec,
                              slices=None, mode=mode, inputs=inputs))
        rows = {r["config"]: r for r in iter_rows(tasks, workers=workers, ray=ray)}
        for (f, p), task in zip(probes, tasks):
            counts["simulated"] += 1
            row = rows[task.key]
            i = f["plans"].index(p)
            if progress is not None:
                progress(counts["simulated"], budget)
            if row["status"] != "ok":
                p.update(status=row["status"], reason=row["reason"])
                f["hi"] = i
                done.append(p)
                continue
            p.update(status="ok", row=row, tokens_per_s_per_chip=row["throughput.output_tokens_per_s_per_chip"],
                     tpot_s=row[f"tpot_s.{pkey}"], ttft_s=row[f"ttft_s.{pkey}"])
            meets = ((tpot_s is None or (p["tpot_s"] is not None and p["tpot_s"] <= tpot_s))
                     and (ttft_s is None or (p["ttft_s"] is not None and p["ttft_s"] <= ttft_s)))
            p["meets"] = meets
            if meets:
                f["lo"] = i
                best = max(best, p["tokens_per_s_per_chip"])
            else:
                counts["missed_limit"] += 1
                f["hi"] = i
            done.append(p)
        keep = [f for f in cands if f["hi"] - f["lo"] > 1]
        bounded = [f for f in keep if remaining_bound(f) < best]
        counts["bounded"] += sum(f["hi"] - f["lo"] - 1 for f in bounded)
        cands = [f for f in keep if remaining_bound(f) >= best]
    counts["budget"] = sum(f["hi"] - f["lo"] - 1 for f in cands)
    winners = sorted((p for p in done if p.get("meets")), key=lambda p: -p["tokens_per_s_per_chip"])
    if not winners:
        closest = min((p for p in done if p.get("status") == "ok"), default=None,
                      key=lambda p: max((p["tpot_s"] or math.inf) / (tpot_s or math.inf),
                                        (p["ttft_s"] or math.inf) / (ttft_s or math.inf)))
        near = (f"; the closest simulated: {closest['mesh']}, {closest['slots_per_replica']} slots: TPOT {pkey} "
                f"{_ms(closest['tpot_s'])}, TTFT {pkey} {_ms(closest['ttft_s'])}") if closest else ""
        raise TpusimError(f"no plan on {spec} meets {_limits(tpot_s, ttft_s, pkey)}: {counts['simulated']} simulated "
                          f"(the roofline allowed them){near}; loosen the limit or use a larger slice",
                          source=_limit_source(tpot_s))
    out_top = [_explain(p, winners[0], i, pkey) for i, p in enumerate(winners[:top])]
    return {"workload": base.name, "topology": spec, "chips": chips, "mode": mode, "model": model.name,
            "limits": {"tpot_s": tpot_s, "ttft_s": ttft_s, "percentile": percentile},
            "load": "closed loop, one client per decode slot (every slot busy)",
            "mean_input_tokens": mean_in, "mean_output_tokens": mean_out,
            "counts": counts, "top": out_top, "smallest_replica_chips": fits_by_format,
            "simulated": [{"plan": f"{p['mesh']}, {p['slots_per_replica']} slots", "status": p["status"],
                           "bound_tokens_per_s_per_chip": p["bound_tokens_per_s_per_chip"],
                           "roofline_step_s": p["roofline_step_s"], "tokens_per_s_per_chip": p.get("tokens_per_s_per_chip"),
                           "tpot_s": p.get("tpot_s"), "ttft_s": p.get("ttft_s"), "meets": p.get("meets", False)}
                          for p in done], "rejected": rejected[:8],
            "missed": [{"plan": f"{p['mesh']}, {p['slots_per_replica']} slots", "tpot_s": p.get("tpot_s"),
                        "ttft_s": p.get("ttft_s"), "reason": p.get("reason", "")}
                       for p in done if not p.get("meets")][:8],
            "wall_s": time.perf_counter() - t0}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f} ms"


def _limits(tpot_s, ttft_s, pkey) -> str:
    return " and ".join(s for s in ((f"TPOT {pkey} <= {_ms(tpot_s)}" if tpot_s else ""),
                                    (f"TTFT {pkey} <= {_ms(ttft_s)}" if ttft_s else "")) if s)


def _limit_source(tpot_s) -> str:
    return "--tpot-ms" if tpot_s is not None else "--ttft-ms"


def _impossible(floors, rejected, tpot_s, ttft_s, spec, chips, pkey) -> str:
    if not floors:
        why = rejected[0]["reason"] if rejected else "no mesh"
        return f"no plan fits on {spec} ({chips} chips): e.g. {rejected[0]['plan'] if rejected else ''}: {why}"
    fastest, label = min(floors)
    what = (f"the fastest decode step on {spec} is {_ms(fastest)} ({label}, one sequence: its weights "
            f"read from HBM once, the roofline)") if tpot_s is not None and fastest > tpot_s else \
        "every mesh's weights take longer to read from HBM than that (a prefill reads them all; roofline)"
    return f"no plan can meet {_limits(tpot_s, ttft_s, pkey)}: {what}; loosen the limit or use more chips"


def _explain(p: dict, best: dict, rank: int, pkey: str) -> dict:
    row = p["row"]
    dt = {k: row.get(f"device_time_s.{k}", 0.0) for k in ("weights", "kv", "compute", "collectives")}
    busy = sum(dt.values()) or 1.0
    share = ", ".join(f"{k} {v / busy:.0%}" for k, v in sorted(dt.items(), key=lambda kv: -kv[1]) if v / busy >= 0.1)
    why = (f"{row['bottleneck']} ({share}); {p['replicas']} replicas of {p['chips_per_replica']} chips, "
           f"{p['slots_per_replica']} slots each, {row['batch_occupancy']:.0%} of them decoding")
    if rank:
        loss = 1 - p["tokens_per_s_per_chip"] / best["tokens_per_s_per_chip"]
        diffs = [d for d in (
            f"{p['quantization']} weights instead of {best['quantization']}" if p["quantization"] != best["quantization"]
            else "", f"{p['chips_per_replica']} chips per replica instead of {best['chips_per_replica']}"
            if p["chips_per_replica"] != best["chips_per_replica"] else "",
            f"{p['slots_per_replica']} slots instead of {best['slots_per_replica']}"
            if p["slots_per_replica"] != best["slots_per_replica"] else "") if d]
        why += f"; {loss:.0%} below #1: {', '.join(diffs) or 'same plan shape'}"
    return {"mesh": p["mesh"], "tensor": p["tensor"], "expert": p["expert"], "fsdp": p["fsdp"], "replicas": p["replicas"],
            "chips_per_replica": p["chips_per_replica"], "quantization": p["quantization"],
            "slots_per_replica": p["slots_per_replica"], "tokens_per_s_per_chip": p["tokens_per_s_per_chip"],
            f"tpot_{pkey}_s": p["tpot_s"], f"ttft_{pkey}_s": p["ttft_s"],
            "roofline_step_s": p["roofline_step_s"], "bound_tokens_per_s_per_chip": p["bound_tokens_per_s_per_chip"],
            "bottleneck": row["bottleneck"], "why": why}


__all__ = ["search_serving", "QUANTIZATIONS", "PERCENTILES"]
