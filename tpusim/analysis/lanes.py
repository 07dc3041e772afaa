"""Integer-nanosecond times and lanes, so that every trace tpusim writes survives Perfetto's import.

Perfetto's JSON importer drops an ``X`` event that starts inside another event of the same thread and
ends after it (a partial overlap: slices on one track must nest). On a simulated device that happens
for real: collectives overlap on ``Async XLA Ops`` and transfers share a link. So overlapping events
of a stream go to extra lanes (``Async XLA Ops``, ``Async XLA Ops #2``, ...), as ``report.html``
draws them; and times are rounded to whole nanoseconds once, start and end each, so that two ops
back to back stay back to back after rounding (a duration rounded on its own could overlap its
successor by one unit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def to_ns(seconds) -> np.ndarray:
    """Seconds (array-like) to integer nanoseconds, rounded to nearest."""
    import numpy as np  # here: the writers of `run --out` use ns_list and run without numpy

    return np.rint(np.asarray(seconds, dtype=float) * 1e9).astype(np.int64)


def ns_list(seconds: Iterable[float]) -> list[int]:
    """:func:`to_ns` of a list, as Python ints and without numpy (the writers of ``run --out`` work on
    column lists): the same product ``s * 1e9`` rounded half to even as ``np.rint`` does, so the same
    integers.

    >>> ns_list([1.5e-9, 2.5e-9, 0.1])
    [2, 2, 100000000]
    """
    return [round(s * 1e9) for s in seconds]


def lane_name(stream: str, lane: int) -> str:
    """``stream`` for the first lane, ``stream #2`` for the second, ..."""
    return stream if lane == 0 else f"{stream} #{lane + 1}"


def assign_lanes(starts: Sequence[int], ends: Sequence[int]) -> list[int]:
    """A lane per interval such that no two intervals of a lane overlap at all (touching is fine).

    Greedy in start order: each interval takes the first lane that is free by its start, so the lane
    count is the largest number of intervals open at once (the fewest possible).

    >>> assign_lanes([0, 5, 10, 12], [10, 12, 20, 13])
    [0, 1, 0, 1]
    """
    order = sorted(range(len(starts)), key=lambda i: (starts[i], -ends[i], i))
    lane_end: list[int] = []
    out = [0] * len(starts)
    for i in order:
        for k, end in enumerate(lane_end):
            if end <= starts[i]:
                break
        else:
            k = len(lane_end)
            lane_end.append(0)
        lane_end[k] = ends[i]
        out[i] = k
    return out


def stream_lanes(streams: Sequence, starts: Sequence[int], ends: Sequence[int]) -> list[int]:
    """:func:`assign_lanes` within each stream: the lane of every interval among those of its own stream.

    >>> stream_lanes(["a", "b", "a"], [0, 1, 5], [10, 9, 12])
    [0, 0, 1]
    """
    by_stream: dict = {}
    for i, s in enumerate(streams):
        by_stream.setdefault(s, []).append(i)
    out = [0] * len(streams)
    for idx in by_stream.values():
        for i, k in zip(idx, assign_lanes([starts[i] for i in idx], [ends[i] for i in idx])):
            out[i] = k
    return out


def partial_overlaps(events: Iterable[dict]) -> list[tuple[dict, dict]]:
    """Pairs ``(outer, dropped)`` that Perfetto's JSON import would drop: on one ``(pid, tid)``, an
    ``X`` event that starts inside an open one and ends after it. Times are taken as integer
    nanoseconds (``round(ts * 1000)``), as Perfetto stores them.

    >>> ev = [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 2}, {"ph": "X", "pid": 1, "tid": 1, "ts": 1, "dur": 2}]
    >>> len(partial_overlaps(ev))
    1
    """
    by_track: dict[tuple, list[tuple[int, int, dict]]] = {}
    for e in events:
        if e.get("ph") == "X":
            start = round(float(e["ts"]) * 1000)
            by_track.setdefault((e.get("pid"), e.get("tid")), []).append(
                (start, start + round(float(e.get("dur", 0)) * 1000), e))
    bad = []
    for evs in by_track.values():
        evs.sort(key=lambda t: (t[0], -t[1]))
        stack: list[tuple[int, int, dict]] = []
        for start, end, e in evs:
            while stack and stack[-1][1] <= start:
                stack.pop()
            if stack and end > stack[-1][1]:
                bad.append((stack[-1][2], e))
                continue  # dropped: it does not open a slice
            stack.append((start, end, e))
    return bad
