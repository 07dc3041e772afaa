"""Logical mesh axes (data, fsdp, sequence, tensor, expert, pipeline; DCN data/fsdp/pipeline) onto the slice's torus axes.

:func:`resolve_mesh` fills in ``-1`` ("the rest"), checks that the mesh matches the chips, and places
each mesh axis on physical axes: as the workload says (``physical_axes: {tensor: x, fsdp: yz}``), or
automatically as MaxText's mesh is built (``jax.experimental.mesh_utils.create_device_mesh``, jax
0.10.2 ``_create_device_mesh_for_nd_torus``): mesh axes from the most network-intensive, in the
reverse of MaxText's ``mesh_axes`` order (expert, tensor, context = sequence, fsdp, stage = pipeline,
data), each on whole torus axes whose sizes multiply to its size, preferring more torus axes (more
links) and, among as many, the first in x, y, z order. Where some mesh axis fits no whole axes (MaxText
then needs ``allow_split_physical_axes: true``), every axis is placed as mesh_utils' splitting
algorithm does: prime factor by prime factor on parts of torus axes (whole axes preferred), a torus
axis split among mesh axes with the more network-intensive one inner (a contiguous segment, a line)
and the others strided (``Span``).
"""

from __future__ import annotations

import itertools
from collections import Counter
import math
from dataclasses import dataclass, field

from tpusim.sim.collectives.lowering import Axis, Span
from tpusim.errors import TpusimError
from tpusim.sim.topology import DCN, Topology
from tpusim.model.spec import DCN_AXES, MESH_AXES, Parallelism

# The order jax's mesh_utils assigns MaxText's mesh axes to the torus: the reverse of base.yml's
# mesh_axes (data, stage, fsdp, ..., context, ..., tensor, ..., expert), most network-intensive first.
PRIORITY = ("expert", "tensor", "sequence", "fsdp", "pipeline", "data")


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesh:
    ici: dict[str, int]
    dcn: dict[str, int]
    physical: dict[str, tuple[Axis, ...]]  # ICI mesh axis -> its part of the torus
    split: bool = False  # some mesh axis takes part of a torus axis (MaxText: allow_split_physical_axes)
    # size() and axes_of() by their arguments: the compiler asks the same few questions ~10,000 times
    # per 80-layer program (15% of compiling it). Not part of the mesh's value.
    _memo: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def size(self, *axes: str) -> int:
        """Devices along the named axes (``fsdp``, ``tensor``, ... or ``dcn_data``, ``dcn_fsdp``)."""
        key = ("size", axes)
        if key not in self._memo:
            self._memo[key] = math.prod(self.dcn[a[4:]] if a.startswith("dcn_") else self.ici[a] for a in axes)
        return self._memo[key]

    def axes_of(self, *axes: str) -> tuple[Axis, ...]:
        """Physical axes (spans merged where they join up) that the named mesh axes run over."""
        key = ("axes_of", axes)
        if key not in self._memo:
            self._memo[key] = self._axes_of(axes)
        return self._memo[key]

    def _axes_of(self, axes: tuple[str, ...]) -> tuple[Axis, ...]:
        spans: list[Span] = []
        out: list[Axis] = []
        for a in axes:
            if a.startswith("dcn_"):
                if self.dcn[a[4:]] > 1:
                    out.append(DCN)
                continue
            for p in self.physical.get(a, ()):
                spans.append(p if isinstance(p, Span) else Span(p, -1))
        merged = _merge(spans)
        return tuple(merged) + tuple(out)

    def describe(self) -> dict:
        return {"ici": dict(self.ici), "dcn": dict(self.dcn),
                "physical": {a: [str(p) for p in ps] for a, ps in self.physical.items()}}


