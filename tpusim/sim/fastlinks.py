"""The fast engine's event heap and shared links (see :mod:`tpusim.sim.fastengine`).

A :class:`Link` does :class:`tpusim.sim.engine.SharedLink`'s arithmetic (processor sharing, or FIFO for
PCIe) without a simpy process: it plans its own next completion, ``now + min(remaining) x flows /
rate``, as one heap entry, and ignores the entries a later plan made stale. A transfer alone on its
link is therefore one event, at ``now + bytes / rate``: the float the sharing loop computes for one flow.
"""

from __future__ import annotations

import heapq

_EPS_BYTES = 1e-6  # as tpusim.sim.engine: smaller transfers are done at once


class Loop:
    """A time-ordered heap of callbacks; ties run in insertion order (as simpy's counter does)."""

    __slots__ = ("now", "heap", "seq", "events")

    def __init__(self):
        self.now = 0.0
        self.heap: list = []
        self.seq = 0
        self.events = 0

    def at(self, t: float, fn, arg) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, arg))


class Link:
    """A link direction shared equally by its transfers (``fifo``: served whole in arrival order),
    the arithmetic of :class:`tpusim.sim.engine.SharedLink`."""

    __slots__ = ("loop", "rate", "fifo", "flows", "last", "bytes_moved", "busy_s", "plan")

    def __init__(self, loop: Loop, rate: float, fifo: bool = False):
        self.loop, self.rate, self.fifo = loop, rate, fifo
        self.flows: list[list] = []  # [remaining bytes, owner]; owner.transfer_done() when finished
        self.last = 0.0
        self.bytes_moved = 0.0
        self.busy_s = 0.0
        self.plan = 0  # the heap entry that is current; older ones are stale

    def transfer(self, nbytes: float, owner) -> bool:
        """Queue ``nbytes`` for ``owner``; False if there is nothing to move (done at once)."""
        if nbytes <= _EPS_BYTES:
            return False
        self._advance()
        busy = bool(self.flows)
        self.flows.append([nbytes, owner])
        self.bytes_moved += nbytes
        if busy:
            # SharedLink's process, kicked while it had flows, checks for finished ones before it
            # re-plans (an idle one does not); their owners hear of it after this instant's caller.
            finished = self._finish()
            if finished:
                self.loop.at(self.loop.now, Link._notify, finished)
        self._replan()
        return True

    def _advance(self) -> None:
        now = self.loop.now
        if self.flows and now > self.last:
            if self.fifo:
                self.flows[0][0] -= self.rate * (now - self.last)
            else:
                share = self.rate / len(self.flows) * (now - self.last)
                for f in self.flows:
                    f[0] -= share
            self.busy_s += now - self.last
        self.last = now

    def _finish(self) -> list:
        # As SharedLink: done when what is left would take under a picosecond (float crumbs):
        # tol = rate / (1 or flows) * (1e-12 + |now| 1e-15); rate / 1 is rate exactly.
        flows = self.flows
        x = 1e-12 + abs(self.loop.now) * 1e-15
        if self.fifo or len(flows) == 1:
            if flows[0][0] > self.rate * x:
                return []
            self.flows = flows[1:]
            return flows[:1]
        tol = self.rate / len(flows) * x
        finished = [f for f in flows if f[0] <= tol]
        if finished:
            self.flows = [f for f in flows if f[0] > tol]
        return finished

    def _replan(self) -> None:
        # The next completion at the current equal share (SharedLink._run's expression).
        self.plan += 1
        flows = self.flows
        if flows:
            # One flow (or FIFO): its bytes / rate, the same float as min(...) * 1 / rate.
            dt = (flows[0][0] / self.rate if self.fifo or len(flows) == 1
                  else min([f[0] for f in flows]) * len(flows) / self.rate)
            loop = self.loop  # loop.at(), inlined: the hottest call of the engine
            loop.seq += 1
            heapq.heappush(loop.heap, (loop.now + dt, loop.seq, self._wake, self.plan))

    def _wake(self, plan: int) -> None:
        if plan != self.plan:
            self.loop.events -= 1  # not an event of the model: a plan an arrival made stale
            return
        self._advance()
        finished = self._finish()
        self._replan()
        for f in finished:
            f[1].transfer_done()

    @staticmethod
    def _notify(finished: list) -> None:
        for f in finished:
            f[1].transfer_done()
