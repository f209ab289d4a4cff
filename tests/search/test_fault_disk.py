"""Checkpoint writes that fail for real, mid-launch: the stage's checkpoint folder made read-only
for one trial (an error the trial does not expect: it fails, for good), and the runs folder, a
small tmpfs, filled up (the disk is full: the trials fail, and run again on a relaunch once there
is space)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from search.launch.dispatch import StageEvent, launch
from search.spec import load_spec
from search.store import open_storage
from tests.search.test_faults import (
    FAIL,
    GRID,
    OK,
    completed_rates,
    launch_process,
    unique,
    write_spec,
)
from trainers.encode import write_vectors
from trainers.errors import DataError

# ft_embed's checkpoints are kept (independent loads the best one); ft_gen's too.
REUSED = {
    "methods": ["ft_embed", "ft_gen", "independent"],
    "search": {"lr_embedder": GRID, "lr_generator": [1e-3]},
}


@pytest.fixture(autouse=True)
def _as_the_cli_runs_tune(monkeypatch):
    # What `ragsweep launch` sets before Tune starts: no per-trial result files of Tune's own.
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {done.stderr.strip()}")


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True, check=True)


def _require_mounts(tmp_path: Path) -> None:
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe))
    except OSError as e:
        pytest.skip(f"this test mounts a file system, which is not permitted here ({e})")
    _unmount(probe)


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``folder`` while the block runs."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    try:
        yield folder
    finally:
        _unmount(folder)


def stage_trials(storage_url: str, name: str, stage: str) -> list:
    import optuna

    study = optuna.load_study(study_name=f"{name}/{stage}", storage=open_storage(storage_url))
    return study.get_trials(deepcopy=True)


def completed(storage_url: str, name: str) -> dict[tuple[str, int], tuple]:
    return {
        (stage, t.number): (t.params, t.values, t.datetime_complete)
        for stage in REUSED["methods"]
        for t in stage_trials(storage_url, name, stage)
        if t.state == OK
    }


class OnEmbedTrialEnd:
    """The progress sink of a launch: runs ``actions[n]`` as the n-th ft_embed trial ends (in
    the driver, before the next trial is handed out; the launch runs one trial at a time)."""

    def __init__(self, *actions) -> None:
        self.actions, self.ended = list(actions), 0

    def __call__(self, event: StageEvent) -> None:
        if event.kind == "trial_end" and event.stage.name == "ft_embed":
            if self.ended < len(self.actions):
                self.actions[self.ended]()
            self.ended += 1


@pytest.mark.slow
def test_a_trial_that_raises_is_failed_with_its_reason_and_the_study_goes_on(tmp_path, cache_dir):
    _require_mounts(tmp_path)
    name = unique("raises")
    spec = load_spec(write_spec(tmp_path, name, **REUSED))
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    runs = tmp_path / "runs"
    checkpoints = runs / name / "ft_embed"  # where ft_embed's trials save their models
    checkpoints.mkdir(parents=True)

    # After the first trial, the folder turns read-only (a bind mount of itself, remounted ro:
    # root writes through permissions, not through that); after the second, writable again.
    def read_only() -> None:
        _mount("--bind", str(checkpoints), str(checkpoints))
        _mount("-o", "remount,bind,ro", str(checkpoints))

    try:
        summary = launch(
            spec,
            storage_url=storage_url,
            runs_dir=runs,
            cache_dir=cache_dir,
            on_event=OnEmbedTrialEnd(read_only, lambda: _unmount(checkpoints)),
            max_retries=0,
        )
    finally:
        subprocess.run(["umount", str(checkpoints)], capture_output=True)  # if still mounted

    ft_embed = stage_trials(storage_url, name, "ft_embed")
    assert [t.state for t in ft_embed] == [OK, FAIL, OK]
    reason = ft_embed[1].user_attrs["fail_reason"]
    # The exception's type and first line, as one line.
    assert reason.startswith("OSError: [Errno 30] Read-only file system: "), reason
    assert "\n" not in reason and str(checkpoints) in reason
    assert ft_embed[1].user_attrs["retryable"] is False  # it would fail the same way
    # The study went on: the next point, then the stages built on ft_embed's best.
    assert summary.failed == {"ft_embed": 1, "ft_gen": 0, "independent": 0}
    assert not summary.blocked
    for stage in ("ft_gen", "independent"):
        assert [t.state for t in stage_trials(storage_url, name, stage)] == [OK]
    before = completed(storage_url, name)

    # A relaunch does not repeat the failure: nothing is left to run.
    relaunch = launch_process(write_spec(tmp_path, name, **REUSED), storage_url, cache_dir)
    out, err = relaunch.communicate(timeout=300)
    assert relaunch.returncode == 0, err
    assert "ran 0 trials" in out
    assert [t.state for t in stage_trials(storage_url, name, "ft_embed")] == [OK, FAIL, OK]
    assert completed(storage_url, name) == before


@pytest.mark.slow
def test_a_full_runs_folder_fails_the_checkpointing_trials_as_retryable_and_a_relaunch_reruns_them(
    tmp_path, cache_dir
):
    _require_mounts(tmp_path)
    name = unique("disk-full")
    spec_path = write_spec(tmp_path, name, **REUSED)
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    runs = tmp_path / "runs"  # what launch_process passes as --runs-dir
    ballast = runs / "ballast"

    def fill() -> None:  # leave less than one embedder checkpoint (about 0.7 MB)
        free = os.statvfs(runs).f_bavail * os.statvfs(runs).f_frsize
        with open(ballast, "wb") as f:
            f.write(b"\0" * max(0, free - 64 * 1024))

    with tmpfs(runs, "64m"):
        summary = launch(
            load_spec(spec_path),
            storage_url=storage_url,
            runs_dir=runs,
            cache_dir=cache_dir,
            on_event=OnEmbedTrialEnd(fill),
            max_retries=0,
        )
        # Every trial that saved models after the disk filled (ft_gen's runs after ft_embed's).
        ft_embed = stage_trials(storage_url, name, "ft_embed")
        ft_gen = stage_trials(storage_url, name, "ft_gen")
        assert [t.state for t in ft_embed + ft_gen] == [OK, FAIL, FAIL, FAIL]
        for trial in [*ft_embed[1:], *ft_gen]:
            reason = trial.user_attrs["fail_reason"]
            assert reason.startswith("no space left on device ("), reason
            assert reason.endswith(f"; free space in {runs} and relaunch"), reason
            assert trial.user_attrs["retryable"] is True
        assert summary.failed == {"ft_embed": 2, "ft_gen": 1}
        # independent builds on ft_embed's best, which is not known until its grid has run.
        assert "2 trial(s) stopped before they finished" in summary.blocked["independent"]
        # A failed trial's half-written checkpoint is gone; the best one is kept.
        kept = [path.name for path in (runs / name / "ft_embed").iterdir()]
        assert len(kept) == 1, kept
        before = completed(storage_url, name)

        ballast.unlink()
        relaunch = launch_process(spec_path, storage_url, cache_dir)
        out, err = relaunch.communicate(timeout=300)
    assert relaunch.returncode == 0, err
    # The three stopped points, then independent, which waited for them.
    assert "ran 4 trials (0 failed)" in out, out
    assert completed_rates(stage_trials(storage_url, name, "ft_embed")) == sorted(GRID)
    for stage in ("ft_gen", "independent"):
        assert [t.state for t in stage_trials(storage_url, name, stage)][-1] == OK
    assert {key: v for key, v in completed(storage_url, name).items() if key in before} == before


def test_a_full_cache_is_one_line_before_anything_is_written(tmp_path):
    """The model and index cache on a disk too small for it: the launch stops while it prepares,
    with one line, a partial file removed and no database made."""
    _require_mounts(tmp_path)
    spec = write_spec(tmp_path, unique("cache-full"))
    database = tmp_path / "db" / "studies.db"
    with tmpfs(tmp_path / "cache", "64k") as cache:
        driver = launch_process(spec, f"sqlite:///{database}", cache)
        out, err = driver.communicate(timeout=300)
        leftovers = [path.name for path in cache.rglob("*.tmp")]
    lines = [line for line in err.splitlines() if line.strip()]
    assert driver.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), err
    assert "free space there or point RAGSWEEP_CACHE at a larger disk" in lines[0]
    assert out.strip() == "" and leftovers == [] and not database.parent.exists()


def test_document_vectors_that_do_not_fit_the_cache_leave_no_partial_file(tmp_path):
    _require_mounts(tmp_path)
    doc_vectors = np.zeros((1000, 384), dtype=np.float32)  # 1.5 MB
    with tmpfs(tmp_path / "cache", "64k") as cache:
        with pytest.raises(DataError, match="cannot write the index cache .*free space there"):
            write_vectors(cache / "index" / "vectors.npy", len(doc_vectors), [doc_vectors])
        assert list((cache / "index").iterdir()) == []
