"""Shared fixtures: one model/index cache per test session (RAGSWEEP_CACHE reuses one across runs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("RAGSWEEP_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("ragsweep-cache")
