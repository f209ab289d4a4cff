"""Faults injected for real: a SIGKILLed trial worker, a trial worker killed by Ray's memory
monitor, a SIGKILLed driver and a relaunch, two launches writing one database at once, and launches
on other hosts that stopped heartbeating."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import psutil
import pytest
import ray
import yaml

from search.launch._lease import (
    LAUNCH_ATTR,
    LaunchOwner,
    check_not_running,
    claim_studies,
    fail_abandoned_trials,
)
from search.launch._trainable import _resume
from search.launch.dispatch import StageEvent, launch
from search.spec import load_spec
from search.store import finished_params, open_storage
from tests.storage import storage_url_for
from tests.tiny import TINY_DATA, TINY_SPEC, tiny_config
from trainers.data import load_data
from trainers.errors import ConfigError

GiB = 2**30
GRID = [1e-4, 1e-3, 3e-3]
FAULT_SPEC = TINY_SPEC | {"methods": ["ft_embed"], "search": {"lr_embedder": GRID}}
OK, FAIL, RUNNING = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.FAIL,
    optuna.trial.TrialState.RUNNING,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path) -> str:
    return storage_url_for(request.param, tmp_path)


def unique(prefix: str) -> str:
    """A study name no earlier run used (the PostgreSQL test database outlives test runs)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_spec(tmp_path: Path, name: str, **changes) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(FAULT_SPEC | {"name": name} | changes))
    return path


def launch_process(
    spec: Path,
    storage_url: str,
    cache_dir: Path,
    *args: str,
    own_group: bool = False,
    prelude: str = "",
) -> subprocess.Popen:
    """``ragsweep launch`` in a subprocess; ``own_group``: in its own process group, as a
    terminal runs a command (Ctrl-C signals the whole group); ``prelude``: Python run first."""
    env = os.environ | {"RAGSWEEP_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    # As a terminal starts it: Ctrl-C neither blocked nor ignored, whatever this worker process
    # inherited or was left with by libraries earlier tests loaded.
    terminal = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
    terminal += "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
    program = f"{terminal}{prelude}\nfrom search.cli import main; main()"
    command = [sys.executable, "-c", program, "launch", str(spec)]
    command += ["--storage", storage_url, "--runs-dir", str(spec.parent / "runs"), *args]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=own_group,
    )


def wait_for_states(
    driver: subprocess.Popen, storage_url: str, study_name: str, wanted: set
) -> None:
    """Poll the database until ``study_name`` has a trial in each of the ``wanted`` states."""
    storage = open_storage(storage_url)
    deadline = time.monotonic() + 300
    while True:
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, f"{study_name} never had trials {wanted}"
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
            states = {t.state for t in study.get_trials(deepcopy=False)}
        except KeyError:
            states = set()
        if wanted <= states:
            return
        time.sleep(0.1)


def stage_trials(storage_url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=f"{name}/ft_embed", storage=open_storage(storage_url))
    return study.get_trials(deepcopy=True)


def completed_rates(trials: list[optuna.trial.FrozenTrial]) -> list[float]:
    return sorted(t.params["lr_embedder"] for t in trials if t.state == OK)


def kill_tree_leftovers(processes: list[psutil.Process], wait_s: float = 20.0) -> None:
    """Ray's processes follow a dead driver within seconds; end any straggler by its pid."""
    _, alive = psutil.wait_procs(processes, timeout=wait_s)
    for process in alive:
        process.kill()


def training_workers() -> list[psutil.Process]:
    """This test process's Ray workers that are inside a trial (the trainable's train())."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "ImplicitFunc.train" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class WorkerKiller(threading.Thread):
    """SIGKILLs the first Ray worker of this test process that is running a trial."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.killed: int | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set() and self.killed is None:
            for process in training_workers():
                time.sleep(0.3)  # well into the trial: models loading or training
                os.kill(process.pid, signal.SIGKILL)
                self.killed = process.pid
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self._done.set()
        self.join()


