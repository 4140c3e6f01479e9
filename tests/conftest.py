"""Shared fixtures: the real clips in ../shared/data and small helpers to pick them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SERVAL_TEST_DATA", REPO.parent / "shared" / "data"))


def clips(corpus: str, pattern: str = "**/*.flac", n: int | None = None) -> list[Path]:
    """Sorted clips of one corpus under ../shared/data (deterministic subset when n is given)."""
    found = sorted((DATA / corpus).glob(pattern))
    if not found:
        pytest.skip(f"no {corpus} clips under {DATA}")
    if n is not None:
        step = max(1, len(found) // n)
        found = found[::step][:n]
    return found


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def ravdess_clips() -> list[Path]:
    return clips("ravdess", n=8)


@pytest.fixture(scope="session")
def emodb_clips() -> list[Path]:
    return clips("emodb", n=4)


@pytest.fixture(scope="session")
def ased_clips() -> list[Path]:
    return clips("ased", n=4)
