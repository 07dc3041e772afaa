"""Slices of TPU chips as tori, joined across slices by the data-centre network (DCN).

A :class:`Topology` is arithmetic first (shape, wraparound, hosts: what the collective model and the
engine need, in O(1)) and a networkx graph on demand (:func:`build_graph`: every chip, ICI link, host,
PCIe link and DCN NIC, for inspection, plots and invariant tests).

>>> t = parse_topology("v5e:8x16")
>>> t.shape, t.wraparound, t.num_chips, t.num_hosts
((8, 16), (False, True), 128, 16)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from tpusim.sim.chips import ChipSpec, get_chip
from tpusim.errors import TpusimError
from tpusim.limits import MAX_CHIPS, MAX_SLICES

if TYPE_CHECKING:
    import networkx as nx

AXIS_NAMES = ("x", "y", "z")
DCN = "dcn"
DEFAULT_CHIP_2D = "v5e"
DEFAULT_CHIP_3D = "v5p"


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """``slices`` identical slices of ``chip``, each a ``shape`` torus (a line where an axis does not wrap).

    ``dcn_oversubscription`` divides each chip's DCN egress when all chips send at once (1: a
    non-blocking data-centre fabric).
    """

    chip: ChipSpec
    shape: tuple[int, ...]
    wraparound: tuple[bool, ...]
    slices: int = 1
    dcn_oversubscription: float = 1.0

    # ---- sizes ---------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        s = f"{self.chip.name}:{'x'.join(map(str, self.shape))}"
        if self.wraparound != self.chip.wraparound_for(self.shape):  # overridden: say so in every report
            s += " (wraparound " + " ".join(f"{a}:{'on' if w else 'off'}"
                                           for a, w in zip(self.axis_names, self.wraparound)) + ")"
        return s if self.slices == 1 else f"{s} x{self.slices} slices"

    @property
    def axis_names(self) -> tuple[str, ...]:
        return AXIS_NAMES[: len(self.shape)]

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.slices

    def axis_index(self, axis: str) -> int:
        return self.axis_names.index(axis)

    def axis_size(self, axis: str) -> int:
        """Chips along ``axis`` (``x``/``y``/``z``), or slices for ``dcn``."""
        return self.slices if axis == DCN else self.shape[self.axis_index(axis)]

    def axis_wraps(self, axis: str) -> bool:
        return self.wraparound[self.axis_index(axis)]

    # ---- hosts ---------------------------------------------------------------------------------------
    @property
    def host_block(self) -> tuple[int, ...]:
        """The block of chips one host drives, oriented to tile this slice with the fewest hosts."""
        return _host_block(self.chip.host_shape, self.shape)

    @property
    def chips_per_host(self) -> int:
        return math.prod(self.host_block)

    @property
    def hosts_per_slice(self) -> int:
        return self.chips_per_slice // self.chips_per_host

    @property
    def num_hosts(self) -> int:
        return self.hosts_per_slice * self.slices

    # ---- links and bandwidth -------------------------------------------------------------------------
    def ici_links_along(self, axis: str) -> int:
        """Physical (bidirectional) ICI links along ``axis`` in one slice.

        Each of the N/X rings (or lines) of length X has X links with wraparound, X - 1 without. A
        wrapped axis of length 2 has two parallel links between the pair (the + and the - link).
        """
        x = self.axis_size(axis)
        if x <= 1:
            return 0
        per_ring = x if self.axis_wraps(axis) else x - 1
        return self.chips_per_slice // x * per_ring

    @property
    def ici_links(self) -> int:
        """Physical ICI links in all slices (each carries ``ici_link_bytes_per_s`` in each direction)."""
        return self.slices * sum(self.ici_links_along(a) for a in self.axis_names)

    def axis_bandwidth_bytes_per_s(self, axis: str) -> float:
        """The book's W_ici for ``axis``: what one chip can send along it, both directions summed.

        An axis without wraparound still has two links per interior chip, but a collective on a line
        only reaches the ring's rate on half of its hops; the collective model accounts for that.
        """
        return self.chip.ici_axis_bytes_per_s if self.axis_size(axis) > 1 else 0.0

    @property
    def bisection_bytes_per_s(self) -> float:
        """One-way bandwidth across the worst cut of one slice into two halves (bytes/s).

        Cutting axis a (length X) crosses N/X rings, each at 2 links if it wraps, else 1. The worst
        cut is across the axis with the fewest crossing links; a slice of one chip has none.
        """
        cuts = []
        for a in self.axis_names:
            x = self.axis_size(a)
            if x > 1:
                cuts.append(self.chips_per_slice // x * (2 if self.axis_wraps(a) else 1))
        return min(cuts) * self.chip.ici_link_bytes_per_s if cuts else 0.0

    @property
    def dcn_bytes_per_s_per_chip(self) -> float:
        """DCN egress one chip gets when every chip sends at once (datasheet / oversubscription)."""
        if self.chip.dcn_bytes_per_s is None:
            return 0.0
        return self.chip.dcn_bytes_per_s / self.dcn_oversubscription

    @property
    def dcn_bytes_per_s_per_slice(self) -> float:
        return self.dcn_bytes_per_s_per_chip * self.chips_per_slice

    # ---- coordinates ---------------------------------------------------------------------------------
    def coords(self, chip_id: int) -> tuple[int, tuple[int, ...]]:
        """(slice, coordinates) of a chip id. Ids are slice-major, then row-major over ``shape``."""
        s, local = divmod(chip_id, self.chips_per_slice)
        return s, tuple(int(c) for c in _unravel(local, self.shape))

    def chip_id(self, slice_index: int, coords: tuple[int, ...]) -> int:
        return slice_index * self.chips_per_slice + _ravel(coords, self.shape)

    def host_of(self, chip_id: int) -> int:
        s, c = self.coords(chip_id)
        block = self.host_block
        grid = tuple(n // b for n, b in zip(self.shape, block))
        return s * self.hosts_per_slice + _ravel(tuple(ci // b for ci, b in zip(c, block)), grid)


def _ravel(coords: tuple[int, ...], shape: tuple[int, ...]) -> int:
    i = 0
    for c, n in zip(coords, shape):
        i = i * n + c
    return i


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        i, c = divmod(i, n)
        out.append(c)
    return tuple(reversed(out))


def _host_block(host_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Orient (permute) the host shape and clip it to the slice, keeping the most chips per host.

    A v5e host is 4x2 chips; a 2x4 slice is one host (the block turned to 2x4), a 2x2 slice is one
    host of 4 chips. Orientations that do not tile the slice evenly are skipped.
    """
    best: tuple[int, ...] | None = None
    for perm in dict.fromkeys(itertools.permutations(host_shape)):
        block = tuple(min(b, n) for b, n in zip(perm, shape))
        if any(n % b for b, n in zip(block, shape)):
            continue
        if best is None or math.prod(block) > math.prod(best):
            best = block
    return best if best is not None else tuple(1 for _ in shape)


