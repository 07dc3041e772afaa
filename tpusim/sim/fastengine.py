"""The engine's fast path: the same model as :mod:`tpusim.sim.engine`, on a bare event heap.

The simpy engine (``simulate(..., plain=True)``) is the reference: one generator process per
collective, ``all_of`` conditions for a stage's transfers and floors, a process per link woken by a
``kick`` event. Every one of those is a simpy event (about 44,000 for a 70B step, 3.3 us of CPU
each). This module computes the same floats with far fewer, cheaper events (issue 13):

* **Collectives and host copies are callback state machines**: a stage counts its pending transfers;
  the last one to finish ends the stage (or, if a hop-latency floor ends later, one event at the
  floor's end: simpy's ``all_of`` fires at the same maximum). No process, no condition objects.
* **A link plans its next completion itself** (:mod:`tpusim.sim.fastlinks`): on every arrival or
  completion it pushes one heap entry at ``now + min(remaining) x flows / rate`` (the expression
  ``SharedLink._run`` evaluates) and ignores the entries a later plan made stale. A transfer alone on its link is therefore timed in
  closed form: one event, at ``now + bytes / rate``.
* **Compute runs are merged**: a device class's stream runs ahead through its ops, adding
  ``t = t + dt`` in op order (the additions simpy's timeouts make, so every op's times are the same
  floats). It stops only where an op waits for an asynchronous op not yet done (one event at the
  time it reaches that op), and pushes one event where an op is an issue point some asynchronous op
  waits on (at that op's end). Every other compute op costs no event at all.

Identity with the reference: every time is the same expression of the same operands, so results are
byte-identical as long as events at the same instant do not change a value. Two places could: a
link's completion tolerance uses the number of flows at its wake-up (a flow arriving at exactly that
instant counts or not), and the PCIe queue serves copies in arrival order. Both follow the reference's
order here (ties in insertion order, asynchronous ops started in op order), and tests/test_fastpath.py
checks the summary, the timeline and the link statistics against the reference byte for byte on
every shipped workload (stragglers, multi-slice, host offload, an imported HLO program included).
The rows of the record come in another order (per op they are the same); every reader sorts them
or reads one device class's compute rows, which are in op order in both.

Pipeline stages (``Program.stages`` > 1) are device classes that each run only their own compute ops,
on links of their own (``stage 1 ICI x+``), as in the reference; a permute leaves on the link of the
direction it shifts to.
"""

from __future__ import annotations

import heapq
import time

from tpusim.sim.collectives.lowering import CollectivePlan
from tpusim.sim.collectives.timing import combine_overhead
from tpusim.sim.fastlinks import Link, Loop
from tpusim.sim.program import ASYNC_STREAMS, COMPUTE
from tpusim.sim.topology import DCN


class _Async:
    """A collective or host copy: waits for its dependencies, then moves its stages over the links."""

    __slots__ = ("eng", "op", "stages", "deps_left", "start", "stage", "stage_start", "pending", "floor_end",
                 "waiters")

    def __init__(self, eng: "FastEngine", op, stages: list | None):
        self.eng, self.op, self.stages = eng, op, stages  # stages: see FastEngine._stages; None: a host copy
        self.deps_left = 0
        self.waiters: list = []  # what to notify when done: _Async or _Stream objects
        self.start = self.stage_start = self.floor_end = 0.0
        self.stage = self.pending = 0

    def dep_done(self) -> None:
        self.deps_left -= 1
        if self.deps_left == 0:
            self.begin()

    def begin(self) -> None:
        eng = self.eng
        self.start = eng.loop.now
        if self.stages is None:  # a host copy: one FIFO transfer over PCIe (its stage's, under a pipeline)
            pre = f"stage {self.op.stage} " if eng.staged else ""
            link = eng.links[pre + ("PCIe d2h" if self.op.category == "copy-to-host" else "PCIe h2d")]
            if not link.transfer(self.op.bytes, self):
                self.transfer_done_host()
            return
        self.stage = 0
        self._stage()

    def _stage(self) -> None:
        loop = self.eng.loop
        stages = self.stages
        while self.stage < len(stages):
            transfers, floor, _ = stages[self.stage]
            now = loop.now
            self.stage_start = now
            pending = 0
            for lk, nbytes in transfers:
                if lk.transfer(nbytes, self):
                    pending += 1
            self.pending = pending
            # simpy's all_of over timeout(floor) per phase ends at the latest now + floor: now + the
            # largest floor (float addition is monotonic), or now when no phase has a floor.
            self.floor_end = floor_end = now + floor if floor > 0 else now
            if pending:
                return  # transfer_done continues
            if floor_end > now:
                loop.at(floor_end, _Async._stage_end, self)
                return
            self._record_stage()
        self._finish_transfers()

    def transfer_done(self) -> None:
        if self.stages is None:
            self.transfer_done_host()
            return
        self.pending -= 1
        if self.pending:
            return
        loop = self.eng.loop
        if self.floor_end > loop.now:
            loop.at(self.floor_end, _Async._stage_end, self)
        else:
            self._stage_end()

    def _stage_end(self) -> None:
        self._record_stage()
        self._stage()

    def _record_stage(self) -> None:
        op, add, now = self.op, self.eng.rows.append, self.eng.loop.now
        si = self.stage
        name = f"{op.name} [{si}]"
        for stream, nbytes in self.stages[si][2]:
            add((self.eng.row_device(op), stream, name, op.category, op.layer, op.phase, self.stage_start, now, 0.0,
                 nbytes, op.index))
        self.stage += 1

    def _finish_transfers(self) -> None:
        loop = self.eng.loop
        transfer = loop.now - self.start
        extra = combine_overhead(transfer, self.eng.lp) - transfer
        if extra > 0:
            loop.at(loop.now + extra, _Async._done, self)
        else:
            self._done()

    def transfer_done_host(self) -> None:
        op, now = self.op, self.eng.loop.now
        self.eng.rows.append((self.eng.row_device(op), "PCIe", op.name, op.category, op.layer, op.phase, self.start, now, 0.0, op.bytes,
                              op.index))
        self._done()

    def _done(self) -> None:
        op, eng = self.op, self.eng
        eng.rows.append((eng.row_device(op), "Async XLA Ops", op.name, op.category, op.layer, op.phase, self.start, eng.loop.now,
                         0.0, op.bytes, op.index))
        eng.done[op.index] = True
        for w in self.waiters:
            w.dep_done()


