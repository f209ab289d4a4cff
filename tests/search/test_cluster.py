"""A study on a Ray cluster of two local nodes (head + worker, started with ``ray start``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import psutil
import pytest

from search.store import open_storage
from tests.search.test_cli import write_spec
from tests.search.test_dispatch import TINY_STUDY

RAY = str(Path(sys.executable).parent / "ray")
PORT = 6391


@pytest.fixture
def two_node_cluster():
    # Ray's socket paths must stay short (a Unix socket path holds ~107 bytes): not under tmp_path.
    ray_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    # Ray 2.60 turns token authentication on for `ray start --head`; every process that joins must
    # then say so (the token is in ~/.ray/auth_token).
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_TMPDIR": ray_dir}
    start = [RAY, "start", "--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run(
        [
            *start,
            "--head",
            "--port",
            str(PORT),
            "--include-dashboard",
            "false",
            "--temp-dir",
            ray_dir,
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        subprocess.run(
            [*start, "--address", f"127.0.0.1:{PORT}"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield f"127.0.0.1:{PORT}"
    finally:
        _stop_cluster(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)


def _stop_cluster(ray_dir: str) -> None:
    """End this cluster's processes only: `ray stop` ends every Ray cluster on the machine,
    a developer's own included. Its daemons name ``ray_dir`` in their command lines; the workers
    (renamed ``ray::...``) are their children."""
    daemons = []
    for process in psutil.process_iter(["cmdline"]):
        if any(ray_dir in part for part in process.info["cmdline"] or ()):
            daemons.append(process)
    family = {process.pid: process for process in daemons}
    for daemon in daemons:
        try:
            family |= {child.pid: child for child in daemon.children(recursive=True)}
        except psutil.Error:
            pass
    for process in family.values():
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(family.values()), timeout=20)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


@pytest.mark.slow
def test_trials_run_on_both_nodes(two_node_cluster, tmp_path, cache_dir):
    spec = write_spec(
        tmp_path,
        TINY_STUDY
        | {"name": "cluster", "methods": ["none", "ft_gen"], "concurrency": 2}
        | {"search": {"lr_embedder": [1e-4], "lr_generator": [1e-4, 3e-4, 1e-3, 3e-3]}},
    )
    storage_url = f"sqlite:///{tmp_path / 'cluster.db'}"
    # Through the CLI, as a user would: Ray reads RAY_AUTH_MODE when it is imported.
    env = os.environ | {"RAGSWEEP_CACHE": str(cache_dir), "RAY_AUTH_MODE": "token"}
    launched = subprocess.run(
        [
            sys.executable,
            "-c",
            "from search.cli import main; main()",
            "launch",
            str(spec),
            "--storage",
            storage_url,
            "--address",
            two_node_cluster,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert launched.returncode == 0, launched.stderr
    assert "ran 5 trials (0 failed)" in launched.stdout
    trials = optuna.load_study(
        study_name="cluster/ft_gen", storage=open_storage(storage_url)
    ).trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["node"] for t in trials}) == 2  # one CPU per node, two at once
