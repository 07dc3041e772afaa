"""Extract every collective from XLA's optimized HLO text: a thin entry point over
``tpusim.compiler.hlo.collectives`` and ``parse`` (standard library only), so the capture scripts and the simulator read HLO the
same way.  ``python3 traces/hlo_collectives.py optimized_hlo.txt[.gz] [--json]``."""

from __future__ import annotations

import sys
from pathlib import Path

# The capture scripts run in their own jax venv, where tpusim may not be installed: import it from
# the checkout this script lives in.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tpusim.compiler.hlo.collectives import counts_table, extract_collectives, main  # noqa: E402

__all__ = ["counts_table", "extract_collectives"]

if __name__ == "__main__":
    main()
