"""TPU chips: datasheet numbers, SI units inside.

:func:`get_chip` returns a frozen :class:`ChipSpec` from ``topologies/chips.yaml``. Each number there
carries its unit and its source; the units are converted here, once. Fitted efficiencies are *not*
part of a chip: see :mod:`tpusim.sim.calibration`.

>>> chip = get_chip("v5e")
>>> chip.ici_link_bytes_per_s, chip.ici_axis_bytes_per_s
(45000000000.0, 90000000000.0)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from tpusim.config import build, read_yaml, unknown_key_reason
from tpusim.data import data_dir
from tpusim.errors import TpusimError
from tpusim.units import to_si

Wraparound = Literal["cube", "axis16", "always"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChipSpec:
    """One TPU generation's datasheet numbers. All SI: FLOP/s, bytes, bytes/s, seconds.

    ``ici_link_bytes_per_s`` is one direction of one link; the book's ``W_ici`` (bidirectional, per
    axis) is :attr:`ici_axis_bytes_per_s`.
    """

    name: str
    display_name: str
    torus_rank: int
    bf16_flops_per_s: float
    int8_flops_per_s: float
    hbm_bytes: float
    hbm_bytes_per_s: float
    vmem_bytes: float | None
    ici_link_bytes_per_s: float
    ici_links_per_chip: int
    ici_hop_latency_s: float
    dcn_bytes_per_s: float | None  # egress per chip into the data-centre network; None: not known
    dcn_latency_s: float | None
    pcie_bytes_per_s: float
    cores_per_chip: int
    megacore: bool
    mxu_dim: int
    mxus_per_core: int
    vpu_flops_per_s: float  # the vector units of all cores (elementwise, reductions, casts)
    host_shape: tuple[int, ...]
    max_slice_shape: tuple[int, ...]
    wraparound: Wraparound
    fp8_flops_per_s: float | None = None  # the MXU's fp8 rate; None: the chip has no fp8 MXU mode
    sources: dict[str, str] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def ici_axis_bytes_per_s(self) -> float:
        """The book's W_ici: both directions of one torus axis, 2 x the one-way link rate."""
        return 2.0 * self.ici_link_bytes_per_s

    @property
    def chips_per_host(self) -> int:
        return math.prod(self.host_shape)

    @property
    def max_chips(self) -> int:
        return math.prod(self.max_slice_shape)

    @property
    def devices_per_chip(self) -> int:
        """JAX devices per chip: 1 for megacore and single-core chips, else one per core."""
        return 1 if self.megacore else self.cores_per_chip

    def wraparound_for(self, shape: tuple[int, ...]) -> tuple[bool, ...]:
        """Which axes of a ``shape`` slice have wraparound links (book tpus.md).

        ``cube`` (v4/v5p/TPU7x): only slices made of whole 4x4x4 cubes (every side a multiple of 4)
        get wraparound, from the optical switches, on every axis; sub-cube slices (2x2x1, 2x2x2, 2x2x4)
        have none. ``axis16`` (v5e/v6e): only an axis of length 16 wraps. ``always``: every axis longer
        than 2.
        """
        if self.wraparound == "cube":
            whole_cubes = all(d % 4 == 0 for d in shape)
            return tuple(whole_cubes and d > 1 for d in shape)
        if self.wraparound == "axis16":
            return tuple(d == 16 for d in shape)
        # "always" (v2/v3): every axis of 3 or more chips. A 2-long axis's two neighbours are the same
        # chip, joined by one link pair (a doubled link would have made the v2 2x2's measured
        # collectives twice as fast as they are; docs/VALIDATION.md).
        return tuple(d > 2 for d in shape)


# ---- the file's schema: numbers with unit and source; converted to ChipSpec by _to_spec ------------

@dataclass(frozen=True, slots=True, kw_only=True)
class _Quantity:
    value: float
    unit: str = ""
    src: str
    note: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _ChipEntry:
    display_name: str
    torus_rank: int
    bf16_flops_per_s: _Quantity
    int8_flops_per_s: _Quantity
    fp8_flops_per_s: _Quantity | None = None
    hbm_capacity: _Quantity
    hbm_bandwidth: _Quantity
    vmem_capacity: _Quantity | None = None
    ici_link_bandwidth: _Quantity
    ici_links_per_chip: _Quantity
    ici_hop_latency: _Quantity
    dcn_bandwidth_per_chip: _Quantity | None = None
    dcn_latency: _Quantity | None = None
    pcie_bandwidth: _Quantity
    cores_per_chip: _Quantity
    megacore: bool
    mxu_dim: _Quantity
    mxus_per_core: _Quantity
    vpu_flops_per_s: _Quantity
    host_shape: tuple[int, ...]
    host_shape_src: str
    max_slice_shape: tuple[int, ...]
    max_slice_src: str
    wraparound: Wraparound


def _to_spec(name: str, e: _ChipEntry, source: str) -> ChipSpec:
    def si(field: str) -> float | None:
        q: _Quantity | None = getattr(e, field)
        return None if q is None else to_si(q.value, q.unit, source=source, key=f"{name}.{field}.unit")

    sources = {f.name: getattr(e, f.name).src for f in dataclasses.fields(e)
               if isinstance(getattr(e, f.name), _Quantity)}
    sources["host_shape"] = e.host_shape_src
    sources["max_slice_shape"] = e.max_slice_src
    for shape_key in ("host_shape", "max_slice_shape"):
        if len(getattr(e, shape_key)) != e.torus_rank:
            raise TpusimError(f"has {len(getattr(e, shape_key))} dimensions but torus_rank is {e.torus_rank}",
                              source=source, key=f"{name}.{shape_key}")
    return ChipSpec(
        name=name,
        display_name=e.display_name,
        torus_rank=e.torus_rank,
        bf16_flops_per_s=si("bf16_flops_per_s"),
        int8_flops_per_s=si("int8_flops_per_s"),
        fp8_flops_per_s=si("fp8_flops_per_s"),
        hbm_bytes=si("hbm_capacity"),
        hbm_bytes_per_s=si("hbm_bandwidth"),
        vmem_bytes=si("vmem_capacity"),
        ici_link_bytes_per_s=si("ici_link_bandwidth"),
        ici_links_per_chip=int(e.ici_links_per_chip.value),
        ici_hop_latency_s=si("ici_hop_latency"),
        dcn_bytes_per_s=si("dcn_bandwidth_per_chip"),
        dcn_latency_s=si("dcn_latency"),
        pcie_bytes_per_s=si("pcie_bandwidth"),
        cores_per_chip=int(e.cores_per_chip.value),
        megacore=e.megacore,
        mxu_dim=int(e.mxu_dim.value),
        mxus_per_core=int(e.mxus_per_core.value),
        vpu_flops_per_s=si("vpu_flops_per_s"),
        host_shape=e.host_shape,
        max_slice_shape=e.max_slice_shape,
        wraparound=e.wraparound,
        sources=sources,
    )


def load_chips(path: str | Path | None = None) -> dict[str, ChipSpec]:
    """All chips of a catalog file (default: the project's ``topologies/chips.yaml``)."""
    path = Path(path) if path is not None else data_dir("topologies") / "chips.yaml"
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not raw:
        raise TpusimError("expected a mapping of chip names to specs", source=str(path))
    return {name: _to_spec(name, build(_ChipEntry, entry, source=str(path), prefix=name), str(path))
            for name, entry in raw.items()}


@cache
def _catalog() -> dict[str, ChipSpec]:
    return load_chips()


def chip_names() -> list[str]:
    return list(_catalog())


# JAX and Cloud names that mean the same chip.
_ALIASES = {"v4p": "v4", "v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e", "v6": "v6e",
            "ironwood": "tpu7x", "v7": "tpu7x", "tpuv7": "tpu7x", "v7x": "tpu7x",
            # XLA's device_type_string, as profiles report it
            "tpu v2": "v2", "tpu v3": "v3", "tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e",
            "tpu v5": "v5p", "tpu v5p": "v5p", "tpu v6 lite": "v6e", "tpu v6e": "v6e"}


def get_chip(name: str) -> ChipSpec:
    """The chip called ``name`` (``v5e``, ``v5p``, ``tpu7x``, ...; case-insensitive, common aliases)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    catalog = _catalog()
    if key not in catalog:
        reason = unknown_key_reason(name, catalog).replace("unknown key", f"unknown chip {name!r}")
        raise TpusimError(f"{reason}; known chips: {', '.join(catalog)}")
    return catalog[key]
