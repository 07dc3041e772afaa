"""Logical mesh axes (data, fsdp, sequence, tensor, expert, pipeline; DCN data/fsdp/pipeline) onto the slice's torus axes.

:func:`resolve_mesh` fills in ``-1`` ("the rest"), checks that the mesh matches the chips, and places
each mesh axis on physical axes: as the workload says (``physical_axes: {tensor: x, fsdp: yz}``), or
automatically as MaxText's mesh is built (``jax.experimental.mesh_utils.create_device_mesh``, jax
0.10.2 ``_create_device_mesh_for_nd_torus``): mesh axes from the most network-intensive, in the
reverse of MaxText's ``mesh_axes`` order (expert, tensor, context = sequence, fsdp, stage = pipeline,
data), each on whole torus axes whose sizes multiply to its size, preferring more torus axes (more
links) and, among as many, the first in x, y, z order. Where no whole axes fit (MaxText then needs
``allow_split_physical_axes: true``), on a part of an axis: the inner contiguous segment (a line)
goes to the hungrier axis, the strided rest to the next.
"""

from __future__ import annotations

import itertools
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

    for mesh_axis in PRIORITY:
        size = ici[mesh_axis]
        if size == 1 or mesh_axis in physical:
            continue
        placement = _place(size, remaining, taken)
        if placement is None:
            free = ", ".join(f"{a}: {remaining[a] // taken[a]} of {remaining[a]}" for a in remaining
                             if taken[a] < remaining[a])
            raise TpusimError(f"cannot place ici_{mesh_axis}_parallelism={size} on what is left of {topo.name} "
                              f"({free or 'nothing'}); choose sizes that divide the torus axes",
                              source=source, key=f"ici_{mesh_axis}_parallelism")
        physical[mesh_axis] = placement
    return Mesh(ici=ici, dcn=dcn, physical=physical)


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


def _place(size: int, remaining: dict[str, int], taken: dict[str, int]) -> tuple[Axis, ...] | None:
    """Whole untouched axes whose product is ``size`` (the most axes, then the first in x, y, z order, as
    mesh_utils does), else whole axes plus one carved part."""
    whole = [a for a in remaining if taken[a] == 1]
    for r in range(len(whole), 0, -1):
        for combo in itertools.combinations(whole, r):
            if math.prod(remaining[a] for a in combo) == size:
                for a in combo:
                    taken[a] = remaining[a]
                return combo
    # Whole axes (largest product first) plus a part of one more axis.
    options = []
    for r in range(0, len(whole) + 1):
        for combo in itertools.combinations(whole, r):
            w = math.prod(remaining[a] for a in combo)
            if size % w:
                continue
            q = size // w
            for a in remaining:
                if a in combo:
                    continue
                left = remaining[a] // taken[a]
                if q > 1 and left % q == 0:
                    options.append((w, a, q, combo))
    if not options:
        return None
    w, a, q, combo = max(options, key=lambda o: (o[0], -len(o[3])))
    part = Span(a, q, taken[a])
    taken[a] *= q
    for c in combo:
        taken[c] = remaining[c]
    return tuple(combo) + (part,)


def mesh_axis_names() -> tuple[str, ...]:
    return MESH_AXES + tuple(f"dcn_{a}" for a in DCN_AXES)
