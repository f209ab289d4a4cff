"""Shared fixtures: one model/index cache per test run (RAGSWEEP_CACHE reuses one across runs).

The suite runs on every core with pytest-xdist (``-n`` in pyproject.toml; ``-n0`` runs it in one
process). Tests that share a module-scoped fixture carry an ``xdist_group`` mark, so that the
fixture is built once, on one worker. Each worker has its own schema in the PostgreSQL database
(tests/storage.py), so the PostgreSQL tests spread over the workers as the SQLite ones do.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_finish(session: pytest.Session) -> None:
    # On a worker, xdist has appended "@<group>" to each grouped test's id by now; a pytest whose
    # ids ignore that (pytest-xdist issue #1386) would spread each group over the workers.
    if not getattr(session.config.option, "loadgroup", False):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid:
            raise pytest.UsageError(
                f"--dist loadgroup did not group {item.nodeid} (pytest-xdist issue #1386 with "
                "pytest 9.2): install the dev extra's pytest, or run with -n0"
            )


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("RAGSWEEP_CACHE")
    if configured:
        return Path(configured)
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return tmp_path_factory.mktemp("ragsweep-cache")
    # Each xdist worker has its own base folder inside the run's; the folder above it is the
    # run's, so the workers share one cache, as one process would. No lock is needed: trainers
    # write a built model to a temporary folder and rename it, and document vectors to a
    # temporary file and replace, so two workers building the same entry both get a whole one.
    folder = tmp_path_factory.getbasetemp().parent / "ragsweep-cache"
    folder.mkdir(exist_ok=True)
    return folder
