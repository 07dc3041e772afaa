"""Units: SI inside (bytes, seconds, FLOP/s), human units only at the edges.

Data files give each number as ``{value: 4.5e10, unit: B/s, src: "..."}``; :func:`to_si` converts it
once at load. :func:`fmt_bytes`, :func:`fmt_time` and friends format for people.
"""

from __future__ import annotations

from tpusim.errors import TpusimError

# Multipliers to SI base units. Decimal prefixes unless the unit says "i" (GiB).
_FACTORS: dict[str, float] = {
    # bytes
    "B": 1.0, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
    "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30, "TiB": 2.0**40,
    # bandwidth
    "B/s": 1.0, "MB/s": 1e6, "GB/s": 1e9, "TB/s": 1e12, "Gbit/s": 1e9 / 8,
    # compute
    "FLOP/s": 1.0, "TFLOP/s": 1e12, "PFLOP/s": 1e15, "OP/s": 1.0, "TOP/s": 1e12,
    # time
    "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9,
    # plain numbers
    "": 1.0, "1": 1.0,
}


def to_si(value: float, unit: str, *, source: str | None = None, key: str | None = None) -> float:
    """``value`` in ``unit`` converted to the SI base unit (bytes, seconds, FLOP/s, B/s)."""
    try:
        factor = _FACTORS[unit]
    except KeyError:
        known = ", ".join(k for k in _FACTORS if k not in ("", "1"))
        raise TpusimError(f"unknown unit {unit!r} (known: {known})", source=source, key=key) from None
    # Divide by the reciprocal for sub-unit prefixes, so that 10 us is exactly 1e-05 s.
    return float(value) / round(1.0 / factor) if factor < 1.0 else float(value) * factor


def _fmt(value: float, steps: list[tuple[float, str]], digits: int) -> str:
    for factor, suffix in steps:
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {suffix}"
    factor, suffix = steps[-1]
    return f"{value / factor:.{digits}g} {suffix}"


def fmt_bytes(n: float, digits: int = 3) -> str:
    """Bytes for people, decimal prefixes: ``fmt_bytes(3.4e7) == '34 MB'``."""
    return _fmt(n, [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1.0, "B")], digits)


def fmt_rate(bytes_per_s: float, digits: int = 3) -> str:
    """Bandwidth for people: ``fmt_rate(4.5e10) == '45 GB/s'``."""
    return _fmt(bytes_per_s, [(1e12, "TB/s"), (1e9, "GB/s"), (1e6, "MB/s"), (1.0, "B/s")], digits)


def fmt_time(seconds: float, digits: int = 3) -> str:
    """Durations for people: ``fmt_time(3.77e-4) == '377 us'``."""
    return _fmt(seconds, [(1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")], digits)


def fmt_flops(flops_per_s: float, digits: int = 3) -> str:
    return _fmt(flops_per_s, [(1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1.0, "FLOP/s")], digits)