# ---- parsing ---------------------------------------------------------------------------------------

_SHAPE_RE = re.compile(r"^\d+(x\d+)*$")


def parse_topology(spec: str, *, default_chip: str | None = None, slices: int = 1,
                   dcn_oversubscription: float = 1.0, source: str = "--topology",
                   slices_source: str = "--slices") -> Topology:
    """A topology from JAX-style ``CHIP:SHAPE`` (``v5e:16x16``, ``v5p:4x4x8``, ``tpu7x:4x4x4``).

    A bare ``SHAPE`` takes ``default_chip`` (e.g. the workload's chip), else v5e for 2D and v5p for 3D.
    Raises :class:`TpusimError` (naming ``source``) for an unknown chip, a shape of the wrong rank,
    larger than the chip's largest slice, or that the hardware does not build.
    """
    text = spec.strip()
    chip_name, _, shape_text = text.rpartition(":")
    shape_text = shape_text.strip().lower()
    if not _SHAPE_RE.match(shape_text):
        raise TpusimError(f"{spec!r} is not CHIP:SHAPE (e.g. v5e:16x16, v5p:4x4x8, or a bare 16x16)",
                          source=source)
    shape = tuple(int(d) for d in shape_text.split("x"))
    if not chip_name:
        chip_name = default_chip or (DEFAULT_CHIP_2D if len(shape) <= 2 else DEFAULT_CHIP_3D)
    try:
        chip = get_chip(chip_name)
    except TpusimError as e:
        raise TpusimError(e.reason, source=source) from None
    return make_topology(chip, shape, slices=slices, dcn_oversubscription=dcn_oversubscription, source=source,
                         slices_source=slices_source)


