"""Shared fixtures: paths to the reference material in ../shared (read there, never copied)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def book_cases() -> dict[str, dict]:
    """The book's worked cases (../shared/reference/book-cases.yaml), by id."""
    path = SHARED / "reference" / "book-cases.yaml"
    if not path.exists():
        pytest.fail(f"{path} is missing: tests read the book's cases from ../shared (see README)")
    return {case["id"]: case for case in yaml.safe_load(path.read_text())}


def value(case: dict, section: str, key: str) -> float:
    """A number from a book case (YAML may hold it as a string like '4.5e10')."""
    return float(case[section][key]["value"])