class _Stream:
    """One device class's TensorCore: runs ahead through its compute ops (see the module's docstring)."""

    __slots__ = ("eng", "c", "slowdown", "pos", "t", "blocked", "finished", "cops", "cost", "waits_of")

    def __init__(self, eng: "FastEngine", c: int, slowdown: float, cops: list, cost: list, waits_of: list):
        self.eng, self.c, self.slowdown = eng, c, slowdown
        self.cops, self.cost, self.waits_of = cops, cost, waits_of  # this class's compute ops (a stage's own)
        self.pos = 0
        self.t = 0.0
        self.blocked = 0      # asynchronous ops still awaited by the op at pos
        self.finished = False

    def dep_done(self) -> None:
        self.blocked -= 1
        if self.blocked == 0:
            self.run(waited=True)

    def resume(self) -> None:
        self.run(waited=False)

    def run(self, waited: bool) -> None:
        """At loop.now == self.t (or later, after a wait): run ops until one must wait or the end."""
        eng = self.eng
        loop, add, done, c, slowdown = eng.loop, eng.rows.append, eng.done, self.c, self.slowdown
        cops, cost, waits_of, issue = self.cops, self.cost, self.waits_of, eng.issue_points
        progress = eng.progress if c == 0 else None
        n = len(cops)
        t = self.t
        while self.pos < n:
            op = cops[self.pos]
            start = t  # a "-done" op lasts while it waits, as XLA's profiles show it
            if not waited:
                waits = waits_of[self.pos]
                if waits:
                    if t > loop.now:  # done-ness is known only once the loop reaches the op
                        self.t = t
                        loop.at(t, _Stream.resume, self)
                        return
                    pending = [d for d in waits if not done[d]]
                    if pending:
                        self.t = t
                        self.blocked = len(pending)
                        for d in pending:
                            eng.asyncs[d].waiters.append(self)
                        return
            else:
                waited = False
                start, t = self.t, loop.now
            if progress is not None and (self.pos + 1) % 512 == 0:
                progress(self.pos + 1)
            if not op.category.endswith("-done"):
                start = t
            dt = cost[self.pos] * slowdown
            if dt > 0:
                t = t + dt
            add((c, "XLA Ops", op.name, op.category, op.layer, op.phase, start, t, op.flops, op.hbm_bytes,
                 op.index))
            self.pos += 1
            if op.index in issue:  # some asynchronous op waits for this one: tell it at its end
                loop.at(t, _Stream._issue, (self, op.index))
        self.t = t
        loop.at(t, _Stream._end, self)

    @staticmethod
    def _issue(arg) -> None:
        self, index = arg
        for a in self.eng.issued[index]:
            a.dep_done()

    def _end(self) -> None:
        self.finished = True
        self.eng.streams_left -= 1