def start_ray_with_memory_monitor(headroom: int) -> int:
    """Start the local Ray a launch starts, its memory monitor set to kill once the node uses
    ``headroom`` bytes more than now; the threshold in bytes. Ray's monitor counts what psutil
    calls "used" (measured here: they agree within a few MB)."""
    ray.shutdown()  # the shared one (tests/search/conftest.py): this test sets up its own
    memory = psutil.virtual_memory()
    threshold = memory.used + headroom
    if threshold > 0.9 * memory.total:
        pytest.skip(f"the node has less than {headroom / GiB:.0f} GiB free to fill")
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        _node_ip_address="127.0.0.1",
        _system_config={
            "memory_usage_threshold": threshold / memory.total,
            # Looks far enough apart that a killed worker has exited (its memory freed) before
            # the next look; at 100 ms Ray sometimes killed the second worker too.
            "memory_monitor_refresh_ms": 300,
            # Ray kills newest workers first until the excess and a buffer (5% of the node's
            # memory, 1.2 GiB on 24 GiB) are freed: two tiny-model workers of 0.4 GiB, where one
            # real trial's worker (GiBs) suffices. Without the buffer it kills one here too.
            "max_kill_memory_buffer_bytes": 0,
        },
    )
    return threshold


def _until_one_dies(workers: list[psutil.Process], seconds: float) -> None:
    """Wait ``seconds``, or less if a worker dies. Looked at often: the ballast must go before
    Ray's monitor looks again (every 300 ms), or memory other processes took meanwhile (the
    other test workers) keeps the node past the threshold and the second trial is killed too."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(alive(worker) for worker in workers):
        time.sleep(0.02)


class MemoryFiller(threading.Thread):
    """Once two trials train at once, grows this process's memory past Ray's threshold, step by
    step, until the memory monitor kills a trial worker, then frees it: a node running low."""

    def __init__(self, threshold: int) -> None:
        super().__init__(daemon=True)
        self.threshold = threshold
        self.training: list[int] = []  # the two workers' pids
        self.killed: list[int] = []  # those the memory monitor killed
        self.filled = 0
        self.outlived = False  # both trials ended before the monitor killed either
        self._done = threading.Event()

    def run(self) -> None:
        workers = training_workers()
        while len(workers) < 2:
            if self._done.wait(0.05):
                return
            workers = training_workers()
        time.sleep(1.0)  # both well into their trials
        self.training = [worker.pid for worker in workers]
        ballast = []
        while not self._done.is_set() and self._both_train(workers):
            left = self.threshold - psutil.virtual_memory().used
            if left < -GiB:
                break  # far past the threshold and nobody killed: the test says so
            # Big steps while far below; near it, small ones, slower than the monitor looks
            # (every 300 ms), so the excess stays below what one worker frees (0.4 GiB). Few
            # small ones: the fill must end well inside the two trials, on a fast host too.
            step = 256 * 2**20 if left > 512 * 2**20 else 64 * 2**20
            chunk = bytearray(step)
            chunk[::4096] = b"\x01" * (step // 4096)  # touched: resident, as a trial's tensors
            ballast.append(chunk)
            self.filled += step
            if step < 256 * 2**20:
                _until_one_dies(workers, 0.4)
        ballast.clear()  # at once: see _until_one_dies
        # Also stops when a worker left its trial: a kill after that would hit a later trial,
        # not one of two training at once, which is what the test is about.
        time.sleep(0.3)  # a worker the monitor just killed has exited
        self.outlived = all(alive(w) for w in workers) and not self._both_train(workers)
        time.sleep(1.2)  # a second kill would have come within the monitor's next looks
        self.killed = [worker.pid for worker in workers if not alive(worker)]

    def stop(self) -> None:
        self._done.set()
        self.join()

    @staticmethod
    def _both_train(workers: list[psutil.Process]) -> bool:
        """Both workers alive and still inside the trials they were training."""
        training = {process.pid for process in training_workers()}
        return all(alive(worker) and worker.pid in training for worker in workers)


@pytest.mark.slow
def test_a_killed_worker_is_failed_as_retryable_and_its_point_reruns(tmp_path, cache_dir):
    # independent builds on ft_embed's best, so it waits until ft_embed's grid has run whole.
    spec = load_spec(
        write_spec(
            tmp_path,
            "worker-kill",
            methods=["ft_embed", "ft_gen", "independent"],
            search={"lr_embedder": GRID, "lr_generator": [1e-3]},
        )
    )
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    killer = WorkerKiller()
    killer.start()
    summary = launch(
        spec,
        storage_url=storage_url,
        runs_dir=tmp_path / "runs",
        cache_dir=cache_dir,
        max_retries=0,
    )
    killer.stop()
    assert killer.killed is not None, "no trial worker was found to kill"
    trials = stage_trials(storage_url, spec.name)
    failed = [t for t in trials if t.state == FAIL]
    assert len(failed) == 1 and summary.failed == {"ft_embed": 1, "ft_gen": 0}
    assert "worker died" in failed[0].user_attrs["fail_reason"]
    assert failed[0].user_attrs["retryable"] is True
    assert len(completed_rates(trials)) == len(GRID) - 1  # the study went on
    assert "1 trial(s) stopped before they finished" in summary.blocked["independent"]

    before = {t.number: (t.values, t.datetime_complete) for t in trials if t.state == OK}
    summary = launch(spec, storage_url=storage_url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)
    assert summary.ran == {"ft_embed": 1, "independent": 1}  # the killed point, then what waited
    assert not summary.blocked
    trials = stage_trials(storage_url, spec.name)
    assert completed_rates(trials) == sorted(GRID)
    assert {n: (trials[n].values, trials[n].datetime_complete) for n in before} == before


@pytest.mark.slow
def test_a_killed_worker_is_retried_by_ray_within_max_retries(tmp_path, cache_dir):
    spec = load_spec(write_spec(tmp_path, "worker-retry", search={"lr_embedder": GRID[:2]}))
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    killer = WorkerKiller()
    killer.start()
    summary = launch(
        spec,
        storage_url=storage_url,
        runs_dir=tmp_path / "runs",
        cache_dir=cache_dir,
        max_retries=1,
    )
    killer.stop()
    assert killer.killed is not None, "no trial worker was found to kill"
    trials = stage_trials(storage_url, spec.name)
    # The launch re-ran the killed trial under the same Optuna trial: no failure, no duplicate.
    assert [t.state for t in trials] == [OK, OK] and summary.failed == {"ft_embed": 0}
    assert completed_rates(trials) == sorted(GRID[:2])


@pytest.mark.slow
@pytest.mark.alone  # the node's memory is its signal: another test's growth kills both trials
def test_a_trial_killed_by_rays_memory_monitor_reruns_and_the_one_beside_it_finishes(
    tmp_path, cache_dir
):
    # Ray reports a memory kill as OutOfMemoryError, not as the actor death a SIGKILL is: only
    # its real memory monitor shows what Tune does with it. Trials of about 20 s here, so that
    # both still train while memory fills.
    training = FAULT_SPEC["training"] | {"epochs": 200}
    spec = load_spec(write_spec(tmp_path, "memory-kill", concurrency=2, training=training))
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    filler = MemoryFiller(start_ray_with_memory_monitor(headroom=4 * GiB))
    filler.start()
    try:
        summary = launch(
            spec, storage_url=storage_url, runs_dir=tmp_path / "runs", cache_dir=cache_dir
        )
    finally:
        filler.stop()
        ray.shutdown()  # also when launch stopped before it shut Ray down
    assert len(filler.training) == 2, "two trials never trained at once"
    assert not filler.outlived, (
        f"both trials finished before memory reached Ray's threshold "
        f"({filler.filled / GiB:.2f} GiB filled): the trials are too short for this host"
    )
    assert len(filler.killed) == 1, (
        f"Ray's memory monitor killed {len(filler.killed)} of the 2 trial workers "
        f"({filler.filled / GiB:.2f} GiB filled)"
    )
    trials = stage_trials(storage_url, spec.name)
    # The trial beside the killed one finished, and the killed one ran again (the default
    # max_retries) under its own Optuna trial: no failure, no duplicate.
    outcomes = [(t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert [t.state for t in trials] == [OK, OK, OK], outcomes
    assert summary.failed == {"ft_embed": 0} and completed_rates(trials) == sorted(GRID)
    # From the kill on, one trial at a time: the third point was handed out only after the
    # killed trial's re-run and the trial beside it had both finished.
    times = [(t.datetime_start, t.datetime_complete) for t in trials]
    assert trials[2].datetime_start >= max(t.datetime_complete for t in trials[:2]), times


@pytest.mark.parametrize(
    ("max_retries", "states"), [(1, [OK, OK, OK]), (0, [FAIL, OK, OK])], ids=["rerun", "no_retries"]
)
def test_when_tune_gives_up_on_its_run_the_running_trial_reruns_in_a_new_one(
    tmp_path, cache_dir, max_retries, states
):
    # An exception inside Tune's loop (here from the progress view, as a fault of Ray's or Tune's
    # own can raise one) ends Tune's whole run and stops the trial it was running.
    spec = load_spec(write_spec(tmp_path, "tune-stops"))
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    broke: list[str] = []

    def on_event(event: StageEvent) -> None:
        if event.kind == "trial_start" and not broke:
            broke.append(event.stage.name)
            raise RuntimeError("the progress view broke")

    summary = launch(
        spec,
        storage_url=storage_url,
        runs_dir=tmp_path / "runs",
        cache_dir=cache_dir,
        on_event=on_event,
        max_retries=max_retries,
    )
    assert broke == ["ft_embed"]
    trials = stage_trials(storage_url, spec.name)
    # Within its retries it ran again under its Optuna trial, in a new Tune run; out of them it
    # failed with Ray's reason, for a relaunch to run. Either way the launch went on.
    assert [t.state for t in trials] == states and len(completed_rates(trials)) == 2 + max_retries
    assert summary.failed == {"ft_embed": 1 - max_retries}
    if not max_retries:
        assert "Ray stopped the launch's run" in trials[0].user_attrs["fail_reason"]
        assert "RuntimeError: the progress view broke" in trials[0].user_attrs["fail_reason"]
        assert trials[0].user_attrs["retryable"] is True


@pytest.mark.slow
def test_a_killed_driver_is_resumed_by_a_relaunch_without_losing_or_repeating_trials(
    tmp_path, cache_dir
):
    spec = write_spec(tmp_path, "driver-kill")
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    driver = launch_process(spec, storage_url, cache_dir)
    wait_for_states(driver, storage_url, "driver-kill/ft_embed", {OK, RUNNING})

    # Frozen mid-trial (alive, but writing nothing), it still holds the study: a second launch
    # of the same spec is refused.
    driver.send_signal(signal.SIGSTOP)
    second = launch_process(spec, storage_url, cache_dir)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and "being run by another launch" in err, err
    assert "Traceback" not in err

    ray_processes = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    kill_tree_leftovers(ray_processes)
    before = stage_trials(storage_url, "driver-kill")
    running = [t.number for t in before if t.state == RUNNING]
    completed = {
        t.number: (t.params, t.values, t.datetime_complete) for t in before if t.state == OK
    }
    assert running and completed

    relaunch = launch_process(spec, storage_url, cache_dir)
    out, err = relaunch.communicate(timeout=600)
    assert relaunch.returncode == 0, err
    assert f"{len(running)} left running by a stopped launch" in out
    # Not a terminal: a line per finished trial, for log files, then the table.
    assert "stage ft_embed: trial 1/" in out and "(best " in out and "remaining ~" in out
    after = stage_trials(storage_url, "driver-kill")
    for number in running:
        assert after[number].state == FAIL
        assert "stopped before it finished" in after[number].user_attrs["fail_reason"]
        assert after[number].user_attrs["retryable"] is True
    assert {
        n: (after[n].params, after[n].values, after[n].datetime_complete) for n in completed
    } == (completed)
    assert completed_rates(after) == sorted(GRID)  # each point once: none lost, none repeated
    assert all(t.params["lr_embedder"] in GRID for t in after)
    assert not [t for t in after if t.state in (RUNNING, optuna.trial.TrialState.WAITING)]
    study = optuna.load_study(study_name="driver-kill/ft_embed", storage=open_storage(storage_url))
    assert study.user_attrs[LAUNCH_ATTR] is None  # the claim was released


def test_a_trial_killed_with_its_launch_continues_from_its_resume_point(tmp_path, cache_dir):
    """SIGKILL the launch while its one trial trains (points saved after every step): the
    relaunch's run of the point continues from the last one and finishes; none is left behind."""
    training = FAULT_SPEC["training"] | {"epochs": 40}  # a trial of some seconds
    spec = write_spec(
        tmp_path,
        "resume",
        training=training,
        search={"lr_embedder": [1e-3]},
        resume_every_minutes=0,
    )
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    driver = launch_process(spec, storage_url, cache_dir)
    stage_dir = tmp_path / "runs" / "resume" / "ft_embed"
    deadline = time.monotonic() + 300
    while not list(stage_dir.glob("resume-*/resume.pt")):
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "the trial saved no resume point"
        time.sleep(0.1)
    ray_processes = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    kill_tree_leftovers(ray_processes)
    (killed,) = stage_trials(storage_url, "resume")
    assert killed.state == RUNNING

    relaunch = launch_process(spec, storage_url, cache_dir)
    _, err = relaunch.communicate(timeout=600)
    assert relaunch.returncode == 0, err
    abandoned, rerun = stage_trials(storage_url, "resume")
    assert abandoned.state == FAIL and rerun.state == OK
    resumed = rerun.user_attrs["record"]["resumed"]
    assert resumed["phase"] == "embedder" and resumed["step"] >= 1
    # Every step of the phase counted once: those before the kill came with the point.
    mnrl_items = sum(len(record.gold_doc_ids) for record in load_data(TINY_DATA).train)
    assert rerun.user_attrs["metrics"]["train_steps"] == 40 * math.ceil(mnrl_items / 4)
    assert not list(stage_dir.glob("resume-*"))  # the finished trial removed its point


