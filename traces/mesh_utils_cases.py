"""Where jax's mesh_utils puts MaxText's mesh axes on a TPU torus, the truth tpusim's automatic
placement (tpusim/model/mesh.py) is checked against (tests/test_topology.py).

    /work/venvs/jax/bin/python traces/mesh_utils_cases.py   # writes tests/data/mesh_utils_assignments.json

Runs ``jax._src.mesh_utils._create_device_mesh_for_nd_torus`` (what ``create_device_mesh`` calls for
a TPU slice beyond the few small trays it special-cases) on each physical torus shape with MaxText's
mesh in its ``mesh_axes`` order (data, stage, fsdp, context, tensor, expert; size-1 axes dropped: they
take no torus axis) and records which torus axes (x, y, z) each mesh axis got, or which part of one where no whole axes
fit (``allow_split_physical_axes=True``, MaxText's ``allow_split_physical_axes: true``; ``split`` marks
those cases). Needs jax (any platform: no devices are used).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "mesh_utils_assignments.json"
ORDER = ("data", "pipeline", "fsdp", "sequence", "tensor", "expert")  # MaxText's mesh_axes, tpusim's names
SHAPES = [(2, 2, 1), (2, 4, 1), (4, 4, 1), (8, 8, 1), (16, 16, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4),
          (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8), (8, 8, 16), (8, 16, 16)]


def _parts(devices, i: int, shape: tuple[int, ...]) -> list[str]:
    """Where mesh axis ``i``'s first group lies: per torus axis it spans, "x" (all of it) or "x:SIZE/STRIDE"
    (SIZE chips STRIDE apart)."""
    import numpy as np

    group = np.moveaxis(devices, i, 0)[(slice(None),) + (0,) * (devices.ndim - 1)]
    coords = np.array([np.unravel_index(int(d), shape) for d in group])
    out = []
    for p, n in enumerate(shape):
        values = sorted(set(coords[:, p].tolist()))
        if len(values) < 2:
            continue
        stride = values[1] - values[0]
        out.append("xyz"[p] if len(values) == n else f"{'xyz'[p]}:{len(values)}/{stride}")
    return out


def main() -> None:
    import numpy as np
    from jax._src import mesh_utils
    from jax import __version__

    cases = []
    for shape in SHAPES:
        chips = int(np.prod(shape))
        powers = [2 ** i for i in range(int(np.log2(chips)) + 1)]
        for sizes in itertools.product(powers, repeat=3):  # fsdp, tensor, expert; data the rest
            f, t, e = sizes
            if chips % (f * t * e):
                continue
            mesh = {"data": chips // (f * t * e), "fsdp": f, "tensor": t, "expert": e}
            names = [a for a in ORDER if mesh.get(a, 1) > 1]
            split = False
            try:
                devices, _ = mesh_utils._create_device_mesh_for_nd_torus(
                    np.arange(chips).reshape(shape), [mesh[a] for a in names])
            except NotImplementedError:  # MaxText's allow_split_physical_axes: true
                split = True
                devices, _ = mesh_utils._create_device_mesh_for_nd_torus(
                    np.arange(chips).reshape(shape), [mesh[a] for a in names], allow_split_physical_axes=True)
            axes = {a: _parts(devices, i, shape) for i, a in enumerate(names)}
            cases.append({"torus": "x".join(map(str, shape)), "mesh": {a: mesh[a] for a in names}, "axes": axes,
                          "split": split})
    head = json.dumps({"jax": __version__, "source": "jax._src.mesh_utils._create_device_mesh_for_nd_torus"})
    lines = ",\n".join(json.dumps(c) for c in cases)
    OUT.write_text(head[:-1] + ', "cases": [\n' + lines + "\n]}\n")
    print(f"{len(cases)} cases -> {OUT}")


if __name__ == "__main__":
    main()