def make_topology(chip: ChipSpec, shape: tuple[int, ...], *, slices: int = 1, dcn_oversubscription: float = 1.0,
                  wraparound: tuple[bool, ...] | None = None, source: str = "--topology",
                  slices_source: str = "--slices") -> Topology:
    """Validate ``shape`` for ``chip`` and build the topology; ``wraparound`` overrides the chip's rule."""
    shape_str = "x".join(map(str, shape))
    rank = chip.torus_rank
    if len(shape) != rank:
        example = "x".join(["4"] * rank)
        raise TpusimError(f"{chip.name} slices are {rank}D (e.g. {chip.name}:{example}); got {shape_str}",
                          source=source)
    if any(d < 1 for d in shape):
        raise TpusimError(f"every dimension of {shape_str} must be at least 1", source=source)
    max_str = "x".join(map(str, chip.max_slice_shape))
    if math.prod(shape) > chip.max_chips or max(shape) > max(chip.max_slice_shape):
        raise TpusimError(f"{chip.name}:{shape_str} is larger than the largest {chip.name} slice ({max_str}, "
                          f"{chip.max_chips} chips)", source=source)
    if chip.wraparound == "cube" and not (all(d % 4 == 0 for d in shape) or all(d in (1, 2, 4) for d in shape)):
        raise TpusimError(f"{chip.name} slices are either part of one 4x4x4 cube (sides 1, 2 or 4) or whole "
                          f"cubes (every side a multiple of 4); got {shape_str}", source=source)
    if chip.wraparound == "axis16" and any(d & (d - 1) for d in shape):
        raise TpusimError(f"{chip.name} slices have power-of-two sides (1, 2, 4, 8, 16); got {shape_str}",
                          source=source)
    if not isinstance(slices, int) or slices < 1:
        raise TpusimError(f"the number of slices must be a whole number >= 1; got {slices!r}", source=slices_source)
    if slices > MAX_SLICES or slices * math.prod(shape) > MAX_CHIPS:
        raise TpusimError(f"{slices:,} slices of {shape_str} are {slices * math.prod(shape):,} chips; tpusim "
                          f"simulates at most {MAX_SLICES:,} slices and {MAX_CHIPS:,} chips", source=slices_source)
    if slices > 1 and chip.dcn_bytes_per_s is None:
        raise TpusimError(f"no DCN bandwidth is known for {chip.name}, so it cannot be simulated multi-slice",
                          source="--slices")
    if not dcn_oversubscription >= 1.0:
        raise TpusimError(f"DCN oversubscription must be >= 1; got {dcn_oversubscription!r}",
                          source="--dcn-oversubscription")
    if wraparound is None:
        wraparound = chip.wraparound_for(tuple(shape))
    elif len(wraparound) != len(shape):
        raise TpusimError(f"wraparound needs one flag per axis ({len(shape)})", source=source)
    return Topology(chip=chip, shape=tuple(shape), wraparound=tuple(bool(w) for w in wraparound),
                    slices=slices, dcn_oversubscription=float(dcn_oversubscription))


