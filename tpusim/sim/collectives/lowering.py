"""Lower a collective onto the links it uses: stages of concurrent phases, each on one axis.

Conventions (the book's, Chapter 3 "sharding.md"): ``V`` is the bytes of the whole array one device
holds *after* an all-gather, or *before* a reduce-scatter or all-reduce. For all-to-all and
collective-permute ``V`` is what one device holds and sends (its local buffer); the book's all-to-all
V is the global array, i.e. N times ours.

Every torus axis is driven in both directions at once (TPU ICI links are full duplex):

* **ring** (axis with wraparound, length X): all-gather in floor(X/2) hops; the busiest link carries
  (X-1)/X * V/2 bytes each way, so T = (X-1)/X * V / W_ici. The book's "V/W" is its large-X limit.
* **line** (no wraparound): X-1 hops of V/X each; the end links carry (X-1)/X * V one way, so
  T = (X-1) * (V/X) / W_one_way, exactly twice the ring (the book's "typically doubles").
* **several axes**: the data is split into one part per axis, each part gathered over the axes in a
  rotated order, so all axes work at once: T = (1 - 1/N) V / (n_axes W) (book: V / (W n_axes)).
* **all-to-all**: shortest-path routing, every axis at once; on a ring the busiest link carries
  V X / 8 each way, so T = V X / (4 W) = V_book max(X) / (4 N W) (book, corrected Aug 2025).
* **DCN** (across slices): hierarchical. ICI inside each slice, and over DCN only the 1/N_ici of the
  data each chip owns: reduce-scatter over ICI, then DCN, then all-gather over ICI. Every chip sends
  through its host's NIC into a non-blocking fabric (per-chip egress W_dcn / oversubscription), in a
  ring over the S slices: S - 1 steps, each costing at least the DCN latency, (S-1)/S V on the NIC.

A phase's time is ``steps * max(hop latency, link_bytes / steps / W_link)`` (book: a hop costs at
least ~1 us; a transfer is latency-bound when its per-hop bytes < W_one_way * 1 us). The plan records,
per phase, the bytes the busiest link carries each way: this is what the engine replays on shared
links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpusim.errors import TpusimError
from tpusim.sim.topology import DCN, Topology

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_KIND_ALIASES = {"ag": "all-gather", "allgather": "all-gather", "rs": "reduce-scatter",
                 "reducescatter": "reduce-scatter", "ar": "all-reduce", "allreduce": "all-reduce",
                 "a2a": "all-to-all", "alltoall": "all-to-all", "permute": "collective-permute",
                 "ppermute": "collective-permute", "collectivepermute": "collective-permute"}


@dataclass(frozen=True, slots=True)
class Phase:
    """One collective step pattern on one axis (``x``/``y``/``z``, or ``dcn`` across slices).

    ``link_bytes`` is what the busiest link carries in each direction it uses (``directions`` of them
    per chip; DCN phases count the chip's NIC egress). ``steps`` hops are taken one after the other.
    ``op`` says what moves: ``gather``, ``reduce`` (reduce-scatter: the receiver adds), ``all-to-all``
    or ``permute``.
    """

    axis: str
    algorithm: str  # "ring", "line" or "dcn"
    op: str
    group: int
    steps: int
    link_bytes: float
    directions: int
    stride: int = 1  # links one hop crosses (a strided part of an axis); each hop costs stride x latency


@dataclass(frozen=True, slots=True)
class Stage:
    """Phases that run at the same time, on different axes. A stage ends when its slowest phase does."""

    phases: tuple[Phase, ...]


@dataclass(frozen=True, slots=True)
class CollectivePlan:
    """A collective lowered to its link traffic: ``stages`` run one after the other."""

    kind: str
    bytes: float
    axes: tuple[Axis, ...]
    group_size: int
    stages: tuple[Stage, ...]

    def link_bytes_by_axis(self) -> dict[str, float]:
        """Total bytes the busiest link of each axis carries each way, over the whole collective."""
        out: dict[str, float] = {}
        for stage in self.stages:
            for ph in stage.phases:
                out[ph.axis] = out.get(ph.axis, 0.0) + ph.link_bytes
        return out

    @property
    def algorithm(self) -> str:
        """A short human description: ``bidirectional ring on y``, ``line on x + ring on y``, ..."""
        seen: dict[str, str] = {}
        for stage in self.stages:
            for ph in stage.phases:
                seen.setdefault(ph.axis, ph.algorithm)
        names = {"ring": "bidirectional ring", "line": "bidirectional line", "dcn": "DCN"}
        parts = [f"{names[alg]} on {axis}" if axis != DCN else "DCN across slices" for axis, alg in seen.items()]
        prefix = "hierarchical: " if DCN in seen and len(seen) > 1 else ""
        return prefix + (" + ".join(parts) if parts else "nothing to do (group of one)")


def parse_kind(text: str) -> str:
    key = text.strip().lower().replace("_", "-")
    if key in KINDS:
        return key
    key = _KIND_ALIASES.get(key.replace("-", ""), None)
    if key is None:
        raise TpusimError(f"unknown collective {text!r}; use one of {', '.join(KINDS)}", source="KIND")
    return key


def parse_axes(text: str, topo: Topology, *, source: str = "--axes") -> tuple[str, ...]:
    """``"xy"``, ``"z"``, ``"dcn"``, ``"xy,dcn"`` or ``"x+dcn"`` into axis names, checked against ``topo``."""
    axes: list[str] = []
    for token in text.replace("+", ",").replace(" ", ",").split(","):
        token = token.strip().lower()
        if not token:
            continue
        letters = [DCN] if token == DCN else list(token)
        for a in letters:
            if a == DCN:
                if topo.slices < 2:
                    raise TpusimError("axis 'dcn' needs several slices (--slices N, N >= 2)", source=source)
            elif a not in topo.axis_names:
                raise TpusimError(f"{topo.name} has no axis {a!r}; its axes are {', '.join(topo.axis_names)}"
                                  + (" and dcn" if topo.slices > 1 else ""), source=source)
            if a in axes:
                raise TpusimError(f"axis {a!r} is named twice in {text!r}", source=source)
            axes.append(a)
    if not axes:
        raise TpusimError("no axis given (e.g. x, xy, z, dcn, or xy,dcn)", source=source)
    # Physical order (x, y, z, dcn), whatever order the user typed.
    order = list(topo.axis_names) + [DCN]
    return tuple(sorted(axes, key=order.index))


# ---- one phase on one axis -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Span:
    """Part of physical ``axis``: ``size`` chips spaced ``stride`` apart.

    A mesh axis that does not take a whole torus axis gets a span: the inner part of a split axis is a
    contiguous segment (stride 1, a line even if the axis wraps: its ends are not linked), the outer
    part is strided (stride = the inner size) and is a ring only if the whole axis wraps. A strided
    group's hop crosses ``stride`` links, and ``stride`` groups interleave on every link, so each link
    carries ``stride`` times one group's traffic.
    """

    axis: str
    size: int
    stride: int = 1

    def __str__(self) -> str:
        return f"{self.axis}/{self.size}" + (f"@{self.stride}" if self.stride > 1 else "")


Axis = str | Span


@dataclass(frozen=True, slots=True)
class _Geom:
    axis: str  # physical axis (or dcn)
    size: int
    wraps: bool
    stride: int


def _geom(topo: Topology, a: Axis) -> _Geom:
    if isinstance(a, Span):
        full = topo.axis_size(a.axis)
        if a.size == full and a.stride == 1:
            return _Geom(a.axis, full, topo.axis_wraps(a.axis), 1)
        if a.size * a.stride > full or full % (a.size * a.stride):
            raise ValueError(f"span {a} does not fit axis {a.axis} of length {full}")
        ring = a.stride > 1 and a.size * a.stride == full and topo.axis_wraps(a.axis)
        return _Geom(a.axis, a.size, ring, a.stride)
    if a == DCN:
        return _Geom(DCN, topo.slices, False, 1)
    return _Geom(a, topo.axis_size(a), topo.axis_wraps(a), 1)


def _gather_phase(g: _Geom, v: float, op: str) -> Phase:
    """All-gather (or reduce-scatter) on one axis, from V/X to V bytes per device (or back)."""
    x = g.size
    if g.axis == DCN:  # a ring over the slices: x - 1 steps, each paying the DCN latency at least
        return Phase(g.axis, "dcn", op, x, x - 1, (x - 1) / x * v, 1)
    if g.wraps:
        return Phase(g.axis, "ring", op, x, x // 2, (x - 1) / x * v / 2 * g.stride, 2, g.stride)
    return Phase(g.axis, "line", op, x, x - 1, (x - 1) / x * v * g.stride, 2, g.stride)


def _all_to_all_phase(g: _Geom, v_local: float) -> Phase:
    """All-to-all on one axis of a device's ``v_local`` bytes, shortest-path routed both ways."""
    x = g.size
    shard = v_local / x
    if g.axis == DCN:
        return Phase(g.axis, "dcn", "all-to-all", x, 1, (x - 1) * shard, 1)
    if g.wraps:
        # Per link each way: shard * (sum of distances routed that way); the antipode splits in two.
        hops = sum(range(1, (x - 1) // 2 + 1)) + (x / 4 if x % 2 == 0 else 0.0)
        return Phase(g.axis, "ring", "all-to-all", x, x // 2, shard * hops * g.stride, 2, g.stride)
    # A line's busiest link is the middle one: floor(X/2) * ceil(X/2) messages cross it each way.
    return Phase(g.axis, "line", "all-to-all", x, x - 1, shard * (x // 2) * ((x + 1) // 2) * g.stride, 2, g.stride)


def _permute_phase(g: _Geom, v: float, shift: int) -> Phase:
    """Collective-permute: every device sends ``v`` bytes ``shift`` positions along the axis."""
    x = g.size
    if g.axis == DCN:
        return Phase(g.axis, "dcn", "permute", x, 1, v if shift % x else 0.0, 1)
    if g.wraps:
        s = abs(shift) % x
        s = min(s, x - s)  # the short way round
        return Phase(g.axis, "ring", "permute", x, s, s * v * g.stride, 1, g.stride)
    s = min(abs(shift), x - 1)
    return Phase(g.axis, "line", "permute", x, s, s * v * g.stride, 1, g.stride)


# ---- whole collectives -----------------------------------------------------------------------------

def _multi_axis(geoms: list[_Geom], v: float, op: str) -> list[Stage]:
    """All-gather (op='gather') or reduce-scatter (op='reduce') of V over several ICI axes at once.

    The data is split into one part per axis; part k goes over the axes in the order rotated by k,
    so in every stage each axis carries one part (book: T = V / (W n_axes) for equal axes). The last
    stage moves the most data, so part k's share is set inversely to the cost per byte of the axis it
    ends on: equal for equal axes, and a slow line gets less than a ring.
    """
    n = len(geoms)
    total = math.prod(g.size for g in geoms)
    orders = [geoms[k:] + geoms[:k] for k in range(n)]
    # Link bytes per byte of V on each part's last axis (all ICI links run at the same rate).
    inverse_cost = [1.0 / _gather_phase(order[-1], 1.0, op).link_bytes for order in orders]
    shares = [w / sum(inverse_cost) for w in inverse_cost]
    stages = []
    for j in range(n):
        phases = []
        for order, share in zip(orders, shares):
            if op == "gather":  # after stage j this part holds share * V * prod(sizes so far) / N
                v_phase = share * v * math.prod(g.size for g in order[: j + 1]) / total
                phases.append(_gather_phase(order[j], v_phase, op))
            else:  # reduce-scatter runs the same orders backwards, shrinking from share * V
                back = order[::-1]
                v_phase = share * v / math.prod(g.size for g in back[:j])
                phases.append(_gather_phase(back[j], v_phase, op))
        stages.append(Stage(tuple(phases)))
    return stages


def lower(kind: str, nbytes: float, topo: Topology, axes: tuple[Axis, ...], *, shift: int = 1) -> CollectivePlan:
    """Lower ``kind`` over ``axes`` of ``topo`` on ``nbytes`` (the book's V; see the module doc).

    ``axes`` are physical axis names (``"x"``, ``"dcn"``) or :class:`Span` parts of one.
    """
    kind = parse_kind(kind)
    if not (isinstance(nbytes, (int, float)) and math.isfinite(nbytes) and nbytes > 0):
        raise TpusimError(f"a collective of {nbytes!r} bytes: bytes must be a positive number")
    geoms = [_geom(topo, a) for a in axes]
    ici = [g for g in geoms if g.axis != DCN and g.size > 1]
    dcn_list = [g for g in geoms if g.axis == DCN and g.size > 1]
    dcn = dcn_list[0] if dcn_list else None
    n_ici = math.prod(g.size for g in ici)
    group = n_ici * (dcn.size if dcn else 1)
    stages: list[Stage] = []

    if kind == "all-gather":
        if dcn:  # the smallest data crosses DCN: gather the slice peers' shards first
            stages.append(Stage((_gather_phase(dcn, nbytes / n_ici, "gather"),)))
        if ici:
            stages += _multi_axis(ici, nbytes, "gather")
    elif kind == "reduce-scatter":
        if ici:
            stages += _multi_axis(ici, nbytes, "reduce")
        if dcn:
            stages.append(Stage((_gather_phase(dcn, nbytes / n_ici, "reduce"),)))
    elif kind == "all-reduce":
        if ici:
            stages += _multi_axis(ici, nbytes, "reduce")
        if dcn:
            stages.append(Stage((_gather_phase(dcn, nbytes / n_ici, "reduce"),)))
            stages.append(Stage((_gather_phase(dcn, nbytes / n_ici, "gather"),)))
        if ici:
            stages += _multi_axis(ici[::-1], nbytes, "gather")
    elif kind == "all-to-all":
        if ici:
            stages.append(Stage(tuple(_all_to_all_phase(g, nbytes) for g in ici)))
        if dcn:
            stages.append(Stage((_all_to_all_phase(dcn, nbytes),)))
    else:  # collective-permute
        moving = ici + ([dcn] if dcn else [])
        if len(moving) > 1:
            raise TpusimError("a collective-permute shifts along one axis; give one axis", source="--axes")
        if moving:
            stages.append(Stage((_permute_phase(moving[0], nbytes, shift),)))
    return CollectivePlan(kind=kind, bytes=float(nbytes), axes=tuple(axes), group_size=group, stages=tuple(stages))
