"""Shared fixtures: paths to the reference material kept in the project (tests/data, traces/real).

The tests never read ../shared: a fresh clone must pass them on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
REAL_TRACES = REPO / "traces" / "real"


@pytest.fixture(scope="session")
def book_cases() -> dict[str, dict]:
    """The book's worked cases (tests/data/book-cases.yaml), by id."""
    path = DATA / "book-cases.yaml"
    return {case["id"]: case for case in yaml.safe_load(path.read_text())}


def value(case: dict, section: str, key: str) -> float:
    """A number from a book case (YAML may hold it as a string like '4.5e10')."""
    return float(case[section][key]["value"])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many generated inputs the fuzz tests (tests/test_fuzz.py) drove through the CLI."""
    counts, ok = getattr(config, "tpusim_fuzz_counts", ({}, {}))
    if counts:
        detail = ", ".join(f"{k} {v} ({ok.get(k, 0)} ok)" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"fuzz: {sum(counts.values()):,} generated inputs through the CLI ({detail})")