# ---- the graph -------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def build_graph(topo: Topology) -> nx.MultiDiGraph:
    """Every chip, ICI link, host, PCIe link and DCN NIC of ``topo`` as a networkx ``MultiDiGraph``.

    Nodes: chip ids (int) with ``kind='chip'``, ``slice``, ``coords``, ``host``; hosts ``('host', h)``
    with ``kind='host'``, ``slice``; and, for several slices, the fabric node ``'dcn'``.
    Edges (one per direction; parallel edges are kept, as on a wrapped axis of length 2):
    ``kind='ici'`` with ``axis``, ``direction`` (+1/-1), ``bytes_per_s``, ``latency_s``;
    ``kind='pcie'`` chip<->host; ``kind='dcn'`` host<->fabric with the NIC's ``bytes_per_s``.

    Coordinates are built by hand rather than with ``nx.grid_graph``, whose ``dim`` lists axes in
    reverse and which merges the two links of a wrapped axis of length 2 into one.
    """
    import networkx as nx  # here, not at the top: 0.1-0.25 s of start-up that only this function needs

    chip = topo.chip
    g = nx.MultiDiGraph(name=topo.name)
    for cid in range(topo.num_chips):
        s, c = topo.coords(cid)
        g.add_node(cid, kind="chip", slice=s, coords=c, host=topo.host_of(cid))
    for h in range(topo.num_hosts):
        g.add_node(("host", h), kind="host", slice=h // topo.hosts_per_slice)

    ici = dict(kind="ici", bytes_per_s=chip.ici_link_bytes_per_s, latency_s=chip.ici_hop_latency_s)
    edges = []
    for cid in range(topo.num_chips):
        s, c = topo.coords(cid)
        for ai, axis in enumerate(topo.axis_names):
            x = topo.shape[ai]
            if x == 1:
                continue
            for direction in (+1, -1):
                nxt = c[ai] + direction
                if not 0 <= nxt < x:
                    if not topo.wraparound[ai]:
                        continue
                    nxt %= x
                dst = topo.chip_id(s, c[:ai] + (nxt,) + c[ai + 1:])
                edges.append((cid, dst, dict(ici, axis=axis, direction=direction)))
        host = ("host", topo.host_of(cid))
        edges.append((cid, host, dict(kind="pcie", bytes_per_s=chip.pcie_bytes_per_s)))
        edges.append((host, cid, dict(kind="pcie", bytes_per_s=chip.pcie_bytes_per_s)))
    if topo.slices > 1:
        g.add_node(DCN, kind="fabric", oversubscription=topo.dcn_oversubscription)
        nic = dict(kind="dcn", bytes_per_s=chip.dcn_bytes_per_s * topo.chips_per_host,
                   latency_s=chip.dcn_latency_s)
        for h in range(topo.num_hosts):
            edges.append((("host", h), DCN, dict(nic)))
            edges.append((DCN, ("host", h), dict(nic)))
    g.add_edges_from(edges)
    return g


def describe(topo: Topology) -> dict:
    """The facts ``tpusim topology`` prints, as plain JSON-able values (SI units)."""
    return {
        "topology": topo.name,
        "chip": topo.chip.name,
        "shape": list(topo.shape),
        "axes": list(topo.axis_names),
        "wraparound": list(topo.wraparound),
        "slices": topo.slices,
        "chips": topo.num_chips,
        "chips_per_slice": topo.chips_per_slice,
        "hosts": topo.num_hosts,
        "chips_per_host": topo.chips_per_host,
        "host_block": list(topo.host_block),
        "ici_links": topo.ici_links,
        "ici_links_per_axis": {a: topo.ici_links_along(a) * topo.slices for a in topo.axis_names},
        "ici_link_bytes_per_s": topo.chip.ici_link_bytes_per_s,
        "axis_bandwidth_bytes_per_s": {a: topo.axis_bandwidth_bytes_per_s(a) for a in topo.axis_names},
        "bisection_bytes_per_s": topo.bisection_bytes_per_s,
        "dcn_bytes_per_s_per_chip": topo.dcn_bytes_per_s_per_chip if topo.slices > 1 else 0.0,
        "dcn_bytes_per_s_per_slice": topo.dcn_bytes_per_s_per_slice if topo.slices > 1 else 0.0,
        "dcn_oversubscription": topo.dcn_oversubscription,
        "peak_bf16_flops_per_s": topo.chip.bf16_flops_per_s * topo.num_chips,
        "hbm_bytes": topo.chip.hbm_bytes * topo.num_chips,
    }


def replace(topo: Topology, **changes) -> Topology:
    """A copy of ``topo`` with fields changed (e.g. ``wraparound``), revalidated."""
    fields = {f.name: getattr(topo, f.name) for f in dataclasses.fields(topo)}
    fields.update(changes)
    return make_topology(fields["chip"], fields["shape"], slices=fields["slices"],
                         dcn_oversubscription=fields["dcn_oversubscription"], wraparound=fields["wraparound"])
