"""The study database going away under a running launch, for real: a private PostgreSQL server
stopped while a trial runs and started again (within the launch's wait, and past it), stopped at
the worst moments of an ask and a tell, and a SQLite file locked by another writer while a trial
ends."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import datetime

import optuna
import pytest
from sqlalchemy import event

from search.launch._optuna_search import OUTCOME_KEY, DatabaseWait, stage_search, unreachable
from search.plan import make_plan
from search.spec import load_spec
from search.store import TrialOutcome, open_stage_study, open_storage
from tests.postgres_server import PostgresServer
from tests.search.test_faults import (
    FAIL,
    FAULT_SPEC,
    GRID,
    OK,
    RUNNING,
    completed_rates,
    launch_process,
    stage_trials,
    unique,
    wait_for_states,
    write_spec,
)


@pytest.fixture
def postgres():
    """A PostgreSQL server of this test's own, which it may stop and start."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()


class Lines(threading.Thread):
    """Collects what a process writes to one of its pipes, line by line, as it writes it."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self._stream, self._lines = stream, []
        self._changed = threading.Condition()
        self.start()

    def run(self) -> None:
        for line in self._stream:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout_s: float) -> str:
        """The first line holding ``text``, once written."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = [line for line in self._lines if text in line]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                assert left > 0, f"no line with {text!r} in {timeout_s} s:\n{self.text()}"
                self._changed.wait(min(left, 1.0))

    def text(self) -> str:
        self.join(timeout=0.1 if self.is_alive() else None)
        return "".join(self._lines)


# Trials of a few seconds: one is still running when the test stops the database.
SLOWER = {"training": FAULT_SPEC["training"] | {"epochs": 40}}


def completed(storage_url: str, name: str) -> dict[int, tuple]:
    """The completed trials by number: what no fault may lose or change."""
    return {
        t.number: (t.params, t.values, t.datetime_complete)
        for t in stage_trials(storage_url, name)
        if t.state == OK
    }


@pytest.mark.slow
def test_a_trial_that_ends_while_the_database_is_down_is_stored_once_it_is_back(
    tmp_path, cache_dir, postgres
):
    name = unique("db-down")
    spec = write_spec(tmp_path, name, **SLOWER)
    driver = launch_process(spec, postgres.url, cache_dir, "--max-retries", "0")
    out, err = Lines(driver.stdout), Lines(driver.stderr)
    wait_for_states(driver, postgres.url, f"{name}/ft_embed", {OK, RUNNING})
    before = completed(postgres.url, name)

    postgres.stop()
    # The running trial ends while the server is down: storing its result waits, once said.
    down = out.wait_for("database unreachable", timeout_s=120)
    assert "waits up to 4 min" in down, down
    time.sleep(3)
    postgres.start()
    assert driver.wait(timeout=300) == 0, err.text()

    output = out.text()
    assert output.count("database unreachable") == 1 and "database back after" in output, output
    assert "Traceback" not in err.text(), err.text()
    trials = stage_trials(postgres.url, name)
    # Every point once, all complete: nothing lost, nothing failed, nothing repeated.
    assert [t.state for t in trials] == [OK] * len(GRID)
    assert completed_rates(trials) == sorted(GRID)
    after = completed(postgres.url, name)
    assert {n: v for n, v in after.items() if n in before} == before

    relaunch = launch_process(spec, postgres.url, cache_dir)
    relaunch_out, relaunch_err = relaunch.communicate(timeout=300)
    assert relaunch.returncode == 0, relaunch_err
    assert f"{len(GRID)} already complete" in relaunch_out
    assert completed(postgres.url, name) == after


@pytest.mark.slow
def test_a_database_lost_past_the_wait_stops_the_launch_and_a_relaunch_finishes_the_study(
    tmp_path, cache_dir, postgres
):
    name = unique("db-lost")
    spec = write_spec(tmp_path, name, **SLOWER)
    # The launch waits minutes for its database; this one, seconds.
    shorter_wait = (
        "from search.launch._scheduler import StagedSearch\nStagedSearch.database_wait_s = 5"
    )
    driver = launch_process(
        spec, postgres.url, cache_dir, "--max-retries", "0", prelude=shorter_wait
    )
    out, err = Lines(driver.stdout), Lines(driver.stderr)
    wait_for_states(driver, postgres.url, f"{name}/ft_embed", {OK, RUNNING})
    before = completed(postgres.url, name)

    postgres.stop()
    assert driver.wait(timeout=180) == 2, out.text() + err.text()
    errors = err.text()
    assert f"error: lost the database {postgres.url} (unreachable for 5 s" in " ".join(
        errors.split()
    ), errors
    assert "relaunch when it is back" in errors and "Traceback" not in errors, errors
    assert out.text().count("database unreachable") == 1

    postgres.start()
    left_running = [t.number for t in stage_trials(postgres.url, name) if t.state == RUNNING]
    assert left_running  # the trial whose result could not be stored
    assert completed(postgres.url, name) == before  # nothing completed was lost

    relaunch = launch_process(spec, postgres.url, cache_dir)
    relaunch_out, relaunch_err = relaunch.communicate(timeout=300)
    assert relaunch.returncode == 0, relaunch_err
    assert f"{len(left_running)} left running by a stopped launch" in relaunch_out
    trials = stage_trials(postgres.url, name)
    assert completed_rates(trials) == sorted(GRID)  # every point, each once
    assert {n: v for n, v in completed(postgres.url, name).items() if n in before} == before
    for number in left_running:
        assert trials[number].state == FAIL and trials[number].user_attrs["retryable"] is True


