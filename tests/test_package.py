"""Packaging: the data folders travel inside a plain (non-editable) wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_carries_the_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tpusim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("tpusim/_data/topologies/chips.yaml", "tpusim/_data/topologies/calibration.yaml",
                 "tpusim/_data/topologies/collective_measurements.yaml", "tpusim/cli/__init__.py"):
        assert path in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tpusim = tpusim.cli:main" in entry
