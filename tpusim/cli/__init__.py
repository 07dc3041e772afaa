"""The ``tpusim`` command: a thin layer over the library (each command calls functions a notebook can).

Every command prints a short summary for people, or one JSON object with ``--json``. A mistake in
what the user gave ends with one line on stderr naming the option or file, and exit status 2.

``common`` holds the group and what every command shares; ``run`` (training: topology, collective,
program, run, replay, compare), ``serve`` and ``sweep`` (sweep, search) add their commands to it.
Imports point one way: each command module imports ``common``, never another command module.
"""

from tpusim.cli import run as _run, serve as _serve, sweep as _sweep  # noqa: F401 (they add their commands)
from tpusim.cli.common import INTERNAL_ERROR, dumps, main

_sweep.register(main)

__all__ = ["INTERNAL_ERROR", "dumps", "main"]
