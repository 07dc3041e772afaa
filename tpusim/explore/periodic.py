"""A training step's summary from three short steps: the layers repeat, so the step is affine in them.

A sweep or a search needs the summary of each configuration, not its timeline. The layers of a step
are the same ops over and over, and once a layer loop has settled (each layer's gathers prefetched
one ahead, its gradient reductions one behind, the links' queues in a repeating state) every
extensive figure of the step (its time, the compute and the waiting by kind, each link's bytes and
busy time, the FLOPs, ops and events) grows by the same amount per layer. So the step of L layers is
simulated cut to a, a+p and a+2p layers (p the period of the model's layer pattern: MoE every k-th
layer, local / global attention; the embedding, loss, cast and optimizer as in the whole step) and
extrapolated: f(L) = f(a+2p) + (f(a+2p) - f(a+p)) (L - a - 2p) / p. Two checks guard it, and the
step is simulated whole when either fails:

* **settled** (:func:`settled`): in the shortest and the longest cut, each loop ends in its periodic
  state: what is in flight at the start of its last layer (every asynchronous op and its transfers on
  the links) is what was in flight p layers earlier, shifted. A loop that is still settling (a link's
  queue draining for many layers after a dense first layer; a large reduction of the embedding's
  gradient overlapping the whole backward loop of a short cut) has totals that are only piecewise
  affine in the layers: three short cuts can sit on one piece while the whole step is on another
  (sampling found both, tests/test_periodic.py).
* **collinear** (:func:`extrapolate`): every figure's second difference over the three cuts is
  rounding (1e-9 of the step for times, of the figure otherwise; counts exactly).

Where nothing repeats (a pipelined step, whose stages split the layers; fewer than a + 4p layers) the
step is simulated whole too. The whole step's memory check, model FLOPs and notes come from the
compiler (:func:`tpusim.compiler.compile_program` with ``layers`` cuts only the layers' ops); MFU,
utilisation and bottleneck are derived from the extrapolated totals by the same
:func:`tpusim.analysis.summary.summary_of` as ``tpusim run``'s. The result equals
``summarize(simulate(...))`` of the whole step to float rounding (tests/test_periodic.py: every
shipped workload, the speed benchmark's grid, model families, 40 random configurations; 1e-9
relative, found within 6e-14), at a fraction of the cost for 80 layers (docs/SPEED.md).
"""

from __future__ import annotations

from tpusim.analysis.summary import step_totals, summarize, summary_of
from tpusim.compiler import compile_program
from tpusim.compiler.pipeline import pipeline_stages
from tpusim.model.mesh import resolve_mesh
from tpusim.model.spec import Workload
from tpusim.sim.engine import simulate
from tpusim.sim.topology import Topology

WARMUP_LAYERS = 3  # layers of the shortest cut (at least p + 1, so its last layer has one p before it)
RTOL = 1e-9        # a second difference this small (relative) is rounding; float sums leave ~1e-15


def layer_period(w: Workload) -> int | None:
    """The period of the model's layer pattern after its first dense layers (1 for a uniform stack),
    or None if it has none short enough to pay off."""
    m = w.model
    sig = [(m.is_moe(i), m.is_local(i)) for i in range(m.first_dense_layers, m.num_layers)]
    for p in range(1, 9):
        if all(sig[i] == sig[i + p] for i in range(len(sig) - p)):
            return p
    return None


def short_layer_counts(w: Workload) -> tuple[int, int, int] | None:
    """The three layer counts (a, a+p, a+2p) to simulate, with L - a a multiple of p, or None when
    extrapolating would not save work (fewer than a + 4p layers)."""
    p = layer_period(w)
    if p is None:
        return None
    L = w.model.num_layers
    a = w.model.first_dense_layers + max(WARMUP_LAYERS, p + 1)  # the first cut ends settled: p back is a loop layer
    a += (L - a) % p
    if L < a + 4 * p:
        return None
    return a, a + p, a + 2 * p