def test_points_turned_off_remove_the_point_an_earlier_run_kept(tmp_path):
    # A trial that failed as retryable keeps its point for the relaunch's run of it; that run,
    # with points turned off, starts over, and nothing else would delete the point.
    trial = tiny_config("ft_embed")
    on = load_spec(write_spec(tmp_path, "points", resume_every_minutes=10))
    kept = _resume(on, "ft_embed", trial, tmp_path / "runs")
    assert kept is not None and kept.every_s == 600
    kept.folder.mkdir(parents=True)
    (kept.folder / "resume.pt").write_bytes(b"a point")
    off = on.model_copy(update={"resume_every_minutes": None})
    assert _resume(off, "ft_embed", trial, tmp_path / "runs") is None
    assert not kept.folder.exists()


def test_ctrl_c_stops_the_whole_launch_and_a_relaunch_finishes_it(tmp_path, cache_dir):
    name = unique("ctrl-c")
    spec = write_spec(
        tmp_path,
        name,
        methods=["ft_embed", "ft_gen"],
        search={"lr_embedder": GRID, "lr_generator": [1e-3]},
    )
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    driver = launch_process(spec, storage_url, cache_dir, own_group=True)
    wait_for_states(driver, storage_url, f"{name}/ft_embed", {RUNNING})
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    # Tune stops its trials before the driver exits: over 120 s once on 2 loaded cores (load ~5).
    _, err = driver.communicate(timeout=300)

    assert driver.returncode == 130, err
    assert "interrupted" in err and f"launch {spec} again" in err and "Traceback" not in err
    assert f"ragsweep launch {spec} --storage {storage_url}" in " ".join(err.split())
    storage = open_storage(storage_url)
    interrupted = [t for t in stage_trials(storage_url, name) if t.state == FAIL]
    assert interrupted and not [t for t in stage_trials(storage_url, name) if t.state == RUNNING]
    for trial in interrupted:
        assert "interrupted (Ctrl-C)" in trial.user_attrs["fail_reason"]
        assert trial.user_attrs["retryable"] is True
    # The launch stopped: the next stage did not start.
    ft_gen = optuna.load_study(study_name=f"{name}/ft_gen", storage=storage)
    assert not [t for t in ft_gen.get_trials(deepcopy=False) if t.state == OK]

    relaunch = launch_process(spec, storage_url, cache_dir)
    _, err = relaunch.communicate(timeout=600)
    assert relaunch.returncode == 0, err
    assert completed_rates(stage_trials(storage_url, name)) == sorted(GRID)
    assert [t.state for t in ft_gen.get_trials(deepcopy=False)] == [OK]


