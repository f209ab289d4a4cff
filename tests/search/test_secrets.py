"""A password in a PostgreSQL URL never leaves the process: not in any output, stored attribute,
Ray trial config, log file or checkpoint, through a launch that is interrupted, relaunched, has a
failing trial, and is queried."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy
import yaml
from sqlalchemy.engine import make_url

from tests.cli import ragsweep_process
from tests.search.test_faults import RUNNING, launch_process, wait_for_states
from tests.storage import storage_url_for
from tests.tiny import TINY_SPEC

GRID = [1e-3, 1e-4, 1e30]  # 1e30 diverges: a failed trial with its reason


@pytest.fixture
def postgres_url(tmp_path) -> str:
    url = os.environ.get("RAGSWEEP_TEST_POSTGRES_URL")
    if not url or not make_url(url).password:
        pytest.skip("needs RAGSWEEP_TEST_POSTGRES_URL with a password (.ci/run sets one)")
    return storage_url_for("postgresql", tmp_path)


@pytest.fixture
def ray_dir(monkeypatch):
    """Ray's session folder, where its logs go, for the commands this test runs: short, since
    Ray's socket paths must be."""
    folder = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.delenv("RAGSWEEP_STORAGE", raising=False)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _ragsweep(*args: str, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    # Each command in a process of its own: its Ray (in ray_dir) and every file it writes are
    # searched for the password.
    return ragsweep_process(*args, env={"RAGSWEEP_CACHE": str(cache_dir)})


def _database_dump(url: str) -> str:
    """Every row of every table of the database, as text."""
    engine = sqlalchemy.create_engine(url)
    metadata = sqlalchemy.MetaData()
    metadata.reflect(engine)
    rows = []
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            rows += [repr(tuple(row)) for row in connection.execute(table.select())]
    engine.dispose()
    return "\n".join(rows)


def _files_holding(folder: Path, secret: str) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if secret.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:  # sockets, files Ray removed meanwhile
                continue
    return found


@pytest.mark.slow
def test_the_password_appears_nowhere(postgres_url, tmp_path, cache_dir, ray_dir):
    password = str(make_url(postgres_url).password)
    name = f"secret-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "spec.yaml"
    # The password in the spec, as a user may keep it.
    fields = {"name": name, "storage": postgres_url, "methods": ["ft_embed", "ft_gen"]}
    fields["search"] = {"lr_embedder": GRID, "lr_generator": [1e-3]}
    spec.write_text(yaml.safe_dump(TINY_SPEC | fields))
    runs = tmp_path / "runs"
    outputs = []

    # Interrupted (Ctrl-C) with the URL on the command line: the line to repeat is masked.
    driver = launch_process(spec, postgres_url, cache_dir, own_group=True)  # runs: spec's folder
    wait_for_states(driver, postgres_url, f"{name}/ft_embed", {RUNNING})
    os.killpg(driver.pid, signal.SIGINT)
    out, err = driver.communicate(timeout=180)
    assert driver.returncode == 130, err
    assert "***@" in err and "launch" in err
    outputs += [out, err]

    # Relaunched with the URL from the spec only; the diverging trial fails with its reason.
    done = _ragsweep("launch", str(spec), "--runs-dir", str(runs), cache_dir=cache_dir)
    assert done.returncode == 0, done.stderr
    outputs += [done.stdout, done.stderr]

    export = tmp_path / "trials.json"
    queries = [
        ["studies"],
        ["trials", name],
        ["trials", name, "--format", "json"],
        ["best", name, "--format", "json"],
        ["compare", name],
        ["export", name, "-o", str(export)],
        ["trials", "no-such-study"],  # an error names the database
    ]
    results = {}
    for query in queries:
        result = _ragsweep(*query, "--storage", postgres_url, cache_dir=cache_dir)
        results[" ".join(query[:3])] = result
        outputs += [result.stdout, result.stderr]
    trials = json.loads(results[f"trials {name} --format"].stdout)
    assert any("diverged" in (trial["fail_reason"] or "") for trial in trials)
    assert "***@" in results["trials no-such-study"].stderr  # the error names the database

    assert all(password not in text for text in outputs)
    assert password not in export.read_text()
    assert password not in _database_dump(postgres_url)
    assert any(ray_dir.rglob("*.log")), "Ray's logs are not where the test looks"
    assert _files_holding(ray_dir, password) == []  # Ray's session logs and trial configs
    assert _files_holding(runs, password) == []  # checkpoints and trial.json files