def summarize_step(w: Workload, topo: Topology, *, mode: str = "calibrated") -> dict:
    """``summarize(simulate(compile_program(w, topo), topo, mode=mode))`` to float rounding, by
    extrapolating three short steps when the step's layers repeat (the module's docstring)."""
    mesh = resolve_mesh(w.parallelism, topo, source=w.source)
    counts = None if pipeline_stages(mesh) > 1 else short_layer_counts(w)
    if counts is not None:
        head = compile_program(w, topo, mesh=mesh, layers=counts[2])  # the whole step's memory check first
        results = [simulate(compile_program(w, topo, mesh=mesh, layers=k), topo, mode=mode) for k in counts[:2]]
        results.append(simulate(head, topo, mode=mode))
        totals = None
        p = counts[1] - counts[0]
        if settled(results[0], p) and settled(results[-1], p):
            totals = extrapolate([step_totals(r) for r in results], counts, w.model.num_layers)
        if totals is not None:
            totals["sim_wall_s"] = sum(r.sim_wall_s for r in results)
            return summary_of(head, topo, mode, totals, classes=results[-1].classes)
    return summarize(simulate(compile_program(w, topo, mesh=mesh), topo, mode=mode))


def settled(result, period: int, *, rtol: float = RTOL) -> bool:
    """Whether each layer loop of a simulated step ends in its periodic state: at the start of the
    loop's last layer, what is in flight (every asynchronous op, and each of its transfers on a link)
    is what was in flight ``period`` layers earlier, the same ops of the same layers relative to it,
    started and ending at the same offsets (to ``rtol`` of the step). A loop still settling (a link's
    queue draining or growing after the first layers, a large reduction of the embedding's gradient
    still overlapping it) ends differently with every layer added, not by a constant: its totals are
    only piecewise affine in the layers, and three short steps can sit on one piece."""
    rec, prog = result.record, result.program
    starts: dict[tuple[str, int], float] = {}
    for cls, stream, index, start in zip(rec.device_class, rec.stream, rec.op_index, rec.start_s):
        if stream == "XLA Ops" and cls == 0:
            op = prog.ops[index]
            if op.layer >= 0 and start < starts.get((op.phase, op.layer), float("inf")):
                starts[(op.phase, op.layer)] = start
    layers = max((layer for _, layer in starts), default=-1) + 1
    tol = rtol * result.step_time_s

    def in_flight(phase: str, layer: int) -> list | None:
        t = starts.get((phase, layer))
        if t is None:
            return None
        out = []
        for stream, index, start, end in zip(rec.stream, rec.op_index, rec.start_s, rec.end_s):
            if stream != "XLA Ops" and start < t < end:
                op = prog.ops[index]
                if op.layer < 0:
                    return None  # an op of the whole step, not of the loop
                out.append((stream, op.phase, op.layer - layer, op.name.replace(f"layer_{op.layer}/", ""),
                            start - t, end - t))
        return sorted(out, key=lambda r: r[:4])

    for phase, last, back in (("forward", layers - 1, -period), ("backward", 0, period)):
        now, before = in_flight(phase, last), in_flight(phase, last + back)
        if now is None or before is None or len(now) != len(before):
            return False
        for x, y in zip(now, before):
            if x[:4] != y[:4] or abs(x[4] - y[4]) > tol or abs(x[5] - y[5]) > tol:
                return False
    return True


def extrapolate(totals: list[dict], counts: tuple[int, int, int], layers: int) -> dict | None:
    """The totals of ``layers`` layers from those of three short steps (``sim_wall_s`` left out), or
    None if any figure's second difference is more than rounding (the steps are not in their steady
    state). Times are held to 1e-9 of the step (a wait of 1e-16 s that comes and goes is rounding),
    other figures to 1e-9 of themselves, counts exactly."""
    k = (layers - counts[2]) // (counts[2] - counts[1])
    step = max(abs(t["step_time_s"]) for t in totals)

    def line(f0, f1, f2, scale: float):
        if isinstance(f2, dict):
            out = {}
            for key in [*f2, *(key for key in [*f1, *f0] if key not in f2)]:
                sub = scale if key != "bytes" else 0.0
                zero = {} if isinstance(f2.get(key), dict) else 0.0
                out[key] = line(f0.get(key, zero), f1.get(key, zero), f2.get(key, zero), sub)
                if out[key] is None:
                    return None
            return out
        d1, d2 = f1 - f0, f2 - f1
        if isinstance(f2, int):
            return f2 + d2 * k if d1 == d2 else None
        if abs(d2 - d1) > RTOL * max(abs(f0), abs(f1), abs(f2), scale):
            return None
        return f2 + d2 * k

    out = {}
    for key, value in totals[2].items():
        if key == "sim_wall_s":
            continue
        scale = step if key in _TIMES else 0.0
        out[key] = line(totals[0][key], totals[1][key], value, scale)
        if out[key] is None:
            return None
    return out


_TIMES = {"step_time_s", "compute_s", "exposed_by_kind_s", "compute_by_bound_s", "links"}  # links: busy_s
