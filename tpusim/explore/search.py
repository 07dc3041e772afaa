"""Search: the best sharding of a workload on a slice, the book's way ("How To Scale Your Model",
training.md and applied-training.md): enumerate, prune with rooflines, simulate the survivors.

1. Enumerate meshes: sizes of data, fsdp, tensor, sequence (and expert for MoE) on ICI whose product
   is the slice's chips, with tensor dividing the heads and the MLP width, sequence the sequence
   length; across slices, DCN data or DCN fsdp. Times remat policies and per-device batches.
2. Drop what cannot run: meshes the torus cannot place or the model cannot split (the compiler's
   own checks), plans that do not fit in HBM (its memory model, no ops built), duplicates. A plan
   whose activations do not fit is tried with gradient accumulation (MaxText's
   ``gradient_accumulation_steps``): the fewest microbatches of ``ACCUMULATION`` that fit, each
   holding 1/k of the activations beside an f32 accumulator (and, under FSDP, gathering the weights k
   times); it is dropped only if none fits. The ``sequence`` axis is MaxText's context parallelism
   (``ici_context_parallelism``, K and V all-gathered).
3. Prune with the book's rooflines (:func:`roofline`): each plan's step has a lower bound (peak
   rates, communication overlapping perfectly) and an estimate (calibrated rates, FSDP and DP
   overlapping compute, tensor / sequence / expert collectives on the critical path). A plan whose
   lower bound per token is more than ``PRUNE_MARGIN`` times the best estimate cannot win.
4. Simulate the survivors (best estimates first, at most ``budget``), pure FSDP (the baseline) and
   the best pipelined and unpipelined plans by estimate (so the report can say when pipelining wins
   or loses), in worker processes or on Ray, and rank by MFU or step time.

Pipeline parallelism (MaxText's GPipe, one chunk per stage, 4p, 2p or p microbatches): stages across
slices (DCN pipeline), or on ICI along one whole torus axis. Across slices with few, slow DCN links it
wins when data parallelism's gradient all-reduce (or FSDP's gathers) over DCN costs more than the
bubble, since the stages send only a microbatch's activations; on one slice's fast ICI the bubble
(p - 1) / m usually costs more than the communication it saves.

The book's limits the report quotes (alpha = C / W_ici, the chip's FLOP/s over one axis's
bidirectional ICI bandwidth): FSDP over n torus axes is communication-bound below alpha / n tokens
per chip (with tensor parallelism Y, the gathered weights are 1/Y as large: alpha / (n Y)); tensor
parallelism on n axes is communication-bound when Y alpha / (n F) > 1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from tpusim.config import read_yaml
from tpusim.errors import InfeasibleError, TpusimError
from tpusim.explore.pipelining import pipeline_verdict, pipelined_plan
from tpusim.explore.roofline import Roofline, roofline
from tpusim.explore.sweep import Task, config_key, iter_rows

REMAT_POLICIES = ("full", "minimal", "none")
BATCH_FACTORS = (0.5, 1, 2)  # per-device batches tried: these times the workload's
PRUNE_MARGIN = 1.2  # lower bound / best estimate above which a plan cannot win (covers unmodelled ops)
AXES = ("data", "fsdp", "tensor", "sequence", "expert", "pipeline")
ACCUMULATION = (2, 4, 8)  # microbatches tried, fewest first, for a plan whose activations do not fit


def divisors(n: int) -> list[int]:
    """Every divisor of ``n``, ascending (the sizes a mesh axis of ``n`` chips can take)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes(chips: int, model, seq_len: int, *, pipeline: int = 1) -> list[dict[str, int]]:
    """ICI sizes of data, fsdp, tensor, sequence, expert multiplying to ``chips`` that the model can split
    (each stage's, with ``pipeline`` stages beside them)."""
    out = []
    for tp in divisors(chips):
        if model.num_heads % tp or model.d_ff % tp or (model.num_kv_heads % tp and tp % model.num_kv_heads):
            continue
        for sp in (s for s in divisors(chips // tp) if seq_len % s == 0):
            experts = divisors(chips // tp // sp) if model.num_experts > 1 else [1]
            for ep in (e for e in experts if model.num_experts % e == 0 or e == 1):
                rest = chips // (tp * sp * ep)
                for fsdp in divisors(rest):
                    out.append({"data": rest // fsdp, "fsdp": fsdp, "tensor": tp, "sequence": sp, "expert": ep,
                                **({"pipeline": pipeline} if pipeline > 1 else {})})
    return out


def _unsharded(raw: dict) -> dict:
    """The workload's mapping without its mesh: the search sets every mesh size itself."""
    def keep(k: str) -> bool:
        return not (k.startswith(("ici_", "dcn_")) or k == "physical_axes")
    return {k: v for k, v in raw.items() if k != "sharding" and keep(str(k))}


def mesh_name(ov: dict) -> str:
    """``fsdp 32 x tensor 4`` (+ ``dcn data 2``, ``accumulate 4``) from a plan's overrides."""
    parts = [f"{a} {ov[f'ici_{a}_parallelism']}" for a in AXES if ov.get(f"ici_{a}_parallelism", 1) > 1]
    parts += [f"dcn {a} {ov[f'dcn_{a}_parallelism']}" for a in ("data", "fsdp", "pipeline")
              if ov.get(f"dcn_{a}_parallelism", 1) > 1]
    if ov.get("num_pipeline_microbatches", -1) > 0:
        parts[-1] += f" (m {ov['num_pipeline_microbatches']})"
    if ov.get("gradient_accumulation_steps", 1) > 1:
        parts.append(f"accumulate {ov['gradient_accumulation_steps']}")
    return " x ".join(parts) or "one chip"


def plans(workload: str | Path, topology: str | None = None, *, slices: int | None = None, mode: str = "calibrated",
          remat: tuple[str, ...] = REMAT_POLICIES, keep_global_batch: bool = False) -> dict:
    """Enumerate and prune (steps 1-3 of the module docstring): the plans to simulate and what was dropped."""
    from tpusim.api import workload_and_topology
    from tpusim.sim.calibration import get_calibration
    from tpusim.compiler import local_parameter_counts
    from tpusim.compiler.memory import peak_memory
    from tpusim.compiler.shapes import derive_shapes
    from tpusim.model.mesh import resolve_mesh
    from tpusim.model.workload import workload_from_dict

    source = str(workload)
    raw = read_yaml(workload)
    if not isinstance(raw, dict):
        raise TpusimError("a workload is a mapping of keys to values", source=source)
    base = _unsharded(raw)
    w0, topo = workload_and_topology(workload_from_dict(base, source=source), topology, slices=slices)
    cal = get_calibration(topo.chip.name, mode)
    b0 = w0.step.per_device_batch_size
    batches = (b0,) if keep_global_batch else tuple(dict.fromkeys(b0 * f for f in BATCH_FACTORS))
    S = topo.slices
    dcn = [{"data": S, "fsdp": 1, "pipeline": 1}]
    if S > 1:  # across slices: FSDP, or pipeline stages (a slice each)
        dcn += [{"data": 1, "fsdp": S, "pipeline": 1}, {"data": 1, "fsdp": 1, "pipeline": S}]
    # Pipeline stages on ICI: along one whole torus axis (a collective-permute shifts along one axis).
    stages = [1] + sorted({n for n in (topo.axis_size(a) for a in topo.axis_names) if n > 1
                           and w0.model.num_layers % n == 0})
    counts = {"enumerated": 0, "invalid": 0, "out_of_hbm": 0, "duplicate": 0, "roofline": 0, "budget": 0}
    found: dict[str, dict] = {}
    grid = ((ici, d, policy, batch) for p_ici in stages for d in dcn if p_ici == 1 or d["pipeline"] == 1
            for ici in meshes(topo.chips_per_slice // p_ici, w0.model, w0.step.seq_len, pipeline=p_ici)
            for policy in remat for batch in batches)
    for ici, d, policy, batch in grid:
        counts["enumerated"] += 1
        ov = {**{f"ici_{a}_parallelism": n for a, n in ici.items()},
              **{f"dcn_{a}_parallelism": n for a, n in d.items()},
              "remat_policy": policy, "per_device_batch_size": batch}
        p = ici.get("pipeline", 1) * d["pipeline"]
        key = config_key(ov)
        if key in found:
            counts["duplicate"] += 1
            continue
        try:
            w = workload_from_dict(base, source=source, overrides=ov)
            mesh = resolve_mesh(w.parallelism, topo, source=source)
            sh = derive_shapes(w, mesh, topo.num_chips)
            if p > 1:  # MaxText's GPipe, one chunk per stage, as many microbatches as the batch splits into
                mem, m, ov = pipelined_plan(base, source, ov, mesh, sh, topo, p)
            else:
                local, layer, table = local_parameter_counts(w, sh)
                mem = peak_memory(w, sh, local_params=local, gathered_layer_params=layer,
                                  gathered_table_params=table, fsdp=sh.weight_shards > 1,
                                  capacity_bytes=topo.chip.hbm_bytes)
                m = 1
        except TpusimError:
            counts["invalid"] += 1
            continue
        if mem.total > topo.chip.hbm_bytes:  # fewer activations at once: gradient accumulation
            w, mem = _accumulate(w, mesh, topo, local, sh.seqs, source)
            if w is None:
                counts["out_of_hbm"] += 1
                continue
            ov["gradient_accumulation_steps"] = w.step.gradient_accumulation_steps
            key = config_key(ov)
        r = roofline(w, topo, mesh, sh, mxu_eff=cal.compute.mxu_efficiency,
                     link_eff=cal.collectives.ici_link_efficiency, dcn_eff=cal.collectives.dcn_efficiency,
                     microbatches=m)
        pure = ici["fsdp"] == topo.chips_per_slice and p == 1
        found[key] = {"overrides": ov, "roofline": r, "pure_fsdp": pure, "stages": p,
                      "hbm_fraction": mem.total / topo.chip.hbm_bytes}
    return {"workload": w0, "topology": topo, "raw": base, "source": source, "mode": mode, "plans": found,
            "counts": counts}


def _accumulate(w, mesh, topo, local: float, seqs: float, source: str):
    """(workload, memory) with the fewest microbatches of ACCUMULATION that fit in HBM, or (None, None):
    one microbatch's activations (per_device_batch_size / k) beside an f32 accumulator, as the compiler
    counts them (:func:`tpusim.compiler.compile_program`)."""
    from dataclasses import replace

    from tpusim.compiler import ACCUMULATOR_BYTES
    from tpusim.compiler.memory import peak_memory
    from tpusim.compiler.shapes import derive_shapes

    cap = topo.chip.hbm_bytes
    for k in ACCUMULATION:
        if seqs % k:
            continue
        step = replace(w.step, gradient_accumulation_steps=k)
        micro_w = replace(w, step=replace(step, per_device_batch_size=w.step.per_device_batch_size / k))
        try:
            micro = derive_shapes(micro_w, mesh, topo.num_chips)
        except TpusimError:
            continue
        acc = ACCUMULATOR_BYTES * local
        mem = peak_memory(micro_w, micro, local_params=local, gathered_layer_params=0, gathered_table_params=0,
                          fsdp=micro.weight_shards > 1, capacity_bytes=cap - acc)
        mem = replace(mem, grads=mem.grads + acc)
        if mem.total <= cap:
            return replace(w, step=step), mem
    return None, None


def search(workload: str | Path, topology: str | None = None, *, slices: int | None = None, mode: str = "calibrated",
           objective: str = "mfu", top: int = 5, remat: tuple[str, ...] = REMAT_POLICIES,
           keep_global_batch: bool = False, budget: int = 256, workers: int | None = None, ray: str | None = None,
           progress: Callable[[int, int], None] | None = None) -> dict:
    """The best ``top`` plans for ``objective`` (``mfu``, or ``step_time``, which keeps the global batch),
    why they win, and where pure FSDP runs out. See the module docstring for the method."""
    if objective not in ("mfu", "step_time"):
        raise TpusimError(f"objective is mfu or step_time, not {objective!r}", source="--objective")
    if top < 1 or budget < 1:
        raise TpusimError("--top and --budget are positive numbers", source="tpusim search")
    t0 = time.perf_counter()
    found = plans(workload, topology, slices=slices, mode=mode, remat=remat,
                  keep_global_batch=keep_global_batch or objective == "step_time")
    topo, counts, candidates = found["topology"], found["counts"], found["plans"]
    if not candidates:
        raise InfeasibleError(f"no plan fits on {topo.name}: {counts['out_of_hbm']} do not fit in HBM, "
                              f"{counts['invalid']} cannot be placed or split", source=found["source"])

    def per_token(p: dict, bound: str) -> float:
        return getattr(p["roofline"], bound) / p["roofline"].tokens_per_chip

    best_estimate = min(per_token(p, "estimate_s") for p in candidates.values())
    keep = sorted((k for k, p in candidates.items() if per_token(p, "lower_s") <= PRUNE_MARGIN * best_estimate
                   or p["pure_fsdp"]), key=lambda k: (per_token(candidates[k], "estimate_s"), k))
    counts["roofline"] = len(candidates) - len(keep)
    chosen = [k for k in keep if candidates[k]["pure_fsdp"]]
    chosen += [k for k in keep if not candidates[k]["pure_fsdp"]][:budget]
    # The best pipelined and the best unpipelined plans by estimate are simulated even when pruned:
    # the report says when pipelining wins and when it loses.
    for staged in (True, False):
        best = min((k for k in candidates if (candidates[k]["stages"] > 1) == staged),
                   key=lambda k: (per_token(candidates[k], "estimate_s"), k), default=None)
        if best is not None and best not in chosen:
            chosen.append(best)
    baselines = sum(1 for k in chosen if k not in keep)  # pruned, but simulated after all
    counts["roofline"] -= baselines
    counts["budget"] = len(keep) - (len(chosen) - baselines)
    spec = f"{topo.chip.name}:{'x'.join(map(str, topo.shape))}"
    tasks = [Task(index=i, key=k, raw=found["raw"], source=found["source"], topology=spec, slices=topo.slices,
                  mode=mode, inputs=candidates[k]["overrides"]) for i, k in enumerate(chosen)]
    rows = []
    for n, row in enumerate(iter_rows(tasks, workers=workers, ray=ray), start=1):
        rows.append(row)
        if progress is not None:
            progress(n, len(tasks))
    counts["simulated"] = len(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    score = (lambda r: (-r["mfu"], r["index"])) if objective == "mfu" else (lambda r: (r["step_time_s"], r["index"]))
    ok.sort(key=score)
    pure = [r for r in ok if candidates[r["config"]]["pure_fsdp"]]
    baseline = _plan_report(pure[0], candidates[pure[0]["config"]], None) if pure else None
    return {"workload": found["workload"].name, "topology": topo.name, "chips": topo.num_chips, "mode": mode,
            "objective": objective, "counts": counts, "wall_s": time.perf_counter() - t0,
            "top": [_plan_report(r, candidates[r["config"]], pure[0] if pure else None) for r in ok[:top]],
            "pure_fsdp": _pure_fsdp_report(baseline, candidates, topo, found["workload"].step.seq_len),
            "pipeline": pipeline_verdict(ok, candidates, mesh_name),
            "failed": [{"mesh": mesh_name(json.loads(r["config"])), "status": r["status"], "reason": r["reason"]}
                       for r in rows if r["status"] != "ok"]}


def _plan_report(row: dict, plan: dict, baseline: dict | None) -> dict:
    """One simulated plan: its numbers and a sentence saying why it wins (or, for pure FSDP, why not)."""
    r: Roofline = plan["roofline"]
    ov = plan["overrides"]
    step = row["step_time_s"]
    exposed = json.loads(row["exposed_comm_by_kind_s"])
    frac = row["exposed_comm_s"] / step if step else 0.0
    kinds = ", ".join(f"{k} {v / step:.0%}" for k, v in list(exposed.items())[:2] if v > 0.005 * step)
    why = [row["bottleneck"], f"exposed communication {frac:.0%} of the step" + (f" ({kinds})" if kinds else ""),
           f"HBM {plan['hbm_fraction']:.0%}"]
    if r.fsdp_axes:
        side = "above" if r.tokens_per_chip >= r.fsdp_limit_tokens else "below"
        why.append(f"{r.tokens_per_chip:.0f} tokens per chip, {side} FSDP's limit alpha/(n x tensor) = "
                   f"{r.fsdp_limit_tokens:.0f} over {r.fsdp_axes} axes")
    if r.tensor_ratio:
        verdict = "hidden by the MLP matmuls" if r.tensor_ratio < 1 else "more than the MLP matmuls hide"
        why.append(f"tensor {ov['ici_tensor_parallelism']} on {r.tensor_axes} axis{'es' * (r.tensor_axes > 1)}: "
                   f"Y alpha/(n F) = {r.tensor_ratio:.2f}, {verdict}")
    k = ov.get("gradient_accumulation_steps", 1)
    if k > 1:
        why.append(f"gradient accumulation {k}: microbatches of {ov['per_device_batch_size'] / k:g} sequences per "
                   f"device fit HBM with remat {ov['remat_policy']} (weights gathered {k} times)")
    if plan["stages"] > 1 and row.get("pipeline"):
        pp = json.loads(row["pipeline"]) if isinstance(row["pipeline"], str) else row["pipeline"]
        why.append(f"pipeline {pp['stages']} stages over {pp['over'].upper()} x {pp['microbatches']} microbatches: "
                   f"bubble {pp['bubble']:.0%} of busy time simulated, (p-1)/m = {pp['bubble_formula']:.0%}")
    if baseline is not None and baseline is not row and baseline["mfu"]:
        why.append(f"{row['mfu'] / baseline['mfu']:.2f}x pure FSDP's MFU")
    return {"mesh": mesh_name(ov), "overrides": ov, "remat_policy": ov["remat_policy"],
            "per_device_batch_size": ov["per_device_batch_size"], "step_time_s": step, "mfu": row["mfu"],
            "tokens_per_s": row["tokens_per_s"], "exposed_comm_s": row["exposed_comm_s"], "exposed_fraction": frac,
            "exposed_comm_by_kind_s": exposed, "bottleneck": row["bottleneck"], "hbm_fraction": plan["hbm_fraction"],
            "tokens_per_chip": r.tokens_per_chip, "fsdp_limit_tokens": r.fsdp_limit_tokens,
            "tensor_ratio": r.tensor_ratio, "why": "; ".join(why)}


def _pure_fsdp_report(best: dict | None, candidates: dict, topo, seq_len: int) -> dict:
    """Where pure FSDP runs out: the book's limit on tokens per chip, and what the simulation shows."""
    alpha = topo.chip.bf16_flops_per_s / topo.chip.ici_axis_bytes_per_s
    n = max(sum(1 for a in topo.axis_names if topo.axis_size(a) > 1), 1)  # pure FSDP spans every torus axis
    limit = alpha / n
    if best is None:
        fits = any(p["pure_fsdp"] for p in candidates.values())
        return {"fits": fits, "limit_tokens_per_chip": limit,
                "verdict": "pure FSDP runs out of HBM" if not fits else "pure FSDP failed to simulate"}
    book_comm = best["tokens_per_chip"] < limit
    verdict = (f"{best['tokens_per_chip']:.0f} tokens per chip ({best['mesh']}, remat {best['remat_policy']}), "
               f"{'below' if book_comm else 'above'} the book's alpha/n = {alpha:.0f}/{n} = {limit:.0f}: "
               f"{'communication' if book_comm else 'compute'}-bound by the book; simulated: {best['bottleneck']}, "
               f"{best['exposed_fraction']:.0%} of the step exposed communication, MFU {best['mfu']:.1%}")
    if book_comm:
        verdict += (f"; it would need {limit:.0f} tokens per chip (per_device_batch_size "
                    f"{limit / seq_len:.2g} at {seq_len} tokens per sequence)")
    return {**best, "fits": True, "comm_bound": best["bottleneck"].startswith("communication"),
            "book_comm_bound": book_comm, "limit_tokens_per_chip": limit, "verdict": verdict}
