"""Where the data folders (`topologies/`, `workloads/`) are, for a checkout and for an installed wheel.

The repository keeps them at its top level; the wheel carries copies at ``tpusim/_data/`` (see
``[tool.hatch.build.targets.wheel.force-include]`` in pyproject.toml). An editable install or a plain
checkout uses the repository's folders directly.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The folder ``name`` (``"topologies"`` or ``"workloads"``) of the installed or checked-out project."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"tpusim data folder {name!r} not found next to {_PACKAGE}")  # a broken install