@pytest.mark.slow
def test_two_launches_write_one_database_at_once(storage_url, tmp_path, cache_dir):
    names = [unique("writer-a"), unique("writer-b")]
    drivers = [
        launch_process(write_spec(tmp_path, name), storage_url, cache_dir, "--max-retries", "0")
        for name in names
    ]
    for driver in drivers:
        _, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err
    for name in names:
        trials = stage_trials(storage_url, name)
        assert completed_rates(trials) == sorted(GRID) and len(trials) == len(GRID)
        for trial in trials:  # each trial holds its own study's results, nothing crossed over
            assert (
                trial.user_attrs["record"]["config"]["lr_embedder"] == trial.params["lr_embedder"]
            )
            assert trial.values[0] == trial.user_attrs["metrics"]["f1"]
    if storage_url.startswith("sqlite"):
        with sqlite3.connect(storage_url.removeprefix("sqlite:///")) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def _study_with_running_trial(storage_url: str, name: str) -> optuna.Study:
    study = optuna.create_study(study_name=f"{name}/ft_embed", storage=open_storage(storage_url))
    study.set_user_attr("ragsweep.group", name)
    done = study.ask({"lr_embedder": optuna.distributions.FloatDistribution(1e-5, 1e-2)})
    study.tell(done, 0.5)
    study.ask({"lr_embedder": optuna.distributions.FloatDistribution(1e-5, 1e-2)})
    return study