# Holds SQLite's exclusive lock on the file (no other connection reads or writes it) for the given
# seconds; says when it has the lock and, just before it lets go, the time.
_LOCK_HOLDER = """
import sqlite3, sys, time
from datetime import datetime
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
print(datetime.now().isoformat(), flush=True)
db.execute("COMMIT")
"""


@pytest.mark.slow
def test_a_trial_that_ends_while_another_writer_locks_the_sqlite_file_is_stored_after(
    tmp_path, cache_dir
):
    name = unique("db-locked")
    spec = write_spec(tmp_path, name, **SLOWER)
    database = tmp_path / "studies.db"
    storage_url = f"sqlite:///{database}"
    driver = launch_process(spec, storage_url, cache_dir, "--max-retries", "0")
    out, err = Lines(driver.stdout), Lines(driver.stderr)
    wait_for_states(driver, storage_url, f"{name}/ft_embed", {OK, RUNNING})
    before = completed(storage_url, name)
    running = next(t.number for t in stage_trials(storage_url, name) if t.state == RUNNING)

    # Longer than a tiny trial (a few seconds), shorter than SQLite's busy timeout (60 s): the
    # trial ends while the file is locked, and the launch waits for the lock to store it.
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(database), "20"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    released = datetime.fromisoformat(holder.stdout.readline().strip())
    assert holder.wait(timeout=60) == 0
    assert driver.wait(timeout=300) == 0, err.text()

    trials = stage_trials(storage_url, name)
    assert [t.state for t in trials] == [OK] * len(GRID) and completed_rates(trials) == sorted(GRID)
    assert trials[running].datetime_complete >= released  # stored once the lock was let go
    assert {n: v for n, v in completed(storage_url, name).items() if n in before} == before
    assert "database unreachable" not in out.text()  # waited within the busy timeout
    assert "Traceback" not in err.text(), err.text()


def test_a_database_that_cannot_be_reached_is_told_apart_from_other_storage_errors(postgres):
    storage = open_storage(postgres.url)
    study = optuna.create_study(storage=storage, study_name=unique("told-apart"))
    postgres.stop()
    with pytest.raises(Exception) as down:
        study.set_user_attr("x", 1)
    assert unreachable(down.value)
    postgres.start()
    study.set_user_attr("x", 1)  # the pool's dead connections are replaced (pool_pre_ping)
    with pytest.raises(KeyError) as missing:
        optuna.load_study(study_name=unique("no-such-study"), storage=storage)
    assert not unreachable(missing.value)


def stop_after_commit_of(state: str, storage, postgres: PostgresServer) -> list[float]:
    """Stop ``postgres`` right after the first commit that sets a trial to ``state``, and start
    it again 2 s later; the list gets the time it was stopped."""
    setting, stopped = [], []

    @event.listens_for(storage.engine, "before_cursor_execute")
    def _see_it(connection, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE trials SET state") and state in str(parameters):
            setting.append(statement)

    @event.listens_for(storage.scoped_session.session_factory, "after_commit")
    def _stop_the_server(session):
        if setting and not stopped:
            stopped.append(time.monotonic())
            postgres.stop()
            threading.Timer(2.0, postgres.start).start()

    return stopped


def _stage_search(tmp_path, postgres: PostgresServer, prefix: str):
    spec = load_spec(write_spec(tmp_path, unique(prefix)))
    storage = open_storage(postgres.url)
    study = open_stage_study(storage, spec, "ft_embed")
    points = [{"lr_embedder": rate} for rate in GRID]
    search = stage_search(make_plan(spec).stage("ft_embed"), spec, storage, study, points, {})
    return storage, study, points, search


def test_an_ask_cut_short_by_the_database_going_down_takes_its_point_again(tmp_path, postgres):
    # Optuna's ask first marks the next queued point's trial RUNNING (committed), then reads it
    # back: the server stops right between the two.
    storage, study, points, search = _stage_search(tmp_path, postgres, "ask-cut")
    stopped = stop_after_commit_of("RUNNING", storage, postgres)
    outages = []
    wait = DatabaseWait(postgres.url, 60.0, lambda error, s: outages.append(error))
    first = wait(lambda: search.suggest("tune-1"))
    second = wait(lambda: search.suggest("tune-2"))

    assert stopped and len(outages) == 2 and outages[1] is None  # down, then back
    assert [first, second] == points[:2]  # the first point was not skipped
    running = study.get_trials(deepcopy=False, states=(RUNNING,))
    assert sorted(t.params["lr_embedder"] for t in running) == GRID[:2]
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == points[2:]


def test_a_tell_whose_answer_the_database_going_down_cut_off_is_stored_once(tmp_path, postgres):
    # The trial's end is committed, then the server stops before Optuna reads it back: the tell
    # raises although it was stored, and the launch tells it again once the server is back.
    storage, study, points, search = _stage_search(tmp_path, postgres, "tell-cut")
    wait = DatabaseWait(postgres.url, 60.0, lambda error, s: None)
    wait(lambda: search.suggest("tune-1"))
    stopped = stop_after_commit_of("COMPLETE", storage, postgres)
    result = {OUTCOME_KEY: TrialOutcome(metrics={"f1": 0.5}, method="ft_embed").to_json()}
    assert wait(lambda: search.complete_trial("tune-1", result=result)) == [0.5]

    assert stopped
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == len(points)  # no copy of the trial was added
    assert (trials[0].state, trials[0].values) == (OK, [0.5])
    assert trials[0].user_attrs["metrics"] == {"f1": 0.5}
