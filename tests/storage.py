"""The study databases tests run against: a SQLite file, or the PostgreSQL server .ci/run starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def storage_url_for(backend: str, folder: Path) -> str:
    """A SQLite URL in ``folder``, or the PostgreSQL URL (the test skips when none is set)."""
    if backend == "sqlite":
        return f"sqlite:///{folder / 'studies.db'}"
    url = os.environ.get("RAGSWEEP_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("RAGSWEEP_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    return url