def _merge(spans: list[Span]) -> list[Axis]:
    """Join parts of one torus axis: (size a, stride t) + (size b, stride a t) -> (size a b, stride t)."""
    by_axis: dict[str, list[Span]] = {}
    for s in spans:
        by_axis.setdefault(s.axis, []).append(s)
    out: list[Axis] = []
    for axis in sorted(by_axis):
        parts = by_axis[axis]
        if any(p.size == -1 for p in parts):  # a whole axis
            out.append(axis)
            continue
        parts.sort(key=lambda p: p.stride)
        cur = parts[0]
        for p in parts[1:]:
            if p.stride == cur.stride * cur.size:
                cur = Span(axis, cur.size * p.size, cur.stride)
            else:
                out.append(cur)
                cur = p
        out.append(cur)
    return out


def resolve_mesh(par: Parallelism, topo: Topology, *, source: str = "workload") -> Mesh:
    """Sizes of every mesh axis for ``topo`` and their physical placement, or a TpusimError saying why not."""
    ici = _fill(par.ici, topo.chips_per_slice, f"a {topo.chip.name}:{'x'.join(map(str, topo.shape))} slice",
                "ici", source)
    dcn = _fill(par.dcn, topo.slices, f"{topo.slices} slice{'s' if topo.slices > 1 else ''}", "dcn", source)
    if sum(1 for v in dcn.values() if v > 1) > 1:
        raise TpusimError("only one of dcn_data_parallelism, dcn_fsdp_parallelism and dcn_pipeline_parallelism "
                          "may exceed 1", source=source, key="dcn_*_parallelism")
    remaining = {a: topo.axis_size(a) for a in topo.axis_names if topo.axis_size(a) > 1}
    taken: dict[str, int] = {a: 1 for a in remaining}  # product of parts already carved from each axis
    physical: dict[str, tuple[Axis, ...]] = {}

    if par.physical_axes:
        for mesh_axis, letters in par.physical_axes.items():
            letters = tuple(dict.fromkeys(letters))
            for a in letters:
                if a not in topo.axis_names:
                    raise TpusimError(f"{topo.name} has no axis {a!r}", source=source, key=f"physical_axes.{mesh_axis}")
                if a not in remaining or taken[a] > 1:
                    raise TpusimError(f"axis {a!r} is already used", source=source, key=f"physical_axes.{mesh_axis}")
            prod = math.prod(topo.axis_size(a) for a in letters)
            if prod != ici[mesh_axis]:
                raise TpusimError(f"axes {''.join(letters)} hold {prod} chips but ici_{mesh_axis}_parallelism is "
                                  f"{ici[mesh_axis]}", source=source, key=f"physical_axes.{mesh_axis}")
            physical[mesh_axis] = letters
            for a in letters:
                taken[a] = remaining[a]

    free = [a for a in remaining if taken[a] == 1]  # whole torus axes no explicit placement took
    auto = [a for a in reversed(PRIORITY) if ici[a] > 1 and a not in physical]  # MaxText's mesh order
    shape = [remaining[a] for a in free]
    assignment = _whole_axes(shape, [ici[a] for a in auto])
    split = assignment is None  # MaxText needs allow_split_physical_axes: true here
    if split:
        assignment = _split_axes(shape, [ici[a] for a in auto])
    if assignment is None:
        sizes = ", ".join(f"ici_{a}_parallelism={ici[a]}" for a in auto)
        left = " x ".join(str(n) for n in shape) or "nothing"
        raise TpusimError(f"cannot place {sizes} on what is left of {topo.name} ({left}); choose sizes whose prime "
                          "factors the torus axes hold", source=source, key=f"ici_{auto[-1]}_parallelism")
    for j, mesh_axis in enumerate(auto):
        parts: list[Axis] = []
        for i, a in enumerate(free):
            n = assignment[i][j]
            if n > 1:
                stride = math.prod(assignment[i][j + 1:])  # later (more intensive) mesh axes are inner
                parts.append(a if n == remaining[a] else Span(a, n, stride))
        physical[mesh_axis] = tuple(parts)
    return Mesh(ici=ici, dcn=dcn, physical=physical, split=split)


