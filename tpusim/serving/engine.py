"""The request-level serving simulation (simpy): a request stream, and one process per model replica.

Each replica runs its scheduler's loop: choose the next step (a prefill of waiting prompts, a decode
of every running request, or both with chunked prefill), take its time from the compiled step
(:class:`~tpusim.serving.compiler.StepModel`, cached by shape), then advance the requests in it.
Arrivals go to the replica with the fewest requests (ties: the lowest index). With disaggregation the
first ``prefill_replicas`` replicas only prefill; a prefilled request's KV cache is then moved to the
least-loaded decode replica, which admits it when a slot is free.

The first output token comes out of the prefill step (TTFT = its end - arrival); each decode step
adds one token to every request in it. Records are plain lists, turned into DataFrames by
:mod:`tpusim.serving.summary`. Deterministic: the requests come from a seeded Generator and ties are
broken by index.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import simpy

from tpusim.serving.compiler import StepModel
from tpusim.serving.requests import Requests


@dataclass(slots=True)
class Req:
    i: int
    arrival: float
    n_in: int
    n_out: int
    prefilled: int = 0
    generated: int = 0
    start: float = -1.0          # first step that worked on it
    first_token: float = -1.0
    finish: float = -1.0
    last_token: float = -1.0
    replica: int = -1
    decode_replica: int = -1

    @property
    def ctx(self) -> int:
        return self.prefilled + self.generated


@dataclass
class ServeResult:
    model: StepModel
    requests: list[Req]
    steps: list[tuple]           # see STEP_COLUMNS
    itl_s: np.ndarray            # every inter-token gap
    end_s: float
    step_evaluations: int
    n_prefill_replicas: int = 0
    notes: list[str] = field(default_factory=list)


STEP_COLUMNS = ("replica", "kind", "start_s", "end_s", "decode_batch", "prefill_tokens", "kv_tokens",
                "weights_s", "kv_s", "compute_s", "collectives_s")


class _Replica:
    def __init__(self, sim: "_Sim", index: int, role: str):
        self.sim, self.index, self.role = sim, index, role  # role: both, prefill, decode
        self.waiting: deque[Req] = deque()     # arrived, not started
        self.prefilling: list[Req] = []        # admitted, prompt not finished (chunked prefill)
        self.ready: deque[Req] = deque()       # prefilled elsewhere, KV cache here, waiting for a slot
        self.running: list[Req] = []           # decoding
        self.ctx_sum = 0                       # tokens cached by the running requests
        self.reserved = 0                      # paged KV: tokens promised to admitted requests (prompt + output)
        self.paged = sim.model.sw.batching.paged_kv
        self.pool = sim.model.kv_pool_tokens
        self.wake: simpy.Event | None = None

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.ready) + len(self.running)

    def notify(self) -> None:
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def _fits(self, r: Req) -> bool:
        """Paged KV: admit only what the pool can hold to the end (no preemption is modelled)."""
        return not self.paged or self.reserved + r.n_in + r.n_out <= self.pool

    def plan(self):
        """(kind, decode requests, [(request, prefill chunk)]) of the next step, or None when idle."""
        sim = self.sim
        b = sim.model.sw.batching
        cap, budget = sim.model.max_batch, sim.model.token_budget
        while self.ready and len(self.running) < cap:
            r = self.ready.popleft()
            self.running.append(r)
            self.ctx_sum += r.ctx
        if self.role == "prefill":
            chunks, tokens = [], 0
            most = b.max_prefills_per_step or len(self.waiting)
            while self.waiting and len(chunks) < most and (not chunks or tokens + self.waiting[0].n_in <= budget):
                r = self.waiting.popleft()
                chunks.append((r, r.n_in))
                tokens += r.n_in
            return ("prefill", [], chunks) if chunks else None
        if b.policy == "static":
            if self.running:
                return "decode", self.running, []
            batch = [self.waiting.popleft() for _ in range(min(cap, len(self.waiting)))]
            return ("prefill", [], [(r, r.n_in) for r in batch]) if batch else None
        if b.chunked_prefill:
            left = budget - len(self.running)
            chunks = []
            for r in self.prefilling:
                if left <= 0:
                    break
                c = min(r.n_in - r.prefilled, left)
                chunks.append((r, c))
                left -= c
            while left > 0 and self.waiting and len(self.running) + len(self.prefilling) < cap:
                r = self.waiting.popleft()
                self.prefilling.append(r)
                c = min(r.n_in, left)
                chunks.append((r, c))
                left -= c
            if not chunks and not self.running:
                return None
            return ("mixed" if chunks and self.running else "prefill" if chunks else "decode"), self.running, chunks
        if self.waiting and len(self.running) < cap:  # prefill first (vLLM's default), FCFS within the budget
            chunks, tokens = [], 0
            most = b.max_prefills_per_step or cap
            while (self.waiting and len(self.running) + len(chunks) < cap and len(chunks) < most
                   and (not chunks or tokens + self.waiting[0].n_in <= budget) and self._fits(self.waiting[0])):
                r = self.waiting.popleft()
                self.reserved += r.n_in + r.n_out
                chunks.append((r, r.n_in))
                tokens += r.n_in
            if chunks:
                return "prefill", [], chunks
        if self.running:
            return "decode", self.running, []
        return None

    def run(self):
        sim, env, model = self.sim, self.sim.env, self.sim.model
        static = model.sw.batching.policy == "static"
        while True:
            step = self.plan()
            if step is None:
                self.wake = env.event()
                yield self.wake
                self.wake = None
                continue
            kind, decode, chunks = step
            n_dec = len(decode)
            if static and chunks:  # a static batch is padded to its longest prompt
                longest = max(c for _, c in chunks)
                p_tok, pairs = longest * len(chunks), len(chunks) * (longest * (longest + 1) / 2)
                p_ctx = 0
            else:
                p_tok = sum(c for _, c in chunks)
                pairs = sum(c * r.prefilled + c * (c + 1) / 2 for r, c in chunks)
                p_ctx = sum(r.prefilled for r, _ in chunks)
            n_logits = n_dec + sum(1 for r, c in chunks if r.prefilled + c == r.n_in)
            cost = model.cost(n_dec, self.ctx_sum, p_tok, pairs, p_ctx, n_logits)
            t0 = env.now
            for r, _ in chunks:
                if r.start < 0:
                    r.start = t0
                    r.replica = self.index
            yield env.timeout(cost.time_s)
            t1 = env.now
            sim.steps.append((self.index, kind, t0, t1, n_dec, p_tok, self.ctx_sum, *cost.parts_s))
            if n_dec:
                gaps = sim.gaps
                done = []
                for r in decode:
                    if r.generated >= r.n_out:  # a static batch's finished rows ride along
                        continue
                    r.generated += 1
                    gaps.append(t1 - r.last_token)
                    r.last_token = t1
                    if r.generated == r.n_out:
                        done.append(r)
                self.ctx_sum += n_dec
                if static:
                    if all(r.generated >= r.n_out for r in decode):
                        for r in decode:
                            sim.finish(r, r.last_token)
                        self.running = []
                        self.ctx_sum = 0
                else:
                    for r in done:
                        self.running.remove(r)
                        self.ctx_sum -= r.ctx
                        if self.paged:
                            self.reserved -= r.n_in + r.n_out
                        sim.finish(r, t1)
            for r, c in chunks:
                r.prefilled += c
                if r.prefilled < r.n_in:
                    continue
                if r in self.prefilling:
                    self.prefilling.remove(r)
                r.generated, r.first_token, r.last_token = 1, t1, t1
                if self.role == "prefill":
                    sim.transfer(r)
                elif r.n_out == 1 and not static:
                    if self.paged:
                        self.reserved -= r.n_in + r.n_out
                    sim.finish(r, t1)
                else:
                    self.running.append(r)
                    self.ctx_sum += r.ctx


class _Sim:
    def __init__(self, model: StepModel, reqs: Requests):
        self.model, self.env = model, simpy.Environment()
        sw = model.sw
        n = model.replicas
        d = sw.disaggregation
        self.n_prefill = d.prefill_replicas if d else 0
        roles = ["prefill"] * self.n_prefill + ["decode" if d else "both"] * (n - self.n_prefill)
        self.replicas = [_Replica(self, i, role) for i, role in enumerate(roles)]
        self.front = [r for r in self.replicas if r.role != "decode"]
        self.back = [r for r in self.replicas if r.role != "prefill"]
        self.reqs = [Req(i, float(a), int(x), int(y)) for i, (a, x, y) in
                     enumerate(zip(reqs.arrival_s, reqs.input_tokens, reqs.output_tokens))]
        self.steps: list[tuple] = []
        self.gaps: list[float] = []
        self.left = len(self.reqs)
        self.done = self.env.event()
        self.closed_loop = bool(np.isnan(reqs.arrival_s).all())
        self.next_req = 0

    def submit(self, r: Req) -> None:
        r.arrival = self.env.now
        target = min(self.front, key=lambda x: (x.load, x.index))
        target.waiting.append(r)
        target.notify()

    def finish(self, r: Req, t: float) -> None:
        r.finish = t
        self.left -= 1
        if self.closed_loop and self.next_req < len(self.reqs):
            self.submit(self.reqs[self.next_req])
            self.next_req += 1
        if self.left == 0:
            self.done.succeed()

    def transfer(self, r: Req) -> None:
        t = self.model.kv_transfer_time(r.n_in, self.model.sw.disaggregation.transfer)

        def deliver(_event):
            target = min(self.back, key=lambda x: (x.load, x.index))
            r.decode_replica = target.index
            if r.n_out == 1:
                self.finish(r, self.env.now)
                return
            target.ready.append(r)
            target.notify()

        self.env.timeout(t).callbacks.append(deliver)

    def arrivals(self):
        for r in self.reqs:
            if r.arrival > self.env.now:
                yield self.env.timeout(r.arrival - self.env.now)
            self.submit(r)

    def run(self, concurrency: int) -> None:
        for rep in self.replicas:
            self.env.process(rep.run())
        if self.closed_loop:
            self.next_req = min(concurrency, len(self.reqs))
            for r in self.reqs[: self.next_req]:
                self.submit(r)
        else:
            self.env.process(self.arrivals())
        self.env.run(until=self.done)


def simulate_serving(model: StepModel, reqs: Requests) -> ServeResult:
    """Serve ``reqs`` on every replica of ``model`` until the last request finishes."""
    sw = model.sw
    if sw.disaggregation and sw.disaggregation.prefill_replicas >= model.replicas:
        from tpusim.errors import TpusimError

        raise TpusimError(f"{sw.disaggregation.prefill_replicas} prefill replicas leave none of the {model.replicas} "
                          "replicas to decode", source=sw.source, key="serving.disaggregation.prefill_replicas")
    d = sw.disaggregation
    if d and d.transfer == "dcn":
        per_slice = model.replicas // model.topo.slices
        if model.topo.slices < 2 or d.prefill_replicas % per_slice:
            from tpusim.errors import TpusimError

            raise TpusimError(f"a KV transfer over DCN puts prefill and decode on different slices: give 2 or more "
                              f"slices and a whole number of slices ({per_slice} replicas each) of prefill replicas",
                              source=sw.source, key="serving.disaggregation.transfer")
    sim = _Sim(model, reqs)
    sim.run(sw.arrival.concurrency)
    return ServeResult(model=model, requests=sim.reqs, steps=sim.steps, itl_s=np.asarray(sim.gaps), end_s=sim.env.now,
                       step_evaluations=model.evaluations, n_prefill_replicas=sim.n_prefill)
