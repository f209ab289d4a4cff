"""The study databases tests run against: a SQLite file, or the PostgreSQL server .ci/run starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The xdist group of every test on the PostgreSQL database: one worker runs them one after another,
# as one process would, since some compare whole listings of the database before and after, which a
# launch on another worker would change in between (tests/conftest.py adds it to each test run on
# PostgreSQL).
POSTGRESQL_GROUP = "postgresql"


def storage_url_for(backend: str, folder: Path) -> str:
    """A SQLite URL in ``folder``, or the PostgreSQL URL (the test skips when none is set)."""
    if backend == "sqlite":
        return f"sqlite:///{folder / 'studies.db'}"
    url = os.environ.get("RAGSWEEP_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("RAGSWEEP_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    return url
