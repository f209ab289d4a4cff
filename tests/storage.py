"""The study databases tests run against: a SQLite file, or the PostgreSQL server .ci/run starts."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url


def storage_url_for(backend: str, folder: Path) -> str:
    """A SQLite URL in ``folder``, or the PostgreSQL URL (the test skips when none is set)."""
    if backend == "sqlite":
        return f"sqlite:///{folder / 'studies.db'}"
    url = os.environ.get("RAGSWEEP_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("RAGSWEEP_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    return _worker_schema_url(url)


@functools.cache
def _worker_schema_url(url: str) -> str:
    """``url`` with this test process's own schema first on its search path (created if need be).

    Each pytest-xdist worker writes its own set of Optuna tables, so tests that compare whole
    listings of the database before and after see no other worker's launches, and the PostgreSQL
    tests spread over the workers as the SQLite ones do.
    """
    schema = f"ragsweep_test_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    engine.dispose()
    parsed = make_url(url)
    return parsed.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )
