"""The ``tpusim`` command: a thin layer over the library (each command calls functions a notebook can).

Every command prints a short summary for people, or one JSON object with ``--json``. A mistake in
what the user gave ends with one line on stderr naming the option or file, and exit status 2.

``common`` holds the group and what every command shares; ``describe`` (topology, collective, program),
``run``, ``replay`` (replay, compare), ``serve`` and ``sweep`` (sweep, search) add their commands to it.
Imports point one way: each command module imports ``common``, never another command module.
"""

# (each adds its commands to the group)
from tpusim.cli import describe as _describe, replay as _replay, run as _run, serve as _serve  # noqa: F401
from tpusim.cli import sweep as _sweep
from tpusim.cli.common import INTERNAL_ERROR, dumps, main

_sweep.register(main)

__all__ = ["INTERNAL_ERROR", "dumps", "main"]