def _fill(sizes: dict[str, int], total: int, what: str, prefix: str, source: str) -> dict[str, int]:
    sizes = dict(sizes)
    known = math.prod(v for v in sizes.values() if v != -1)
    rest = [a for a, v in sizes.items() if v == -1]
    if rest:
        if total % known:
            unit = "slices" if prefix == "dcn" else "chips"
            named = [a for a, v in sizes.items() if v not in (1, -1)]
            set_ = ", ".join(f"{prefix}_{a}_parallelism={sizes[a]}" for a in named)
            whole = (f"the {total} slice{'s' * (total > 1)} (more slices: --slices or the workload's slices)"
                     if prefix == "dcn" else f"the {total} {unit} of {what}")
            product = f" multiply to {known}" if len(named) > 1 else ""
            raise TpusimError(f"{set_}{product} does not divide {whole}", source=source,
                              key=f"{prefix}_{(named or rest)[0]}_parallelism")
        sizes[rest[0]] = total // known
    product = math.prod(sizes.values())
    if product != total:
        mesh = " x ".join(f"{a}={v}" for a, v in sizes.items() if v > 1) or "1"
        unit = "slices" if prefix == "dcn" else "chips"
        raise TpusimError(f"the {prefix} mesh {mesh} has {product} devices but {what} has {total} {unit}",
                          source=source, key=f"{prefix}_*_parallelism")
    return sizes


def _whole_axes(shape: list[int], sizes: list[int]) -> list[list[int]] | None:
    """mesh_utils' ``_create_device_mesh_for_nd_torus``: each mesh axis (``sizes`` in MaxText's order, least
    network-intensive first), from the last, on whole torus axes whose sizes multiply to its size, the most
    axes first, then the first combination in x, y, z order. The assignment matrix [torus axis][mesh
    axis] -> size, or None when a mesh axis fits no whole axes."""
    out = [[1] * len(sizes) for _ in shape]
    left = list(shape)
    for j in reversed(range(len(sizes))):
        for r in range(len(shape), 0, -1):
            combo = next((c for c in itertools.combinations(range(len(shape)), r)
                          if math.prod(left[i] for i in c) == sizes[j]), None)
            if combo is not None:
                for i in combo:
                    out[i][j], left[i] = shape[i], 0
                break
        else:
            return None
    return out


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def _split_axes(shape: list[int], sizes: list[int]) -> list[list[int]] | None:
    """mesh_utils' ``_create_device_mesh_for_nd_torus_splitting_axes`` (MaxText's
    ``allow_split_physical_axes: true``): each mesh axis, from the last, on a part of the torus axes (its
    prime factors spread over axes with room for them), preferring whole axes (by their product, then
    their count), then axes no earlier mesh axis took, then the larger part on the earlier axis."""
    out = [[1] * len(sizes) for _ in shape]
    for j in reversed(range(len(sizes))):
        used = [math.prod(row) for row in out]
        room = [n // u for n, u in zip(shape, used)]
        need = Counter(_prime_factors(sizes[j]))
        by_factor = {f: [i for i, n in enumerate(room) for g in _prime_factors(n) if g == f] for f in need}
        choices = [set(itertools.combinations(by_factor[f], k)) for f, k in need.items()]
        best: tuple | None = None
        for pick in itertools.product(*choices):
            cand = [1] * len(shape)
            for f, axes in zip(need, pick):
                for i in axes:
                    cand[i] *= f
            whole = [i for i, n in enumerate(cand) if n == shape[i] and n > 1]
            key = (math.prod(cand[i] for i in whole), len(whole),
                   math.prod(n for i, n in enumerate(cand) if used[i] > 1), tuple(cand))
            if best is None or key > best[0]:
                best = (key, cand)
        if best is None:
            return None
        for i, n in enumerate(best[1]):
            out[i][j] = n
    return out


def mesh_axis_names() -> tuple[str, ...]:
    return MESH_AXES + tuple(f"dcn_{a}" for a in DCN_AXES)