def _other_host_owner(heartbeat_age_s: float) -> LaunchOwner:
    owner = LaunchOwner.this_process()
    owner.update(host=f"not-{socket.gethostname()}", heartbeat=time.time() - heartbeat_age_s)
    return owner


def test_a_launch_on_another_host_holds_its_study_while_it_heartbeats(storage_url, tmp_path):
    study = _study_with_running_trial(storage_url, unique("remote-live"))
    study.set_user_attr(LAUNCH_ATTR, dict(_other_host_owner(heartbeat_age_s=5)))
    with pytest.raises(ConfigError, match="being run by another launch"):
        check_not_running([study])
    with pytest.raises(ConfigError, match="being run by another launch"):
        claim_studies([study], LaunchOwner.this_process())
    assert [t.state for t in study.get_trials()] == [OK, RUNNING]  # its trial left alone


def test_trials_of_a_launch_that_stopped_heartbeating_are_failed_as_retryable(
    storage_url, tmp_path
):
    study = _study_with_running_trial(storage_url, unique("remote-dead"))
    dead = _other_host_owner(heartbeat_age_s=3600)
    study.set_user_attr(LAUNCH_ATTR, dict(dead))
    check_not_running([study])  # stale: not refused
    claim_studies([study], LaunchOwner.this_process())
    assert fail_abandoned_trials(study, dead) == [1]
    trials = study.get_trials()
    assert [t.state for t in trials] == [OK, FAIL]
    assert dead["host"] in trials[1].user_attrs["fail_reason"]
    assert trials[1].user_attrs["retryable"] is True
    assert finished_params(study) == [trials[0].params]  # the failed point runs again
    assert trials[0].value == 0.5  # the completed trial is untouched


def test_a_dead_process_on_this_host_releases_its_claim_at_once(storage_url, tmp_path):
    study = _study_with_running_trial(storage_url, unique("local-dead"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = LaunchOwner.this_process()
    owner.update(pid=child.pid, pid_started=psutil.Process(child.pid).create_time())
    study.set_user_attr(LAUNCH_ATTR, dict(owner))
    with pytest.raises(ConfigError, match=f"pid {child.pid}"):
        check_not_running([study])
    child.kill()
    child.wait()
    check_not_running([study])  # its heartbeat is fresh, but the process is gone