class FastEngine:
    """Same constructor and result as :class:`tpusim.sim.engine.Engine`."""

    def __init__(self, engine):
        # Takes the reference Engine's set-up (parameters, device classes) so both start equal.
        self.program, self.topo, self.mode = engine.program, engine.topo, engine.mode
        self.progress, self.cp, self.lp, self.classes = engine.progress, engine.cp, engine.lp, engine.classes

    def row_device(self, op) -> int:
        """The timeline device of an asynchronous op's rows: its stage under a pipeline, else -1 (all)."""
        return op.stage if self.staged else -1

    def _stages(self, plan: CollectivePlan, pre: str = "", shift: int = 1) -> list[tuple]:
        """A plan's stages on this engine's links: ((link, bytes) per transfer, the largest hop-latency
        floor, (timeline row, bytes) per phase): the reference's per-stage work, done once per plan (and
        per pipeline stage ``pre``, whose chips have their own links, and per permute direction)."""
        links, lp = self.links, self.lp
        out = []
        for stage in plan.stages:
            transfers, floors, rows = [], [0.0], []
            for ph in stage.phases:
                if ph.axis == DCN:
                    ph_links = [links[f"{pre}DCN"]]
                    latency = lp.dcn_latency_s
                else:  # (a one-way phase, a permute, leaves on the side it shifts to)
                    first = links[f"{pre}ICI {ph.axis}{'-' if ph.directions == 1 and shift < 0 else '+'}"]
                    ph_links = [first]
                    if ph.directions == 2 and links[f"{pre}ICI {ph.axis}-"] is not first:
                        ph_links.append(links[f"{pre}ICI {ph.axis}-"])
                    latency = lp.ici_hop_latency_s * ph.stride
                transfers += [(lk, ph.link_bytes) for lk in ph_links]
                floors.append(ph.steps * latency)
                rows.append(("DCN" if ph.axis == DCN else f"ICI {ph.axis}", ph.link_bytes))
            out.append((tuple(transfers), max(floors), tuple(rows)))
        return out

    def run(self):
        from tpusim.sim.costmodel import op_time
        from tpusim.sim.engine import Record, SimResult, link_layout, lower_plans

        t0 = time.perf_counter()
        prog, topo, lp = self.program, self.topo, self.lp
        self.loop = loop = Loop()
        self.rows: list[tuple] = []  # the record's rows (one append each); columns made at the end
        op_plans, paired = lower_plans(prog, topo)  # as the reference (one link for both directions if paired)
        self.staged = staged = prog.stages > 1
        links: dict[str, Link] = {}
        for names, _, rate, fifo in link_layout(prog, topo, lp, paired):
            link = Link(loop, rate, fifo=fifo)
            for name in names:
                links[name] = link
        self.links = links

        stages: dict[tuple, list] = {}
        ops = prog.ops
        self.done = [False] * len(ops)
        self.asyncs = {}
        for op in ops:
            if op.stream not in ASYNC_STREAMS:
                continue
            plan_stages = None
            if op.index in op_plans:
                pre = f"stage {op.stage} " if staged else ""
                key = (id(op_plans[op.index]), pre, op.shift < 0)
                plan_stages = stages.get(key)
                if plan_stages is None:
                    plan_stages = stages[key] = self._stages(op_plans[op.index], pre, op.shift)
            self.asyncs[op.index] = _Async(self, op, plan_stages)
        # Op costs once per distinct shape (80 layers repeat the same ops): the same floats op_time gives.
        memo: dict[tuple, float] = {}

        def stream_ops(c: int | None) -> tuple[list, list, list]:
            cops = [op for op in ops if op.stream == COMPUTE and (c is None or op.stage == c)]
            cost = []
            for op in cops:
                key = (op.category, op.flops, op.vpu_flops, op.hbm_bytes, op.mxu_shape, op.mxu_dtype)
                dt = memo.get(key)
                if dt is None:
                    dt = memo[key] = op_time(op, self.cp)
                cost.append(dt)
            return cops, cost, [tuple(d for d in op.deps if d in self.asyncs) for op in cops]

        self.issued: dict[int, list] = {}  # compute op -> asynchronous ops issued after it, in op order
        n_classes = len(self.classes)
        for a in self.asyncs.values():
            for d in a.op.deps:
                if ops[d].stream == COMPUTE:
                    self.issued.setdefault(d, []).append(a)
                    a.deps_left += 1 if staged else n_classes  # each class reaches the issue point (a stage: its own)
                elif d in self.asyncs:
                    self.asyncs[d].waiters.append(a)
                    a.deps_left += 1
        self.issue_points = set(self.issued)
        # Time 0: asynchronous ops without dependencies start in op order, then the compute streams.
        for a in self.asyncs.values():
            if a.deps_left == 0:
                a.begin()
        shared = None if staged else stream_ops(None)  # every class runs every compute op, unless staged
        streams = [_Stream(self, c, cls["slowdown"], *(stream_ops(c) if staged else shared))
                   for c, cls in enumerate(self.classes)]
        self.streams_left = len(streams)
        for s in streams:
            s.resume()
        heap, pop = loop.heap, heapq.heappop
        while heap and self.streams_left:
            t, _, fn, arg = pop(heap)
            loop.now = t
            loop.events += 1
            fn(arg)
        if self.streams_left:  # as simpy's env.run(until=...) with no events left: a program that cannot end
            raise RuntimeError("no events left but a compute stream is still waiting: the program's dependencies "
                               "form a cycle")
        step = loop.now
        stats = {name: {"bytes": lk.bytes_moved, "busy_s": lk.busy_s, "bytes_per_s": lk.rate}
                 for name, lk in links.items()}
        rec = Record(*(list(col) for col in zip(*self.rows))) if self.rows else Record()
        return SimResult(program=prog, topology=topo, mode=self.mode, record=rec, step_time_s=step,
                         classes=self.classes, link_stats=stats, events=loop.events,
                         sim_wall_s=time.perf_counter() - t0, compute_params=self.cp, link_params=lp)
