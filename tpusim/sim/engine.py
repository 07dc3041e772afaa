"""The discrete-event engine: simpy replays a Program on a Topology and records what ran when.

What is simulated, per class of equivalent devices (see below):

* the TensorCore's compute stream: compute ops one after another, each waiting for the collectives
  it depends on (XLA's ``-done``), each taking its cost-model time;
* asynchronous collectives: a collective starts once the ops it was issued after have run on every
  device, then moves its stages over the links: each phase puts its bytes on the links of its axis
  (both directions, or the NIC for DCN) and lasts at least its hops' latency;
* links: one shared resource per torus-axis direction and one for the DCN NIC. Transfers on a link
  share its bandwidth equally (processor sharing), so collectives that overlap on an axis slow each
  other down and congestion appears by itself; collectives on different axes do not interact.

Symmetry (why the cost does not grow with the chip count): every device runs the same program on
a torus where every chip sees the same links, so the links of one chip stand for all of them, and
one device stands for all devices that run at the same speed. Devices are grouped into classes by
their slowdown (``stragglers``); each class gets its own compute stream, and a collective, which
involves every device, starts when the slowest class reaches it. With no stragglers there is one
class, whatever the size of the pod.

Pipeline stages (``Program.stages`` > 1) are not equivalent: stage 0 starts while the others wait for
its activations. Each stage is then a class of its own running only its ops (``Op.stage``), with its
own links (its chips' links; a collective-permute to the next stage leaves on the sender's), so the
pipeline's bubble is the time a stage's stream waits for a permute, simulated, not added.

Deterministic: no randomness, and simpy breaks ties in insertion order.

This simpy engine is the reference ("plain") path: ``simulate`` runs the same model on the event heap
of :mod:`tpusim.sim.fastengine` (issue 13: far fewer events, the same floats), and
``simulate(..., plain=True)`` runs this one; tests/test_fastpath.py compares the two byte for byte.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tpusim.sim.collectives.lowering import CollectivePlan, lower
from tpusim.sim.collectives.timing import LinkParams, combine_overhead, link_params
from tpusim.sim.costmodel import ComputeParams, compute_params, op_time
from tpusim.limits import MAX_STRAGGLER_FACTOR
from tpusim.sim.program import ASYNC_STREAMS, COLLECTIVE, COMPUTE, HOST, Program
from tpusim.sim.topology import DCN, Topology

_EPS_BYTES = 1e-6


class SharedLink:
    """A link direction whose bandwidth is split equally among the transfers on it (processor
    sharing), or, with ``fifo``, given whole to the oldest transfer: DMA copies over PCIe are served
    in issue order (the v6e capture shows three host copies issued together finishing one after the
    other, not together)."""

    __slots__ = ("env", "name", "rate", "flows", "last", "kick", "bytes_moved", "busy_s", "engine", "fifo")

    def __init__(self, env: simpy.Environment, name: str, rate: float, engine: "Engine", fifo: bool = False):
        self.env, self.name, self.rate, self.engine, self.fifo = env, name, rate, engine, fifo
        self.flows: list[list] = []  # [remaining bytes, done event]
        self.last = 0.0
        self.kick: simpy.Event | None = None
        self.bytes_moved = 0.0
        self.busy_s = 0.0
        env.process(self._run())

    def transfer(self, nbytes: float) -> simpy.Event:
        done = self.env.event()
        if nbytes <= _EPS_BYTES:
            done.succeed()
            return done
        self._advance()
        self.flows.append([nbytes, done])
        self.bytes_moved += nbytes
        if self.kick is not None and not self.kick.triggered:
            self.kick.succeed()
        return done

    def _advance(self) -> None:
        now = self.env.now
        if self.flows and now > self.last:
            if self.fifo:
                self.flows[0][0] -= self.rate * (now - self.last)
            else:
                share = self.rate / len(self.flows) * (now - self.last)
                for f in self.flows:
                    f[0] -= share
            self.busy_s += now - self.last
        self.last = now

    def _run(self):
        env = self.env
        while True:
            if not self.flows:
                self.kick = env.event()
                yield self.kick
                self.engine.events += 1
                continue
            # Next completion at the current equal share; a new arrival (kick) re-plans.
            dt = (self.flows[0][0] / self.rate if self.fifo
                  else min(f[0] for f in self.flows) * len(self.flows) / self.rate)
            self.kick = env.event()
            yield env.any_of([env.timeout(dt), self.kick])
            self.engine.events += 1
            self._advance()
            # Done when what is left would take under a picosecond (or is lost in the clock's rounding):
            # float time steps leave crumbs of bytes that must not schedule ever-smaller timeouts.
            tol = self.rate / (1 if self.fifo else len(self.flows)) * (1e-12 + abs(env.now) * 1e-15)
            finished = [f for f in (self.flows[:1] if self.fifo else self.flows) if f[0] <= tol]
            if finished:
                self.flows = [f for f in self.flows if f not in finished]
                for f in finished:
                    f[1].succeed()


@dataclass
class Record:
    """Rows of the timeline, appended as plain lists and turned into a DataFrame once (see timeline.py)."""

    device_class: list = field(default_factory=list)
    stream: list = field(default_factory=list)
    name: list = field(default_factory=list)
    category: list = field(default_factory=list)
    layer: list = field(default_factory=list)
    phase: list = field(default_factory=list)
    start_s: list = field(default_factory=list)
    end_s: list = field(default_factory=list)
    flops: list = field(default_factory=list)
    bytes: list = field(default_factory=list)
    op_index: list = field(default_factory=list)

    def add(self, cls, stream, name, category, layer, phase, start, end, flops, nbytes, op_index):
        self.device_class.append(cls)
        self.stream.append(stream)
        self.name.append(name)
        self.category.append(category)
        self.layer.append(layer)
        self.phase.append(phase)
        self.start_s.append(start)
        self.end_s.append(end)
        self.flops.append(flops)
        self.bytes.append(nbytes)
        self.op_index.append(op_index)


@dataclass
class SimResult:
    program: Program
    topology: Topology
    mode: str
    record: Record
    step_time_s: float
    classes: list[dict]          # [{"slowdown": s, "devices": [ids...]}] ; class 0 is the reference
    link_stats: dict[str, dict]  # link name -> bytes moved, busy seconds, rate
    events: int
    sim_wall_s: float
    compute_params: ComputeParams
    link_params: LinkParams


def lower_plans(prog: Program, topo: Topology) -> tuple[dict[int, CollectivePlan], bool]:
    """Each collective op's plan, lowered once per distinct (kind, bytes, axes, shift) before the run,
    and whether every ICI phase of the program drives both directions of its axis (no permute): then
    the two directions always carry the same transfers, and one link stands for both (the same times,
    half the link events). Both engines start from this."""
    plans: dict[tuple, CollectivePlan] = {}
    op_plans: dict[int, CollectivePlan] = {}
    for op in prog.ops:
        if op.stream == COLLECTIVE:
            key = (op.category, op.bytes, op.axes, op.shift)
            if key not in plans:
                plans[key] = lower(op.category, op.bytes, topo, op.axes, shift=op.shift)
            op_plans[op.index] = plans[key]
    paired = all(ph.directions == 2 for plan in plans.values() for st in plan.stages
                 for ph in st.phases if ph.axis != DCN)
    return op_plans, paired


def link_layout(prog: Program, topo: Topology, lp, paired: bool) -> list[tuple[tuple[str, ...], str, float, bool]]:
    """The shared links of a run, in order: (the names a collective asks for, the link's label, its
    rate, FIFO or not). Torus-axis directions (one link for both when ``paired``), the DCN NIC, PCIe
    each way; pipeline stages run on disjoint chips, so each has its own ("stage 1 ICI x+"). Both
    engines build their links from this."""
    prefixes = [f"stage {s} " for s in range(prog.stages)] if prog.stages > 1 else [""]
    out = []
    for pre in prefixes:
        for a in topo.axis_names:
            if topo.axis_size(a) > 1:
                if paired:
                    out.append(((f"{pre}ICI {a}+", f"{pre}ICI {a}-"), f"{pre}ICI {a}", lp.ici_link_bytes_per_s, False))
                else:
                    out += [((f"{pre}ICI {a}{s}",), f"{pre}ICI {a}{s}", lp.ici_link_bytes_per_s, False) for s in "+-"]
        if topo.slices > 1:
            out.append(((f"{pre}DCN",), f"{pre}DCN", lp.dcn_bytes_per_s, False))
    if prog.host_ops:  # PCIe is full duplex: one link each way
        out += [((pre + name,), pre + name, topo.chip.pcie_bytes_per_s, True)
                for pre in prefixes for name in ("PCIe d2h", "PCIe h2d")]
    return out


class Engine:
    def __init__(self, program: Program, topo: Topology, *, mode: str = "calibrated",
                 stragglers: dict[int, float] | None = None, progress=None):
        self.program, self.topo, self.mode = program, topo, mode
        self.progress = progress  # called with the number of compute ops done by the reference device
        self.cp = compute_params(topo.chip, mode)
        self.lp = link_params(topo, mode, in_step=True)  # collectives inside a compiled step
        self.events = 0
        self.staged = program.stages > 1
        if self.staged:
            if stragglers:
                from tpusim.errors import TpusimError
                raise TpusimError("stragglers with pipeline parallelism: not modelled yet by tpusim",
                                  source="--straggler")
            self.classes = [{"slowdown": 1.0, "devices": list(ds), "stage": s}
                            for s, ds in enumerate(program.stage_devices)]
        else:
            self.classes = _device_classes(topo.num_chips, stragglers or {})

    def run(self) -> SimResult:
        import simpy  # only the reference path needs it (start-up time of `tpusim run`)

        t0 = time.perf_counter()
        env = simpy.Environment()
        prog, topo = self.program, self.topo
        rec = Record()
        links: dict[str, SharedLink] = {}
        op_plans, paired = lower_plans(prog, topo)
        for names, label, rate, fifo in link_layout(prog, topo, self.lp, paired):
            link = SharedLink(env, label, rate, self, fifo=fifo)
            for name in names:
                links[name] = link

        n_classes = len(self.classes)
        # Completion events: compute ops per class (only those a collective waits on), collectives global.
        issue_points = {d for op in prog.ops if op.stream in ASYNC_STREAMS for d in op.deps
                        if prog.ops[d].stream == COMPUTE}
        compute_done = {(c, i): env.event() for c in range(n_classes) for i in issue_points
                         if not self.staged or prog.ops[i].stage == c}  # (a stage completes its own ops)
        async_done = {op.index: env.event() for op in prog.ops if op.stream in ASYNC_STREAMS}
        # Op costs and collective plans are computed once, before env.run() (hot loop stays thin).
        cost = [op_time(op, self.cp) if op.stream == COMPUTE else 0.0 for op in prog.ops]

        def compute_stream(c: int, slowdown: float):
            done = 0
            for op in prog.ops:
                if op.stream != COMPUTE or (self.staged and op.stage != c):
                    continue
                done += 1
                if c == 0 and self.progress is not None and done % 512 == 0:
                    self.progress(done)
                waits = [async_done[d] for d in op.deps if d in async_done]
                start = env.now  # a "-done" op lasts while it waits, as XLA's profiles show it
                if waits:
                    pending = [e for e in waits if not e.triggered]
                    if pending:
                        yield env.all_of(pending) if len(pending) > 1 else pending[0]
                        self.events += 1
                if not op.category.endswith("-done"):
                    start = env.now
                dt = cost[op.index] * slowdown
                if dt > 0:
                    yield env.timeout(dt)
                    self.events += 1
                rec.add(c, "XLA Ops", op.name, op.category, op.layer, op.phase, start, env.now, op.flops,
                        op.hbm_bytes, op.index)
                ev = compute_done.get((c, op.index))
                if ev is not None:
                    ev.succeed()

        def wait_for_deps(op):
            """An async op starts once the ops it was issued after have run on every device class."""
            deps = [compute_done[(c, d)] for d in op.deps for c in range(n_classes) if (c, d) in compute_done]
            deps += [async_done[d] for d in op.deps if d in async_done]
            pending = [e for e in deps if not e.triggered]
            if pending:
                yield env.all_of(pending)
                self.events += 1

        def collective(op):
            yield from wait_for_deps(op)
            start = env.now
            plan = op_plans[op.index]
            pre = f"stage {op.stage} " if self.staged else ""
            for si, stage in enumerate(plan.stages):
                waits = []
                stage_start = env.now
                for ph in stage.phases:
                    if ph.axis == DCN:
                        ph_links = [links[f"{pre}DCN"]]
                        latency = self.lp.dcn_latency_s
                    else:  # (a one-way phase, a permute, leaves on the side it shifts to)
                        ph_links = [links[f"{pre}ICI {ph.axis}{'-' if ph.directions == 1 and op.shift < 0 else '+'}"]]
                        if ph.directions == 2 and links[f"{pre}ICI {ph.axis}-"] is not ph_links[0]:
                            ph_links.append(links[f"{pre}ICI {ph.axis}-"])
                        latency = self.lp.ici_hop_latency_s * ph.stride
                    waits += [lk.transfer(ph.link_bytes) for lk in ph_links]
                    floor = ph.steps * latency
                    if floor > 0:
                        waits.append(env.timeout(floor))
                yield env.all_of(waits)
                self.events += 1
                for ph in stage.phases:
                    rec.add(op.stage if self.staged else -1, "DCN" if ph.axis == DCN else f"ICI {ph.axis}", f"{op.name} [{si}]", op.category,
                            op.layer, op.phase, stage_start, env.now, 0.0, ph.link_bytes, op.index)
            transfer = env.now - start
            extra = combine_overhead(transfer, self.lp) - transfer
            if extra > 0:
                yield env.timeout(extra)
                self.events += 1
            rec.add(op.stage if self.staged else -1, "Async XLA Ops", op.name, op.category, op.layer, op.phase, start,
                    env.now, 0.0, op.bytes, op.index)
            async_done[op.index].succeed()

        def host_copy(op):
            yield from wait_for_deps(op)
            start = env.now
            pre, cls = (f"stage {op.stage} ", op.stage) if self.staged else ("", -1)
            yield links[pre + ("PCIe d2h" if op.category == "copy-to-host" else "PCIe h2d")].transfer(op.bytes)
            self.events += 1
            rec.add(cls, "PCIe", op.name, op.category, op.layer, op.phase, start, env.now, 0.0, op.bytes, op.index)
            rec.add(cls, "Async XLA Ops", op.name, op.category, op.layer, op.phase, start, env.now, 0.0, op.bytes,
                    op.index)
            async_done[op.index].succeed()

        for op in prog.ops:
            if op.stream == COLLECTIVE:
                env.process(collective(op))
            elif op.stream == HOST:
                env.process(host_copy(op))
        streams = [env.process(compute_stream(c, cls["slowdown"])) for c, cls in enumerate(self.classes)]
        env.run(until=env.all_of(streams))
        step = env.now
        stats = {name: {"bytes": lk.bytes_moved, "busy_s": lk.busy_s, "bytes_per_s": lk.rate}
                 for name, lk in links.items()}
        return SimResult(program=prog, topology=topo, mode=self.mode, record=rec, step_time_s=step,
                         classes=self.classes, link_stats=stats, events=self.events,
                         sim_wall_s=time.perf_counter() - t0, compute_params=self.cp, link_params=self.lp)


def _device_classes(n_devices: int, stragglers: dict[int, float]) -> list[dict]:
    """Devices grouped by slowdown factor; class 0 holds the unslowed devices (or the fastest)."""
    by_speed: dict[float, list[int]] = {}
    for d, s in sorted(stragglers.items()):
        by_speed.setdefault(float(s), []).append(d)
    normal = [d for d in range(n_devices) if d not in stragglers] if len(stragglers) < n_devices else []
    classes = [{"slowdown": 1.0, "devices": normal}] if normal else []
    classes += [{"slowdown": s, "devices": ds} for s, ds in sorted(by_speed.items())]
    return classes


def check_stragglers(stragglers: dict[int, float], topo: Topology) -> None:
    """Every straggler is a device of ``topo`` slowed by a factor in (0, MAX_STRAGGLER_FACTOR]."""
    from tpusim.errors import TpusimError

    for d, f in stragglers.items():
        if not 0 <= d < topo.num_chips:
            raise TpusimError(f"device {d} is not on {topo.name}: devices are 0..{topo.num_chips - 1}",
                              source="--straggler")
        if not 0 < f <= MAX_STRAGGLER_FACTOR:
            raise TpusimError(f"device {d} slowed by {f}: factors are in (0, {MAX_STRAGGLER_FACTOR:g}]",
                              source="--straggler")


def simulate(program: Program, topo: Topology, *, mode: str = "calibrated",
             stragglers: dict[int, float] | None = None, progress=None, plain: bool = False) -> SimResult:
    """Replay ``program`` on ``topo``; ``stragglers`` maps device ids to a compute slowdown (> 1);
    ``progress(n)`` is called as the reference device completes compute ops. ``plain``: run the simpy
    reference engine instead of the fast one (the same results; only ``events`` and ``sim_wall_s``,
    which count and time the engine's own work, differ)."""
    check_stragglers(stragglers or {}, topo)
    engine = Engine(program, topo, mode=mode, stragglers=stragglers, progress=progress)
    # The fast path knows device classes that differ by their slowdown or are pipeline stages; a class
    # carrying more (a feature added to this engine and not yet to fastengine) runs here, on the reference.
    if plain or any(set(cls) - {"slowdown", "devices", "stage"} for cls in engine.classes):
        return engine.run()
    from tpusim.sim.fastengine import FastEngine

    return FastEngine(engine).run()
